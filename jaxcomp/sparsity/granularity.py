"""What a mask keeps or drops together: single weights, N:M groups, blocks, or whole channels.

A granularity turns per-weight scores into the scores of its *units* (`pool`), and a keep/drop
decision per unit back into a mask of the weight's shape (`expand`). Unstructured pruning is the
identity; blocks and channels pool their weights' scores by mean or max. N:M is different: its
sparsity is fixed (N kept in every M), so it decides the mask itself (`NM.select`).

Example:
    >>> scores = jnp.array([[4., 1., 3., 2.], [1., 2., 3., 4.]])
    >>> NM(n=2, m=4, axis=-1).select(scores)
    Array([[ True, False,  True, False],
           [False, False,  True,  True]], dtype=bool)
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcomp._checks import as_int
from jaxcomp.sparsity._select import finite, lowest_k, sanitize
from jaxcomp.sparsity.schedules import check_array_sparsity

__all__ = ["Block", "Channel", "Granularity", "NM", "Unstructured", "block_mask", "channel_mask",
           "nm_mask", "unstructured_mask"]

Pool = Literal["mean", "max"]


def _check_axis(axis: object, what: str) -> int:
    if as_int(axis) is None:
        raise ValueError(f"{what}: axis must be an int, got axis={axis!r}")
    return as_int(axis)


def _normalize_axis(path: str, axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{path}: {what} axis={axis} is out of range for a leaf of rank {ndim}")
    return axis % ndim


class Granularity(abc.ABC):
    """Base class: how weights group into the units a mask keeps or prunes.

    Example:
        >>> Channel(axis=-1).pool(jnp.array([[1., 4.], [3., 0.]]))
        Array([2., 2.], dtype=float32)
    """

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises `ValueError` naming `path` if this granularity cannot apply to `shape`."""

    def num_units(self, shape: tuple[int, ...]) -> int:
        """Number of units a leaf of `shape` has."""
        return math.prod(shape)

    def unit_sizes(self, shape: tuple[int, ...]) -> np.ndarray:
        """Weights each unit holds, shaped like the pooled scores (a global threshold weighs
        units by it)."""
        return np.ones(shape, np.int64)

    def pool(self, scores: jax.Array) -> jax.Array:
        """Per-weight scores to per-unit scores."""
        return scores

    def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """A per-unit keep decision to a mask of `shape`."""
        return keep


@dataclasses.dataclass(frozen=True)
class Unstructured(Granularity):
    """Every weight is its own unit.

    Example:
        >>> Unstructured().num_units((3, 4))
        12
    """


