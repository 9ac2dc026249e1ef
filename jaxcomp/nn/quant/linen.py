"""Linen: activation fake quantization, calibration and integer serving via `nn.intercept_methods`.

The model class is never edited: a method interceptor fake-quantizes the input of every selected
Dense / DenseGeneral / Conv / Einsum call (`fake_quant_inputs`), records those inputs
(`calibrate_linen`, `init_input_steps_linen`), or runs the layer's math on the integer codes of a
`QArray` kernel (`serve_linen`). Layers are keyed by module path ("Dense_0",
"encoder/attention/query"), the prefix of their params' paths.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcomp.core import is_compressed, materialize
from jaxcomp.nn.quant.common import ModuleWhere, lookup, module_matcher
from jaxcomp.quant import layers
from jaxcomp.quant.fake import fake_quant
from jaxcomp.quant.learned import lsq_fake_quant, lsq_init, pact_fake_quant
from jaxcomp.quant.matmul import DEFAULT_ACTIVATIONS
from jaxcomp.quant.numerics import QuantParams, is_factorized
from jaxcomp.quant.observers import Observer, _label, calibrate
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec

__all__ = [
    "LINEN_MODULES",
    "calibrate_linen",
    "fake_quant_inputs",
    "init_input_steps_linen",
    "serve_linen",
]

LINEN_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)


def _linen_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _input_and_rest(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple[tuple, dict]]]:
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if "inputs" in kwargs:
        return kwargs["inputs"], lambda x: (args, {**kwargs, "inputs": x})
    raise ValueError("intercepted layer was called without an input")


def _error_name(path: str, module: nn.Module) -> str:
    """The layer's name in error messages: its path, or its class for the root module (path "")."""
    return path or f"<root {type(module).__name__}>"


def _quantize_input(x, spec, path, *, params=None, steps=None, alphas=None, ste="clipped", key=None,
                    name=None):
    name = name or path
    if steps is not None:
        return lsq_fake_quant(x, lookup(steps, path, "steps"), spec, path=name)
    if alphas is not None:
        return pact_fake_quant(x, lookup(alphas, path, "alphas"), spec, path=name)
    if params is not None:
        return fake_quant(x, spec, params=lookup(params, path, "params"), ste=ste, path=name)
    return fake_quant(x, spec, ste=ste, key=key, path=name)


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
      key: PRNG key for stochastic rounding (dynamic ranges only); each layer folds in a
        hash of its path, so layers draw independent noise.
      modules: the layer classes intercepted.

    Raises:
      ValueError: if more than one of `params`, `steps`, `alphas` is given; when a selected layer
        has no entry in the given table; or as `fake_quant` (non-float input...).

    Warns:
      UserWarning: on leaving the block, if layers of the intercepted classes ran but `where`
        selected none of them (a misspelled pattern quantizes nothing).

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
    selected = module_matcher(where)
    called: list[str] = []  # layers of the intercepted classes that ran
    matched = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, modules):
            return next_fun(*args, **kwargs)
        path = _linen_path(module)
        called.append(path)
        if not selected(path, module):
            return next_fun(*args, **kwargs)
        matched.append(path)
        x, rebuild = _input_and_rest(args, kwargs)
        # Each layer rounds with its own noise: the key folded with a hash of its path.
        layer_key = None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()) >> 1)
        x = _quantize_input(x, spec, path, params=params, steps=steps, alphas=alphas, ste=ste,
                            key=layer_key, name=_error_name(path, module))
        new_args, new_kwargs = rebuild(x)
        return next_fun(*new_args, **new_kwargs)

    with nn.intercept_methods(interceptor):
        yield
    if called and not matched:
        # A misspelled `where` would otherwise train or evaluate the float model silently. A
        # warning, not an error: a jitted function called again from its cache runs no
        # interceptor, so its layers are not seen here even though they are quantized.
        warnings.warn(f"fake_quant_inputs: where={where!r} selected none of the layers that ran in "
                      f"this block: {sorted(set(called))[:10]}; nothing was quantized by them",
                      stacklevel=3)


@contextlib.contextmanager
def _no_lifted_layers(caller: str):
    """Layers inside a Flax lifted transform (nn.scan, nn.vmap, ...) see inputs traced by that
    transform, which an interceptor cannot carry out of it: say so instead of leaking them."""
    try:
        yield
    except jax.errors.UnexpectedTracerError as error:
        raise ValueError(
            f"{caller}: a selected layer runs inside a Flax lifted transform (nn.scan, nn.vmap, "
            "nn.remat_scan...), whose inputs cannot be observed from outside it; select the "
            "layers outside it with where=, or calibrate the unlifted model"
        ) from error


def _collect_linen_inputs(model, variables, batch, where, modules, apply_kwargs):
    selected = module_matcher(where)
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


