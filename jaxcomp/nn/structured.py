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

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from jaxcomp.structured import (
    ChannelGroups,
    channel_groups,
    kept_count,
    magnitude_importance,
    remove_channels,
    select_channels,
)
from jaxcomp.tree import Where, leaves_with_paths

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

Importance = Callable[[Any, ChannelGroups], Mapping[str, Any]]
_Key = tuple[Any, ...]  # ("field", module path, name, index) or ("axis", leaf path, axis)
_Entry = tuple[str, tuple[int, ...]]  # a constructor field and an index inside it

_KINDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("attention", (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)),
    ("dense", (nn.Dense, nnx.Linear)),
    ("dense_general", (nn.DenseGeneral, nnx.LinearGeneral)),
    ("conv", (nn.Conv, nn.ConvTranspose, nnx.Conv, nnx.ConvTranspose)),
    ("embed", (nn.Embed, nnx.Embed)),
    ("norm", (nn.BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nnx.BatchNorm,
              nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)),
)


def _kind(module: Any) -> str | None:
    for kind, types in _KINDS:
        if isinstance(module, types):
            return kind
    return None


def _owner(
    modules: Mapping[tuple[str, ...], Any], path: tuple[str, ...]
) -> tuple[tuple[str, ...], Any]:
    """The module that sets a parameter's shape: an enclosing attention layer, else its module."""
    prefixes = [path[:i] for i in range(len(path) + 1) if path[:i] in modules]
    for prefix in prefixes:
        if _kind(modules[prefix]) == "attention":
            return prefix, modules[prefix]
    return prefixes[-1], modules[prefixes[-1]]


def _axis_ok(owner: Any, rest: tuple[str, ...], axis: int, ndim: int) -> bool:
    """Whether the owner module can change this axis of the parameter at `rest` below it."""
    kind = _kind(owner)
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


def _split_path(path: str, collections: bool) -> tuple[tuple[str, ...], str]:
    parts = path.split("/")
    return tuple(parts[1 if collections else 0 : -1]), parts[-1]


def _expressible(groups: ChannelGroups, modules: Mapping[tuple[str, ...], Any],
                 shapes: Mapping[str, tuple[int, ...]], collections: bool) -> ChannelGroups:
    kept, unprunable = [], dict(groups.unprunable)
    for group in groups:
        bad = None
        for m in group.members:
            mpath, name = _split_path(m.path, collections)
            opath, owner = _owner(modules, mpath)
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


# ----------------------------------------------------------------------------------------------
# Linen


def _linen_apply(model: nn.Module, kwargs: Mapping[str, Any]) -> Callable[..., Any]:
    return lambda variables, *inputs: model.apply(variables, *inputs, **kwargs)


def _linen_trace(model: nn.Module, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]
                 ) -> tuple[dict[tuple[str, ...], nn.Module], dict[str, tuple[int, ...]]]:
    """The modules `model.init` calls (by path) and the variable shapes it makes (abstractly)."""
    records: dict[tuple[str, ...], nn.Module] = {}

    def record(next_fun: Callable[..., Any], args: Any, kw: Any, context: Any) -> Any:
        if context.module.scope is not None:
            records.setdefault(tuple(str(p) for p in context.module.path), context.module)
        return next_fun(*args, **kw)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *inputs)
    return records, {p: tuple(x.shape) for p, x in leaves_with_paths(shapes)}


def _fields(path: tuple[str, ...], module: nn.Module) -> dict[_Key, Any]:
    kind = _kind(module)
    names = {"dense": ("features",), "dense_general": ("features",),
             "conv": ("features", "feature_group_count"), "embed": ("features", "num_embeddings"),
             "attention": ("num_heads", "qkv_features", "out_features")}.get(kind or "", ())
    out: dict[_Key, Any] = {}
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (tuple, list)):
            out.update({("field", path, name, i): v for i, v in enumerate(value)})
        elif value is not None:
            out[("field", path, name, None)] = value
    return out


