"""NNX: activation quantization by wrapping layers, calibration, and integer serving by
replacing layers (module surgery on the model object, in place).

`quantize_inputs_nnx` wraps every selected Linear / LinearGeneral / Conv / Einsum in a
`QuantizedInput`; `calibrate_nnx` sets their static ranges or learned-scale initial values;
`serve_nnx` replaces the layers by `QuantizedLayer` modules holding the `QArray` kernels of
`quantize_tree(nnx.state(model, nnx.Param), ...)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcomp.core import materialize
from jaxcomp.nn.quant.common import ModuleWhere, module_matcher
from jaxcomp.quant import layers
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.learned import lsq_as_static, lsq_fake_quant, pact_as_static, pact_fake_quant
from jaxcomp.quant.matmul import DEFAULT_ACTIVATIONS
from jaxcomp.quant.numerics import QuantParams, layout, to_grouped
from jaxcomp.quant.observers import MinMaxObserver, Observer
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec
from jaxcomp.tree import path_dict

__all__ = [
    "NNX_MODULES",
    "QuantStat",
    "QuantizedInput",
    "QuantizedLayer",
    "calibrate_nnx",
    "quantize_inputs_nnx",
    "serve_nnx",
]

NNX_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
_METHODS = ("dynamic", "static", "lsq", "pact")


class QuantStat(nnx.Variable):
    """NNX variable type of static quantization state (calibrated scales, observer ranges): not a
    `Param`, so optimizers built with `wrt=nnx.Param` leave it alone."""


@dataclasses.dataclass(frozen=True)
class _InputConfig:
    spec: QuantSpec
    method: str
    ste: str


class QuantizedInput(nnx.Module):
    """NNX: a layer whose input is fake-quantized before it runs (QAT / static ranges).

    Attributes:
      layer: the wrapped module (its params keep their names under `layer/`).
      scale, zero_point: `QuantStat` static ranges (method "static", set by `calibrate_nnx`).
      step: `nnx.Param` LSQ step (method "lsq"); alpha: `nnx.Param` PACT clip (method "pact").

    Example:
        >>> layer = QuantizedInput(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), QuantSpec(bits=8))
        >>> layer(jnp.ones((2, 4))).shape
        (2, 3)
    """

    def __init__(self, layer: nnx.Module, spec: QuantSpec, *, method: str = "dynamic",
                 ste: str = "clipped", observer: Observer | None = None, path: str = "x"):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.layer = layer
        self.path = path  # the layer's name in error messages
        self.config = _InputConfig(spec, method, ste)
        self.observer = observer or MinMaxObserver()
        self.observing = False
        self.observer_state = QuantStat(None)
        one = jnp.ones((), jnp.float32)
        self.scale = QuantStat(one) if method == "static" else None
        self.zero_point = QuantStat(jnp.zeros((), jnp.float32)) if method == "static" and not spec.symmetric else None
        self.step = nnx.Param(one) if method == "lsq" else None
        self.alpha = nnx.Param(6.0 * one) if method == "pact" else None

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        spec, method = self.config.spec, self.config.method
        if self.observing:
            # (range state, sum over batches of mean|x| per scale): the latter initialises LSQ
            # steps, one per scale of the spec (per channel for a per-channel spec).
            value = self.observer_state.get_value()
            state, abs_sum = (self.observer.init(x.shape, spec), 0.0) if value is None else value
            lay = layout(x.shape, spec)
            abs_mean = jnp.mean(jnp.abs(to_grouped(x, lay).astype(jnp.float32)),
                                axis=lay.reduce_axes, keepdims=True)
            self.observer_state.set_value((self.observer.update(state, x, spec), abs_sum + abs_mean))
        elif method == "dynamic":
            x = fake_quant(x, spec, ste=self.config.ste, path=self.path)
        elif method == "static":
            zero = None if self.zero_point is None else self.zero_point.get_value()
            x = fake_quant(x, spec, params=QuantParams(self.scale.get_value(), zero),
                           ste=self.config.ste, path=self.path)
        elif method == "lsq":
            x = lsq_fake_quant(x, self.step.get_value(), spec, path=self.path)
        else:
            x = pact_fake_quant(x, self.alpha.get_value(), spec, path=self.path)
        return self.layer(x, *args, **kwargs)


def _holds_module(x: Any) -> bool:
    if isinstance(x, nnx.Module):
        return True
    if isinstance(x, (nnx.List, list, tuple)):
        return any(_holds_module(item) for item in x)
    if isinstance(x, (nnx.Dict, dict)):
        return any(_holds_module(item) for item in x.values())
    return False


def _walkable(x: Any) -> bool:
    """A module, or a container (list, tuple, dict, nnx.List, nnx.Dict) holding one; not a
    layer's settings, such as a `padding` tuple of pairs."""
    return isinstance(x, nnx.Module) or (
        isinstance(x, (nnx.List, nnx.Dict, list, tuple, dict)) and _holds_module(x))


