"""Measured choices: time candidate implementations once per shape, outside any trace.

`qdot`, `qconv` and `prepare_for_serving` pick how a product runs (strategy, weight layout) by
timing the candidates on the current backend the first time a shape is seen and caching the
winner for the rest of the process. Timing runs in a worker thread, so it uses concrete arrays at
full dispatch speed even when the caller is being traced, and the traced program itself never
measures anything.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.quant.qarray import QArray

__all__ = ["chosen_strategies", "measure_once"]

# Below this many multiply-accumulates a call costs microseconds whatever runs it: not measured.
MIN_MEASURED_MACS = 1 << 20
_CHOICES: dict[tuple, str] = {}


def chosen_strategies() -> dict[tuple, str]:
    """The strategies `strategy="auto"` measured so far in this process, by shape key (a copy).

    Example:
        >>> isinstance(chosen_strategies(), dict)
        True
    """
    return dict(_CHOICES)


def device_key() -> tuple[str, str]:
    """(platform, device kind) of the default device: part of every cache key."""
    device = jax.devices()[0]
    return device.platform, getattr(device, "device_kind", "")


def measure_once(key: tuple, measure: Callable[[], dict[str, float]]) -> str:
    """The cached choice for `key`, or the fastest name of `measure()`'s timings (then cached).

    `measure` runs in a worker thread (see `outside_trace`) and returns `{name: seconds}`.
    """
    if key not in _CHOICES:
        times = outside_trace(measure)
        _CHOICES[key] = min(times, key=times.get)
    return _CHOICES[key]


def outside_trace(measure: Callable[[], Any]) -> Any:
    """Runs `measure` in a fresh thread: JAX's trace state is per thread, so concrete timing
    runs at full speed even while the caller is being traced (the hot path never measures)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(measure).result()


def time_calls(fns: dict[str, Any], args: tuple, rounds: int = 7, sample_s: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each jitted fn: compile excluded, candidates interleaved round
    by round, each sample at least `sample_s` long (many calls for fast functions)."""
    number = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        number[name] = max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / number[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def random_like(w: QArray, key: jax.Array) -> QArray:
    """A QArray with the structure of `w` and concrete random codes (for timing only)."""
    k1, k2 = jax.random.split(key)
    info = jnp.iinfo(w.values.dtype) if jnp.issubdtype(w.values.dtype, jnp.integer) else None
    if info is None:
        values = jax.random.normal(k1, w.values.shape).astype(w.values.dtype)
    else:
        values = jax.random.randint(k1, w.values.shape, int(info.min), int(info.max) + 1).astype(w.values.dtype)
    scale = jax.random.uniform(k2, w.scale.shape, jnp.float32, 0.01, 0.02)
    zero = None if w.zero_point is None else jnp.zeros(w.zero_point.shape, w.zero_point.dtype)
    return QArray(values, scale, zero, w.spec, w.dense_dtype, w.perm)
