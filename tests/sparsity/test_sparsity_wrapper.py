"""The optax wrapper: one call site, exact zeros, schedules, any optimizer, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxcomp.sparsity as sp

_X = jax.random.normal(jax.random.key(1), (16, 6))
_Y = jax.random.normal(jax.random.key(2), (16, 4))


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "a": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jax.random.normal(k2, (8, 4))},
    }


def _loss(params):
    hidden = jnp.tanh(_X @ params["a"]["kernel"] + params["a"]["bias"])
    return jnp.mean((hidden @ params["b"]["kernel"] - _Y) ** 2)


def _trainer(tx):
    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


_SCHEDULE = sp.polynomial_sparsity(0.75, begin_step=0, end_step=8, frequency=2)
_TX = sp.prune(optax.adam(0.05), sp.Pruner(sparsity=_SCHEDULE))
_STEP = _trainer(_TX)


def _run(steps, params=None, state=None):
    params = _params() if params is None else params
    state = _TX.init(params) if state is None else state
    history = []
    for _ in range(steps):
        params, state = _STEP(params, state)
        history.append((params, state))
    return history


_HISTORY = _run(12)


def test_one_apply_updates_leaves_pruned_weights_at_exactly_zero():
    """After every step, weights whose mask is False are exactly 0 and the rest nonzero."""
    for params, state in _HISTORY:
        for path in ("a", "b"):
            mask = np.asarray(state.masks[path]["kernel"])
            kernel = np.asarray(params[path]["kernel"])
            assert np.all(kernel[~mask] == 0.0)
            assert np.all(kernel[mask] != 0.0)
        assert state.masks["a"]["bias"] is None


def test_sparsity_follows_the_schedule_exactly():
    """Each kernel has exactly round(s_t * n) zeros at every step t."""
    for t, (params, _) in enumerate(_HISTORY):
        target = float(_SCHEDULE(t))
        for path in ("a", "b"):
            zeros = int((np.asarray(params[path]["kernel"]) == 0).sum())
            assert zeros == round(target * params[path]["kernel"].size)


def test_masks_change_only_where_the_schedule_changes_and_are_nested():
    """Masks change only at steps where s_t != s_(t-1), and only ever shrink."""
    previous = jax.tree.map(lambda m: np.ones(m.shape, bool), _HISTORY[0][1].masks)
    for t, (_, state) in enumerate(_HISTORY):
        changed = float(_SCHEDULE(t)) != (float(_SCHEDULE(t - 1)) if t else 0.0)
        for path in ("a", "b"):
            now = np.asarray(state.masks[path]["kernel"])
            before = previous[path]["kernel"]
            if not changed:
                np.testing.assert_array_equal(now, before)
            assert not np.any(now & ~before)
        previous = jax.tree.map(np.asarray, state.masks)


def test_update_steps_do_not_recompile():
    """The jitted step compiles once: mask updates happen under lax.switch."""
    assert _STEP._cache_size() == 1


def test_moments_of_pruned_weights_are_reset_and_stay_zero():
    """On a pruning step the newly pruned weights' moments are reset, and the inner optimizer
    sees zero gradients at every pruned weight: their moments are exactly zero from then on,
    while kept weights' moments are Adam's."""
    before_params, before_state = _HISTORY[1]
    after_params, after_state = _HISTORY[2]
    newly = np.asarray(before_state.masks["a"]["kernel"]) & ~np.asarray(
        after_state.masks["a"]["kernel"])
    assert newly.any()
    for _, state in _HISTORY[2:]:
        pruned = ~np.asarray(state.masks["a"]["kernel"])
        for moment in (state.inner_state[0].mu, state.inner_state[0].nu):
            assert np.all(np.asarray(moment["a"]["kernel"])[pruned] == 0)
    kept = np.asarray(after_state.masks["a"]["kernel"])
    assert np.all(np.asarray(after_state.inner_state[0].nu["a"]["kernel"])[kept] > 0)


def test_moments_of_pruned_weights_are_held_at_zero_even_if_the_optimizer_moves_them():
    """Weight decay inside the optimizer feeds `wd * p` into Adam on the pruning step, while the
    newly pruned weights are still nonzero; from the next step on their moments are zero again
    and stay there, as for any pruned weight."""
    tx = sp.prune(optax.chain(optax.add_decayed_weights(0.5), optax.adam(0.05)),
                  sp.Pruner(sparsity=sp.one_shot_sparsity(0.5, step=1)))
    step = _trainer(tx)
    params, state = _params(), tx.init(_params())
    for i in range(5):
        params, state = step(params, state)
        pruned = ~np.asarray(state.masks["a"]["kernel"])
        assert pruned.any() == (i >= 1)
        mu = np.asarray(state.inner_state[1][0].mu["a"]["kernel"])
        if i == 1:  # the pruning step: the decay term reached Adam after the reset
            assert np.any(mu[pruned] != 0)
        elif i > 1:
            assert np.all(mu[pruned] == 0)
        assert np.all(np.asarray(params["a"]["kernel"])[pruned] == 0)


@pytest.mark.parametrize("name", ["adagrad", "rmsprop"])
def test_a_regrown_weight_starts_from_the_optimizers_initial_state(name):
    """A weight that comes back (the target decreases) starts from a fresh optimizer state:
    Adagrad's accumulator and RMSProp's scale at their initial values, not at zero (regression:
    32x and 300x too large a first step). Adagrad's first step is then a fresh optimizer's;
    RMSProp's scale decays once more (0.9 of 1.0), on the step the weight comes back at zero."""
    lr, g = 0.1, 1e-2
    if name == "adagrad":
        inner = optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)
        first = -lr * g / np.sqrt(0.1 + g * g + 1e-7)
    else:
        inner = optax.rmsprop(lr, decay=0.9, eps=1e-8, initial_scale=1.0)
        first = -lr * g / (np.sqrt(0.9 * 0.9 + 0.1 * g * g) + 1e-8)
    tx = sp.prune(inner, sp.Pruner(sparsity=lambda t: jnp.where(t < 2, 0.5, 0.25), where="k"))
    params = {"k": jnp.array([[4.0, 3.0], [2.0, 1.0]])}
    grads = {"k": jnp.full((2, 2), g)}
    state = tx.init(params)
    for _ in range(3):  # two pruned at step 0, one of them back (at zero) at step 2
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    regrown = np.asarray(sp.masks_of(state)["k"]) & np.array([[False, False], [True, True]])
    assert regrown.sum() == 1 and np.all(np.asarray(params["k"])[regrown] == 0.0)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["k"])[regrown], [first], rtol=1e-5)


