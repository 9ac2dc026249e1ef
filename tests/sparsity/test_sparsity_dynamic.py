"""Dynamic sparse training (SET, RigL) and straight-through pruning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcomp.sparsity as sp

_X = jax.random.normal(jax.random.key(1), (16, 12))


def _params():
    return {"w": {"kernel": jax.random.normal(jax.random.key(0), (12, 16))}}


def _loss(params):
    return jnp.mean(jnp.sin(_X @ params["w"]["kernel"]) ** 2)


@functools.lru_cache(maxsize=None)
def _stepper(tx):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(tx, steps, state=None):
    step = _stepper(tx)
    params, state = _params(), tx.init(_params()) if state is None else state
    history = [(params, state)]
    for _ in range(steps):
        params, state = step(params, state)
        history.append((params, state))
    return history


_RIGL = sp.Pruner(sparsity=0.75, score=sp.Random(),
                  dynamic=sp.RigL(update_every=2, end_step=7, drop_fraction=0.5))
_HISTORY = _run(sp.prune(optax.adam(0.05), _RIGL, key=jax.random.key(3)), 8)


def test_rigl_keeps_the_number_of_active_weights_and_changes_topology():
    """Every step has exactly 25% active weights; the topology moves on update steps only."""
    masks = [np.asarray(state.masks["w"]["kernel"]) for _, state in _HISTORY[1:]]
    assert all(m.sum() == 48 for m in masks)
    for t in range(1, len(masks)):
        moved = np.any(masks[t] != masks[t - 1])
        assert moved == (t in (2, 4, 6)), t


def test_rigl_regrown_weights_start_at_zero_and_grow_by_gradient():
    """Weights grown at an update step are exactly zero after it and had the largest |g|."""
    (p_before, s_before), (p_after, s_after) = _HISTORY[2], _HISTORY[3]
    before, after = np.asarray(s_before.masks["w"]["kernel"]), np.asarray(s_after.masks["w"]["kernel"])
    grown, dropped = after & ~before, before & ~after
    assert grown.sum() == dropped.sum() > 0
    assert np.all(np.asarray(p_after["w"]["kernel"])[grown] == 0.0)
    assert np.all(np.asarray(p_after["w"]["kernel"])[dropped] == 0.0)
    grad = np.abs(np.asarray(jax.grad(_loss)(p_before)["w"]["kernel"]))
    candidates = ~before
    assert grad[grown].min() >= np.max(grad[candidates & ~grown])


def test_drop_fraction_decays_with_a_cosine():
    """f_t = f0/2 (1 + cos(pi t / T)): f0 at 0, f0/2 halfway, 0 at the end."""
    rigl = sp.RigL(end_step=100, drop_fraction=0.4)
    np.testing.assert_allclose([float(rigl.fraction(t)) for t in (0, 50, 100)], [0.4, 0.2, 0.0],
                               atol=1e-6)


def test_set_grows_at_random_from_the_key():
    """SET needs a key; the same key gives the same topology, another key a different one."""
    pruner = sp.Pruner(sparsity=0.5, dynamic=sp.SET(update_every=1, end_step=3))
    with pytest.raises(ValueError, match="key"):
        sp.prune(optax.sgd(0.1), pruner)
    tx = sp.prune(optax.sgd(0.1), pruner, key=jax.random.key(0))
    start = tx.init(_params())
    runs = [_run(tx, 2, start._replace(key=jax.random.key_data(jax.random.key(k))))[-1][1]
            for k in (0, 0, 1)]
    masks = [np.asarray(s.masks["w"]["kernel"]) for s in runs]
    np.testing.assert_array_equal(masks[0], masks[1])
    assert np.any(masks[0] != masks[2]) and all(m.sum() == 96 for m in masks)


def test_drop_and_grow_never_regrows_what_it_just_dropped():
    """A weight dropped at a step is not regrown at the same step."""
    new = sp.drop_and_grow([jnp.array([3.0, 0.0, 1.0, 0.0])], [jnp.array([9.0, 5.0, 0.0, 1.0])],
                           [jnp.array([True, False, True, False])], 0.5)
    np.testing.assert_array_equal(new[0], [True, True, False, False])


def test_pruned_forward_masks_forward_and_passes_gradient_straight_through():
    """Forward sees where(mask, w, 0); the gradient of every weight is the dense one."""
    w = jnp.array([1.0, -2.0, 3.0])
    mask = jnp.array([True, False, True])
    x = jnp.array([0.5, 0.25, 2.0])

    def loss(w):
        return jnp.dot(sp.pruned_forward({"w": w}, {"w": mask})["w"], x)

    assert float(loss(w)) == 6.5
    np.testing.assert_array_equal(jax.grad(loss)(w), x)
    with pytest.raises(ValueError):
        sp.pruned_forward({"w": w}, {"w": jnp.ones(4, bool)})


def test_drop_and_grow_rejects_bad_fractions_and_grows_nan_gradients_last():
    mask = jnp.array([True, True, False, False, False, False])
    params = jnp.array([3.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="fraction must be a number in \\[0, 1\\], got 2.0"):
        sp.drop_and_grow([params], [jnp.ones(6)], [mask], 2.0)
    grads = jnp.array([0.0, 0.0, jnp.nan, 0.5, 0.1, jnp.nan])
    new = sp.drop_and_grow([params], [grads], [mask], 0.5)[0]
    np.testing.assert_array_equal(new, [True, False, False, True, False, False])
