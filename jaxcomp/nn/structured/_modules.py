"""Which Flax module owns a parameter, and which of its axes the module can change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax import nnx

from jaxcomp.structured import ChannelGroups

KINDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("attention", (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)),
    ("dense", (nn.Dense, nnx.Linear)),
    ("dense_general", (nn.DenseGeneral, nnx.LinearGeneral)),
    ("conv", (nn.Conv, nn.ConvTranspose, nnx.Conv, nnx.ConvTranspose)),
    ("embed", (nn.Embed, nnx.Embed)),
    ("norm", (nn.BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nnx.BatchNorm,
              nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)),
)


def module_kind(module: Any) -> str | None:
    """The kind of a Flax layer ("dense", "conv", "attention", ...), None for other modules."""
    for name, types in KINDS:
        if isinstance(module, types):
            return name
    return None


def owning_module(
    modules: Mapping[tuple[str, ...], Any], path: tuple[str, ...]
) -> tuple[tuple[str, ...], Any]:
    """The module that sets a parameter's shape: an enclosing attention layer, else its module."""
    prefixes = [path[:i] for i in range(len(path) + 1) if path[:i] in modules]
    for prefix in prefixes:
        if module_kind(modules[prefix]) == "attention":
            return prefix, modules[prefix]
    return prefixes[-1], modules[prefixes[-1]]


def _axis_ok(owner: Any, rest: tuple[str, ...], axis: int, ndim: int) -> bool:
    """Whether the owner module can change this axis of the parameter at `rest` below it."""
    kind = module_kind(owner)
    if kind == "embed":
        return axis == ndim - 1
    if kind != "attention":
        return True
    child = rest[0] if len(rest) > 1 else None
    grouped = getattr(owner, "num_kv_heads", owner.num_heads) != owner.num_heads
    if child in ("query", "key", "value"):  # kernel (in, heads, head_dim), bias (heads, head_dim)
        return (axis == ndim - 2 and not grouped) or (ndim == 3 and axis == 0)
    if child == "out":  # kernel (heads, head_dim, out), bias (out,)
        return ndim == 1 or (axis != 1 and (axis != 0 or not grouped))
    return False


def split_path(path: str, collections: bool) -> tuple[tuple[str, ...], str]:
    parts = path.split("/")
    return tuple(parts[1 if collections else 0 : -1]), parts[-1]


def expressible(groups: ChannelGroups, modules: Mapping[tuple[str, ...], Any],
                 shapes: Mapping[str, tuple[int, ...]], collections: bool) -> ChannelGroups:
    kept, unprunable = [], dict(groups.unprunable)
    for group in groups:
        bad = None
        for m in group.members:
            mpath, name = split_path(m.path, collections)
            opath, owner = owning_module(modules, mpath)
            if not _axis_ok(owner, mpath[len(opath):] + (name,), m.axis, len(shapes[m.path])):
                bad = (m, opath, owner)
                break
        if bad is None:
            kept.append(group)
        else:
            m, opath, owner = bad
            unprunable[f"{m.path}[{m.axis}]"] = (
                f"module '{'/'.join(opath)}' ({type(owner).__name__}) cannot change this axis alone"
            )
    if not kept:
        raise ValueError(
            "no prunable channel group the Flax modules can express: "
            + "; ".join(f"{k}: {v}" for k, v in list(unprunable.items())[:12])
        )
    return groups.replace(kept, unprunable=unprunable)
