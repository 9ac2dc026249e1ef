"""Fake quantization (quantize-dequantize) with a straight-through estimator, for QAT.

`fake_quant(x, spec)` returns `s * (clip(round(x / s) + z, qmin, qmax) - z)` in `x`'s dtype. Its
gradient is a `jax.custom_vjp`: the plain straight-through estimator passes the incoming gradient
unchanged; the clipped one (the default) zeroes it where `x / s + z` falls outside
`[qmin, qmax]`. Scales computed from `x` itself (dynamic ranges) are outside the gradient, and
so are scales passed in (static ranges from an observer); learned scales are `jaxcomp.quant.lsq`
and `pact`.

The forward pass is one reduction (the range, skipped for static scales) and one fused
elementwise pass; the backward pass is the gradient itself (plain) or one fused mask (clipped).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxcomp.quant.numerics import (
    Layout,
    QuantParams,
    check_finite,
    check_float,
    check_key,
    check_params,
    codes_from_grouped,
    dense_leaf,
    from_grouped,
    layout,
    params_from_range,
    quant_range,
    rounding_noise,
    to_grouped,
    values_from_codes,
)
from jaxcomp.quant.spec import QuantSpec, specs_by_path
from jaxcomp.tree import Where, map_selected

__all__ = ["fake_quant", "fake_quant_tree"]

Ste = Literal["clipped", "plain"]
_STE = ("clipped", "plain")


def _forward(spec: QuantSpec, lay: Layout, x, scale, zero_point, noise):
    params = QuantParams(scale, zero_point)
    q = codes_from_grouped(to_grouped(x, lay), params, spec, noise)
    return from_grouped(values_from_codes(q, params), lay).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fake_quant(spec, lay, ste, x, scale, zero_point, noise):
    return _forward(spec, lay, x, scale, zero_point, noise)


def _fake_quant_fwd(spec, lay, ste, x, scale, zero_point, noise):
    out = _forward(spec, lay, x, scale, zero_point, noise)
    # The plain estimator keeps no residual, so XLA fuses the scale into the forward pass.
    return out, (x, scale, zero_point) if ste[0] == "clipped" else None


def _fake_quant_bwd(spec, lay, ste, residuals, g):
    ste, has_zero, has_noise = ste
    # Scales, zero points (shape lay.params_shape) and rounding noise get no gradient.
    zeros = jnp.zeros(lay.params_shape, jnp.float32)
    zero_cots = (zeros, zeros if has_zero else None,
                 jnp.zeros(lay.grouped_shape, jnp.float32) if has_noise else None)
    if ste == "plain":
        return (g, *zero_cots)
    x, scale, zero_point = residuals
    xg = to_grouped(x, lay).astype(jnp.promote_types(x.dtype, jnp.float32))
    v = xg / scale.astype(xg.dtype)
    if zero_point is not None:
        v = v + zero_point.astype(xg.dtype)
    # Compare the rounded code (as torch.ao does), so an element at the range's edge that lands a
    # rounding error past qmax still counts as inside.
    code = v if spec.is_fp8 else jnp.round(v)
    inside = (code >= spec.qmin) & (code <= spec.qmax)
    dx = jnp.where(from_grouped(inside, lay), g, jnp.zeros_like(g))
    return (dx, *zero_cots)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    params: QuantParams | None = None,
    key: jax.Array | None = None,
    ste: Ste = "clipped",
    path: str = "x",
) -> jax.Array:
    """Quantize-dequantize `x` with a straight-through gradient.

    Args:
      x: a floating-point array (float32, bfloat16, ...); the result has its dtype.
      spec: the quantization spec.
      params: a fixed scale and zero point (static ranges, e.g. from an observer), broadcastable
        to the grouped keepdims shape; by default they are computed from `x` (dynamic ranges).
        They receive no gradient.
      key: PRNG key, required when `spec.rounding == "stochastic"`.
      ste: "clipped" (zero gradient where `round(x / s) + z` is outside `[qmin, qmax]`, i.e.
        where the forward pass clips) or "plain" (identity gradient everywhere).
      path: the name used in error messages.

    Returns:
      The fake-quantized array, same shape and dtype as `x`.

    Raises:
      ValueError: naming `path` for a non-float `x`, NaN/Inf in a concrete `x` with dynamic
        ranges, an out-of-range axis, a group size that does not divide its axis, stochastic
        rounding without a key, an unknown `ste`, params of the wrong shape, or concrete scales
        that are not finite and positive.

    Example:
        >>> fake_quant(jnp.array([0.1, 0.26, -1.0]), QuantSpec(bits=4))
        Array([ 0.14285715,  0.2857143 , -1.        ], dtype=float32)
    """
    return _fake_quant_checked(x, spec, params, key, ste, path, barrier=True)


def _fake_quant_checked(x, spec, params, key, ste, path, *, barrier):
    """`fake_quant` with its checks; `barrier` as in `_fake_quant_program`."""
    if ste not in _STE:
        raise ValueError(f"{path}: ste must be one of {_STE}, got {ste!r}")
    check_float(x, path)
    x = jnp.asarray(x)
    lay = layout(x.shape, spec, path)
    # Concrete NaN/Inf raise, as `quantize` does: a range taken from them would make every value
    # NaN, and with static ranges an Inf would be silently clipped to the largest level.
    check_finite(x, path)
    if params is not None:
        params = check_params(params, lay, path, spec)
    rounding_noise(key, (), spec, path)  # validates the key
    if params is None and spec.signed and spec.symmetric:
        # A range taken from x itself clips nothing on a signed symmetric grid, so the clipped
        # estimator is the identity: skip its mask (and the residuals it would keep).
        ste = "plain"
    return _fake_quant_program(x, params, key, spec, lay, ste, barrier)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _fake_quant_program(x, params, key, spec, lay, ste, barrier):
    # One compiled program per shape and spec when called eagerly; inlined under an outer jit.
    # For activations, the barrier keeps XLA from moving a caller's reshape (e.g. a flattened
    # NHWC image with one channel) after the elementwise pass, where a trailing size-1 axis
    # defeats vectorization on CPU. Parameters are leaves in their own layout: there it would
    # only stop XLA from fusing the pass into its consumers.
    if barrier:
        x = jax.lax.optimization_barrier(x)
    if params is None:
        params = params_from_range(*quant_range(jax.lax.stop_gradient(x), spec, lay), spec)
    noise = rounding_noise(key, lay.grouped_shape, spec)
    flags = (ste, params.zero_point is not None, noise is not None)
    return _fake_quant(spec, lay, flags, x, params.scale, params.zero_point, noise)


def fake_quant_tree(
    params: Any,
    spec: QuantSpec | Mapping[Where, QuantSpec] | Sequence[tuple[Where, QuantSpec]],
    *,
    where: Where = None,
    key: jax.Array | None = None,
    ste: Ste = "clipped",
) -> Any:
    """`fake_quant` on every leaf `where` selects (dynamic ranges); other leaves are untouched.

    The typical use is inside the loss, so gradients flow through the straight-through estimator:
    `model.apply({"params": fake_quant_tree(params, spec, where=r".*kernel")}, x)`. Compressed
    leaves that are selected are materialized first.

    Args:
      params: a parameter tree (Linen params, NNX `State`, nested containers).
      spec: the quantization spec for every selected leaf; or rules, `{where: QuantSpec}` or
        `(where, QuantSpec)` pairs, first match wins (leaves no rule matches are left), as in
        `quantize_tree`.
      where: the selection (regex on "/"-joined paths, predicate, bool tree, None for all).
      key: PRNG key for stochastic rounding; each leaf gets `fold_in(key, index)`.
      ste: "clipped" or "plain", as in `fake_quant`.

    Returns:
      A tree with the structure of `params`.

    Raises:
      ValueError: if `where` selects nothing, if a spec rule quantizes nothing, or naming the
        path of a selected leaf that `fake_quant` rejects (non-float, axes out of range,
        indivisible groups...).

    Example:
        >>> params = {"Dense_0": {"kernel": jnp.array([[0.3, -1.0]]), "bias": jnp.array([0.3, 0.1])}}
        >>> fake_quant_tree(params, QuantSpec(bits=2), where=r".*kernel")["Dense_0"]["kernel"]
        Array([[ 0., -1.]], dtype=float32)
    """
    counter = iter(range(1 << 30))
    if key is not None:
        check_key(key, "fake_quant_tree: key")
    where, specs = specs_by_path(params, spec, where, "fake_quant_tree")

    def one(path, leaf):
        index = next(counter)
        leaf = dense_leaf(leaf, path, "fake_quant_tree")
        leaf_key = None if key is None else jax.random.fold_in(key, index)
        return _fake_quant_checked(leaf, specs.get(path, spec), None, leaf_key, ste, path,
                                   barrier=False)

    return map_selected(one, params, where=where, with_path=True)
