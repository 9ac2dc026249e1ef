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
        (lambda: soft_target_kl(S, T, float("inf")), "temperature must be a finite number > 0"),
        (lambda: distillation_loss(S, T, Y[:, None]), r"labels must have shape \(4,\)"),
        (lambda: distillation_loss(S, T, Y[:3]), r"labels must have shape \(4,\)"),
        (lambda: distillation_loss(S, T, Y.astype(jnp.float32)), "labels must be integer"),
        (lambda: distillation_loss(S, T, Y.at[0].set(5)), r"labels must be in \[0, 5\), got 5"),
        (lambda: distillation_loss(S, T, Y.at[0].set(-1)), r"labels must be in \[0, 5\), got -1"),
        (lambda: feature_distillation_loss(S[0, 0], T[0, 0], normalize=True), "batch axis"),
        (lambda: soft_target_kl(S, T, None), "temperature must be a real number, got None"),
        (lambda: soft_target_kl(S, T, "2"), "temperature must be a real number"),
        (lambda: soft_target_kl(S, T, True), "temperature must be a real number, got True"),
        (lambda: distillation_loss(S, T, Y, alpha=None), "alpha must be a real number"),
        (lambda: distillation_loss(S[0, 0], T[0, 0], Y[0]),
         "student_logits must have a class axis"),
        (lambda: soft_target_kl(S.astype(jnp.complex64), T),
         "student_logits must be real .*complex64"),
        (lambda: soft_target_kl(S, T.astype(jnp.int32)), "teacher_logits must be real .*int32"),
        (lambda: distillation_loss(S.astype(jnp.int32), T, Y), "student_logits .* int32"),
        (lambda: feature_distillation_loss(S.astype(jnp.int32), T.astype(jnp.int32)),
         "student_features must be real floating-point values, got dtype int32"),
        (lambda: feature_distillation_loss(S * 1j, T * 1j), "student_features .*complex"),
        (lambda: feature_distillation_loss(S, T, normalize="yes"), "normalize must be True or"),
    ],
)
def test_bad_input_is_a_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_classes_masked_with_minus_inf_add_nothing_and_keep_gradients_finite():
    """-inf logits (padded classes) give the loss of the unpadded logits, not NaN."""
    pad = lambda z: jnp.concatenate([z, jnp.full((4, 1), -jnp.inf)], -1)  # noqa: E731
    want = soft_target_kl(S, T, 2.0)
    np.testing.assert_allclose(soft_target_kl(pad(S), pad(T), 2.0), want, rtol=1e-6)
    np.testing.assert_allclose(distillation_loss(pad(S), pad(T), Y),
                               distillation_loss(S, T, Y), rtol=1e-6)
    assert np.isfinite(float(soft_target_kl(jnp.pad(S, ((0, 0), (0, 1))), pad(T))))
    grad = jax.jit(jax.grad(lambda s: distillation_loss(s, pad(T), Y)))(pad(S))
    want_grad = jax.jit(jax.grad(lambda s: distillation_loss(s, T, Y)))(S)
    np.testing.assert_allclose(grad[:, :5], want_grad, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad[:, 5]).max()) == 0.0


def test_normalized_features_are_safe_for_zero_and_tiny_examples():
    """An all-zero example has finite gradients and tiny features do not underflow."""
    teacher = jnp.ones((2, 4))
    grad = jax.jit(jax.grad(lambda f: feature_distillation_loss(f, teacher, normalize=True)))(
        jnp.zeros((2, 4)))
    assert bool(jnp.isfinite(grad).all())
    tiny = feature_distillation_loss(jnp.full((2, 4), 1e-30), teacher, normalize=True)
    assert float(tiny) < 1e-10


@pytest.mark.parametrize("size", [1e-19, 1e-20, 1e-30])
def test_normalized_feature_gradients_of_tiny_features_are_finite_and_exact(size):
    """The loss is scale-free, so its gradient at c * x is the gradient at x divided by c; the
    scale's own -x / scale**2 term (which overflowed to inf or NaN) must not enter it."""
    student = jnp.array([[0.3, -1.0, 0.5, 2.0], [1.0, 0.2, -0.4, 0.0]])
    teacher = jnp.array([[1.0, 0.0, 0.5, 1.0], [0.5, 0.5, 0.5, -0.5]])
    grad = jax.grad(lambda f: feature_distillation_loss(f, teacher, normalize=True))
    at_one = np.asarray(grad(student), np.float64)
    at_tiny = np.asarray(grad(student * size), np.float64)
    assert np.isfinite(at_tiny).all()
    np.testing.assert_allclose(at_tiny * size, at_one, rtol=1e-4, atol=1e-6)


def test_traced_temperature_and_labels_work_under_jit():
    """A traced temperature is not checked; an out-of-range traced label makes the loss NaN."""
    loss = jax.jit(lambda t, y: distillation_loss(S, T, y, temperature=t))
    np.testing.assert_allclose(loss(2.0, Y), distillation_loss(S, T, Y, temperature=2.0),
                               rtol=1e-6)
    assert np.isnan(float(loss(2.0, Y.at[0].set(-1))))
    assert np.isnan(float(loss(2.0, Y.at[0].set(7))))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_and_features_are_computed_in_float32(dtype):
    """bf16/f16 inputs give the float32 loss of the same rounded values (bf16 softmaxes at T=10
    were off by a factor of 3), and large f16 features do not overflow when squared."""
    s, t = (S * 3).astype(dtype), (T * 3).astype(dtype)
    for temperature in (1.0, 10.0):
        np.testing.assert_allclose(
            soft_target_kl(s, t, temperature),
            soft_target_kl(s.astype(jnp.float32), t.astype(jnp.float32), temperature), rtol=1e-5)
    np.testing.assert_allclose(
        distillation_loss(s, t, Y, temperature=4.0),
        distillation_loss(s.astype(jnp.float32), t.astype(jnp.float32), Y, temperature=4.0),
        rtol=1e-5)
    big = jnp.full((2, 3), 300.0, dtype)
    assert float(feature_distillation_loss(big, jnp.zeros((2, 3), dtype))) == 90000.0


def test_empty_batch_gives_zero_not_nan():
    empty = jnp.zeros((0, 5))
    assert float(soft_target_kl(empty, empty)) == 0.0
    assert float(distillation_loss(empty, empty, jnp.zeros((0,), jnp.int32))) == 0.0
    for normalize in (False, True):
        assert float(feature_distillation_loss(empty, empty, normalize=normalize)) == 0.0


def test_a_nan_or_all_minus_inf_teacher_row_makes_the_loss_nan_not_dropped():
    """A bad teacher row is not silently left out of the mean (regression: it added 0, so the
    loss was finite and the student got no gradient for that example)."""
    student = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    for bad in (jnp.array([jnp.nan, 0.0, 1.0]), jnp.full((3,), -jnp.inf)):
        teacher = jnp.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]).at[1].set(bad)
        assert bool(jnp.isnan(soft_target_kl(student, teacher, temperature=2.0)))
        assert bool(jnp.isnan(jax.jit(soft_target_kl)(student, teacher)))
