"""Importance of every channel of every group, from the weights (and gradients).

Each function returns `{group name: scores}` with one score per channel, higher meaning more
important; a group without any member the score reads (e.g. no BatchNorm for
`bn_scale_importance`) is absent and is left whole by `select_channels`. The functions are
traceable: `jax.jit(lambda t: magnitude_importance(t, groups))(tree)` works (the groups are
static). Activation-based scores, which need batches of data, are in
`jaxcomp.structured.activations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.structured.groups import ChannelGroup, GroupMember, check_dense, check_groups
from jaxcomp.tree import Where, path_dict, selected_paths

__all__ = [
    "bn_scale_importance",
    "fpgm_importance",
    "magnitude_importance",
    "member_slices",
    "taylor_importance",
]

Scores = dict[str, jax.Array]

_SCALE = r"(.*/)?scale"


def member_slices(leaf: jax.Array, member: GroupMember) -> jax.Array:
    """The slices of `leaf` that belong to each channel of the member: shape `(channels, -1)`.

    Args:
      leaf: the member's leaf (or a gradient of the same shape).
      member: a `GroupMember` of a channel group.

    Returns:
      Row `c` holds every element of `leaf` at the positions channel `c` owns along the axis.

    Raises:
      ValueError: if `leaf` has another size along the member's axis than the groups expect
        (a tree other than the one the groups were computed on, or gradients of another shape).

    Example:
        >>> from jaxcomp.structured.groups import GroupMember
        >>> m = GroupMember("w", 1, 3, np.array([[0], [2]]), "out")
        >>> member_slices(jnp.arange(6.0).reshape(2, 3), m)
        Array([[0., 3.],
               [2., 5.]], dtype=float32)
    """
    leaf = jnp.asarray(leaf)
    _check_leaf("member_slices", "leaf", leaf, member)
    taken = jnp.take(leaf, member.indices.ravel(), axis=member.axis, mode="clip")
    return jnp.moveaxis(taken, member.axis, 0).reshape(member.indices.shape[0], -1)


def _check_leaf(fn: str, what: str, leaf: Any, member: GroupMember) -> None:
    """Raises unless `leaf` has the member's axis at the size the groups were computed with."""
    shape = np.shape(leaf)
    if len(shape) <= member.axis or shape[member.axis] != member.axis_size:
        found = shape[member.axis] if len(shape) > member.axis else "no such axis"
        raise ValueError(
            f"{fn}: {what} {member.path!r} has shape {shape} ({found} along axis "
            f"{member.axis}); the groups expect {member.axis_size} along axis {member.axis} "
            "(pass the tree the groups were computed on; was it already pruned?)"
        )


def _matrices(path: str, leaf: Any) -> bool:
    return np.ndim(leaf) >= 2


def _chosen(tree: Any, where: Where) -> set[str]:
    return set(selected_paths(tree, where, allow_empty=True))


def _members(
    fn: str, tree: Any, groups: Sequence[ChannelGroup], where: Where, grads: Any = None
) -> list[tuple[ChannelGroup, list[tuple[GroupMember, Any]]]]:
    """Per group, its members `where` selects (with their gradient, as `(leaf, grad)` pairs, when
    `grads` is given); a group without any is left out, so `select_channels` keeps it whole."""
    groups = check_groups(fn, groups)
    leaves = path_dict(tree)
    check_dense(fn, {m.path: leaves[m.path] for g in groups for m in g.members if m.path in leaves})
    chosen = _chosen(tree, where)
    gmap = None if grads is None else path_dict(grads)
    out = []
    for group in groups:
        picked = []
        for m in group.members:
            if m.path not in chosen or m.path not in leaves or (gmap is not None and m.path not in gmap):
                continue
            _check_leaf(fn, "leaf", leaves[m.path], m)
            if gmap is None:
                picked.append((m, leaves[m.path]))
            else:
                _check_leaf(fn, "grads leaf", gmap[m.path], m)
                picked.append((m, (leaves[m.path], gmap[m.path])))
        if picked:
            out.append((group, picked))
    if not out:
        raise ValueError(
            f"{fn}: where={where!r} selects no member of any group"
            f"{'' if gmap is None else ' that has a gradient'}; members are e.g. "
            f"{[m.path for g in groups[:2] for m in g.members]}"
        )
    return out


