"""Key paths and the one selection mechanism, `where=`, used by every jaxcomp transform.

A leaf's *path* is its key path joined with "/": `"Dense_0/kernel"` in a Linen `params` dict,
`"layers/0/kernel"` in an NNX `State` (the `.value` of an `nnx.Variable` is not part of the path),
`"0/mu/Dense_0/kernel"` inside an optax state. Compressed leaves count as single leaves.

`where=` takes one of:

* a regex string (or compiled pattern), matched with `fullmatch` against each path;
* a predicate `(path, leaf) -> bool`;
* a tree of Python bools with the structure of the tree, or a prefix of it;
* `None`, which selects every leaf.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax

from jaxcomp.core import is_compressed

__all__ = [
    "Where",
    "assert_same_structure",
    "key_path_str",
    "leaves_with_paths",
    "map_selected",
    "path_dict",
    "select",
    "selected_paths",
    "tree_paths",
]

Where = Union[str, "re.Pattern[str]", Callable[[str, Any], bool], Any, None]

_MAX_LISTED_PATHS = 40


def key_path_str(key_path: Sequence[Any]) -> str:
    """Joins a `jax.tree_util` key path into a "/"-separated string.

    The `.value` attribute of an `nnx.Variable` is skipped, so NNX state paths read like Linen's.

    Example:
        >>> from jax.tree_util import DictKey, SequenceKey
        >>> key_path_str((DictKey("layers"), SequenceKey(0), DictKey("kernel")))
        'layers/0/kernel'
    """
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name in ("value", "raw_value"):
                continue
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key).strip(".[]'\""))
    return "/".join(parts)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """Returns `(path, leaf)` pairs in flattening order, compressed leaves kept whole.

    Raises:
      ValueError: if two leaves have the same path (a key containing "/", such as
        `{"a/kernel": x, "a": {"kernel": y}}`): every `where=` and per-path setting would be
        ambiguous.

    Example:
        >>> leaves_with_paths({"a": {"kernel": 1.0}, "b": [2.0]})
        [('a/kernel', 1.0), ('b/0', 2.0)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
    pairs = [(key_path_str(path), leaf) for path, leaf in flat]
    if len({path for path, _ in pairs}) != len(pairs):
        seen: set[str] = set()
        duplicate = next(p for p, _ in pairs if p in seen or seen.add(p))
        raise ValueError(
            f"two leaves of the tree have the path {duplicate!r}: a key containing '/' collides "
            "with a nested one; rename one of them (paths are how where= and per-path settings "
            "name leaves)")
    return pairs


def tree_paths(tree: Any) -> list[str]:
    """The "/"-joined paths of every leaf of `tree`, in flattening order."""
    return [path for path, _ in leaves_with_paths(tree)]


def path_dict(tree: Any) -> dict[str, Any]:
    """A flat `{path: leaf}` dict of `tree` (compressed leaves kept whole).

    Example:
        >>> path_dict({"Dense_0": {"bias": 0.0, "kernel": 1.0}})
        {'Dense_0/bias': 0.0, 'Dense_0/kernel': 1.0}
    """
    return dict(leaves_with_paths(tree))


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:_MAX_LISTED_PATHS])
    if len(paths) > _MAX_LISTED_PATHS:
        shown += f", ... ({len(paths) - _MAX_LISTED_PATHS} more)"
    return shown or "(the tree has no leaves)"


def _prefix_by_paths(tree: Any, where: Any) -> list[Any]:
    """Flags of a prefix tree of other container types (a plain dict against an NNX `State` or
    a `FrozenDict`), matched by path: each leaf takes the flag of the prefix path above it."""
    prefixes = dict(leaves_with_paths(where))
    used: set[str] = set()
    flags = []
    for path in tree_paths(tree):
        parts = path.split("/")
        for end in range(len(parts), -1, -1):
            prefix = "/".join(parts[:end])
            if prefix in prefixes:
                flags.append(prefixes[prefix])
                used.add(prefix)
                break
        else:
            raise ValueError(f"where= tree has no flag for the leaf {path!r}")
    unused = [p for p in prefixes if p not in used]
    if unused:
        raise ValueError(f"where= tree names {unused[0]!r}, which is not a path (or a prefix of "
                         f"one) in the params: {_listing(tree_paths(tree))}")
    return flags


def _bool_tree_selection(tree: Any, where: Any) -> list[bool]:
    treedef = jax.tree.structure(tree, is_leaf=is_compressed)
    try:
        full = jax.tree.broadcast(where, tree, is_leaf=is_compressed)
        flags, where_def = jax.tree.flatten(full, is_leaf=is_compressed)
    except (ValueError, TypeError) as e:
        try:
            flags, where_def = _prefix_by_paths(tree, where), treedef
        except ValueError as by_path:
            raise ValueError(
                f"where= is a tree that is neither the structure of the params nor a prefix of "
                f"it: {by_path}"
            ) from e
    if where_def.num_leaves != treedef.num_leaves:
        raise ValueError(
            f"where= tree has {where_def.num_leaves} leaves after broadcasting, the params have "
            f"{treedef.num_leaves}"
        )
    paths = tree_paths(tree)
    out = []
    for path, flag in zip(paths, flags):
        if not isinstance(flag, bool) and not (hasattr(flag, "dtype") and flag.dtype == bool
                                               and getattr(flag, "shape", None) == ()):
            raise ValueError(f"where= tree must hold Python bools; at {path!r} it holds {flag!r}")
        try:
            out.append(bool(flag))
        except jax.errors.ConcretizationTypeError as e:
            raise ValueError(
                f"where= tree must hold concrete bools, not traced values (at {path!r})"
            ) from e
    return out