def _observables(records: Mapping[tuple[str, ...], nn.Module],
                 shapes: Mapping[str, tuple[int, ...]]) -> dict[_Key, Any]:
    """Widths a rebuild must match: known modules' fields, other modules' parameter axes."""
    out: dict[_Key, Any] = {}
    for path, shape in shapes.items():
        opath, owner = _owner(records, _split_path(path, True)[0])
        if _kind(owner) is None:
            out.update({("axis", path, a): n for a, n in enumerate(shape)})
        else:
            out.update(_fields(opath, owner))
    return out


def _describe(key: _Key, records: Mapping[tuple[str, ...], nn.Module]) -> str:
    if key[0] == "axis":
        return f"parameter '{key[1]}' axis {key[2]}"
    module = records.get(key[1])
    field = key[2] + ("" if key[3] is None else f"[{key[3]}]")
    return f"module '{'/'.join(key[1]) or '(top)'}' ({type(module).__name__}) field {field}"


def _widths(kind: str | None, module: nn.Module, shape_of: Callable[..., tuple[int, ...]]
            ) -> dict[str, Any]:
    """The field values of a known module that its parameter shapes imply."""
    if kind == "dense":
        return {"features": shape_of("kernel")[-1]}
    if kind == "dense_general":
        width = len(module.features) if isinstance(module.features, (tuple, list)) else 1
        kernel = shape_of("kernel")
        return {"features": tuple(kernel[-width:]) if width > 1 else kernel[-1]}
    if kind == "conv":
        return {"features": shape_of("kernel")[-1]}
    if kind == "embed":
        return {"features": shape_of("embedding")[-1]}
    if kind == "attention":
        query, out = shape_of("query", "kernel"), shape_of("out", "kernel")
        return {"num_heads": query[-2], "qkv_features": query[-2] * query[-1],
                "out_features": out[-1]}
    return {}


def _needs(records: Mapping[tuple[str, ...], nn.Module], old: Mapping[str, tuple[int, ...]],
           new: Mapping[str, tuple[int, ...]]) -> tuple[dict[_Key, int], list[str]]:
    """The widths the pruned variables require, and the ones no field can express."""
    needs: dict[_Key, int] = {}
    problems: list[str] = []
    owners: dict[tuple[str, ...], list[str]] = {}
    for path, shape in new.items():
        if shape != old[path]:
            opath, _ = _owner(records, _split_path(path, True)[0])
            owners.setdefault(opath, []).append(path)
    for opath, paths in owners.items():
        module, kind = records[opath], _kind(records[opath])
        if kind is None:
            for path in paths:
                for a, (n_old, n_new) in enumerate(zip(old[path], new[path])):
                    if n_old != n_new:
                        needs[("axis", path, a)] = n_new
            continue
        coll = paths[0].split("/")[0]
        after = _widths(kind, module, lambda *n: new["/".join((coll, *opath, *n))])
        before = _widths(kind, module, lambda *n: old["/".join((coll, *opath, *n))])
        if kind == "conv" and getattr(module, "feature_group_count", 1) > 1:
            kernel_path = "/".join((coll, *opath, "kernel"))
            kernel, was = new[kernel_path], old[kernel_path]
            if kernel[-2] == was[-2]:  # depthwise: whole groups went, each keeps its outputs
                after["feature_group_count"] = kernel[-1] // (was[-1] // module.feature_group_count)
        for name, value in after.items():
            current = getattr(module, name, None)
            if current is None:
                if value != before.get(name) and name != "out_features":
                    problems.append(
                        f"module '{'/'.join(opath)}' ({type(module).__name__}) takes {name} from "
                        f"its input; construct it with an explicit {name}"
                    )
            elif isinstance(current, (tuple, list)):
                needs.update({("field", opath, name, i): v
                              for i, v in enumerate(value) if v != current[i]})
            elif value != current:
                needs[("field", opath, name, None)] = value
    return needs, problems


def _entries(model: nn.Module) -> tuple[dict[_Entry, int], list[str]]:
    """The int constructor fields of `model` (inside tuples too), and the fields left None."""
    entries: dict[_Entry, int] = {}
    nones: list[str] = []

    def visit(name: str, index: tuple[int, ...], value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, np.integer)):
            entries[(name, index)] = int(value)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(name, index + (i,), v)

    for field in dataclasses.fields(model):
        if field.name in ("parent", "name") or not field.init:
            continue
        value = getattr(model, field.name)
        if value is None:
            nones.append(field.name)
        visit(field.name, (), value)
    return entries, nones


