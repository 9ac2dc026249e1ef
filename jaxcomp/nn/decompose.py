"""Factorized layers in Flax models: NNX module surgery and a Linen interceptor.

Both keep the model's own `__call__`; only the Dense/Conv layers change, and they run the factor
sequence (`jaxcomp.decompose.factorized_apply`), not the dense reconstruction. The factors are
ordinary parameters (separate `nnx.Param` arrays in NNX; the array fields of the factorized leaf
in a Linen params tree), so a user fine-tunes them with their own optax optimizer.

NNX::

    model = decompose_nnx(model, Energy(0.9))          # a new model; Linear/Conv replaced
    # the factors are nnx.Params at "convs/0/kernel/core", "convs/0/kernel/u_in", ...
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

Linen::

    params = decompose_linen(model, variables, x, ranks=Energy(0.9))["params"]
    with intercept_factorized():                        # inside the function you jit
        y = model.apply({"params": params}, x)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcomp.core import is_compressed
from jaxcomp.flops import count_flops
from jaxcomp.decompose.apply import factorized_apply
from jaxcomp.decompose.leaves import CPKernel, ConvSpec, Factorized, SVDKernel, TTKernel, Tucker2Kernel
from jaxcomp.decompose.ranks import FlopBudget, RankRule
from jaxcomp.decompose.transform import DEFAULT_WHERE, decompose_tree
from jaxcomp.tree import Where, leaves_with_paths, selected_paths

__all__ = [
    "FactorizedConv",
    "FactorizedKernel",
    "FactorizedLinear",
    "UnsupportedLayerError",
    "conv_specs_linen",
    "decompose_linen",
    "decompose_nnx",
    "intercept_factorized",
]

_DENSE_KERNELS = (SVDKernel, TTKernel)
_CONV_KERNELS = (Tucker2Kernel, CPKernel)
_RUNNABLE = (nn.Dense, nn.Conv)  # the Linen layers intercept_factorized runs


def _cast(dtype: Any, x: jax.Array, kernel: Factorized, bias: Any) -> tuple[Any, Any, Any]:
    if dtype is None:
        return x, kernel, bias
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    return cast(x), jax.tree.map(cast, kernel.dense_factors()), cast(bias)


class FactorizedKernel(nnx.Module):
    """The factors of a factorized kernel as ordinary `nnx.Param` arrays, one per factor.

    In `nnx.state(model)` they sit under the layer's `kernel`: `"convs/0/kernel/core"`,
    `"convs/0/kernel/u_in"`, `"dense/0/kernel/cores/1"` (the paths `jaxcomp.decompose.map_factors`
    gives in a Linen tree). `as_leaf()` rebuilds the compressed leaf from the current values.

    Example:
        >>> from jaxcomp.decompose import SVDKernel
        >>> factors = FactorizedKernel(SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4))))
        >>> sorted(nnx.state(factors, nnx.Param).keys()), factors.as_leaf().shape
        (['u', 'v'], (6, 4))
    """

    def __init__(self, leaf: Factorized):
        self.leaf_type = type(leaf)
        self.meta = {}
        self.names = []
        for field in dataclasses.fields(leaf):
            value = getattr(leaf, field.name)
            if field.metadata.get("static"):
                self.meta[field.name] = value
                continue
            self.names.append(field.name)
            if value is None:
                setattr(self, field.name, nnx.data(None))
            elif isinstance(value, tuple):
                setattr(self, field.name, nnx.List([nnx.Param(v) for v in value]))
            else:
                setattr(self, field.name, nnx.Param(value))
        self.names = tuple(self.names)

    def as_leaf(self) -> Factorized:
        """The factorized leaf holding the current factor values."""
        values = {}
        for name in self.names:
            value = getattr(self, name)
            if value is None:
                values[name] = None
            elif isinstance(value, nnx.List):
                values[name] = tuple(v.get_value() for v in value)
            else:
                values[name] = value.get_value()
        return self.leaf_type(**values, **self.meta)


class _FactorizedLayer(nnx.Module):
    kinds: tuple = ()

    def __init__(self, kernel: Factorized, bias: jax.Array | None = None, *, dtype: Any = None,
                 precision: Any = None):
        if not isinstance(kernel, self.kinds):
            names = " or ".join(k.__name__ for k in self.kinds)
            raise TypeError(f"{type(self).__name__} takes a {names}, got {type(kernel).__name__}")
        self.kernel = FactorizedKernel(kernel)
        self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias.get_value()
        x, kernel, bias = _cast(self.dtype, x, self.kernel.as_leaf(), bias)
        return factorized_apply(x, kernel, bias, precision=self.precision)


class FactorizedLinear(_FactorizedLayer):
    """An NNX Dense layer whose kernel is an `SVDKernel` or a `TTKernel`, run as its factors.

    Attributes:
      kernel: a `FactorizedKernel` (the factors, as `nnx.Param` leaves).
      bias: `nnx.Param` of shape `(out,)`, or None.

    Example:
        >>> from jaxcomp.decompose import SVDKernel
        >>> layer = FactorizedLinear(SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4))), jnp.zeros(4))
        >>> layer(jnp.ones((3, 6))).shape
        (3, 4)
    """

    kinds = _DENSE_KERNELS

    def __init__(self, kernel: SVDKernel | TTKernel, bias: jax.Array | None = None, *,
                 dtype: Any = None, precision: Any = None):
        super().__init__(kernel, bias, dtype=dtype, precision=precision)
        self.in_features, self.out_features = kernel.shape


class FactorizedConv(_FactorizedLayer):
    """An NNX 2-D Conv layer whose kernel is a `Tucker2Kernel` or a `CPKernel`, run as its factors.

    The stride, padding and dilation are the kernel's `spec` (copied from the replaced layer).

    Example:
        >>> from jaxcomp.decompose import Tucker2Kernel
        >>> leaf = Tucker2Kernel(jnp.ones((3, 3, 2, 2)), jnp.ones((8, 2)), jnp.ones((2, 8)))
        >>> FactorizedConv(leaf)(jnp.ones((1, 5, 5, 8))).shape
        (1, 5, 5, 8)
    """

    kinds = _CONV_KERNELS

    def __init__(self, kernel: Tucker2Kernel | CPKernel, bias: jax.Array | None = None, *,
                 dtype: Any = None, precision: Any = None):
        super().__init__(kernel, bias, dtype=dtype, precision=precision)
        kh, kw, self.in_features, self.out_features = kernel.shape
        self.kernel_size = (kh, kw)


class UnsupportedLayerError(ValueError):
    """A `ValueError` for a layer the factor sequence cannot run (grouped, masked,
    input-dilated, not 2-D): the default selection leaves it dense, an explicit one names it.

    Example:
        >>> issubclass(UnsupportedLayerError, ValueError)
        True
    """


def _conv_spec(module: Any, path: str) -> ConvSpec:
    """The ConvSpec of a Flax (Linen or NNX) Conv, or ValueError for what the sequence cannot run."""
    kernel_size = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
    if len(kernel_size) != 2:
        raise UnsupportedLayerError(f"{path}: only 2-D convolutions are decomposed, got kernel_size {kernel_size}")
    if module.feature_group_count != 1:
        raise UnsupportedLayerError(
            f"{path}: grouped convolution (feature_group_count={module.feature_group_count}) "
            "cannot be decomposed"
        )
    dilation = module.input_dilation
    if dilation not in (None, 1) and tuple(dilation) != (1, 1):
        raise UnsupportedLayerError(f"{path}: input_dilation={dilation} is not supported")
    if module.mask is not None:
        raise UnsupportedLayerError(f"{path}: masked convolutions are not supported")
    try:
        return ConvSpec(strides=module.strides, padding=module.padding, dilation=module.kernel_dilation)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _join(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def decompose_nnx(
    model: nnx.Module,
    ranks: RankRule,
    *,
    where: Where = DEFAULT_WHERE,
    method: str = "auto",
    tt_order: int = 3,
    n_iter_max: int | None = None,
    seed: int = 0,
    svd: str = "truncated",
) -> nnx.Module:
    """A copy of an NNX model with its selected `nnx.Linear`/`nnx.Conv` layers factorized.

    The selected kernels (by their path in `nnx.state(model)`, e.g. `"convs/0/kernel"`) are
    decomposed with `jaxcomp.decompose.decompose_tree`, each Conv with its own stride, padding
    and dilation; every layer that got a factorized kernel is replaced by a `FactorizedLinear` or
    `FactorizedConv` holding it and the original bias. The model's own `__call__` is untouched.
    The input model is not modified.

    Args:
      model: an NNX model.
      ranks: a rank rule (see `decompose_tree`), or a budget over all selected layers.
      where: selection over `nnx.state(model)` paths (default: every `kernel`).
      method: `"auto"`, `"svd"`, `"tt"`, `"tucker2"` or `"cp"`.
      tt_order: number of TT cores.
      n_iter_max: HOOI/ALS iterations.
      seed: seed of the decompositions.
      svd: SVD algorithm (`"truncated"`, `"symeig"`, `"randomized"`; see `decompose_tree`).

    Returns:
      The new model.

    Raises:
      ValueError: naming the path, when no Linear/Conv kernel is selected, for grouped, masked,
        input-dilated or non-2-D convolutions, and for invalid ranks.

    Example:
        >>> from jaxcomp.testing.nnx_models import LeNet5
        >>> model = decompose_nnx(LeNet5(input_shape=(8, 8, 1), rngs=nnx.Rngs(0)), 2,
        ...                       where=r"convs/1/kernel")
        >>> type(model.convs[1]).__name__, model(jnp.ones((1, 8, 8, 1))).shape
        ('FactorizedConv', (1, 10))
    """
    model = nnx.clone(model)
    default = isinstance(where, str) and where == DEFAULT_WHERE
    skipped: list[ValueError] = []
    chosen = set(selected_paths(nnx.state(model, nnx.Param), where))
    kernels: dict[str, jax.Array] = {}
    specs: dict[str, ConvSpec] = {}
    layers: dict[tuple, Any] = {}
    for parts, module in nnx.iter_modules(model):
        kernel_path = _join(*parts, "kernel")
        if kernel_path not in chosen or not isinstance(module, (nnx.Linear, nnx.Conv)):
            continue
        if isinstance(module, nnx.Conv):
            try:
                specs[kernel_path] = _conv_spec(module, kernel_path)
            except UnsupportedLayerError as error:
                if default:  # the default selection leaves what the factors cannot run dense
                    skipped.append(error)
                    continue
                raise
        kernels[kernel_path] = module.kernel.get_value()
        layers[tuple(parts)] = module
    if not kernels and skipped:
        raise skipped[0]
    if not kernels:
        raise ValueError(
            f"where={where!r} selects no kernel of an nnx.Linear or nnx.Conv layer; selected: "
            f"{sorted(chosen)}"
        )
    factorized = decompose_tree(
        kernels, ranks, where=None, method=method, conv_specs=specs, tt_order=tt_order,
        n_iter_max=n_iter_max, seed=seed, svd=svd,
    )

    def replace(parts: tuple, node: Any) -> Any:
        module = layers.get(tuple(parts))
        if module is None:
            return node
        kernel = factorized[_join(*parts, "kernel")]
        if not is_compressed(kernel):
            return node
        bias = None if module.bias is None else module.bias.get_value()
        cls = FactorizedConv if isinstance(module, nnx.Conv) else FactorizedLinear
        return cls(kernel, bias, dtype=module.dtype, precision=module.precision)

    return nnx.recursive_map(replace, model)


def _interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    return _factorized_call(next_fun, args, kwargs, context, chain_later=True)


def _run_factorized_layer(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """A Linen method interceptor's body for one layer: its factorized kernel's factors (what
    `intercept_factorized` runs), for other interceptors such as `serve_linen`'s."""
    return _factorized_call(next_fun, args, kwargs, context, chain_later=False)