def _variables(fn: str, variables: Any) -> dict[str, Any]:
    """`variables` as a dict of collections, or a ValueError when it is not a Linen variables
    dict (bare params are the usual slip)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables)[:4] if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"{fn}: pass the Linen variables, {{'params': params, ...}}, got {keys} "
                         f"(bare params? wrap them: {{'params': params}})")
    return dict(variables)


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
      ``{module path: QuantParams}``, for `fake_quant_inputs(params=...)` and `serve_linen`.

    Raises:
      ValueError: if no layer is selected, or naming the layer and batch when an input held
        NaN/Inf.

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> list(calibrate_linen(model, variables, [jnp.ones((2, 4))], QuantSpec()))
        ['']
    """
    variables = materialize(_variables("calibrate_linen", variables))
    kwargs = dict(apply_kwargs or {})

    def collect(batch):
        return _collect_linen_inputs(model, variables, batch, where, modules, kwargs)

    batches = list(batches)
    with _no_lifted_layers("calibrate_linen"):
        if batches and not jax.eval_shape(collect, batches[0]):
            raise ValueError(f"calibrate_linen: where={where!r} selects no "
                             f"{[m.__name__ for m in modules]} layer")
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
      ``{module path: step}`` for `fake_quant_inputs(steps=...)`; train it with the params.

    Example:
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> init_input_steps_linen(model, variables, jnp.ones((2, 4)), QuantSpec(bits=8))[""].shape
        (1, 1)
    """
    with _no_lifted_layers("init_input_steps_linen"):
        inputs = jax.jit(lambda b: _collect_linen_inputs(
            model, materialize(_variables("init_input_steps_linen", variables)), b, where, modules,
            dict(apply_kwargs or {})))(batch)
    if not inputs:
        raise ValueError(f"init_input_steps_linen: where={where!r} selects no layer")
    return {path: lsq_init(x, spec, _label(path)) for path, x in inputs.items()}


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
    and multiplied by the int8 codes with int32 sums, scales applied after. A selected layer
    whose kernel stays float but has an entry in `act_params` runs in float on its input
    fake-quantized with those ranges (what `fake_quant_inputs(params=act_params)` did in
    calibration or QAT); with dynamic ranges, float layers run unquantized. A factorized kernel
    (`jaxcomp.decompose`) runs on its factors, as under `intercept_factorized`. Other compressed
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
        >>> from jaxcomp.quant import QuantSpec, quantize_tree
        >>> model = nn.Dense(3)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> qparams = quantize_tree(variables["params"], QuantSpec(channel_axes=(-1,)), where=r".*kernel")
        >>> serve_linen(model)({"params": qparams}, jnp.ones((2, 4))).shape
        (2, 3)
    """
    selected = module_matcher(where)
    supported = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        own = module.variables.get("params", {}) if module.scope is not None else {}
        kernel = own.get("kernel") if hasattr(own, "get") else None
        path = _linen_path(module)
        leaf = lambda name: f"{path}/{name}" if path else f"{name} of {_error_name(path, module)}"  # noqa: E731
        if not isinstance(kernel, QArray):
            for name, value in (own.items() if hasattr(own, "items") else ()):
                if isinstance(value, QArray):
                    raise ValueError(
                        f"serve_linen: {leaf(name)} is a QArray but {type(module).__name__} has no "
                        "integer path; leave it out of quantize_tree(where=...) or materialize it")
            if (act_params is not None and activations is not None and isinstance(module, supported)
                    and path in act_params and selected(path, module)):
                # A float kernel with calibrated input ranges: its input is fake-quantized with
                # them, as under `fake_quant_inputs(params=...)`, so the served model computes what
                # the calibrated (or QAT) model did, as serve_nnx's static QuantizedInput
                # layers do.
                x, rebuild = _input_and_rest(args, kwargs)
                args, kwargs = rebuild(fake_quant(x, activations, params=act_params[path],
                                                  path=_error_name(path, module)))
            if is_factorized(kernel):
                # Served on its factors (dequantized, if quantized), as intercept_factorized runs
                # them.
                from jaxcomp.nn.decompose import _run_factorized_layer

                return _run_factorized_layer(next_fun, args, kwargs, context)
            return next_fun(*args, **kwargs)
        if not isinstance(module, supported) or not selected(path, module):
            if not isinstance(module, supported):
                raise ValueError(
                    f"serve_linen: {leaf('kernel')} is a QArray but {type(module).__name__} has "
                    "no integer path; leave it out of quantize_tree(where=...) or materialize it")
            raise ValueError(f"serve_linen: {leaf('kernel')} is a QArray but where= excludes the "
                             "layer")
        x, _ = _input_and_rest(args, kwargs)
        bias = own.get("bias")
        params = None if act_params is None or activations is None else lookup(act_params, path, "act_params")
        name = _error_name(path, module)
        if isinstance(module, nn.Einsum):
            equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
            return layers.einsum(equation, x, kernel, bias, dtype=module.dtype,
                                 activations=activations, act_params=params, path=name)
        return _linen_layer(module, x, kernel, bias, activations=activations, act_params=params,
                            strategy=strategy, path=name)

    def apply(variables, *args, **kwargs):
        variables = _variables("serve_linen", variables)
        variables = {
            col: _materialize_except_kernels(tree) if col == "params" else materialize(tree)
            for col, tree in variables.items()
        }
        try:
            with nn.intercept_methods(interceptor):
                return model.apply(variables, *args, **kwargs)
        except ValueError as e:
            message = str(e)
            lifted = ("nn.scan" if "scan got" in message and "length" in message else
                      "nn.vmap" if "vmap got inconsistent sizes" in message else None)
            if lifted is None:
                raise
            raise ValueError(
                f"serve_linen: a layer inside {lifted} has a QArray kernel whose scales are shared "
                "across the stacked layers, so the transform cannot slice them; quantize stacked "
                "kernels per layer, keeping the stacking axis 0 in the spec (e.g. "
                "QuantSpec(channel_axes=(0, -1)) with where= selecting them)") from e

    return apply


def _materialize_except_kernels(tree: Any) -> Any:
    """Materializes compressed leaves, except `QArray` kernels (served on integers) and
    factorized kernels (served on their factors)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: leaf if (isinstance(leaf, QArray) or is_factorized(leaf))
        and _last_key(kp) == "kernel" else (leaf.materialize() if is_compressed(leaf) else leaf),
        tree, is_leaf=is_compressed,
    )


def _last_key(key_path) -> str:
    key = key_path[-1] if key_path else None
    return str(getattr(key, "key", getattr(key, "name", key)))
