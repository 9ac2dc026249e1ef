"""Shared helpers of the decomposition tests."""

import jax
import jax.numpy as jnp
import numpy as np


def numpy_init(model, *args, seed=0, **kwargs):
    """Linen variables with random weights drawn by numpy from the shapes `model.init` would give.

    Random initializers compile a threefry kernel per shape (seconds each on a loaded CPU); the
    shapes come from `jax.eval_shape`, which compiles nothing. Kernels get fan-in scaled normals,
    biases zeros, BatchNorm statistics mean 0 and variance 1.
    """
    shapes = jax.eval_shape(lambda k: model.init(k, *args, **kwargs), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return jnp.ones(leaf.shape, leaf.dtype) if "var" in name else jnp.zeros(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
