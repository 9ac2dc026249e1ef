"""NNX: module surgery. The state is cut, merged into a copy, and width attributes follow."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxcomp.nn.structured._modules import expressible, module_kind
from jaxcomp.nn.structured.linen_rebuild import Importance
from jaxcomp.structured import (
    ChannelGroups,
    channel_groups,
    magnitude_importance,
    remove_channels,
    select_channels,
)
from jaxcomp.tree import Where, leaves_with_paths

__all__ = ["nnx_channel_groups", "prune_nnx", "shrink_nnx"]


def _nnx_modules(model: nnx.Module) -> dict[tuple[str, ...], nnx.Module]:
    return {tuple(str(p) for p in path): m for path, m in nnx.iter_modules(model)}


def _nnx_apply(graphdef: Any) -> Callable[..., Any]:
    def apply(state: Any, *inputs: Any) -> Any:
        # Inference mode, so BatchNorm reads (and couples) its running statistics.
        module = nnx.view(nnx.merge(graphdef, state), deterministic=True,
                          use_running_average=True, raise_if_not_found=False)
        return module(*inputs)

    return apply


def nnx_channel_groups(model: nnx.Module, *inputs: Any, where: Where = None) -> ChannelGroups:
    """The channel groups of an NNX model that its modules can express.

    The model is traced in inference mode (`use_running_average=True`, `deterministic=True`)
    on a copy; the model itself is not changed.

    Args:
      model: the NNX module.
      *inputs: example inputs of `model(*inputs)`.
      where: which leaves of `nnx.state(model)` may be pruned (paths like `"head/kernel"`).

    Returns:
      A `ChannelGroups` over the paths of `nnx.state(model)`.

    Raises:
      ValueError: as `jaxcomp.structured.channel_groups`.

    Example:
        >>> from jaxcomp.testing.nnx_models import MLP
        >>> model = MLP((6,), features=(8, 4), rngs=nnx.Rngs(0))
        >>> nnx_channel_groups(model, jnp.ones((1, 6))).names
        ('layers/0/kernel', 'layers/1/kernel')
    """
    graphdef, state = nnx.split(model)
    groups = channel_groups(_nnx_apply(graphdef), state, *inputs, where=where)
    shapes = {p: tuple(np.shape(x)) for p, x in leaves_with_paths(state)}
    return expressible(groups, _nnx_modules(model), shapes, collections=False)


def _update_attributes(module: nnx.Module) -> None:
    """Sets the width attributes of a known NNX module from its (cut) parameters."""
    kind = module_kind(module)
    if kind == "dense":
        module.in_features, module.out_features = module.kernel.shape
    elif kind == "dense_general" and not module.batch_axis:
        n_in = len(module.in_features)
        module.in_features = tuple(module.kernel.shape[:n_in])
        module.out_features = tuple(module.kernel.shape[n_in:])
    elif kind == "conv":
        shape, was = tuple(module.kernel.shape), tuple(module.kernel_shape)
        if shape == was:
            return
        if getattr(module, "mask", None) is not None:
            raise ValueError(
                f"cannot shrink {type(module).__name__} with a kernel mask; its mask has the "
                f"old shape {was}"
            )
        groups = getattr(module, "feature_group_count", 1)
        # Depthwise (one input a group): whole groups go. A grouped conv with wider groups
        # narrows every group alike and keeps its group count.
        if groups > 1 and was[-2] == 1:
            groups = shape[-1] // (was[-1] // groups)
            module.feature_group_count = groups
        module.kernel_shape = shape
        module.out_features = shape[-1]
        module.in_features = shape[-2] * groups
    elif kind == "norm":
        stats = [getattr(module, n, None) for n in ("scale", "bias", "mean")]
        present = [v for v in stats if v is not None]
        if present:
            module.num_features = present[0].shape[-1]
    elif kind == "attention":
        query, key = module.query.kernel.shape, module.key.kernel.shape
        out = module.out.kernel.shape
        module.in_features, module.num_heads, module.head_dim = query
        module.in_kv_features, module.num_kv_heads = key[0], key[1]
        module.qkv_features = query[1] * query[2]
        module.out_features = out[-1]
    elif kind == "embed":
        module.num_embeddings, module.features = module.embedding.shape


def shrink_nnx(model: nnx.Module, groups: ChannelGroups, keep: Mapping[str, Any]) -> nnx.Module:
    """A new NNX model with the channels `keep` drops removed; `model` is left as it was.

    The state is cut with `remove_channels`, merged into a copy of the model, and the width
    attributes of Flax's modules (`Linear`, `LinearGeneral`, `Conv`, `BatchNorm`, `LayerNorm`,
    `MultiHeadAttention`, `Embed`, ...) are set from the new shapes. Modules of your own that
    hold parameters directly need nothing more; ones that keep a width in a plain attribute
    and use it in `__call__` make the check fail (the new model is run on the example inputs
    under `jax.eval_shape`).

    Args:
      model: the NNX module the groups were computed on.
      groups: from `nnx_channel_groups`.
      keep: `{group name: kept mask or indices}`.

    Returns:
      The smaller model, called as before.

    Raises:
      ValueError: if `keep` is invalid, or the shrunk model fails on the example inputs.

    Example:
        >>> from jaxcomp.testing.nnx_models import MLP
        >>> model, x = MLP((6,), features=(8, 4), rngs=nnx.Rngs(0)), jnp.ones((1, 6))
        >>> small = shrink_nnx(model, nnx_channel_groups(model, x), {"layers/0/kernel": [0, 3]})
        >>> small.layers[0].out_features, small(x).shape, model.layers[0].out_features
        (2, (1, 10), 8)
    """
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, remove_channels(state, groups, keep))
    for _, module in nnx.iter_modules(new):
        _update_attributes(module)
    new_graphdef, new_state = nnx.split(new)
    try:
        jax.eval_shape(_nnx_apply(new_graphdef), new_state, *groups.inputs)
    except Exception as e:  # a module kept an old width somewhere jaxcomp does not know
        unknown = sorted({type(m).__name__ for _, m in nnx.iter_modules(new)
                          if module_kind(m) is None})
        raise ValueError(
            f"the shrunk {type(model).__name__} fails on the example inputs "
            f"({type(e).__name__}: {e}); modules of types {unknown} may keep a width in an "
            "attribute that jaxcomp does not update"
        ) from e
    return new


def prune_nnx(
    model: nnx.Module, *inputs: Any, ratio: float | Mapping[str, float],
    importance: Importance = magnitude_importance, scope: str = "group", min_channels: int = 1,
    round_to: int = 1, where: Where = None,
) -> nnx.Module:
    """Groups, scores, selects and cuts an NNX model in one call; returns a new model.

    Args:
      model: the NNX module (left unchanged).
      *inputs: example inputs.
      ratio: fraction of channels to remove (see `select_channels`).
      importance: `importance(state, groups) -> scores` over `nnx.state(model)`.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned.

    Returns:
      The smaller model.

    Raises:
      ValueError: on bad ratios or options (the model is untouched), and as `shrink_nnx`.

    Example:
        >>> from jaxcomp.testing.nnx_models import LeNet5
        >>> model, x = LeNet5((8, 8, 1), rngs=nnx.Rngs(0)), jnp.ones((1, 8, 8, 1))
        >>> small = prune_nnx(model, x, ratio=0.5)
        >>> [c.out_features for c in small.convs], small(x).shape
        ([3, 8], (1, 10))
    """
    groups = nnx_channel_groups(model, *inputs, where=where)
    keep = select_channels(groups, importance(nnx.state(model), groups), ratio=ratio, scope=scope,
                           min_channels=min_channels, round_to=round_to)
    return shrink_nnx(model, groups, keep)
