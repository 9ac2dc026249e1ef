"""Integer serving of Dense layers vs float32, same process.

For K = N in (1024, 4096) and batch sizes 1, 8, 64, 256, times `y = x @ W + b` in float32
against `y = qdot(x, Q) + b` with `Q` the per-channel int8 `QArray` of `W`: activations are
quantized per tensor inside the timed function (dynamic ranges), the product runs
int8 x int8 -> int32, and the scales are applied after it. `prepare_for_serving` picks the
weight layout once per shape and `qdot`'s "auto" strategy measures its options once per shape;
both happen before timing. Also reports the bytes of the weights (scales included) for int8 and
int4 storage.

Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_serving.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcomp.core import stored_nbytes
from jaxcomp.quant import QuantSpec, chosen_strategies, prepare_for_serving, qdot, quantize
from jaxcomp.testing.benchmark import compare, emit_json, geomean

SIZES = (1024, 4096)
BATCHES = (1, 8, 64, 256)


@jax.jit
def float_dense(x, w, b):
    return x @ w + b


@jax.jit
def int8_dense(x, q, b):
    return qdot(x, q) + b


def main() -> None:
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    speedups: dict[tuple[int, int], float] = {}
    ratios = {}
    for size in SIZES:
        kw, kb = jax.random.split(jax.random.key(size))
        w = jax.random.normal(kw, (size, size), jnp.float32) / size**0.5
        b = jax.random.normal(kb, (size,), jnp.float32) * 0.1
        q8 = quantize(w, QuantSpec(bits=8, channel_axes=(-1,)))
        q4 = quantize(w, QuantSpec(bits=4, channel_axes=(-1,)))
        ratios.setdefault("int8", []).append(stored_nbytes(w) / q8.nbytes)
        ratios.setdefault("int4", []).append(stored_nbytes(w) / q4.nbytes)
        served = prepare_for_serving(q8, batch_sizes=BATCHES)
        layout = "(N, K)" if served.perm == (1, 0) else "(K, N)"
        print(f"K = N = {size}: int8 weights stored {layout}; {stored_nbytes(w) / 2**20:.1f} MiB "
              f"float32 -> {q8.nbytes / 2**20:.2f} MiB int8, {q4.nbytes / 2**20:.2f} MiB int4")
        for batch in BATCHES:
            x = jax.random.normal(jax.random.key(batch), (batch, size), jnp.float32)
            err = jnp.abs(int8_dense(x, served, b) - float_dense(x, w, b)).max()
            rounds = 30 if size * size * batch < 2**26 else 12
            number = 10 if size * size * batch < 2**24 else 1
            times = compare(
                {"float32": (float_dense, (x, w, b)), "int8": (int8_dense, (x, served, b))},
                rounds=rounds, number=number,
            )
            speedups[(size, batch)] = times["float32"] / times["int8"]
            print(f"  batch {batch:4d}: float32 {times['float32'] * 1e3:8.3f} ms  int8 "
                  f"{times['int8'] * 1e3:8.3f} ms  speedup {speedups[(size, batch)]:5.2f}x  "
                  f"(max |error| {float(err):.4f})", flush=True)
    print("strategies chosen:")
    for key, value in chosen_strategies().items():
        if key[0] != "layout":
            print(f"  x {key[2]}, w {key[4]} stored {key[5]}: {value}")
    ge8 = [v for (size, batch), v in speedups.items() if batch >= 8]
    b1 = [v for (size, batch), v in speedups.items() if batch == 1]
    emit_json(
        "int8_serving",
        geomean_speedup_batch_ge8=geomean(ge8),
        min_speedup_batch_ge8=min(ge8),
        min_speedup_batch1=min(b1),
        weight_bytes_ratio_int8=min(ratios["int8"]),
        weight_bytes_ratio_int4=min(ratios["int4"]),
        **{f"speedup_k{size}_b{batch}": v for (size, batch), v in speedups.items()},
    )


if __name__ == "__main__":
    main()
