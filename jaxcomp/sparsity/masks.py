"""Mask trees, the `Masked` compressed leaf, and how sparse a tree is.

A *mask tree* has the structure of the params: a bool (or uint8) array, of the leaf's shape or
broadcastable to it, at every pruned leaf, and `None` at the leaves that are not pruned. True
(or nonzero) keeps the weight. `apply_masks` zeroes the pruned weights, `to_masked` wraps each
masked leaf as a `Masked` compressed leaf (what `jaxcomp.report` and export see), and
`sparsity_of` measures the fraction of zeros per leaf and overall.

Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., -2.], [3., 0.5]]), "bias": jnp.ones(2)}}
    >>> masks = {"Dense_0": {"kernel": jnp.array([[True, True], [True, False]]), "bias": None}}
    >>> apply_masks(params, masks)["Dense_0"]["kernel"]
    Array([[ 1., -2.],
           [ 3.,  0.]], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core import CompressedLeaf, bit_width, compressed_leaf, is_compressed, materialize
from jaxcomp.tree import Where, key_path_str, selected_paths

__all__ = [
    "Masked",
    "Sparsity",
    "apply_masks",
    "mask_leaves",
    "ones_masks",
    "sparsity_of",
    "to_masked",
]


def _is_none(x: Any) -> bool:
    return x is None


def _check_mask(path: str, mask: Any, shape: tuple[int, ...]) -> None:
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise ValueError(f"mask at {path!r} must be an array, got {mask!r}")
    dtype = np.dtype(mask.dtype)
    if dtype != np.bool_ and not np.issubdtype(dtype, np.integer):
        raise ValueError(f"mask at {path!r} must be bool or an integer type, got {dtype}")
    try:
        broadcast = np.broadcast_shapes(tuple(mask.shape), shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"mask at {path!r} has shape {tuple(mask.shape)}, which does not broadcast to the "
            f"param's shape {shape}"
        )


def mask_leaves(params: Any, masks: Any) -> list[tuple[str, Any, Any]]:
    """`(path, param, mask)` for every leaf of `params`, the mask `None` where not pruned.

    Args:
      params: the parameter tree.
      masks: a mask tree (see the module docstring).

    Returns:
      One triple per params leaf, in flattening order.

    Raises:
      ValueError: naming the paths when `masks` does not have the structure of `params`, or
        naming the path, shape and dtype of a mask that does not fit its param.

    Example:
        >>> [p for p, _, m in mask_leaves({"a": jnp.ones(2)}, {"a": None})]
        ['a']
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
    try:
        mask_list = treedef.flatten_up_to(masks)
    except (ValueError, TypeError) as e:
        # Other container types with the same paths (the masks of an nnx.Optimizer's state, an
        # NNX State of OptVariables, against nnx.state(model, nnx.Param)): matched by path.
        by_path = {key_path_str(p): m for p, m in
                   jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]}
        param_paths = [key_path_str(p) for p, _ in flat]
        missing = [p for p in param_paths if p not in by_path]
        extra = [p for p in by_path if p not in set(param_paths)]
        if missing or extra or len(by_path) != len(param_paths):
            raise ValueError(
                "masks do not match the structure of the params; "
                f"missing paths: {missing[:20]}; unexpected paths: {extra[:20]}"
            ) from e
        mask_list = [by_path[p] for p in param_paths]
    out = []
    for (key_path, param), mask in zip(flat, mask_list):
        path = key_path_str(key_path)
        if mask is not None:
            _check_mask(path, mask, tuple(np.shape(param)))
        out.append((path, param, mask))
    return out


