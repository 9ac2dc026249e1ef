"""Flax layer math on quantized kernels, shared by the Linen and NNX integrations.

`dense_general`, `conv` and `einsum` reproduce what Flax's Dense / DenseGeneral (Linear /
LinearGeneral), Conv and Einsum compute, with the kernel either a float array or a `QArray`. A
`QArray` kernel runs on integer operands (`qdot`, `qconv`, an int8 einsum) with the scales
applied after the product; any other compressed kernel (a `Codebook`, a factorization) is
materialized. Bias and output dtype follow Flax: the output dtype is the module's `dtype`, or
the promotion of the input, kernel and bias dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from jaxcomp.core import is_compressed
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.conv import qconv
from jaxcomp.quant.matmul import DEFAULT_ACTIVATIONS, qdot, quantize_activations
from jaxcomp.quant.numerics import QuantParams, layout
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec

__all__ = ["conv", "dense_general", "einsum"]


def _out_dtype(x, kernel, bias, dtype):
    if dtype is not None:
        return jnp.dtype(dtype)
    dtypes = [x.dtype, kernel.dtype] + ([bias.dtype] if bias is not None else [])
    return jnp.result_type(*dtypes)


def _dense_kernel(kernel):
    """A float kernel for compressed leaves without an integer path."""
    if is_compressed(kernel) and not isinstance(kernel, QArray):
        return kernel.materialize()
    return kernel


def _normalize(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(int(a) % ndim for a in axes)


def dense_general(
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    axis: int | Sequence[int] = -1,
    batch_dims: Sequence[int] = (),
    dtype: Any = None,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: QuantParams | None = None,
    strategy: str = "auto",
    path: str = "x",
) -> jax.Array:
    """Flax `DenseGeneral` (and `Dense`, `axis=-1`) with a float or quantized kernel.

    Args:
      x: the input.
      kernel: `(*batch, *in_features, *out_features)` as Flax stores it; a `QArray` runs `qdot`.
      bias: `(*batch, *out_features)` or None.
      axis: the input axes contracted with the kernel's `in_features`.
      batch_dims: leading batch axes shared by input and kernel.
      dtype: the computation dtype (the module's `dtype`), or None to promote.
      activations, act_params, strategy: as `qdot` (used for `QArray` kernels only).
      path: the name used in error messages.

    Returns:
      The layer's output.

    Example:
        >>> w = quantize(jnp.ones((3, 2)), QuantSpec(channel_axes=(-1,)))
        >>> dense_general(jnp.ones((4, 3)), w, jnp.zeros(2)).shape
        (4, 2)
    """
    axis = _normalize((axis,) if isinstance(axis, int) else axis, x.ndim)
    batch_dims = _normalize(batch_dims, x.ndim)
    kernel = _dense_kernel(kernel)
    n_batch, n_axis = len(batch_dims), len(axis)
    dims = ((axis, tuple(range(n_batch, n_batch + n_axis))), (batch_dims, tuple(range(n_batch))))
    out_dtype = _out_dtype(x, kernel, bias, dtype)
    x = x.astype(out_dtype)
    if isinstance(kernel, QArray):
        y = qdot(x, kernel, activations=activations, act_params=act_params, dimension_numbers=dims,
                 strategy=strategy, out_dtype=out_dtype, path=path)
    else:
        y = lax.dot_general(x, kernel.astype(out_dtype), dims)
    if bias is not None:
        features = tuple(kernel.shape[n_batch + n_axis:])
        expanded = tuple(x.shape[a] if a in batch_dims else 1 for a in range(x.ndim) if a not in axis)
        y = y + jnp.reshape(bias, expanded + features).astype(out_dtype)
    return y


def _conv_padding(padding: Any, n_spatial: int) -> Any:
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * n_spatial
    pads = []
    for p in padding:
        pads.append((p, p) if isinstance(p, int) else tuple(p))
    if len(pads) == 1 and n_spatial > 1:
        pads = pads * n_spatial
    return pads


def conv(
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    strides: int | Sequence[int] | None = 1,
    padding: Any = "SAME",
    input_dilation: int | Sequence[int] | None = 1,
    kernel_dilation: int | Sequence[int] | None = 1,
    feature_group_count: int = 1,
    mask: jax.Array | None = None,
    dtype: Any = None,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: QuantParams | None = None,
    strategy: str = "auto",
    path: str = "x",
) -> jax.Array:
    """Flax `Conv` (shared weights, channels last) with a float or quantized kernel.

    Padding follows Flax: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", an int or pairs.

    Example:
        >>> w = quantize(jnp.ones((3, 3, 1, 2)), QuantSpec(channel_axes=(-1,)))
        >>> conv(jnp.ones((1, 4, 4, 1)), w).shape
        (1, 4, 4, 2)
    """
    kernel = _dense_kernel(kernel)
    kernel_size = tuple(kernel.shape[:-2])
    n_spatial = len(kernel_size)

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * n_spatial if isinstance(v, int) else tuple(v)

    strides, input_dilation, kernel_dilation = map(broadcast, (strides, input_dilation, kernel_dilation))
    n_batch = x.ndim - (n_spatial + 1)
    batch_shape = x.shape[:n_batch]
    if n_batch != 1:
        x = x.reshape((-1,) + x.shape[n_batch:])
    padding = _conv_padding(padding, n_spatial)
    if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding.upper()])
        padding = "VALID"
    elif isinstance(padding, str) and padding.upper() == "CAUSAL":
        if n_spatial != 1:
            raise ValueError(f"{path}: CAUSAL padding is only defined for 1-D convolutions")
        x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    quantized = isinstance(kernel, QArray)
    if mask is not None:
        kernel = _masked_kernel(kernel, mask)
    out_dtype = _out_dtype(x, kernel, bias, dtype)
    x = x.astype(out_dtype)
    spec = "N" + "HWDXYZ"[:n_spatial] + "C"
    dn = (spec, "HWDXYZ"[:n_spatial] + "IO", spec)
    options = dict(window_strides=strides, padding=padding, lhs_dilation=input_dilation,
                   rhs_dilation=kernel_dilation, feature_group_count=feature_group_count)
    if isinstance(kernel, QArray):
        y = qconv(x, kernel, dimension_numbers=dn, activations=activations, act_params=act_params,
                  strategy="int8" if strategy == "int8_padded" else strategy,
                  out_dtype=out_dtype, path=path, **options)
    else:
        if quantized and activations is not None:
            # A masked asymmetric kernel was dequantized: its input is still quantized, as the
            # integer path (and `fake_quant_inputs`) would.
            x = fake_quant(x, activations, params=act_params, path=path)
        y = lax.conv_general_dilated(x, kernel.astype(out_dtype), dimension_numbers=dn, **options)
    if bias is not None:
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape).astype(out_dtype)
    if n_batch != 1:
        y = y.reshape(batch_shape + y.shape[1:])
    return y


def _masked_kernel(kernel: Any, mask: jax.Array) -> Any:
    """`kernel * mask`. A symmetric `QArray` keeps its integer codes (masked ones set to 0, which
    is the value 0), so the convolution still runs on integers; an asymmetric one (code 0 is
    not the value 0) is dequantized first."""
    if not isinstance(kernel, QArray):
        return kernel * mask
    if kernel.zero_point is not None:
        return kernel.materialize() * mask
    keep = jnp.broadcast_to(jnp.asarray(mask) != 0, kernel.shape)
    if kernel.perm is not None:
        keep = jnp.transpose(keep, kernel.perm)
    values = jnp.where(keep, kernel.values, jnp.zeros((), kernel.values.dtype))
    return QArray(values, kernel.scale, None, kernel.spec, kernel.dense_dtype, kernel.perm)


def _einsum_parts(equation: str, x_shape, kernel_shape) -> tuple[str, str, str]:
    operands, result, _ = opt_einsum.parser.parse_einsum_input(
        (equation.replace(" ", ""), np.empty(x_shape, np.int8), np.empty(kernel_shape, np.int8)))
    lhs, rhs = operands.split(",")
    return lhs, rhs, result


def einsum(
    equation: str,
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    dtype: Any = None,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: QuantParams | None = None,
    path: str = "x",
) -> jax.Array:
    """Flax `Einsum`: `einsum(equation, x, kernel) + bias` with a float or quantized kernel.

    A `QArray` kernel whose scales vary only along axes kept in the output, with symmetric
    weights and symmetric per-tensor activations, runs an int8 einsum with int32 sums;
    otherwise the activations are fake-quantized and the kernel dequantized.

    Example:
        >>> w = quantize(jnp.ones((3, 2)), QuantSpec(channel_axes=(-1,)))
        >>> einsum("bk,kn->bn", jnp.ones((4, 3)), w).shape
        (4, 2)
    """
    kernel = _dense_kernel(kernel)
    lhs, rhs, result = _einsum_parts(equation, x.shape, kernel.shape)
    out_dtype = _out_dtype(x, kernel, bias, dtype)
    x = x.astype(out_dtype)
    equation = f"{lhs},{rhs}->{result}"
    if isinstance(kernel, QArray):
        y = _int_einsum(equation, lhs, rhs, result, x, kernel, activations, act_params, out_dtype, path)
    else:
        y = jnp.einsum(equation, x, kernel.astype(out_dtype))
    if bias is not None:
        shape = [kernel.shape[rhs.index(c)] if c in rhs else 1 for c in result]
        y = y + jnp.reshape(bias, shape).astype(out_dtype)
    return y


def _int_einsum(equation, lhs, rhs, result, x, kernel: QArray, activations, act_params, out_dtype, path):
    lay = layout(kernel.shape, kernel.spec)
    scale = kernel.scale
    fits = (
        activations is not None and not activations.is_fp8 and activations.bits <= 8
        and activations.symmetric and activations.signed and not activations.channel_axes
        and activations.group_size is None and kernel.zero_point is None
        and not kernel.spec.is_fp8 and kernel.spec.bits <= 8 and kernel.spec.signed
        and lay.grouped_shape == lay.shape
        and all(d == 1 or rhs[a] in result for a, d in enumerate(scale.shape))
    )
    if not fits:
        if activations is not None:
            x = fake_quant(x, activations, params=act_params, path=path)
        return jnp.einsum(equation, x, kernel.materialize().astype(out_dtype))
    xq, sx, _ = quantize_activations(x, activations, act_params, tuple(range(x.ndim)), path)
    sx = sx.reshape(())
    acc = jnp.einsum(equation, xq, kernel.codes().astype(jnp.int8), preferred_element_type=jnp.int32)
    kept = [c for c in rhs if scale.shape[rhs.index(c)] != 1]
    scale_out = jnp.einsum(f"{rhs}->{''.join(kept)}", scale) if kept else scale.reshape(())
    shape = [scale.shape[rhs.index(c)] if c in kept else 1 for c in result]
    if kept:
        order = [c for c in result if c in kept]
        scale_out = jnp.einsum(f"{''.join(kept)}->{''.join(order)}", scale_out).reshape(shape)
    return (acc.astype(jnp.float32) * scale_out * sx).astype(out_dtype)
