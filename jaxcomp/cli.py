"""The `jaxcomp` command (also `python -m jaxcomp`).

    jaxcomp demo [--epochs N] [--seed S] [--json]

`demo` trains the reference LeNet-5 on scikit-learn's bundled 8x8 digits (no download), prints
one line per epoch, the eval accuracy and the size report. With `--json` the last line is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import optax

import jaxcomp

__all__ = ["main", "run_demo"]


def run_demo(
    epochs: int = 25,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Trains LeNet-5 on the digits data set and reports its accuracy and size.

    Args:
      epochs: passes over the 1,438 training images.
      batch_size: minibatch size.
      learning_rate: Adam's peak learning rate (cosine-decayed to zero over the run).
      seed: seed of the initialisation and the shuffles.
      log: receives the human-readable lines; `None` for silence.

    Returns:
      A dict of figures: `accuracy`, `params`, `params_bytes`, `train_seconds`, ...

    Example:
        >>> figures = run_demo(epochs=1, log=None)  # doctest: +SKIP
        >>> sorted(figures)[:2]  # doctest: +SKIP
        ['accuracy', 'epochs']
    """
    from jaxcomp.testing.data import load_digits
    from jaxcomp.testing.models import LeNet5
    from jaxcomp.testing.train import evaluate_linen, fit_linen, init_linen

    say = log or (lambda line: None)
    data = load_digits(seed=seed)
    say(
        f"jaxcomp demo: LeNet-5 on scikit-learn digits ({len(data.x_train)} train / "
        f"{len(data.x_eval)} eval images of {data.input_shape[0]}x{data.input_shape[1]})"
    )
    model = LeNet5(num_classes=data.num_classes)
    variables = init_linen(model, data.input_shape, seed)
    steps = epochs * (len(data.x_train) // batch_size)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    start = time.perf_counter()
    variables, _ = fit_linen(
        model, variables, data, tx, epochs=epochs, batch_size=batch_size, seed=seed, log=log
    )
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_linen(model, variables, data.x_eval, data.y_eval)
    size = jaxcomp.report(variables["params"])
    say(f"\neval accuracy: {100 * accuracy:.2f}%  (trained in {train_seconds:.1f} s)\n")
    say(str(size))
    return {
        "accuracy": accuracy,
        "epochs": epochs,
        "params": size.totals.params,
        "params_bytes": size.totals.nbytes,
        "dense_bytes": size.totals.dense_nbytes,
        "compression_ratio": size.totals.compression_ratio,
        "train_seconds": train_seconds,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcomp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and report a model on the bundled digits")
    demo.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--learning-rate", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxcomp` command; returns the process exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0:
            print("jaxcomp demo: --epochs, --batch-size and --learning-rate must be positive",
                  file=sys.stderr)
            return 2
        figures = run_demo(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
        if args.json:
            print(json.dumps(figures), flush=True)
    return 0
