"""How a target sparsity is spread over the pruned leaves.

* `Uniform()`: every leaf gets the target sparsity.
* `ERK(power=1.0)`: Erdos-Renyi-Kernel (Evci et al. 2020): a leaf's density is proportional to
  (sum of its dimensions / product of its dimensions)^power, scaled so the total density
  matches; leaves that would exceed density 1 stay dense and the scale is solved again.
* `GlobalThreshold()`: one threshold over the scores of all the leaves, so the total sparsity
  matches and each leaf gets whatever falls below it. The threshold is searched by counting
  (no sort, no concatenation of all scores): O(parameters) memory-light passes that work on
  sharded params.
* `PerPath({path: sparsity or schedule})`: explicit per-leaf targets.

All of them take the scheduled target as a traced value, so they run inside `jit` on the steps
that update masks.

Example:
    >>> shapes = {"a": (100, 100), "b": (100, 10)}
    >>> {p: round(s, 3) for p, s in erk_sparsities(shapes, 0.9).items()}
    {'a': 0.929, 'b': 0.61}
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_int
from jaxcomp.sparsity._select import TINY, flat_index, lowest_k
from jaxcomp.sparsity.schedules import check_array_sparsity, check_sparsity

__all__ = [
    "Distribution",
    "ERK",
    "GlobalThreshold",
    "PerPath",
    "Uniform",
    "erk_sparsities",
    "global_threshold_masks",
]

SparsitySpec = Union[float, Callable[[Any], Any]]


class Distribution(abc.ABC):
    """Base class: per-leaf target sparsities from the scheduled target.

    Example:
        >>> class Half(Distribution):  # every leaf at half the target
        ...     def leaf_sparsities(self, target, step, paths, shapes):
        ...         return jnp.full((len(paths),), target / 2, jnp.float32)
        >>> Half().leaf_sparsities(jnp.float32(0.8), 0, ["a", "b"], [(2,), (3,)])
        Array([0.4, 0.4], dtype=float32)
    """

    #: True when the leaves share one threshold instead of per-leaf targets.
    shared_threshold: bool = False

    def check(self, paths: Sequence[str]) -> None:
        """Raises `ValueError` if this distribution cannot apply to these leaf paths."""

    def for_leaves(self, paths: Sequence[str], pruned: Set[str]) -> Distribution:
        """The distribution one rule's leaves (`paths`) use, among all the `pruned` paths;
        raises `ValueError` if it cannot apply. By default `check(paths)`, then itself.

        Example:
            >>> PerPath({"a": 0.5, "b": 0.25}).for_leaves(["b"], {"a", "b"}).sparsities
            {'b': 0.25}
        """
        self.check(paths)
        return self

    @abc.abstractmethod
    def leaf_sparsities(
        self, target: jax.Array, step: jax.Array, paths: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
    ) -> jax.Array:
        """Per-leaf sparsities (shape `(len(paths),)`) for the scheduled `target` at `step`."""


@dataclasses.dataclass(frozen=True)
class Uniform(Distribution):
    """The same sparsity for every leaf.

    Example:
        >>> Uniform().leaf_sparsities(jnp.float32(0.5), 0, ["a", "b"], [(2,), (3,)])
        Array([0.5, 0.5], dtype=float32)
    """

    def leaf_sparsities(self, target, step, paths, shapes):
        return jnp.full((len(paths),), target, jnp.float32)


def _erk_densities(target: jax.Array, sizes: np.ndarray, raw: np.ndarray) -> jax.Array:
    """Densities min(1, eps * raw) with sum(density * size) = (1 - target) * sum(size).

    The dense set is a prefix of the leaves sorted by `raw` (descending); every prefix's eps is
    computed at once and the first consistent one chosen, so a traced target works.
    """
    order = np.argsort(-raw, kind="stable")
    sizes_sorted, raw_sorted = sizes[order].astype(np.float64), raw[order].astype(np.float64)
    dense_size = np.concatenate([[0.0], np.cumsum(sizes_sorted)])
    rest_mass = np.concatenate([np.cumsum((raw_sorted * sizes_sorted)[::-1])[::-1], [0.0]])
    budget = (1.0 - target) * float(sizes.sum())
    # eps for "the first j leaves dense": (budget - their size) / (raw mass of the others).
    eps = (budget - jnp.asarray(dense_size[:-1], jnp.float32)) / jnp.asarray(
        np.maximum(rest_mass[:-1], 1e-30), jnp.float32)
    consistent = eps * jnp.asarray(raw_sorted, jnp.float32) <= 1.0
    first = jnp.argmax(consistent)
    scale = jnp.where(jnp.any(consistent), eps[first], jnp.inf)
    densities_sorted = jnp.minimum(1.0, scale * jnp.asarray(raw_sorted, jnp.float32))
    return densities_sorted[jnp.asarray(np.argsort(order))]


def _erk_raw(shapes: Sequence[tuple[int, ...]], power: float) -> np.ndarray:
    return np.array(
        [(sum(s) / max(math.prod(s), 1)) ** power if s else 1.0 for s in shapes], np.float64
    )


@dataclasses.dataclass(frozen=True)
class ERK(Distribution):
    """Erdos-Renyi-Kernel: denser small and thin layers, sparser large ones.

    Attributes:
      power: exponent on (sum of dims / product of dims); 1.0 is ERK, 0.0 is uniform.

    Example:
        >>> ERK().leaf_sparsities(jnp.float32(0.9), 0, ["a", "b"], [(100, 100), (100, 10)])
        Array([0.929..., 0.609...], dtype=float32)
    """

    power: float = 1.0

    def __post_init__(self):
        if not self.power >= 0:
            raise ValueError(f"ERK: power must be >= 0, got {self.power!r}")

    def leaf_sparsities(self, target, step, paths, shapes):
        sizes = np.array([math.prod(s) for s in shapes], np.float64)
        densities = _erk_densities(jnp.asarray(target, jnp.float32), sizes,
                                   _erk_raw(shapes, self.power))
        return jnp.clip(1.0 - densities, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class GlobalThreshold(Distribution):
    """One score threshold across all the leaves of a rule; the total sparsity matches.

    Structured units (blocks, channels) count as the weights they hold (edge blocks fewer), so
    the target is a fraction of weights: the prefix of the units in (score, leaf, position) order
    whose weight is nearest the target is pruned. Every leaf keeps its highest-scoring unit.

    Example:
        >>> GlobalThreshold().shared_threshold
        True
    """

    shared_threshold = True

    def leaf_sparsities(self, target, step, paths, shapes):
        return jnp.full((len(paths),), target, jnp.float32)


@dataclasses.dataclass(frozen=True)
class PerPath(Distribution):
    """Explicit targets per path: a float, or an optax schedule of its own, for each leaf.

    Every pruned leaf of the rule must be listed, and every listed path must be pruned. The
    rule's own sparsity is not used.

    Attributes:
      sparsities: `{path: sparsity or schedule}`, paths "/"-joined as in `jaxcomp.tree`.

    Example:
        >>> PerPath({"a": 0.5, "b": 0.9}).leaf_sparsities(None, 0, ["a", "b"], [(2,), (3,)])
        Array([0.5, 0.9], dtype=float32)
    """

    sparsities: Mapping[str, SparsitySpec] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.sparsities, Mapping) or not self.sparsities:
            raise ValueError(f"PerPath needs a non-empty {{path: sparsity}} dict, got "
                             f"{self.sparsities!r}")
        for path, value in self.sparsities.items():
            if not callable(value):
                check_sparsity(value, f"PerPath sparsity of {path!r}")
        object.__setattr__(self, "sparsities", dict(self.sparsities))

    def __hash__(self):
        return hash(tuple(sorted(self.sparsities)))

    def check(self, paths):
        self.for_leaves(paths, set(paths))

    def for_leaves(self, paths, pruned):
        """Each rule's leaves take their own entries of one PerPath (the pruner's, inherited by
        its rules): every one of them must be listed, and every listed path pruned."""
        missing = [p for p in paths if p not in self.sparsities]
        extra = [p for p in self.sparsities if p not in pruned]
        if missing or extra:
            raise ValueError(
                f"PerPath must list exactly the pruned leaves; unlisted: {missing}, "
                f"listed but not pruned: {extra}"
            )
        return PerPath({p: self.sparsities[p] for p in paths})

    def leaf_sparsities(self, target, step, paths, shapes):
        values = []
        for path in paths:
            spec = self.sparsities[path]
            value = spec(step) if callable(spec) else spec
            values.append(jnp.asarray(value, jnp.float32))
        return jnp.clip(jnp.stack(values), 0.0, 1.0)


def erk_sparsities(
    shapes: Mapping[str, tuple[int, ...]], sparsity: float, power: float = 1.0
) -> dict[str, float]:
    """ERK per-leaf sparsities for a total `sparsity` over leaves of these shapes.

    Args:
      shapes: `{path: shape}`.
      sparsity: the overall target, in [0, 1).
      power: see `ERK`.

    Returns:
      ``{path: sparsity}``; the size-weighted mean equals `sparsity`.

    Raises:
      ValueError: if `sparsity` is outside [0, 1) or `shapes` is empty.

    Example:
        >>> erk_sparsities({"a": (10, 10)}, 0.5)
        {'a': 0.5}
    """
    sparsity = check_sparsity(sparsity)
    if not shapes:
        raise ValueError("erk_sparsities needs at least one shape")
    for path, shape in shapes.items():
        try:
            dims = tuple(shape)
        except TypeError:
            dims = None
        if dims is None or not all((as_int(d) or 0) >= 1 for d in dims):
            raise ValueError(f"{path}: erk_sparsities needs a shape of positive ints, got {shape!r}")
    paths = list(shapes)
    values = ERK(power).leaf_sparsities(jnp.float32(sparsity), 0, paths,
                                        [tuple(shapes[p]) for p in paths])
    return {p: float(v) for p, v in zip(paths, np.asarray(values))}


def keep_best(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 `scores` with its highest one (the first, on ties; NaN lowest; magnitudes below
    `TINY` as zero) raised to +inf, so that a shared threshold below 1 keeps at least that
    element of the leaf; and where it is. A +inf score of its own becomes the largest finite
    float32, so that the marked element alone ranks above every other score."""
    scores = jnp.asarray(scores).astype(jnp.float32)
    if scores.size == 0:
        return scores, jnp.zeros(scores.shape, bool)
    # Each use recomputes from `scores` (elementwise, fused): a shared modified copy would be a
    # leaf-sized temporary.
    ranked = jnp.where(jnp.isnan(scores), -jnp.inf,
                       jnp.where(jnp.abs(scores) < TINY, jnp.zeros((), jnp.float32), scores))
    # Two reductions, not argmax, which XLA partitions by gathering the leaf.
    index = flat_index(scores.shape)
    first = jnp.min(jnp.where(ranked == jnp.max(ranked), index, scores.size))
    best = index == first
    finite_top = jnp.where(scores == jnp.inf, jnp.finfo(jnp.float32).max, scores)
    return jnp.where(best, jnp.inf, finite_top), best


