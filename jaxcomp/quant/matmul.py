"""Integer compute on `QArray` weights: `qdot`, `qconv`, and `prepare_for_serving`.

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

Where the weight codes live matters too: on XLA's CPU backend the int8 dot is several times
faster with a Dense kernel stored (N, K), contracting on its last axis. `prepare_for_serving`
measures both layouts of each 2-D kernel once and stores the codes in the faster one
(`QArray.perm`); `materialize` and every report still see the dense (K, N) array.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.numerics import (
    QuantParams,
    check_float,
    codes_from_grouped,
    from_grouped,
    layout,
    params_from_range,
    quant_range,
    to_grouped,
)
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec
from jaxcomp.tree import Where, map_selected

__all__ = ["Strategy", "chosen_strategies", "prepare_for_serving", "qconv", "qdot"]

Strategy = Literal["auto", "int8", "int8_padded", "dequantize"]
_STRATEGIES = ("auto", "int8", "int8_padded", "dequantize")
DEFAULT_ACTIVATIONS = QuantSpec(bits=8)
# Below this many multiply-accumulates a call costs microseconds whatever runs it: not measured.
_MIN_MEASURED_MACS = 1 << 20
_CHOICES: dict[tuple, str] = {}


def chosen_strategies() -> dict[tuple, str]:
    """The strategies `strategy="auto"` measured so far in this process, by shape key (a copy).

    Example:
        >>> isinstance(chosen_strategies(), dict)
        True
    """
    return dict(_CHOICES)


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
      ValueError: naming `path` when the scales would vary along a contracted axis.
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
        scale = jnp.broadcast_to(jnp.asarray(act_params.scale, jnp.float32), lay.params_shape)
        zero = act_params.zero_point
        zero = None if zero is None else jnp.broadcast_to(jnp.asarray(zero, jnp.float32), lay.params_shape)
        params = QuantParams(scale, zero)
    codes = from_grouped(codes_from_grouped(to_grouped(x, lay), params, activations), lay)
    q, zero = _int8_codes(codes, params.zero_point, activations, path)
    return q, params.scale, zero


def _normalize_dims(dimension_numbers, x_ndim: int, w_ndim: int, path: str):
    if dimension_numbers is None:
        return ((x_ndim - 1,), (0,)), ((), ())
    (xc, wc), (xb, wb) = dimension_numbers
    try:
        xc = tuple(int(a) % x_ndim for a in xc)
        wc = tuple(int(a) % w_ndim for a in wc)
        xb = tuple(int(a) % x_ndim for a in xb)
        wb = tuple(int(a) % w_ndim for a in wb)
    except (TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: invalid dimension_numbers {dimension_numbers!r}") from e
    if len(xc) != len(wc) or len(xb) != len(wb):
        raise ValueError(f"{path}: dimension_numbers {dimension_numbers!r} pair unequal axes")
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


def _random_like(w: QArray, key) -> QArray:
    """A QArray with the structure of `w` and concrete random codes (for timing only)."""
    k1, k2 = jax.random.split(key)
    info = jnp.iinfo(w.values.dtype) if jnp.issubdtype(w.values.dtype, jnp.integer) else None
    if info is None:
        values = jax.random.normal(k1, w.values.shape).astype(w.values.dtype)
    else:
        values = jax.random.randint(k1, w.values.shape, int(info.min), int(info.max) + 1).astype(w.values.dtype)
    scale = jax.random.uniform(k2, w.scale.shape, jnp.float32, 0.01, 0.02)
    zero = None if w.zero_point is None else jnp.zeros(w.zero_point.shape, w.zero_point.dtype)
    return QArray(values, scale, zero, w.spec, w.dense_dtype, w.perm)


def _outside_trace(measure: Callable[[], Any]) -> Any:
    """Runs `measure` in a fresh thread: JAX's trace state is per thread, so concrete timing
    runs at full speed even while the caller is being traced (the hot path never measures)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(measure).result()


