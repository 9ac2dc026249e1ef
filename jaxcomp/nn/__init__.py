"""The Flax side of jaxcomp (Linen and NNX): interceptors, module surgery, converters.

One module per technique: `jaxcomp.nn.quant` (activation quantization, integer serving),
`jaxcomp.nn.sparsity` (activation sparsity), `jaxcomp.nn.decompose` (factorized layers) and
`jaxcomp.nn.structured` (physical channel removal).
"""
