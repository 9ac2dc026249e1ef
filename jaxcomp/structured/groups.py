"""Channel dependency groups, read from the jaxpr of the model's forward pass.

`channel_groups(apply_fn, tree, *example_inputs)` traces `apply_fn(tree, *example_inputs)` with
`jax.make_jaxpr` (nothing runs) and follows every channel of every parameter axis through the
ops (see `jaxcomp.structured._walk` for the rules). Channels that must be removed together form a
*channel*; channels that touch the same parameter axes the same way form a `ChannelGroup`: the
output axis of a Dense/Conv kernel with its bias, the BatchNorm scale, bias and running statistics
that follow, the input axis of the next layer, both sides of residual adds, the heads of an
attention layer. Removing channel `c` of a group deletes `member.indices[c]` along `member.axis`
of every member leaf, and the function computes the same thing on the remaining channels.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jax.extend import core as jex

from jaxcomp.core import is_compressed
from jaxcomp.structured import _labels, _walk
from jaxcomp.tree import Where, leaves_with_paths, selected_paths

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "GroupMember",
    "UnfollowedOpWarning",
    "channel_groups",
]

_ROLE_NAMES = {_labels.ROLE_OTHER: "other", _labels.ROLE_IN: "in", _labels.ROLE_OUT: "out"}


class UnfollowedOpWarning(UserWarning):
    """An op of the traced function made some channels un-prunable (they are kept)."""


@dataclasses.dataclass(frozen=True, eq=False)
class GroupMember:
    """One parameter axis of a channel group.

    Attributes:
      path: "/"-joined path of the leaf in the tree given to `channel_groups`.
      axis: the axis of that leaf that shrinks.
      axis_size: the length of that axis before pruning.
      indices: int array `(channels, k)`: channel `c` of the group owns positions
        `indices[c]` of the axis (k > 1 when a reshape spreads a channel over several positions,
        e.g. a flatten of (H, W, C) into a Dense input, or a grouped convolution).
      role: `"out"` for an axis a weight produces (a kernel's output axis), `"in"` for an axis a
        weight contracts (the next layer's input axis), `"other"` for per-channel vectors and
        statistics (biases, norm scales, running means).
    """

    path: str
    axis: int
    axis_size: int
    indices: np.ndarray
    role: str


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Parameter axes that shrink together, channel by channel.

    Attributes:
      name: the path of the first producing leaf (`[axis]` appended when the axis is not the
        last one), e.g. `"params/Dense_0/kernel"` or `"params/attention/key/kernel[1]"`.
      size: the number of channels.
      members: the coupled axes.
    """

    name: str
    size: int
    members: tuple[GroupMember, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of the member leaves, in tree order, without repeats."""
        return tuple(dict.fromkeys(m.path for m in self.members))

    def describe(self) -> str:
        """One line: name, channel count and the member axes."""
        parts = ", ".join(f"{m.path}[{m.axis}]" for m in self.members)
        return f"{self.name}: {self.size} channels; {parts}"


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroups(Sequence[ChannelGroup]):
    """The prunable channel groups of a function, and why the other axes are not prunable.

    It is a sequence of `ChannelGroup` (also indexable by group name).

    Attributes:
      groups: the prunable groups, in tree order of their first member.
      protected: groups that `where=` left out.
      unprunable: `"path[axis]"` to the reason its channels cannot be removed (model input or
        output, a normalization over the axis, an op that is not followed, ...).
      inputs: the example inputs as `jax.ShapeDtypeStruct` values (used to check rebuilt models).
    """

    groups: tuple[ChannelGroup, ...]
    protected: tuple[ChannelGroup, ...] = ()
    unprunable: Mapping[str, str] = dataclasses.field(default_factory=dict)
    inputs: tuple[Any, ...] = ()

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for group in self.groups:
                if group.name == key:
                    return group
            raise KeyError(f"no channel group named {key!r}; groups: {list(self.names)}")
        return self.groups[key]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def replace(self, groups: Sequence[ChannelGroup], **changes: Any) -> ChannelGroups:
        """A copy with other groups (and other fields given as keywords)."""
        return dataclasses.replace(self, groups=tuple(groups), **changes)

    def summary(self) -> str:
        """A readable listing: one line per prunable group, then the protected ones."""
        lines = [g.describe() for g in self.groups]
        lines += [f"(protected) {g.describe()}" for g in self.protected]
        return "\n".join(lines)


def check_dense(fn: str, tree: Any) -> list[tuple[str, Any]]:
    """The tree's `(path, leaf)` pairs, or a ValueError naming `fn` and the first compressed
    leaf: structured pruning reads and cuts dense arrays."""
    pairs = leaves_with_paths(tree)
    for path, leaf in pairs:
        if is_compressed(leaf):
            raise ValueError(
                f"{fn}: the leaf at {path!r} is a compressed leaf ({leaf.kind}); prune "
                "the dense model, or pass jaxcomp.materialize(tree)"
            )
    return pairs


def check_groups(fn: str, groups: Any) -> list[ChannelGroup]:
    """The groups as a list, or a ValueError naming `fn` when they are not channel groups."""
    try:
        out = list(groups)
    except TypeError:
        out = None
    if out is None or not all(isinstance(g, ChannelGroup) for g in out):
        raise ValueError(
            f"{fn}: groups must be the ChannelGroups from channel_groups, got "
            f"{type(groups).__name__}"
        )
    return out


def _abstract(tree: Any) -> Any:
    # Shapes and dtypes only: nothing runs, and the leaves' shardings do not constrain the trace.
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _trace(apply_fn: Callable[..., Any], tree: Any, example_inputs: tuple[Any, ...]) -> Any:
    try:
        return jax.make_jaxpr(lambda t, *a: apply_fn(t, *a))(
            _abstract(tree), *_abstract(example_inputs))
    except Exception as e:  # the user's function failed on these inputs: say which inputs
        shapes = [getattr(x, "shape", type(x).__name__) for x in jax.tree.leaves(example_inputs)]
        raise ValueError(
            f"channel_groups: apply_fn failed on example inputs of shapes {shapes}; pass inputs "
            f"the function accepts ({type(e).__name__}: {e})"
        ) from e


def _components(st: _labels.State) -> tuple[np.ndarray, np.ndarray]:
    n = st.num_ids
    if st.edges:
        rows = np.concatenate([a for a, _ in st.edges])
        cols = np.concatenate([b for _, b in st.edges])
    else:
        rows = cols = np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    pinned = np.zeros(comp.max() + 1 if n else 0, bool)
    for pin in st.pins:
        pinned[comp[pin.ids]] = True
    return comp, pinned


def _reasons(st: _labels.State, comp: np.ndarray) -> dict[int, str]:
    """The first reason each pinned channel was pinned for."""
    out: dict[int, str] = {}
    for pin in st.pins:
        for c in np.unique(comp[pin.ids]):
            out.setdefault(int(c), pin.reason)
    return out


def _axis_name(path: str, axis: int, ndim: int) -> str:
    return path if axis == ndim - 1 else f"{path}[{axis}]"


def build_groups(
    paths: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    used: Sequence[bool],
    leaf_labels: Sequence[tuple[np.ndarray, ...]],
    st: _labels.State,
) -> tuple[list[ChannelGroup], dict[str, str], np.ndarray]:
    """Groups the channels found by a walk; returns (groups, unprunable reasons, components)."""
    comp, pinned = _components(st)
    reasons = _reasons(st, comp)
    # One row per id of a used leaf: (component, leaf, axis, position).
    rows = []
    unprunable: dict[str, str] = {}
    for leaf, labels in enumerate(leaf_labels):
        if not used[leaf]:
            continue
        for axis, lab in enumerate(labels):
            if len(lab) < 2 or lab[0] < 0:
                continue
            comps = comp[lab]
            bad = pinned[comps]
            if bad.any():
                unprunable[f"{paths[leaf]}[{axis}]"] = reasons.get(int(comps[bad][0]), "pinned")
            keep = np.nonzero(~bad)[0]
            if keep.size == 0:
                continue
            rows.append(np.stack([comps[keep], np.full(len(keep), leaf), np.full(len(keep), axis),
                                  keep, lab[keep]], axis=1))
    if not rows:
        return [], unprunable, comp
    table = np.concatenate(rows)
    table = table[np.lexsort((table[:, 3], table[:, 2], table[:, 1], table[:, 0]))]
    # Split into channels (components), then gather channels with the same signature.
    starts = np.flatnonzero(np.diff(table[:, 0], prepend=-1))
    by_signature: dict[tuple, list[dict[tuple[int, int], np.ndarray]]] = {}
    for chunk in np.split(table, starts[1:]):
        slots: dict[tuple[int, int], list[int]] = {}
        for _, leaf, axis, pos, _ in chunk:
            slots.setdefault((int(leaf), int(axis)), []).append(int(pos))
        signature = tuple((key, len(pos)) for key, pos in slots.items())
        by_signature.setdefault(signature, []).append(
            {key: np.asarray(pos) for key, pos in slots.items()}
        )
    groups, order = [], []
    for signature, channels in by_signature.items():
        keys = [key for key, _ in signature]
        channels.sort(key=lambda ch: tuple(int(ch[k][0]) for k in keys))
        members = []
        for leaf, axis in keys:
            indices = np.stack([ch[(leaf, axis)] for ch in channels])
            ids = leaf_labels[leaf][axis][indices[:, 0]]
            role = _ROLE_NAMES[int(st.roles[ids].max())]
            members.append(GroupMember(paths[leaf], axis, shapes[leaf][axis], indices, role))
        producer = next((m for m in members if m.role == "out"), members[0])
        name = _axis_name(producer.path, producer.axis, len(shapes[paths.index(producer.path)]))
        groups.append(ChannelGroup(name, len(channels), tuple(members)))
        order.append((paths.index(producer.path), producer.axis))
    groups = [g for _, g in sorted(zip(order, groups), key=lambda pair: pair[0])]
    _dedupe_names(groups)
    return groups, unprunable, comp


def _dedupe_names(groups: list[ChannelGroup]) -> None:
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        count = seen.get(g.name, 0)
        seen[g.name] = count + 1
        if count:
            groups[i] = dataclasses.replace(g, name=f"{g.name}#{count + 1}")


def _warn_unfollowed(st: _labels.State, comp: np.ndarray, paths: Sequence[str],
                     leaf_labels: Sequence[tuple[np.ndarray, ...]], used: Sequence[bool]) -> None:
    by_reason: dict[str, set[int]] = {}
    for pin in st.pins:
        if pin.warn:
            by_reason.setdefault(pin.reason, set()).update(np.unique(comp[pin.ids]).tolist())
    for reason, comps in by_reason.items():
        hit = []
        for leaf, labels in enumerate(leaf_labels):
            for axis, lab in enumerate(labels):
                if not used[leaf] or len(lab) < 2 or lab[0] < 0:
                    continue
                if np.isin(comp[lab], list(comps)).any():
                    hit.append(f"{paths[leaf]}[{axis}]")
        if hit:
            shown = ", ".join(hit[:6]) + (f" and {len(hit) - 6} more" if len(hit) > 6 else "")
            warnings.warn(
                f"jaxcomp.structured: {reason}; the channels of {shown} are kept (not prunable)",
                UnfollowedOpWarning,
                stacklevel=3,
            )


def walk_function(
    apply_fn: Callable[..., Any], tree: Any, example_inputs: tuple[Any, ...], *,
    collect_taps: bool = False,
) -> tuple[Any, list[str], list[tuple[int, ...]], list[bool], list[tuple[np.ndarray, ...]],
           _labels.State]:
    """Traces `apply_fn(tree, *example_inputs)` and walks its jaxpr."""
    pairs = check_dense("channel_groups", tree)
    paths = [p for p, _ in pairs]
    shapes = [tuple(np.shape(leaf)) for _, leaf in pairs]
    closed = _trace(apply_fn, tree, example_inputs)
    labels, num_ids = _labels.leaf_labels(shapes)
    input_shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(example_inputs)]
    ins = [_labels.Value(lab, False) for lab in labels]
    ins += [_labels.Value(tuple(_labels.fixed(n) for n in s), True) for s in input_shapes]
    jaxpr = closed.jaxpr
    if len(ins) != len(jaxpr.invars):
        raise ValueError(
            f"channel_groups: the traced function has {len(jaxpr.invars)} inputs but the tree "
            f"and example inputs have {len(ins)} leaves; pass a tree of arrays"
        )
    st = _labels.State(num_ids, collect_taps=collect_taps)
    outs = _walk.walk(jaxpr, ins, st)
    for out in outs:
        for lab in out.labels:
            st.pin(lab, "part of the function's output")
    atoms = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    read = {v for v in atoms if not isinstance(v, jex.Literal)}
    used = [v in read for v in jaxpr.invars[: len(paths)]]
    return closed, paths, shapes, used, labels, st


def channel_groups(
    apply_fn: Callable[..., Any],
    tree: Any,
    *example_inputs: Any,
    where: Where = None,
) -> ChannelGroups:
    """The groups of parameter axes of `tree` that can shrink together, from the jaxpr.

    `apply_fn(tree, *example_inputs)` is traced (not run). Give it the *inference* function and
    every collection it reads: for Linen, `channel_groups(model.apply, variables, x)` with
    `variables = {"params": ..., "batch_stats": ...}` so BatchNorm running statistics shrink
    with their channels. Channels that reach an op the walk cannot follow are kept, with an
    `UnfollowedOpWarning` naming the op; channels reduced over (LayerNorm, softmax), the
    function's inputs and outputs, and the contraction of two activations (attention scores,
    whose scale depends on the width) are kept silently and listed in `unprunable`.

    Args:
      apply_fn: `apply_fn(tree, *example_inputs)`, e.g. `model.apply` or
        `lambda p, x: model.apply({"params": p}, x)`.
      tree: the variables or parameters (a pytree of arrays, dense; not compressed leaves).
      *example_inputs: inputs of the shapes the model will see (arrays or
        `jax.ShapeDtypeStruct` values; the batch size does not matter).
      where: which leaves may be pruned (`jaxcomp.tree` selection). A group is prunable when
        `where` selects every leaf that produces its channels (its `"out"` members); protect a
        layer with e.g. `where=lambda path, x: "head" not in path`.

    Returns:
      A `ChannelGroups`: the prunable groups, the protected ones, the reasons for the rest.

    Raises:
      ValueError: if `apply_fn` fails on the example inputs, the tree holds compressed leaves,
        the function has no prunable group, or `where` protects every group.

    Example:
        >>> params = {"a": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
        ...           "b": {"kernel": jnp.ones((8, 2))}}
        >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
        >>> groups = channel_groups(f, params, jnp.ones((1, 4)))
        >>> [(g.name, g.size) for g in groups]
        [('a/kernel', 8)]
        >>> [f"{m.path}[{m.axis}]" for m in groups[0].members]
        ['a/bias[0]', 'a/kernel[1]', 'b/kernel[0]']
    """
    _, paths, shapes, used, labels, st = walk_function(apply_fn, tree, example_inputs)
    groups, unprunable, comp = build_groups(paths, shapes, used, labels, st)
    _warn_unfollowed(st, comp, paths, labels, used)
    inputs = tuple(_abstract(example_inputs))
    if not groups:
        listed = "; ".join(f"{k}: {v}" for k, v in list(unprunable.items())[:12])
        raise ValueError(
            "channel_groups: the function has no prunable channel group (every channel reaches "
            f"the input, the output or an op that pins it): {listed or 'no parameter axis'}"
        )
    prunable, protected = list(groups), []
    if where is not None:
        chosen = set(selected_paths(tree, where))
        prunable, protected = [], []
        for g in groups:
            producers = [m.path for m in g.members if m.role == "out"] or list(g.paths)
            (prunable if all(p in chosen for p in producers) else protected).append(g)
        if not prunable:
            raise ValueError(
                f"channel_groups: where={where!r} protects every prunable group "
                f"({', '.join(g.name for g in groups)}); select at least one group's producers"
            )
    return ChannelGroups(tuple(prunable), tuple(protected), unprunable, inputs)