def _nnx_children(node: Any, set_node: Callable[[Any], None] | None = None
                  ) -> Iterator[tuple[str, Any, Callable[[Any], None]]]:
    """(name, child, setter) for module attributes and the items of nnx.List / nnx.Dict and of
    plain lists, tuples and dicts (`nnx.data([...])`), named as in `nnx.state`. A tuple is
    immutable: its items are replaced by setting a new tuple through `set_node`, its own
    setter in its parent."""
    if isinstance(node, tuple):
        items = list(node)
        for i, child in enumerate(items):
            if _walkable(child):
                def setter(v, i=i):
                    items[i] = v
                    set_node(tuple(items))
                yield str(i), child, setter
        return
    if isinstance(node, (nnx.List, list)):
        for i, child in enumerate(list(node)):
            if _walkable(child):
                yield str(i), child, lambda v, i=i: node.__setitem__(i, v)
        return
    if isinstance(node, (nnx.Dict, dict)):
        for k, child in list(node.items()):
            if _walkable(child):
                yield str(k), child, lambda v, k=k: node.__setitem__(k, v)
        return
    for name, child in list(vars(node).items()):
        if not name.startswith("_") and _walkable(child):
            yield name, child, lambda v, name=name: setattr(node, name, v)


def _replace_nnx(model: nnx.Module, replace: Callable[[str, Any], Any | None]) -> int:
    """Depth-first module surgery: `replace(path, module)` returns a substitute or None."""
    count = 0

    def visit(node, prefix, set_node=None):
        nonlocal count
        for name, child, setter in _nnx_children(node, set_node):
            path = f"{prefix}/{name}" if prefix else name
            new = replace(path, child)
            if new is not None:
                setter(new)
                count += 1
            else:
                visit(child, path, setter)

    visit(model, "")
    return count