def test_a_line_search_optimizer_is_wrapped():
    """L-BFGS's line search reads its params in `init`, so tree_map_params cannot map its state
    (regression: an IndexError on every update); the structural search resets it instead."""
    tx = sp.prune(optax.lbfgs(), sp.Pruner(sparsity=sp.one_shot_sparsity(0.5, step=1)))
    value_and_grad = optax.value_and_grad_from_state(_loss)

    @jax.jit
    def step(params, state):
        value, grads = value_and_grad(params, state=state)
        updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=_loss)
        return optax.apply_updates(params, updates), state, value

    params, state = _params(), tx.init(_params())
    losses = []
    for _ in range(6):
        params, state, value = step(params, state)
        losses.append(float(value))
    kernel, mask = np.asarray(params["a"]["kernel"]), np.asarray(state.masks["a"]["kernel"])
    assert mask.mean() == 0.5 and np.all(kernel[~mask] == 0) and np.all(np.isfinite(losses))
    assert losses[-1] < losses[1]


def test_lookahead_is_refused_with_a_reason():
    """`optax.lookahead` params hold two copies of every weight: a clear error, not a pytree
    mismatch from deep inside optax."""
    tx = sp.prune(optax.lookahead(optax.adam(0.05), 5, 0.5), sp.Pruner(sparsity=0.5))
    params = optax.LookaheadParams.init_synced(_params())
    with pytest.raises(ValueError, match="does not support optax.lookahead"):
        tx.init(params)
    state = _TX.init(_params())
    with pytest.raises(ValueError, match="does not support optax.lookahead"):
        _TX.update(params, state, params)


