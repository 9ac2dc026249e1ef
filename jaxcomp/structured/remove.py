"""Physical channel removal: a smaller tree of the same structure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core import is_compressed
from jaxcomp.structured.groups import ChannelGroup, check_dense, check_groups
from jaxcomp.tree import leaves_with_paths

__all__ = ["keep_indices", "remove_channels"]


def keep_indices(group: ChannelGroup, keep: Any) -> np.ndarray:
    """The sorted indices of the kept channels of `group`, from a bool mask or an index list.

    Args:
      group: the channel group.
      keep: a bool mask of length `group.size`, or the indices of the channels to keep.

    Returns:
      A sorted int numpy array of unique channel indices.

    Raises:
      ValueError: if the mask has the wrong length, an index is out of range or repeated (a
        0/1 list of ints is read as indices: pass a bool mask), or nothing is kept.

    Example:
        >>> from jaxcomp.structured.groups import ChannelGroup
        >>> keep_indices(ChannelGroup("g", 4, ()), [True, False, True, True]).tolist()
        [0, 2, 3]
    """
    if not isinstance(group, ChannelGroup):
        raise ValueError(f"keep_indices: group must be a ChannelGroup, got {type(group).__name__}")
    arr = np.asarray(jax.device_get(keep))
    if arr.size == 0:
        raise ValueError(f"keep[{group.name!r}] keeps no channel; a group keeps at least one")
    if arr.dtype == np.bool_:
        if arr.shape != (group.size,):
            raise ValueError(
                f"keep[{group.name!r}] is a mask of shape {arr.shape}; the group has "
                f"{group.size} channels"
            )
        idx = np.flatnonzero(arr)
    else:
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"keep[{group.name!r}] must be a bool mask or a 1-d list of channel indices, got "
                f"{arr.dtype} of shape {arr.shape}"
            )
        idx = np.unique(arr)
        if idx.size and (idx[0] < 0 or idx[-1] >= group.size):
            raise ValueError(
                f"keep[{group.name!r}] has channel indices outside [0, {group.size}): "
                f"{arr.tolist()}"
            )
        if idx.size != arr.size:
            # Most often a 0/1 mask given as ints, which reads as the indices 0 and 1.
            values, counts = np.unique(arr, return_counts=True)
            raise ValueError(
                f"keep[{group.name!r}] repeats channel indices {values[counts > 1].tolist()} "
                f"(got {arr.tolist()}); pass a bool mask, or distinct indices"
            )
    if idx.size == 0:
        raise ValueError(f"keep[{group.name!r}] keeps no channel; a group keeps at least one")
    return idx


def _kept_positions(
    groups: Sequence[ChannelGroup], keep: Mapping[str, Any]
) -> dict[tuple[str, int], tuple[int, np.ndarray]]:
    groups = check_groups("remove_channels", groups)
    if not isinstance(keep, Mapping):
        raise ValueError(
            "remove_channels: keep must map group names to kept masks or indices, got "
            f"{type(keep).__name__}"
        )
    by_name = {g.name: g for g in groups}
    unknown = [name for name in keep if name not in by_name]
    if unknown:
        raise ValueError(f"keep names unknown groups {unknown}; groups: {list(by_name)}")
    removed: dict[tuple[str, int], tuple[int, set[int]]] = {}
    for name, mask in keep.items():
        group = by_name[name]
        kept = keep_indices(group, mask)
        dropped = np.setdiff1d(np.arange(group.size), kept)
        for m in group.members:
            size, positions = removed.setdefault((m.path, m.axis), (m.axis_size, set()))
            positions.update(m.indices[dropped].ravel().tolist())
    return {
        key: (size, np.setdiff1d(np.arange(size), sorted(positions)))
        for key, (size, positions) in removed.items()
    }


def _cut(leaves: list[Any], cuts: list[list[tuple[int, np.ndarray]]]) -> list[Any]:
    """Applies the cuts to the leaves in one jitted call (eager takes compile one by one)."""

    def cut_all(arrays: list[Any]) -> list[Any]:
        out = []
        for leaf, leaf_cuts in zip(arrays, cuts):
            for axis, positions in leaf_cuts:
                leaf = jnp.take(leaf, positions, axis=axis, mode="clip")
            out.append(leaf)
        return out

    host = [isinstance(x, np.ndarray) for x in leaves]
    results = jax.jit(cut_all)(leaves)
    out = []
    for leaf, result, on_host in zip(leaves, results, host):
        sharding = getattr(leaf, "sharding", None)
        if on_host:
            result = np.asarray(result)
        elif isinstance(sharding, jax.sharding.NamedSharding) and _divides(sharding, result.shape):
            # Keep the leaf's sharding when the smaller shape still divides over its mesh axes.
            result = jax.device_put(result, sharding)
        out.append(result)
    return out


def _divides(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]) -> bool:
    try:
        sharding.shard_shape(shape)
    except ValueError:
        return False
    return True


def remove_channels(tree: Any, groups: Sequence[ChannelGroup], keep: Mapping[str, Any]) -> Any:
    """Deletes the channels `keep` drops from every member axis of their groups.

    Groups missing from `keep` are left whole. The tree keeps its structure (a Linen variables
    dict, a params dict, an NNX `State`); only the member leaves get smaller. Runs eagerly, since
    the shapes it returns depend on `keep`; a leaf sharded over a mesh keeps its sharding when
    its new shape still divides over the mesh.

    Args:
      tree: the tree `groups` was computed on (same paths and shapes).
      groups: a `ChannelGroups` (or any sequence of `ChannelGroup`).
      keep: group name to a bool mask of length `group.size` or the indices of kept channels,
        e.g. the result of `select_channels`.

    Returns:
      A tree of the same structure with smaller member leaves.

    Raises:
      ValueError: if `keep` names an unknown group, keeps nothing in a group or repeats an
        index (see `keep_indices`), or a member leaf is missing from `tree` or has another size
        than when the groups were found.

    Example:
        >>> params = {"a": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
        ...           "b": {"kernel": jnp.ones((8, 2))}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((1, 4)))
        >>> small = remove_channels(params, groups, {"a/kernel": [0, 1, 2]})
        >>> small["a"]["kernel"].shape, small["b"]["kernel"].shape
        ((4, 3), (3, 2))
    """
    kept = _kept_positions(groups, keep)
    pairs = leaves_with_paths(tree)
    by_path = dict(pairs)
    # Only the leaves that are cut must be dense; other compressed leaves pass through.
    check_dense("remove_channels", {path: by_path[path] for path, _ in kept if path in by_path})
    for (path, axis), (size, _) in kept.items():
        if path not in by_path:
            raise ValueError(
                f"remove_channels: the tree has no leaf {path!r} (a member of the groups); pass "
                "the tree the groups were computed on"
            )
        shape = np.shape(by_path[path])
        if len(shape) <= axis or shape[axis] != size:
            raise ValueError(
                f"remove_channels: leaf {path!r} has shape {shape}; the groups expect {size} "
                f"along axis {axis} (was the tree already pruned?)"
            )
    per_path: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (path, axis), (_, positions) in kept.items():
        per_path.setdefault(path, []).append((axis, positions))
    leaves = [leaf for _, leaf in pairs]
    todo = [
        i for i, (path, leaf) in enumerate(pairs)
        if any(len(pos) != np.shape(leaf)[axis] for axis, pos in per_path.get(path, ()))
    ]
    if todo:
        cut = _cut([leaves[i] for i in todo], [per_path[pairs[i][0]] for i in todo])
        for i, leaf in zip(todo, cut):
            leaves[i] = leaf
    return jax.tree.unflatten(jax.tree.structure(tree, is_leaf=is_compressed), leaves)
