"""Latency of factorized layers at 4x fewer FLOPs against the dense layer, in the same process.

Claim (issue 4): Tucker-2, CP and SVD at ranks that cut FLOPs 4x run >= 2.5x faster (jitted)
than the dense layer.

* Conv 3x3, 256 -> 256 channels, SAME, on 32x32 inputs, batch 32: the dense `lax` convolution
  against `tucker2_conv` (1x1 as a matmul, 3x3 core conv, 1x1 as a matmul) and `cp_conv` (1x1
  matmul, depthwise 3x1 and 1x3 as fused multiply-adds, 1x1 matmul).
* Dense 4096 x 4096 at batch 64: `x @ W` against `svd_dense` (two matmuls).

Ranks are `ParamRatio(0.25)`: the largest ranks with a quarter of the parameters, which at stride 1
is a quarter of the FLOPs too (Tucker-2 r = (102, 102), CP r = 284, SVD r = 512). Weights are
random normal, the worst case for low rank, so the printed reconstruction errors are high; speed
does not depend on the values. The decompositions run once on the host before timing: Tucker-2
(HOOI) and SVD exactly (the SVD through the Gram matrix's eigenvectors, `svd="symeig"`, which is
exact for the leading components and several times faster than LAPACK's SVD here); CP with 40 ALS
iterations only (its speed does not depend on convergence; 200 iterations at rank 284 took over
15 minutes on this CPU). Host BLAS runs on one thread: on a shared, busy 2-core machine OpenBLAS's
spinning threads made these decompositions up to 20x slower.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxcomp
from jaxcomp.decompose import (
    ParamRatio,
    cp_conv,
    decompose_cp,
    decompose_svd,
    decompose_tucker2,
    svd_dense,
    tucker2_conv,
)
from jaxcomp.testing.benchmark import compare, emit_json

ROUNDS = 15


def one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the decompositions still run, on however many threads BLAS picks
        return contextlib.nullcontext()
    return threadpool_limits(1)


def rel_error(leaf, kernel) -> float:
    return float(jnp.linalg.norm(leaf.materialize() - kernel) / jnp.linalg.norm(kernel))


@jax.jit
def dense_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.jit
def dense_matmul(x, w):
    return x @ w


def main() -> None:
    rng = np.random.default_rng(0)
    x_conv = jnp.asarray(rng.normal(size=(32, 32, 32, 256)), jnp.float32)
    w_conv = jnp.asarray(rng.normal(size=(3, 3, 256, 256)) / 48.0, jnp.float32)
    x_dense = jnp.asarray(rng.normal(size=(64, 4096)), jnp.float32)
    w_dense = jnp.asarray(rng.normal(size=(4096, 4096)) / 64.0, jnp.float32)

    with one_blas_thread():
        start = time.perf_counter()
        tucker = decompose_tucker2(w_conv, ParamRatio(0.25))
        print(f"Tucker-2 {tucker.rank} in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        cp = decompose_cp(w_conv, ParamRatio(0.25), n_iter_max=40)
        print(f"CP rank {cp.rank[0]} in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        svd = decompose_svd(w_dense, ParamRatio(0.25), svd="symeig")
        print(f"SVD rank {svd.rank[0]} in {time.perf_counter() - start:.0f} s", flush=True)

    shape = x_conv.shape
    flops = {
        "conv": tucker.dense_flops(shape),
        "tucker2": tucker.flops(shape),
        "cp": cp.flops(shape),
        "dense": svd.dense_flops(x_dense.shape),
        "svd": svd.flops(x_dense.shape),
    }
    counted = jaxcomp.count_flops(lambda p, x: tucker2_conv(x, p), tucker, x_conv).total
    assert counted == flops["tucker2"], (counted, flops["tucker2"])
    errors = {
        "tucker2": rel_error(tucker, w_conv), "cp": rel_error(cp, w_conv), "svd": rel_error(svd, w_dense)
    }
    times = compare(
        {
            "conv": (dense_conv, (x_conv, w_conv)),
            "tucker2": (jax.jit(tucker2_conv), (x_conv, tucker)),
            "cp": (jax.jit(cp_conv), (x_conv, cp)),
            "dense": (dense_matmul, (x_dense, w_dense)),
            "svd": (jax.jit(svd_dense), (x_dense, svd)),
        },
        rounds=ROUNDS,
    )
    speedup = {
        "tucker2": times["conv"] / times["tucker2"],
        "cp": times["conv"] / times["cp"],
        "svd": times["dense"] / times["svd"],
    }
    for name, base in (("tucker2", "conv"), ("cp", "conv"), ("svd", "dense")):
        print(
            f"{name:8s} {1e3 * times[name]:8.2f} ms vs dense {1e3 * times[base]:8.2f} ms: "
            f"{speedup[name]:.2f}x faster, {flops[base] / flops[name]:.2f}x fewer FLOPs, "
            f"relative reconstruction error {errors[name]:.3f}"
        )
    emit_json(
        "decompose_speedup",
        speedup_tucker2_conv=speedup["tucker2"],
        speedup_cp_conv=speedup["cp"],
        speedup_svd_dense=speedup["svd"],
        flop_ratio_tucker2_conv=flops["conv"] / flops["tucker2"],
        flop_ratio_cp_conv=flops["conv"] / flops["cp"],
        flop_ratio_svd_dense=flops["dense"] / flops["svd"],
        rel_error_tucker2=errors["tucker2"],
        rel_error_cp=errors["cp"],
        rel_error_svd=errors["svd"],
        ms_dense_conv=1e3 * times["conv"],
        ms_dense_matmul=1e3 * times["dense"],
        backend=jax.default_backend(),
    )


if __name__ == "__main__":
    main()
