"""Apply functions: run a factorized kernel as its sequence of small layers, inside `jax.jit`.

Inputs follow Flax: `(..., in)` for Dense, NHWC (`(..., H, W, C)`, any number of leading batch
axes) for Conv. The 1x1 convolutions of Tucker-2 and CP run as reshaped matmuls: XLA's 1x1
convolution is several times slower than the same matmul on CPU, and no slower elsewhere.
Computation runs in the promoted dtype of the input and the factors (bf16 inputs with bf16
factors stay bf16).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcomp.decompose.leaves import (
    CPKernel,
    ConvSpec,
    Factorized,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
)

__all__ = ["cp_conv", "factorized_apply", "svd_dense", "tt_dense", "tucker2_conv"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _promote(x: jax.Array, *arrays: Any) -> tuple[Any, ...]:
    present = [a for a in arrays if a is not None]
    dtype = jnp.result_type(x, *present)
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in (x, *arrays))


def _matmul(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """`x @ w` on the last axis of `x`, as one 2-D matmul."""
    flat = x.reshape(-1, x.shape[-1])
    y = lax.dot_general(flat, w, (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    return y if bias is None else y + bias


def _check_call(x: Any, kernel: Any, kind: type, what: str) -> None:
    """Raises a `ValueError` unless `kernel` is a `kind` and `x` an array `(..., in)` that fits."""
    if not isinstance(kernel, kind):
        hint = f" (a {type(kernel).__name__} runs with {_APPLY[type(kernel)].__name__})" if (
            type(kernel) in _APPLY) else ""
        raise ValueError(f"{what} expects a {kind.__name__} kernel, got {type(kernel).__name__}"
                         f"{hint}")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(f"{what}: the input must be an array, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"{what}: the input must have a feature axis (..., in), got a scalar")
    features = kernel.shape[2] if kernel.ndim == 4 else kernel.shape[0]
    if x.shape[-1] != features:
        raise ValueError(f"{what}: input has {x.shape[-1]} features, the kernel expects {features}")


def svd_dense(
    x: jax.Array, kernel: SVDKernel, bias: jax.Array | None = None, *, precision: Any = None
) -> jax.Array:
    """A Dense layer with an SVD kernel: `(x @ u) @ v + bias`.

    Args:
      x: inputs `(..., in)`.
      kernel: the `SVDKernel`.
      bias: optional `(out,)` bias.
      precision: passed to `lax.dot_general`.

    Returns:
      `(..., out)`.

    Raises:
      ValueError: if `kernel` is not a `SVDKernel`, or `x` is not an array whose last axis has
        the kernel's input size.

    Example:
        >>> leaf = SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4)))
        >>> svd_dense(jnp.ones((3, 6)), leaf).shape
        (3, 4)
    """
    _check_call(x, kernel, SVDKernel, "svd_dense")
    kernel = kernel.dense_factors()
    x, u, v, bias = _promote(x, kernel.u, kernel.v, bias)
    return _add_bias(_matmul(_matmul(x, u, precision), v, precision), bias)


def tt_dense(
    x: jax.Array, kernel: TTKernel, bias: jax.Array | None = None, *, precision: Any = None
) -> jax.Array:
    """A Dense layer with a tensor-train kernel, contracted core by core.

    The input `(..., prod(in_modes))` is reshaped to `(batch, m1, ..., md)`; step `k` contracts
    mode `m_k` and the running rank with core `k`, so no dense kernel is ever formed.

    Args:
      x: inputs `(..., in)`.
      kernel: the `TTKernel`.
      bias: optional `(out,)` bias.
      precision: passed to `jnp.einsum`.

    Returns:
      `(..., out)`.

    Raises:
      ValueError: if `kernel` is not a `TTKernel`, or `x` is not an array whose last axis has
        the kernel's input size.

    Example:
        >>> cores = (jnp.ones((1, 2, 3, 2)), jnp.ones((2, 4, 2, 1)))
        >>> tt_dense(jnp.ones((5, 8)), TTKernel(cores, in_modes=(2, 4), out_modes=(3, 2))).shape
        (5, 6)
    """
    _check_call(x, kernel, TTKernel, "tt_dense")
    kernel = kernel.dense_factors()
    x, bias, *cores = _promote(x, bias, *kernel.cores)
    batch_shape = x.shape[:-1]
    batch = math.prod(batch_shape)
    # t: (batch, m_k, rest of the input modes, output modes done so far, running rank)
    t = _reshape_batch_major(x, (batch, kernel.in_modes[0], -1, 1, 1))
    for k, core in enumerate(cores):
        t = jnp.einsum("bmMNr,rmns->bMNns", t, core, precision=precision)
        rest = t.shape[1]
        next_mode = kernel.in_modes[k + 1] if k + 1 < len(cores) else 1
        t = _reshape_batch_major(t, (batch, next_mode, rest // next_mode, -1, core.shape[-1]))
    return _add_bias(_reshape_batch_major(t, (*batch_shape, kernel.shape[1])), bias)


def _reshape_batch_major(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`t.reshape(shape)`, where under explicit sharding the leading (batch) axis keeps its
    sharding and the regrouped feature axes are replicated: JAX cannot infer the sharding of a
    reshape that splits and merges axes by itself."""
    sharding = getattr(jax.typeof(t), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = mesh is not None and any(
        a == jax.sharding.AxisType.Explicit for a in getattr(mesh, "axis_types", ()))
    if not explicit:
        return t.reshape(shape)
    lead = sharding.spec[0] if len(sharding.spec) else None
    return jnp.reshape(t, shape, out_sharding=jax.sharding.PartitionSpec(lead))


def _flatten_batch(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    if x.ndim < 3:
        raise ValueError(f"conv input must be (..., H, W, C), got shape {x.shape}")
    batch_shape = x.shape[:-3]
    return x.reshape(-1, *x.shape[-3:]), batch_shape


def _spatial_pad(
    t: jax.Array, spec: ConvSpec, pads: tuple[tuple[int, int], ...]
) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """Pads `t` for CIRCULAR/REFLECT convolutions (then VALID); other paddings pass through."""
    if spec.padding not in ("CIRCULAR", "REFLECT"):
        return t, pads
    mode = "wrap" if spec.padding == "CIRCULAR" else "reflect"
    t = jnp.pad(t, ((0, 0), *pads, (0, 0)), mode=mode)
    return t, ((0, 0), (0, 0))


def tucker2_conv(
    x: jax.Array, kernel: Tucker2Kernel, bias: jax.Array | None = None, *, precision: Any = None
) -> jax.Array:
    """A Conv layer with a Tucker-2 kernel: 1x1 to `r_in`, `kh x kw` core, 1x1 to `cout`.

    The core convolution carries the original stride, padding (resolved per axis from the input's
    spatial size, so SAME with stride 2 pads `(0, 1)` as XLA does) and dilation.

    Args:
      x: NHWC inputs `(..., H, W, cin)`.
      kernel: the `Tucker2Kernel`.
      bias: optional `(cout,)` bias.
      precision: passed to the matmuls and the convolution.

    Returns:
      `(..., H', W', cout)`, equal (to rounding) to the dense convolution with
      `kernel.materialize()`.

    Raises:
      ValueError: if `kernel` is not a `Tucker2Kernel`, or `x` is not an array whose last axis has
        the kernel's input size.

    Example:
        >>> leaf = Tucker2Kernel(jnp.ones((3, 3, 2, 2)), jnp.ones((8, 2)), jnp.ones((2, 8)),
        ...                      spec=ConvSpec(strides=2))
        >>> tucker2_conv(jnp.ones((1, 8, 8, 8)), leaf).shape
        (1, 4, 4, 8)
    """
    _check_call(x, kernel, Tucker2Kernel, "tucker2_conv")
    kh, kw, _, _ = kernel.shape
    kernel = kernel.dense_factors()
    x, core, u_in, u_out, bias = _promote(x, kernel.core, kernel.u_in, kernel.u_out, bias)
    x, batch_shape = _flatten_batch(x)
    spec = kernel.spec
    pads = spec.resolve(x.shape[1:3], (kh, kw))
    strides = spec.strides
    if kernel.subsamples_first():
        # A strided 1x1 conv reads only every stride-th position: subsample before the first
        # 1x1 stage instead of projecting positions the core skips.
        x, strides = x[:, :: strides[0], :: strides[1], :], (1, 1)
    t = x if u_in is None else _matmul(x, u_in, precision)
    t, pads = _spatial_pad(t, spec, pads)
    t = lax.conv_general_dilated(
        t, core, strides, pads, rhs_dilation=spec.dilation, dimension_numbers=_NHWC,
        precision=precision,
    )
    y = t if u_out is None else _matmul(t, u_out, precision)
    return _add_bias(y.reshape(*batch_shape, *y.shape[1:]), bias)


def _depthwise_taps(
    t: jax.Array, taps: jax.Array, axis: int, stride: int, dilation: int, pad: tuple[int, int]
) -> jax.Array:
    """A depthwise 1-D convolution along `axis` of NHWC `t`, as `len(taps)` shifted multiply-adds.

    XLA's CPU depthwise convolution (`feature_group_count = channels`) runs several times slower
    than these fused elementwise taps; on accelerators both are memory-bound.
    """
    if pad != (0, 0):
        config = [(0, 0, 0)] * t.ndim
        config[axis] = (pad[0], pad[1], 0)
        t = lax.pad(t, jnp.zeros((), t.dtype), config)
    size = t.shape[axis]
    length = (size - ((taps.shape[0] - 1) * dilation + 1)) // stride + 1
    out = None
    for k in range(taps.shape[0]):
        start = k * dilation
        part = lax.slice_in_dim(t, start, start + (length - 1) * stride + 1, stride, axis) * taps[k]
        out = part if out is None else out + part
    return out


def cp_conv(
    x: jax.Array, kernel: CPKernel, bias: jax.Array | None = None, *, precision: Any = None
) -> jax.Array:
    """A Conv layer with a CP kernel: 1x1, depthwise `kh x 1`, depthwise `1 x kw`, 1x1.

    The vertical depthwise stage carries the original vertical stride, padding and dilation, the
    horizontal one the horizontal ones. The 1x1 stages run as matmuls; the depthwise stages run as
    fused elementwise multiply-adds (so `jaxcomp.count_flops`, which counts matmuls and
    convolutions, sees only the 1x1 stages; `CPKernel.flops` counts all four).

    Args:
      x: NHWC inputs `(..., H, W, cin)`.
      kernel: the `CPKernel`.
      bias: optional `(cout,)` bias.
      precision: passed to the matmuls.

    Returns:
      `(..., H', W', cout)`.

    Raises:
      ValueError: if `kernel` is not a `CPKernel`, or `x` is not an array whose last axis has
        the kernel's input size.

    Example:
        >>> leaf = CPKernel(jnp.ones((8, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)),
        ...                 jnp.ones((4, 8)), spec=ConvSpec(padding="VALID"))
        >>> cp_conv(jnp.ones((1, 8, 8, 8)), leaf).shape
        (1, 6, 6, 8)
    """
    _check_call(x, kernel, CPKernel, "cp_conv")
    kh, kw, _, _ = kernel.shape
    kernel = kernel.dense_factors()
    x, a_in, a_h, a_w, a_out, bias = _promote(
        x, kernel.a_in, kernel.a_h, kernel.a_w, kernel.a_out, bias
    )
    x, batch_shape = _flatten_batch(x)
    spec = kernel.spec
    pads = spec.resolve(x.shape[1:3], (kh, kw))
    (sh, sw), (dh, dw) = spec.strides, spec.dilation
    t = _matmul(x, a_in, precision)
    t, pads = _spatial_pad(t, spec, pads)
    # One pad of both spatial axes: padding again between the stages costs a whole extra pass.
    zero = jnp.zeros((), t.dtype)
    t = lax.pad(t, zero, [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    t = _depthwise_taps(t, a_h, 1, sh, dh, (0, 0))
    t = _depthwise_taps(t, a_w, 2, sw, dw, (0, 0))
    y = _matmul(t, a_out, precision)
    return _add_bias(y.reshape(*batch_shape, *y.shape[1:]), bias)


def factorized_apply(
    x: jax.Array, kernel: Factorized, bias: jax.Array | None = None, *, precision: Any = None
) -> jax.Array:
    """Runs any factorized kernel on `x` with the apply function of its type.

    Args:
      x: `(..., in)` for `SVDKernel`/`TTKernel`, NHWC for `Tucker2Kernel`/`CPKernel`.
      kernel: a factorized kernel.
      bias: optional bias.
      precision: passed through.

    Returns:
      The layer's output.

    Raises:
      ValueError: if `kernel` is not a factorized kernel, or `x` does not fit it.

    Example:
        >>> leaf = SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4)))
        >>> factorized_apply(jnp.ones((3, 6)), leaf, jnp.zeros(4)).shape
        (3, 4)
    """
    apply = _APPLY.get(type(kernel))
    if apply is None:
        raise ValueError(
            "factorized_apply expects a factorized kernel (SVDKernel, TTKernel, Tucker2Kernel or "
            f"CPKernel), got {type(kernel).__name__}"
        )
    return apply(x, kernel, bias, precision=precision)


_APPLY = {
    SVDKernel: svd_dense,
    TTKernel: tt_dense,
    Tucker2Kernel: tucker2_conv,
    CPKernel: cp_conv,
}
