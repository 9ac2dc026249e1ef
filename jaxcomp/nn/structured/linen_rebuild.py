"""Linen: the same module class with smaller constructor fields, found by probing.

Linen checks parameter shapes against the module definition, so a pruned Linen model is a new
module: the same class, with the constructor fields that set the pruned widths changed. Which
field sets which width is found by varying each candidate field once under `jax.eval_shape` and
recording the widths that follow it (module fields of Flax's layers, parameter axes of others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxcomp.nn.structured._modules import (
    expressible,
    module_kind,
    owning_module,
    split_path,
)
from jaxcomp.structured import (
    ChannelGroups,
    channel_groups,
    magnitude_importance,
    remove_channels,
    select_channels,
)
from jaxcomp.tree import Where, leaves_with_paths

__all__ = ["Importance", "linen_channel_groups", "prune_linen", "rebuild_linen"]

Importance = Callable[[Any, ChannelGroups], Mapping[str, Any]]
_Key = tuple[Any, ...]  # ("field", module path, name, index) or ("axis", leaf path, axis)
_Entry = tuple[str, tuple[int, ...]]  # a constructor field and an index inside it


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
    kind = module_kind(module)
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
        opath, owner = owning_module(records, split_path(path, True)[0])
        if module_kind(owner) is None:
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
            opath, _ = owning_module(records, split_path(path, True)[0])
            owners.setdefault(opath, []).append(path)
    for opath, paths in owners.items():
        module, kind = records[opath], module_kind(records[opath])
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
            # Depthwise (one input a group): whole groups go. A grouped conv with wider groups
            # narrows every group alike and keeps its group count.
            if was[-2] == 1:
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
                                + ", ".join(detail) + " (give each width its own constructor "
                                "field, or keep one group at its width: ratio={<its group's "
                                "name>: 0.0, '.*': ...} or select_channels without it)")
                named |= changed
                continue
            assign[entry] = targets.pop()
            covered |= changed
        for key in needs:
            if key not in covered and key not in named:
                problems.append(
                    f"{_describe(key, self.records)} must become {needs[key]} but no constructor "
                    f"field of {type(self.model).__name__} sets it (is the width hard-coded, or "
                    "computed from a field, such as `2 * channels` for a depthwise multiplier? A "
                    "width must be a constructor field itself: make it one, or protect the layer "
                    "with where=)"
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
    return expressible(groups, records, shapes, collections=True)


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