def _per_group(
    score: Callable[[ChannelGroup, list[tuple[GroupMember, Any]]], jax.Array],
    picked: list[tuple[ChannelGroup, list[tuple[GroupMember, Any]]]],
) -> Scores:
    """`{name: score(group, members)}` in one jitted call (eager ops would compile one by one)."""
    structure = [(group, [m for m, _ in members]) for group, members in picked]
    arrays = [[leaf for _, leaf in members] for _, members in picked]

    @jax.jit
    def run(arrays: list[list[Any]]) -> dict[str, jax.Array]:
        return {
            group.name: score(group, list(zip(members, leaves)))
            for (group, members), leaves in zip(structure, arrays)
        }

    return run(arrays)


def magnitude_importance(
    tree: Any, groups: Sequence[ChannelGroup], *, ord: int = 2, where: Where = _matrices
) -> Scores:
    """Group-lasso magnitude: the `ord`-norm of all coupled weight slices of each channel.

    A channel's slices are its output column in the producing kernels and its input row in the
    consuming ones, so a channel nobody reads scores low even if its producer is large.

    Args:
      tree: the tree the groups were computed on.
      groups: the channel groups.
      ord: 1 (L1, sum of absolute values) or 2 (L2 norm).
      where: which member leaves count (default: kernels and other leaves of 2 or more axes,
        not biases, norm scales or running statistics).

    Returns:
      ``{group name: scores of shape (channels,)}``.

    Raises:
      ValueError: if `ord` is not 1 or 2, or `where` selects no member.

    Example:
        >>> params = {"a": {"kernel": jnp.ones((4, 3)).at[:, 1].set(0.0)},
        ...           "b": {"kernel": jnp.ones((3, 2)).at[1].set(0.0)}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((1, 4)))
        >>> magnitude_importance(params, groups, ord=1)["a/kernel"]
        Array([6., 0., 6.], dtype=float32)
    """
    if ord not in (1, 2):
        raise ValueError(f"magnitude_importance: ord must be 1 or 2, got {ord!r}")
    def score(group: ChannelGroup, picked: list[tuple[GroupMember, jax.Array]]) -> jax.Array:
        total = sum(
            # In float32: |x|**2 of a float16 weight above 256 would overflow to inf.
            jnp.sum(jnp.abs(member_slices(leaf, m).astype(jnp.float32)) ** ord, axis=1)
            for m, leaf in picked
        )
        return total if ord == 1 else jnp.sqrt(total)

    return _per_group(score, _members("magnitude_importance", tree, groups, where))


def bn_scale_importance(
    tree: Any, groups: Sequence[ChannelGroup], *, where: Where = _SCALE
) -> Scores:
    """Network slimming (Liu et al. 2017): `|gamma|` of the BatchNorm scales of each channel.

    Groups whose channels pass through several BatchNorms (a residual stream) sum them; groups
    without a BatchNorm are absent from the result (and kept whole by `select_channels`).

    Args:
      tree: the tree the groups were computed on (its `scale` leaves are read).
      groups: the channel groups.
      where: which member leaves are BatchNorm scales (default: paths ending in `scale`; in a
        prunable group these are BatchNorms, since a LayerNorm's axis is never prunable).

    Returns:
      ``{group name: scores}`` for the groups that have a scale member.

    Raises:
      ValueError: if no group has a selected member.

    Example:
        >>> from jaxcomp.testing.models import ResNet
        >>> model = ResNet(stage_features=(4,), blocks_per_stage=1)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
        >>> groups = channel_groups(model.apply, variables, jnp.ones((1, 8, 8, 1)))
        >>> sorted(bn_scale_importance(variables, groups)) == sorted(groups.names)
        True
    """
    def score(group: ChannelGroup, picked: list[tuple[GroupMember, jax.Array]]) -> jax.Array:
        return sum(
            jnp.sum(jnp.abs(member_slices(leaf, m)), axis=1, dtype=jnp.float32)
            for m, leaf in picked
        )

    return _per_group(score, _members("bn_scale_importance", tree, groups, where))


