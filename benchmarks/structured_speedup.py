"""Structured pruning removes channels for real: smaller, faster models at the same accuracy.

A ResNet (stages of 32, 64 and 128 channels, two basic blocks a stage, BatchNorm, projection
shortcuts) and LeNet-5 are trained briefly with Adam and a cosine decay on the MNIST split (the
ResNet one epoch of the 8,000 training images, LeNet-5 three; evaluation on the other 2,000),
then 50% of the channels of every prunable group (L2 magnitude of the coupled weights) are
removed with `jaxcomp.nn.structured.prune_linen`, and the pruned models are fine-tuned for one
pass over 4,000 (ResNet) or 8,000 (LeNet-5) training images. Measured in this process, against
the unpruned models:

* parameter and FLOP ratios (unpruned / pruned; FLOPs from `jaxcomp.count_flops`);
* jitted inference latency at batch 64, timed interleaved with `compare` (medians), for the
  unpruned model, the pruned model and, as the reference, the same class built by hand at half
  width (randomly initialised: latency does not depend on the values);
* eval accuracy of the unpruned and the fine-tuned pruned models.

Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/structured_speedup.py [--epochs 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp import count_flops
from jaxcomp.nn.structured import prune_linen
from jaxcomp.testing import models
from jaxcomp.testing.benchmark import compare, emit_json
from jaxcomp.testing.data import batches, load_mnist_t10k
from jaxcomp.testing.train import TrainState, evaluate_linen, make_linen_train_step


def _init(model, input_shape, seed=0):
    # An "rbg" key: the same init, but XLA compiles it in a third of the time of threefry.
    init = jax.jit(lambda key, x: model.init(key, x, train=False))
    return dict(init(jax.random.key(seed, impl="rbg"), jnp.zeros((1, *input_shape))))


def _train(model, variables, data, *, epochs, images, lr, log):
    """Adam with a cosine decay on the first `images` training images; logs every 20 steps.

    The decay lets the BatchNorm running statistics catch up with the weights by the end, so
    a short run evaluates near what it has learned.
    """
    tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * (images // 64)))
    params = variables["params"]
    state = TrainState(params, variables.get("batch_stats", {}), tx.init(params))
    step = make_linen_train_step(model, tx)
    x, y = data.x_train[:images], data.y_train[:images]
    start, n = time.perf_counter(), 0
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 64, seed=epoch):
            state, loss = step(state, xb, yb)
            n += 1
            if n % 20 == 0:
                log(f"step {n}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)")
    out = {"params": state.params}
    return {**out, "batch_stats": state.batch_stats} if state.batch_stats else out


def _params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _flops(model, variables, x) -> int:
    return count_flops(lambda v, x: model.apply(v, x), variables, x).total


def _study(name, model, half, data, *, epochs, images, finetune_images, lr, rounds):
    """Train, prune 50%, fine-tune; returns the figures of one architecture."""
    start = time.perf_counter()
    log = lambda line: print(f"[{name}] {line}", flush=True)  # noqa: E731
    variables = _init(model, data.input_shape)
    variables = _train(model, variables, data, epochs=epochs, images=images, lr=lr, log=log)
    acc_unpruned = evaluate_linen(model, variables, data.x_eval, data.y_eval)
    log(f"unpruned: eval accuracy {100 * acc_unpruned:.2f}%")

    x1 = jnp.zeros((1, *data.input_shape))
    pruned, pruned_vars = prune_linen(model, variables, x1, ratio=0.5)
    log(f"pruned model: {pruned}")
    log(f"same fields as the hand-built half-width model: {pruned == half}")
    acc_after_cut = evaluate_linen(pruned, pruned_vars, data.x_eval, data.y_eval)
    log(f"pruned, before fine-tuning: eval accuracy {100 * acc_after_cut:.2f}%")
    pruned_vars = _train(pruned, pruned_vars, data, epochs=1, images=finetune_images, lr=lr,
                         log=log)
    acc_pruned = evaluate_linen(pruned, pruned_vars, data.x_eval, data.y_eval)

    batch = jnp.asarray(data.x_eval[:64])
    half_vars = _init(half, data.input_shape, seed=1)
    fns = {}
    for label, (m, v) in {"unpruned": (model, variables), "pruned": (pruned, pruned_vars),
                          "half-width by hand": (half, half_vars)}.items():
        fns[label] = (jax.jit(lambda v, x, m=m: m.apply(v, x, train=False)), (v, batch))
    times = compare(fns, rounds=rounds, warmup=2)
    for label, seconds in times.items():
        log(f"latency at batch 64, {label}: {1e3 * seconds:.2f} ms")

    figures = {
        "param_ratio": _params(variables) / _params(pruned_vars),
        "flop_ratio": _flops(model, variables, batch) / _flops(pruned, pruned_vars, batch),
        "latency_speedup": times["unpruned"] / times["pruned"],
        "latency_speedup_half": times["unpruned"] / times["half-width by hand"],
        "acc_unpruned": acc_unpruned,
        "acc_after_cut": acc_after_cut,
        "acc_pruned": acc_pruned,
    }
    log(
        f"params {_params(variables):,} -> {_params(pruned_vars):,} "
        f"({figures['param_ratio']:.2f}x fewer); FLOPs {figures['flop_ratio']:.2f}x fewer; "
        f"latency {figures['latency_speedup']:.2f}x faster (hand-built half width "
        f"{figures['latency_speedup_half']:.2f}x); accuracy {100 * acc_unpruned:.2f}% -> "
        f"{100 * acc_after_cut:.2f}% after the cut -> {100 * acc_pruned:.2f}% fine-tuned "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="ResNet training epochs")
    parser.add_argument("--cnn-epochs", type=int, default=3, help="LeNet-5 training epochs")
    parser.add_argument("--finetune-images", type=int, default=4000,
                        help="images of the ResNet's one fine-tuning pass after pruning")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    args = parser.parse_args()

    data = load_mnist_t10k()
    print(f"devices: {jax.devices()}", flush=True)
    resnet = _study(
        "resnet",
        models.ResNet(stage_features=(32, 64, 128), blocks_per_stage=2),
        models.ResNet(stage_features=(16, 32, 64), blocks_per_stage=2),
        data, epochs=args.epochs, images=len(data.x_train),
        finetune_images=args.finetune_images, lr=2e-3, rounds=args.rounds,
    )
    cnn = _study(
        "lenet5", models.LeNet5(),
        models.LeNet5(conv_features=(3, 8), dense_features=(60, 42)),
        data, epochs=args.cnn_epochs, images=len(data.x_train),
        finetune_images=len(data.x_train), lr=2e-3, rounds=args.rounds,
    )
    emit_json(
        "structured_speedup",
        param_ratio=resnet["param_ratio"],
        flop_ratio=resnet["flop_ratio"],
        latency_speedup_resnet=resnet["latency_speedup"],
        latency_speedup_cnn=cnn["latency_speedup"],
        acc_unpruned=resnet["acc_unpruned"],
        acc_pruned=resnet["acc_pruned"],
        latency_speedup_resnet_half_by_hand=resnet["latency_speedup_half"],
        latency_speedup_cnn_half_by_hand=cnn["latency_speedup_half"],
        acc_resnet_after_cut=resnet["acc_after_cut"],
        param_ratio_cnn=cnn["param_ratio"],
        flop_ratio_cnn=cnn["flop_ratio"],
        acc_unpruned_cnn=cnn["acc_unpruned"],
        acc_pruned_cnn=cnn["acc_pruned"],
    )


if __name__ == "__main__":
    main()