def global_threshold_masks(scores: Any, sparsity: jax.typing.ArrayLike) -> Any:
    """Keep-masks pruning the round(sparsity * total) lowest scores across every leaf of `scores`.

    Every leaf keeps at least its highest score, so a sparsity below 1 never empties a leaf (the
    count is capped at total - number of leaves). The threshold is found by counting scores
    below candidate thresholds (a few passes over the leaves, each a reduction), never by sorting
    or concatenating them, so the extra memory is a few scalars per leaf and it runs on sharded
    leaves as they are. Ties at the threshold are broken by position, so exactly that many
    elements are pruned. Scores of magnitude below 2**-98 (about 3e-30) count as 0.

    Args:
      scores: a tree of score arrays (`None` leaves are skipped).
      sparsity: fraction of all elements to prune, in [0, 1); may be traced.

    Returns:
      A tree of bool keep-masks with the structure of `scores`.

    Raises:
      ValueError: if a concrete `sparsity` is outside [0, 1) or `scores` has no leaves.

    Example:
        >>> masks = global_threshold_masks({"a": jnp.array([1., 5.]), "b": jnp.array([2., 3.])}, 0.5)
        >>> masks
        {'a': Array([False,  True], dtype=bool), 'b': Array([False,  True], dtype=bool)}
    """
    check_array_sparsity(sparsity)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    if not flat:
        raise ValueError("global_threshold_masks: the scores tree has no leaves")
    leaves = [keep_best(jnp.asarray(leaf))[0] for _, leaf in flat]
    total = sum(leaf.size for leaf in leaves)
    kept = sum(leaf.size > 0 for leaf in leaves)
    k = jnp.minimum(jnp.round(jnp.asarray(sparsity, jnp.float32) * total), total - kept)
    pruned = lowest_k(leaves, jnp.maximum(k, 0).astype(jnp.int32)[None],
                      groups=[0] * len(leaves))
    return jax.tree.unflatten(treedef, [~p for p in pruned])