def _factorized_call(next_fun: Any, args: tuple, kwargs: dict, context: Any, *,
                     chain_later: bool) -> Any:
    module = context.module
    scope = module.scope
    if scope is None:
        return next_fun(*args, **kwargs)
    own = scope.variables().get("params", {})
    for name, value in (own.items() if hasattr(own, "items") else ()):
        if name != "kernel" and is_compressed(value):
            # Flax would reject its shape (in `setup`, for an Embed) with an error that names
            # neither jaxcomp nor a fix.
            fix = ("leave it out of decompose_tree(where=...) or run the tree with "
                   "jaxcomp.materialize" if isinstance(value, Factorized) else
                   "densify the other compressed leaves first with "
                   "jaxcomp.materialize(params, keep=Factorized)")
            raise ValueError(
                f"{_join(*scope.path, name)}: intercept_factorized runs factorized kernels of "
                f"nn.Dense and nn.Conv layers only; this {type(module).__name__} param is a "
                f"{value.kind}: {fix}")
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    kernel = scope.get_variable("params", "kernel")
    if not isinstance(kernel, Factorized):
        if is_compressed(kernel):
            raise ValueError(
                f"{_join(*scope.path, 'kernel')}: intercept_factorized runs factorized kernels; "
                f"this one is a {type(kernel).__name__}: densify the other compressed leaves "
                "first with jaxcomp.materialize(params, keep=Factorized)"
            )
        return next_fun(*args, **kwargs)
    path = _join(*scope.path, "kernel")
    if not isinstance(module, _RUNNABLE):
        raise ValueError(
            f"{path}: intercept_factorized runs factorized kernels of nn.Dense and nn.Conv layers "
            f"only, not of {type(module).__name__}; run this tree with jaxcomp.materialize"
        )
    if isinstance(module, nn.Conv):
        if not isinstance(kernel, _CONV_KERNELS):
            raise ValueError(f"{path}: a Conv layer holds a {kernel.kind} kernel")
        kernel = dataclasses.replace(kernel, spec=_conv_spec(module, path))
    elif not isinstance(kernel, _DENSE_KERNELS):
        raise ValueError(f"{path}: a Dense layer holds a {kernel.kind} kernel")
    bias = scope.get_variable("params", "bias") if module.use_bias else None

    def run(x):
        x, k, b = _cast(module.dtype, x, kernel, bias)
        return factorized_apply(x, k, b, precision=module.precision)

    # Interceptors entered after this one (inside its `with`, e.g. fake_quant_inputs) would
    # never run, since the factors replace the layer's own call: run them around the factors.
    later = _later_interceptors() if chain_later else []
    if not later:
        return run(args[0] if args else kwargs["inputs"])

    def chain(i, *a, **kw):
        if i == len(later):
            return run(a[0] if a else kw["inputs"])
        return later[i](functools.partial(chain, i + 1), a, kw, context)

    return chain(0, *args, **kwargs)


