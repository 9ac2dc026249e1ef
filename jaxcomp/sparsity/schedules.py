"""Sparsity schedules: optax schedules `step -> sparsity`.

`jaxcomp.sparsity.prune` recomputes the masks on the steps where the scheduled sparsity changes
(and where dynamic sparse training says so), so a schedule's value also says *when* to prune:
`polynomial_sparsity(..., frequency=100)` changes every 100 steps between `begin_step` and
`end_step`, hence the masks are updated every 100 steps. The step before the first is taken to
have sparsity 0. Any optax schedule works (`optax.join_schedules`, `optax.piecewise_constant_schedule`
...); these constructors validate their arguments.

Example:
    >>> schedule = polynomial_sparsity(0.9, begin_step=0, end_step=100, frequency=10)
    >>> [round(float(schedule(t)), 3) for t in (0, 9, 10, 50, 100, 1000)]
    [0.0, 0.0, 0.244, 0.787, 0.9, 0.9]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp._checks import as_int

__all__ = [
    "constant_sparsity",
    "iterative_sparsity",
    "one_shot_sparsity",
    "polynomial_sparsity",
]


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """`value` as a float, or `ValueError` naming `what` if it is not a number in [0, 1)."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or (
            hasattr(value, "dtype") and np.dtype(value.dtype).kind not in "iuf"):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}") from e
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return number


def check_array_sparsity(value: jax.typing.ArrayLike, what: str = "sparsity") -> None:
    """Like `check_sparsity` for anything concrete (numbers, numpy or JAX scalars, 0-d arrays);
    traced values pass unchecked."""
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"{what} must be a scalar, got an array of shape {array.shape}")
    check_sparsity(array.item() if array.dtype.kind in "iuf" else value, what)


def check_step(value: int, what: str) -> int:
    """`value` as a Python int, or a `ValueError` naming `what` unless it is an int in
    [0, 2**31): steps count in int32 (the wrapper's state and jnp step arrays)."""
    if as_int(value) is None or not 0 <= value < 2**31:
        raise ValueError(f"{what} must be an int in [0, 2**31), got {value!r}")
    return as_int(value)


def _steps(step: jax.typing.ArrayLike) -> jax.Array:
    """A schedule's argument as int32: an int or an integer array (traced or not); a float step
    is not silently truncated, nor a step past int32 silently wrapped."""
    dtype = getattr(step, "dtype", None)
    if dtype is None:
        number = as_int(step)
        if number is None:
            raise ValueError(f"a sparsity schedule takes an integer step, got {step!r}")
        step = np.asarray(number)
    elif not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"a sparsity schedule takes integer steps, got an array of dtype {dtype}")
    if not isinstance(step, jax.core.Tracer):
        array = np.asarray(step)
        if array.size and not (-2**31 <= array.min() and array.max() < 2**31):
            raise ValueError(f"a sparsity schedule's step must fit in int32, got "
                             f"{array.max() if array.max() >= 2**31 else array.min()}")
    return jnp.asarray(step).astype(jnp.int32)


def constant_sparsity(sparsity: float) -> optax.Schedule:
    """The same sparsity at every step (masks computed once, on the first step).

    Raises:
      ValueError: if `sparsity` is not in [0, 1).

    Example:
        >>> float(constant_sparsity(0.5)(1000))
        0.5
    """
    sparsity = check_sparsity(sparsity)
    return lambda step: jnp.full(jnp.shape(_steps(step)), sparsity, jnp.float32)


def one_shot_sparsity(sparsity: float, step: int = 0) -> optax.Schedule:
    """Dense before `step`, `sparsity` from `step` on: one mask update, at `step`.

    Raises:
      ValueError: if `sparsity` is not in [0, 1) or `step` is negative.

    Example:
        >>> schedule = one_shot_sparsity(0.8, step=5)
        >>> round(float(schedule(4)), 3), round(float(schedule(5)), 3)
        (0.0, 0.8)
    """
    sparsity = check_sparsity(sparsity)
    at = check_step(step, "step")
    return lambda t: jnp.where(_steps(t) >= at, jnp.float32(sparsity), jnp.float32(0.0))