def _set(value: Any, index: tuple[int, ...], new: int) -> Any:
    if not index:
        return new
    items = list(value)
    items[index[0]] = _set(items[index[0]], index[1:], new)
    return type(value)(items)


def _with(model: nn.Module, updates: Mapping[_Entry, int]) -> nn.Module:
    fields: dict[str, Any] = {}
    for (name, index), value in updates.items():
        fields[name] = _set(fields.get(name, getattr(model, name)), index, value)
    return model.clone(**fields)


def _entry_name(entry: _Entry) -> str:
    return entry[0] + "".join(f"[{i}]" for i in entry[1])


class _Solver:
    """Finds the constructor fields that give a Linen model the pruned widths."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]):
        self.model, self.inputs, self.kwargs = model, inputs, kwargs
        self.records, self.shapes = _linen_trace(model, inputs, kwargs)
        self.observed = _observables(self.records, self.shapes)

    def _observe(self, model: nn.Module) -> dict[_Key, Any] | None:
        try:
            records, shapes = _linen_trace(model, self.inputs, self.kwargs)
        except Exception:  # a probe value the model rejects: this field cannot be probed
            return None
        return _observables(records, shapes)

    def _drives(self, entry: _Entry, value: int) -> set[_Key]:
        """The observables equal to `value` that follow this field when it changes."""
        for probe in (2 * value, 3 * value, value + 1):
            seen = self._observe(_with(self.model, {entry: probe}))
            if seen is not None:
                return {k for k, v in self.observed.items() if v == value and seen.get(k) == probe}
        return set()

    def _fill(self, nones: list[str], values: set[int]) -> tuple[str, int] | None:
        """A field left None that can hold one of `values` without changing the model."""
        for name in nones:
            for value in sorted(values):
                if self._observe(self.model.clone(**{name: value})) == self.observed:
                    return name, value
        return None

    def solve(self, needs: Mapping[_Key, int]) -> dict[_Entry, int]:
        entries, nones = _entries(self.model)
        while True:
            assign, problems = self._assign(entries, needs)
            if not problems:
                return assign
            filled = self._fill(nones, {self.observed[k] for k in needs if k in self.observed})
            if filled is None:
                raise ValueError(
                    f"could not rebuild {type(self.model).__name__} with the pruned widths: "
                    + "; ".join(problems)
                )
            name, value = filled
            nones.remove(name)
            self.model = self.model.clone(**{name: value})
            entries[(name, ())] = value

    def _assign(
        self, entries: Mapping[_Entry, int], needs: Mapping[_Key, int]
    ) -> tuple[dict[_Entry, int], list[str]]:
        wanted = {self.observed[k] for k in needs if k in self.observed}
        assign, covered, named, problems = {}, set(), set(), []
        for entry, value in entries.items():
            if value not in wanted:
                continue
            driven = self._drives(entry, value)
            changed = {k for k in driven if k in needs}
            if not changed:
                continue
            targets = {needs[k] for k in changed}
            stays = driven - changed
            if len(targets) > 1 or stays:
                detail = [f"{_describe(k, self.records)} to {needs[k]}"
                          for k in sorted(changed, key=str)]
                detail += [f"{_describe(k, self.records)} to stay {value}"
                           for k in sorted(stays, key=str)]
                problems.append(f"field {_entry_name(entry)} sets widths that must now differ: "
                                + ", ".join(detail))
                named |= changed
                continue
            assign[entry] = targets.pop()
            covered |= changed
        for key in needs:
            if key not in covered and key not in named:
                problems.append(
                    f"{_describe(key, self.records)} must become {needs[key]} but no constructor "
                    f"field of {type(self.model).__name__} sets it (is the width hard-coded?)"
                )
        return assign, problems


def linen_channel_groups(
    model: nn.Module, variables: Any, *inputs: Any, where: Where = None, **apply_kwargs: Any
) -> ChannelGroups:
    """The channel groups of a Linen model that its modules can express.

    Args:
      model: the Linen module.
      variables: all its collections (`{"params": ..., "batch_stats": ...}`).
      *inputs: example inputs for `model.apply` (the batch size does not matter).
      where: which leaves may be pruned (see `jaxcomp.structured.channel_groups`); paths start
        with the collection, e.g. `"params/head/kernel"`.
      **apply_kwargs: keyword arguments of the inference call, e.g. `train=False`.

    Returns:
      A `ChannelGroups` over the paths of `variables`.

    Raises:
      ValueError: as `channel_groups`.

    Example:
        >>> from jaxcomp.testing.models import MLP
        >>> model = MLP(features=(8, 4))
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
        >>> linen_channel_groups(model, variables, jnp.ones((1, 6))).names
        ('params/Dense_0/kernel', 'params/Dense_1/kernel')
    """
    groups = channel_groups(_linen_apply(model, apply_kwargs), variables, *inputs, where=where)
    records, _ = _linen_trace(model, inputs, apply_kwargs)
    shapes = {p: tuple(np.shape(x)) for p, x in leaves_with_paths(variables)}
    return _expressible(groups, records, shapes, collections=True)


def rebuild_linen(
    model: nn.Module, variables: Any, groups: ChannelGroups, keep: Mapping[str, Any],
    **apply_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Cuts the variables and returns the same module class with the smaller widths.

    Which constructor field sets which width is found by probing: each int field (or int inside
    a tuple field) whose value equals a width to change is varied once under `jax.eval_shape`,
    and the widths that follow it are recorded. A field left None that holds one int (e.g. an
    optional `qkv_features`) is filled with the value it stood for when that resolves a conflict.
    The result is checked: its `init` must make exactly the pruned shapes.

    Args:
      model: the Linen module.
      variables: its variables (all collections), as given to `linen_channel_groups`.
      groups: from `linen_channel_groups`.
      keep: `{group name: kept mask or indices}` (from `select_channels`).
      **apply_kwargs: keyword arguments of the call, as given to `linen_channel_groups`.

    Returns:
      `(smaller_model, smaller_variables)`; `smaller_model.apply(smaller_variables, x)` runs.

    Raises:
      ValueError: naming the module and field that could not be rebuilt: a width hard-coded in
        the module, or one field setting widths that must now differ.

    Example:
        >>> from jaxcomp.testing.models import MLP
        >>> model, x = MLP(features=(8, 4)), jnp.ones((1, 6))
        >>> variables = model.init(jax.random.key(0), x)
        >>> groups = linen_channel_groups(model, variables, x)
        >>> small, v = rebuild_linen(model, variables, groups, {"params/Dense_0/kernel": [0, 1]})
        >>> small.features, small.apply(v, x).shape
        ((2, 4), (1, 10))
    """
    new_variables = remove_channels(variables, groups, keep)
    inputs = groups.inputs
    solver = _Solver(model, inputs, apply_kwargs)
    new_shapes = {p: tuple(np.shape(x)) for p, x in leaves_with_paths(new_variables)}
    needs, problems = _needs(solver.records, solver.shapes, new_shapes)
    if problems:
        raise ValueError(f"could not rebuild {type(model).__name__}: " + "; ".join(problems))
    new_model = _with(solver.model, solver.solve(needs)) if needs else model
    _, made = _linen_trace(new_model, inputs, apply_kwargs)
    wrong = [f"{p}: rebuilt {made.get(p)} vs pruned {s}" for p, s in new_shapes.items()
             if made.get(p) != s]
    if wrong:
        raise ValueError(
            f"could not rebuild {type(model).__name__}: with the fields found, "
            + "; ".join(wrong[:8])
        )
    return new_model, new_variables


