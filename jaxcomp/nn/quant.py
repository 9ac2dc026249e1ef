"""Quantization for Flax models: activation fake quantization, calibration, integer serving.

Linen (through `nn.intercept_methods`, so the model class is never edited):

* `fake_quant_inputs(spec, ...)`: a context manager that fake-quantizes the input of every
  Dense / DenseGeneral / Conv / Einsum call (dynamic ranges, calibrated static ranges, LSQ
  steps or PACT clips, keyed by module path such as `"Dense_0"`);
* `calibrate_linen(model, variables, batches, spec)`: static input ranges from a few batches;
* `init_input_steps_linen(...)`: LSQ steps for those inputs, from one batch;
* `serve_linen(model, ...)`: an `apply` that runs every `QArray` kernel of a
  `jaxcomp.quant.quantize_tree` result on integer operands (`qdot` / `qconv` / int8 einsum),
  never materializing float weights.

NNX (module surgery on the model object):

* `quantize_inputs_nnx(model, spec, ...)` wraps every Linear / LinearGeneral / Conv / Einsum in
  a `QuantizedInput` module (dynamic, static, LSQ or PACT input quantization);
* `calibrate_nnx(model, batches)` sets the static ranges (and LSQ / PACT initial values);
* `serve_nnx(model, qstate, ...)` replaces those layers by `QuantizedLayer` modules holding the
  `QArray` kernels of `quantize_tree(nnx.state(model, nnx.Param), ...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcomp.core import is_compressed, materialize
from jaxcomp.quant import layers
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.learned import lsq_as_static, lsq_fake_quant, lsq_init, pact_as_static, pact_fake_quant
from jaxcomp.quant.matmul import DEFAULT_ACTIVATIONS
from jaxcomp.quant.numerics import QuantParams
from jaxcomp.quant.observers import MinMaxObserver, Observer, calibrate
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec
from jaxcomp.tree import path_dict

__all__ = [
    "LINEN_MODULES",
    "NNX_MODULES",
    "QuantStat",
    "QuantizedInput",
    "QuantizedLayer",
    "calibrate_linen",
    "calibrate_nnx",
    "fake_quant_inputs",
    "init_input_steps_linen",
    "quantize_inputs_nnx",
    "serve_linen",
    "serve_nnx",
]

LINEN_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
NNX_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
_METHODS = ("dynamic", "static", "lsq", "pact")

ModuleWhere = str | re.Pattern | Callable[[str, Any], bool] | None


def _matcher(where: ModuleWhere) -> Callable[[str, Any], bool]:
    if where is None:
        return lambda path, module: True
    if isinstance(where, (str, re.Pattern)):
        try:
            pattern = re.compile(where) if isinstance(where, str) else where
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from e
        return lambda path, module: pattern.fullmatch(path) is not None
    if callable(where):
        return lambda path, module: bool(where(path, module))
    raise ValueError(f"where= must be a regex, a predicate (path, module) -> bool or None, got {where!r}")


def _linen_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _lookup(table: Mapping[str, Any], path: str, what: str) -> Any:
    if path not in table:
        raise ValueError(f"{what} has no entry for module {path!r}; it has {sorted(table)[:20]}")
    return table[path]


def _input_and_rest(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple[tuple, dict]]]:
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if "inputs" in kwargs:
        return kwargs["inputs"], lambda x: (args, {**kwargs, "inputs": x})
    raise ValueError("intercepted layer was called without an input")


def _quantize_input(x, spec, path, *, params=None, steps=None, alphas=None, ste="clipped", key=None):
    if steps is not None:
        return lsq_fake_quant(x, _lookup(steps, path, "steps"), spec, path=path)
    if alphas is not None:
        return pact_fake_quant(x, _lookup(alphas, path, "alphas"), spec, path=path)
    if params is not None:
        return fake_quant(x, spec, params=_lookup(params, path, "params"), ste=ste, path=path)
    return fake_quant(x, spec, ste=ste, key=key, path=path)


@contextlib.contextmanager
def fake_quant_inputs(
    spec: QuantSpec,
    *,
    where: ModuleWhere = None,
    params: Mapping[str, QuantParams] | None = None,
    steps: Mapping[str, jax.Array] | None = None,
    alphas: Mapping[str, jax.Array] | None = None,
    ste: str = "clipped",
    key: jax.Array | None = None,
    modules: tuple[type, ...] = LINEN_MODULES,
) -> Iterator[None]:
    """Linen: fake-quantize the input of every selected Dense / DenseGeneral / Conv / Einsum.

    Use it inside the loss around `model.apply`; gradients flow through the straight-through
    estimator (or into `steps` / `alphas`, which the optimizer trains with the params).

    Args:
      spec: the activation spec.
      where: which layers, by module path ("Dense_0", "encoder/attention/query"): a regex
        (full match), a predicate `(path, module) -> bool`, or None for all.
      params: static `{module path: QuantParams}` from `calibrate_linen` (else dynamic ranges).
      steps: `{module path: LSQ step}` from `init_input_steps_linen` (learned step sizes).
      alphas: `{module path: PACT alpha}` (learned clips).
      ste: "clipped" or "plain" (dynamic and static ranges).
      key: PRNG key for stochastic rounding (dynamic ranges only).
      modules: the layer classes intercepted.

    Raises:
      ValueError: if more than one of `params`, `steps`, `alphas` is given; when a selected layer
        has no entry in the given table; or as `fake_quant` (non-float input...).

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> with fake_quant_inputs(QuantSpec(bits=8)):
        ...     y = model.apply(variables, jnp.ones((2, 4)))
        >>> y.shape
        (2, 3)
    """
    if sum(t is not None for t in (params, steps, alphas)) > 1:
        raise ValueError("give at most one of params=, steps=, alphas=")
    selected = _matcher(where)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, modules):
            return next_fun(*args, **kwargs)
        path = _linen_path(module)
        if not selected(path, module):
            return next_fun(*args, **kwargs)
        x, rebuild = _input_and_rest(args, kwargs)
        x = _quantize_input(x, spec, path, params=params, steps=steps, alphas=alphas, ste=ste, key=key)
        new_args, new_kwargs = rebuild(x)
        return next_fun(*new_args, **new_kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _collect_linen_inputs(model, variables, batch, where, modules, apply_kwargs):
    selected = _matcher(where)
    found: dict[str, list[jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, modules):
            path = _linen_path(module)
            if selected(path, module):
                found.setdefault(path, []).append(_input_and_rest(args, kwargs)[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, batch, **apply_kwargs)
    # A layer called several times (shared weights) is observed over all its inputs.
    return {p: xs[0] if len(xs) == 1 else jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
            for p, xs in found.items()}


def calibrate_linen(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[jax.Array],
    spec: QuantSpec,
    *,
    observer: Observer | None = None,
    where: ModuleWhere = None,
    modules: tuple[type, ...] = LINEN_MODULES,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, QuantParams]:
    """Static input ranges of the selected Linen layers, from a few batches.

    Args:
      model: the Linen model.
      variables: its variables (`{"params": ...}`; compressed leaves are materialized).
      batches: model inputs (e.g. 256 images in a few batches).
      spec: the activation spec.
      observer: how ranges are observed (`MinMaxObserver()` by default).
      where: which layers, by module path (as `fake_quant_inputs`).
      modules: the layer classes observed.
      apply_kwargs: extra keyword arguments of `model.apply` (e.g. `{"train": False}`).

    Returns:
      `{module path: QuantParams}`, for `fake_quant_inputs(params=...)` and `serve_linen`.

    Raises:
      ValueError: if no layer is selected, or naming the layer and batch when an input held
        NaN/Inf.

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> list(calibrate_linen(model, variables, [jnp.ones((2, 4))], QuantSpec()))
        ['']
    """
    variables = materialize(dict(variables))
    kwargs = dict(apply_kwargs or {})

    def collect(batch):
        return _collect_linen_inputs(model, variables, batch, where, modules, kwargs)

    batches = list(batches)
    if batches and not jax.eval_shape(collect, batches[0]):
        raise ValueError(f"calibrate_linen: where={where!r} selects no {[m.__name__ for m in modules]} layer")
    return calibrate(collect, batches, spec, observer=observer)


def init_input_steps_linen(
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: jax.Array,
    spec: QuantSpec,
    *,
    where: ModuleWhere = None,
    modules: tuple[type, ...] = LINEN_MODULES,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """LSQ initial steps (`2 mean|x| / sqrt(qmax)`) of the selected layers' inputs, from one batch.

    Returns:
      `{module path: step}` for `fake_quant_inputs(steps=...)`; train it with the params.

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> init_input_steps_linen(model, variables, jnp.ones((2, 4)), QuantSpec(bits=8))[""].shape
        (1, 1)
    """
    inputs = jax.jit(lambda b: _collect_linen_inputs(
        model, materialize(dict(variables)), b, where, modules, dict(apply_kwargs or {})))(batch)
    if not inputs:
        raise ValueError(f"init_input_steps_linen: where={where!r} selects no layer")
    return {path: lsq_init(x, spec, path) for path, x in inputs.items()}


def _linen_layer(module, x, kernel, bias, *, activations, act_params, strategy, path):
    if isinstance(module, nn.Dense):
        return layers.dense_general(x, kernel, bias, dtype=module.dtype, activations=activations,
                                    act_params=act_params, strategy=strategy, path=path)
    if isinstance(module, nn.DenseGeneral):
        return layers.dense_general(x, kernel, bias, axis=module.axis, batch_dims=module.batch_dims,
                                    dtype=module.dtype, activations=activations,
                                    act_params=act_params, strategy=strategy, path=path)
    if isinstance(module, nn.Conv):
        return layers.conv(x, kernel, bias, strides=module.strides, padding=module.padding,
                           input_dilation=module.input_dilation,
                           kernel_dilation=module.kernel_dilation,
                           feature_group_count=module.feature_group_count, mask=module.mask,
                           dtype=module.dtype, activations=activations, act_params=act_params,
                           strategy=strategy, path=path)
    raise TypeError(type(module))


def serve_linen(
    model: nn.Module,
    *,
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    act_params: Mapping[str, QuantParams] | None = None,
    strategy: str = "auto",
    where: ModuleWhere = None,
) -> Callable[..., Any]:
    """An `apply(variables, *args, **kwargs)` that serves `model` from quantized params.

    Every Dense / DenseGeneral / Conv / Einsum whose kernel is a `QArray` runs on integer
    operands: its input is quantized (dynamic per-tensor ranges, or the calibrated `act_params`)
    and multiplied by the int8 codes with int32 sums, scales applied after. Other compressed
    leaves (e.g. a `Codebook` embedding) are materialized. Jit the returned function.

    Args:
      model: the Linen model.
      activations: the activation spec; None for weight-only serving (float activations).
      act_params: static `{module path: QuantParams}` from `calibrate_linen`.
      strategy: as `jaxcomp.quant.qdot` ("auto" measures once per shape).
      where: which layers run the integer path, by module path (default all).

    Returns:
      `apply(variables, *args, **kwargs)`, with `variables["params"]` from `quantize_tree`.

    Raises:
      ValueError (when called): if a `QArray` kernel belongs to a layer with no integer path, or
        a layer is missing from `act_params`.

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> qparams = quantize_tree(variables["params"], QuantSpec(channel_axes=(-1,)), where=r".*kernel")
        >>> serve_linen(model)({"params": qparams}, jnp.ones((2, 4))).shape
        (2, 3)
    """
    selected = _matcher(where)
    supported = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        own = module.variables.get("params", {}) if module.scope is not None else {}
        kernel = own.get("kernel") if hasattr(own, "get") else None
        path = _linen_path(module)
        if not isinstance(kernel, QArray):
            for name, value in (own.items() if hasattr(own, "items") else ()):
                if isinstance(value, QArray):
                    raise ValueError(
                        f"serve_linen: {path}/{name} is a QArray but {type(module).__name__} has no "
                        "integer path; leave it out of quantize_tree(where=...) or materialize it")
            return next_fun(*args, **kwargs)
        if not isinstance(module, supported) or not selected(path, module):
            if not isinstance(module, supported):
                raise ValueError(
                    f"serve_linen: {path}/kernel is a QArray but {type(module).__name__} has no "
                    "integer path; leave it out of quantize_tree(where=...) or materialize it")
            raise ValueError(f"serve_linen: {path}/kernel is a QArray but where= excludes the layer")
        x, _ = _input_and_rest(args, kwargs)
        bias = own.get("bias")
        params = None if act_params is None or activations is None else _lookup(act_params, path, "act_params")
        if isinstance(module, nn.Einsum):
            equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
            return layers.einsum(equation, x, kernel, bias, dtype=module.dtype,
                                 activations=activations, act_params=params, path=path)
        return _linen_layer(module, x, kernel, bias, activations=activations, act_params=params,
                            strategy=strategy, path=path)

    def apply(variables, *args, **kwargs):
        variables = dict(variables)
        variables = {
            col: _materialize_except_kernels(tree) if col == "params" else materialize(tree)
            for col, tree in variables.items()
        }
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **kwargs)

    return apply


def _materialize_except_kernels(tree: Any) -> Any:
    """Materializes compressed leaves, except `QArray` kernels (served on integers)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: leaf if isinstance(leaf, QArray) and _last_key(kp) == "kernel"
        else (leaf.materialize() if is_compressed(leaf) else leaf),
        tree, is_leaf=is_compressed,
    )


