"""Bad input across the sparsity API: a ValueError naming it; NumPy ints accepted as ints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp
from jaxcomp.quant import QuantSpec, quantize
from jaxcomp.nn.sparsity import ActivationSparsity, sparsify_activation

P = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
K = {"kernel": P["w"]}
_QK = {"kernel": quantize(jnp.ones((4, 3)), QuantSpec(bits=8))}


def test_numpy_ints_are_ints():
    """Schedules, SET/RigL and activation sparsity take NumPy integers where they take ints."""
    schedule = sp.polynomial_sparsity(0.5, begin_step=np.int64(0), end_step=np.int64(4),
                                      frequency=np.int64(2))
    assert float(schedule(4)) == 0.5
    rigl = sp.RigL(update_every=np.int64(10), end_step=np.int64(100))
    assert type(rigl.update_every) is int and type(rigl.end_step) is int
    assert ActivationSparsity(where="", top_k=np.int64(2)).top_k == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sp.polynomial_sparsity(0.5, begin_step=0, end_step=2**31), "end_step must be an int in"),
        (lambda: sp.iterative_sparsity([2**31], [0.5]), "must be an int in"),
        (lambda: sp.RigL(end_step=2**31), "end_step must be a positive int below 2\\*\\*31"),
        (lambda: sp.SET(drop_fraction="0.3"), "drop_fraction must be in"),
        (lambda: ActivationSparsity(where="", keep_fraction="0.5"), "keep_fraction must be in"),
        (lambda: ActivationSparsity(where="", threshold="1"), "threshold"),
        (lambda: sp.saliency_scores(P, {"w": jnp.ones((2, 1))}), "w: Saliency needs gradients"),
        (lambda: sp.straight_through_mask(jnp.ones(2), jnp.ones((3, 2), bool)), "does not broadcast to x"),
        (lambda: sparsify_activation(jnp.zeros((0, 4)), ActivationSparsity(where="", top_k=1),
                                     path="act"), "act: an empty activation"),
        (lambda: sp.unstructured_mask(jnp.zeros((0, 3)), 0.5), "empty array"),
        (lambda: sp.iterative_sparsity(0, 0.5), "steps must be a sequence"),
        (lambda: sp.channel_mask([1.0, 2.0], 0.5), "scores must be an array"),
        (lambda: sp.compute_masks(K, sp.Pruner(sparsity=0.5), step="5"), "step must be an int"),
        (lambda: sp.compute_masks(K, sp.Pruner(sparsity=0.5), step=2.5), "step must be an int"),
        (lambda: sp.erk_sparsities({"a": (10, -10)}, 0.5), "a: erk_sparsities needs a shape"),
        (lambda: sp.drop_and_grow(P["w"], P["w"], P["w"] > 0, 0.5), "params must be a list"),
        (lambda: sp.drop_and_grow([P["w"]], [P["w"]], [jnp.ones(3, bool)], 0.5),
         "leaf 0: mask of shape"),
        (lambda: sparsify_activation(jnp.ones((2, 4), jnp.int32),
                                     ActivationSparsity(where="", top_k=1), path="act"),
         "act: expected a float activation"),
        (lambda: sp.pruned_forward(_QK, {"kernel": jnp.ones((4, 3), bool)}),
         "kernel: pruned_forward needs the dense weight, got a compressed leaf \\(QArray\\)"),
        (lambda: sp.to_masked(_QK, {"kernel": jnp.ones((4, 3), bool)}),
         "kernel: to_masked would turn a QArray into float values"),
        (lambda: sp.nm_mask(None), "scores must be an array, got NoneType"),
        (lambda: sp.nm_mask([[1.0, 2.0, 3.0, 4.0]], axis=-1), "scores must be an array"),
        (lambda: sp.unstructured_mask(jnp.ones(4, jnp.complex64), 0.5), "must be a real array"),
        (lambda: sp.block_mask(np.array([["a"] * 4] * 4), 0.5, (2, 2)), "must be a real array"),
        # Schedules called eagerly: no OverflowError past int32, no silently truncated float.
        (lambda: sp.polynomial_sparsity(0.5, begin_step=0, end_step=4)(2**31), "fit in int32"),
        (lambda: sp.constant_sparsity(0.5)(np.array([0, 2**40])), "fit in int32"),
        (lambda: sp.one_shot_sparsity(0.5, 2)(1.5), "takes an integer step, got 1.5"),
        (lambda: sp.iterative_sparsity([0], [0.5])(None), "takes an integer step, got None"),
        (lambda: sp.polynomial_sparsity(0.5, begin_step=0, end_step=4)(jnp.float32(2.0)),
         "integer steps, got an array of dtype float32"),
        # A rule that matches no pruned leaf names the candidates, or the rule that took them.
        (lambda: sp.compute_masks({"a": K, "b": K}, sp.Pruner(sparsity=0.5, where=".*kernel", rules=[
            sp.Rule(where="c/kernel", sparsity=0.2)])),
         r"rule 0 \(where='c/kernel'\) matches none of the pruned leaves: the pruned leaves "
         r"\(those Pruner.where selects\) are \['a/kernel', 'b/kernel'\]"),
        (lambda: sp.compute_masks({"a": K}, sp.Pruner(sparsity=0.5, where=".*kernel", rules=[
            sp.Rule(where=".*", sparsity=0.2), sp.Rule(where="a/kernel", sparsity=0.1)])),
         r"rule 1 .* the pruned leaves it matches \(a/kernel\) are all taken by an earlier rule"),
    ],
)
def test_bad_input_is_a_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_schedules_take_ints_numpy_ints_and_integer_arrays():
    """Every step form the wrapper, jit and a user can pass gives the same value."""
    import jax

    for schedule in (sp.polynomial_sparsity(0.5, begin_step=0, end_step=4),
                     sp.constant_sparsity(0.5), sp.one_shot_sparsity(0.5, 2),
                     sp.iterative_sparsity([0, 3], [0.25, 0.5])):
        expected = [float(schedule(t)) for t in range(6)]
        assert [float(schedule(np.int64(t))) for t in range(6)] == expected
        np.testing.assert_array_equal(schedule(jnp.arange(6)), expected)
        assert [float(jax.jit(schedule)(jnp.int32(t))) for t in range(6)] == expected


def test_straight_through_masks_may_broadcast_to_the_weights():
    """A per-channel or scalar mask that broadcasts to x (without growing it) is fine."""
    x = jnp.arange(12.0).reshape(3, 4)
    for mask in (jnp.array([True, False, True, True]), jnp.ones((1, 4), bool), jnp.bool_(True)):
        assert sp.straight_through_mask(x, mask).shape == (3, 4)


def test_array_scalars_are_numbers_and_compressed_leaves_pair_with_their_gradients():
    """0-d JAX / NumPy arrays pass where numbers do; the gradient-shape check of the scores
    pairs each weight with its own gradient even after a compressed leaf."""
    from jaxcomp.quant import QuantSpec, quantize

    assert ActivationSparsity(where="", keep_fraction=jnp.float32(0.5)).keep_fraction == 0.5
    assert ActivationSparsity(where="", threshold=np.float32(0.0)).threshold == 0.0
    assert sp.RigL(drop_fraction=np.array(0.25)).drop_fraction == 0.25
    assert set(sp.erk_sparsities({"a": (jnp.int32(3), 4), "b": (4, 5)}, 0.5)) == {"a", "b"}
    q = quantize(jnp.ones((8, 4)), QuantSpec(channel_axes=(-1,)))
    params = {"a": q, "b": jnp.ones((2, 3))}
    grads = {"a": q, "b": jnp.ones((2, 3))}
    assert sp.saliency_scores(params, grads)["b"].shape == (2, 3)


def test_drop_and_grow_and_taylor_reject_what_would_broadcast_or_not_compare():
    """A gradient of another shape would be broadcast and decide which weights grow; a decay
    given as a string or None is a ValueError, not a TypeError."""
    w = jnp.arange(32.0).reshape(8, 4)
    with pytest.raises(ValueError, match=r"leaf 0: gradient of shape \(4,\) does not match"):
        sp.drop_and_grow([w], [jnp.ones(4)], [w > 10], 0.5)
    # SET grows at random: no gradients at all is fine.
    grown = sp.drop_and_grow([w], None, [w > 10], 0.5, key=jax.random.key(0))
    assert int(grown[0].sum()) == int((w > 10).sum())
    for decay in ("0.5", None):
        with pytest.raises(ValueError, match="Taylor: decay must be a number in"):
            sp.Taylor(decay=decay)
