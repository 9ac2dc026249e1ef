"""Post-training quantization accuracy: LeNet-5 trained on the MNIST split, then quantized.

The float model is trained once; every quantized variant is evaluated on the same 2,000 eval
images against it:

* int8: per-channel int8 kernels, int8 activations with static ranges calibrated (min-max) on
  256 training images, served on integer operands by `jaxcomp.nn.quant.serve_linen`;
* int4 per-group: Dense kernels int4 with a scale per group of input features (the largest
  divisor of K up to 64) and output channel, conv kernels int4 per output channel; served
  weight-only (float activations times the int4 codes, scales after the product);
* k-means 4-bit: one 16-entry codebook per kernel (Deep Compression's linear init), plus the
  same after one epoch of centroid fine-tuning (`codebook_finetune`, extra figure).

Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/ptq_accuracy.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcomp
from jaxcomp.nn.quant import calibrate_linen, serve_linen
from jaxcomp.quant import (
    QuantSpec,
    codebook_finetune,
    finetuned_codebooks,
    kmeans_tree,
    quantize_tree,
)
from jaxcomp.testing.benchmark import emit_json
from jaxcomp.testing.data import batches, load_mnist_t10k
from jaxcomp.testing.models import LeNet5
from jaxcomp.testing.train import evaluate_linen, fit_linen, init_linen, make_linen_train_step, TrainState

EPOCHS = 8
CALIBRATION_IMAGES = 256
KERNELS = r".*kernel"


def served_accuracy(apply, params, x, y) -> float:
    predict = jax.jit(lambda p, xb: jnp.argmax(apply({"params": p}, xb), axis=-1))
    correct = sum(int((np.asarray(predict(params, xb)) == yb).sum()) for xb, yb in batches(x, y, 500))
    return correct / len(y)


def group_size(k: int, limit: int = 64) -> int:
    return max(d for d in range(1, limit + 1) if k % d == 0)


def int4_per_group(params):
    """Dense kernels: int4 per group of input features; conv kernels: int4 per channel."""
    out = quantize_tree(params, QuantSpec(bits=4, channel_axes=(-1,)), where=r"Conv_\d+/kernel")
    for path, leaf in jaxcomp.path_dict(params).items():
        if path.startswith("Dense_") and path.endswith("kernel"):
            spec = QuantSpec(bits=4, channel_axes=(-1,), group_size=group_size(leaf.shape[0]), group_axis=0)
            out = quantize_tree(out, spec, where=path)
    return out


def main() -> None:
    data = load_mnist_t10k()
    model = LeNet5()
    variables = init_linen(model, data.input_shape)
    variables, _ = fit_linen(model, variables, data, optax.adam(1e-3), epochs=EPOCHS, log=print)
    params = variables["params"]
    acc = {"float": evaluate_linen(model, variables, data.x_eval, data.y_eval)}
    print(f"float: {100 * acc['float']:.2f}%  ({jaxcomp.stored_nbytes(params)} bytes)")

    calibration = [data.x_train[i:i + 64] for i in range(0, CALIBRATION_IMAGES, 64)]
    a8 = QuantSpec(bits=8)
    ranges = calibrate_linen(model, variables, calibration, a8)
    q8 = quantize_tree(params, QuantSpec(bits=8, channel_axes=(-1,)), where=KERNELS)
    acc["int8"] = served_accuracy(serve_linen(model, activations=a8, act_params=ranges), q8,
                                  data.x_eval, data.y_eval)
    acc["int8_dynamic"] = served_accuracy(serve_linen(model, activations=a8), q8, data.x_eval, data.y_eval)
    print(f"int8 w8a8 static ranges ({CALIBRATION_IMAGES} calibration images): {100 * acc['int8']:.2f}%"
          f"  dynamic ranges: {100 * acc['int8_dynamic']:.2f}%  ({jaxcomp.stored_nbytes(q8)} bytes)")

    q4 = int4_per_group(params)
    acc["int4_group"] = served_accuracy(serve_linen(model, activations=None), q4, data.x_eval, data.y_eval)
    print(f"int4 per-group weights: {100 * acc['int4_group']:.2f}%  ({jaxcomp.stored_nbytes(q4)} bytes)")

    books = kmeans_tree(params, 4, where=KERNELS)
    acc["kmeans4"] = evaluate_linen(model, {"params": jaxcomp.materialize(books)}, data.x_eval, data.y_eval)
    print(f"k-means 4-bit: {100 * acc['kmeans4']:.2f}%  ({jaxcomp.stored_nbytes(books)} bytes)")

    tx = codebook_finetune(optax.adam(1e-4), books)
    dense = jaxcomp.materialize(books)
    state = TrainState(dense, {}, tx.init(dense))
    step = make_linen_train_step(model, tx)
    for xb, yb in batches(data.x_train, data.y_train, 64, seed=100):
        state, _ = step(state, xb, yb)
    tuned = finetuned_codebooks(state.opt_state, state.params)
    acc["kmeans4_finetuned"] = evaluate_linen(model, {"params": jaxcomp.materialize(tuned)},
                                              data.x_eval, data.y_eval)
    print(f"k-means 4-bit after one epoch of centroid fine-tuning: {100 * acc['kmeans4_finetuned']:.2f}%")
    print(jaxcomp.report(tuned))

    emit_json(
        "ptq_accuracy",
        acc_float=acc["float"],
        acc_int8=acc["int8"],
        acc_int4_group=acc["int4_group"],
        acc_kmeans4=acc["kmeans4"],
        acc_int8_dynamic=acc["int8_dynamic"],
        acc_kmeans4_finetuned=acc["kmeans4_finetuned"],
        bytes_float=jaxcomp.stored_nbytes(params),
        bytes_int8=jaxcomp.stored_nbytes(q8),
        bytes_int4_group=jaxcomp.stored_nbytes(q4),
        bytes_kmeans4=jaxcomp.stored_nbytes(books),
    )


if __name__ == "__main__":
    main()