@dataclasses.dataclass(frozen=True)
class NM(Granularity):
    """N:M sparsity: in every M consecutive weights along `axis`, keep the N with the top scores.

    2:4 along the contracting axis is what sparse tensor cores run; the default `axis=-2` is the
    input axis of a Dense kernel `(in, out)`, of a conv kernel `(..., in, out)` and of kernels
    stacked by `nn.scan` `(layer, in, out)`. A `DenseGeneral` attention projection
    `(in, heads, head_dim)` contracts axis 0: give it its own rule,
    `Rule(r".*(query|key|value)/kernel", granularity=NM(2, 4, axis=0))`.
    When the axis length is not a multiple of M, the last, shorter group of r weights keeps
    min(N, r); an axis shorter than M (a warning names the leaf) is pruned less than 1 - N/M,
    and not at all when it holds N weights or fewer. The sparsity is fixed at 1 - N/M: a
    schedule only says when the mask is applied (when its value becomes positive).

    Attributes:
      n: weights kept per group (1 <= n <= m).
      m: group size.
      axis: the axis along which groups run.

    Example:
        >>> NM(n=2, m=4).sparsity
        0.5
    """

    n: int = 2
    m: int = 4
    axis: int = -2

    def __post_init__(self):
        m, n = as_int(self.m), as_int(self.n)
        if m is None or m < 1:
            raise ValueError(f"NM: m must be a positive int, got m={self.m!r}")
        if n is None or not 1 <= n <= m:
            raise ValueError(f"NM: n must be an int in [1, m={self.m}], got n={self.n!r}")
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "axis", _check_axis(self.axis, "NM"))

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        if not shape:
            raise ValueError(f"{path}: N:M sparsity needs an array, got a scalar leaf")
        axis = _normalize_axis(path, self.axis, len(shape), "NM")
        if shape[axis] < self.m:
            kept = "nothing is pruned" if shape[axis] <= self.n else (
                f"{self.n} of its {shape[axis]} are kept")
            warnings.warn(
                f"{path}: NM({self.n}, {self.m}) groups run along axis {self.axis} of length "
                f"{shape[axis]} (shape {shape}), shorter than m={self.m}: {kept}. If this is not "
                "the contracted axis (a DenseGeneral kernel (in, heads, head_dim) contracts axis "
                "0), give the leaf a Rule with NM(..., axis=...)", stacklevel=2)

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned in full groups."""
        return 1.0 - self.n / self.m

    def select(self, scores: jax.Array) -> jax.Array:
        """The N:M keep-mask of `scores` (True = kept); ties go to the earlier position."""
        return _nm_select(scores, self.n, self.m, self.axis % scores.ndim)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_select(scores: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    x = jnp.moveaxis(sanitize(scores), axis, -1)
    length = x.shape[-1]
    pad = -length % m
    # Padding scores below every real one: a short last group keeps min(N, r) real weights.
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    groups = x.reshape(*x.shape[:-1], -1, m)
    position = lax.broadcasted_iota(jnp.int32, groups.shape, groups.ndim - 1)
    # Rank of each weight in its group: how many beat it (ties: the earlier one wins).
    rank = jnp.zeros(groups.shape, jnp.int32)
    for j in range(m):
        other = groups[..., j : j + 1]
        beats = (other > groups) | ((other == groups) & (j < position))
        rank = rank + beats.astype(jnp.int32)
    keep = (rank < n).reshape(*x.shape[:-1], -1)[..., :length]
    return jnp.moveaxis(keep, -1, axis)


@dataclasses.dataclass(frozen=True)
class Block(Granularity):
    """Blocks of `shape` over the trailing axes, pooled by mean or max of their weights' scores.

    `Block((r, c))` prunes r x c tiles of a Dense kernel; on a conv kernel (HWIO) it tiles the
    (in, out) plane at every spatial tap (use `Block((kh, kw, r, c))` to tile whole windows).
    Axes not divisible by the block are fine: edge blocks are smaller and pool what they hold.

    Attributes:
      shape: block extent along the last `len(shape)` axes, each >= 1; an int b is (b, b).
      pool_by: "mean" or "max".

    Example:
        >>> Block((2, 2)).num_units((4, 5))
        6
    """

    shape: tuple[int, ...] = (4, 4)
    pool_by: Pool = "mean"

    def __post_init__(self):
        shape = self.shape
        if as_int(shape) is not None:
            shape = (int(shape), int(shape))
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else ()
        if not shape or not all(as_int(b) is not None and b >= 1 for b in shape):
            raise ValueError(f"Block: shape must be a tuple of positive ints, got {self.shape!r}")
        shape = tuple(int(b) for b in shape)
        if self.pool_by not in ("mean", "max"):
            raise ValueError(f"Block: pool_by must be 'mean' or 'max', got {self.pool_by!r}")
        object.__setattr__(self, "shape", shape)

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        if len(self.shape) > len(shape):
            raise ValueError(
                f"{path}: block shape {self.shape} has more axes than the leaf's shape {shape}"
            )
        trailing = shape[len(shape) - len(self.shape):]
        if any(b > d for b, d in zip(self.shape, trailing)):
            fit = tuple(min(b, d) for b, d in zip(self.shape, trailing))
            raise ValueError(f"{path}: block shape {self.shape} exceeds the leaf's trailing axes "
                             f"{trailing} (shape {shape}); give this leaf a block that fits, "
                             f"e.g. Rule(where=..., granularity=Block({fit}))")

    def _grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        lead = len(shape) - len(self.shape)
        return shape[:lead] + tuple(-(-d // b) for d, b in zip(shape[lead:], self.shape))

    def num_units(self, shape: tuple[int, ...]) -> int:
        return math.prod(self._grid(shape))

    def unit_sizes(self, shape: tuple[int, ...]) -> np.ndarray:
        lead = len(shape) - len(self.shape)
        sizes = np.ones(self._grid(shape), np.int64)
        for axis, (d, b) in enumerate(zip(shape[lead:], self.shape)):
            # Blocks hold b weights along the axis, the clipped last one what is left.
            extent = np.minimum(b, d - b * np.arange(-(-d // b)))
            view = [1] * sizes.ndim
            view[lead + axis] = extent.size
            sizes = sizes * extent.reshape(view)
        return sizes

    def pool(self, scores: jax.Array) -> jax.Array:
        scores = finite(scores)
        lead = scores.ndim - len(self.shape)
        pads = [(0, 0)] * lead + [(0, -d % b) for d, b in zip(scores.shape[lead:], self.shape)]
        fill = 0.0 if self.pool_by == "mean" else -jnp.inf
        padded = jnp.pad(scores, pads, constant_values=fill)
        split = list(padded.shape[:lead])
        for d, b in zip(padded.shape[lead:], self.shape):
            split += [d // b, b]
        tiles = padded.reshape(split)
        inner = tuple(lead + 2 * i + 1 for i in range(len(self.shape)))
        if self.pool_by == "max":
            return jnp.max(tiles, axis=inner)
        # Mean over the weights a (possibly clipped) edge block really holds.
        ones = jnp.pad(jnp.ones(scores.shape[lead:], jnp.float32), pads[lead:])
        sizes = jnp.sum(ones.reshape(split[lead:]), axis=tuple(2 * i + 1 for i in
                                                                 range(len(self.shape))))
        return jnp.sum(tiles, axis=inner) / sizes

    def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        lead = len(shape) - len(self.shape)
        for i, b in enumerate(self.shape):
            keep = jnp.repeat(keep, b, axis=lead + i)
        return keep[tuple(slice(0, d) for d in shape)]


@dataclasses.dataclass(frozen=True)
class Channel(Granularity):
    """Whole slices along `axis`: output channels/filters, input channels, rows or columns.

    `axis=-1` prunes output features of a Dense kernel (its columns) or filters of an HWIO conv
    kernel; `axis=-2` prunes input features (rows) or input channels. Each slice's score pools
    its weights' scores by mean or max. This only masks; removing the channels physically (and
    the matching inputs of the next layer) is `jaxcomp.structured`.

    Attributes:
      axis: the axis whose slices are the units.
      pool_by: "mean" or "max".

    Example:
        >>> Channel(axis=-1).num_units((300, 100))
        100
    """

    axis: int = -1
    pool_by: Pool = "mean"

    def __post_init__(self):
        if self.pool_by not in ("mean", "max"):
            raise ValueError(f"Channel: pool_by must be 'mean' or 'max', got {self.pool_by!r}")
        object.__setattr__(self, "axis", _check_axis(self.axis, "Channel"))

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        if not shape:
            raise ValueError(f"{path}: channel pruning needs an array, got a scalar leaf")
        axis = _normalize_axis(path, self.axis, len(shape), "Channel")
        if shape[axis] == 1 and len(shape) >= 3 and axis == len(shape) - 2:
            # A depthwise conv kernel (H, W, 1, C): its input axis is one unit. (A Dense head
            # with one output is one unit too, and expected to be.)
            warnings.warn(
                f"{path}: Channel(axis={self.axis}) slices along an axis of length 1 (shape "
                f"{shape}): the leaf is one unit, pruned whole or not at all. A depthwise conv "
                "kernel (H, W, 1, C) holds its channels on axis -1", stacklevel=2)

    def num_units(self, shape: tuple[int, ...]) -> int:
        return shape[self.axis % len(shape)]

    def unit_sizes(self, shape: tuple[int, ...]) -> np.ndarray:
        units = self.num_units(shape)
        return np.full((units,), math.prod(shape) // max(units, 1), np.int64)

    def pool(self, scores: jax.Array) -> jax.Array:
        axis = self.axis % scores.ndim
        others = tuple(a for a in range(scores.ndim) if a != axis)
        scores = finite(scores)
        return jnp.max(scores, axis=others) if self.pool_by == "max" else jnp.mean(scores, others)

    def expand(self, keep: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        axis = self.axis % len(shape)
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return jnp.broadcast_to(keep.reshape(view), shape)


def pruned_units(sparsity: jax.typing.ArrayLike, units: int) -> jax.Array:
    """round(sparsity * units) as int32, leaving at least one unit: a sparsity below 1 never
    empties a leaf."""
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * units)
    return jnp.clip(k, 0, max(units - 1, 0)).astype(jnp.int32)


def _check_scores(scores: Any) -> None:
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise ValueError(f"scores must be an array, got {type(scores).__name__}")
    dtype = scores.dtype
    if not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"scores must be a real array, got dtype {scores.dtype}")


def _structured_mask(
    granularity: Granularity, scores: jax.Array, sparsity: jax.typing.ArrayLike
) -> jax.Array:
    check_array_sparsity(sparsity)
    _check_scores(scores)
    shape = tuple(scores.shape)
    if 0 in shape:
        raise ValueError(f"scores: an empty array (shape {shape}) has nothing to prune")
    granularity.check("scores", shape)
    units = granularity.pool(scores)
    k = pruned_units(sparsity, units.size)
    (pruned,) = lowest_k([units], k[None])
    return granularity.expand(~pruned, shape)


def unstructured_mask(scores: jax.Array, sparsity: jax.typing.ArrayLike) -> jax.Array:
    """Keep-mask pruning exactly round(sparsity * size) weights with the lowest scores.

    Ties are broken by position; NaN scores count as the lowest; at least one weight is kept.
    Works under `jit` with a traced `sparsity` and on sharded arrays (no sort, no gather).

    Args:
      scores: per-weight scores (higher is more important).
      sparsity: fraction to prune, in [0, 1).

    Returns:
      A bool array of `scores.shape`, True where the weight is kept.

    Raises:
      ValueError: if a concrete `sparsity` is outside [0, 1).

    Example:
        >>> unstructured_mask(jnp.array([3., 1., 2., 0.5]), 0.5)
        Array([ True, False,  True, False], dtype=bool)
    """
    return _structured_mask(Unstructured(), scores, sparsity)


def nm_mask(scores: jax.Array, n: int = 2, m: int = 4, axis: int = -2) -> jax.Array:
    """Keep-mask with N of every M consecutive weights along `axis` (see `NM`).

    Example:
        >>> nm_mask(jnp.array([[1., 4., 2., 3.]]), 2, 4, axis=-1)
        Array([[False,  True, False,  True]], dtype=bool)
    """
    granularity = NM(n=n, m=m, axis=axis)
    _check_scores(scores)
    granularity.check("scores", tuple(scores.shape))
    return granularity.select(scores)


def block_mask(
    scores: jax.Array,
    sparsity: jax.typing.ArrayLike,
    shape: tuple[int, ...] = (4, 4),
    pool_by: Pool = "mean",
) -> jax.Array:
    """Keep-mask pruning round(sparsity * blocks) whole blocks (see `Block`), keeping one at least.

    Raises:
      ValueError: if a concrete `sparsity` is outside [0, 1) or the block does not fit.

    Example:
        >>> s = jnp.array([[1., 1., 5., 5.], [1., 1., 5., 5.]])
        >>> block_mask(s, 0.5, (2, 2))
        Array([[False, False,  True,  True],
               [False, False,  True,  True]], dtype=bool)
    """
    return _structured_mask(Block(shape, pool_by), scores, sparsity)


def channel_mask(
    scores: jax.Array, sparsity: jax.typing.ArrayLike, axis: int = -1, pool_by: Pool = "mean"
) -> jax.Array:
    """Keep-mask pruning round(sparsity * channels) whole slices along `axis` (see `Channel`),
    keeping one at least.

    Raises:
      ValueError: if a concrete `sparsity` is outside [0, 1) or `axis` is out of range.

    Example:
        >>> channel_mask(jnp.array([[1., 9.], [1., 9.]]), 0.5)
        Array([[False,  True],
               [False,  True]], dtype=bool)
    """
    return _structured_mask(Channel(axis, pool_by), scores, sparsity)
