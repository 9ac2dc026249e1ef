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
from jax import lax
import numpy as np
import optax

__all__ = ["distillation_loss", "feature_distillation_loss", "soft_target_kl"]


def _concrete(value: jax.typing.ArrayLike) -> np.ndarray | None:
    """`value` as a NumPy array, or None when it is traced (a jit argument or a schedule)."""
    return None if isinstance(value, jax.core.Tracer) else np.asarray(value)


def _number(name: str, value: jax.typing.ArrayLike) -> np.ndarray | None:
    """`value` as a concrete real scalar (None when traced); anything else raises ValueError."""
    if isinstance(value, jax.core.Tracer):
        if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.number):
            raise ValueError(f"{name} must be a real scalar, got a traced {value.dtype}"
                             f"{list(value.shape)}")
        return None
    array = np.asarray(value) if isinstance(value, (int, float, np.generic, np.ndarray,
                                                    jax.Array)) else None
    if (array is None or array.dtype == bool or not np.issubdtype(array.dtype, np.number)
            or np.iscomplexobj(array)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if array.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    return array


_NO_ALPHA = object()


def _check(temperature: jax.typing.ArrayLike, alpha: object = _NO_ALPHA) -> None:
    # Checked only when concrete, so a traced temperature or alpha works under jit.
    t = _number("temperature", temperature)
    if t is not None and not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    if alpha is _NO_ALPHA:
        return
    a = _number("alpha", alpha)
    if a is not None and not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {a}")


def _compute_dtype(x: jax.Array) -> jax.Array:
    """`x` in at least float32: softmaxes and squares of bf16/f16 values lose most digits."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _as_float_array(name: str, value: jax.typing.ArrayLike, *, class_axis: bool) -> jax.Array:
    """`value` as a real floating-point array, or a ValueError naming `name` and its dtype."""
    try:
        array = jnp.asarray(value)
    except TypeError as e:
        raise ValueError(
            f"{name} must be a floating-point array, got {type(value).__name__}"
        ) from e
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be real floating-point values, got dtype {array.dtype} (cast integer "
            "values to float; complex values have no softmax or squared error)"
        )
    if class_axis and array.ndim == 0:
        raise ValueError(f"{name} must have a class axis (..., classes), got a scalar")
    return array


def _check_labels(labels: jax.Array, student_logits: jax.Array) -> None:
    want, classes = student_logits.shape[:-1], student_logits.shape[-1]
    if labels.shape != want:
        raise ValueError(
            f"labels must have shape {want} (the logits' shape without the class axis), got "
            f"{labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    concrete = _concrete(labels)
    if concrete is not None:
        bad = concrete[(concrete < 0) | (concrete >= classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {classes}), got {bad[0]}")


def soft_target_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Mean KL(p_teacher^T || p_student^T) between softmaxes at temperature T, times T^2.

    The T^2 factor (Hinton et al. 2015) keeps the gradient scale independent of T. The teacher
    gets no gradient. bf16/f16 logits are softmaxed in float32 (the result is float32), and an
    empty batch gives 0. Classes masked out with `-inf` teacher logits (padding, a restricted
    vocabulary) add nothing, as 0 log 0 = 0, and the loss and gradients stay finite; a NaN
    teacher logit, or a row whose logits are all `-inf`, makes the loss NaN (it is not dropped).

    Args:
      student_logits: `(..., classes)`.
      teacher_logits: same shape.
      temperature: T > 0, finite; a traced T (e.g. a schedule under `jit`) is not checked.

    Returns:
      A scalar.

    Raises:
      ValueError: for a concrete T that is not a finite number > 0, mismatched shapes, or
        logits that are scalars or not real floating point (integer, complex).

    Example:
        >>> logits = jnp.array([[2.0, 0.0, -1.0]])
        >>> float(soft_target_kl(logits, logits, temperature=2.0))
        0.0
    """
    _check(temperature)
    student_logits = _as_float_array("student_logits", student_logits, class_axis=True)
    teacher_logits = _as_float_array("teacher_logits", teacher_logits, class_axis=True)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "must have the same shape"
        )
    # Computed in (at least) float32 whatever the logits' dtype: bf16 logits divided by T and
    # softmaxed in bf16 would be off by tens of percent.
    student_logits = _compute_dtype(student_logits)
    teacher_logits = _compute_dtype(teacher_logits)
    if student_logits.size == 0:  # an empty batch: nothing to match (not the mean's 0/0)
        return jnp.zeros((), student_logits.dtype) * jnp.sum(student_logits)
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    teacher = jnp.exp(log_teacher)
    # Classes the teacher gives probability 0 (-inf logits) add 0, as 0 log 0 = 0; the inner
    # where keeps their -inf - -inf out of the values and gradients.
    # A NaN (a NaN logit, or a row with every logit -inf) stays in, so the loss is NaN rather
    # than that row silently dropped.
    support = (teacher > 0) | jnp.isnan(teacher)
    log_ratio = jnp.where(support, log_teacher - log_student, 0.0)
    kl = jnp.sum(jnp.where(support, teacher * log_ratio, 0.0), axis=-1)
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
      student_logits: `(..., classes)`, e.g. `(batch, classes)`.
      teacher_logits: same shape; treated as constants.
      labels: integer class indices in `[0, classes)`, of shape `student_logits.shape[:-1]`.
        Concrete labels out of range raise; traced ones (under `jit`) are not checked, and one
        out of range makes the loss NaN.
      temperature: softmax temperature T > 0 of the soft targets, finite; checked when concrete.
      alpha: weight of the soft-target term, in [0, 1]; checked when concrete.

    Returns:
      A scalar loss.

    Raises:
      ValueError: for a T that is not a finite number > 0, alpha outside [0, 1], labels of the
        wrong shape or dtype or (when concrete) out of range, mismatched logit shapes, or
        logits that are scalars or not real floating point (integer, complex).

    Example:
        >>> s = jnp.array([[1.0, 0.0]]); t = jnp.array([[3.0, 0.0]]); y = jnp.array([0])
        >>> bool(distillation_loss(s, t, y, alpha=0.0) > 0)
        True
    """
    _check(temperature, alpha)
    student_logits = _as_float_array("student_logits", student_logits, class_axis=True)
    teacher_logits = _as_float_array("teacher_logits", teacher_logits, class_axis=True)
    labels = jnp.asarray(labels)
    _check_labels(labels, student_logits)
    classes = student_logits.shape[-1]
    if student_logits.size == 0:
        return soft_target_kl(student_logits, teacher_logits, temperature)
    hard = optax.softmax_cross_entropy_with_integer_labels(_compute_dtype(student_logits), labels)
    # Traced labels are not checked; one out of range makes the loss NaN rather than wrapping.
    hard = jnp.where((labels >= 0) & (labels < classes), hard, jnp.nan).mean()
    return (1.0 - alpha) * hard + alpha * soft_target_kl(student_logits, teacher_logits, temperature)


def feature_distillation_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    normalize: bool = False,
) -> jax.Array:
    """Mean squared error between intermediate features (FitNets-style hints).

    Computed in (at least) float32, so large bf16/f16 features do not overflow; an empty batch
    gives 0.

    For a structurally pruned student whose widths differ, project the student's features to the
    teacher's width first (e.g. with a learned `nn.Dense`) and pass the projection.

    Args:
      student_features: `(batch, ...)`.
      teacher_features: same shape; treated as constants.
      normalize: L2-normalise each example's features first (scale-free matching). An
        all-zero example stays zero, with finite gradients.

    Returns:
      A scalar.

    Raises:
      ValueError: when the shapes differ, for features that are not real floating point
        (integer, bool, complex), a `normalize` that is not a bool, or scalar features with
        `normalize=True`.

    Example:
        >>> f = jnp.ones((2, 4))
        >>> float(feature_distillation_loss(f, 2 * f, normalize=True))
        0.0
    """
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    student_features = _as_float_array("student_features", student_features, class_axis=False)
    teacher_features = _as_float_array("teacher_features", teacher_features, class_axis=False)
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {student_features.shape} and teacher features "
            f"{teacher_features.shape} must have the same shape (project the student first)"
        )
    teacher = _compute_dtype(jax.lax.stop_gradient(teacher_features))
    student = _compute_dtype(student_features)
    if normalize and student.ndim == 0:
        raise ValueError(
            "normalize=True needs features with a batch axis, got student_features of shape ()"
        )
    if student.size == 0:  # an empty batch: nothing to match (not the mean's 0/0)
        return jnp.zeros((), student.dtype) * jnp.sum(student)
    if normalize:
        student, teacher = _unit_rows(student), _unit_rows(teacher)
    return jnp.mean((student - teacher) ** 2)


def _unit_rows(x: jax.Array) -> jax.Array:
    """Each example's features scaled to unit L2 norm; an all-zero example stays zero."""
    x = x.reshape(x.shape[0], -1)
    # Dividing by the largest magnitude first keeps tiny features from underflowing in the norm;
    # the wheres keep the zero row's 0/0 out of values and gradients. The result does not depend
    # on the scale, so its gradient is exactly zero: stopping it keeps the -x / scale**2 term,
    # which overflows for features near 1e-20, out of the backward pass.
    scale = lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    x = x / jnp.where(scale > 0, scale, 1)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.where(squared > 0, squared, 1))
