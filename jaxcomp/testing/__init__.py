"""Reference models, data loaders, training loops and timing helpers for jaxcomp's own tests,
benchmarks and examples.

Importable by anyone, but not part of jaxcomp's API promise: these may change between releases.

* `jaxcomp.testing.models` (Flax Linen) and `jaxcomp.testing.nnx_models` (Flax NNX):
  LeNet-300-100 (`MLP`), `LeNet5`, a small `ResNet`, a one-block `TransformerEncoder`.
* `jaxcomp.testing.data`: `load_digits` (scikit-learn's bundled 8x8 digits) and
  `load_mnist_t10k` (the MNIST test split from a local folder).
* `jaxcomp.testing.train`: `fit_linen`, `evaluate_linen`, `fit_nnx`, `evaluate_nnx`.
* `jaxcomp.testing.benchmark`: `time_fn`, `compare` and `emit_json` for benchmark scripts.
"""
