"""Importance from activations: mean absolute activation, or APoZ, over a few batches.

The activation of a channel is read where the model consumes it: the input of every matmul or
convolution whose contracted axis carries the channel (after the nonlinearity, which is where
APoZ counts zeros). The jaxpr of the function is evaluated op by op inside one `jax.jit`, with
those inputs captured, so any function works, Linen, NNX or plain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from jaxcomp.structured import _walk
from jaxcomp.structured.groups import ChannelGroup, _components, check_groups, walk_function

__all__ = ["activation_importance"]


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], wanted: set[Any],
          got: dict[Any, Any]) -> list[Any]:
    """Evaluates `jaxpr`, inlining calls, and stores the operands listed in `wanted`."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        for v, x in zip(eqn.invars, invals):
            if not isinstance(v, jex.Literal) and v in wanted:
                got[v] = x
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if eqn.primitive.name in _walk.CALLS and sub is not None:
            closed = sub if isinstance(sub, jex.ClosedJaxpr) else None
            inner = closed.jaxpr if closed is not None else sub
            outs = _eval(inner, closed.consts if closed is not None else (), invals, wanted, got)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            outs = eqn.primitive.bind(*invals, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, out in zip(eqn.outvars, outs):
            env[v] = out
    return [read(v) for v in jaxpr.outvars]


def _as_args(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def activation_importance(
    apply_fn: Callable[..., Any],
    tree: Any,
    groups: Sequence[ChannelGroup],
    batches: Iterable[Any],
    *,
    kind: str = "mean",
) -> dict[str, jax.Array]:
    """Channel importance from the activations the next layers read, over a few batches.

    Args:
      apply_fn: the function the groups were computed from, `apply_fn(tree, *inputs)`.
      tree: the tree the groups were computed on.
      groups: the channel groups.
      batches: an iterable of inputs: each an array or a tuple of the function's positional
        inputs, all of the same shapes (a few batches are enough).
      kind: `"mean"`: mean absolute activation; `"apoz"`: one minus the Average Percentage of
        Zeros (Hu et al. 2016), for channels after a ReLU.

    Returns:
      ``{group name: scores}`` (higher is more important).

    Raises:
      ValueError: on an unknown `kind`, no batch, an empty batch, or batches of different
        shapes.

    Example:
        >>> params = {"a": {"kernel": jnp.array([[1.0, -1.0, 2.0]])},
        ...           "b": {"kernel": jnp.ones((3, 1))}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((4, 1)))
        >>> activation_importance(f, params, groups, [jnp.ones((4, 1))])["a/kernel"]
        Array([1., 0., 2.], dtype=float32)
    """
    if kind not in ("mean", "apoz"):
        raise ValueError(f"activation_importance: kind must be 'mean' or 'apoz', got {kind!r}")
    groups = check_groups("activation_importance", groups)
    try:
        iterator = iter(batches)
    except TypeError:
        raise ValueError(
            "activation_importance: batches must be an iterable of inputs (e.g. a list of "
            f"arrays), got {type(batches).__name__}"
        ) from None
    try:
        first = _as_args(next(iterator))
    except StopIteration:
        raise ValueError("activation_importance: batches is empty") from None
    empty = [np.shape(x) for x in jax.tree.leaves(first) if np.size(x) == 0]
    if empty:
        # A mean over no element is NaN, which would then read as a score.
        raise ValueError(
            f"activation_importance: the first batch has empty inputs of shapes {empty}; "
            "pass batches with at least one example"
        )
    closed, paths, _, _, labels, st = walk_function(apply_fn, tree, first, collect_taps=True)
    comp, _ = _components(st)
    owner: dict[int, tuple[int, int]] = {}
    index = {p: i for i, p in enumerate(paths)}
    for gi, g in enumerate(groups):
        m = g.members[0]
        ids = labels[index[m.path]][m.axis][m.indices[:, 0]]
        for c, cid in enumerate(comp[ids]):
            owner[int(cid)] = (gi, c)
    plans = []  # (tap, positions, group index, channel index)
    counts = [np.zeros(g.size) for g in groups]
    for tap in st.taps or ():
        pos = [p for p, i in enumerate(tap.labels) if i >= 0 and int(comp[i]) in owner]
        if not pos:
            continue
        where = np.array([owner[int(comp[tap.labels[p]])] for p in pos])
        plans.append((tap, np.array(pos), where[:, 0], where[:, 1]))
        for gi, c in where:
            counts[gi][c] += 1
    wanted = {tap.var for tap, *_ in plans}

    @jax.jit
    def sums(tree: Any, *args: Any) -> list[jax.Array]:
        got: dict[Any, Any] = {}
        _eval(closed.jaxpr, closed.consts, jax.tree.leaves((tree, *args)), wanted, got)
        totals = [jnp.zeros(g.size, jnp.float32) for g in groups]
        for tap, pos, gidx, cidx in plans:
            a = got[tap.var]
            if a.size == 0:  # static shapes: an activation with no element averages to NaN
                raise ValueError(
                    f"activation_importance: the activation read for group "
                    f"{groups[int(gidx[0])].name!r} has shape {a.shape}, with no element to "
                    "average; pass non-empty batches"
                )
            stat = jnp.abs(a) if kind == "mean" else (a == 0)
            axes = tuple(d for d in range(a.ndim) if d != tap.axis)
            per_position = jnp.mean(stat.astype(jnp.float32), axis=axes)[pos]
            for gi in np.unique(gidx):
                sel = gidx == gi
                totals[gi] = totals[gi].at[cidx[sel]].add(per_position[sel])
        return totals

    shapes = [np.shape(x) for x in jax.tree.leaves(first)]
    totals = sums(tree, *first)
    n = 1
    for batch in iterator:
        args = _as_args(batch)
        if [np.shape(x) for x in jax.tree.leaves(args)] != shapes:
            raise ValueError(
                "activation_importance: every batch must have the shapes of the first "
                f"({shapes}); drop the last partial batch"
            )
        totals = [t + u for t, u in zip(totals, sums(tree, *args))]
        n += 1
    scores = {}
    for g, total, count in zip(groups, totals, counts):
        if (count == 0).any():
            continue
        mean = total / jnp.asarray(count * n, jnp.float32)
        scores[g.name] = mean if kind == "mean" else 1.0 - mean
    return scores
