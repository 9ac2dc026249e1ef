"""Eval accuracy of pruned models against their dense twins, on the MNIST split.

Every run trains from the same initialisation, with the same batches, optimizer (Adam,
learning rate 3e-3 cosine-decayed to 0) and number of steps as its dense baseline; only the
pruning wrapper differs, and it is the one call site (`jaxcomp.sparsity.prune` around the optimizer).

* `acc_mag90`: LeNet-300-100, unstructured magnitude pruning of every kernel to 90% with Zhu &
  Gupta's cubic schedule, ending at 60% of training so the surviving weights recover
  (goal: >= `acc_dense` - 0.3 point). `sparsity_mag90` counts the zeros of the final kernels.
* `acc_cnn_nm24`: LeNet-5 (28x28 input), 2:4 sparsity along the input axis of every kernel
  after one dense epoch, then trained with the 2:4 masks fixed (goal: within 0.5 point of
  `acc_cnn_dense`).
* `acc_rigl90`: LeNet-300-100, RigL at 90% (ERK distribution, random initial topology, 30% drop
  fraction cosine-decayed to 75% of training, updates every 100 steps; goal: within 1 point of
  `acc_dense`). `sparsity_rigl90` counts the zeros of the final kernels.

With `--seeds N` every figure is the mean over N seeds (initialisation and batch order).

Run: `PYTHONPATH=$PWD python benchmarks/prune_accuracy.py`
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

import jaxcomp.sparsity as sp
from jaxcomp.testing import benchmark, data, models, train

BATCH = 64


def kernel_sparsity(params) -> float:
    """Fraction of exact zeros among the weights of every kernel of `params`."""
    kernels = [np.asarray(leaf) for path, leaf in
               jax.tree_util.tree_leaves_with_path(params)
               if jax.tree_util.keystr(path).endswith("['kernel']")]
    return sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)


def run(name, model, dataset, tx, *, epochs, seed, verbose):
    """Trains `model` from init `seed` with `tx`; returns (eval accuracy, final params)."""
    start = time.perf_counter()
    variables = train.init_linen(model, dataset.input_shape, seed=seed)
    variables, _ = train.fit_linen(
        model, variables, dataset, tx, epochs=epochs, batch_size=BATCH, seed=1000 * seed,
        log=(lambda line: print(f"  {name}: {line}")) if verbose else None)
    accuracy = train.evaluate_linen(model, variables, dataset.x_eval, dataset.y_eval)
    print(f"{name:12s} seed {seed}: eval accuracy {100 * accuracy:6.2f}%  "
          f"kernel sparsity {kernel_sparsity(variables['params']):.4f}  "
          f"({time.perf_counter() - start:.1f} s)")
    return accuracy, variables["params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--verbose", action="store_true", help="one line per epoch")
    args = parser.parse_args()

    dataset = data.load_mnist_t10k()
    steps_per_epoch = -(-len(dataset.y_train) // BATCH)
    mlp_steps = args.mlp_epochs * steps_per_epoch
    cnn_steps = args.cnn_epochs * steps_per_epoch

    def adam(total_steps):
        return optax.adam(optax.cosine_decay_schedule(args.lr, total_steps))

    mag90 = sp.Pruner(sparsity=sp.polynomial_sparsity(
        0.9, begin_step=steps_per_epoch, end_step=int(0.6 * mlp_steps), frequency=25))
    nm24 = sp.Pruner(sparsity=sp.one_shot_sparsity(0.5, step=steps_per_epoch),
                     granularity=sp.NM(n=2, m=4))
    rigl90 = sp.Pruner(sparsity=0.9, score=sp.Random(), distribution=sp.ERK(),
                       dynamic=sp.RigL(update_every=100, end_step=int(0.75 * mlp_steps),
                                       drop_fraction=0.3))

    results: dict[str, list[float]] = {}
    mlp, cnn = models.MLP(), models.LeNet5()
    for seed in range(args.seeds):
        runs = {
            "dense": (mlp, adam(mlp_steps), args.mlp_epochs),
            "mag90": (mlp, sp.prune(adam(mlp_steps), mag90), args.mlp_epochs),
            "rigl90": (mlp, sp.prune(adam(mlp_steps), rigl90, key=jax.random.key(seed)),
                       args.mlp_epochs),
            "cnn_dense": (cnn, adam(cnn_steps), args.cnn_epochs),
            "cnn_nm24": (cnn, sp.prune(adam(cnn_steps), nm24), args.cnn_epochs),
        }
        for name, (model, tx, epochs) in runs.items():
            accuracy, params = run(name, model, dataset, tx, epochs=epochs, seed=seed,
                                   verbose=args.verbose)
            results.setdefault(f"acc_{name}", []).append(100 * accuracy)
            if name in ("mag90", "rigl90", "cnn_nm24"):
                results.setdefault(f"sparsity_{name}", []).append(kernel_sparsity(params))

    figures = {key: statistics.mean(values) for key, values in results.items()}
    checks = [
        ("90% magnitude", figures["acc_mag90"] - figures["acc_dense"], -0.3),
        ("2:4 on LeNet-5", figures["acc_cnn_nm24"] - figures["acc_cnn_dense"], -0.5),
        ("RigL 90%", figures["acc_rigl90"] - figures["acc_dense"], -1.0),
    ]
    for name, delta, goal in checks:
        print(f"{name:16s} {delta:+.2f} points vs dense (goal >= {goal:+.1f}): "
              f"{'met' if delta >= goal else 'NOT met'}")
    benchmark.emit_json(
        "prune_accuracy",
        **figures,
        seeds=args.seeds,
        mlp_epochs=args.mlp_epochs,
        cnn_epochs=args.cnn_epochs,
    )


if __name__ == "__main__":
    main()