def taylor_importance(
    tree: Any, grads: Any, groups: Sequence[ChannelGroup], *, where: Where = None
) -> Scores:
    """First-order Taylor (Molchanov et al. 2019): `(sum of w * dL/dw over the channel's slices)^2`.

    Args:
      tree: the tree the groups were computed on.
      grads: gradients of the loss, matched to `tree` by path; leaves without a gradient (running
        statistics) count as zero. For Linen variables pass `{"params": grads}`. Average the
        gradients over a few batches for a steadier estimate.
      groups: the channel groups.
      where: which member leaves count (default: all with a gradient).

    Returns:
      ``{group name: scores}`` for the groups with a selected member that has a gradient; the
      others are absent (and `select_channels` keeps them whole).

    Raises:
      ValueError: if `grads` has no path in common with the members of the groups, or if
        `where` selects none of the members that have one.

    Example:
        >>> params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((1, 4)))
        >>> grads = jax.grad(lambda p: f(p, jnp.ones((1, 4))).sum())(params)
        >>> taylor_importance(params, grads, groups)["a/kernel"].shape
        (3,)
    """
    groups = check_groups("taylor_importance", groups)
    gmap = path_dict(grads)
    members = [m.path for g in groups for m in g.members]
    if not any(p in gmap for p in members):
        raise ValueError(
            "taylor_importance: grads share no path with the group members (e.g. "
            f"{members[:3]}); grads has {list(gmap)[:3]}; for Linen variables pass "
            "{'params': grads}"
        )
    pairs = _members("taylor_importance", tree, groups, where, grads)

    def score(group: ChannelGroup, picked: list[tuple[GroupMember, Any]]) -> jax.Array:
        total = jnp.zeros(group.size, jnp.float32)
        for m, (w, g) in picked:
            prod = (member_slices(w, m).astype(jnp.float32)
                    * member_slices(g, m).astype(jnp.float32))
            total = total + jnp.sum(prod, axis=1)
        return total**2

    return _per_group(score, pairs)


def fpgm_importance(
    tree: Any, groups: Sequence[ChannelGroup], *, where: Where = _matrices
) -> Scores:
    """FPGM (He et al. 2019): distance of each channel's filter to the others' geometric median.

    A channel's filter is the concatenation of its coupled weight slices; its score is the sum
    of Euclidean distances to the other channels' filters (the approximation of the paper), so
    channels near the geometric median, which the others can replace, score lowest.

    Args:
      tree: the tree the groups were computed on.
      groups: the channel groups.
      where: which member leaves form the filters (default: leaves of 2 or more axes).

    Returns:
      ``{group name: scores}``.

    Raises:
      ValueError: if `where` selects no member.

    Example:
        >>> params = {"a": {"kernel": jnp.array([[1.0, 2.0, 9.0]])},
        ...           "b": {"kernel": jnp.ones((3, 1))}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((1, 1)))
        >>> int(jnp.argmin(fpgm_importance(params, groups)["a/kernel"]))
        1
    """
    def score(group: ChannelGroup, picked: list[tuple[GroupMember, jax.Array]]) -> jax.Array:
        filters = jnp.concatenate(
            [member_slices(leaf, m).astype(jnp.float32) for m, leaf in picked], axis=1
        )
        sq = jnp.sum(filters**2, axis=1)
        d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * filters @ filters.T, 0.0)
        return jnp.sum(jnp.sqrt(d2), axis=1)

    return _per_group(score, _members("fpgm_importance", tree, groups, where))