def _later_interceptors() -> list[Any]:
    """The Linen method interceptors entered after (inside) `intercept_factorized`'s."""
    from flax.linen import module as linen_module

    # The stack iterates from the last entered; in the order entered, the ones after ours run
    # after it, each wrapping the next.
    entered = list(reversed(list(getattr(linen_module, "_global_interceptor_stack", ()))))
    if _interceptor not in entered:
        return []
    return entered[entered.index(_interceptor) + 1:]


@contextlib.contextmanager
def intercept_factorized() -> Iterator[None]:
    """Within this context, Linen `nn.Dense`/`nn.Conv` layers with a factorized kernel run it.

    Layers whose `kernel` param is a `jaxcomp.decompose` leaf run its factor sequence (with the
    layer's own stride, padding, dilation, dtype and precision); every other call is untouched.
    Use it inside the function you `jax.jit` (it acts while tracing).

    Yields:
      None.

    Example:
        >>> model = nn.Dense(4)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> params = decompose_tree(variables["params"], 2)
        >>> with intercept_factorized():
        ...     model.apply({"params": params}, jnp.ones((3, 8))).shape
        (3, 4)
    """
    with nn.intercept_methods(_interceptor):
        yield


def _linen_kernels(model: nn.Module, variables: Any, args: tuple, kwargs: dict
                   ) -> tuple[dict[str, ConvSpec], set[str], dict[str, str], dict[str, ValueError]]:
    """Traces the model once: the nn.Conv specs, the kernel paths of the layers the interceptor
    runs, the module type of every other layer with a `kernel` param, by kernel path, and the
    convolutions the factors cannot run."""
    specs: dict[str, ConvSpec] = {}
    runnable: set[str] = set()
    others: dict[str, str] = {}
    unsupported: dict[str, ValueError] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module, scope = context.module, context.module.scope
        if context.method_name == "__call__" and scope is not None:
            path = _join(*scope.path, "kernel")
            kernel = scope.get_variable("params", "kernel")
            if isinstance(module, _RUNNABLE):
                if isinstance(module, nn.Conv) and getattr(kernel, "ndim", 0) == 4:
                    try:
                        specs[path] = _conv_spec(module, path)
                    except UnsupportedLayerError as error:  # raised if selected (see decompose_linen)
                        unsupported[path] = error
                        return next_fun(*call_args, **call_kwargs)
                runnable.add(path)
            elif kernel is not None:
                others[path] = type(module).__name__
        return next_fun(*call_args, **call_kwargs)

    def run(variables, *a):
        with nn.intercept_methods(record):
            return model.apply(variables, *a, **kwargs)

    jax.eval_shape(run, variables, *args)
    for path in unsupported:
        runnable.discard(path)
        specs.pop(path, None)
    return specs, runnable, others, unsupported