def _time(fns: dict[str, Any], args: tuple, rounds: int = 7, sample_s: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each jitted fn: compile excluded, candidates interleaved round
    by round, each sample at least `sample_s` long (many calls for fast functions)."""
    number = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        number[name] = max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / number[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def _choose_strategy(x, w, dims, activations, act_params, out_dtype) -> str:
    (xc, wc), _ = dims
    rows = math.prod(d for a, d in enumerate(x.shape) if a not in xc)
    macs = rows * math.prod(w.shape)
    pad_possible = xc == (x.ndim - 1,) and rows % 8 != 0
    if macs < _MIN_MEASURED_MACS:
        return "int8"
    device = jax.devices()[0]
    key = (device.platform, getattr(device, "device_kind", ""), tuple(x.shape), str(x.dtype),
           tuple(w.values.shape), str(w.values.dtype), w.perm, w.spec, dims, activations,
           act_params is None, str(out_dtype))
    if key not in _CHOICES:
        candidates = ["int8", "dequantize"] + (["int8_padded"] if pad_possible else [])

        def candidate(name):
            return jax.jit(lambda x_, w_, p_: qdot(
                x_, w_, activations=activations, act_params=p_, dimension_numbers=dims,
                strategy=name, out_dtype=out_dtype))

        times = _outside_trace(lambda: _time({name: candidate(name) for name in candidates},
                                             _timing_inputs(x, w, act_params)))
        _CHOICES[key] = min(times, key=times.get)
    return _CHOICES[key]


def _timing_inputs(x, w: QArray, act_params):
    kx, kw = jax.random.split(jax.random.key(0))
    x_t = jax.random.normal(kx, x.shape, jnp.float32).astype(x.dtype)
    p_t = None if act_params is None else jax.tree.map(
        lambda a: jnp.full(jnp.shape(a), 0.05, jnp.float32), act_params)
    return x_t, _random_like(w, kw), p_t


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
        the non-contracted axes). None is weight-only mode: float `x` times the integer codes,
        scales applied after the matmul.
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
      ValueError: naming `path` for a non-QArray `w`, a non-float `x`, bad dimension numbers,
        an unknown strategy, or activation scales that vary along the contracted axes.

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
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    dims = _normalize_dims(dimension_numbers, x.ndim, len(w.shape), path)
    if activations is not None and not dims[1][0]:
        _check_activation_scales(x.shape, activations, act_params, dims[0][0], path)
    return _qdot_program(x, w, act_params, dims, activations, strategy, out_dtype)


def _check_activation_scales(shape, activations: QuantSpec, act_params, contract, path: str) -> None:
    lay = layout(shape, activations, path)
    if lay.grouped_shape != lay.shape or any(lay.params_shape[a] != 1 for a in contract):
        raise ValueError(
            f"{path}: activation scales must be shared along the contracted axes {tuple(contract)} "
            f"(per-tensor or per-row), got {activations.describe()}"
        )
    if act_params is not None:
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
        and (_weight_scales_fit(w, wc)
             or (grouped and len(wc) == 1 and g_axis == wc[0] and w.zero_point is None))
    )
    if strategy == "auto":
        strategy = _choose_strategy(x, w, dims, activations, act_params, out_dtype) if int_ok else "dequantize"
    if strategy == "dequantize" or not int_ok:
        return _dequantize_path(x, w, dims, activations, act_params, out_dtype, path)
    return _int_dot(x, w, dims, activations, act_params, out_dtype, strategy == "int8_padded", path)


def qconv(
    x: jax.Array,
    w: QArray,
    *,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = ("NHWC", "HWIO", "NHWC"),
    feature_group_count: int = 1,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: QuantParams | None = None,
    strategy: Literal["auto", "int8", "dequantize"] = "auto",
    out_dtype: Any = None,
    path: str = "x",
) -> jax.Array:
    """`lax.conv_general_dilated(x, w)` for a quantized kernel, on int8 operands, int32 sums.

    The weight must be symmetric with scales per tensor or per output feature; activations
    are quantized per tensor (symmetric, or asymmetric when `lhs_dilation` is 1: the input is
    then padded with its zero point so the padding stays an exact zero). Other cases, fp8 and
    weight-only mode (`activations=None`) run in float with dequantized weights.

    Args:
      x: float input in the layout of `dimension_numbers` (NHWC by default).
      w: `QArray` kernel (HWIO by default).
      window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count: as
        `lax.conv_general_dilated`.
      dimension_numbers: as `lax.conv_general_dilated` (strings or `ConvDimensionNumbers`).
      activations: the activation spec (per tensor); None for weight-only mode.
      act_params: static activation scale / zero point; dynamic by default.
      strategy: "auto" (measure once per shape), "int8" or "dequantize".
      out_dtype: the result dtype; `x.dtype` by default.
      path: the name used in error messages.

    Returns:
      The float convolution.

    Raises:
      ValueError: naming `path` for a non-QArray `w`, a non-float `x` or an unknown strategy.

    Example:
        >>> w = quantize(jnp.ones((3, 3, 2, 4)) * 0.5, QuantSpec(channel_axes=(-1,)))
        >>> y = qconv(jnp.ones((1, 5, 5, 2)), w, window_strides=(1, 1), padding="SAME")
        >>> y.shape, float(y[0, 2, 2, 0])
        ((1, 5, 5, 4), 9.0)
    """
    if not isinstance(w, QArray):
        raise ValueError(f"{path}: qconv expects a QArray kernel, got {type(w).__name__}")
    if strategy not in ("auto", "int8", "dequantize"):
        raise ValueError(f"{path}: strategy must be 'auto', 'int8' or 'dequantize', got {strategy!r}")
    check_float(x, path)
    x = jnp.asarray(x)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    if not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    n_spatial = len(dn.lhs_spec) - 2
    options = (tuple(window_strides), padding, tuple(lhs_dilation or (1,) * n_spatial),
               tuple(rhs_dilation or (1,) * n_spatial), dn, int(feature_group_count))
    return _qconv_program(x, w, act_params, options, activations, strategy, out_dtype)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _qconv_program(x, w: QArray, act_params, options, activations, strategy, out_dtype):
    window_strides, padding, lhs_dilation, rhs_dilation, dn, feature_group_count = options
    path = "x"
    kernel_shape = w.shape
    conv = functools.partial(
        lax.conv_general_dilated, window_strides=tuple(window_strides), lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dn, feature_group_count=feature_group_count,
    )
    lay_w = layout(kernel_shape, w.spec)
    out_axis = dn.rhs_spec[0]
    int_ok = (
        activations is not None and w.zero_point is None and not w.spec.is_fp8 and w.spec.bits <= 8
        and not activations.is_fp8 and activations.bits <= 8 and lay_w.grouped_shape == lay_w.shape
        and all(d == 1 for a, d in enumerate(lay_w.params_shape) if a != out_axis)
        and (activations.symmetric or all(d == 1 for d in lhs_dilation))
    )
    if strategy == "auto" and int_ok:
        strategy = _choose_conv_strategy(x, w, conv, padding, activations, act_params, out_dtype)
    if not int_ok or strategy == "dequantize":
        if activations is not None:
            x = fake_quant(x, activations, params=act_params, path=path)
        return conv(x, w.materialize().astype(out_dtype), padding=padding).astype(out_dtype)
    per_tensor = dataclasses.replace(activations, channel_axes=(), group_size=None)
    xq, sx, zx = quantize_activations(x, per_tensor, act_params, tuple(range(x.ndim)), path)
    if isinstance(padding, str):
        in_spatial = [x.shape[a] for a in dn.lhs_spec[2:]]
        k_spatial = [(kernel_shape[a] - 1) * d + 1 for a, d in zip(dn.rhs_spec[2:], rhs_dilation)]
        padding = lax.padtype_to_pads(in_spatial, k_spatial, tuple(window_strides), padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    wq = w.codes().astype(jnp.int8)
    if zx is not None:
        pads = [(0, 0)] * x.ndim
        for axis, pad in zip(dn.lhs_spec[2:], padding):
            pads[axis] = pad
        zx_i = jnp.round(zx).astype(jnp.int32).reshape(())
        xq = jnp.pad(xq, pads, constant_values=zx_i.astype(jnp.int8))
        padding = tuple((0, 0) for _ in padding)
    acc = conv(xq, wq, padding=padding, preferred_element_type=jnp.int32)
    if zx is not None:
        reduce = tuple(a for a in range(len(kernel_shape)) if a != out_axis)
        wsum = wq.astype(jnp.int32).sum(axis=reduce)
        acc = acc - zx_i * _along(wsum, dn.out_spec[1], acc.ndim)
    w_scale = _along(w.scale.reshape(-1), dn.out_spec[1], acc.ndim) if w.scale.size > 1 else w.scale.reshape(())
    return (acc.astype(jnp.float32) * w_scale * sx.reshape(())).astype(out_dtype)


def _along(v: jax.Array, axis: int, ndim: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _choose_conv_strategy(x, w, conv, padding, activations, act_params, out_dtype) -> str:
    kernel = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    out = jax.eval_shape(lambda a, b: conv(a, b, padding=padding), jax.ShapeDtypeStruct(x.shape, jnp.float32), kernel)
    out_features = out.shape[conv.keywords["dimension_numbers"].out_spec[1]]
    macs = math.prod(out.shape) * math.prod(w.shape) // max(out_features, 1)
    if macs < _MIN_MEASURED_MACS:
        return "int8"
    device = jax.devices()[0]
    key = ("conv", device.platform, getattr(device, "device_kind", ""), tuple(x.shape), str(x.dtype),
           tuple(w.values.shape), str(w.values.dtype), w.perm, w.spec, str(conv.keywords),
           str(padding), activations, act_params is None, str(out_dtype))
    if key not in _CHOICES:
        options = dict(conv.keywords)
        dn = options.pop("dimension_numbers")

        def candidate(name):
            return jax.jit(lambda x_, w_, p_: qconv(
                x_, w_, padding=padding, dimension_numbers=dn, activations=activations,
                act_params=p_, strategy=name, out_dtype=out_dtype, **options))

        times = _outside_trace(lambda: _time({name: candidate(name) for name in ("int8", "dequantize")},
                                             _timing_inputs(x, w, act_params)))
        _CHOICES[key] = min(times, key=times.get)
    return _CHOICES[key]


def prepare_for_serving(
    params: Any,
    *,
    where: Where = None,
    batch_sizes: Sequence[int] = (8,),
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    allow_float: bool = False,
) -> Any:
    """Stores each 2-D `QArray` (a Dense kernel, (K, N)) in the layout `qdot` runs fastest.

    For every selected 2-D `QArray`, `qdot` is timed once per shape (and cached) at each of
    `batch_sizes` rows with the codes stored (K, N) and (N, K); the faster total wins and the
    codes are transposed accordingly (`QArray.perm`). Values, `materialize()` and `nbytes` are
    unchanged. Call it once, outside `jit`, on the output of `quantize_tree`.

    With `allow_float=True`, a float32 matmul with the dequantized kernel is a third candidate:
    where it is measured faster (on XLA's CPU backend, typically small layers at batch 1), the
    leaf comes back as a dense float array, trading that layer's memory saving for speed.

    Args:
      params: a tree with `QArray` leaves.
      where: which leaves to consider (default: every 2-D `QArray`).
      batch_sizes: the batch sizes (rows of the activations) the model will be served at.
      activations: the activation spec the model will be served with.
      allow_float: let a measured-faster float32 kernel replace the `QArray`.

    Returns:
      The tree with re-laid-out `QArray` leaves (or float kernels, with `allow_float`).

    Example:
        >>> q = quantize_tree({"k": jnp.ones((16, 8))}, QuantSpec(channel_axes=(-1,)))
        >>> prepare_for_serving(q)["k"].shape
        (16, 8)
    """
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")

    def one(leaf):
        if not isinstance(leaf, QArray) or len(leaf.shape) != 2 or leaf.spec.is_fp8:
            return leaf
        choice = _choose_layout(leaf, sizes, activations, allow_float)
        if choice == "float":
            return leaf.materialize()
        return leaf.transpose_storage((1, 0) if choice == "nk" else None)

    return map_selected(one, params, where=where, allow_empty=True)


def _choose_layout(w: QArray, batch_sizes: tuple[int, ...], activations, allow_float: bool) -> str:
    k, n = w.shape
    if max(batch_sizes) * k * n < _MIN_MEASURED_MACS or activations is None:
        return "nk"
    device = jax.devices()[0]
    key = ("layout", device.platform, getattr(device, "device_kind", ""), (k, n), str(w.values.dtype),
           w.spec, batch_sizes, activations, allow_float)
    if key not in _CHOICES:
        w_t = _random_like(w.transpose_storage(None), jax.random.key(1))
        candidates = {"kn": w_t, "nk": w_t.transpose_storage((1, 0))}
        if allow_float:
            candidates["float"] = w_t.materialize()

        # Weights are arguments, not closed-over constants (XLA may re-lay-out constants).
        float_dot = jax.jit(lambda x_, w_: x_ @ w_)
        int_dot = jax.jit(lambda x_, w_: qdot(x_, w_, activations=activations))
        total = dict.fromkeys(candidates, 0.0)
        for b in batch_sizes:
            x_t = jax.random.normal(jax.random.key(2), (b, k), jnp.float32)
            fns = {name: (lambda x_, name=name: (float_dot if name == "float" else int_dot)(
                x_, candidates[name])) for name in candidates}
            for name, t in _outside_trace(lambda: _time(fns, (x_t,))).items():
                total[name] += t
        _CHOICES[key] = min(total, key=total.get)
    return _CHOICES[key]
