"""`QArray`: the compressed leaf of uniform quantization (integer codes, scale, zero point, spec).

`quantize(x, spec)` stores the codes of `x` in the spec's storage dtype (int8, int4, int2, int16
or float8, unsigned twins for unsigned specs), a float32 scale per tensor / channel / group and,
for asymmetric specs, an integer zero point. `materialize()` (or `dequantize`) gives the float
array back; `nbytes` counts what is really stored (int4 at 4 bits, int2 at 2 bits, plus scales
and zero points), and `packed_values()` returns those bits as a numpy `uint8` buffer.

The codes may be stored transposed (`perm`), which integer matmuls prefer on some backends
(`jaxcomp.quant.prepare_for_serving` chooses); every method speaks the dense layout regardless.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core import CompressedLeaf, bit_width, compressed_leaf, static_field
from jaxcomp.quant.numerics import (
    QuantParams,
    check_finite,
    check_float,
    check_key,
    check_params,
    dense_leaf,
    dequantize_codes,
    layout,
    quant_params,
    quantize_codes,
    rounding_noise,
)
from jaxcomp.quant.spec import QuantSpec, specs_by_path
from jaxcomp.tree import Where, map_selected, selected_paths

__all__ = ["QArray", "dequantize", "pack_bits", "quantize", "quantize_tree", "unpack_bits"]


@compressed_leaf
class QArray(CompressedLeaf):
    """A uniformly quantized array: codes, scale, optional zero point and the static spec.

    Attributes:
      values: the codes in `spec.storage_dtype`, in the dense shape permuted by `perm`.
      scale: float32 scales in the grouped keepdims shape of the dense array (see
        `jaxcomp.quant.numerics.layout`).
      zero_point: integer zero points (storage dtype, shape of `scale`), None if symmetric.
      spec: the `QuantSpec` (static).
      dense_dtype: dtype `materialize` returns (static; the dtype that was quantized).
      perm: None, or the axis permutation the codes are stored in (static):
        `values = transpose(codes, perm)`.

    Example:
        >>> q = quantize(jnp.array([[0.5, -1.0], [0.25, 2.0]]), QuantSpec(channel_axes=(-1,)))
        >>> q.values.dtype, q.scale.shape, q.nbytes
        (dtype('int8'), (1, 2), 12)
        >>> q.materialize().round(3)
        Array([[ 0.5  , -1.008],
               [ 0.252,  2.   ]], dtype=float32)
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec = static_field()
    dense_dtype: Any = static_field(default=np.dtype(np.float32))
    perm: tuple[int, ...] | None = static_field(default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.values.shape)
        if self.perm is None:
            return shape
        dense = [0] * len(shape)
        for stored_axis, dense_axis in enumerate(self.perm):
            dense[dense_axis] = shape[stored_axis]
        return tuple(dense)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dense_dtype)

    @property
    def params(self) -> QuantParams:
        """Scale and (float) zero point, as `QuantParams`."""
        zero_point = None if self.zero_point is None else self.zero_point.astype(jnp.float32)
        return QuantParams(self.scale, zero_point)

    def codes(self) -> jax.Array:
        """The codes in the dense layout (storage dtype)."""
        if self.perm is None:
            return self.values
        return jnp.transpose(self.values, np.argsort(self.perm))

    def materialize(self) -> jax.Array:
        return _materialize(self)

    def transpose_storage(self, perm: tuple[int, ...] | None) -> QArray:
        """The same array with its codes stored in the axis order `perm` of the dense shape.

        Example:
            >>> q = quantize(jnp.ones((2, 3)), QuantSpec())
            >>> q.transpose_storage((1, 0)).values.shape, q.transpose_storage((1, 0)).shape
            ((3, 2), (2, 3))
        """
        ndim = len(self.shape)
        if perm is not None and sorted(perm) != list(range(ndim)):
            raise ValueError(f"perm={perm!r} is not a permutation of the {ndim} axes")
        if perm is not None and tuple(perm) == tuple(range(ndim)):
            perm = None
        codes = self.codes()
        values = codes if perm is None else jnp.transpose(codes, perm)
        return QArray(values, self.scale, self.zero_point, self.spec, self.dense_dtype,
                      None if perm is None else tuple(perm))

    def packed_values(self) -> np.ndarray:
        """The codes in dense row-major order, bit-packed into a numpy `uint8` buffer.

        int4 codes go two to a byte and int2 codes four to a byte (first element in the low
        bits); int8 and float8 codes one to a byte; int16 codes little-endian in two bytes.
        `unpack_bits` inverts it.
        """
        return pack_bits(np.asarray(jax.device_get(self.codes())))

    @property
    def kind(self) -> str:
        return "QArray"

    def summary(self) -> str:
        scales = "x".join(map(str, self.scale.shape)) or "1"
        return f"{self.spec.describe()}, scales {scales}"