def test_orbax_checkpoint_mid_schedule_resumes_bit_identically(tmp_path):
    """Save params and PruneState mid-schedule, restore, continue: identical to no interruption."""
    params, state = _HISTORY[4]
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    resumed = _run(7, restored["params"], restored["opt_state"])
    final_params, final_state = resumed[-1]
    expected_params, expected_state = _HISTORY[-1]
    jax.tree.map(np.testing.assert_array_equal, final_params, expected_params)
    jax.tree.map(np.testing.assert_array_equal, final_state.masks, expected_state.masks)
    jax.tree.map(np.testing.assert_array_equal, final_state.inner_state,
                 expected_state.inner_state)


_MASK_TREE = {"a": {"kernel": True, "bias": False}, "b": {"kernel": True}}
_OPTIMIZERS = {
    "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)),
    "multisteps": optax.MultiSteps(optax.adam(0.05), every_k_schedule=2),
    "inject_hyperparams": optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
    "lion": optax.lion(0.01),
    "adafactor": optax.adafactor(0.05, min_dim_size_to_factor=4),
    "masked": optax.masked(optax.adam(0.05), _MASK_TREE),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_any_optax_optimizer_keeps_zeros_and_resets_changed_moments(name):
    """Every optimizer: pruned weights exactly zero; state of changed weights was reset."""
    inner = _OPTIMIZERS[name]
    pruner = sp.Pruner(sparsity=sp.one_shot_sparsity(0.5, step=2), granularity=sp.NM(n=2, m=4, axis=-1))
    tx = sp.prune(inner, pruner)
    step = _trainer(tx)
    params, state = _params(), tx.init(_params())
    for _ in range(2):
        params, state = step(params, state)
    grads = jax.grad(_loss)(params)
    before = state
    params, state = step(params, state)
    changed = jax.tree.map(lambda a, b: a != b, state.masks, before.masks)
    for path in ("a", "b"):
        kernel = np.asarray(params[path]["kernel"])
        mask = np.asarray(state.masks[path]["kernel"])
        assert mask.mean() == 0.5 and np.all(kernel[~mask] == 0.0)
    # The inner optimizer must have stepped from a state with the changed entries zeroed, on
    # gradients that are zero at the pruned weights.
    keep = jax.tree.map(lambda a, b: a & b, state.masks, before.masks)
    grads = jax.tree.map(lambda g, k: g if k is None else jnp.where(k, g, 0.0), grads, keep,
                         is_leaf=lambda x: x is None)
    zeroed = optax.tree_utils.tree_map_params(
        inner,
        lambda s, c: s if c is None or s.shape != c.shape else jnp.where(c, 0, s),
        before.inner_state, changed,
        is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode),
    )
    _, expected = inner.update(grads, zeroed, params=jax.tree.map(lambda p: p, params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.inner_state, expected)


def test_multisteps_wrapping_prune_counts_real_steps():
    """optax.MultiSteps(prune(...)) prunes on the schedule of its real (outer) steps."""
    tx = optax.MultiSteps(sp.prune(optax.sgd(0.05), sp.Pruner(sparsity=0.5,
                                                               granularity=sp.NM(n=2, m=4, axis=-1))), 2)
    step = _trainer(tx)
    params, state = _params(), tx.init(_params())
    params, state = step(params, state)
    assert np.all(np.asarray(params["a"]["kernel"]) != 0)
    params, state = step(params, state)
    assert float((np.asarray(params["a"]["kernel"]) == 0).mean()) == 0.5


def test_straight_through_mode_keeps_weights_dense_and_tracks_masks():
    """straight_through=True leaves weights dense; masks_of gives the scheduled masks."""
    tx = sp.prune(optax.sgd(0.05), sp.Pruner(sparsity=0.5, granularity=sp.NM(n=2, m=4, axis=-1)),
                  straight_through=True)
    step = _trainer(tx)
    params, state = step(_params(), tx.init(_params()))
    masks = sp.masks_of(state)
    assert float(np.asarray(masks["a"]["kernel"]).mean()) == 0.5
    assert np.all(np.asarray(params["a"]["kernel"]) != 0)
    forward = sp.pruned_forward(params, masks)
    assert float((np.asarray(forward["a"]["kernel"]) == 0).mean()) == 0.5


def test_straight_through_masks_follow_the_dense_weights_at_a_constant_sparsity():
    """By default, straight-through masks are recomputed every step (SR-STE), so after training
    they are the masks of the final dense weights; update_every sets another period."""
    pruner = sp.Pruner(sparsity=0.5, granularity=sp.NM(n=2, m=4, axis=-1))
    for update_every, follows in ((None, True), (1000, False)):
        tx = sp.prune(optax.sgd(0.5), pruner, straight_through=True, update_every=update_every)
        step = jax.jit(lambda p, s: (lambda g: (lambda u, s: (optax.apply_updates(p, u), s))(
            *tx.update(g, s, p)))(jax.grad(lambda p: _loss(sp.pruned_forward(p, sp.masks_of(s))))(p)))
        params, state = _params(), tx.init(_params())
        first = None
        for _ in range(12):
            params, state = step(params, state)
            first = sp.masks_of(state) if first is None else first
        # The masks in the state were computed from the params this step started from.
        want = sp.compute_masks(params, pruner)
        got = sp.masks_of(step(params, state)[1])
        same = all(np.array_equal(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        assert same == follows
    with pytest.raises(ValueError, match="update_every must be an int >= 1, got 0"):
        sp.prune(optax.sgd(0.1), pruner, update_every=0)


def test_update_without_params_raises():
    """update() needs params to compute mask * (p + u) - p."""
    state = _TX.init(_params())
    with pytest.raises(ValueError, match="needs params"):
        _TX.update(_params(), state)


def test_random_score_needs_a_key():
    """A pruner with random scores refuses to be built without an explicit key."""
    with pytest.raises(ValueError, match="key"):
        sp.prune(optax.sgd(0.1), sp.Pruner(sparsity=0.5, score=sp.Random()))


def test_masks_of_finds_the_prune_state_in_a_chain():
    """masks_of looks into any optimizer state for the single PruneState."""
    tx = optax.chain(optax.clip(1.0), sp.prune(optax.sgd(0.1), sp.Pruner(sparsity=0.5)))
    masks = sp.masks_of(tx.init(_params()))
    assert masks["a"]["kernel"].dtype == jnp.bool_ and masks["a"]["bias"] is None
    with pytest.raises(ValueError):
        sp.masks_of(optax.sgd(0.1).init(_params()))


def test_a_float32_update_of_bfloat16_weights_is_rounded_once_as_without_the_wrapper():
    """Kept weights end where plain optax puts them: the float32 update is added, then rounded
    to bfloat16 once (regression: it was rounded to bfloat16 first, so about 1% of the kept
    weights ended one ulp away)."""
    p = {"k": jnp.array([0.1, 1.0, 1.0, 1.0, -2.0, 3.0], jnp.bfloat16)}
    g = {"k": jnp.array([0.3, -0.0078125, 0.001, 0.0, 0.0, 0.5], jnp.float32)}
    for inner in (optax.sgd(1.0), optax.adam(0.01)):
        ref, _ = inner.update(g, inner.init(p), p)
        tx = sp.prune(inner, sp.Pruner(sparsity=1 / 6, where="k"))
        updates, _ = tx.update(g, tx.init(p), p)
        new, expected = optax.apply_updates(p, updates)["k"], optax.apply_updates(p, ref)["k"]
        assert new.dtype == jnp.bfloat16 and float(new[0]) == 0.0
        np.testing.assert_array_equal(np.asarray(new[1:], np.float32),
                                      np.asarray(expected[1:], np.float32))


def test_bfloat16_params_train_through_the_wrapper():
    """prune() inits and updates bf16 params, leaving the pruned half at zero."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    tx = sp.prune(optax.sgd(0.05), sp.Pruner(sparsity=0.5))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    kernel = optax.apply_updates(params, updates)["a"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and float((kernel == 0).mean()) == 0.5


def test_sm3_state_not_mirroring_params_has_its_moments_reset():
    """SM3's per-axis accumulators defeat tree_map_params: its params-shaped part is reset."""
    params = _params()
    tx = sp.prune(optax.sm3(0.01), sp.Pruner(sparsity=sp.one_shot_sparsity(0.5, step=1)))
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.update(grads, tx.init(params), params)[1]
    _, state = tx.update(grads, state, params)
    nu = np.asarray(state.inner_state[0].nu["a"]["kernel"])
    pruned = ~np.asarray(state.masks["a"]["kernel"])
    assert pruned.mean() == 0.5
    # Same gradients everywhere: a reset momentum restarts from 0 and ends far below the rest.
    assert nu[pruned].max() < 0.5 * nu[~pruned].min()


def test_update_names_the_path_for_mismatched_grads_or_state():
    """Gradients or a state that do not fit the params: ValueError naming path and shapes."""
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads["a"]["kernel"] = grads["a"]["kernel"].T
    with pytest.raises(ValueError, match=r"a/kernel: the gradients: shape \(8, 6\)"):
        _TX.update(grads, _TX.init(params), params)
    other = jax.tree.map(lambda p: jnp.ones((2, *p.shape[1:])), params)
    with pytest.raises(ValueError, match=r"a/kernel: the PruneState's masks.*\(2, 8\)"):
        _TX.update(jax.tree.map(jnp.ones_like, params), _TX.init(other), params)


def test_straight_through_mask_has_forward_mode_and_unchanged_gradients():
    """jvp/jacfwd/hessian work through pruned_forward; grad is still the identity on weights."""
    mask = jnp.array([True, False, True])

    def f(w):
        return jnp.sum(sp.pruned_forward({"w": w}, {"w": mask})["w"] ** 3)

    w = jnp.array([1., 2., 3.])
    np.testing.assert_array_equal(jax.grad(f)(w), [3., 0., 27.])
    np.testing.assert_array_equal(jax.jacfwd(f)(w), jax.grad(f)(w))
    np.testing.assert_array_equal(jax.hessian(f)(w), np.diag([6., 0., 18.]))
    _, tangent = jax.jvp(lambda x: sp.straight_through_mask(x, mask), (w,), (jnp.ones(3),))
    np.testing.assert_array_equal(tangent, [1., 1., 1.])
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(sp.straight_through_mask(x, mask) * w))(w), w)


def test_nnx_optimizer_masks_apply_to_the_models_params():
    """masks_of(nnx.Optimizer.opt_state) is a State of OptVariables: the mask functions match it
    to nnx.state(model, nnx.Param) by path, and pruned weights are exactly zero."""
    from flax import nnx

    model = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, sp.prune(optax.adam(1e-2), sp.Pruner(sparsity=0.5)), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.mean(m(_X) ** 2))(model)
    opt.update(model, grads)
    masks = sp.masks_of(opt.opt_state)
    params = nnx.state(model, nnx.Param)
    kernel = np.asarray(sp.apply_masks(params, masks)["kernel"][...])
    assert (kernel == 0).mean() == 0.5
    np.testing.assert_array_equal(kernel, np.asarray(model.kernel[...]))
    assert float(sp.sparsity_of(sp.to_masked(params, masks)).total) > 0
    # nnx.state(optimizer) (what orbax saves) holds the PruneState as a mapping of its fields.
    from_state = sp.masks_of(nnx.state(opt))
    np.testing.assert_array_equal(np.asarray(from_state["kernel"][...]),
                                  np.asarray(masks["kernel"][...]))
    # A plain dict that happens to have those keys is not a PruneState.
    lookalike = (optax.EmptyState(), {"count": 0, "masks": {"k": None}, "inner_state": ()})
    with pytest.raises(ValueError, match="found 0"):
        sp.masks_of(lookalike)