def quantize_inputs_nnx(
    model: nnx.Module,
    spec: QuantSpec,
    *,
    method: str = "dynamic",
    where: ModuleWhere = None,
    ste: str = "clipped",
    observer: Observer | None = None,
    modules: tuple[type, ...] = NNX_MODULES,
) -> nnx.Module:
    """NNX: wraps every selected layer in a `QuantizedInput` (in place); returns `model`.

    Args:
      model: the NNX model (modified in place: layers at path `p` move to `p/layer`).
      spec: the activation spec.
      method: "dynamic" (per-batch ranges), "static" (ranges from `calibrate_nnx`), "lsq"
        (learned steps, initialised by `calibrate_nnx`) or "pact" (learned clips). Until
        `calibrate_nnx` runs (or a checkpoint restores them), a static scale and an LSQ step
        are 1 and a PACT clip is 6.
      where: which layers, by attribute path ("layers/0", "head"): regex, predicate or None.
      ste: "clipped" or "plain".
      observer: the observer `calibrate_nnx` uses.
      modules: the layer classes wrapped.

    Raises:
      ValueError: for an unknown method, or if nothing is selected.

    Example:
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> model = quantize_inputs_nnx(model, QuantSpec(bits=8))
        >>> model(jnp.ones((2, 4))).shape
        (2, 3)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_not_a_bare_layer(model, modules, "quantize_inputs_nnx")
    selected = module_matcher(where)

    def replace(path, child):
        if isinstance(child, QuantizedInput) and selected(path, child.layer):
            raise ValueError(f"quantize_inputs_nnx: {path} is already a QuantizedInput; its "
                             "input would be quantized twice (wrap each layer once)")
        if isinstance(child, modules) and selected(path, child):
            return QuantizedInput(child, spec, method=method, ste=ste, observer=observer,
                                  path=path)
        return None

    if _replace_nnx(model, replace) == 0:
        raise ValueError(f"quantize_inputs_nnx: where={where!r} selects no {[m.__name__ for m in modules]}")
    return model


def _check_not_a_bare_layer(model: nnx.Module, modules: tuple[type, ...], caller: str) -> None:
    # Layers are replaced in place, in their parent: the model itself cannot be.
    if isinstance(model, modules):
        raise ValueError(
            f"{caller}: the model is itself a {type(model).__name__}, which cannot be replaced in "
            "place; wrap it in a parent module, e.g. nnx.Sequential(layer)")


def _wrappers(model: nnx.Module) -> list[QuantizedInput]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, QuantizedInput)]


_MODE_ATTRIBUTES = ("deterministic", "use_running_average")


def calibrate_nnx(model: nnx.Module, batches: Iterable[jax.Array]) -> nnx.Module:
    """Observes the inputs of every `QuantizedInput` over `batches` and sets its static range
    ("static"), LSQ steps ("lsq", `2 mean|x| / sqrt(qmax)` over all the batches, one per scale
    of the spec) or PACT clip ("pact", the observed maximum of `|x|`, or of `x` for an unsigned
    spec); a step or clip whose inputs were all zero is set to 1. Observation runs under
    `nnx.jit`, in eval mode (`model.eval()`: Dropout off, BatchNorm on its running statistics,
    which stay as they were); every module's mode is restored afterwards. Returns `model`
    (updated in place).

    Raises:
      ValueError: if the model has no `QuantizedInput`, no batch is given, or naming the layer
        when an input held NaN/Inf.

    Example:
        >>> model = quantize_inputs_nnx(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))),
        ...                             QuantSpec(), method="static")
        >>> model = calibrate_nnx(model, [jnp.ones((2, 4))])
        >>> model.layers[0].scale.get_value() * 127
        Array(1., dtype=float32)
    """
    wrappers = _wrappers(model)
    if not wrappers:
        raise ValueError("calibrate_nnx: the model has no QuantizedInput layer (quantize_inputs_nnx)")
    for w in wrappers:
        w.observing, w.observer_state = True, QuantStat(None)
    # Calibration observes the model as it will be served: in eval mode (Dropout off, BatchNorm
    # on its running statistics, which a train-mode call would overwrite); the mode each module
    # was in comes back afterwards.
    modes = [(module, name, getattr(module, name)) for _, module in nnx.iter_modules(model)
             for name in _MODE_ATTRIBUTES if hasattr(module, name)]
    model.eval()

    @nnx.jit
    def observe(model, batch):
        model(batch)

    seen = 0
    try:
        for batch in batches:
            observe(model, batch)
            seen += 1
    finally:
        for w in wrappers:
            w.observing = False
        for module, name, value in modes:
            setattr(module, name, value)
    if not seen:
        raise ValueError("calibrate_nnx got no batches")
    paths = {id(node): "/".join(map(str, p)) for p, node in nnx.iter_graph(model)}
    for w in wrappers:
        path = paths.get(id(w), "?")
        state, abs_sum = w.observer_state.get_value()
        params = w.observer.params(state, w.config.spec, path)
        w.observer_state = QuantStat(None)
        if w.config.method == "static":
            w.scale = QuantStat(params.scale.reshape(()) if params.scale.size == 1 else params.scale)
            if w.zero_point is not None:
                w.zero_point = QuantStat(params.zero_point.reshape(()) if params.zero_point.size == 1
                                         else params.zero_point)
        elif w.config.method == "lsq":
            # As `lsq_init`: 1.0 where every observed input was zero (a zero step is invalid).
            step = 2.0 * (abs_sum / state.count) / jnp.sqrt(float(w.config.spec.qmax))
            step = jnp.where(step > 0, step, 1.0).astype(jnp.float32)
            # One step (a per-tensor spec) stays a scalar, as the wrapper creates it.
            w.step = nnx.Param(step.reshape(()) if step.size == 1 else step)
        elif w.config.method == "pact":
            # The clip covers the observed range: [-max|x|, max|x|] signed, [0, max x] unsigned;
            # 1.0 where every observed input was zero.
            top = jnp.maximum(-state.lo, state.hi) if w.config.spec.signed else state.hi
            alpha = jnp.max(top)
            w.alpha = nnx.Param(jnp.where(alpha > 0, alpha, 1.0).astype(jnp.float32))
    return model


def _hashable(value: Any) -> Any:
    """Static module options as hashable values (lists become tuples, dict views tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _hashable(v)) for k, v in value.items())
    return value