@jax.jit
def _materialize(q: QArray) -> jax.Array:
    # Jitted so eager callers (reports, export) run one program, not one dispatch per op.
    return dequantize_codes(q.codes(), q.params, q.spec, q.dtype)


def _is_code_dtype(dtype: np.dtype) -> bool:
    # ml_dtypes' int4/int2/float8 have NumPy kind "V": ask JAX what they are.
    return bool(jnp.issubdtype(dtype, jnp.integer)
                or (jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1))


def pack_bits(codes: np.ndarray) -> np.ndarray:
    """Packs a numpy array of int2/int4/int8/int16/float8 codes into `uint8` (low bits first).

    Raises:
      ValueError: for an array that does not hold integer or float8 codes.

    Example:
        >>> pack_bits(np.array([1, -1, 0, 2], dtype=jnp.int4))
        array([241,  32], dtype=uint8)
    """
    codes = np.ascontiguousarray(codes)
    if not _is_code_dtype(codes.dtype):
        raise ValueError(f"pack_bits packs integer or float8 codes, got an array of dtype "
                         f"{codes.dtype} (quantize first, e.g. jaxcomp.quant.quantize)")
    codes = codes.reshape(-1)
    width = bit_width(codes.dtype)
    raw = codes.view(np.uint8) if codes.dtype.itemsize == 1 else codes.astype(codes.dtype.newbyteorder("<")).view(np.uint8)
    if width >= 8:
        return raw.copy()
    per_byte = 8 // width
    low = raw & np.uint8((1 << width) - 1)
    pad = (-low.size) % per_byte
    low = np.concatenate([low, np.zeros(pad, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).astype(np.uint8)
    return np.bitwise_or.reduce(low << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_bits`: codes of `dtype` (int2, int4, ... float8) and `shape`.

    Example:
        >>> unpack_bits(np.array([241, 32], np.uint8), jnp.int4, (4,))
        array([1, -1, 0, 2], dtype=int4)
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    width = bit_width(dtype)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if width >= 8:
        return packed[: size * dtype.itemsize].view(dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    per_byte = 8 // width
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).astype(np.uint8)
    low = ((packed[:, None] >> shifts) & np.uint8((1 << width) - 1)).reshape(-1)[:size]
    if jnp.issubdtype(dtype, jnp.signedinteger):
        # Sign-extend: codes at or above 2**(width-1) are negative.
        signed = low.astype(np.int16) - ((low >= (1 << (width - 1))) << width)
        return signed.astype(dtype).reshape(shape)
    return low.astype(dtype).reshape(shape)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    params: QuantParams | None = None,
    key: jax.Array | None = None,
    path: str = "x",
) -> QArray:
    """Quantizes `x` into a `QArray` (post-training quantization of one array).

    Args:
      x: a float array (float32, bfloat16, ...); `materialize` returns its dtype.
      spec: the quantization spec.
      params: a fixed scale and zero point (e.g. from an observer or `lsq`); by default they
        are computed from `x`.
      key: PRNG key, required for stochastic rounding.
      path: the name used in error messages.

    Returns:
      A `QArray`.

    Raises:
      ValueError: naming `path` for a non-float `x`, NaN/Inf in a concrete `x`, an out-of-range
        axis, a group size that does not divide its axis, stochastic rounding without a key, or
        `params` of the wrong shape or with scales that are not finite and positive.

    Example:
        >>> quantize(jnp.array([0.6, -1.0]), QuantSpec(bits=4)).values
        Array([4, -7], dtype=int4)
    """
    check_float(x, path)
    x = jnp.asarray(x)
    check_finite(x, path)
    lay = layout(x.shape, spec, path)  # validates axes and groups, naming the path
    if params is not None:
        params = check_params(params, lay, path, spec)
    rounding_noise(key, (), spec, path)  # validates the key for stochastic rounding
    return _quantize(x, params, key, spec)


@functools.partial(jax.jit, static_argnums=(3,))
def _quantize(x, params: QuantParams | None, key, spec: QuantSpec) -> QArray:
    """The arithmetic of `quantize`, one compiled program per shape and spec."""
    lay = layout(x.shape, spec)
    if params is None:
        params = quant_params(x, spec)
    else:
        scale = jnp.broadcast_to(jnp.asarray(params.scale, jnp.float32), lay.params_shape)
        zero = params.zero_point
        zero = None if zero is None else jnp.broadcast_to(jnp.asarray(zero, jnp.float32), lay.params_shape)
        params = QuantParams(scale, zero)
    values = quantize_codes(x, params, spec, key=key)
    zero_point = None if params.zero_point is None else params.zero_point.astype(spec.storage_dtype)
    return QArray(values, params.scale, zero_point, spec, np.dtype(x.dtype))


def dequantize(q: QArray) -> jax.Array:
    """The float array a `QArray` stands for (same as `q.materialize()`).

    Example:
        >>> dequantize(quantize(jnp.array([0.5, -1.0]), QuantSpec())).round(3)
        Array([ 0.504, -1.   ], dtype=float32)
    """
    if not isinstance(q, QArray):
        raise ValueError(f"dequantize expects a QArray, got {type(q).__name__}")
    return q.materialize()


def quantize_tree(
    params: Any,
    spec: QuantSpec | Mapping[Where, QuantSpec] | Sequence[tuple[Where, QuantSpec]],
    *,
    where: Where = None,
    key: jax.Array | None = None,
    scales: Mapping[str, QuantParams] | None = None,
) -> Any:
    """Post-training quantization of a model: `quantize` on every leaf `where` selects.

    The result holds `QArray` leaves; `jaxcomp.materialize(result)` gives floats back for any
    model, `jaxcomp.report(result)` counts the real bytes, and `jaxcomp.nn.quant` serves Linen
    and NNX models from it with integer kernels. Activation ranges come from calibration
    (`jaxcomp.quant.calibrate`, or the Flax helpers `jaxcomp.nn.quant.calibrate_linen` and
    `calibrate_nnx`, which run the model on a few batches).

    Args:
      params: a parameter tree (Linen params, NNX `State`, nested containers).
      spec: the quantization spec; or rules, `{where: QuantSpec}` or `(where, QuantSpec)`
        pairs, first match wins, for layers that need different specs (a transformer's q/k/v
        kernels per `(1, 2)` channel, the rest per `(-1,)`); leaves no rule matches are left.
      where: the selection (regex on "/"-joined paths, predicate, bool tree, None for all).
      key: PRNG key for stochastic rounding (each leaf gets `fold_in(key, index)`).
      scales: static `{path: QuantParams}` for some selected leaves, e.g. the learned weight
        steps `lsq_as_static(w_steps)` of LSQ training, so the stored codes are the grid that
        was trained; the other selected leaves take their range from their values.

    Returns:
      A tree with the structure of `params` and `QArray` leaves where selected.

    Raises:
      ValueError: if `where` selects nothing, if a spec rule quantizes nothing, if `scales`
        names a path that is not quantized, or naming the path of a selected leaf that is not
        float, holds NaN/Inf, does not fit the spec's axes and groups, or whose static scales
        do not fit it.

    Example:
        >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> q = quantize_tree(params, QuantSpec(bits=4), where=r".*kernel")
        >>> type(q["Dense_0"]["kernel"]).__name__, q["Dense_0"]["kernel"].nbytes
        ('QArray', 10)
    """
    counter = iter(range(1 << 30))
    if key is not None:
        check_key(key, "quantize_tree: key")
    where, specs = specs_by_path(params, spec, where, "quantize_tree")
    if scales is not None and not isinstance(scales, Mapping):
        raise ValueError(f"quantize_tree: scales must map paths to QuantParams, got {scales!r}")
    scales = dict(scales or {})
    if scales:
        chosen = set(selected_paths(params, where))
        unknown = sorted(p for p in scales if p not in chosen)
        if unknown:
            raise ValueError(f"quantize_tree: scales has paths that where={where!r} does not "
                             f"select: {unknown[:5]}; selected: {sorted(chosen)[:10]}")

    def one(path, leaf):
        index = next(counter)
        leaf = dense_leaf(leaf, path, "quantize_tree")
        leaf_key = None if key is None else jax.random.fold_in(key, index)
        return quantize(leaf, specs.get(path, spec), params=scales.get(path), key=leaf_key,
                        path=path)

    return map_selected(one, params, where=where, with_path=True)
