"""The `jaxcomp` command (also `python -m jaxcomp`).

    jaxcomp demo [--epochs N] [--seed S] [--json]

`demo` trains the reference LeNet-5 on scikit-learn's bundled 8x8 digits (no download), prunes
it with the optax pruning wrapper, quantizes its kernels to int8 and serves it on integer
operands, printing one line per epoch, the accuracy after each stage and the size report. With
`--json` the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import optax

import jaxcomp

__all__ = ["main", "run_demo"]


class _UsageError(ValueError):
    """A demo argument out of range (the command prints it and exits with status 2)."""


def _prune_schedule(sparsity: float, prune_steps: int, steps_per_epoch: int):
    """The demo's polynomial schedule: the target two thirds of the way through, so the
    survivors recover after it, and by the last step at the latest (at once for one step)."""
    from jaxcomp import sparsity as sp

    return sp.polynomial_sparsity(
        sparsity, begin_step=0, end_step=min(max(1, 2 * prune_steps // 3), prune_steps - 1),
        frequency=max(1, steps_per_epoch // 2),
    )


def run_demo(
    epochs: int = 25,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    sparsity: float = 0.75,
    prune_epochs: int = 12,
    bits: int = 8,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Trains LeNet-5 on the digits data set, prunes it, quantizes it to integers and reports.

    1. Train the dense model (Adam, cosine-decayed learning rate).
    2. Fine-tune it under `jaxcomp.sparsity.prune` with the polynomial schedule up to
       `sparsity` of all kernels together (magnitude scores, one global threshold, so small
       sensitive layers keep more weights); pruned weights stay exactly zero.
    3. Quantize every kernel to `bits` (per output channel, symmetric) with
       `jaxcomp.quant.quantize_tree`, calibrate static activation ranges on 256 training images,
       and evaluate the model served on integer operands (`jaxcomp.nn.quant.serve_linen`).
    4. Print `jaxcomp.report` of the served params: stored bits and sparsity per leaf.

    Args:
      epochs: dense training passes over the 1,438 training images.
      batch_size: minibatch size.
      learning_rate: Adam's peak learning rate (cosine-decayed to zero over each stage).
      sparsity: final fraction of zero kernel weights, in [0, 1); 0 skips pruning.
      prune_epochs: fine-tuning epochs of the pruning stage.
      bits: integer bits of the kernels (2..8); activations run on 8 bits.
      seed: seed of the initialisation and the shuffles.
      log: receives the human-readable lines; `None` for silence.

    Returns:
      A dict of figures: `accuracy` (the final, pruned and quantized model), `accuracy_dense`,
      `accuracy_pruned`, `sparsity` (zeros among all the served params, biases included,
      after quantization, which can round small kept weights to zero), `sparsity_target`,
      `kernel_sparsity` (among the pruned kernels, before quantization), `params`,
      `params_bytes` (as stored),
      `dense_bytes`,
      `compression_ratio`, `train_seconds`, ...

    Raises:
      ValueError: for a sparsity outside [0, 1), bits outside 2..8, a non-positive or non-finite
        learning rate, epochs < 1, prune_epochs < 0 (or 0 with a sparsity above 0), a seed
        outside [0, 2**32), or a batch size
        outside 1..1,438 (the training images).

    Example:
        >>> figures = run_demo(epochs=1, prune_epochs=1, log=None)  # doctest: +SKIP
        >>> figures["compression_ratio"] > 3.5  # doctest: +SKIP
        True
    """
    import jax
    import numpy as np

    from jaxcomp import quant, sparsity as sp
    from jaxcomp.nn.quant import calibrate_linen, serve_linen
    from jaxcomp.testing.data import load_digits
    from jaxcomp.testing.models import LeNet5
    from jaxcomp.testing.train import evaluate_linen, fit_linen, init_linen

    if not 0.0 <= sparsity < 1.0:
        raise _UsageError(f"demo sparsity must be in [0, 1), got {sparsity!r}")
    if not 2 <= bits <= 8:
        raise _UsageError(f"demo bits must be in 2..8, got {bits!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise _UsageError(f"demo learning rate must be a finite number > 0, got {learning_rate!r}")
    if epochs < 1 or prune_epochs < 0:
        raise _UsageError(f"demo epochs must be >= 1 and prune epochs >= 0, got {epochs!r} and "
                         f"{prune_epochs!r}")
    if sparsity > 0 and prune_epochs == 0:
        raise _UsageError(f"demo sparsity {sparsity!r} needs prune epochs >= 1 (pruning happens "
                          "while fine-tuning); pass --sparsity 0 to skip pruning")
    if not 0 <= seed < 2**32:
        raise _UsageError(f"demo seed must be in [0, 2**32), got {seed!r}")
    data = load_digits(seed=seed)
    if not 1 <= batch_size <= len(data.x_train):
        raise _UsageError(f"demo batch size must be in 1..{len(data.x_train)} (the training "
                         f"images), got {batch_size!r}")
    say = log or (lambda line: None)
    say(
        f"jaxcomp demo: LeNet-5 on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_eval)} eval images of {data.input_shape[0]}x{data.input_shape[1]})"
    )
    model = LeNet5(num_classes=data.num_classes)
    variables = init_linen(model, data.input_shape, seed)
    steps_per_epoch = len(data.x_train) // batch_size
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
    start = time.perf_counter()
    variables, _ = fit_linen(
        model, variables, data, tx, epochs=epochs, batch_size=batch_size, seed=seed, log=log
    )
    train_seconds = time.perf_counter() - start
    accuracy_dense = evaluate_linen(model, variables, data.x_eval, data.y_eval)
    dense = jaxcomp.report(variables["params"])
    say(f"\n[1/3] dense: eval accuracy {100 * accuracy_dense:.2f}%  "
        f"(trained in {train_seconds:.1f} s)")

    accuracy_pruned = accuracy_dense
    if sparsity > 0 and prune_epochs > 0:
        prune_steps = prune_epochs * steps_per_epoch
        schedule = _prune_schedule(sparsity, prune_steps, steps_per_epoch)
        pruner = sp.Pruner(sparsity=schedule, where=r".*kernel", distribution=sp.GlobalThreshold())
        tx = sp.prune(optax.adam(optax.cosine_decay_schedule(learning_rate / 2, prune_steps)),
                      pruner)
        say(f"\n[2/3] pruning the kernels to {100 * sparsity:.0f}% zeros "
            f"(magnitude, global threshold, polynomial schedule, {prune_epochs} epochs)")
        variables, _ = fit_linen(
            model, variables, data, tx, epochs=prune_epochs, batch_size=batch_size,
            seed=seed + epochs,
            log=None if log is None else (lambda line: say(f"  prune {line}")),
        )
        accuracy_pruned = evaluate_linen(model, variables, data.x_eval, data.y_eval)
        say(f"pruned: eval accuracy {100 * accuracy_pruned:.2f}%")

    spec = quant.QuantSpec(bits=bits, channel_axes=(-1,))
    act_spec = quant.QuantSpec(bits=8)
    qparams = quant.quantize_tree(variables["params"], spec, where=r".*kernel")
    calibration = np.asarray(data.x_train[:256])
    act_params = calibrate_linen(model, variables, np.split(calibration, 4), act_spec)
    serve = jax.jit(serve_linen(model, activations=act_spec, act_params=act_params))
    logits = np.concatenate([
        np.asarray(serve({"params": qparams}, xb))
        for xb in np.array_split(np.asarray(data.x_eval), 4)
    ])
    accuracy = float(np.mean(logits.argmax(-1) == np.asarray(data.y_eval)))
    size = jaxcomp.report(qparams)
    say(f"\n[3/3] int{bits} kernels, int8 activations (static ranges from 256 images), "
        f"served on integer operands: eval accuracy {100 * accuracy:.2f}%\n")
    say(str(size))
    say(f"\ndense float32: {dense.totals.nbytes:,} bytes -> stored: {size.totals.nbytes:,} bytes "
        f"({size.totals.compression_ratio:.2f}x smaller); accuracy {100 * accuracy_dense:.2f}% "
        f"-> {100 * accuracy:.2f}%")
    return {
        "accuracy": accuracy,
        "accuracy_dense": accuracy_dense,
        "accuracy_pruned": accuracy_pruned,
        "sparsity": size.totals.sparsity,
        "sparsity_target": sparsity,
        "kernel_sparsity": float(sp.sparsity_of(variables["params"], where=r".*kernel").total),
        "bits": bits,
        "epochs": epochs,
        "prune_epochs": prune_epochs if sparsity > 0 else 0,
        "params": size.totals.params,
        "params_bytes": size.totals.nbytes,
        "dense_bytes": dense.totals.nbytes,
        "compression_ratio": dense.totals.nbytes / size.totals.nbytes,
        "train_seconds": train_seconds,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcomp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and report a model on the bundled digits")
    demo.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--learning-rate", type=float, default=2e-3)
    demo.add_argument("--sparsity", type=float, default=0.75,
                      help="fraction of zero kernel weights after pruning (default 0.75)")
    demo.add_argument("--prune-epochs", type=int, default=12,
                      help="fine-tuning epochs of the pruning stage (default 12)")
    demo.add_argument("--bits", type=int, default=8, help="kernel bits, 2..8 (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxcomp` command; returns the process exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        try:
            figures = run_demo(
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                sparsity=args.sparsity,
                prune_epochs=args.prune_epochs,
                bits=args.bits,
                seed=args.seed,
            )
        except _UsageError as e:  # bad arguments: a message, not a traceback
            print(f"jaxcomp demo: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(figures), flush=True)
    return 0
