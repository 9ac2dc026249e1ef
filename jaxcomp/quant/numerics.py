"""Quantization arithmetic: ranges, scales and zero points, codes, and their inverse.

Everything here is elementwise or a reduction, so it jits, vmaps and keeps the sharding of its
input. Scales and zero points are kept in a *grouped keepdims* shape: the input shape with the
group axis (if any) split into `(n_groups, group_size)`, and every axis that does not keep its own
scale reduced to 1. They broadcast against the grouped input, which `to_grouped` gives.

A scale is never zero: a range of zero (an all-zero tensor or channel) gets scale 1, so zeros
stay zero and nothing divides by zero. Arithmetic runs in float32 (or float64 for float64
inputs) whatever the input dtype, so bfloat16 values round to the right code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_int, check_key
from jaxcomp.core import is_compressed
from jaxcomp.quant.spec import QuantSpec

__all__ = [
    "QuantParams",
    "Layout",
    "check_finite",
    "check_float",
    "dequantize_codes",
    "from_grouped",
    "layout",
    "params_from_range",
    "quant_params",
    "quant_range",
    "quantize_codes",
    "to_grouped",
]


class QuantParams(NamedTuple):
    """Scale and zero point of a quantized tensor, in the grouped keepdims shape.

    Attributes:
      scale: positive float32 scale(s).
      zero_point: integer-valued float32 zero point(s), or None for a symmetric spec.
    """

    scale: jax.Array
    zero_point: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor of `shape` is grouped and reduced under a spec (all static ints).

    Attributes:
      shape: the tensor's shape.
      grouped_shape: `shape` with the group axis split into (n_groups, group_size).
      reduce_axes: axes of the grouped shape that share one scale.
      params_shape: shape of the scale and zero point (grouped shape, reduced axes set to 1).
    """

    shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    params_shape: tuple[int, ...]

    @property
    def elements_per_scale(self) -> int:
        """How many elements share each scale."""
        return math.prod(self.grouped_shape[a] for a in self.reduce_axes)


