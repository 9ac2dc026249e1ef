"""Reference models in Flax NNX: the twins of `jaxcomp.testing.models`.

Same architectures, same parameter names where Flax allows, constructed eagerly with explicit
input sizes (`input_shape` is `(H, W, C)`). Call `model(x)`; `model.train()` / `model.eval()`
switch BatchNorm between batch statistics and running averages. Not part of jaxcomp's API promise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcomp.testing.models import _block_widths

__all__ = ["MLP", "LeNet5", "ResNet", "ResidualBlock", "TransformerEncoder"]


class MLP(nnx.Module):
    """LeNet-300-100.

    Example:
        >>> model = MLP(input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        features: Sequence[int] = (300, 100),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [math.prod(input_shape), *features]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class LeNet5(nnx.Module):
    """LeNet-5 with SAME convolutions and max pooling.

    Example:
        >>> model = LeNet5(input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8, 8, 1))).shape
        (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        conv_features: Sequence[int] = (6, 16),
        dense_features: Sequence[int] = (120, 84),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        height, width, channels = input_shape
        convs = []
        for features in conv_features:
            convs.append(nnx.Conv(channels, features, (5, 5), padding="SAME", rngs=rngs))
            channels = features
            height, width = height // 2, width // 2
        self.convs = nnx.List(convs)
        widths = [height * width * channels, *dense_features]
        self.dense = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = nn.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for layer in self.dense:
            x = nnx.relu(layer(x))
        return self.head(x)


class ResidualBlock(nnx.Module):
    """A basic residual block with a 1x1 projection shortcut where width or stride changes."""

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        hidden_features: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        hidden = hidden_features or features
        self.conv1 = nnx.Conv(
            in_features, hidden, (3, 3), strides=strides, padding="SAME", use_bias=False, rngs=rngs
        )
        self.norm1 = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(hidden, features, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        if strides != 1 or in_features != features:
            self.shortcut_conv = nnx.Conv(
                in_features, features, (1, 1), strides=strides, use_bias=False, rngs=rngs
            )
            self.shortcut_norm = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.shortcut_conv is not None:
            x = self.shortcut_norm(self.shortcut_conv(x))
        return nnx.relu(y + x)


class ResNet(nnx.Module):
    """A small ResNet with BatchNorm, residual adds and global average pooling.

    `hidden_features` gives the width between the two convolutions of every block, block by
    block across the stages (None: each block's own width).

    Example:
        >>> model = ResNet(input_shape=(8, 8, 1), stage_features=(8, 16), blocks_per_stage=1,
        ...                rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8, 8, 1))).shape
        (2, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        stage_features: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 2,
        num_classes: int = 10,
        stem_features: int | None = None,
        hidden_features: Sequence[int] | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        hidden = _block_widths(stage_features, blocks_per_stage, hidden_features)
        stem = stem_features or stage_features[0]
        self.stem_conv = nnx.Conv(
            input_shape[-1], stem, (3, 3), padding="SAME", use_bias=False, rngs=rngs
        )
        self.stem_norm = nnx.BatchNorm(stem, momentum=0.9, rngs=rngs)
        blocks, width = [], stem
        for stage, features in enumerate(stage_features):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                blocks.append(ResidualBlock(width, features, strides, hidden.pop(0), rngs=rngs))
                width = features
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_norm(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class TransformerEncoder(nnx.Module):
    """One pre-LayerNorm Transformer encoder block over image rows as tokens.

    Example:
        >>> model = TransformerEncoder(input_shape=(8, 8, 1), d_model=16, num_heads=2, mlp_dim=32,
        ...                            rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        d_model: int = 64,
        num_heads: int = 4,
        mlp_dim: int = 128,
        num_classes: int = 10,
        qkv_features: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        tokens, token_features = input_shape[0], input_shape[1] * input_shape[2]
        self.embed = nnx.Linear(token_features, d_model, rngs=rngs)
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, d_model))
        )
        self.ln_attention = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads, d_model, qkv_features=qkv_features or d_model, decode=False, rngs=rngs
        )
        self.ln_mlp = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, d_model, rngs=rngs)
        self.ln_final = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 4:
            x = x.reshape((x.shape[0], x.shape[1], -1))
        x = self.embed(x) + self.pos_embedding[...]
        x = x + self.attention(self.ln_attention(x))
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))
        return self.head(self.ln_final(x).mean(axis=1))
