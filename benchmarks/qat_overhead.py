"""Quantization-aware training overhead and accuracy: LeNet-300-100 on the MNIST split.

Four train steps are built in the same process from the same initial params: float; w8a8
(per-channel 8-bit fake-quantized kernels, per-tensor 8-bit fake-quantized layer inputs, both with
dynamic ranges and the straight-through estimator); w4a8 (4-bit kernels); and LSQ w4a8 (learned
step sizes for every kernel and every hidden layer's input, trained by the same Adam; the raw
input pixels keep the dynamic 8-bit grid). Their step times
are compared in interleaved rounds (`jaxcomp.testing.benchmark.compare`), then each variant is
trained for the same number of steps and evaluated as it would be deployed (quantized forward
pass for the QAT variants).

Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/qat_overhead.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp.nn.quant import fake_quant_inputs, init_input_steps_linen
from jaxcomp.quant import QuantSpec, fake_quant_tree, lsq_fake_quant_tree, lsq_init_tree
from jaxcomp.testing.benchmark import compare, emit_json
from jaxcomp.testing.data import batches, load_mnist_t10k
from jaxcomp.testing.models import MLP
from jaxcomp.testing.train import cross_entropy, init_linen

EPOCHS = 15
BATCH = 64
LR = 1e-3
KERNELS = r".*kernel"
A8 = QuantSpec(bits=8)
# LSQ learns the steps of the hidden layers' inputs; the network input (raw pixels, already an
# 8-bit grid) keeps a fixed dynamic 8-bit grid, since a learned step there would cost a
# gradient with respect to the input (a whole extra matmul) and has nothing to learn.
FIRST, HIDDEN = "Dense_0", r"Dense_[1-9]\d*"


def forward_fns(model):
    """name -> (init_trainable(params, x), apply(trainable, x) -> logits)."""

    def plain(params, x):
        return model.apply({"params": params}, x)

    def qat(bits):
        spec = QuantSpec(bits=bits, channel_axes=(-1,))

        def apply(params, x):
            with fake_quant_inputs(A8):
                return model.apply({"params": fake_quant_tree(params, spec, where=KERNELS)}, x)

        return (lambda params, x: params), apply

    w4 = QuantSpec(bits=4, channel_axes=(-1,))

    def lsq_init(params, x):
        return {"params": params, "w_steps": lsq_init_tree(params, w4, where=KERNELS),
                "a_steps": init_input_steps_linen(model, {"params": params}, x, A8, where=HIDDEN)}

    def lsq_apply(t, x):
        with fake_quant_inputs(A8, where=FIRST), fake_quant_inputs(A8, steps=t["a_steps"], where=HIDDEN):
            return model.apply({"params": lsq_fake_quant_tree(t["params"], t["w_steps"], w4)}, x)

    return {
        "float": ((lambda params, x: params), plain),
        "w8a8": qat(8),
        "w4a8": qat(4),
        "lsq_w4a8": (lsq_init, lsq_apply),
    }


def make_step(apply, tx):
    @jax.jit
    def step(trainable, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda t: cross_entropy(apply(t, x), y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def accuracy(apply, trainable, x, y) -> float:
    predict = jax.jit(lambda t, xb: jnp.argmax(apply(t, xb), axis=-1))
    correct = sum(int((np.asarray(predict(trainable, xb)) == yb).sum()) for xb, yb in batches(x, y, 500))
    return correct / len(y)


def main() -> None:
    data = load_mnist_t10k()
    model = MLP()
    params = init_linen(model, data.input_shape)["params"]
    tx = optax.adam(LR)
    sample = jnp.asarray(data.x_train[:BATCH])
    variants = forward_fns(model)
    steps, states = {}, {}
    for name, (init, apply) in variants.items():
        trainable = init(params, sample)
        steps[name] = make_step(apply, tx)
        states[name] = (trainable, tx.init(trainable))

    xb, yb = jnp.asarray(data.x_train[:BATCH]), jnp.asarray(data.y_train[:BATCH])
    times = compare({name: (steps[name], (*states[name], xb, yb)) for name in variants},
                    rounds=60, number=20)
    ratios = {name: times[name] / times["float"] for name in variants}
    for name in variants:
        print(f"step {name:9s} {times[name] * 1e3:7.3f} ms  ratio {ratios[name]:.3f}", flush=True)

    accs = {}
    for name, (_, apply) in variants.items():
        trainable, opt_state = states[name]
        start = time.perf_counter()
        for epoch in range(EPOCHS):
            for xe, ye in batches(data.x_train, data.y_train, BATCH, seed=epoch):
                trainable, opt_state, _ = steps[name](trainable, opt_state, xe, ye)
        accs[name] = accuracy(apply, trainable, data.x_eval, data.y_eval)
        print(f"train {name:9s} {EPOCHS} epochs ({EPOCHS * (len(data.x_train) // BATCH)} steps, "
              f"{time.perf_counter() - start:.1f} s): eval accuracy {100 * accs[name]:.2f}%", flush=True)

    emit_json(
        "qat_overhead",
        step_ratio_w8a8=ratios["w8a8"],
        step_ratio_w4a8=ratios["w4a8"],
        step_ratio_lsq_w4a8=ratios["lsq_w4a8"],
        acc_float=accs["float"],
        acc_w8a8=accs["w8a8"],
        acc_w4a8=accs["w4a8"],
        acc_lsq_w4a8=accs["lsq_w4a8"],
        step_ms_float=times["float"] * 1e3,
    )


if __name__ == "__main__":
    main()
