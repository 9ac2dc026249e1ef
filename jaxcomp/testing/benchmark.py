"""Timing helpers for `benchmarks/`: compile excluded, `block_until_ready`, medians, interleaving.

Every benchmark compares a candidate with a baseline measured in the same process. On a noisy
machine absolute times drift between runs, so `compare` alternates the functions round by round
and reports medians; ratios of those medians are what benchmarks print.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

__all__ = ["compare", "emit_json", "geomean", "time_fn"]


def _run(fn: Callable[..., Any], args: Sequence[Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int = 20,
    warmup: int = 2,
    number: int = 1,
) -> float:
    """Median seconds per call of `fn(*args)`, compile and warm-up excluded.

    Args:
      fn: usually a jitted function; its output is blocked on before the clock stops.
      *args: the arguments, passed unchanged to every call.
      repeats: samples taken; the median is returned.
      warmup: calls made first and not timed (the first one compiles).
      number: calls per sample, for functions too fast to time one at a time.

    Example:
        >>> f = jax.jit(lambda x: x @ x)
        >>> time_fn(f, jnp.ones((64, 64))) > 0
        True
    """
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    return statistics.median(_run(fn, args, number) for _ in range(repeats))


def compare(
    fns: Mapping[str, tuple[Callable[..., Any], Sequence[Any]]],
    *,
    rounds: int = 20,
    warmup: int = 2,
    number: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each `name: (fn, args)`, timed in interleaved rounds.

    Each round times every function once, in turn, so slow drifts of the machine hit all of them
    alike. Compilation happens in the warm-up calls, before any timing.

    Example:
        >>> x = jnp.ones((64, 64))
        >>> t = compare({"a": (jax.jit(lambda x: x + 1), (x,)), "b": (jax.jit(jnp.sin), (x,))})
        >>> sorted(t)
        ['a', 'b']
    """
    for fn, args in fns.values():
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            samples[name].append(_run(fn, args, number))
    return {name: statistics.median(s) for name, s in samples.items()}


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive numbers."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def emit_json(benchmark: str, **figures: Any) -> str:
    """Prints (and returns) the benchmark's final line: flat JSON with its figures.

    Floats are rounded to 4 significant decimals for readability; keys keep their order.

    Example:
        >>> line = emit_json("demo", speedup=2.0)
        {"benchmark": "demo", "speedup": 2.0}
    """
    flat = {"benchmark": benchmark}
    for key, value in figures.items():
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        flat[key] = value
    line = json.dumps(flat)
    print(line, flush=True)
    return line
