"""Reference models in Flax Linen, for tests, benchmarks and examples.

These are not part of jaxcomp's API promise: they exist so every technique is tested and
measured on the same four architectures. The NNX twins live in `jaxcomp.testing.nnx_models`.
Every model is called as `model.apply(variables, x, train=False)` with NHWC images; widths are
constructor fields, so a structurally pruned model is the same class with smaller fields.

* `MLP`: LeNet-300-100 (flatten, Dense 300, Dense 100, Dense classes).
* `LeNet5`: Conv 5x5 (6) - max-pool - Conv 5x5 (16) - max-pool - Dense 120 - Dense 84 - Dense.
  Convolutions use SAME padding, so it runs on 8x8 digits as well as 28x28 MNIST.
* `ResNet`: stem conv, stages of basic residual blocks (conv-BN-ReLU-conv-BN + shortcut, with a
  1x1 projection shortcut where the width or stride changes), global average pooling, Dense.
* `TransformerEncoder`: image rows as tokens, Dense embedding plus a learned position embedding,
  one pre-LayerNorm encoder block (multi-head self-attention and an MLP, both residual), final
  LayerNorm, mean over tokens, Dense head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP", "LeNet5", "ResNet", "ResidualBlock", "TransformerEncoder"]


class MLP(nn.Module):
    """LeNet-300-100: a multilayer perceptron on flattened inputs.

    Example:
        >>> model = MLP()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    features: Sequence[int] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
    """LeNet-5 with SAME convolutions and max pooling.

    Example:
        >>> model = LeNet5()
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        >>> model.apply(variables, jnp.zeros((2, 8, 8, 1))).shape
        (2, 10)
    """

    conv_features: Sequence[int] = (6, 16)
    dense_features: Sequence[int] = (120, 84)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        for width in self.conv_features:
            x = nn.relu(nn.Conv(width, (5, 5), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.dense_features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
    """A basic residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, ReLU.

    `hidden_features` is the width between the two convolutions (defaults to `features`).
    """

    features: int
    strides: int = 1
    hidden_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        hidden = self.hidden_features or self.features
        y = nn.Conv(hidden, (3, 3), strides=self.strides, padding="SAME", use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features, (1, 1), strides=self.strides, use_bias=False, name="shortcut_conv"
            )(x)
            x = norm(name="shortcut_norm")(x)
        return nn.relu(y + x)


def _block_widths(
    stage_features: Sequence[int], blocks_per_stage: int, hidden_features: Sequence[int] | None
) -> list[int]:
    """The hidden width of every block: `hidden_features`, or each block's stage width."""
    default = [w for w in stage_features for _ in range(blocks_per_stage)]
    if hidden_features is None:
        return default
    if len(hidden_features) != len(default):
        raise ValueError(
            f"hidden_features has {len(hidden_features)} widths; the ResNet has {len(default)} "
            "blocks"
        )
    return list(hidden_features)


class ResNet(nn.Module):
    """A small ResNet: stem, `len(stage_features)` stages of `blocks_per_stage` basic blocks.

    Every stage after the first halves the resolution in its first block. `hidden_features`
    gives the width between the two convolutions of every block, block by block across the
    stages (None: each block's own width). Train with
    `model.apply(variables, x, train=True, mutable=["batch_stats"])`.

    Example:
        >>> model = ResNet(stage_features=(8, 16), blocks_per_stage=1)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        >>> sorted(variables)
        ['batch_stats', 'params']
    """

    stage_features: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 2
    num_classes: int = 10
    stem_features: int | None = None
    hidden_features: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        hidden = _block_widths(self.stage_features, self.blocks_per_stage, self.hidden_features)
        stem = self.stem_features or self.stage_features[0]
        x = nn.Conv(stem, (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_norm")(x)
        x = nn.relu(x)
        for stage, width in enumerate(self.stage_features):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(
                    width, strides, hidden.pop(0), name=f"stage{stage}_block{block}"
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class TransformerEncoder(nn.Module):
    """One pre-LayerNorm Transformer encoder block over image rows as tokens.

    Inputs are `(batch, tokens, features)` or NHWC images, read as `H` tokens of `W * C` features.
    `qkv_features` is the total width of the attention heads (None: `d_model`).

    Example:
        >>> model = TransformerEncoder(d_model=16, num_heads=2, mlp_dim=32)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        >>> model.apply(variables, jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 128
    num_classes: int = 10
    qkv_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        if x.ndim == 4:
            x = x.reshape((x.shape[0], x.shape[1], -1))
        x = nn.Dense(self.d_model, name="embed")(x)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.d_model)
        )
        x = x + pos
        y = nn.LayerNorm(name="ln_attention")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.qkv_features or self.d_model,
            name="attention",
        )(y)
        x = x + y
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y))
        y = nn.Dense(self.d_model, name="mlp_out")(y)
        x = x + y
        x = nn.LayerNorm(name="ln_final")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
