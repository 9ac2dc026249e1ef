"""The `Pruner` configuration, its per-layer `Rule` overrides, and one-shot pruning.

A `Pruner` says which leaves are pruned (`where=`, every kernel by default), to what sparsity
(a float or an optax schedule), by which score, at which granularity, and how the sparsity is
spread over the leaves. `Rule` objects give a subset of those leaves their own settings: the first
rule whose `where` matches a leaf configures it, unset fields fall back to the pruner's. It is a
frozen, validated dataclass: no strings to parse, no registry to mutate.

`compute_masks` and `prune_now` apply a pruner once; `jaxcomp.sparsity.prune` applies it during
training.

Example:
    >>> pruner = Pruner(sparsity=0.5)
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., -4.], [0.5, 2.]]), "bias": jnp.ones(2)}}
    >>> pruned, masks = prune_now(params, pruner)
    >>> pruned["Dense_0"]["kernel"]
    Array([[ 0., -4.],
           [ 0.,  2.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core import is_compressed
from jaxcomp.sparsity._select import lowest_k
from jaxcomp.sparsity.distribution import Distribution, Uniform, keep_best
from jaxcomp.sparsity.dynamic import SET, RigL
from jaxcomp.sparsity.granularity import NM, Granularity, Unstructured, pruned_units
from jaxcomp.sparsity.masks import apply_masks, mask_leaves
from jaxcomp.sparsity.schedules import check_step, check_sparsity, constant_sparsity
from jaxcomp.sparsity.scores import Magnitude, Score, as_score
from jaxcomp.tree import Where, assert_same_structure, key_path_str, select

__all__ = ["Pruner", "Rule", "compute_masks", "prune_now"]

SparsitySpec = Union[float, Callable[[Any], Any]]
# Steps at which user schedules are checked to lie in [0, 1).
_PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def _check_spec(spec: Any, what: str) -> None:
    if spec is None or callable(spec):
        return
    check_sparsity(spec, what)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Settings for the pruned leaves that `where` matches; `None` fields use the pruner's.

    Attributes:
      where: regex on the "/"-joined path, predicate `(path, leaf) -> bool`, or bool tree.
      sparsity: a float in [0, 1) or an optax schedule `step -> sparsity`.
      granularity: `Unstructured()`, `NM(...)`, `Block(...)` or `Channel(...)`.
      score: a `Score` or a function `(params, grads, state) -> scores`.
      distribution: `Uniform()`, `ERK()`, `GlobalThreshold()` or `PerPath({...})`.

    Example:
        >>> Rule(where=r"Conv_.*", granularity=NM(n=2, m=4)).granularity
        NM(n=2, m=4, axis=-2)
    """

    where: Where
    sparsity: SparsitySpec | None = None
    granularity: Granularity | None = None
    score: Score | Callable[..., Any] | None = None
    distribution: Distribution | None = None

    def __post_init__(self):
        _check_spec(self.sparsity, "Rule sparsity")
        if self.granularity is not None and not isinstance(self.granularity, Granularity):
            raise ValueError(f"Rule granularity must be a Granularity, got {self.granularity!r}")
        if self.distribution is not None and not isinstance(self.distribution, Distribution):
            raise ValueError(
                f"Rule distribution must be a Distribution, got {self.distribution!r}")
        if self.score is not None:
            object.__setattr__(self, "score", as_score(self.score))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pruner:
    """What to prune, how much, how, and when.

    Attributes:
      sparsity: a float in [0, 1) (from the first step on) or an optax schedule, e.g.
        `polynomial_sparsity(0.9, begin_step=0, end_step=3000, frequency=100)`. Masks are
        recomputed on the steps where its value changes.
      where: the leaves to prune (default: every leaf whose path ends in "kernel").
      score: `Magnitude()` (default), `Random()`, `Saliency()`, `Movement()`, `Taylor()`, or a
        function `(params, grads, state) -> scores`.
      granularity: `Unstructured()` (default), `NM(n, m)`, `Block(shape)` or `Channel(axis)`.
      distribution: `Uniform()` (default), `ERK()`, `GlobalThreshold()` or `PerPath({...})`.
      rules: per-layer overrides, first match wins (see `Rule`); a single `Rule` is accepted.
      dynamic: `SET(...)` or `RigL(...)` for dynamic sparse training (unstructured only).

    Raises:
      ValueError: for a sparsity outside [0, 1), a field of the wrong type, N:M with a
        distribution other than `Uniform` or a constant sparsity other than 0 and 1 - N/M, or
        dynamic sparse training with structured masks.

    Example:
        >>> Pruner(sparsity=0.9, rules=[Rule(where="Dense_2/kernel", sparsity=0.5)]).rules[0].sparsity
        0.5
    """

    sparsity: SparsitySpec
    where: Where = r"(.*/)?kernel"
    score: Score | Callable[..., Any] = dataclasses.field(default_factory=Magnitude)
    granularity: Granularity = dataclasses.field(default_factory=Unstructured)
    distribution: Distribution = dataclasses.field(default_factory=Uniform)
    rules: Sequence[Rule] = ()
    dynamic: SET | RigL | None = None

    def __post_init__(self):
        if self.sparsity is None:
            raise ValueError("Pruner sparsity must be a float in [0, 1) or a schedule, got None")
        _check_spec(self.sparsity, "Pruner sparsity")
        object.__setattr__(self, "score", as_score(self.score))
        if not isinstance(self.granularity, Granularity):
            raise ValueError(f"Pruner granularity must be a Granularity, got {self.granularity!r}")
        if not isinstance(self.distribution, Distribution):
            raise ValueError(
                f"Pruner distribution must be a Distribution, got {self.distribution!r}")
        rules = self.rules
        if isinstance(rules, Rule):
            rules = (rules,)
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"Pruner rules must be a Rule or a list of Rules, got {rules!r}")
        rules = tuple(rules)
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ValueError(f"Pruner rules must be Rule instances, got {rule!r}")
        object.__setattr__(self, "rules", rules)
        if self.dynamic is not None and not isinstance(self.dynamic, (SET, RigL)):
            raise ValueError(f"Pruner dynamic must be SET(...) or RigL(...), got {self.dynamic!r}")
        for index in range(len(rules) + 1):
            granularity, _, distribution, spec = self.settings(index)
            if isinstance(granularity, NM) and not isinstance(distribution, Uniform):
                raise ValueError(
                    f"N:M sparsity is fixed at {granularity.n}:{granularity.m}; it cannot be "
                    f"spread by {type(distribution).__name__} (use Uniform)"
                )
            # Only where the level sets the sparsity itself (a rule that inherits the pruner's
            # sparsity while switching to N:M says "prune this layer N:M", not "at that
            # sparsity"; one that sets a sparsity under an inherited N:M means that sparsity).
            explicit = index == len(rules) or rules[index].sparsity is not None
            if (explicit and isinstance(granularity, NM) and not callable(spec)
                    and float(spec) not in (0.0, granularity.sparsity)):
                raise ValueError(
                    f"N:M sparsity is fixed at {granularity.n}:{granularity.m} (sparsity "
                    f"{granularity.sparsity:g} in whole groups); sparsity={spec!r} cannot be met: "
                    f"pass sparsity={granularity.sparsity:g}, or a schedule (any value > 0 turns "
                    "N:M on)")
            if self.dynamic is not None and not isinstance(granularity, Unstructured):
                raise ValueError(
                    f"dynamic sparse training changes single weights; it cannot run with "
                    f"{granularity!r}"
                )

    def settings(self, index: int) -> tuple[Granularity, Score, Distribution, SparsitySpec]:
        """(granularity, score, distribution, sparsity) of rule `index` (len(rules): defaults)."""
        rule = self.rules[index] if index < len(self.rules) else Rule(where=None)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return (
            pick(rule.granularity, self.granularity),
            pick(rule.score, self.score),
            pick(rule.distribution, self.distribution),
            pick(rule.sparsity, self.sparsity),
        )

    @property
    def needs_key(self) -> bool:
        """True when a random key is needed (Random scores or SET)."""
        scores = [self.settings(i)[1] for i in range(len(self.rules) + 1)]
        return isinstance(self.dynamic, SET) or any(s.needs_key for s in scores)