class QuantizedLayer(nnx.Module):
    """NNX: a Linear / LinearGeneral / Conv / Einsum served from a `QArray` kernel.

    Attributes:
      kernel: `nnx.Param` holding the `QArray`.
      bias: `nnx.Param` float bias, or None.
      act_scale, act_zero_point: `QuantStat` static activation range, or None for dynamic.
    """

    def __init__(self, source: nnx.Module, kernel: QArray, *, activations: QuantSpec | None,
                 act_params: QuantParams | None, strategy: str, path: str = "x"):
        self.kind = type(source).__name__
        self.path = path  # the layer's path in the model, for error messages
        self.kernel = nnx.Param(kernel)
        bias = getattr(source, "bias", None)
        self.bias = None if bias is None else nnx.Param(bias.get_value())
        self.activations = activations
        self.strategy = strategy
        self.act_scale = None if act_params is None else QuantStat(act_params.scale)
        self.act_zero_point = (None if act_params is None or act_params.zero_point is None
                               else QuantStat(act_params.zero_point))
        self.options = {name: _hashable(getattr(source, name)) for name in (
            "dtype", "axis", "batch_axis", "strides", "padding", "input_dilation", "kernel_dilation",
            "feature_group_count", "einsum_str") if hasattr(source, name)}
        self.mask = getattr(source, "mask", None)

    def __call__(self, x: jax.Array, einsum_str: str | None = None, out_sharding: Any = None) -> jax.Array:
        y = self._apply(x, einsum_str)
        return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)

    def _apply(self, x: jax.Array, einsum_str: str | None) -> jax.Array:
        kernel = self.kernel.get_value()
        bias = None if self.bias is None else self.bias.get_value()
        params = None
        if self.act_scale is not None:
            zero = None if self.act_zero_point is None else self.act_zero_point.get_value()
            params = QuantParams(self.act_scale.get_value(), zero)
        o = self.options
        common = dict(dtype=o.get("dtype"), activations=self.activations, act_params=params,
                      path=self.path)
        if self.kind == "Linear":
            return layers.dense_general(x, kernel, bias, strategy=self.strategy, **common)
        if self.kind == "LinearGeneral":
            return layers.dense_general(x, kernel, bias, axis=o["axis"],
                                        batch_dims=tuple(k for k, _ in o["batch_axis"]), strategy=self.strategy,
                                        **common)
        if self.kind == "Conv":
            return layers.conv(x, kernel, bias, strides=o["strides"], padding=o["padding"],
                               input_dilation=o["input_dilation"], kernel_dilation=o["kernel_dilation"],
                               feature_group_count=o["feature_group_count"], mask=self.mask,
                               strategy=self.strategy, **common)
        return layers.einsum(einsum_str or o["einsum_str"], x, kernel, bias, **common)


