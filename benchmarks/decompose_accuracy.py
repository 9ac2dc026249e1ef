"""Tucker-2 on every convolution of LeNet-5 (MNIST split), energy and VBMF ranks, short fine-tune.

Claim (issue 4): accuracy within 1 point of the original at >= 3x fewer convolution parameters.

1. Train the NNX LeNet-5 on the first 8,000 MNIST test images; evaluate on the last 2,000.
2. `decompose_nnx(model, ranks, method="tucker2", where=convs)` turns every Conv into a
   `FactorizedConv`, with two rank rules from the same trained model:
   * `Energy(0.6)` (the headline figures): each channel mode keeps the fewest components holding
     60% of its unfolding's squared singular values. Trained LeNet kernels have flat channel
     spectra (the top 3 of 6 input components hold ~64%), so a 90% threshold keeps almost every
     channel (1.3x fewer parameters); 60% is the threshold that reaches 3x.
   * `VBMF()` (Kim et al. 2016; extra figures): EVBMF reads most of these small kernels as noise
     and keeps rank 1-2 per mode, about 20x fewer parameters, at a larger accuracy cost.
   The first conv has one input channel: its input mode stays at full rank (1), which jaxcomp
   folds into the core, so that layer is a Tucker-1 (5x5 conv to r_out channels, 1x1 conv to 6).
3. Fine-tune each factorized model (its factors are ordinary `nnx.Param`s) with Adam for 3 epochs
   and evaluate. The fine-tune also trains 3 more epochs; the original's accuracy over its last
   epochs is printed for comparison.

"Conv parameters" counts the convolution kernels (dense: 5*5*1*6 + 5*5*6*16 = 2,550) against the
factors that replace them; the 22 bias parameters are unchanged and left out of the ratio.
"""

from __future__ import annotations

import math
import time

import jax
import optax
from flax import nnx

from jaxcomp.decompose import VBMF, Energy
from jaxcomp.nn.decompose import FactorizedConv, decompose_nnx
from jaxcomp.testing.benchmark import emit_json
from jaxcomp.testing.data import load_mnist_t10k
from jaxcomp.testing.nnx_models import LeNet5
from jaxcomp.testing.train import evaluate_nnx, fit_nnx

EPOCHS = 8
FINETUNE_EPOCHS = 3
FINETUNE_LR = 5e-4
CONVS = r"convs/\d+/kernel"


def conv_kernel_params(model: nnx.Module) -> int:
    """Parameters of the model's convolution kernels (of their factors when factorized)."""
    total = 0
    for conv in model.convs:
        if isinstance(conv, FactorizedConv):
            total += conv.kernel.as_leaf().num_params
        else:
            total += math.prod(conv.kernel.get_value().shape)
    return total


def decompose_and_finetune(model, rule, data, name: str) -> dict:
    start = time.perf_counter()
    factorized = decompose_nnx(model, rule, method="tucker2", where=CONVS)
    for i, conv in enumerate(factorized.convs):
        leaf = conv.kernel.as_leaf()
        print(f"  [{name}] convs/{i}: {leaf.summary()}, {leaf.num_params} of {leaf.dense_params} parameters")
    print(f"  [{name}] decomposed in {time.perf_counter() - start:.1f} s")
    before = evaluate_nnx(factorized, data.x_eval, data.y_eval)
    print(f"  [{name}] before fine-tuning: {100 * before:.2f}%")
    fit_nnx(factorized, data, optax.adam(FINETUNE_LR), epochs=FINETUNE_EPOCHS, seed=100,
            log=lambda line: print(f"  [{name}] {line}"))
    return {
        "acc": evaluate_nnx(factorized, data.x_eval, data.y_eval),
        "acc_before": before,
        "params": conv_kernel_params(factorized),
        "ranks": {f"convs/{i}": list(c.kernel.as_leaf().rank) for i, c in enumerate(factorized.convs)},
    }


def main() -> None:
    data = load_mnist_t10k()
    print(f"MNIST split: {len(data.y_train)} train / {len(data.y_eval)} eval images")
    model = LeNet5(input_shape=data.input_shape, rngs=nnx.Rngs(0))
    start = time.perf_counter()
    fit_nnx(model, data, optax.adam(1e-3), epochs=EPOCHS, log=print)
    acc_original = evaluate_nnx(model, data.x_eval, data.y_eval)
    dense = conv_kernel_params(model)
    print(f"original LeNet-5: {100 * acc_original:.2f}%, {dense} conv kernel parameters "
          f"({time.perf_counter() - start:.0f} s)")

    energy = decompose_and_finetune(model, Energy(0.6), data, "Energy(0.6)")
    vbmf = decompose_and_finetune(model, VBMF(), data, "VBMF")
    for name, result in (("Energy(0.6)", energy), ("VBMF", vbmf)):
        print(
            f"{name}: conv kernels {dense:,} -> factors {result['params']:,} "
            f"({dense / result['params']:.2f}x fewer); accuracy {100 * acc_original:.2f}% -> "
            f"{100 * result['acc']:.2f}% ({100 * (result['acc'] - acc_original):+.2f} points)"
        )
    emit_json(
        "decompose_accuracy",
        acc_original=acc_original,
        acc_tucker2=energy["acc"],
        conv_param_ratio=dense / energy["params"],
        acc_tucker2_before_finetune=energy["acc_before"],
        ranks_energy=energy["ranks"],
        acc_tucker2_vbmf=vbmf["acc"],
        conv_param_ratio_vbmf=dense / vbmf["params"],
        ranks_vbmf=vbmf["ranks"],
        conv_params_dense=dense,
        backend=jax.default_backend(),
    )


if __name__ == "__main__":
    main()