def _last_key(key_path) -> str:
    key = key_path[-1] if key_path else None
    return str(getattr(key, "key", getattr(key, "name", key)))


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
                 ste: str = "clipped", observer: Observer | None = None):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.layer = layer
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
            # (range state, sum over batches of mean|x|): the latter initialises LSQ steps.
            value = self.observer_state.get_value()
            state, abs_sum = (self.observer.init(x.shape, spec), 0.0) if value is None else value
            abs_mean = jnp.mean(jnp.abs(x.astype(jnp.float32)))
            self.observer_state.set_value((self.observer.update(state, x, spec), abs_sum + abs_mean))
        elif method == "dynamic":
            x = fake_quant(x, spec, ste=self.config.ste)
        elif method == "static":
            zero = None if self.zero_point is None else self.zero_point.get_value()
            x = fake_quant(x, spec, params=QuantParams(self.scale.get_value(), zero), ste=self.config.ste)
        elif method == "lsq":
            x = lsq_fake_quant(x, self.step.get_value(), spec)
        else:
            x = pact_fake_quant(x, self.alpha.get_value(), spec)
        return self.layer(x, *args, **kwargs)


def _nnx_children(node: Any) -> Iterator[tuple[str, Any, Callable[[Any], None]]]:
    """(name, child, setter) for module attributes and the items of nnx.List / nnx.Dict."""
    if isinstance(node, nnx.List):
        for i, child in enumerate(list(node)):
            yield str(i), child, lambda v, i=i: node.__setitem__(i, v)
        return
    if isinstance(node, nnx.Dict):
        for k, child in list(node.items()):
            yield str(k), child, lambda v, k=k: node.__setitem__(k, v)
        return
    for name, child in list(vars(node).items()):
        if name.startswith("_"):
            continue
        if isinstance(child, (nnx.Module, nnx.List, nnx.Dict)):
            yield name, child, lambda v, name=name: setattr(node, name, v)