def prune_linen(
    model: nn.Module, variables: Any, *inputs: Any, ratio: float | Mapping[str, float],
    importance: Importance = magnitude_importance, scope: str = "group", min_channels: int = 1,
    round_to: int = 1, where: Where = None, **apply_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Groups, scores, selects and cuts a Linen model in one call.

    Args:
      model: the Linen module.
      variables: its variables (all collections).
      *inputs: example inputs.
      ratio: fraction of channels to remove (see `select_channels`).
      importance: `importance(variables, groups) -> scores`, e.g. `magnitude_importance` (the
        default), `bn_scale_importance`, or a `functools.partial` of the others.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned (e.g. protect the classifier).
      **apply_kwargs: keyword arguments of the inference call.

    Returns:
      `(smaller_model, smaller_variables)`.

    Raises:
      ValueError: on bad ratios or options (the model is untouched), and as `rebuild_linen`.

    Example:
        >>> from jaxcomp.testing.models import LeNet5
        >>> model, x = LeNet5(), jnp.ones((1, 8, 8, 1))
        >>> small, v = prune_linen(model, model.init(jax.random.key(0), x), x, ratio=0.5)
        >>> small.conv_features, small.dense_features
        ((3, 8), (60, 42))
    """
    groups = linen_channel_groups(model, variables, *inputs, where=where, **apply_kwargs)
    keep = select_channels(groups, importance(variables, groups), ratio=ratio, scope=scope,
                           min_channels=min_channels, round_to=round_to)
    return rebuild_linen(model, variables, groups, keep, **apply_kwargs)


# ----------------------------------------------------------------------------------------------
# NNX


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
    return _expressible(groups, _nnx_modules(model), shapes, collections=False)


def _update_attributes(module: nnx.Module) -> None:
    """Sets the width attributes of a known NNX module from its (cut) parameters."""
    kind = _kind(module)
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
        if groups > 1 and shape[-2] == was[-2]:  # depthwise: whole groups went
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
        unknown = sorted({type(m).__name__ for _, m in nnx.iter_modules(new) if _kind(m) is None})
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


# ----------------------------------------------------------------------------------------------
# Iterative pruning with fine-tuning


def _round_ratio(
    groups: ChannelGroups, original: dict[str, int], ratio: float, done: float, scope: str,
    min_channels: int, round_to: int,
) -> float | dict[str, float]:
    """The ratio that takes each group from its current size to its size after `done` of `ratio`."""
    if scope == "global":
        total = sum(original.setdefault(g.name, g.size) for g in groups)
        current = sum(g.size for g in groups)
        target = total - int(np.floor(ratio * done * total + 1e-9))
        return max(0.0, min(0.99, 1.0 - target / current))
    out = {}
    for g in groups:
        size = original.setdefault(g.name, g.size)
        target = kept_count(size, ratio * done, min_channels=min_channels, round_to=round_to)
        out[re.escape(g.name)] = max(0.0, (g.size - min(target, g.size)) / g.size)
    return out


def _check_schedule(ratio: Any, rounds: Any, steps: Any) -> None:
    for name, value, least in (("rounds", rounds, 1), ("steps", steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")


def prune_and_finetune_linen(
    model: nn.Module, variables: Any, *inputs: Any, batches: Iterator[Any],
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nn.Module, Any, Any], tuple[jax.Array, Any]],
    ratio: float, rounds: int, steps: int, importance: Importance = magnitude_importance,
    scope: str = "group", min_channels: int = 1, round_to: int = 1, where: Where = None,
    **apply_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Iterative pruning: `rounds` times, prune a share of `ratio` then train `steps` steps.

    After round `k` every group has lost `ratio * k / rounds` of its original channels (or the
    whole model has, with `scope="global"`). Each round rebuilds the model, so the train step is
    compiled again for the new shapes and the optimizer state is initialised anew with `tx`.

    Args:
      model: the Linen module.
      variables: its variables (all collections).
      *inputs: example inputs for tracing.
      batches: an iterator of training batches (anything `loss_fn` takes).
      tx: your optax optimizer.
      loss_fn: `loss_fn(model, variables, batch) -> (loss, updated_collections)`, where
        `updated_collections` holds the non-param collections after the step (e.g.
        `{"batch_stats": ...}` from `model.apply(..., mutable=["batch_stats"])`, or `{}`).
      ratio: the final fraction of channels removed, in [0, 1).
      rounds: the number of prune-then-train rounds.
      steps: train steps after each pruning.
      importance: `importance(variables, groups) -> scores`.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned.
      **apply_kwargs: keyword arguments of the inference call used for tracing.

    Returns:
      `(smaller_model, trained_variables)`.

    Raises:
      ValueError: on a ratio outside [0, 1), `rounds` < 1 or `steps` < 0.

    Example:
        >>> from jaxcomp.testing.models import MLP
        >>> model, x = MLP(features=(8, 4)), jnp.ones((4, 6))
        >>> def loss_fn(model, variables, batch):
        ...     return (model.apply(variables, batch) ** 2).mean(), {}
        >>> small, v = prune_and_finetune_linen(
        ...     model, model.init(jax.random.key(0), x), x, batches=iter([x] * 4),
        ...     tx=optax.sgd(0.1), loss_fn=loss_fn, ratio=0.5, rounds=2, steps=2)
        >>> small.features
        (4, 2)
    """
    _check_schedule(ratio, rounds, steps)
    original: dict[str, int] = {}
    for k in range(1, rounds + 1):
        groups = linen_channel_groups(model, variables, *inputs, where=where, **apply_kwargs)
        step_ratio = _round_ratio(groups, original, ratio, k / rounds, scope, min_channels,
                                  round_to)
        keep = select_channels(groups, importance(variables, groups), ratio=step_ratio,
                               scope=scope, min_channels=min_channels, round_to=round_to)
        model, variables = rebuild_linen(model, variables, groups, keep, **apply_kwargs)
        variables = _train_linen(model, variables, batches, tx, loss_fn, steps)
    return model, variables


def _train_linen(model: nn.Module, variables: Any, batches: Iterator[Any],
                 tx: optax.GradientTransformation, loss_fn: Callable[..., Any], steps: int) -> Any:
    if steps == 0:
        return variables
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params: Any, rest: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Any]:
        def loss(p: Any) -> tuple[jax.Array, Any]:
            return loss_fn(model, {"params": p, **rest}, batch)

        (_, updated), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), {**rest, **updated}, opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, rest, opt_state = step(params, rest, opt_state, next(batches))
    return {"params": params, **rest}