def _flags(tree: Any, where: Where) -> list[bool]:
    pairs = leaves_with_paths(tree)
    if where is None:
        return [True] * len(pairs)
    if isinstance(where, (str, re.Pattern)):
        try:
            pattern = re.compile(where) if isinstance(where, str) else where
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from e
        return [pattern.fullmatch(path) is not None for path, _ in pairs]
    if callable(where) and not is_compressed(where):
        return [bool(where(path, leaf)) for path, leaf in pairs]
    if isinstance(where, (list, tuple)) and where and all(
        isinstance(w, (str, re.Pattern)) for w in where
    ):
        raise ValueError(
            f"where={where!r} is a sequence of patterns; where= takes one regex: join the "
            "alternatives with '|', e.g. r'.*kernel|.*scale'"
        )
    return _bool_tree_selection(tree, where)


def select(tree: Any, where: Where, *, allow_empty: bool = False) -> Any:
    """A tree of Python bools, with the structure of `tree`, True on the selected leaves.

    Args:
      tree: any pytree (Linen params, NNX `State`, optax state, nested containers).
      where: a regex (full match on the path), a predicate `(path, leaf) -> bool`, a tree (or
        prefix tree) of bools, or `None` for every leaf.
      allow_empty: when False (the default) a `where` that selects nothing is an error.

    Returns:
      A tree of bools, usable as `optax.masked`'s mask.

    Raises:
      ValueError: if nothing is selected (the message lists the available paths), if `where` is
        an invalid regex, or a bool tree that does not match `tree`.

    Example:
        >>> params = {"Dense_0": {"bias": 0.0, "kernel": 1.0}}
        >>> select(params, r".*kernel")
        {'Dense_0': {'bias': False, 'kernel': True}}
    """
    flags = _flags(tree, where)
    if not allow_empty and not any(flags):
        raise ValueError(
            f"where={where!r} selects no leaf; available paths: {_listing(tree_paths(tree))}"
        )
    treedef = jax.tree.structure(tree, is_leaf=is_compressed)
    return jax.tree.unflatten(treedef, flags)


def selected_paths(tree: Any, where: Where, *, allow_empty: bool = False) -> list[str]:
    """Paths of the leaves `where` selects, in flattening order.

    Example:
        >>> selected_paths({"a": {"kernel": 1.0, "bias": 0.0}}, lambda p, x: x > 0.5)
        ['a/kernel']
    """
    flags = _flags(tree, where)
    if not allow_empty and not any(flags):
        raise ValueError(
            f"where={where!r} selects no leaf; available paths: {_listing(tree_paths(tree))}"
        )
    return [path for path, flag in zip(tree_paths(tree), flags) if flag]


def map_selected(
    fn: Callable[..., Any],
    tree: Any,
    *rest: Any,
    where: Where,
    with_path: bool = False,
    allow_empty: bool = False,
) -> Any:
    """Maps `fn` over the leaves `where` selects; the other leaves come back unchanged.

    Args:
      fn: called as `fn(leaf, *rest_leaves)`, or `fn(path, leaf, *rest_leaves)` with `with_path`.
      tree: the tree whose leaves are selected and mapped.
      *rest: trees with the structure of `tree`, whose matching leaves are passed to `fn`.
      where: the selection (see `select`).
      with_path: pass the "/"-joined path as the first argument.
      allow_empty: allow a selection of nothing (then `tree` comes back unchanged).

    Returns:
      A tree with the structure of `tree`.

    Raises:
      ValueError: as `select`, and when a tree in `rest` does not match `tree`.

    Example:
        >>> params = {"Dense_0": {"bias": 1.0, "kernel": 2.0}}
        >>> map_selected(lambda x: 10 * x, params, where=r".*kernel")
        {'Dense_0': {'bias': 1.0, 'kernel': 20.0}}
    """
    flags = _flags(tree, where)
    if not allow_empty and not any(flags):
        raise ValueError(
            f"where={where!r} selects no leaf; available paths: {_listing(tree_paths(tree))}"
        )
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_compressed)
    rest_leaves = []
    for i, other in enumerate(rest):
        assert_same_structure(tree, other, what=f"tree #{i + 1} passed to map_selected")
        rest_leaves.append(treedef.flatten_up_to(other))
    paths = tree_paths(tree)
    out = []
    for i, (leaf, flag) in enumerate(zip(leaves, flags)):
        if not flag:
            out.append(leaf)
            continue
        args = [r[i] for r in rest_leaves]
        out.append(fn(paths[i], leaf, *args) if with_path else fn(leaf, *args))
    return jax.tree.unflatten(treedef, out)


def assert_same_structure(expected: Any, actual: Any, *, what: str = "tree") -> None:
    """Raises `ValueError` naming the first differing path when `actual` differs from `expected`.

    Leaves of `actual` may be subtrees where `expected` has leaves only if they are compressed
    leaves in both; otherwise the key paths must be equal.

    Example:
        >>> assert_same_structure({"a": 1, "b": 2}, {"a": 0, "b": 0}, what="masks")
    """
    want = tree_paths(expected)
    got = tree_paths(actual)
    if want == got and (
        jax.tree.structure(expected, is_leaf=is_compressed).num_leaves
        == jax.tree.structure(actual, is_leaf=is_compressed).num_leaves
    ):
        return
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    detail = []
    if missing:
        detail.append(f"missing paths: {_listing(missing)}")
    if extra:
        detail.append(f"unexpected paths: {_listing(extra)}")
    if not detail:
        detail.append("same paths in a different order or container types")
    raise ValueError(f"the structure of {what} does not match the params'; " + "; ".join(detail))