@dataclasses.dataclass(frozen=True)
class _Group:
    """The pruned leaves one rule configures, resolved against a params tree."""

    index: int
    positions: tuple[int, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    granularity: Granularity
    score: Score
    distribution: Distribution
    schedule: Callable[[Any], Any]

    def targets(self, step: jax.Array) -> jax.Array:
        """Per-leaf sparsities at `step`."""
        return self.distribution.leaf_sparsities(
            jnp.asarray(self.schedule(step), jnp.float32), step, self.paths, self.shapes)

    def subtree(self, treedef: Any, leaves: Sequence[Any]) -> Any:
        """The tree with this group's leaves and `None` elsewhere."""
        chosen = set(self.positions)
        return jax.tree.unflatten(
            treedef, [leaf if i in chosen else None for i, leaf in enumerate(leaves)])


def _probe(schedule: Callable[[Any], Any], what: str) -> None:
    for step in _PROBE_STEPS:
        # Evaluated now, also while a train step is being traced.
        with jax.ensure_compile_time_eval():
            array = np.asarray(schedule(step))
        if array.ndim != 0 or array.dtype.kind not in "iuf":
            raise ValueError(f"{what} must return a scalar sparsity; at step {step} it returned "
                             f"{array.dtype}{list(array.shape)}")
        value = float(array)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{what} gives sparsity {value!r} at step {step}; it must lie in "
                             "[0, 1)")