def prune_and_finetune_nnx(
    model: nnx.Module, *inputs: Any, batches: Iterator[Any], tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], jax.Array], ratio: float, rounds: int, steps: int,
    importance: Importance = magnitude_importance, scope: str = "group", min_channels: int = 1,
    round_to: int = 1, where: Where = None,
) -> nnx.Module:
    """Iterative pruning of an NNX model: `rounds` times, prune a share, train `steps` steps.

    Args:
      model: the NNX module (left unchanged; a new, trained model is returned).
      *inputs: example inputs for tracing.
      batches: an iterator of training batches.
      tx: your optax optimizer (an `nnx.Optimizer` over `nnx.Param` is made each round).
      loss_fn: `loss_fn(model, batch) -> loss`, called in train mode.
      ratio: the final fraction of channels removed, in [0, 1).
      rounds: the number of prune-then-train rounds.
      steps: train steps after each pruning.
      importance: `importance(state, groups) -> scores`.
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps.
      round_to: kept counts are rounded up to a multiple of this.
      where: which leaves may be pruned.

    Returns:
      The smaller, fine-tuned model (in train mode).

    Raises:
      ValueError: on a ratio outside [0, 1), `rounds` < 1 or `steps` < 0.

    Example:
        >>> from jaxcomp.testing.nnx_models import MLP
        >>> model, x = MLP((6,), features=(8, 4), rngs=nnx.Rngs(0)), jnp.ones((4, 6))
        >>> small = prune_and_finetune_nnx(
        ...     model, x, batches=iter([x] * 4), tx=optax.sgd(0.1),
        ...     loss_fn=lambda m, b: (m(b) ** 2).mean(), ratio=0.5, rounds=2, steps=2)
        >>> [layer.out_features for layer in small.layers]
        [4, 2]
    """
    _check_schedule(ratio, rounds, steps)
    original: dict[str, int] = {}
    for k in range(1, rounds + 1):
        groups = nnx_channel_groups(model, *inputs, where=where)
        step_ratio = _round_ratio(groups, original, ratio, k / rounds, scope, min_channels,
                                  round_to)
        keep = select_channels(groups, importance(nnx.state(model), groups), ratio=step_ratio,
                               scope=scope, min_channels=min_channels, round_to=round_to)
        model = shrink_nnx(model, groups, keep)
        if steps:
            model.train()
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

            @nnx.jit
            def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> jax.Array:
                loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch))(model)
                optimizer.update(model, grads)
                return loss

            for _ in range(steps):
                step(model, optimizer, next(batches))
    return model