def _replace_nnx(model: nnx.Module, replace: Callable[[str, Any], Any | None]) -> int:
    """Depth-first module surgery: `replace(path, module)` returns a substitute or None."""
    count = 0

    def visit(node, prefix):
        nonlocal count
        for name, child, setter in _nnx_children(node):
            path = f"{prefix}/{name}" if prefix else name
            new = replace(path, child)
            if new is not None:
                setter(new)
                count += 1
            else:
                visit(child, path)

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
        (learned steps, initialised by `calibrate_nnx`) or "pact" (learned clips).
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
    selected = _matcher(where)

    def replace(path, child):
        if isinstance(child, modules) and selected(path, child):
            return QuantizedInput(child, spec, method=method, ste=ste, observer=observer)
        return None

    if _replace_nnx(model, replace) == 0:
        raise ValueError(f"quantize_inputs_nnx: where={where!r} selects no {[m.__name__ for m in modules]}")
    return model


def _wrappers(model: nnx.Module) -> list[QuantizedInput]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, QuantizedInput)]


def calibrate_nnx(model: nnx.Module, batches: Iterable[jax.Array]) -> nnx.Module:
    """Observes the inputs of every `QuantizedInput` over `batches` and sets its static range
    ("static"), LSQ step ("lsq", `2 mean|x| / sqrt(qmax)` of the first batch) or PACT clip
    ("pact", the observed maximum). Observation runs under `nnx.jit`. Returns `model` (updated in place).

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
            w.step = nnx.Param(2.0 * (abs_sum / state.count) / jnp.sqrt(float(w.config.spec.qmax)))
        elif w.config.method == "pact":
            w.alpha = nnx.Param(jnp.max(state.hi).astype(jnp.float32))
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
                 act_params: QuantParams | None, strategy: str):
        self.kind = type(source).__name__
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
        common = dict(dtype=o.get("dtype"), activations=self.activations, act_params=params)
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

    Args:
      model: the NNX model.
      qstate: `quantize_tree(nnx.state(model, nnx.Param), spec, where=r".*kernel")`.
      activations: the activation spec; None for weight-only serving. A `QuantizedInput`
        wrapper with static, LSQ or PACT ranges passes its own spec and its calibrated range,
        learned step or learned clip instead.
      strategy: as `jaxcomp.quant.qdot`.
      modules: the layer classes served.

    Raises:
      ValueError: if `qstate` holds no `QArray` kernel of a served layer.

    Example:
        >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> q = quantize_tree(nnx.state(model, nnx.Param), QuantSpec(channel_axes=(-1,)), where=r".*kernel")
        >>> serve_nnx(model, q)(jnp.ones((2, 4))).shape
        (2, 3)
    """
    kernels = {p: leaf for p, leaf in path_dict(qstate).items() if isinstance(leaf, QArray)}

    def replace(path, child):
        if isinstance(child, QuantizedInput) and isinstance(child.layer, modules):
            kernel = kernels.get(f"{path}/layer/kernel")
            if kernel is None:
                return None
            spec, params = activations, None
            method = child.config.method
            if method == "static":
                zero = None if child.zero_point is None else child.zero_point.get_value()
                spec, params = child.config.spec, QuantParams(child.scale.get_value(), zero)
            elif method in ("lsq", "pact"):
                # The learned step (or clip) is a static grid: serve exactly what was trained.
                spec = child.config.spec
                learned = {"lsq": lsq_as_static({"": child.step.get_value()}),
                           "pact": pact_as_static({"": child.alpha.get_value()}, spec)}[method]
                params = learned[""]
            return QuantizedLayer(child.layer, kernel, activations=spec, act_params=params,
                                  strategy=strategy)
        if isinstance(child, modules) and f"{path}/kernel" in kernels:
            return QuantizedLayer(child, kernels[f"{path}/kernel"], activations=activations,
                                  act_params=None, strategy=strategy)
        return None

    if _replace_nnx(model, replace) == 0:
        raise ValueError("serve_nnx: qstate has no QArray kernel of a "
                         f"{[m.__name__ for m in modules]} layer; paths: {sorted(kernels)[:20]}")
    return model

