"""Integer convolution on `QArray` kernels: `qconv`.

`qconv(x, w)` quantizes the input (per tensor, dynamically or with static `act_params`), runs
`lax.conv_general_dilated(int8, int8, preferred_element_type=int32)` and applies the scales
after the convolution. An asymmetric input is padded with its own zero point (so the padding is
an exact zero after the shift) and the zero-point term `z_x * sum(q_w)` is subtracted per output
feature. Like `qdot`, the strategy ("int8" or "dequantize") is measured once per shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxcomp._checks import as_int
from jaxcomp.quant import tuning
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.matmul import (
    DEFAULT_ACTIVATIONS,
    int8_without_zero_point,
    quantize_activations,
    timing_inputs,
)
from jaxcomp.quant.numerics import QuantParams, check_finite, check_float, check_params, layout
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec

__all__ = ["qconv"]


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

    The integer path takes a symmetric weight of at most 8 bits that fits int8 (not uint8) with
    scales per tensor or per output feature, and a per-tensor activation spec: symmetric, or
    with a zero point (asymmetric, or uint8 shifted into int8) when `lhs_dilation` is 1 (the
    input is then padded with its zero point so the padding stays an exact zero). Other cases,
    fp8 and weight-only mode (`activations=None`) run in float with dequantized weights and
    fake-quantized activations, so every spec gives what `fake_quant` gives.

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
      ValueError: naming `path` for a non-QArray `w`, a non-float `x` or one of another rank, an
        unknown strategy, invalid strides, dilations, padding, dimension numbers or group count,
        a stochastic activation spec, or a padding string with an `lhs_dilation` (as
        `lax.conv_general_dilated`).

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
    if x.ndim != len(w.shape):
        raise ValueError(f"{path}: qconv needs an input of the kernel's rank {len(w.shape)} "
                         f"(batch, spatial..., features), got shape {x.shape}")
    if activations is not None and not isinstance(activations, QuantSpec):
        raise ValueError(f"{path}: activations must be a QuantSpec or None, got "
                         f"{type(activations).__name__} {activations!r}")
    if activations is not None and activations.rounding == "stochastic":
        raise ValueError(f"{path}: serving rounds activations to nearest; stochastic rounding "
                         f"({activations.describe()}) is for training (fake_quant with a key)")
    try:
        dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid dimension_numbers {dimension_numbers!r}: {e}") from e
    n_spatial = len(dn.lhs_spec) - 2

    def ints(name, value, low):
        value = (1,) * n_spatial if value is None else value
        try:
            value = tuple(value)
        except TypeError:
            value = (value,)
        if len(value) != n_spatial or not all(as_int(v) is not None and v >= low for v in value):
            raise ValueError(f"{path}: {name} must be {n_spatial} int(s) >= {low}, got {value!r}")
        return tuple(int(v) for v in value)

    window_strides = ints("window_strides", window_strides, 1)
    lhs_dilation = ints("lhs_dilation", lhs_dilation, 1)
    rhs_dilation = ints("rhs_dilation", rhs_dilation, 1)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "SAME_LOWER", "VALID"):
            raise ValueError(f"{path}: padding must be 'SAME', 'SAME_LOWER', 'VALID' or (low, high) "
                             f"pairs, got {padding!r}")
        padding = padding.upper()
    else:
        try:
            pairs = [tuple(p) for p in padding]
        except TypeError:
            pairs = None
        if pairs is None or len(pairs) != n_spatial or not all(
                len(p) == 2 and all(as_int(v) is not None for v in p) for p in pairs):
            raise ValueError(f"{path}: padding must be a string or {n_spatial} (low, high) int "
                             f"pairs, got {padding!r}")
        padding = tuple((int(lo), int(hi)) for lo, hi in pairs)
    groups = feature_group_count
    in_features = x.shape[dn.lhs_spec[1]]
    if (as_int(groups) or 0) < 1 or in_features % as_int(groups):
        raise ValueError(f"{path}: feature_group_count must be a positive int dividing the "
                         f"{in_features} input features, got {groups!r}")
    kernel_in = w.shape[dn.rhs_spec[1]]
    if in_features != kernel_in * int(groups):
        raise ValueError(f"{path}: the input has {in_features} features (shape {x.shape}), the "
                         f"kernel (shape {w.shape}) takes {kernel_in} per group x {int(groups)} "
                         "group(s)")
    if isinstance(padding, str) and any(d != 1 for d in lhs_dilation):
        raise ValueError(f"{path}: padding {padding!r} is not defined with lhs_dilation "
                         f"{tuple(lhs_dilation)}; give explicit (low, high) pads")
    options = (window_strides, padding, lhs_dilation, rhs_dilation, dn, int(groups))
    if activations is not None:
        # A dynamic range over a NaN/Inf would make every output NaN; a static one would clip an
        # Inf to the largest code (as `fake_quant` refuses to, too).
        check_finite(x, path)
    if act_params is not None and activations is not None:
        # Shapes, and concrete values: a zero or NaN scale would zero or NaN the layer silently.
        check_params(act_params, layout(x.shape, activations, path), path, activations)
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
    # The integer path takes int8 weights without a zero point, scaled per output feature, and
    # activations per tensor; an input zero point (asymmetric, or uint8 shifted into int8) is
    # padded in exactly, which an input dilation would spread into its holes.
    int_ok = (
        activations is not None and not w.spec.is_fp8 and w.spec.bits <= 8
        and int8_without_zero_point(w.spec, w.zero_point)
        and not activations.is_fp8 and activations.bits <= 8 and lay_w.grouped_shape == lay_w.shape
        and all(d == 1 for a, d in enumerate(lay_w.params_shape) if a != out_axis)
        and not activations.channel_axes and activations.group_size is None
        and ((activations.symmetric and int8_without_zero_point(activations, None))
             or all(d == 1 for d in lhs_dilation))
    )
    if strategy == "auto" and int_ok:
        strategy = _choose_conv_strategy(x, w, conv, padding, activations, act_params, out_dtype)
    if not int_ok or strategy == "dequantize":
        if activations is not None:
            x = fake_quant(x, activations, params=act_params, path=path)
        return conv(x, w.materialize().astype(out_dtype), padding=padding).astype(out_dtype)
    bad = None
    if act_params is not None:
        # A NaN has no integer code. The input scale is per tensor, so a NaN cannot go through it
        # (it would NaN every image): it is coded as zero and its image's outputs are set to NaN.
        nan = jnp.isnan(x)
        bad = jnp.any(nan, axis=tuple(a for a in range(x.ndim) if a != dn.lhs_spec[0]))
        x = jnp.where(nan, jnp.zeros((), x.dtype), x)
    xq, sx, zx = quantize_activations(x, activations, act_params, tuple(range(x.ndim)), path)
    if isinstance(padding, str):
        in_spatial = [x.shape[a] for a in dn.lhs_spec[2:]]
        k_spatial = [(kernel_shape[a] - 1) * d + 1 for a, d in zip(dn.rhs_spec[2:], rhs_dilation)]
        padding = lax.padtype_to_pads(in_spatial, k_spatial, tuple(window_strides), padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    wq = w.codes().astype(jnp.int8)
    if zx is not None:
        # Positive pads are filled with the zero point; negative ones (crops) stay the conv's.
        pads = [(0, 0)] * x.ndim
        for axis, (lo, hi) in zip(dn.lhs_spec[2:], padding):
            pads[axis] = (max(lo, 0), max(hi, 0))
        zx_i = jnp.round(zx).astype(jnp.int32).reshape(())
        xq = jnp.pad(xq, pads, constant_values=zx_i.astype(jnp.int8))
        padding = tuple((min(lo, 0), min(hi, 0)) for lo, hi in padding)
    acc = conv(xq, wq, padding=padding, preferred_element_type=jnp.int32)
    if zx is not None:
        reduce = tuple(a for a in range(len(kernel_shape)) if a != out_axis)
        wsum = wq.astype(jnp.int32).sum(axis=reduce)
        acc = acc - zx_i * _along(wsum, dn.out_spec[1], acc.ndim)
    w_scale = _along(w.scale.reshape(-1), dn.out_spec[1], acc.ndim) if w.scale.size > 1 else w.scale.reshape(())
    out = acc.astype(jnp.float32) * w_scale * sx.reshape(())
    if bad is not None:
        out = jnp.where(_along(bad, dn.out_spec[0], out.ndim), jnp.nan, out)
    return out.astype(out_dtype)


def _along(v: jax.Array, axis: int, ndim: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _choose_conv_strategy(x, w, conv, padding, activations, act_params, out_dtype) -> str:
    kernel = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    out = jax.eval_shape(lambda a, b: conv(a, b, padding=padding), jax.ShapeDtypeStruct(x.shape, jnp.float32), kernel)
    out_features = out.shape[conv.keywords["dimension_numbers"].out_spec[1]]
    macs = math.prod(out.shape) * math.prod(w.shape) // max(out_features, 1)
    if macs < tuning.MIN_MEASURED_MACS:
        return "int8"
    key = ("conv", *tuning.device_key(), tuple(x.shape), str(x.dtype),
           tuple(w.values.shape), str(w.values.dtype), w.perm, w.spec, str(conv.keywords),
           str(padding), activations, act_params is None, str(out_dtype))
    options = dict(conv.keywords)
    dn = options.pop("dimension_numbers")

    def measure():
        fns = {name: jax.jit(functools.partial(_timed_qconv, padding=padding, dimension_numbers=dn,
                                               activations=activations, strategy=name,
                                               out_dtype=out_dtype, options=tuple(options.items())))
               for name in ("int8", "dequantize")}
        return tuning.time_calls(fns, timing_inputs(x, w, act_params))

    return tuning.measure_once(key, measure)


def _timed_qconv(x, w, act_params, *, padding, dimension_numbers, activations, strategy, out_dtype,
                 options):
    return qconv(x, w, padding=padding, dimension_numbers=dimension_numbers, activations=activations,
                 act_params=act_params, strategy=strategy, out_dtype=out_dtype, **dict(options))