def serve_nnx(
    model: nnx.Module,
    qstate: Any,
    *,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    strategy: str = "auto",
    modules: tuple[type, ...] = NNX_MODULES,
) -> nnx.Module:
    """NNX: replaces every layer whose kernel is a `QArray` in `qstate` by a `QuantizedLayer`
    (in place; returns `model`). A `QuantizedInput` with calibrated static ranges passes them on.
    The other leaves of `qstate` are written into the model, materialized: biases, and quantized
    leaves that no served layer computes on (an `Embed` table runs on its dequantized values).

    Args:
      model: the NNX model.
      qstate: `quantize_tree(nnx.state(model, nnx.Param), spec, where=r".*kernel")`.
      activations: the activation spec of plain layers; None for weight-only serving. A layer
        wrapped in a `QuantizedInput` is served with the wrapper's own spec (what it was trained
        or calibrated with) and, for static, LSQ or PACT ranges, its calibrated range, learned
        step or learned clip.
      strategy: as `jaxcomp.quant.qdot`.
      modules: the layer classes served.

    Raises:
      ValueError: if `qstate` holds no `QArray` kernel of a served layer, or a `QArray` kernel
        of a layer with no integer path (`nnx.ConvTranspose`) or outside `modules`; the model is
        then left unchanged.

    Example:
        >>> from jaxcomp.quant import QuantSpec, quantize_tree
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> q = quantize_tree(nnx.state(model, nnx.Param), QuantSpec(channel_axes=(-1,)), where=r".*kernel")
        >>> serve_nnx(model, q)(jnp.ones((2, 4))).shape
        (2, 3)
    """
    _check_not_a_bare_layer(model, modules, "serve_nnx")
    if isinstance(qstate, (QuantSpec, nnx.Module)):
        raise ValueError(
            f"serve_nnx: qstate must be the quantized params, got a {type(qstate).__name__}; pass "
            "quantize_tree(nnx.state(model, nnx.Param), spec, where=r'.*kernel')")
    kernels = {p: leaf for p, leaf in path_dict(qstate).items() if isinstance(leaf, QArray)}

    def replace(path, child):
        if isinstance(child, QuantizedInput) and isinstance(child.layer, modules):
            kernel = kernels.get(f"{path}/layer/kernel")
            if kernel is None:
                return None
            # The wrapper's spec, not `activations`: a model trained with 4-bit dynamic input
            # quantization is served on 4 bits.
            spec, params = child.config.spec, None
            method = child.config.method
            if method == "static":
                zero = None if child.zero_point is None else child.zero_point.get_value()
                spec, params = child.config.spec, QuantParams(child.scale.get_value(), zero)
            elif method in ("lsq", "pact"):
                # The learned step (or clip) is a static grid: serve exactly what was trained.
                spec = child.config.spec
                if method == "lsq":
                    params = lsq_as_static({"": child.step.get_value()})[""]
                else:
                    params = pact_as_static({"": child.alpha.get_value()}, spec)[""]
            return QuantizedLayer(child.layer, kernel, activations=spec, act_params=params,
                                  strategy=strategy, path=path)
        if isinstance(child, modules) and f"{path}/kernel" in kernels:
            return QuantizedLayer(child, kernels[f"{path}/kernel"], activations=activations,
                                  act_params=None, strategy=strategy, path=path)
        return None

    served, seen = [], {}  # a dry run first: a call that raises leaves the model as it was

    def dry_run(path, child):
        seen[path] = child
        layer = replace(path, child)
        if layer is not None:
            served.append(f"{path}/layer/kernel" if isinstance(child, QuantizedInput)
                          else f"{path}/kernel")
        return None

    _replace_nnx(model, dry_run)
    if not served:
        raise ValueError("serve_nnx: qstate has no QArray kernel of a "
                         f"{[m.__name__ for m in modules]} layer; paths: {sorted(kernels)[:20]}")
    for path in sorted(kernels):
        layer_path, _, name = path.rpartition("/")
        if name == "kernel" and path not in served:
            # A quantized kernel that would silently run on float values (and float inputs).
            layer = seen.get(layer_path)  # a QuantizedInput's own layer is seen at .../layer
            if layer is None:
                raise ValueError(f"serve_nnx: {path} is a QArray but no layer was found at "
                                 f"{layer_path!r} (held in a container serve_nnx does not walk?)")
            raise ValueError(
                f"serve_nnx: {path} is a QArray but its layer ({type(layer).__name__}) "
                + ("has no integer path" if not isinstance(layer, NNX_MODULES)
                   else f"is not among modules={[m.__name__ for m in modules]}")
                + "; leave it out of quantize_tree(where=...) or materialize it")
    # Every other leaf of qstate (biases, a quantized embedding table, ...) goes into the model
    # as its dense value, so the served model computes what the quantized tree does.
    nnx.update(model, materialize(qstate))
    _replace_nnx(model, replace)
    return model