def conv_specs_linen(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> dict[str, ConvSpec]:
    """The `ConvSpec` of every `nn.Conv` of a Linen model, by kernel path (traced, nothing runs).

    Example:
        >>> from jaxcomp.testing.models import LeNet5
        >>> variables = LeNet5().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
        >>> conv_specs_linen(LeNet5(), variables, jnp.ones((1, 8, 8, 1)))["Conv_0/kernel"].padding
        'SAME'
    """
    specs, *_, unsupported = _linen_kernels(model, variables, args, kwargs)
    if unsupported:
        raise next(iter(unsupported.values()))
    return specs


def decompose_linen(
    model: nn.Module,
    variables: Any,
    *args: Any,
    ranks: RankRule,
    where: Where = DEFAULT_WHERE,
    method: str = "auto",
    tt_order: int = 3,
    n_iter_max: int | None = None,
    seed: int = 0,
    svd: str = "truncated",
    **kwargs: Any,
) -> dict[str, Any]:
    """Factorizes the selected kernels of a Linen model's params, with each Conv's own spec.

    Traces `model.apply(variables, *args, **kwargs)` once (abstractly) to read every `nn.Conv`'s
    stride, padding and dilation, then calls `decompose_tree` on `variables["params"]`. Run the
    result with `intercept_factorized()` (fast path) or `jaxcomp.materialize` (dense). Only the
    kernels of `nn.Dense` and `nn.Conv` layers, the ones the interceptor runs, are factorized;
    for other layers (`nn.ConvTranspose`, `nn.ConvLocal`, `nn.DenseGeneral`, custom modules)
    use `decompose_tree` and `jaxcomp.materialize`.

    Args:
      model: the Linen module.
      variables: its variables (`{"params": ..., ...}`).
      *args: example inputs (shapes are what matter).
      ranks: a rank rule or budget (see `decompose_tree`).
      where: selection over the params paths (default: the `kernel` of every `nn.Dense` and
        `nn.Conv` layer; kernels of other layers are left dense).
      method: `"auto"`, `"svd"`, `"tt"`, `"tucker2"` or `"cp"`.
      tt_order: number of TT cores.
      n_iter_max: HOOI/ALS iterations.
      seed: seed of the decompositions.
      svd: SVD algorithm (`"truncated"`, `"symeig"`, `"randomized"`; see `decompose_tree`).
      **kwargs: keyword arguments of `model.apply` (e.g. `train=False`).

    Returns:
      The variables with factorized kernels in `"params"` (other collections unchanged).

    Raises:
      ValueError: naming the layer, when `where` selects the 2-D or 4-D kernel of a layer other
        than `nn.Dense`/`nn.Conv`, for grouped, masked or input-dilated `nn.Conv` layers, and as
        `decompose_tree` does.

    Example:
        >>> from jaxcomp.testing.models import LeNet5
        >>> x = jnp.ones((1, 8, 8, 1))
        >>> variables = LeNet5().init(jax.random.key(0), x)
        >>> out = decompose_linen(LeNet5(), variables, x, ranks=2, where=r"Conv_1/kernel")
        >>> out["params"]["Conv_1"]["kernel"].kind
        'Tucker2'
    """
    specs, runnable, others, unsupported = _linen_kernels(model, variables, args, kwargs)
    if isinstance(ranks, FlopBudget):
        # The positions each convolution runs on, as count_flops records them on these inputs,
        # fix what its factors cost; positions the budget already has (from a FlopCount, or
        # given) take precedence, and sizes given by hand (input_hw) too.
        count = count_flops(lambda p, *a: model.apply({**variables, "params": p}, *a, **kwargs),
                            variables["params"], *args)
        traced = {p: n for p, n in count.conv_positions.items() if p not in ranks.input_hw}
        ranks = dataclasses.replace(ranks, dense_flops=dict(ranks.dense_flops),
                                    conv_positions={**traced, **ranks.conv_positions})
    if isinstance(where, str) and where == DEFAULT_WHERE:
        if not runnable and unsupported:
            raise next(iter(unsupported.values()))
        if not runnable:
            raise ValueError(
                "decompose_linen: the model has no nn.Dense or nn.Conv layer to factorize; "
                f"layers with a kernel: {others}"
            )
        where = lambda path, _: path in runnable  # noqa: E731
    else:
        chosen = set(selected_paths(variables["params"], where))
        for path, error in unsupported.items():
            if path in chosen:
                raise error
        for path, leaf in leaves_with_paths(variables["params"]):
            if path in others and path in chosen and getattr(leaf, "ndim", 0) in (2, 4):
                raise ValueError(
                    f"{path}: decompose_linen factorizes the kernels of nn.Dense and nn.Conv "
                    f"layers only (what intercept_factorized runs), not of {others[path]}; use "
                    "decompose_tree and jaxcomp.materialize for it, or leave it out of where"
                )
    params = decompose_tree(
        variables["params"], ranks, where=where, method=method, conv_specs=specs,
        tt_order=tt_order, n_iter_max=n_iter_max, seed=seed, svd=svd,
    )
    return {**variables, "params": params}
