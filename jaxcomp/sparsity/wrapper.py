"""`prune(optimizer, pruner)`: pruning as an optax transformation around any optimizer.

One call site in the train step. The wrapped optimizer's updates already carry the masks:
they are `where(keep, p + u, 0) - p`, so a single `optax.apply_updates(params, updates)` leaves
pruned weights at exactly zero. There is no second call to forget.

On the steps where the scheduled sparsity changes (or SET/RigL update the topology) a
`lax.switch` recomputes the masks; on the other steps it passes them through, so nothing
recompiles and no Python code branches on traced values. The inner optimizer's state of pruned
and regrown weights is reset to its initial value (`optimizer.init`'s: zero for Adam's moments)
before every update, through `optax.tree_utils.tree_map_params`, which finds the params-shaped
parts of any optax state (chains, `MultiSteps`, `inject_hyperparams`, `masked`, ...) without
knowing their classes; a state it cannot map (SM3's, a line search's) has its subtrees with the
params' structure and shapes reset.

Example:
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., -4.], [0.5, 2.]]), "bias": jnp.ones(2)}}
    >>> tx = prune(optax.sgd(0.1), Pruner(sparsity=0.5))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["Dense_0"]["kernel"]
    Array([[ 0., -4.],
           [ 0.,  2.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxcomp.sparsity._select import any_of
from jaxcomp.sparsity.dynamic import SET, drop_and_grow
from jaxcomp.sparsity.pruner import Pruner, _rule_key, all_masks, check_pruned_leaves, resolve
from jaxcomp.tree import assert_same_structure

__all__ = ["PruneState", "masks_of", "prune"]


class PruneState(NamedTuple):
    """State of `prune`; arrays only, so it jits, shards and checkpoints as is.

    Attributes:
      count: int32, updates done so far: the step the schedules see.
      masks: the mask tree: bool keep-masks at the pruned leaves (with their params' shape and
        sharding), `None` elsewhere.
      inner_state: the wrapped optimizer's state.
      score_state: one entry per rule: the state of its score (`()` for stateless scores, e.g.
        the accumulated movement for `Movement()`).
      key: uint32 key data for random scores and SET, split on every mask update (`None` when
        no randomness is used).

    Example:
        >>> state = prune(optax.sgd(0.1), Pruner(sparsity=0.5)).init({"kernel": jnp.ones(4)})
        >>> int(state.count), state.key is None
        (0, True)
    """

    count: jax.Array
    masks: Any
    inner_state: optax.OptState
    score_state: tuple[Any, ...]
    key: jax.Array | None


def _key_data(key: jax.Array | None) -> jax.Array | None:
    if key is None:
        return None
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"key must be a jax.random key, got an array of dtype {key.dtype}")
    return key


class _Kept:
    """Marks an optimizer-state entry to reset, holding its keep-mask (a leaf, not a pytree)."""

    def __init__(self, mask: jax.Array):
        self.mask = mask


def _reset_moments(optimizer: Any, inner_state: Any, fresh: Any, treedef: Any,
                   keep: list[Any]) -> Any:
    """Sets the optimizer-state entries of weights not kept (`keep` False; `None` for a leaf
    left alone) back to their values in `fresh`, a state from `optimizer.init` (zero for
    Adam's moments, `initial_accumulator_value` for Adagrad's).

    Entries whose shape is not the param's (Adafactor's factored moments) are left as they are.
    `tree_map_params` finds the params-shaped parts of states that its `init` rebuilds; states
    it cannot map (SM3's per-axis accumulators) are searched for subtrees with the params'
    structure and shapes instead.
    """

    def applies(value, kept):
        return kept is not None and getattr(value, "shape", None) == kept.shape

    def reset(value, initial, kept):
        if not applies(value, kept):
            return value
        return jnp.where(kept, value, jnp.asarray(initial, value.dtype))

    def mark(value, kept):
        return _Kept(kept) if applies(value, kept) else value

    leaves, state_def = jax.tree.flatten(inner_state)
    try:
        marks = state_def.flatten_up_to(optax.tree_utils.tree_map_params(
            optimizer, mark, inner_state, jax.tree.unflatten(treedef, keep),
            is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode),
        ))
        initial = state_def.flatten_up_to(fresh)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        # An `init` that reads the params' values (a line search indexes its first leaf) cannot
        # run on tree_map_params' placeholder: fall back to the structural search below.
        pass
    else:
        return jax.tree.unflatten(state_def, [
            reset(v, f, m.mask) if isinstance(m, _Kept) else v
            for v, f, m in zip(leaves, initial, marks)])

    def params_shaped(node):
        try:
            values = treedef.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        return all(kept is None or applies(value, kept) for value, kept in zip(values, keep))

    def reset_subtree(node, initial):
        if not params_shaped(node):
            return node
        values, initial = treedef.flatten_up_to(node), treedef.flatten_up_to(initial)
        return jax.tree.unflatten(treedef, [reset(v, f, k)
                                            for v, f, k in zip(values, initial, keep)])

    return jax.tree.map(reset_subtree, inner_state, fresh, is_leaf=params_shaped)


def _check_params(params: Any) -> None:
    if params is None:
        raise ValueError("prune(...).update needs params: call update(grads, state, params)")
    if isinstance(params, optax.LookaheadParams):
        raise ValueError(
            "prune does not support optax.lookahead: its params (LookaheadParams) hold a fast "
            "and a slow copy of every weight, which would be pruned with separate masks")


def prune(
    optimizer: optax.GradientTransformation,
    pruner: Pruner,
    *,
    key: jax.Array | None = None,
    straight_through: bool = False,
    update_every: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps `optimizer` so that its updates prune the params on `pruner`'s schedule.

    `update(grads, state, params, **extra_args)` needs `params`; extra arguments are passed to
    the inner optimizer. Scores with state (movement, Taylor) accumulate on every step.

    `prune` must be the last transformation applied to the updates: put the whole optimizer
    inside it (`prune(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), pruner)`).
    A transformation chained after it (`optax.chain(prune(...), optax.scale(...))`,
    `optax.ema`) rescales the `-p` that zeroes the pruned weights, and they come back.
    Wrappers that pass the updates through unchanged on average (`optax.MultiSteps`,
    `optax.inject_hyperparams` around `prune`) are fine.

    Args:
      optimizer: any optax transformation.
      pruner: what, how much, how and when to prune.
      key: a `jax.random` key, needed for `Random()` scores and `SET`.
      straight_through: recompute the masks on schedule but leave the weights dense and the
        inner updates unmasked; use `pruned_forward(params, masks_of(state))` in the loss.
        Masks are then not nested: a pruned weight can come back.
      update_every: also recompute the masks every this many steps, whatever the schedule does
        (e.g. `1` for SR-STE-style N:M training at a constant sparsity). Default: every step
        with `straight_through` (the masks follow the dense weights), otherwise only on the
        steps where the scheduled sparsity changes (nested masks at a constant target would
        not change anyway).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `PruneState`.

    Raises:
      ValueError: at construction, for a missing key, an optimizer that is not an optax
        transformation, or dynamic sparse training with `straight_through`; at `init`/`update`,
        for settings that do not fit the params (naming path and value), a missing `params`, or
        `optax.lookahead`'s params (a fast and a slow copy of each weight).

    Example:
        >>> from jaxcomp.sparsity import polynomial_sparsity
        >>> tx = prune(optax.adam(1e-3), Pruner(sparsity=polynomial_sparsity(
        ...     0.9, begin_step=0, end_step=1000, frequency=100)))
    """
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(f"prune expects an optax GradientTransformation, got {optimizer!r}")
    if not isinstance(pruner, Pruner):
        raise ValueError(f"prune expects a jaxcomp.sparsity.Pruner, got {pruner!r}")
    if pruner.needs_key and key is None:
        raise ValueError("this pruner uses randomness (Random scores or SET): pass key=")
    if straight_through and pruner.dynamic is not None:
        raise ValueError("dynamic sparse training cannot run with straight_through=True")
    if update_every is not None and pruner.dynamic is not None:
        raise ValueError("update_every does not apply to dynamic sparse training: SET and RigL "
                         "update the topology on their own schedule (their update_every)")
    if update_every is None:
        update_every = 1 if straight_through else 0
    elif isinstance(update_every, bool) or not isinstance(update_every, (int, np.integer)) or (
            update_every < 1):
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
    update_every = int(update_every)
    key_data = _key_data(key)
    # The state holds raw key data (it checkpoints as a plain array); the implementation (the
    # default threefry, or rbg, ...) is static and re-applied when the key is unwrapped.
    key_impl = (jax.random.key_impl(key) if key is not None
                and jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) else None)
    dynamic = pruner.dynamic

    def init_fn(params: optax.Params) -> PruneState:
        _check_params(params)
        groups, treedef, num_leaves = resolve(params, pruner)
        leaves = treedef.flatten_up_to(params)
        masks: list[Any] = [None] * num_leaves
        for group in groups:
            for i in group.positions:
                masks[i] = jnp.ones_like(leaves[i], dtype=bool)
        score_state = tuple(group.score.init(group.subtree(treedef, leaves)) for group in groups)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=jax.tree.unflatten(treedef, masks),
            inner_state=optimizer.init(params),
            score_state=score_state,
            key=key_data,
        )

    def update_fn(updates, state: PruneState, params=None, **extra_args):
        _check_params(params)
        groups, treedef, num_leaves = resolve(params, pruner)
        assert_same_structure(params, updates, what="the gradients")
        p_leaves = treedef.flatten_up_to(params)
        g_leaves = treedef.flatten_up_to(updates)
        check_pruned_leaves(groups, p_leaves, g_leaves, "the gradients")
        try:
            old_masks = treedef.flatten_up_to(state.masks)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the PruneState's masks do not match the params (was the state "
                             f"built from other params?): {e}") from e
        check_pruned_leaves(groups, p_leaves, old_masks, "the PruneState's masks (was the state "
                            "built from other params?)")
        count = state.count
        score_state = tuple(
            group.score.accumulate(st, group.subtree(treedef, p_leaves),
                                   group.subtree(treedef, g_leaves))
            for group, st in zip(groups, state.score_state)
        )
        selected = [i for group in groups for i in group.positions]

        changed = jnp.zeros((), bool)
        for group in groups:
            now = group.targets(count)
            before = jnp.where(count > 0, group.targets(count - 1), 0.0)
            changed = changed | any_of(now != before)
        if update_every:
            changed = changed | (count % update_every == 0)
        branch = jnp.where(changed, 1, 0)
        if dynamic is not None:
            branch = jnp.where(changed, 1, jnp.where(dynamic.is_update_step(count), 2, 0))

        def split_key(key):
            if key is None:
                return None, None
            next_key, use = jax.random.split(jax.random.wrap_key_data(key, impl=key_impl))
            return jax.random.key_data(next_key), use

        # Only masks and the key go through the switch; params and gradients are read inside.
        # Masks are scored on the params this step starts from (its gradients were taken there).
        def recompute(operands):
            masks, key = operands
            key, use = split_key(key)
            previous = None if straight_through else masks
            new = list(masks)
            keys = [_rule_key(use, group.index) for group in groups]
            for group, kept in zip(groups, all_masks(groups, treedef, p_leaves, g_leaves,
                                                     score_state, keys, count, previous)):
                for i, mask in zip(group.positions, kept):
                    new[i] = mask
            return new, key

        def drop_grow(operands):
            masks, key = operands
            key, use = split_key(key)
            grown = drop_and_grow(
                [p_leaves[i] for i in selected], [g_leaves[i] for i in selected],
                [masks[i] for i in selected], dynamic.fraction(count),
                key=use if isinstance(dynamic, SET) else None,
            )
            new = list(masks)
            for i, mask in zip(selected, grown):
                new[i] = mask
            return new, key

        branches = [lambda operands: operands, recompute]
        branches += [drop_grow] if dynamic is not None else []
        new_masks, key = lax.switch(branch, branches, (old_masks, state.key))

        inner_state = state.inner_state
        # Weights kept before and after this step; the others (pruned, regrown) end at zero.
        keep = {i: new_masks[i] & old_masks[i] for i in selected} if not straight_through else {}
        if not straight_through:
            # The optimizer-state entries of weights not kept go back to their initial values
            # (zero for Adam's moments) before the inner update, on every step: weights pruned
            # now add nothing to it, a regrown weight starts from a fresh state, and whatever
            # the optimizer did to a pruned weight's state on the last step is undone. The
            # selects fuse into the optimizer's own passes, which read only the keep-mask. (A
            # reset after the update too would also undo the one zero-gradient step a regrown
            # weight's state takes on the step it comes back, for RMSProp's decaying scale;
            # it cost 10% more on the benchmark's amortized step, measured.)
            # A state that starts from the params (schedule-free's) starts from zero there.
            zeroed = list(p_leaves)
            for i, k in keep.items():
                zeroed[i] = jnp.where(k, p_leaves[i], jnp.zeros((), p_leaves[i].dtype))
            fresh = optimizer.init(jax.tree.unflatten(treedef, zeroed))
            inner_state = _reset_moments(optimizer, inner_state, fresh, treedef,
                                         [keep.get(i) for i in range(num_leaves)])
            # The inner optimizer sees zero gradients at pruned weights: their moments stay
            # zero, and whole-tensor statistics (a global-norm clip, LAMB's trust ratio) count
            # only the weights that train.
            masked = list(g_leaves)
            for i, k in keep.items():
                masked[i] = jnp.where(k, g_leaves[i], jnp.zeros((), g_leaves[i].dtype))
            updates = jax.tree.unflatten(treedef, masked)
        inner_updates, inner_state = optimizer.update(updates, inner_state, params, **extra_args)
        out = treedef.flatten_up_to(inner_updates)
        for i, k in keep.items():
            # Pruned and regrown weights both end at exactly zero (p + (-p) == 0 exactly);
            # kept weights get the inner update untouched, in its dtype promoted with the
            # param's: a float32 update of a bfloat16 weight is rounded once, by apply_updates,
            # as without the wrapper (which casts the sum back to the param's dtype).
            out[i] = jnp.where(k, out[i], -p_leaves[i])
        new_state = PruneState(
            count=count + 1,
            masks=jax.tree.unflatten(treedef, new_masks),
            inner_state=inner_state,
            score_state=score_state,
            key=key,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mappings(tree: Any) -> list[Any]:
    """Every mapping node of `tree` (dicts, NNX `State`s), outermost first. Not a
    `jax.tree.leaves(..., is_leaf=...)`: an NNX `State` flattens all its levels at once, so its
    nested `State`s never reach `is_leaf`."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            out.append(node)
            todo.extend(node.values())
        elif isinstance(node, (list, tuple)):
            todo.extend(node)
    return out


def masks_of(opt_state: Any) -> Any:
    """The mask tree held by the one `PruneState` inside `opt_state` (searched recursively).

    `opt_state` may also be `nnx.state(optimizer)` of an `nnx.Optimizer`, where the state is a
    mapping of the `PruneState`'s fields.

    Raises:
      ValueError: if `opt_state` holds no `PruneState`, or more than one.

    Example:
        >>> params = {"kernel": jnp.array([1., -3.])}
        >>> state = prune(optax.sgd(0.1), Pruner(sparsity=0.5)).init(params)
        >>> masks_of(state)["kernel"]
        Array([ True,  True], dtype=bool)
    """
    found = [
        leaf for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(leaf, PruneState)
    ]
    if not found:
        # `nnx.state(optimizer)` turns the NamedTuple into an NNX State of its fields (a user's
        # own dict with such keys is not a PruneState).
        from flax import nnx

        found = [node for node in _mappings(opt_state) if isinstance(node, nnx.State)
                 and {"count", "masks", "inner_state"} <= set(node.keys())
                 and set(node.keys()) <= set(PruneState._fields)]
        found = [PruneState(node["count"], node["masks"], node["inner_state"], (), None)
                 for node in found]
    if len(found) != 1:
        raise ValueError(f"expected exactly one PruneState in the optimizer state, found "
                         f"{len(found)}")
    return found[0].masks
