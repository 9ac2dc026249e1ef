"""LSQ and PACT: forward values and the papers' gradients."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.quant import (
    QuantSpec,
    lsq_as_static,
    lsq_fake_quant,
    lsq_fake_quant_tree,
    lsq_init,
    lsq_init_tree,
    pact_fake_quant,
    pact_penalty,
)

SPEC4 = QuantSpec(bits=4)  # grid [-7, 7]


def _lsq_reference_grads(x, s, g, qmin, qmax, grad_scale):
    """The LSQ paper's gradients, written elementwise in numpy."""
    v = x / s
    inside = (v > qmin) & (v < qmax)
    dx = np.where(inside, g, 0.0)
    ds_elem = np.where(v <= qmin, qmin, np.where(v >= qmax, qmax, np.round(v) - v))
    return dx, float(np.sum(g * ds_elem) * grad_scale)


@settings(max_examples=25, deadline=None)
@given(
    x=hnp.arrays(np.float32, (16,), elements=st.floats(-10, 10, width=32)),
    step=st.floats(0.05, 2.0),
    signed=st.booleans(),
)
def test_lsq_gradients_match_the_paper(x, step, signed):
    """d/dx is 1 strictly inside the range; d/ds is round(v) - v inside, qmin/qmax outside,
    times 1 / sqrt(N * Qp)."""
    spec = QuantSpec(bits=4, signed=signed)
    g = np.linspace(-1.0, 1.0, 16).astype(np.float32)
    s = np.float32(step)
    _, vjp = jax.vjp(lambda a, b: lsq_fake_quant(a, b, spec), jnp.asarray(x), jnp.asarray(s))
    dx, ds = vjp(jnp.asarray(g))
    grad_scale = 1.0 / math.sqrt(16 * spec.qmax)
    ref_dx, ref_ds = _lsq_reference_grads(x.astype(np.float64), float(s), g, spec.qmin, spec.qmax, grad_scale)
    v = x / s
    away = np.abs(v - np.round(v)) > 1e-3  # skip elements on a rounding tie
    np.testing.assert_allclose(np.asarray(dx)[away], ref_dx[away])
    if away.all():
        assert float(ds) == pytest.approx(ref_ds, rel=1e-4, abs=1e-5)


def test_lsq_forward_quantizes_to_multiples_of_the_step_and_clips():
    """x_hat = s * clip(round(x / s), qmin, qmax)."""
    x = jnp.array([0.26, -0.74, 9.0, -9.0])
    np.testing.assert_allclose(lsq_fake_quant(x, jnp.float32(0.5), SPEC4), [0.5, -0.5, 3.5, -3.5])


def test_lsq_per_channel_steps_get_per_channel_gradients():
    """A step per column receives the gradient summed over its own column only."""
    x = jnp.array([[0.3, 2.0], [-0.6, 9.0]])
    steps = jnp.array([[0.2, 1.0]])
    spec = QuantSpec(bits=4, channel_axes=(-1,))
    grad = jax.grad(lambda s: lsq_fake_quant(x, s, spec).sum())(steps)
    assert grad.shape == (1, 2)
    col1 = (2.0 - 2.0) + 7.0  # round(2) - 2 = 0, 9 clips at qmax = 7
    assert float(grad[0, 1]) == pytest.approx(col1 / math.sqrt(2 * 7))


def test_lsq_gradient_scale_counts_the_elements_that_share_one_step():
    """One step broadcast over a per-channel spec is shared by every element: its gradient is
    the per-tensor one (N = x.size), not sqrt(channels) times larger."""
    x = jax.random.normal(jax.random.key(1), (6, 10))
    g = jax.random.normal(jax.random.key(2), (6, 10))
    step = jnp.float32(0.3)

    def grad(spec):
        return jax.grad(lambda s: jnp.sum(lsq_fake_quant(x, s, spec) * g))(step)

    per_channel = QuantSpec(bits=4, channel_axes=(-1,))
    np.testing.assert_allclose(grad(per_channel), grad(SPEC4), rtol=1e-6)


def test_lsq_init_follows_the_paper_and_is_positive_for_zeros():
    """s0 = 2 mean|x| / sqrt(Qp); an all-zero tensor gets 1."""
    x = jnp.array([1.0, -3.0, 0.0, 2.0])
    assert float(lsq_init(x, SPEC4).squeeze()) == pytest.approx(2 * 1.5 / math.sqrt(7))
    assert float(lsq_init(jnp.zeros(3), SPEC4).squeeze()) == 1.0


