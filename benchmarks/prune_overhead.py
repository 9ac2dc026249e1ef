"""Train-step overhead of `jaxcomp.sparsity.prune` against the plain optax optimizer.

LeNet-300-100 on the MNIST split (batch 64, Adam), pruned with Zhu & Gupta's polynomial
schedule to 90% with a mask update every 10 steps. Two figures, both medians of interleaved
rounds in one process:

* `step_ratio_no_update`: one wrapped step on a step without a mask update over one plain step
  (goal <= 1.05);
* `step_ratio_amortized`: ten consecutive wrapped steps, one of which updates the masks, over ten
  plain steps (goal <= 1.10).

Run: `PYTHONPATH=$PWD python benchmarks/prune_overhead.py`
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxcomp.sparsity as sp
from jaxcomp.testing import benchmark, data, models, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    dataset = data.load_mnist_t10k()
    model = models.MLP()
    variables = train.init_linen(model, dataset.input_shape)
    params = variables["params"]
    x = jnp.asarray(dataset.x_train[: args.batch])
    y = jnp.asarray(dataset.y_train[: args.batch])

    schedule = sp.polynomial_sparsity(0.9, begin_step=0, end_step=3000, frequency=10)
    plain_tx = optax.adam(1e-3)
    pruned_tx = sp.prune(optax.adam(1e-3), sp.Pruner(sparsity=schedule))
    plain_step = train.make_linen_train_step(model, plain_tx)
    pruned_step = train.make_linen_train_step(model, pruned_tx)

    plain_state = train.TrainState(params, {}, plain_tx.init(params))
    pruned_state = train.TrainState(params, {}, pruned_tx.init(params))
    # Run to step 15 (masks updated at steps 0 and 10), then time from there.
    for _ in range(15):
        pruned_state, _ = pruned_step(pruned_state, x, y)
        plain_state, _ = plain_step(plain_state, x, y)
    no_update_state = pruned_state
    print(f"masks at step {int(no_update_state.opt_state.count)}: sparsity "
          f"{float(sp.sparsity_of(sp.masks_of(no_update_state.opt_state)).total):.3f}")
    for _ in range(5):
        pruned_state, _ = pruned_step(pruned_state, x, y)
    update_state = pruned_state  # count 20: its first step recomputes the masks

    def ten_steps(step, state):
        for _ in range(10):
            state, loss = step(state, x, y)
        return loss

    times = benchmark.compare(
        {
            "plain step": (plain_step, (plain_state, x, y)),
            "pruned step (no mask update)": (pruned_step, (no_update_state, x, y)),
        },
        rounds=args.rounds,
        warmup=3,
        number=10,
    )
    for name, seconds in times.items():
        print(f"{name:32s} {1e3 * seconds:8.3f} ms")
    ratio_no_update = times["pruned step (no mask update)"] / times["plain step"]
    print(f"ratio without mask update: {ratio_no_update:.3f} (goal <= 1.05)")

    times = benchmark.compare(
        {
            "10 plain steps": (lambda s: ten_steps(plain_step, s), (plain_state,)),
            "10 pruned steps (1 update)": (lambda s: ten_steps(pruned_step, s), (update_state,)),
        },
        rounds=args.rounds,
        warmup=2,
    )
    for name, seconds in times.items():
        print(f"{name:32s} {1e3 * seconds:8.3f} ms")
    ratio_amortized = times["10 pruned steps (1 update)"] / times["10 plain steps"]
    print(f"ratio amortized over 10 steps with one mask update: {ratio_amortized:.3f} "
          "(goal <= 1.10)")
    benchmark.emit_json(
        "prune_overhead",
        step_ratio_no_update=ratio_no_update,
        step_ratio_amortized=ratio_amortized,
        batch=args.batch,
        plain_step_ms=1e3 * times["10 plain steps"] / 10,
        devices=str(jax.devices()[0].platform),
    )


if __name__ == "__main__":
    main()
