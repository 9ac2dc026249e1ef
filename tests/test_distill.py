"""Distillation losses: Hinton's formula, stop-gradient on the teacher, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.distill import distillation_loss, feature_distillation_loss, soft_target_kl

S = jax.random.normal(jax.random.key(0), (4, 5))
T = jax.random.normal(jax.random.key(1), (4, 5))
Y = jnp.array([0, 1, 2, 3])


@settings(max_examples=20, deadline=None)
@given(temperature=st.floats(0.5, 8.0), alpha=st.floats(0.0, 1.0))
def test_loss_is_the_papers_formula(temperature, alpha):
    """(1 - a) CE(y, p_s) + a T^2 KL(p_t^T || p_s^T), computed independently in numpy."""
    s, t = np.asarray(S, np.float64), np.asarray(T, np.float64)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = softmax(t / temperature), softmax(s / temperature)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    ce = np.mean(-np.log(softmax(s)[np.arange(4), np.asarray(Y)]))
    want = (1 - alpha) * ce + alpha * temperature**2 * kl
    got = distillation_loss(S, T, Y, temperature=temperature, alpha=alpha)
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    want = optax.softmax_cross_entropy_with_integer_labels(S, Y).mean()
    np.testing.assert_allclose(distillation_loss(S, T, Y, alpha=0.0), want, rtol=1e-6)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    assert abs(float(soft_target_kl(S, S, 3.0))) < 1e-6
    assert float(soft_target_kl(S, T, 3.0)) > 0


def test_teacher_receives_no_gradient():
    grad_t = jax.grad(lambda t: distillation_loss(S, t, Y))(T)
    assert float(jnp.abs(grad_t).sum()) == 0.0
    grad_f = jax.grad(lambda t: feature_distillation_loss(S, t))(T)
    assert float(jnp.abs(grad_f).sum()) == 0.0


def test_feature_loss_is_mse_and_scale_free_when_normalized():
    np.testing.assert_allclose(feature_distillation_loss(S, T), jnp.mean((S - T) ** 2), rtol=1e-6)
    assert float(feature_distillation_loss(S, 3 * S, normalize=True)) < 1e-10
    assert np.isfinite(float(feature_distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                                                       normalize=True)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: distillation_loss(S, T, Y, temperature=0.0), "temperature"),
        (lambda: distillation_loss(S, T, Y, alpha=1.5), "alpha"),
        (lambda: soft_target_kl(S, T[:, :3]), "same shape"),
        (lambda: feature_distillation_loss(S, T[:2]), "same shape"),
    ],
)
def test_bad_input_is_a_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