def test_lsq_step_trains_with_a_plain_optax_optimizer():
    """Steps are ordinary leaves: optax.adam updates them and the loss goes down."""
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}}
    steps = lsq_init_tree(params, SPEC4, where=r".*kernel")
    target = params["Dense_0"]["kernel"]
    trainable = {"params": params, "steps": steps}
    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    def loss(t):
        q = lsq_fake_quant_tree(t["params"], t["steps"], SPEC4)
        return jnp.mean((q["Dense_0"]["kernel"] - target) ** 2)

    @jax.jit
    def step(t, s):
        value, grads = jax.value_and_grad(loss)(t)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    first = None
    for _ in range(30):
        trainable, state, value = step(trainable, state)
        first = value if first is None else first
    assert float(value) < float(first)
    assert not np.allclose(trainable["steps"]["Dense_0/kernel"], steps["Dense_0/kernel"])


def test_lsq_rejects_asymmetric_specs_and_unknown_step_paths():
    """LSQ needs a symmetric integer grid; steps must name existing paths."""
    with pytest.raises(ValueError, match="w: LSQ needs a symmetric integer spec"):
        lsq_fake_quant(jnp.ones(3), jnp.float32(1.0), QuantSpec(symmetric=False), path="w")
    with pytest.raises(ValueError, match="not in the params"):
        lsq_fake_quant_tree({"a": jnp.ones(2)}, {"b": jnp.float32(1.0)}, SPEC4)
    with pytest.raises(ValueError, match="step of shape"):
        lsq_fake_quant(jnp.ones((2, 3)), jnp.ones(2), SPEC4)


def test_pact_clips_quantizes_and_has_the_papers_alpha_gradient():
    """y = quantized clip(x, 0, alpha); dy/dalpha = 1 where x >= alpha; dy/dx = 1 inside."""
    spec = QuantSpec(bits=4, signed=False)
    x = jnp.array([-1.0, 0.55, 2.95, 3.0, 7.0])  # scale 3 / 15 = 0.2
    alpha = jnp.float32(3.0)
    y = pact_fake_quant(x, alpha, spec)
    np.testing.assert_allclose(y, [0.0, 0.6, 3.0, 3.0, 3.0], atol=1e-6)
    dx, dalpha = jax.grad(lambda a, b: pact_fake_quant(a, b, spec).sum(), argnums=(0, 1))(x, alpha)
    np.testing.assert_array_equal(dx, [0, 1, 1, 0, 0])
    assert float(dalpha) == 2.0
    assert float(pact_penalty({"a": alpha}, weight=0.1)) == pytest.approx(0.9)


def test_pact_signed_clips_symmetrically():
    """A signed spec clips to [-alpha, alpha]; the alpha gradient is +1 above, -1 below."""
    spec = QuantSpec(bits=4)
    x = jnp.array([-5.0, 0.2, 5.0])
    dalpha = jax.grad(lambda a: pact_fake_quant(x, a, spec).sum())(jnp.float32(2.0))
    np.testing.assert_allclose(pact_fake_quant(x, jnp.float32(2.0), spec), [-2.0, 2 / 7, 2.0], rtol=1e-6)
    assert float(dalpha) == 0.0
    chex.assert_trees_all_close(
        jax.grad(lambda a: pact_fake_quant(x[2:], a, spec).sum())(jnp.float32(2.0)), jnp.float32(1.0))


def test_concrete_non_positive_steps_and_clips_are_value_errors():
    """A concrete LSQ step or PACT alpha <= 0 (or NaN) used to be clamped to 1e-12 silently."""
    x = jnp.array([0.3, -1.2, 2.0])
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="the LSQ step must be finite and positive"):
            lsq_fake_quant(x, jnp.float32(bad), QuantSpec(bits=4))
        with pytest.raises(ValueError, match="the PACT alpha must be finite and positive"):
            pact_fake_quant(x, jnp.float32(bad), QuantSpec(bits=4, signed=False))
        with pytest.raises(ValueError, match="a: the LSQ step"):
            lsq_as_static({"a": jnp.float32(bad)})
