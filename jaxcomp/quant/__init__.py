"""Quantization: numerics, fake quantization with straight-through estimators, observers and
calibration, learned scales (LSQ, PACT), `QArray` integer storage, integer matmul and
convolution, and non-uniform `Codebook` quantization (k-means, power-of-two).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxcomp.quant import QuantSpec, fake_quant_tree, quantize_tree
    >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> spec = QuantSpec(bits=8, channel_axes=(-1,))
    >>> fake_quant_tree(params, spec, where=r".*kernel")["Dense_0"]["kernel"].shape
    (4, 3)
    >>> quantize_tree(params, spec, where=r".*kernel")["Dense_0"]["kernel"].values.dtype
    dtype('int8')
"""

from jaxcomp.quant.codebook import (
    Codebook,
    CodebookFinetuneState,
    codebook_finetune,
    finetuned_codebooks,
    kmeans_quantize,
    kmeans_tree,
    power_of_two_quantize,
    power_of_two_tree,
)
from jaxcomp.quant.fake import fake_quant, fake_quant_tree
from jaxcomp.quant.learned import (
    lsq_as_static,
    lsq_fake_quant,
    lsq_fake_quant_tree,
    lsq_init,
    lsq_init_tree,
    pact_as_static,
    pact_fake_quant,
    pact_penalty,
)
from jaxcomp.quant.conv import qconv
from jaxcomp.quant.matmul import qdot
from jaxcomp.quant.serving import ServedOp, prepare_for_serving, serving_ops
from jaxcomp.quant.tuning import chosen_strategies
from jaxcomp.quant.numerics import (
    QuantParams,
    dequantize_codes,
    layout,
    params_from_range,
    quant_params,
    quant_range,
    quantize_codes,
)
from jaxcomp.quant.observers import (
    AbsMaxObserver,
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    RangeState,
    calibrate,
)
from jaxcomp.quant.qarray import QArray, dequantize, pack_bits, quantize, quantize_tree, unpack_bits
from jaxcomp.quant.spec import QuantSpec

__all__ = [
    "AbsMaxObserver",
    "Codebook",
    "CodebookFinetuneState",
    "EMAObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QArray",
    "QuantParams",
    "QuantSpec",
    "RangeState",
    "ServedOp",
    "calibrate",
    "chosen_strategies",
    "codebook_finetune",
    "dequantize",
    "dequantize_codes",
    "fake_quant",
    "fake_quant_tree",
    "finetuned_codebooks",
    "kmeans_quantize",
    "kmeans_tree",
    "layout",
    "lsq_as_static",
    "lsq_fake_quant",
    "lsq_fake_quant_tree",
    "lsq_init",
    "lsq_init_tree",
    "pact_as_static",
    "pact_fake_quant",
    "pact_penalty",
    "pack_bits",
    "params_from_range",
    "power_of_two_quantize",
    "power_of_two_tree",
    "prepare_for_serving",
    "qconv",
    "qdot",
    "quant_params",
    "quant_range",
    "quantize",
    "quantize_codes",
    "quantize_tree",
    "serving_ops",
    "unpack_bits",
]
