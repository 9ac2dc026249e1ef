"""Timing helpers: medians exclude compilation; JSON lines are flat."""

import json

import jax
import jax.numpy as jnp

from jaxcomp.testing.benchmark import compare, emit_json, geomean, time_fn


def test_time_fn_excludes_the_compile():
    calls = []

    @jax.jit
    def f(x):
        calls.append(1)  # runs at trace time only
        return x @ x

    x = jnp.ones((32, 32))
    assert time_fn(f, x, repeats=3) > 0
    assert len(calls) == 1


def test_compare_returns_a_median_per_function():
    x = jnp.ones((32, 32))
    times = compare({"add": (jax.jit(lambda x: x + 1), (x,)), "mul": (jax.jit(lambda x: x @ x), (x,))},
                    rounds=3)
    assert set(times) == {"add", "mul"} and all(t > 0 for t in times.values())


def test_emit_json_prints_one_flat_line(capsys):
    emit_json("demo", ratio=1.23456789, count=3)
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == {"benchmark": "demo", "ratio": 1.23457, "count": 3}


def test_geomean():
    assert abs(geomean([1.0, 4.0]) - 2.0) < 1e-12
