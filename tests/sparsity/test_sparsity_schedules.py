"""Sparsity schedules: values, update steps, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcomp.sparsity as sp


def test_polynomial_matches_zhu_gupta_on_its_grid():
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3 on steps t0 + j*dt, constant after."""
    schedule = sp.polynomial_sparsity(0.9, begin_step=10, end_step=50, frequency=10,
                                      initial_sparsity=0.1)
    values = np.asarray(schedule(jnp.arange(80)))
    for t in range(0, 80):
        if t < 10:
            expected = 0.0
        else:
            grid = min(10 + (t - 10) // 10 * 10, 50)
            expected = 0.9 + (0.1 - 0.9) * (1 - (grid - 10) / 40) ** 3
        assert abs(values[t] - expected) < 1e-6, t


def test_polynomial_reaches_the_final_sparsity_off_grid():
    """end_step not on the frequency grid still reaches the final sparsity at end_step."""
    schedule = sp.polynomial_sparsity(0.8, begin_step=0, end_step=25, frequency=10)
    assert float(schedule(24)) < 0.8
    assert float(schedule(25)) == pytest.approx(0.8)


def test_schedules_jit_with_traced_steps_and_compose_with_optax():
    """Schedules accept traced int steps and work inside optax.join_schedules."""
    joined = optax.join_schedules([sp.one_shot_sparsity(0.5, 3), sp.constant_sparsity(0.7)], [6])
    values = jax.jit(jax.vmap(joined))(jnp.arange(9))
    np.testing.assert_allclose(values, [0, 0, 0, 0.5, 0.5, 0.5, 0.7, 0.7, 0.7])


def test_iterative_steps():
    """iterative_sparsity holds each value from its step on."""
    schedule = sp.iterative_sparsity([2, 5], [0.3, 0.6])
    np.testing.assert_allclose(schedule(jnp.arange(7)),
                               [0, 0, 0.3, 0.3, 0.3, 0.6, 0.6], rtol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: sp.polynomial_sparsity(0.9, begin_step=10, end_step=5),
        lambda: sp.polynomial_sparsity(1.0, begin_step=0, end_step=5),
        lambda: sp.polynomial_sparsity(0.5, begin_step=-1, end_step=5),
        lambda: sp.polynomial_sparsity(0.5, begin_step=0, end_step=5, frequency=0),
        lambda: sp.polynomial_sparsity(0.5, begin_step=0, end_step=5, power=0),
        lambda: sp.constant_sparsity(-0.1),
        lambda: sp.one_shot_sparsity(0.5, step=-3),
        lambda: sp.iterative_sparsity([3, 2], [0.1, 0.2]),
        lambda: sp.iterative_sparsity([1, 2], [0.1]),
        lambda: sp.iterative_sparsity([1], [1.2]),
    ],
)
def test_bad_schedules_raise_value_error(call):
    """An end before the begin, sparsity outside [0, 1), bad steps: ValueError."""
    with pytest.raises(ValueError):
        call()
