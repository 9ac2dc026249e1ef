"""Structured pruning for Flax models: rebuilt Linen modules, shrunk NNX modules, fine-tuning.

`jaxcomp.structured` finds channel groups and cuts parameter trees; a Flax model also holds its
widths outside the tree (Linen constructor fields, NNX module attributes). This module closes
that gap:

* `linen_channel_groups` / `nnx_channel_groups`: the groups of a model, keeping only axes its
  modules can change (one head width is shared by query, key and value, so the value's per-head
  width is not prunable on its own in Flax attention).
* `rebuild_linen(model, variables, groups, keep)`: the smaller variables plus the *same module
  class with smaller constructor fields*, found by probing which field sets which width.
* `shrink_nnx(model, groups, keep)`: a new NNX model whose state is cut and whose module
  attributes (`in_features`, `out_features`, `num_heads`, ...) follow; it runs with `__call__`.
* `prune_linen` / `prune_nnx`: score, select and cut in one call.
* `prune_and_finetune_linen` / `prune_and_finetune_nnx`: prune a fraction, train a few steps
  with your optax optimizer, repeat until the target.
"""

from jaxcomp.nn.structured.finetune import prune_and_finetune_linen, prune_and_finetune_nnx
from jaxcomp.nn.structured.linen_rebuild import linen_channel_groups, prune_linen, rebuild_linen
from jaxcomp.nn.structured.nnx_surgery import nnx_channel_groups, prune_nnx, shrink_nnx

__all__ = [
    "linen_channel_groups",
    "nnx_channel_groups",
    "prune_and_finetune_linen",
    "prune_and_finetune_nnx",
    "prune_linen",
    "prune_nnx",
    "rebuild_linen",
    "shrink_nnx",
]
