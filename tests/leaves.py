"""A trivial compressed leaf for protocol tests: int8 values times a per-row float scale."""

import jax
import jax.numpy as jnp

from jaxcomp import CompressedLeaf, compressed_leaf, static_field


@compressed_leaf
class ScaledInt(CompressedLeaf):
    values: jax.Array
    scale: jax.Array
    label: str = static_field(default="test")

    def materialize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.scale

    def summary(self) -> str:
        return f"{self.label}: int{jnp.iinfo(self.values.dtype).bits} x per-row scale"


def make_scaled_int(shape=(4, 3), dtype=jnp.int8, seed=0):
    key = jax.random.key(seed)
    values = jax.random.randint(key, shape, -7, 8).astype(dtype)
    scale = jnp.linspace(0.5, 1.0, shape[0], dtype=jnp.float32)[:, None]
    return ScaledInt(values, scale)
