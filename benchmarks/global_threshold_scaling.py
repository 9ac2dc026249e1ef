"""Time and memory of the global magnitude threshold, against a full sort, at 1M/10M/100M params.

The parameters are spread over 100 leaves. The candidate is
`jaxcomp.sparsity.global_threshold_masks` on |w| at 90% sparsity (a search by counting: no sort,
no concatenation); the baseline concatenates every |w|, sorts, and thresholds at the k-th value.
Both are jitted and agree on every weight off the threshold (checked; at 100M float32 |w|
has ties at the threshold, which the search breaks by position to prune exactly k). Figures:

* `time_per_param_ratio_100m_1m`: (time / param at 100M) / (time / param at 1M), goal <= 1.5;
* `speedup_vs_sort_100m`: sort time / candidate time at 100M, goal >= 3;
* peak memory: XLA's temporary buffers of each compiled function, and the process's peak RSS.

Arrays are freed between sizes. Run: `PYTHONPATH=$PWD python benchmarks/global_threshold_scaling.py`
(`--sizes 1e6 1e7` for a quick run).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcomp.sparsity as sp
from jaxcomp.testing import benchmark

SPARSITY = 0.9
LEAVES = 100


def make_params(total: int) -> list[jax.Array]:
    per_leaf = total // LEAVES
    cols = 1000 if per_leaf >= 1000 else per_leaf
    keys = jax.random.split(jax.random.key(0), LEAVES)
    make = jax.jit(lambda k: jax.random.normal(k, (per_leaf // cols, cols)))
    return [make(k) for k in keys]


@jax.jit
def candidate(params):
    return sp.global_threshold_masks([jnp.abs(p) for p in params], SPARSITY)


@jax.jit
def full_sort(params):
    scores = jnp.concatenate([jnp.abs(p).ravel() for p in params])
    k = round(SPARSITY * scores.size)
    threshold = jnp.sort(scores)[k - 1]
    return [jnp.abs(p) > threshold for p in params], threshold


@jax.jit
def disagreements(params, masks, threshold):
    # Off the threshold both keep exactly |w| > threshold; ties at it may go either way (the
    # search breaks them by position to prune exactly k, the sort prunes them all).
    return sum(jnp.sum((m != (jnp.abs(p) > threshold)) & (jnp.abs(p) != threshold))
               for p, m in zip(params, masks))


def temp_mib(fn, params) -> float:
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes]
    per_param, sort_per_param, figures = {}, {}, {}
    for total in sizes:
        params = make_params(total)
        total = sum(p.size for p in params)
        start = time.perf_counter()
        masks = jax.block_until_ready(candidate(params))
        print(f"{total:>11,} params: compiled and ran the search in {time.perf_counter() - start:.1f} s")
        pruned = sum(int((~np.asarray(m)).sum()) for m in masks)
        assert pruned == round(SPARSITY * total), (pruned, total)
        _, threshold = full_sort(params)
        assert int(disagreements(params, masks, threshold)) == 0
        del masks
        # Big sizes run a few rounds: the sort alone takes tens of seconds at 100M.
        rounds = 10 if total <= 10**7 else 2
        times = benchmark.compare(
            {"search": (candidate, (params,)), "sort": (full_sort, (params,))},
            rounds=rounds, warmup=1,
        )
        per_param[total] = times["search"] / total
        sort_per_param[total] = times["sort"] / total
        temp_search, temp_sort = temp_mib(candidate, params), temp_mib(full_sort, params)
        print(f"{total:>11,} params: search {1e3 * times['search']:9.1f} ms "
              f"({1e9 * per_param[total]:.2f} ns/param, temp {temp_search:.0f} MiB) | sort "
              f"{1e3 * times['sort']:9.1f} ms (temp {temp_sort:.0f} MiB) | speedup "
              f"{times['sort'] / times['search']:.1f}x | peak RSS {peak_rss_mib():.0f} MiB")
        figures[total] = (times["search"], times["sort"], temp_search, temp_sort)
        del params
        gc.collect()
    small, large = min(sizes), max(sizes)
    small = min(per_param)
    large = max(per_param)
    ratio = per_param[large] / per_param[small]
    speedup = figures[large][1] / figures[large][0]
    print(f"time per param, {large:,} vs {small:,}: {ratio:.2f}x (goal <= 1.5); "
          f"speedup vs sort at {large:,}: {speedup:.1f}x (goal >= 3)")
    benchmark.emit_json(
        "global_threshold_scaling",
        time_per_param_ratio_100m_1m=ratio,
        speedup_vs_sort_100m=speedup,
        **{f"search_ms_{n}": 1e3 * f[0] for n, f in figures.items()},
        **{f"sort_ms_{n}": 1e3 * f[1] for n, f in figures.items()},
        **{f"search_temp_mib_{n}": f[2] for n, f in figures.items()},
        **{f"sort_temp_mib_{n}": f[3] for n, f in figures.items()},
        peak_rss_mib=peak_rss_mib(),
    )


if __name__ == "__main__":
    main()
