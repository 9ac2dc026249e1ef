"""Quantization for Flax models: activation fake quantization, calibration, integer serving.

Linen (through `nn.intercept_methods`, so the model class is never edited):

* `fake_quant_inputs(spec, ...)`: a context manager that fake-quantizes the input of every
  Dense / DenseGeneral / Conv / Einsum call (dynamic ranges, calibrated static ranges, LSQ
  steps or PACT clips, keyed by module path such as `"Dense_0"`);
* `calibrate_linen(model, variables, batches, spec)`: static input ranges from a few batches;
* `init_input_steps_linen(...)`: LSQ steps for those inputs, from one batch;
* `serve_linen(model, ...)`: an `apply` that runs every `QArray` kernel of a
  `jaxcomp.quant.quantize_tree` result on integer operands (`qdot` / `qconv` / int8 einsum),
  never materializing float weights.

NNX (module surgery on the model object):

* `quantize_inputs_nnx(model, spec, ...)` wraps every Linear / LinearGeneral / Conv / Einsum in
  a `QuantizedInput` module (dynamic, static, LSQ or PACT input quantization);
* `calibrate_nnx(model, batches)` sets the static ranges (and LSQ / PACT initial values);
* `serve_nnx(model, qstate, ...)` replaces those layers by `QuantizedLayer` modules holding the
  `QArray` kernels of `quantize_tree(nnx.state(model, nnx.Param), ...)`.
"""

from jaxcomp.nn.quant.common import ModuleWhere
from jaxcomp.nn.quant.linen import (
    LINEN_MODULES,
    calibrate_linen,
    fake_quant_inputs,
    init_input_steps_linen,
    serve_linen,
)
from jaxcomp.nn.quant.nnx import (
    NNX_MODULES,
    QuantStat,
    QuantizedInput,
    QuantizedLayer,
    calibrate_nnx,
    quantize_inputs_nnx,
    serve_nnx,
)

__all__ = [
    "LINEN_MODULES",
    "NNX_MODULES",
    "ModuleWhere",
    "QuantStat",
    "QuantizedInput",
    "QuantizedLayer",
    "calibrate_linen",
    "calibrate_nnx",
    "fake_quant_inputs",
    "init_input_steps_linen",
    "quantize_inputs_nnx",
    "serve_linen",
    "serve_nnx",
]
