"""Integer matmul on `QArray` weights: `qdot`.

`qdot(x, w)` quantizes the float activations `x` (dynamically, or with calibrated static
`act_params`), runs `lax.dot_general(int8, int8, preferred_element_type=int32)` and applies the
scales after the matmul: `y = s_x * s_w * (q_x @ q_w)`, with the zero-point terms
`- z_x * sum_k q_w - z_w * sum_k q_x + K z_x z_w` when either side is asymmetric and per-group
weight scales applied to per-group partial products. `activations=None` is weight-only mode
(float activations times integer weights, scale applied after the matmul).

How the product runs is a *strategy*: "int8" (the dot as is), "int8_padded" (rows padded to a
multiple of 8, which XLA's CPU int8 kernels need to be fast at batch sizes below 8) or
"dequantize" (fake-quantized activations times dequantized weights in float: the same numbers up
to float rounding, for shapes where the integer kernel is measured to be slower). With
`strategy="auto"` (the default) each strategy is timed once per shape, dtype and layout on the
current backend, when a function calling `qdot` is first traced, and the fastest is cached for
the rest of the process; nothing is measured on later calls.

Where the weight codes live matters too (see `jaxcomp.quant.serving.prepare_for_serving`): the
product follows the stored layout `QArray.perm`, so no transpose runs per call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcomp._checks import as_int
from jaxcomp.quant import tuning
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.numerics import (
    QuantParams,
    as_quant_params,
    check_finite,
    check_float,
    check_params,
    codes_from_grouped,
    from_grouped,
    layout,
    params_from_range,
    quant_range,
    to_grouped,
)
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec

__all__ = ["DEFAULT_ACTIVATIONS", "Strategy", "qdot", "quantize_activations"]

Strategy = Literal["auto", "int8", "int8_padded", "dequantize"]
_STRATEGIES = ("auto", "int8", "int8_padded", "dequantize")
DEFAULT_ACTIVATIONS = QuantSpec(bits=8)


def int8_without_zero_point(spec: QuantSpec, zero_point: jax.Array | None) -> bool:
    """Whether codes of `spec` run as int8 with no zero point: symmetric codes that fit int8
    as they are (unsigned 8-bit codes get a zero point of -128 from the shift into int8)."""
    return zero_point is None and (spec.signed or spec.bits < 8)


def _int8_codes(codes: jax.Array, zero_point: jax.Array | None, spec: QuantSpec, path: str):
    """Codes as int8 plus the float zero point that goes with them (uint8 shifts by -128)."""
    if spec.is_fp8 or spec.bits > 8:
        raise ValueError(f"{path}: the integer path needs integer codes of at most 8 bits, got "
                         f"{spec.describe()}")
    if not spec.signed and spec.bits == 8:
        shifted = (codes.astype(jnp.int16) - 128).astype(jnp.int8)
        zero = -128.0 if zero_point is None else zero_point - 128.0
        return shifted, jnp.asarray(zero, jnp.float32)
    return codes.astype(jnp.int8), zero_point


def quantize_activations(
    x: jax.Array,
    activations: QuantSpec,
    act_params: QuantParams | None,
    contract: Sequence[int],
    path: str = "x",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """int8 codes of `x`, its scale and (float) zero point, scales shared along `contract`.

    Unsigned 8-bit codes are shifted into int8 (zero point - 128), so every integer product
    runs int8 x int8.

    Raises:
      ValueError: naming `path` when the scales would vary along a contracted axis, or for
        concrete `act_params` that `check_params` rejects (scales not finite and positive, zero
        points not whole or outside the spec's range, shapes that do not broadcast).
    """
    lay = layout(x.shape, activations, path)
    if lay.grouped_shape != lay.shape or any(lay.params_shape[a] != 1 for a in contract):
        raise ValueError(
            f"{path}: activation scales must be shared along the contracted axes {tuple(contract)} "
            f"(per-tensor or per-row), got {activations.describe()}"
        )
    if act_params is None:
        params = params_from_range(*quant_range(x, activations, lay), activations)
    else:
        # Concrete static params are checked here too, for callers that come straight here (the
        # integer einsum): a zero, negative or NaN scale would give a silently wrong product.
        params = check_params(QuantParams(*act_params), lay, path, activations)
        # A NaN has no integer code: it makes its row's scale NaN (so the row's outputs), as a
        # dynamic range over it would, instead of a garbage code.
        bad = jnp.any(jnp.isnan(x), axis=tuple(contract), keepdims=True)
        params = params._replace(scale=jnp.where(bad, jnp.nan, params.scale))
    codes = from_grouped(codes_from_grouped(to_grouped(x, lay), params, activations), lay)
    q, zero = _int8_codes(codes, params.zero_point, activations, path)
    return q, params.scale, zero


def _normalize_dims(dimension_numbers, x_ndim: int, w_ndim: int, path: str):
    if dimension_numbers is None:
        return ((x_ndim - 1,), (0,)), ((), ())
    def axes(values, ndim):
        out = []
        for a in values:
            if as_int(a) is None or not -ndim <= a < ndim:
                raise ValueError(f"{path}: dimension_numbers {dimension_numbers!r} name axis {a!r}, "
                                 f"not an axis of a rank-{ndim} operand")
            out.append(int(a) % ndim)
        if len(set(out)) != len(out):
            raise ValueError(f"{path}: dimension_numbers {dimension_numbers!r} repeat an axis")
        return tuple(out)

    try:
        (xc, wc), (xb, wb) = dimension_numbers
        xc, wc, xb, wb = axes(xc, x_ndim), axes(wc, w_ndim), axes(xb, x_ndim), axes(wb, w_ndim)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: invalid dimension_numbers {dimension_numbers!r}") from e
    if len(xc) != len(wc) or len(xb) != len(wb):
        raise ValueError(f"{path}: dimension_numbers {dimension_numbers!r} pair unequal axes")
    if set(xc) & set(xb) or set(wc) & set(wb):
        raise ValueError(f"{path}: dimension_numbers {dimension_numbers!r} use an axis twice")
    return (xc, wc), (xb, wb)


def _squeeze_to(params: jax.Array, drop: Sequence[int]) -> jax.Array:
    """Removes the size-1 axes `drop` of a keepdims parameter array."""
    return params.reshape([d for a, d in enumerate(params.shape) if a not in set(drop)])


def _weight_scales_fit(w: QArray, wc: Sequence[int]) -> bool:
    lay = layout(w.shape, w.spec)
    return lay.grouped_shape == lay.shape and all(lay.params_shape[a] == 1 for a in wc)


def _trailing(v: jax.Array, n_lead: int) -> jax.Array:
    """Adds `n_lead` leading axes so `v` broadcasts over the trailing axes of the output."""
    return v.reshape((1,) * n_lead + v.shape)


def _leading(v: jax.Array, n_trail: int) -> jax.Array:
    return v.reshape(v.shape + (1,) * n_trail)


def _stored_dims(w: QArray, wc: Sequence[int]):
    """Contracting axes in storage order, and the permutation from stored to dense free axes."""
    perm = w.perm or tuple(range(len(w.shape)))
    stored_of = {dense: stored for stored, dense in enumerate(perm)}
    stored_wc = tuple(stored_of[a] for a in wc)
    free_stored = [a for a in range(len(perm)) if a not in stored_wc]
    free_dense_order = [perm[a] for a in free_stored]
    to_dense = tuple(int(i) for i in np.argsort(free_dense_order))
    return stored_wc, to_dense


def _dequantize_path(x, w, dims, activations, act_params, out_dtype, path):
    """Fake-quantized activations times the weight codes in float, scales after."""
    x = fake_quant(x, activations, params=act_params, path=path)
    return _weight_only(x, w, dims, out_dtype)


def _weight_only(x, w, dims, out_dtype):
    (xc, wc), (xb, wb) = dims
    if xb or not _weight_scales_fit(w, wc):
        return lax.dot_general(x, w.materialize().astype(out_dtype), dims).astype(out_dtype)
    stored_wc, to_dense = _stored_dims(w, wc)
    y = lax.dot_general(x, w.values.astype(out_dtype), ((xc, stored_wc), ((), ())))
    n_x_free = x.ndim - len(xc)
    if to_dense != tuple(range(len(to_dense))):
        y = jnp.transpose(y, tuple(range(n_x_free)) + tuple(n_x_free + i for i in to_dense))
    params = w.params
    if params.zero_point is not None:
        x_sum = jnp.sum(x, axis=xc)
        y = y - _leading(x_sum, len(to_dense)) * _trailing(_squeeze_to(params.zero_point, wc), n_x_free)
    return (y * _trailing(_squeeze_to(params.scale, wc), n_x_free)).astype(out_dtype)


def _int_dot(x, w, dims, activations, act_params, out_dtype, pad_rows: bool, path):
    (xc, wc), _ = dims
    lay_w = layout(w.shape, w.spec)
    grouped = lay_w.grouped_shape != lay_w.shape
    xq, sx, zx = quantize_activations(x, activations, act_params, xc, path)
    wq, zw = _int8_codes(w.values, w.params.zero_point, w.spec, path)
    stored_wc, to_dense = _stored_dims(w, wc)
    n_x_free = x.ndim - len(xc)
    n_w_free = len(to_dense)
    x_free_shape = [d for a, d in enumerate(x.shape) if a not in xc]

    pad = 0
    if pad_rows and xc == (x.ndim - 1,):
        rows = math.prod(x_free_shape)
        pad = -rows % 8
        if pad:
            xq = jnp.pad(xq.reshape(rows, x.shape[-1]), ((0, pad), (0, 0)))
    if grouped:
        g_axis = w.spec.normalized_axes(len(w.shape))[1]
        x_axis = xc[0] if pad == 0 else 1
        w_stored_axis = stored_wc[0]
        size = w.spec.group_size
        xg = xq.reshape(xq.shape[:x_axis] + (xq.shape[x_axis] // size, size) + xq.shape[x_axis + 1:])
        wg = wq.reshape(wq.shape[:w_stored_axis] + (wq.shape[w_stored_axis] // size, size)
                        + wq.shape[w_stored_axis + 1:])
        acc = lax.dot_general(xg, wg, (((x_axis + 1,), (w_stored_axis + 1,)), ((x_axis,), (w_stored_axis,))),
                              preferred_element_type=jnp.int32)
        # acc: (groups, x free..., w free (stored)...)
    else:
        x_contract = xc if pad == 0 else (1,)
        acc = lax.dot_general(xq, wq, ((x_contract, stored_wc), ((), ())), preferred_element_type=jnp.int32)
    if pad:
        lead = (acc.shape[0],) if grouped else ()
        acc = acc[(slice(None),) * len(lead) + (slice(0, acc.shape[len(lead)] - pad),)]
        acc = acc.reshape(lead + tuple(x_free_shape) + acc.shape[len(lead) + 1:])
    n_lead = 1 if grouped else 0
    if to_dense != tuple(range(n_w_free)):
        base = n_lead + n_x_free
        acc = jnp.transpose(acc, tuple(range(base)) + tuple(base + i for i in to_dense))

    w_scale = w.params.scale
    if grouped:
        # (.., G, 1, ..) keepdims over the grouped dense shape: move G first, drop size-1 axes.
        w_scale = jnp.moveaxis(w_scale, g_axis, 0)
        drop = [1 + a for a in range(len(w.shape)) if a in wc]
        w_scale = w_scale.reshape([d for a, d in enumerate(w_scale.shape) if a not in drop])
        w_scale = w_scale.reshape((w_scale.shape[0],) + (1,) * n_x_free + w_scale.shape[1:])
    else:
        w_scale = _trailing(_squeeze_to(w_scale, wc), n_x_free)
    x_scale = _leading(_squeeze_to(sx, xc), n_w_free)

    if zx is not None:
        zx_i = jnp.round(zx).astype(jnp.int32)
        zx_i = _leading(_squeeze_to(jnp.broadcast_to(zx_i, sx.shape), xc), n_w_free)
        if grouped:
            size = w.spec.group_size
            wsum = wq.astype(jnp.int32)
            wsum = wsum.reshape(wq.shape[:stored_wc[0]] + (wq.shape[stored_wc[0]] // size, size)
                                + wq.shape[stored_wc[0] + 1:]).sum(axis=stored_wc[0] + 1)
            wsum = jnp.moveaxis(wsum, stored_wc[0], 0)
            wsum = jnp.transpose(wsum, (0,) + tuple(1 + i for i in to_dense))
            wsum = wsum.reshape((wsum.shape[0],) + (1,) * n_x_free + wsum.shape[1:])
        else:
            wsum = jnp.transpose(wq.astype(jnp.int32).sum(axis=stored_wc), to_dense)
            wsum = _trailing(wsum, n_x_free)
        acc = acc - zx_i * wsum
    if zw is not None:
        # Asymmetric weights are never grouped here (see qdot's dispatch).
        zw_i = _trailing(_squeeze_to(jnp.round(jnp.broadcast_to(zw, w.scale.shape)).astype(jnp.int32), wc),
                         n_x_free)
        xq_full = xq if pad == 0 else xq[: xq.shape[0] - pad].reshape(tuple(x_free_shape) + (x.shape[-1],))
        xsum = xq_full.astype(jnp.int32).sum(axis=xc if pad == 0 else (xq_full.ndim - 1,))
        acc = acc - _leading(xsum, n_w_free) * zw_i
        if zx is not None:
            k = math.prod(x.shape[a] for a in xc)
            acc = acc + k * zx_i * zw_i
    y = acc.astype(jnp.float32) * w_scale
    if grouped:
        y = y.sum(axis=0)
    return (y * x_scale).astype(out_dtype)


def _choose_strategy(x, w, dims, activations, act_params, out_dtype) -> str:
    (xc, wc), _ = dims
    rows = math.prod(d for a, d in enumerate(x.shape) if a not in xc)
    macs = rows * math.prod(w.shape)
    pad_possible = xc == (x.ndim - 1,) and rows % 8 != 0
    if macs < tuning.MIN_MEASURED_MACS:
        return "int8"
    key = (*tuning.device_key(), tuple(x.shape), str(x.dtype),
           tuple(w.values.shape), str(w.values.dtype), w.perm, w.spec, dims, activations,
           act_params is None, str(out_dtype))
    candidates = ["int8", "dequantize"] + (["int8_padded"] if pad_possible else [])

    def measure():
        fns = {name: jax.jit(functools.partial(_timed_qdot, dims=dims, activations=activations,
                                               strategy=name, out_dtype=out_dtype))
               for name in candidates}
        return tuning.time_calls(fns, timing_inputs(x, w, act_params))

    return tuning.measure_once(key, measure)


def _timed_qdot(x, w, act_params, *, dims, activations, strategy, out_dtype):
    return qdot(x, w, activations=activations, act_params=act_params, dimension_numbers=dims,
                strategy=strategy, out_dtype=out_dtype)


def timing_inputs(x, w: QArray, act_params) -> tuple:
    """Concrete random stand-ins for a call's (x, w, act_params), for timing only."""
    kx, kw = jax.random.split(jax.random.key(0))
    x_t = jax.random.normal(kx, x.shape, jnp.float32).astype(x.dtype)
    p_t = None if act_params is None else jax.tree.map(
        lambda a: jnp.full(jnp.shape(a), 0.05, jnp.float32), act_params)
    return x_t, tuning.random_like(w, kw), p_t


def qdot(
    x: jax.Array,
    w: QArray,
    *,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: QuantParams | None = None,
    dimension_numbers: Any = None,
    strategy: Strategy = "auto",
    out_dtype: Any = None,
    path: str = "x",
) -> jax.Array:
    """`x @ w` for a quantized weight, on integer operands: int8 x int8 -> int32, scales after.

    Args:
      x: float activations.
      w: a `QArray` weight (int8, int4, int2 or uint codes; any granularity).
      activations: how `x` is quantized (per tensor by default; per row with `channel_axes` on
        the non-contracted axes). Scales that vary along a contracted axis (per input channel,
        per group) run the dequantize strategy: the same numbers, in float. None is weight-only
        mode: float `x` times the integer codes, scales applied after the matmul.
      act_params: static activation scale / zero point (from calibration); by default they are
        computed from `x` on every call (dynamic ranges).
      dimension_numbers: as `lax.dot_general`; by default `x`'s last axis contracts with `w`'s
        first (the Flax Dense convention). Batch dimensions run the dequantize strategy.
      strategy: "auto" (measure once per shape, then cache), "int8", "int8_padded" or
        "dequantize" (see the module docstring).
      out_dtype: the result dtype; `x.dtype` by default.
      path: the name used in error messages.

    Returns:
      The float product, with `lax.dot_general`'s output shape.

    Raises:
      ValueError: naming `path` for a non-QArray `w`, a non-float or scalar `x`, NaN/Inf in a
        concrete `x` with quantized activations, bad dimension numbers, an unknown strategy,
        or a stochastic activation spec.

    Example:
        >>> w = quantize(jnp.array([[1.0, -2.0], [0.5, 0.25]]), QuantSpec(channel_axes=(-1,)))
        >>> qdot(jnp.array([[1.0, 2.0]]), w).round(1)
        Array([[ 2. , -1.5]], dtype=float32)
    """
    if not isinstance(w, QArray):
        raise ValueError(f"{path}: qdot expects a QArray weight, got {type(w).__name__}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"{path}: strategy must be one of {_STRATEGIES}, got {strategy!r}")
    check_float(x, path)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{path}: qdot needs an input with at least one axis, got a scalar")
    if activations is not None:
        if not isinstance(activations, QuantSpec):
            raise ValueError(f"{path}: activations must be a QuantSpec or None, got "
                             f"{type(activations).__name__} {activations!r}")
        if activations.rounding == "stochastic":
            raise ValueError(f"{path}: serving rounds activations to nearest; stochastic rounding "
                             f"({activations.describe()}) is for training (fake_quant with a key)")
        # A dynamic range over a NaN/Inf would make every output NaN, not just its row's; a
        # static one would clip an Inf to the largest code (as `fake_quant` refuses to, too).
        check_finite(x, path)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    dims = _normalize_dims(dimension_numbers, x.ndim, len(w.shape), path)
    for x_axes, w_axes in dims:  # contracting, then batch axes
        for a, b in zip(x_axes, w_axes):
            if x.shape[a] != w.shape[b]:
                raise ValueError(f"{path}: input axis {a} of size {x.shape[a]} (shape {x.shape}) "
                                 f"does not match weight axis {b} of size {w.shape[b]} "
                                 f"(shape {w.shape})")
    if activations is not None and not dims[1][0]:
        _check_activation_scales(x.shape, activations, act_params, path)
    return _qdot_program(x, w, act_params, dims, activations, strategy, out_dtype)


def _scales_shared(shape, activations: QuantSpec, contract) -> bool:
    """Whether the activation scales are shared along the contracted axes (per tensor or per
    row), which an integer product needs; other specs run the dequantize path."""
    lay = layout(shape, activations)
    return lay.grouped_shape == lay.shape and all(lay.params_shape[a] == 1 for a in contract)


def _check_activation_scales(shape, activations: QuantSpec, act_params, path: str) -> None:
    lay = layout(shape, activations, path)
    if act_params is not None:
        act_params = as_quant_params(act_params, path)
        for name, value in zip(("scale", "zero_point"), act_params):
            if value is None:
                continue
            try:
                ok = jnp.broadcast_shapes(jnp.shape(value), lay.params_shape) == lay.params_shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}: act_params.{name} of shape {jnp.shape(value)} does not "
                                 f"broadcast to {lay.params_shape}")
        check_params(act_params, lay, path, activations)  # concrete values: finite positive scales, ...


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _qdot_program(x, w: QArray, act_params, dims, activations, strategy, out_dtype):
    # One compiled program per shape and configuration when called eagerly; inlined under jit.
    (xc, wc), (xb, wb) = dims
    path = "x"
    if activations is None:
        return _weight_only(x, w, dims, out_dtype)
    lay_w = layout(w.shape, w.spec)
    grouped = lay_w.grouped_shape != lay_w.shape
    g_axis = w.spec.normalized_axes(len(w.shape))[1]
    int_ok = (
        not xb and not w.spec.is_fp8 and w.spec.bits <= 8
        and not activations.is_fp8 and activations.bits <= 8
        and _scales_shared(x.shape, activations, xc)
        and (_weight_scales_fit(w, wc)
             or (grouped and len(wc) == 1 and g_axis == wc[0]
                 and int8_without_zero_point(w.spec, w.zero_point)))
    )
    if strategy == "auto":
        strategy = _choose_strategy(x, w, dims, activations, act_params, out_dtype) if int_ok else "dequantize"
    if strategy == "dequantize" or not int_ok:
        return _dequantize_path(x, w, dims, activations, act_params, out_dtype, path)
    return _int_dot(x, w, dims, activations, act_params, out_dtype, strategy == "int8_padded", path)