def layout(shape: tuple[int, ...], spec: QuantSpec, path: str = "x") -> Layout:
    """The grouping and reduction of a tensor of `shape` under `spec`.

    Args:
      shape: the tensor's shape.
      spec: the quantization spec.
      path: the name used in error messages (a parameter path).

    Returns:
      A `Layout`.

    Raises:
      ValueError: naming `path` if an axis is out of range or `group_size` does not divide the
        group axis.

    Example:
        >>> layout((8, 3), QuantSpec(group_size=4, channel_axes=(-1,))).params_shape
        (2, 1, 3)
    """
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{path}: expected a jaxcomp.quant.QuantSpec, got {type(spec).__name__} "
                         f"{spec!r}")
    bad = [d for d in shape if as_int(d) is None or d < 0]
    if bad:
        raise ValueError(f"{path}: a shape holds non-negative ints, got {tuple(shape)}")
    shape = tuple(int(d) for d in shape)
    channels, group = spec.normalized_axes(len(shape), path)
    if group is None:
        kept = set(channels)
        grouped = shape
    else:
        size = spec.group_size
        if shape[group] % size:
            raise ValueError(
                f"{path}: group_size={size} does not divide axis {spec.group_axis} of length "
                f"{shape[group]} (shape {shape})"
            )
        grouped = shape[:group] + (shape[group] // size, size) + shape[group + 1 :]
        kept = {a if a < group else a + 1 for a in channels} | {group}
    reduce_axes = tuple(a for a in range(len(grouped)) if a not in kept)
    params_shape = tuple(1 if a in reduce_axes else d for a, d in enumerate(grouped))
    return Layout(shape, grouped, reduce_axes, params_shape)


def to_grouped(x: jax.Array, lay: Layout) -> jax.Array:
    """Reshapes `x` to `lay.grouped_shape` (a free reshape)."""
    return x.reshape(lay.grouped_shape)


def from_grouped(x: jax.Array, lay: Layout) -> jax.Array:
    """Reshapes a grouped array back to `lay.shape`."""
    return x.reshape(lay.shape)


def check_float(x: jax.typing.ArrayLike, path: str = "x") -> None:
    """Raises `ValueError` naming `path` unless `x` has a floating-point dtype.

    Example:
        >>> check_float(jnp.ones(2))
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(f"{path}: got an abstract array (ShapeDtypeStruct) where values are "
                         "needed; run the transform under jax.eval_shape to get abstract results")
    try:
        dtype = jnp.result_type(x)
    except TypeError as e:
        raise ValueError(f"{path}: expected a floating-point array, got {type(x).__name__}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{path}: expected a floating-point array, got dtype {dtype}")


def check_positive(value: jax.typing.ArrayLike, name: str, path: str) -> None:
    """Raises `ValueError` naming `path` if a concrete `value` (scales, an LSQ step, a PACT clip)
    holds a value that is not finite and positive; traced values are not checked.

    Example:
        >>> check_positive(jnp.array([0.5, 2.0]), "scales", "x")
    """
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value, np.float32)
    bad = ~(np.isfinite(array) & (array > 0))
    if bad.any():
        raise ValueError(f"{path}: {name} must be finite and positive, got "
                         f"{array[bad].ravel()[:4].tolist()}")


def as_quant_params(params: object, path: str = "x") -> QuantParams:
    """`params` as `QuantParams`: a `QuantParams`, or a `(scale,)` / `(scale, zero_point)` tuple.

    Raises:
      ValueError: naming `path` for anything else (a bare float scale, a dict...).

    Example:
        >>> as_quant_params((jnp.float32(0.5), None)).scale
        Array(0.5, dtype=float32)
    """
    if isinstance(params, QuantParams):
        return params
    if isinstance(params, tuple) and 1 <= len(params) <= 2:
        return QuantParams(*params)
    raise ValueError(f"{path}: expected QuantParams(scale, zero_point), got "
                     f"{type(params).__name__} {params!r}")


def check_params(params: QuantParams, lay: Layout, path: str,
                 spec: QuantSpec | None = None) -> QuantParams:
    """Validates static params and broadcasts them to `lay.params_shape` (float32).

    Scales must broadcast to the parameter shape and, where concrete, be finite and positive
    (a zero scale would collapse the grid). Zero points must broadcast likewise and, where
    concrete, be whole numbers inside the spec's integer range (a uint8 zero point of 128 given
    to an int8 spec would saturate every code).

    Raises:
      ValueError: naming `path` and the offending shape or value.
    """
    params = as_quant_params(params, path)
    if spec is not None and not spec.is_fp8 and (params.zero_point is None) != spec.symmetric:
        # Ranges calibrated for another spec: an asymmetric grid read without its zero point
        # starts at 0 and clips every negative value; a symmetric one has no zero point.
        raise ValueError(
            f"{path}: static params {'without' if params.zero_point is None else 'with'} a zero "
            f"point do not fit {spec.describe()}, which "
            f"{'needs one' if params.zero_point is None else 'has none'}; calibrate with the spec "
            "you quantize with" + (" (or give the zero point explicitly, 0 for a grid starting "
                                   "at zero)" if params.zero_point is None else ""))
    for name, value in (("scale", params.scale), ("zero_point", params.zero_point)):
        if value is None:
            continue
        try:
            shape = jnp.broadcast_shapes(jnp.shape(value), lay.params_shape)
        except ValueError:
            shape = None
        if shape != lay.params_shape:
            raise ValueError(
                f"{path}: {name} of shape {jnp.shape(value)} does not broadcast to the "
                f"quantization parameter shape {lay.params_shape} of an input of shape {lay.shape}"
            )
    scale = jnp.broadcast_to(jnp.asarray(params.scale, jnp.float32), lay.params_shape)
    check_positive(scale, "scales", path)
    zero_point = params.zero_point
    if zero_point is not None:
        zero_point = jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), lay.params_shape)
        if not isinstance(zero_point, jax.core.Tracer):
            # Integer kernels can only subtract whole zero points: 10.4 would give different
            # numbers on the integer and the float paths.
            z = np.asarray(zero_point)
            bad = ~(np.isfinite(z) & (z == np.round(z)))
            if bad.any():
                raise ValueError(f"{path}: zero points must be whole numbers, got "
                                 f"{z[bad].ravel()[:4].tolist()}")
            if spec is not None:
                outside = (z < spec.qmin) | (z > spec.qmax)
                if outside.any():
                    raise ValueError(
                        f"{path}: zero points must lie in [{spec.qmin}, {spec.qmax}] for "
                        f"{spec.describe()}, got {z[outside].ravel()[:4].tolist()}")
    return QuantParams(scale, zero_point)


def check_finite(x: jax.typing.ArrayLike, path: str = "x") -> None:
    """Raises `ValueError` naming `path` and the first bad value if a concrete `x` has NaN/Inf.

    Traced values are not checked (their values are unknown until run).

    Example:
        >>> check_finite(jnp.array([1.0, 2.0]))
    """
    if isinstance(x, jax.core.Tracer):
        return
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
        return
    # Reduced on the device(s) holding x: only three scalars come back, never the array.
    result = _non_finite(x)
    if any(isinstance(r, jax.core.Tracer) for r in result):
        return  # a constant captured by an outer jit: staged like the rest of the program
    count, first = jax.device_get(result)
    if count:
        index = tuple(int(i) for i in np.unravel_index(int(first), x.shape))
        value = jax.device_get(x[index])
        raise ValueError(
            f"{path}: {int(count)} NaN/Inf value(s), e.g. {value} at index {index}; "
            "quantization ranges need finite values"
        )


@jax.jit
def _non_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    bad = ~jnp.isfinite(x.reshape(-1))
    return jnp.sum(bad), jnp.argmax(bad)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def quant_range(x: jax.Array, spec: QuantSpec, lay: Layout | None = None) -> tuple[jax.Array, jax.Array]:
    """The `(lo, hi)` range of `x` that `spec` quantizes, per scale, always containing zero.

    Symmetric specs give `(-absmax, absmax)` (unsigned: `(0, max)`), asymmetric ones
    `(min(x, 0), max(x, 0))`.

    Args:
      x: a float array.
      spec: the quantization spec.
      lay: the precomputed `layout(x.shape, spec)`, if at hand.

    Returns:
      Two float32 arrays of shape `lay.params_shape`.

    Example:
        >>> lo, hi = quant_range(jnp.array([[-1.0, 3.0]]), QuantSpec())
        >>> float(lo[0, 0]), float(hi[0, 0])
        (-3.0, 3.0)
    """
    lay = lay or layout(x.shape, spec)
    xg = to_grouped(x, lay).astype(_compute_dtype(x.dtype))
    axes = lay.reduce_axes
    # The range always holds zero, which is also the range of an empty array.
    if spec.symmetric:
        if spec.signed:
            hi = jnp.max(jnp.abs(xg), axis=axes, keepdims=True, initial=0.0)
            return -hi, hi
        hi = jnp.max(xg, axis=axes, keepdims=True, initial=0.0)
        return jnp.zeros_like(hi), hi
    lo = jnp.min(xg, axis=axes, keepdims=True, initial=0.0)
    hi = jnp.max(xg, axis=axes, keepdims=True, initial=0.0)
    return lo, hi


def params_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> QuantParams:
    """Scale and zero point that map `[lo, hi]` onto the spec's integer grid.

    Symmetric: `s = max(|lo|, |hi|) / qmax` (unsigned: `hi / qmax`), `z = None`. Asymmetric:
    `s = (hi - lo) / (qmax - qmin)`, `z = qmin - round(lo / s)`. The range is widened to contain
    zero; an empty range gives `s = 1`, so zeros stay zero. Concrete ends that are not finite
    are a `ValueError`; traced ones (under `jit`) propagate their NaN.

    Example:
        >>> p = params_from_range(jnp.float32(-2.0), jnp.float32(6.0), QuantSpec(symmetric=False))
        >>> round(float(p.scale) * 255, 4), float(p.zero_point)
        (8.0, -64.0)
    """
    for name, end in (("lo", lo), ("hi", hi)):
        if not isinstance(end, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(end, np.float32))):
            raise ValueError(f"params_from_range: {name} must be finite, got "
                             f"{np.asarray(end).ravel()[:4].tolist()}")
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    shape = jnp.broadcast_shapes(lo.shape, hi.shape)
    if math.prod(shape) == 1:
        # Computed on 0-d values (reshaped back below) so XLA fuses it into its consumers.
        lo, hi = lo.reshape(()), hi.reshape(())
    lo, hi = jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    if spec.symmetric:
        span = jnp.maximum(-lo, hi) if spec.signed else hi
        scale = span / spec.qmax
        zero_point = None
    else:
        # Halved first (exact) so that a range near the float32 limits does not overflow.
        scale = (hi * 0.5 - lo * 0.5) / ((spec.qmax - spec.qmin) * 0.5)
    # A zero (or underflowed) scale would divide by zero; any positive scale maps 0 to 0. A NaN
    # range (a NaN in the tensor, seen under jit) stays NaN, so the NaN propagates.
    scale = jnp.where(scale == 0, 1.0, scale).astype(jnp.float32)
    if not spec.symmetric:
        zero_point = jnp.clip(spec.qmin - jnp.round(lo / scale), spec.qmin, spec.qmax).reshape(shape)
    return QuantParams(scale.reshape(shape), zero_point)


def quant_params(x: jax.Array, spec: QuantSpec, path: str = "x") -> QuantParams:
    """Scale and zero point of `x` from its own range (dynamic quantization).

    Example:
        >>> quant_params(jnp.array([0.5, -1.27]), QuantSpec()).scale
        Array([0.01], dtype=float32)
    """
    check_float(x, path)
    check_finite(x, path)
    lay = layout(x.shape, spec, path)
    return params_from_range(*quant_range(x, spec, lay), spec)


def _scalar_if_single(v: jax.Array | None) -> jax.Array | None:
    # A 0-d scale lets XLA fuse its computation into the elementwise pass; a (1, 1) one does not.
    return v.reshape(()) if v is not None and v.size == 1 else v


def codes_from_grouped(
    xg: jax.Array, params: QuantParams, spec: QuantSpec, noise: jax.Array | None = None
) -> jax.Array:
    """Integer-valued float codes of a grouped array (the core of every quantizer)."""
    params = QuantParams(_scalar_if_single(params.scale), _scalar_if_single(params.zero_point))
    xg = xg.astype(_compute_dtype(xg.dtype))
    # A division per element (not a multiply by 1/s) lets XLA fuse the scale computation into
    # this elementwise pass instead of running it as a separate kernel. (XLA may still turn it
    # into a multiply by the reciprocal, one float32 rounding off at a tie: see the docs.)
    v = xg / params.scale.astype(xg.dtype)
    if spec.is_fp8:
        fp8 = spec.storage_dtype
        return jnp.clip(v, spec.qmin, spec.qmax).astype(fp8).astype(xg.dtype)
    if params.zero_point is not None:
        v = v + params.zero_point.astype(xg.dtype)
    v = jnp.floor(v + noise) if noise is not None else jnp.round(v)
    return jnp.clip(v, spec.qmin, spec.qmax)


def values_from_codes(q: jax.Array, params: QuantParams) -> jax.Array:
    """`scale * (q - zero_point)` on grouped codes."""
    params = QuantParams(_scalar_if_single(params.scale), _scalar_if_single(params.zero_point))
    if params.zero_point is not None:
        q = q - params.zero_point.astype(q.dtype)
    return q * params.scale.astype(q.dtype)


def rounding_noise(key: jax.Array | None, shape: tuple[int, ...], spec: QuantSpec, path: str = "x"):
    """Uniform [0, 1) noise for stochastic rounding, or None for nearest rounding.

    Raises:
      ValueError: naming `path` when the spec rounds stochastically and `key` is None.
    """
    if spec.rounding != "stochastic":
        return None
    if key is None:
        raise ValueError(f"{path}: rounding='stochastic' needs an explicit key=jax.random.key(...)")
    check_key(key, path)
    return jax.random.uniform(key, shape, jnp.float32)


def quantize_codes(
    x: jax.Array,
    params: QuantParams,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    path: str = "x",
) -> jax.Array:
    """The codes of `x` in the spec's storage dtype (int8, int4, float8...), shape of `x`.

    Args:
      x: a float array.
      params: scale and zero point in the grouped keepdims shape (`quant_params`, an observer).
      spec: the quantization spec.
      key: the PRNG key for stochastic rounding.
      path: the name used in error messages.

    Raises:
      ValueError: naming `path` for a non-float `x`, NaN/Inf in a concrete `x`, or params that
        `check_params` rejects (scales not finite and positive, zero points outside the range).

    Example:
        >>> x = jnp.array([0.5, -1.0])
        >>> quantize_codes(x, quant_params(x, QuantSpec()), QuantSpec())
        Array([  64, -127], dtype=int8)
    """
    check_float(x, path)
    check_finite(x, path)
    lay = layout(x.shape, spec, path)
    params = check_params(params, lay, path, spec)
    noise = rounding_noise(key, lay.grouped_shape, spec, path)
    q = codes_from_grouped(to_grouped(x, lay), params, spec, noise)
    return from_grouped(q, lay).astype(spec.storage_dtype)


def dequantize_codes(
    q: jax.Array, params: QuantParams, spec: QuantSpec, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """`scale * (q - zero_point)` in `dtype`, shape of `q`.

    Example:
        >>> p = QuantParams(jnp.float32(0.5))
        >>> dequantize_codes(jnp.array([2, -3], jnp.int8), p, QuantSpec())
        Array([ 1. , -1.5], dtype=float32)
    """
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dequantize_codes: dtype must be a float dtype, got {jnp.dtype(dtype)}")
    lay = layout(q.shape, spec)
    qg = to_grouped(q, lay).astype(_compute_dtype(jnp.dtype(dtype)))
    return from_grouped(values_from_codes(qg, params), lay).astype(dtype)


def is_factorized(leaf: Any) -> bool:
    """Whether `leaf` is a factorized kernel of `jaxcomp.decompose` (imported only for a
    compressed leaf: tensorly loads with it)."""
    if not is_compressed(leaf):
        return False
    from jaxcomp.decompose.leaves import Factorized

    return isinstance(leaf, Factorized)


def dense_leaf(leaf: Any, path: str, caller: str) -> Any:
    """A selected leaf as the dense array to quantize: compressed leaves are materialized,
    except factorized kernels, whose dense rebuild would undo the decomposition silently (more
    bytes stored, more FLOPs run): those are a `ValueError` pointing at their factors."""
    if not is_compressed(leaf):
        return leaf
    if is_factorized(leaf):
        raise ValueError(
            f"{caller}: {path} is a factorized kernel ({leaf.kind}); quantizing it would rebuild "
            "and store the dense kernel, undoing the decomposition. Quantize its factors with "
            "jaxcomp.decompose.map_factors(fn, tree), or leave it out of where=")
    return leaf.materialize()