def ones_masks(params: Any, where: Where = r".*kernel") -> Any:
    """A mask tree keeping everything: all-True masks at the selected leaves, `None` elsewhere.

    The masks take the sharding of their params when the params are concrete arrays.

    Example:
        >>> ones_masks({"Dense_0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}})
        {'Dense_0': {'bias': None, 'kernel': Array([[ True,  True],
               [ True,  True]], dtype=bool)}}
    """
    chosen = set(selected_paths(params, where))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
    leaves = [
        jnp.ones_like(p, dtype=bool) if key_path_str(k) in chosen else None for k, p in flat
    ]
    return jax.tree.unflatten(treedef, leaves)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes the pruned weights: `where(mask, param, 0)` at every masked leaf.

    Args:
      params: the parameter tree (compressed leaves are materialized first where masked).
      masks: a mask tree with the structure of `params` (`None` where not pruned).

    Returns:
      A tree like `params`; pruned weights are exactly zero, other leaves are unchanged.

    Raises:
      ValueError: if `masks` does not fit `params` (see `mask_leaves`).

    Example:
        >>> apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([False, True])})
        {'w': Array([0., 2.], dtype=float32)}
    """
    triples = mask_leaves(params, masks)
    treedef = jax.tree.structure(params, is_leaf=is_compressed)
    out = []
    for _, param, mask in triples:
        if mask is None:
            out.append(param)
        else:
            dense = materialize(param)
            out.append(jnp.where(mask.astype(bool), dense, jnp.zeros((), dense.dtype)))
    return jax.tree.unflatten(treedef, out)


@compressed_leaf
class Masked(CompressedLeaf):
    """A weight with a keep-mask: `materialize()` is `where(mask, value, 0)`.

    `nbytes` counts what an export writes: the mask as a packed bitmask (1 bit per weight) and
    the kept values only. For an abstract mask (under `jax.eval_shape`) every value counts.

    Attributes:
      value: the dense weights (pruned entries may hold anything).
      mask: bool array of `value.shape`, True where the weight is kept.

    Example:
        >>> leaf = Masked(jnp.array([1., 2., 3., 4.]), jnp.array([True, False, False, True]))
        >>> leaf.materialize(), leaf.nbytes
        (Array([1., 0., 0., 4.], dtype=float32), 9)
    """

    value: jax.Array
    mask: jax.Array

    def materialize(self) -> jax.Array:
        return jnp.where(self.mask, self.value, jnp.zeros((), self.value.dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value.dtype)

    def _kept(self) -> int | None:
        """The number of kept values, or None for an abstract or traced mask."""
        if isinstance(self.mask, jax.ShapeDtypeStruct):  # np.asarray would make a 0-d object
            return None
        try:
            return int(np.count_nonzero(np.asarray(jax.device_get(self.mask))))
        except (TypeError, jax.errors.TracerArrayConversionError,
                jax.errors.ConcretizationTypeError):
            return None

    @property
    def num_params(self) -> int:
        """The kept values (every value for an abstract mask), the weights an export stores."""
        kept = self._kept()
        return math.prod(self.shape) if kept is None else kept

    @property
    def nbytes(self) -> int:
        size = math.prod(self.shape)
        kept = self._kept()
        values = size if kept is None else kept
        bits = bit_width(self.value.dtype)
        return -(-size // 8) + -(-values * bits // 8)

    @property
    def kind(self) -> str:
        return "Masked"

    def summary(self) -> str:
        kept = self._kept()
        if kept is None:
            return "bitmask + kept values"
        size = math.prod(self.shape)
        return f"bitmask + kept values, {100 * (1 - kept / max(size, 1)):.1f}% pruned"


def to_masked(params: Any, masks: Any) -> Any:
    """Wraps every masked leaf as a `Masked` compressed leaf; other leaves are unchanged.

    The values are stored with pruned entries zeroed, so `jaxcomp.materialize` gives back
    `apply_masks(params, masks)`.

    A masked leaf that is already compressed must be a `Masked` leaf (its values are masked
    again); a `QArray` or `Codebook` would come back as float values, losing its codes, so it is
    a `ValueError`: such a leaf already stores the pruned zeros (as zero codes, or a centroid
    pinned at 0.0).

    Raises:
      ValueError: if `masks` does not fit `params` (see `mask_leaves`), or a masked leaf is a
        compressed leaf other than `Masked`.

    Example:
        >>> tree = to_masked({"w": jnp.array([1., 2.])}, {"w": jnp.array([False, True])})
        >>> tree["w"].kind, materialize(tree)["w"]
        ('Masked', Array([0., 2.], dtype=float32))
    """
    triples = mask_leaves(params, masks)
    treedef = jax.tree.structure(params, is_leaf=is_compressed)
    out = []
    for path, param, mask in triples:
        if mask is None:
            out.append(param)
            continue
        if is_compressed(param) and not isinstance(param, Masked):
            raise ValueError(f"{path}: to_masked would turn a {param.kind} into float values; "
                             f"it already stores the pruned zeros (mask before quantizing, or "
                             f"report the {param.kind} as it is)")
        dense = materialize(param)
        keep = jnp.broadcast_to(mask.astype(bool), dense.shape)
        out.append(Masked(jnp.where(keep, dense, jnp.zeros((), dense.dtype)), keep))
    return jax.tree.unflatten(treedef, out)


class Sparsity(NamedTuple):
    """The result of `sparsity_of`.

    Attributes:
      per_leaf: `{path: fraction of zeros}` for every measured leaf (scalar arrays).
      total: zeros over elements of all measured leaves.
      zeros: number of zeros over all measured leaves.
      size: number of elements of all measured leaves.

    Example:
        >>> s = sparsity_of({"w": jnp.array([0., 1., 0., 0.])})
        >>> int(s.zeros), s.size
        (3, 4)
    """

    per_leaf: dict[str, jax.Array]
    total: jax.Array
    zeros: jax.Array
    size: int


def sparsity_of(tree: Any, where: Where = None) -> Sparsity:
    """Fraction of zeros per leaf and overall; works on params, mask trees and `Masked` leaves.

    For a mask tree the zeros are the pruned entries (False); `None` leaves are skipped. Values
    are arrays, so it works under `jit`.

    Args:
      tree: params, masks, or a tree holding compressed leaves (they are materialized).
      where: which leaves to measure (default: every leaf that is not `None`).

    Returns:
      A `Sparsity` with per-leaf fractions and the global fraction.

    Raises:
      ValueError: if `where` selects no leaf.

    Example:
        >>> s = sparsity_of({"a": jnp.array([0., 1., 0., 2.]), "b": jnp.zeros(4)})
        >>> float(s.per_leaf["a"]), float(s.total)
        (0.5, 0.75)
    """
    chosen = None if where is None else set(selected_paths(tree, where))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
    per_leaf, zeros, size = {}, jnp.int32(0), 0
    for key_path, leaf in flat:
        path = key_path_str(key_path)
        if chosen is not None and path not in chosen:
            continue
        dense = jnp.asarray(materialize(leaf))
        count = jnp.sum((dense == 0).astype(jnp.int32))
        per_leaf[path] = count / max(dense.size, 1)
        zeros = zeros + count
        size += dense.size
    if not per_leaf:
        raise ValueError(f"sparsity_of: where={where!r} selects no leaf")
    return Sparsity(per_leaf, zeros / max(size, 1), zeros, size)
