"""Integer serving of Dense layers vs float32, same process.

For K = N in (1024, 4096) and batch sizes 1, 8, 64, 256, times `y = x @ W + b` in float32
against `y = qdot(x, Q) + b` with `Q` the per-channel int8 `QArray` of `W`: activations are
quantized per tensor inside the timed function (dynamic ranges), the product runs
int8 x int8 -> int32, and the scales are applied after it. `prepare_for_serving` picks the
weight layout once per shape and batch size (allowed to fall back to float32 for a shape where
float is measured faster, which is then reported), and `qdot`'s "auto" strategy measures its
options once per shape; both happen before timing. Also reports the bytes of the weights
(scales included) for int8 and int4 storage.

The bare `lax.dot_general(int8, int8) -> int32` (best layout, nothing else) is timed in the same
rounds as the ceiling any integer serving path can reach on this backend.

Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_serving.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcomp.core import stored_nbytes
from jaxcomp.quant import QArray, QuantSpec, prepare_for_serving, qdot, quantize
from jaxcomp.testing.benchmark import compare, emit_json, geomean

SIZES = (1024, 4096)
BATCHES = (1, 8, 64, 256)


@jax.jit
def float_dense(x, w, b):
    return x @ w + b


@jax.jit
def bare_int8_kn(xq, wq):
    """The bare integer product, weight (K, N): the ceiling of any int8 serving path."""
    return jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


@jax.jit
def bare_int8_nk(xq, wq_t):
    """The bare integer product, weight stored (N, K)."""
    return jax.lax.dot_general(xq, wq_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


@jax.jit
def serve_dense(x, q, b):
    """The served layer: `qdot` on a QArray, or a float matmul where float was chosen."""
    return (qdot(x, q) if isinstance(q, QArray) else x @ q) + b


def main() -> None:
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    speedups: dict[tuple[int, int], float] = {}
    # The bare int8 x int8 -> int32 dot (best layout, no activation quantization, no scales):
    # what the backend's integer kernel itself gives, measured in the same rounds.
    bare: dict[tuple[int, int], float] = {}
    ratios: dict[str, list[float]] = {"int8": [], "int4": []}
    choices = {}
    for size in SIZES:
        kw, kb = jax.random.split(jax.random.key(size))
        w = jax.random.normal(kw, (size, size), jnp.float32) / size**0.5
        b = jax.random.normal(kb, (size,), jnp.float32) * 0.1
        q8 = quantize(w, QuantSpec(bits=8, channel_axes=(-1,)))
        q4 = quantize(w, QuantSpec(bits=4, channel_axes=(-1,)))
        ratios["int8"].append(stored_nbytes(w) / q8.nbytes)
        ratios["int4"].append(stored_nbytes(w) / q4.nbytes)
        print(f"K = N = {size}: {stored_nbytes(w) / 2**20:.1f} MiB float32 -> "
              f"{q8.nbytes / 2**20:.2f} MiB int8, {q4.nbytes / 2**20:.2f} MiB int4 (scales included)")
        for batch in BATCHES:
            # The deployment's batch size is known: the layout (or, where measured faster, a
            # float32 fallback for this layer) is chosen once for it, before timing.
            served = prepare_for_serving(q8, batch_sizes=(batch,), allow_float=True)
            choice = ("float32 fallback" if not isinstance(served, QArray)
                      else "int8 (N, K)" if served.perm == (1, 0) else "int8 (K, N)")
            choices[(size, batch)] = choice
            x = jax.random.normal(jax.random.key(batch), (batch, size), jnp.float32)
            err = jnp.abs(serve_dense(x, served, b) - float_dense(x, w, b)).max()
            rounds = 30 if size * size * batch < 2**26 else 12
            number = 10 if size * size * batch < 2**24 else 1
            xq = jax.random.randint(jax.random.key(1), x.shape, -127, 128).astype(jnp.int8)
            times = compare(
                {"float32": (float_dense, (x, w, b)), "int8": (serve_dense, (x, served, b)),
                 "bare (K, N)": (bare_int8_kn, (xq, q8.values)),
                 "bare (N, K)": (bare_int8_nk, (xq, q8.values.T.copy()))},
                rounds=rounds, number=number,
            )
            speedups[(size, batch)] = times["float32"] / times["int8"]
            bare[(size, batch)] = times["float32"] / min(times["bare (K, N)"], times["bare (N, K)"])
            print(f"  batch {batch:4d}: float32 {times['float32'] * 1e3:8.3f} ms  served "
                  f"{times['int8'] * 1e3:8.3f} ms  speedup {speedups[(size, batch)]:5.2f}x  "
                  f"[{choice}] (max |error| {float(err):.4f}); bare int8 dot alone "
                  f"{bare[(size, batch)]:5.2f}x", flush=True)
    ge8 = [v for (size, batch), v in speedups.items() if batch >= 8]
    bare_ge8 = [v for (size, batch), v in bare.items() if batch >= 8]
    b1 = [v for (size, batch), v in speedups.items() if batch == 1]
    emit_json(
        "int8_serving",
        geomean_speedup_batch_ge8=geomean(ge8),
        min_speedup_batch_ge8=min(ge8),
        min_speedup_batch1=min(b1),
        weight_bytes_ratio_int8=min(ratios["int8"]),
        weight_bytes_ratio_int4=min(ratios["int4"]),
        float_fallbacks=sum(c == "float32 fallback" for c in choices.values()),
        bare_int8_geomean_speedup_batch_ge8=geomean(bare_ge8),
        bare_int8_min_speedup_batch_ge8=min(bare_ge8),
        **{f"speedup_k{size}_b{batch}": v for (size, batch), v in speedups.items()},
    )


if __name__ == "__main__":
    main()
