"""Learned quantization scales: LSQ step sizes and PACT activation clips.

Both are ordinary array leaves that the user's optax optimizer trains alongside the weights: keep
them in a tree next to the params (`{"params": params, "steps": steps}`) and differentiate the
loss with respect to both. No separate training loop.

* LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): `x_hat = s * clip(round(x /
  s), qmin, qmax)`. With `v = x / s`, the gradient is, per element,
  `d x_hat / d x = 1` for `qmin < v < qmax` and 0 outside, and
  `d x_hat / d s = round(v) - v` inside, `qmin` below and `qmax` above the range; the step's
  gradient is then scaled by `g = 1 / sqrt(N * Qp)` with `N` the elements sharing the step and
  `Qp = qmax`. Steps start at `2 * mean(|x|) / sqrt(Qp)`.
* PACT (Choi et al. 2018): activations are clipped to `[0, alpha]` (or `[-alpha, alpha]` for a
  signed spec) with a learned `alpha`, then quantized with scale `alpha / qmax`;
  `d y / d alpha = 1` where `x >= alpha` (and -1 where `x <= -alpha`), 0 elsewhere; add
  `pact_penalty` (L2 on alpha) to the loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp._checks import as_real
from jaxcomp.quant.numerics import (
    Layout,
    QuantParams,
    check_finite,
    check_float,
    check_positive,
    dense_leaf,
    from_grouped,
    layout,
    to_grouped,
)
from jaxcomp.quant.spec import QuantSpec
from jaxcomp.tree import Where, leaves_with_paths, map_selected, path_dict

__all__ = [
    "lsq_as_static",
    "lsq_fake_quant",
    "lsq_fake_quant_tree",
    "lsq_init",
    "lsq_init_tree",
    "pact_as_static",
    "pact_fake_quant",
    "pact_penalty",
]

_TINY = 1e-12


def _check_spec(spec: QuantSpec, method: str, path: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{path}: expected a jaxcomp.quant.QuantSpec, got {type(spec).__name__} "
                         f"{spec!r}")
    if spec.is_fp8 or not spec.symmetric or spec.rounding != "nearest":
        raise ValueError(
            f"{path}: {method} needs a symmetric integer spec with nearest rounding, got "
            f"{spec.describe()}"
        )


def _check_shape(value: jax.Array, lay: Layout, name: str, path: str) -> None:
    try:
        ok = jnp.broadcast_shapes(jnp.shape(value), lay.params_shape) == lay.params_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{path}: {name} of shape {jnp.shape(value)} does not broadcast to the scale shape "
            f"{lay.params_shape} of an input of shape {lay.shape}"
        )


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums the broadcast dimensions of `x` away so it has `shape` (the reverse of broadcasting)."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


def lsq_init(x: jax.Array, spec: QuantSpec, path: str = "x") -> jax.Array:
    """The LSQ initial step size `2 * mean(|x|) / sqrt(qmax)`, one per scale of `spec`.

    Args:
      x: the tensor the step will quantize (a weight, or a sample batch of activations).
      spec: a symmetric integer spec; its granularity sets the step's shape.
      path: the name used in error messages.

    Returns:
      A positive float32 array of the grouped keepdims shape (1.0 where `x` is all zero).

    Example:
        >>> lsq_init(jnp.array([1.0, -3.0]), QuantSpec(bits=4)).round(4)
        Array([1.5119], dtype=float32)
    """
    check_float(x, path)
    _check_spec(spec, "LSQ", path)
    check_finite(x, path)
    return _lsq_init(jnp.asarray(x), layout(jnp.shape(x), spec, path), spec.qmax)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lsq_init(x, lay: Layout, qmax: int) -> jax.Array:
    mean_abs = jnp.mean(jnp.abs(to_grouped(x, lay).astype(jnp.float32)), axis=lay.reduce_axes,
                        keepdims=True)
    step = 2.0 * mean_abs / math.sqrt(qmax)
    return jnp.where(step > 0, step, 1.0)


def _lsq_parts(spec: QuantSpec, lay: Layout, barrier: bool, x, step):
    # See fake._fake_quant_program: for activations the barrier keeps a caller's reshape ahead
    # of the elementwise pass; parameters skip it so the pass fuses into its consumers.
    if barrier:
        x = jax.lax.optimization_barrier(x)
    xg = to_grouped(x, lay).astype(jnp.promote_types(x.dtype, jnp.float32))
    # A 0-d step lets XLA fuse its use into the elementwise passes (a (1, 1) one does not).
    step = step.reshape(()) if step.size == 1 else step
    s = jnp.maximum(step.astype(xg.dtype), _TINY)
    v = xg / s
    return xg, s, v, jnp.clip(jnp.round(v), spec.qmin, spec.qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _lsq(spec, lay, grad_scale, barrier, x, step):
    _, s, _, q = _lsq_parts(spec, lay, barrier, x, step)
    return from_grouped(q * s, lay).astype(x.dtype)


def _lsq_fwd(spec, lay, grad_scale, barrier, x, step):
    return _lsq(spec, lay, grad_scale, barrier, x, step), (x, step)


def _lsq_bwd(spec, lay, grad_scale, barrier, residuals, g):
    x, step = residuals
    _, _, v, q = _lsq_parts(spec, lay, barrier, x, step)
    below, above = v <= spec.qmin, v >= spec.qmax
    inside = ~(below | above)
    gg = to_grouped(g, lay).astype(v.dtype)
    dx = from_grouped(jnp.where(inside, gg, 0.0), lay).astype(g.dtype)
    per_element = jnp.where(below, float(spec.qmin), jnp.where(above, float(spec.qmax), q - v))
    dstep = jnp.sum(gg * per_element, axis=lay.reduce_axes, keepdims=True) * grad_scale
    return dx, _sum_to(dstep, jnp.shape(step)).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
# One compiled program per shape and spec when called eagerly; inlined under an outer jit.
_lsq_program = jax.jit(_lsq, static_argnums=(0, 1, 2, 3))


def lsq_fake_quant(
    x: jax.Array,
    step: jax.Array,
    spec: QuantSpec,
    *,
    grad_scale: float | None = None,
    path: str = "x",
) -> jax.Array:
    """LSQ quantize-dequantize of `x` with a learned `step`; differentiable in both.

    Args:
      x: a float array.
      step: the step size(s), broadcastable to the grouped keepdims shape of `spec` (from
        `lsq_init`); a trainable leaf.
      spec: a symmetric integer spec (signed for weights, unsigned for ReLU activations).
      grad_scale: the factor on the step's gradient; defaults to the paper's
        `1 / sqrt(N * qmax)`, `N` the number of elements sharing a step (all of `x` for a
        scalar step, whatever the spec's granularity; for activations the paper uses the
        features per example: pass it explicitly to follow it exactly).
      path: the name used in error messages.

    Returns:
      The fake-quantized array, shape and dtype of `x`.

    Raises:
      ValueError: naming `path` for a non-float `x`, an asymmetric, fp8 or stochastic spec, or a
        step whose shape does not fit.

    Example:
        >>> x = jnp.array([0.3, -1.2, 2.0])
        >>> lsq_fake_quant(x, jnp.float32(0.5), QuantSpec(bits=3))
        Array([ 0.5, -1. ,  1.5], dtype=float32)
    """
    return _lsq_checked(x, step, spec, grad_scale, path, barrier=True)


def _lsq_checked(x, step, spec, grad_scale, path, *, barrier):
    """`lsq_fake_quant` with its checks; `barrier` as in `_lsq_parts`."""
    check_float(x, path)
    _check_spec(spec, "LSQ", path)
    x = jnp.asarray(x)
    check_finite(x, path)
    lay = layout(x.shape, spec, path)
    step = jnp.asarray(step)
    _check_shape(step, lay, "step", path)
    check_positive(step, "the LSQ step", path)
    if grad_scale is not None:
        value = as_real(grad_scale)
        if value is None or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{path}: grad_scale must be a finite number > 0, got {grad_scale!r}")
        grad_scale = value
    if x.size == 0:
        return x
    if grad_scale is None:
        # N counts the elements that really share each step: a step broadcast over several
        # scales of the spec (one step for a per-channel spec) is shared by all of them.
        shared = lay.elements_per_scale * (math.prod(lay.params_shape) // max(step.size, 1))
        grad_scale = 1.0 / math.sqrt(shared * spec.qmax)
    return _lsq_program(spec, lay, float(grad_scale), barrier, x, step)


def lsq_init_tree(params: Any, spec: QuantSpec, *, where: Where = None) -> dict[str, jax.Array]:
    """LSQ initial steps for the leaves `where` selects, as a flat `{path: step}` dict.

    Keep the dict beside the params in what the optimizer trains.

    Example:
        >>> steps = lsq_init_tree({"Dense_0": {"kernel": jnp.ones((2, 2))}}, QuantSpec(bits=4),
        ...                       where=r".*kernel")
        >>> list(steps)
        ['Dense_0/kernel']
    """
    steps = {}

    def init(path, leaf):
        leaf = dense_leaf(leaf, path, "lsq_init_tree")
        steps[path] = lsq_init(leaf, spec, path)
        return leaf

    map_selected(init, params, where=where, with_path=True)
    return steps


def lsq_fake_quant_tree(
    params: Any, steps: Mapping[str, jax.Array], spec: QuantSpec, *, grad_scale: float | None = None
) -> Any:
    """`lsq_fake_quant` on every leaf whose path is a key of `steps` (from `lsq_init_tree`).

    Raises:
      ValueError: if a key of `steps` is not a path of `params`, or as `lsq_fake_quant`.

    Example:
        >>> params = {"Dense_0": {"kernel": jnp.array([[0.3, -1.2]])}}
        >>> steps = {"Dense_0/kernel": jnp.float32(0.5)}
        >>> lsq_fake_quant_tree(params, steps, QuantSpec(bits=3))["Dense_0"]["kernel"]
        Array([[ 0.5, -1. ]], dtype=float32)
    """
    if not isinstance(steps, Mapping):
        raise ValueError(f"lsq_fake_quant_tree: steps must map paths to steps (lsq_init_tree), got "
                         f"{steps!r}")
    known = path_dict(params)
    missing = [p for p in steps if p not in known]
    if missing:
        raise ValueError(
            f"steps has paths that are not in the params: {missing}; params paths: "
            f"{[p for p, _ in leaves_with_paths(params)][:20]}"
        )

    def one(path, leaf):
        leaf = dense_leaf(leaf, path, "lsq_fake_quant_tree")
        return _lsq_checked(leaf, steps[path], spec, grad_scale, path, barrier=False)

    return map_selected(one, params, where=lambda path, _: path in steps, with_path=True)


def _pact_forward(spec, x, alpha):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    a = jnp.maximum(alpha.astype(xf.dtype), _TINY)
    lo = -a if spec.signed else jnp.zeros_like(a)
    y = jnp.clip(xf, lo, a)
    scale = a / spec.qmax
    return xf, a, jnp.round(y / scale) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(spec, x, alpha):
    return _pact_forward(spec, x, alpha)[2].astype(x.dtype)


def _pact_fwd(spec, x, alpha):
    return _pact(spec, x, alpha), (x, alpha)


def _pact_bwd(spec, residuals, g):
    x, alpha = residuals
    xf, a, _ = _pact_forward(spec, x, alpha)
    gf = g.astype(xf.dtype)
    above = xf >= a
    below = xf <= -a if spec.signed else xf < 0
    dx = jnp.where(above | below, 0.0, gf).astype(g.dtype)
    dalpha_elem = jnp.where(above, gf, 0.0) - (jnp.where(xf <= -a, gf, 0.0) if spec.signed else 0.0)
    return dx, _sum_to(dalpha_elem, jnp.shape(alpha)).astype(alpha.dtype)


_pact.defvjp(_pact_fwd, _pact_bwd)
_pact_program = jax.jit(_pact, static_argnums=(0,))


def pact_fake_quant(x: jax.Array, alpha: jax.Array, spec: QuantSpec, *, path: str = "x") -> jax.Array:
    """PACT: clip `x` to `[0, alpha]` (`[-alpha, alpha]` if signed), quantize with scale
    `alpha / qmax`; differentiable in `x` (inside the clip) and in the learned `alpha`.

    Args:
      x: a float array (activations).
      alpha: the learned clip, a scalar or broadcastable to `x` (e.g. per channel).
      spec: a symmetric integer spec, usually unsigned (`signed=False`) after a ReLU.
      path: the name used in error messages.

    Returns:
      The quantized activations, shape and dtype of `x`.

    Raises:
      ValueError: naming `path` for a non-float `x`, an unsuitable spec, or an alpha that does not
        broadcast to `x`.

    Example:
        >>> pact_fake_quant(jnp.array([-1.0, 2.0, 9.0]), jnp.float32(7.5),
        ...                 QuantSpec(bits=4, signed=False))
        Array([0. , 2. , 7.5], dtype=float32)
    """
    check_float(x, path)
    _check_spec(spec, "PACT", path)
    x, alpha = jnp.asarray(x), jnp.asarray(alpha)
    check_finite(x, path)
    try:
        ok = jnp.broadcast_shapes(alpha.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{path}: alpha of shape {alpha.shape} does not broadcast to {x.shape}")
    check_positive(alpha, "the PACT alpha", path)
    return _pact_program(spec, x, alpha)


def pact_penalty(alphas: Any, weight: float = 1e-4) -> jax.Array:
    """PACT's L2 regularizer `weight * sum(alpha ** 2)` over every leaf of `alphas`; add it to
    the loss.

    Example:
        >>> float(pact_penalty({"a": jnp.float32(2.0)}, weight=0.5))
        2.0
    """
    # In float32 at least: an int32 or float16 alpha would overflow its square.
    return weight * sum(jnp.sum(jnp.square(jnp.asarray(a, jnp.promote_types(jnp.result_type(a),
                                                                             jnp.float32))))
                        for a in jax.tree.leaves(alphas))


def lsq_as_static(steps: Mapping[str, jax.Array]) -> dict[str, QuantParams]:
    """Learned LSQ steps as static quantization parameters (scale = step), for serving.

    LSQ's forward pass is a symmetric grid with scale `step`, so
    `jaxcomp.nn.quant.serve_linen(model, act_params=lsq_as_static(steps))` serves exactly what
    was trained.

    Example:
        >>> lsq_as_static({"Dense_0": jnp.float32(0.5)})["Dense_0"].scale
        Array(0.5, dtype=float32)
    """
    if not isinstance(steps, Mapping):
        raise ValueError(f"lsq_as_static: steps must map paths to steps (lsq_init_tree), got {steps!r}")
    for name, step in steps.items():
        if not hasattr(step, "shape") and as_real(step) is None:
            raise ValueError(f"{name}: an LSQ step must be an array or a number, got {step!r}")
        check_positive(step, "the LSQ step", name)
    return {name: QuantParams(jnp.maximum(jnp.asarray(step, jnp.float32), _TINY)) for name, step in steps.items()}


def pact_as_static(alphas: Mapping[str, jax.Array], spec: QuantSpec) -> dict[str, QuantParams]:
    """Learned PACT clips as static quantization parameters (scale = alpha / qmax), for serving.

    Example:
        >>> pact_as_static({"Dense_0": jnp.float32(3.0)}, QuantSpec(bits=4, signed=False))["Dense_0"].scale
        Array(0.2, dtype=float32)
    """
    _check_spec(spec, "PACT", "alphas")
    for name, a in alphas.items():
        check_positive(a, "the PACT alpha", name)
    return {name: QuantParams(jnp.maximum(jnp.asarray(a, jnp.float32), _TINY) / spec.qmax)
            for name, a in alphas.items()}
