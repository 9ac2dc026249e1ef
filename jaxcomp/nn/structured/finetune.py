"""Iterative pruning: prune a share of the target, fine-tune with your optimizer, repeat."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from jaxcomp.nn.structured.linen_rebuild import Importance, linen_channel_groups, rebuild_linen
from jaxcomp.nn.structured.nnx_surgery import nnx_channel_groups, shrink_nnx
from jaxcomp.structured import ChannelGroups, kept_count, magnitude_importance, select_channels
from jaxcomp.tree import Where

__all__ = ["prune_and_finetune_linen", "prune_and_finetune_nnx"]


def _round_ratio(
    groups: ChannelGroups, original: dict[str, int], ratio: float, done: float, scope: str,
    min_channels: int, round_to: int,
) -> float | dict[str, float]:
    """The ratio that takes each group from its current size to its size after `done` of `ratio`."""
    if scope == "global":
        total = sum(original.setdefault(g.name, g.size) for g in groups)
        current = sum(g.size for g in groups)
        target = total - int(np.floor(ratio * done * total + 1e-9))
        return max(0.0, min(0.99, 1.0 - target / current))
    out = {}
    for g in groups:
        size = original.setdefault(g.name, g.size)
        target = kept_count(size, ratio * done, min_channels=min_channels, round_to=round_to)
        out[re.escape(g.name)] = max(0.0, (g.size - min(target, g.size)) / g.size)
    return out


def _check_schedule(ratio: Any, rounds: Any, steps: Any) -> None:
    for name, value, least in (("rounds", rounds, 1), ("steps", steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")


def prune_and_finetune_linen(
    model: nn.Module, variables: Any, *inputs: Any, batches: Iterator[Any],
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nn.Module, Any, Any], tuple[jax.Array, Any]],
    ratio: float, rounds: int, steps: int, importance: Importance = magnitude_importance,
    scope: str = "group", min_channels: int = 1, round_to: int = 1, where: Where = None,
    **apply_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Iterative pruning: `rounds` times, prune a share of `ratio` then train `steps` steps.

    After round `k` every group has lost `ratio * k / rounds` of its original channels (or the
    whole model has, with `scope="global"`). Each round rebuilds the model, so the train step is
    compiled again for the new shapes and the optimizer state is initialised anew with `tx`.

    Args:
      model: the Linen module.
      variables: its variables (all collections).
      *inputs: example inputs for tracing.
      batches: an iterator of training batches (anything `loss_fn` takes).
      tx: your optax optimizer.
      loss_fn: `loss_fn(model, variables, batch) -> (loss, updated_collections)`, where
        `updated_collections` holds the non-param collections after the step (e.g.
        ``{"batch_stats": ...}`` from `model.apply(..., mutable=["batch_stats"])`, or `{}`).
      ratio: the final fraction of channels removed, in [0, 1).
      rounds: the number of prune-then-train rounds.
      steps: train steps after each pruning.
      importance: `importance(variables, groups) -> scores`.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned.
      **apply_kwargs: keyword arguments of the inference call used for tracing.

    Returns:
      `(smaller_model, trained_variables)`.

    Raises:
      ValueError: on a ratio outside [0, 1), `rounds` < 1 or `steps` < 0.

    Example:
        >>> from jaxcomp.testing.models import MLP
        >>> model, x = MLP(features=(8, 4)), jnp.ones((4, 6))
        >>> def loss_fn(model, variables, batch):
        ...     return (model.apply(variables, batch) ** 2).mean(), {}
        >>> small, v = prune_and_finetune_linen(
        ...     model, model.init(jax.random.key(0), x), x, batches=iter([x] * 4),
        ...     tx=optax.sgd(0.1), loss_fn=loss_fn, ratio=0.5, rounds=2, steps=2)
        >>> small.features
        (4, 2)
    """
    _check_schedule(ratio, rounds, steps)
    original: dict[str, int] = {}
    for k in range(1, rounds + 1):
        groups = linen_channel_groups(model, variables, *inputs, where=where, **apply_kwargs)
        step_ratio = _round_ratio(groups, original, ratio, k / rounds, scope, min_channels,
                                  round_to)
        keep = select_channels(groups, importance(variables, groups), ratio=step_ratio,
                               scope=scope, min_channels=min_channels, round_to=round_to)
        model, variables = rebuild_linen(model, variables, groups, keep, **apply_kwargs)
        variables = _train_linen(model, variables, batches, tx, loss_fn, steps)
    return model, variables


def _train_linen(model: nn.Module, variables: Any, batches: Iterator[Any],
                 tx: optax.GradientTransformation, loss_fn: Callable[..., Any], steps: int) -> Any:
    if steps == 0:
        return variables
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params: Any, rest: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Any]:
        def loss(p: Any) -> tuple[jax.Array, Any]:
            return loss_fn(model, {"params": p, **rest}, batch)

        (_, updated), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {**rest, **updated}, opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, rest, opt_state = step(params, rest, opt_state, next(batches))
    return {"params": params, **rest}


def prune_and_finetune_nnx(
    model: nnx.Module, *inputs: Any, batches: Iterator[Any], tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], jax.Array], ratio: float, rounds: int, steps: int,
    importance: Importance = magnitude_importance, scope: str = "group", min_channels: int = 1,
    round_to: int = 1, where: Where = None,
) -> nnx.Module:
    """Iterative pruning of an NNX model: `rounds` times, prune a share, train `steps` steps.

    Args:
      model: the NNX module (left unchanged; a new, trained model is returned).
      *inputs: example inputs for tracing.
      batches: an iterator of training batches.
      tx: your optax optimizer (an `nnx.Optimizer` over `nnx.Param` is made each round).
      loss_fn: `loss_fn(model, batch) -> loss`, called in train mode.
      ratio: the final fraction of channels removed, in [0, 1).
      rounds: the number of prune-then-train rounds.
      steps: train steps after each pruning.
      importance: `importance(state, groups) -> scores`.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned.

    Returns:
      The smaller, fine-tuned model (in train mode).

    Raises:
      ValueError: on a ratio outside [0, 1), `rounds` < 1 or `steps` < 0.

    Example:
        >>> from jaxcomp.testing.nnx_models import MLP
        >>> model, x = MLP((6,), features=(8, 4), rngs=nnx.Rngs(0)), jnp.ones((4, 6))
        >>> small = prune_and_finetune_nnx(
        ...     model, x, batches=iter([x] * 4), tx=optax.sgd(0.1),
        ...     loss_fn=lambda m, b: (m(b) ** 2).mean(), ratio=0.5, rounds=2, steps=2)
        >>> [layer.out_features for layer in small.layers]
        [4, 2]
    """
    _check_schedule(ratio, rounds, steps)
    original: dict[str, int] = {}
    for k in range(1, rounds + 1):
        groups = nnx_channel_groups(model, *inputs, where=where)
        step_ratio = _round_ratio(groups, original, ratio, k / rounds, scope, min_channels,
                                  round_to)
        keep = select_channels(groups, importance(nnx.state(model), groups), ratio=step_ratio,
                               scope=scope, min_channels=min_channels, round_to=round_to)
        model = shrink_nnx(model, groups, keep)
        if steps:
            model.train()
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

            @nnx.jit
            def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> jax.Array:
                loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch))(model)
                optimizer.update(model, grads)
                return loss

            for _ in range(steps):
                step(model, optimizer, next(batches))
    return model