def iterative_sparsity(steps: Sequence[int], sparsities: Sequence[float]) -> optax.Schedule:
    """Iterative pruning: from `steps[i]` on, sparsity `sparsities[i]` (dense before `steps[0]`).

    Args:
      steps: strictly increasing, non-negative steps.
      sparsities: one value in [0, 1) per step.

    Raises:
      ValueError: if the lengths differ, steps are not strictly increasing and non-negative, or
        a sparsity is outside [0, 1).

    Example:
        >>> schedule = iterative_sparsity([0, 100, 200], [0.5, 0.75, 0.875])
        >>> [float(schedule(t)) for t in (0, 99, 100, 250)]
        [0.5, 0.5, 0.75, 0.875]
    """
    for name, seq in (("steps", steps), ("sparsities", sparsities)):
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise ValueError(f"iterative_sparsity: {name} must be a sequence, got {seq!r}")
    steps = [check_step(s, f"steps[{i}]") for i, s in enumerate(steps)]
    values = [check_sparsity(v, f"sparsities[{i}]") for i, v in enumerate(sparsities)]
    if not steps or len(steps) != len(values):
        raise ValueError(
            f"iterative_sparsity needs one sparsity per step, got {len(steps)} steps and "
            f"{len(values)} sparsities"
        )
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"iterative_sparsity: steps must be strictly increasing, got {steps}")
    boundaries = jnp.asarray(steps, jnp.int32)
    table = jnp.asarray([0.0, *values], jnp.float32)

    def schedule(step):
        index = jnp.sum(_steps(step)[..., None] >= boundaries, axis=-1)
        return table[index]

    return schedule


def polynomial_sparsity(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
    power: float = 3.0,
) -> optax.Schedule:
    """Zhu & Gupta (2017) gradual pruning: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3.

    The sparsity is 0 before `begin_step`, `initial_sparsity` at `begin_step`, changes every
    `frequency` steps (the step is rounded down to `begin_step + j * frequency`), reaches
    `final_sparsity` exactly at `end_step` (even when `end_step - begin_step` is not a multiple
    of `frequency`) and stays there.

    Args:
      final_sparsity: sparsity from `end_step` on, in [0, 1).
      begin_step: first pruning step.
      end_step: step at which `final_sparsity` is reached; >= `begin_step`.
      initial_sparsity: sparsity at `begin_step`, in [0, 1).
      frequency: steps between mask updates, >= 1.
      power: the exponent (3 in the paper), > 0.

    Returns:
      An optax schedule.

    Raises:
      ValueError: for a sparsity outside [0, 1), a negative step, `end_step < begin_step`,
        `frequency < 1` or `power <= 0`.

    Example:
        >>> schedule = polynomial_sparsity(0.8, begin_step=10, end_step=20)
        >>> [round(float(schedule(t)), 3) for t in (0, 10, 15, 20)]
        [0.0, 0.0, 0.7, 0.8]
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    begin = check_step(begin_step, "begin_step")
    end = check_step(end_step, "end_step")
    if end < begin:
        raise ValueError(f"end_step={end} precedes begin_step={begin}")
    if (as_int(frequency) or 0) < 1:
        raise ValueError(f"frequency must be a positive int, got {frequency!r}")
    frequency = as_int(frequency)
    if not power > 0:
        raise ValueError(f"power must be positive, got {power!r}")
    span = max(end - begin, 1)

    def schedule(step):
        step = _steps(step)
        on_grid = begin + (jnp.maximum(step - begin, 0) // frequency) * frequency
        at = jnp.where(step >= end, end, jnp.minimum(on_grid, end))
        progress = (at - begin).astype(jnp.float32) / span
        value = final + (initial - final) * (1.0 - progress) ** power
        value = jnp.where(at >= end, final, value)
        return jnp.where(step < begin, 0.0, value).astype(jnp.float32)

    return schedule
