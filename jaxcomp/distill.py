"""Knowledge-distillation losses: a compressed student learns from the uncompressed teacher.

All losses are pure functions of arrays, used inside the user's own loss:

    def loss_fn(params, x, y):
        student = model.apply(fake_quant_tree(params, spec), x)
        teacher = jax.lax.stop_gradient(model.apply(teacher_params, x))
        return distillation_loss(student, teacher, y, temperature=4.0, alpha=0.9)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["distillation_loss", "feature_distillation_loss", "soft_target_kl"]


def _check(temperature: float, alpha: float | None = None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def soft_target_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Mean KL(p_teacher^T || p_student^T) between softmaxes at temperature T, times T^2.

    The T^2 factor (Hinton et al. 2015) keeps the gradient scale independent of T. The teacher
    gets no gradient.

    Args:
      student_logits: `(..., classes)`.
      teacher_logits: same shape.
      temperature: T > 0.

    Returns:
      A scalar.

    Raises:
      ValueError: for T <= 0 or mismatched shapes.

    Example:
        >>> logits = jnp.array([[2.0, 0.0, -1.0]])
        >>> float(soft_target_kl(logits, logits, temperature=2.0))
        0.0
    """
    _check(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "must have the same shape"
        )
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(teacher * (log_teacher - log_student), axis=-1)
    return temperature**2 * jnp.mean(kl)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> jax.Array:
    """Hinton et al. 2015: `(1 - alpha) CE(labels, p_s) + alpha T^2 KL(p_t^T || p_s^T)`.

    Args:
      student_logits: `(batch, classes)`.
      teacher_logits: same shape; treated as constants.
      labels: integer labels `(batch,)`.
      temperature: softmax temperature T > 0 of the soft targets.
      alpha: weight of the soft-target term, in [0, 1].

    Returns:
      A scalar loss.

    Raises:
      ValueError: for T <= 0, alpha outside [0, 1] or mismatched shapes.

    Example:
        >>> s = jnp.array([[1.0, 0.0]]); t = jnp.array([[3.0, 0.0]]); y = jnp.array([0])
        >>> bool(distillation_loss(s, t, y, alpha=0.0) > 0)
        True
    """
    _check(temperature, alpha)
    hard = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
    return (1.0 - alpha) * hard + alpha * soft_target_kl(student_logits, teacher_logits, temperature)


def feature_distillation_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    normalize: bool = False,
) -> jax.Array:
    """Mean squared error between intermediate features (FitNets-style hints).

    For a structurally pruned student whose widths differ, project the student's features to the
    teacher's width first (e.g. with a learned `nn.Dense`) and pass the projection.

    Args:
      student_features: `(batch, ...)`.
      teacher_features: same shape; treated as constants.
      normalize: L2-normalise each example's features first (scale-free matching).

    Returns:
      A scalar.

    Raises:
      ValueError: when the shapes differ.

    Example:
        >>> f = jnp.ones((2, 4))
        >>> float(feature_distillation_loss(f, 2 * f, normalize=True))
        0.0
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {student_features.shape} and teacher features "
            f"{teacher_features.shape} must have the same shape (project the student first)"
        )
    teacher = jax.lax.stop_gradient(teacher_features)
    student = student_features
    if normalize:
        flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
        eps = jnp.finfo(student.dtype).tiny
        student = flat(student) / (jnp.linalg.norm(flat(student), axis=-1, keepdims=True) + eps)
        teacher = flat(teacher) / (jnp.linalg.norm(flat(teacher), axis=-1, keepdims=True) + eps)
    return jnp.mean((student - teacher) ** 2)