def resolve(params: Any, pruner: Pruner) -> tuple[list[_Group], Any, int]:
    """Groups the pruned leaves of `params` by rule; validates every setting against them.

    Returns:
      `(groups, treedef, num_leaves)`.

    Raises:
      ValueError: naming paths and values: `where` selecting nothing, a rule matching no pruned
        leaf, compressed or non-float leaves, and granularities that do not fit a leaf.
    """
    if not isinstance(pruner, Pruner):
        raise ValueError(f"expected a jaxcomp.sparsity.Pruner, got {pruner!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_compressed)
    paths = [key_path_str(k) for k, _ in flat]
    chosen = jax.tree.leaves(select(params, pruner.where))
    rule_flags = [jax.tree.leaves(select(params, rule.where, allow_empty=True))
                  for rule in pruner.rules]
    members: dict[int, list[int]] = {}
    for i, (path, (_, leaf)) in enumerate(zip(paths, flat)):
        if not chosen[i]:
            continue
        if is_compressed(leaf):
            raise ValueError(f"{path}: cannot prune a compressed leaf ({leaf.kind}); prune the "
                             "dense params first")
        dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
        # jnp, not np: numpy does not count bfloat16 and the float8 types as floating.
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{path}: only floating-point leaves can be pruned, got {dtype}")
        if 0 in np.shape(leaf):
            raise ValueError(f"{path}: an empty leaf (shape {np.shape(leaf)}) has nothing to "
                             "prune; leave it out of where=")
        index = next((r for r, flags in enumerate(rule_flags) if flags[i]), len(pruner.rules))
        members.setdefault(index, []).append(i)
    for r, rule in enumerate(pruner.rules):
        if r not in members:
            pruned = [paths[i] for i in range(len(paths)) if chosen[i]]
            earlier = [paths[i] for i in range(len(paths)) if chosen[i] and rule_flags[r][i]]
            reason = (f"the pruned leaves it matches ({', '.join(earlier[:10])}) are all taken by "
                      "an earlier rule" if earlier else
                      f"the pruned leaves (those Pruner.where selects) are {pruned[:20]}")
            raise ValueError(f"rule {r} (where={rule.where!r}) matches none of the pruned leaves: "
                             f"{reason}")
    groups = []
    pruned_paths = {paths[i] for positions in members.values() for i in positions}
    for index in sorted(members):
        positions = tuple(members[index])
        granularity, score, distribution, spec = pruner.settings(index)
        group_paths = tuple(paths[i] for i in positions)
        shapes = tuple(tuple(np.shape(flat[i][1])) for i in positions)
        for path, shape in zip(group_paths, shapes):
            granularity.check(path, shape)
        distribution = distribution.for_leaves(group_paths, pruned_paths)
        schedule = spec if callable(spec) else constant_sparsity(spec)
        if callable(spec):
            _probe(spec, f"the sparsity schedule of rule {index}")
        for path, value in getattr(distribution, "sparsities", {}).items():
            if callable(value):
                _probe(value, f"the PerPath schedule of {path!r}")
        groups.append(_Group(index, positions, group_paths, shapes, granularity, score,
                             distribution, schedule))
    return groups, treedef, len(flat)


def check_pruned_leaves(groups: Sequence[_Group], params: Sequence[Any], others: Sequence[Any],
                        what: str, *, exact_shape: bool = True) -> None:
    """Raises `ValueError` naming the path when `others` (flat, like `params`) holds `None` at
    a pruned leaf or, with `exact_shape`, an array of another shape than the param's."""
    for group in groups:
        for i, path in zip(group.positions, group.paths):
            shape = tuple(np.shape(params[i]))
            if others[i] is None:
                raise ValueError(f"{path}: {what}: None at a pruned leaf (the param has shape "
                                 f"{shape})")
            if exact_shape and tuple(np.shape(others[i])) != shape:
                raise ValueError(f"{path}: {what}: shape {tuple(np.shape(others[i]))} does not "
                                 f"match the param's {shape}")


def _scores(group: _Group, treedef: Any, params: Sequence[Any], grads: Sequence[Any] | None,
            state: Any, key: jax.Array | None,
            previous: Sequence[Any] | None) -> list[jax.Array]:
    """The float32 scores of one group's leaves, validated against the params."""
    sub_grads = None if grads is None else group.subtree(treedef, grads)
    scores_tree = group.score(group.subtree(treedef, params), sub_grads, state, key)
    try:
        score_leaves = treedef.flatten_up_to(scores_tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"the score of rule {group.index} returned a tree that does not match the params: {e}"
        ) from e
    scores = []
    for i, path in zip(group.positions, group.paths):
        s = score_leaves[i]
        shape = tuple(np.shape(params[i]))
        if s is None or tuple(np.shape(s)) != shape:
            raise ValueError(f"{path}: the score has shape {None if s is None else np.shape(s)}, "
                             f"the param {shape}")
        s = jnp.asarray(s, jnp.float32)
        if previous is not None:
            s = jnp.where(previous[i], s, -jnp.inf)
        scores.append(s)
    return scores


def all_masks(
    groups: Sequence[_Group],
    treedef: Any,
    params: Sequence[Any],
    grads: Sequence[Any] | None,
    states: Sequence[Any],
    keys: Sequence[jax.Array | None],
    step: jax.Array,
    previous: Sequence[Any] | None = None,
) -> list[list[jax.Array]]:
    """Keep-masks of every group's leaves (each in `group.positions` order).

    Every leaf keeps at least one unit. All thresholds are searched together, in one program.
    With `previous` masks, weights they prune score lowest, so masks only shrink while the
    target does not decrease (pruned weights are zero, and stay pruned).
    """
    units, unit_groups, weights, ks, plan = [], [], [], [], []
    for group, state, key in zip(groups, states, keys):
        scores = _scores(group, treedef, params, grads, state, key, previous)
        targets = group.targets(step)
        granularity = group.granularity
        if isinstance(granularity, NM):
            plan.append([jnp.where(targets[j] > 0, granularity.select(s), True)
                         for j, s in enumerate(scores)])
            continue
        pooled = [granularity.pool(s) for s in scores]
        plan.append(len(units))
        if group.distribution.shared_threshold:
            sizes = [granularity.unit_sizes(shape) for shape in group.shapes]
            # Each leaf keeps its best unit: the target is capped at what the others hold.
            pooled, best = zip(*(keep_best(u) for u in pooled))
            # One unit each; its size is known without a reduction unless units differ in size.
            kept = sum(int(w.flat[0]) if np.all(w == w.flat[0]) else jnp.sum(jnp.where(b, w, 0))
                       for w, b in zip(sizes, best))
            total = sum(int(w.sum()) for w in sizes)
            ks.append(jnp.minimum(jnp.round(targets[0] * total), total - kept))
            unit_groups += [len(ks) - 1] * len(pooled)
            weights += sizes
        else:
            for j, u in enumerate(pooled):
                ks.append(pruned_units(targets[j], u.size))
                unit_groups.append(len(ks) - 1)
                weights.append(1)
        units += pooled
    pruned = []
    if units:
        k = jnp.stack(ks).astype(jnp.int32)
        pruned = lowest_k(units, k, groups=unit_groups, weights=weights)
    out = []
    for group, entry in zip(groups, plan):
        if isinstance(entry, list):
            out.append(entry)
        else:
            out.append([group.granularity.expand(~pruned[entry + j], shape)
                        for j, shape in enumerate(group.shapes)])
    return out


def _rule_key(key: jax.Array | None, index: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, index)


def compute_masks(
    params: Any,
    pruner: Pruner,
    *,
    grads: Any = None,
    key: jax.Array | None = None,
    step: int | jax.Array | None = None,
    masks: Any = None,
) -> Any:
    """The masks `pruner` gives `params` now (no optimizer, no state).

    Scores with state (movement, Taylor) accumulate `grads` once. Works under `jit`, so it can
    run inside a loss for straight-through pruning (see `pruned_forward`).

    Args:
      params: the parameter tree.
      pruner: the configuration.
      grads: gradients with the structure of `params`, for gradient-based scores.
      key: a `jax.random` key, for `Random` scores.
      step: the step at which schedules are evaluated; needed when a sparsity is a schedule.
      masks: previous masks: the weights they prune score lowest, so they stay pruned unless
        the target is below the previous sparsity (then the best of them come back).

    Returns:
      A mask tree: bool keep-masks at the pruned leaves, `None` elsewhere.

    Raises:
      ValueError: for bad configuration or inputs, naming the path and value (see `resolve`),
        grads not shaped like the params or masks with `None` at a pruned leaf, a schedule
        without `step`, or a score that needs `grads` or `key` without them.

    Example:
        >>> masks = compute_masks({"kernel": jnp.array([3., 1., 2., 4.])}, Pruner(sparsity=0.5))
        >>> masks["kernel"]
        Array([ True, False, False,  True], dtype=bool)
    """
    groups, treedef, _ = resolve(params, pruner)
    if grads is not None:
        assert_same_structure(params, grads, what="grads")
    if masks is not None:
        mask_leaves(params, masks)
    if step is None:
        for group in groups:
            _, _, distribution, spec = pruner.settings(group.index)
            per_path = getattr(distribution, "sparsities", {})
            if callable(spec) or any(callable(v) for v in per_path.values()):
                raise ValueError(
                    f"rule {group.index} has a sparsity schedule: pass step= to evaluate it")
        step = 0
    for group in groups:
        name = type(group.score).__name__
        if group.score.needs_grads and grads is None:
            raise ValueError(f"the {name} score of rule {group.index} needs grads=")
        if group.score.needs_key and key is None:
            raise ValueError(f"the {name} score of rule {group.index} needs key=")
    if not isinstance(step, jax.core.Tracer):
        check_step(step, "step")
        # A concrete step: the schedules' values there are checked, not silently clipped.
        for group in groups:
            with jax.ensure_compile_time_eval():
                values = np.asarray(group.targets(jnp.asarray(step, jnp.int32)))
            for path, value in zip(group.paths, values):
                check_sparsity(float(value),
                               f"{path}: the sparsity of rule {group.index} at step {int(step)}")
    step = jnp.asarray(step, jnp.int32)
    leaves = treedef.flatten_up_to(params)
    grad_leaves = None if grads is None else treedef.flatten_up_to(grads)
    if grad_leaves is not None:
        check_pruned_leaves(groups, leaves, grad_leaves, "grads")
    previous = None
    if masks is not None:
        previous = [None if m is None else jnp.broadcast_to(m.astype(bool), np.shape(p))
                    for _, p, m in mask_leaves(params, masks)]
        check_pruned_leaves(groups, leaves, previous, "masks=", exact_shape=False)
    states = []
    for group in groups:
        sub_params = group.subtree(treedef, leaves)
        state = group.score.init(sub_params)
        if grad_leaves is not None:
            state = group.score.accumulate(state, sub_params, group.subtree(treedef, grad_leaves))
        states.append(state)
    keys = [_rule_key(key, group.index) for group in groups]
    out: list[Any] = [None] * len(leaves)
    for group, kept in zip(groups, all_masks(groups, treedef, leaves, grad_leaves, states, keys,
                                             step, previous)):
        for i, mask in zip(group.positions, kept):
            out[i] = mask
    return jax.tree.unflatten(treedef, out)


def prune_now(
    params: Any,
    pruner: Pruner,
    grads: Any = None,
    key: jax.Array | None = None,
    *,
    step: int | jax.Array | None = None,
) -> tuple[Any, Any]:
    """One-shot pruning: the params with pruned weights at zero, and the masks.

    Args:
      params: the parameter tree.
      pruner: the configuration (a float sparsity, or a schedule evaluated at `step`).
      grads: gradients for gradient-based scores (SNIP: `Saliency()` on one batch at init).
      key: a `jax.random` key for `Random` scores.
      step: where to evaluate sparsity schedules.

    Returns:
      `(pruned_params, masks)`.

    Raises:
      ValueError: as `compute_masks`.

    Example:
        >>> pruned, masks = prune_now({"kernel": jnp.array([3., -1., 2., 4.])}, Pruner(sparsity=0.25))
        >>> pruned["kernel"]
        Array([3., 0., 2., 4.], dtype=float32)
    """
    masks = compute_masks(params, pruner, grads=grads, key=key, step=step)
    return apply_masks(params, masks), masks

