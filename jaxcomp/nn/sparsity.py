"""Activation sparsity for Flax models: keep the top-k (or thresholded) outputs of chosen layers.

The forward pass keeps, along `axis`, the k largest activations (by magnitude or value) or those
above a threshold, and zeroes the rest; the backward pass is straight-through (every activation
gets its gradient), so the model trains with sparse activations. The measured sparsity (fraction
of exact zeros in each chosen layer's output) is returned alongside.

* Linen: `with sparse_activations(config) as stats: y = model.apply(variables, x)` intercepts
  the `__call__` of the modules whose path matches (`nn.intercept_methods`, no change to the
  model); `stats` maps each module path to its measured sparsity (arrays, usable under `jit`).
* NNX: `sparsify_nnx(model, config)` wraps the matching submodules in place in
  `SparseActivation` modules; `activation_sparsity_nnx(model)` reads what they measured.

Example:
    >>> import flax.linen as nn
    >>> model = nn.Dense(8)
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> with sparse_activations(ActivationSparsity(where=".*", top_k=2)) as stats:
    ...     y = model.apply(variables, jnp.ones((2, 4)))
    >>> int((y != 0).sum(axis=-1).max()), float(stats[""])
    (2, 0.75)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxcomp._checks import as_int, as_real
from jaxcomp.sparsity.ste import straight_through_mask

__all__ = [
    "ActivationSparsity",
    "ActivationSparsityStat",
    "SparseActivation",
    "activation_sparsity_nnx",
    "sparse_activations",
    "sparsify_activation",
    "sparsify_nnx",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationSparsity:
    """Which layers' outputs to sparsify, and how. Give exactly one of `top_k`,
    `keep_fraction` or `threshold`.

    Attributes:
      where: regex (full match) on the module path ("Dense_0", "block/mlp_in", "layers/0"; the
        root module's path is ""), or a predicate `(path, module) -> bool`.
      top_k: keep the k largest activations along `axis` (per row).
      keep_fraction: keep ceil(keep_fraction * n) along `axis`, for n the axis length.
      threshold: keep activations whose score exceeds it.
      by: "magnitude" scores `|a|`; "value" scores `a` (keeps the largest positive values, what a
        ReLU after the layer would pass).
      axis: the axis along which top-k is taken.

    Example:
        >>> ActivationSparsity(where="Dense_0", keep_fraction=0.25).keep(40)
        10
    """

    where: str | Callable[[str, Any], bool]
    top_k: int | None = None
    keep_fraction: float | None = None
    threshold: float | None = None
    by: Literal["magnitude", "value"] = "magnitude"
    axis: int = -1

    def __post_init__(self):
        given = [n for n in ("top_k", "keep_fraction", "threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"ActivationSparsity needs exactly one of top_k, keep_fraction, threshold; got "
                f"{given or 'none'}")
        if self.top_k is not None:
            if (as_int(self.top_k) or 0) < 1:
                raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
            object.__setattr__(self, "top_k", as_int(self.top_k))
        if self.keep_fraction is not None:
            if not 0.0 < (as_real(self.keep_fraction) or 0.0) <= 1.0:
                raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
            object.__setattr__(self, "keep_fraction", as_real(self.keep_fraction))
        if self.threshold is not None:
            threshold = as_real(self.threshold)
            if threshold is None or not math.isfinite(threshold):
                raise ValueError(f"threshold must be finite, got {self.threshold!r}")
            object.__setattr__(self, "threshold", threshold)
        if self.by not in ("magnitude", "value"):
            raise ValueError(f"by must be 'magnitude' or 'value', got {self.by!r}")
        if isinstance(self.where, str):
            try:
                re.compile(self.where)
            except re.error as e:
                raise ValueError(f"where={self.where!r} is not a valid regex: {e}") from e
        elif not callable(self.where):
            raise ValueError(f"where must be a regex or a predicate, got {self.where!r}")

    def matches(self, path: str, module: Any) -> bool:
        """True when the module at `path` is chosen."""
        if isinstance(self.where, str):
            return re.fullmatch(self.where, path) is not None
        return bool(self.where(path, module))

    def keep(self, n: int) -> int:
        """How many activations of an axis of length `n` top-k keeps."""
        if self.top_k is not None:
            return min(self.top_k, n)
        # In decimal, as written: in binary 0.07 * 100 is 7.000000000000001, whose ceil is 8.
        fraction = fractions.Fraction(repr(float(self.keep_fraction)))
        return min(n, max(1, math.ceil(fraction * n)))


def sparsify_activation(x: jax.Array, config: ActivationSparsity,
                        path: str = "") -> tuple[jax.Array, jax.Array]:
    """Sparsified `x` (straight-through gradient) and its measured sparsity.

    Args:
      x: an activation array.
      config: how to sparsify.
      path: the layer's path, for error messages.

    Returns:
      `(y, sparsity)`: y has the kept activations and zeros elsewhere; sparsity is the fraction
      of exact zeros in y.

    Raises:
      ValueError: naming `path`, if `axis` is out of range for `x`, `x` is empty or not a float
        array, or `config` is not an `ActivationSparsity`.

    Example:
        >>> y, s = sparsify_activation(jnp.array([[1., -3., 2., 0.5]]),
        ...                            ActivationSparsity(where="", top_k=2))
        >>> y, float(s)
        (Array([[ 0., -3.,  2.,  0.]], dtype=float32), 0.5)
    """
    if not isinstance(config, ActivationSparsity):
        raise ValueError(f"{path or 'output'}: config must be an ActivationSparsity, got "
                         f"{type(config).__name__}")
    x = jnp.asarray(x) if isinstance(x, (list, tuple)) else x
    if not hasattr(x, "ndim") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{path or 'output'}: expected a float activation array, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if not -x.ndim <= config.axis < x.ndim:
        raise ValueError(f"{path or 'output'}: axis={config.axis} is out of range for an "
                         f"activation of shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{path or 'output'}: an empty activation (shape {x.shape}) has no "
                         "sparsity to measure")
    score = jnp.abs(x) if config.by == "magnitude" else x
    if config.threshold is not None:
        keep = score > config.threshold
    else:
        axis = config.axis % x.ndim
        moved = jnp.moveaxis(score, axis, -1)
        _, index = jax.lax.top_k(moved, config.keep(moved.shape[-1]))
        keep = jnp.zeros(moved.shape, bool)
        keep = jnp.put_along_axis(keep, index, True, axis=-1, inplace=False)
        keep = jnp.moveaxis(keep, -1, axis)
    y = straight_through_mask(x, keep)
    return y, jnp.mean((y == 0).astype(jnp.float32))


@contextlib.contextmanager
def sparse_activations(config: ActivationSparsity) -> Iterator[dict[str, jax.Array]]:
    """Linen: sparsify the outputs of the matching modules' `__call__` inside this block.

    Yields:
      A dict filled during the block: module path -> measured sparsity of its output (the mean
      over calls when a module runs more than once). Values are arrays, so the block can sit
      inside a jitted loss and the dict be returned as an auxiliary output. Modules inside a
      lifted transform (`nn.scan`, `nn.remat`, `nn.vmap`) are sparsified too, but their
      sparsity is traced inside that transform and cannot be reported: they have no entry.

    Raises:
      ValueError: (when the model runs) if a matching module's output is not an array; at the
        end of the block, if modules ran but `where` matched none of them (the message lists
        their paths).

    Example:
        >>> import flax.linen as nn
        >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> config = ActivationSparsity(where="layers_0", keep_fraction=0.25)
        >>> with sparse_activations(config) as stats:
        ...     _ = model.apply(variables, jnp.ones((3, 8)))
        >>> sorted(stats), float(stats["layers_0"])
        (['layers_0'], 0.75)
    """
    sums: dict[str, list[Any]] = {}
    stats: dict[str, jax.Array] = {}
    seen: list[str] = []
    lifted: list[str] = []

    # Root scopes of the modules being called, outermost first. A lifted transform (nn.scan,
    # nn.remat, nn.vmap) runs its body on a fresh root scope, traced on its own: a module whose
    # root differs from the outermost caller's runs inside one.
    active: list[Any] = []

    def interceptor(next_fun, args, kwargs, context):
        root = _root_scope(context.module.scope)
        inside_lifted = bool(active) and root is not active[0]
        active.append(root)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            active.pop()
        if context.method_name != "__call__":
            return out
        module = context.module
        path = "/".join(str(p) for p in module.path) if module.scope is not None else ""
        if path not in seen:
            seen.append(path)
        if not config.matches(path, module):
            return out
        if not isinstance(out, jax.Array):
            raise ValueError(f"{path}: activation sparsity needs an array output, got "
                             f"{type(out).__name__}")
        y, measured = sparsify_activation(out, config, path)
        if inside_lifted:
            # nn.scan / nn.remat trace their body separately: the value cannot leave it.
            lifted.append(path)
            return y
        total, calls = sums.get(path, (0.0, 0))
        sums[path] = [total + measured, calls + 1]
        stats[path] = sums[path][0] / sums[path][1]
        return y

    with nn.intercept_methods(interceptor):
        yield stats
    # A block that ran no module (a cached jit call) cannot tell a typo from a no-op.
    if seen and not stats and not lifted:
        raise ValueError(f"ActivationSparsity where={config.where!r} matches no module that ran; "
                         f"paths: {seen[:40]}")


def _root_scope(scope: Any) -> Any:
    while getattr(scope, "parent", None) is not None:
        scope = scope.parent
    return scope


class ActivationSparsityStat(nnx.Variable):
    """An NNX variable holding a layer's measured activation sparsity (not a parameter).

    Example:
        >>> float(ActivationSparsityStat(jnp.float32(0.5)).get_value())
        0.5
    """


class SparseActivation(nnx.Module):
    """NNX: wraps a module; its output is sparsified as `config` says and the sparsity stored.

    Example:
        >>> layer = SparseActivation(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
        ...                          ActivationSparsity(where="", top_k=2))
        >>> layer(jnp.ones((1, 4))).shape, float(layer.measured.get_value())
        ((1, 8), 0.75)
    """

    def __init__(self, inner: nnx.Module, config: ActivationSparsity, path: str = ""):
        self.inner = inner
        self.config = config
        self.path = path
        self.measured = ActivationSparsityStat(jnp.zeros((), jnp.float32))

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if not isinstance(out, jax.Array):
            raise ValueError(f"{self.path}: activation sparsity needs an array output, got "
                             f"{type(out).__name__}")
        y, measured = sparsify_activation(out, self.config, self.path)
        self.measured.set_value(measured)
        return y


def _set_child(parent: Any, key: Any, child: Any) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def sparsify_nnx(model: nnx.Module, config: ActivationSparsity) -> nnx.Module:
    """NNX: wraps every submodule whose path matches in a `SparseActivation`, in place.

    Args:
      model: an NNX module (its submodules are replaced; the root cannot be).
      config: which layers and how.

    Returns:
      `model`, for chaining.

    Raises:
      ValueError: if no submodule matches (the message lists the paths).

    Example:
        >>> from jaxcomp.testing.nnx_models import MLP
        >>> model = sparsify_nnx(MLP(input_shape=(8, 8, 1), features=(16,), rngs=nnx.Rngs(0)),
        ...                      ActivationSparsity(where="layers/0", top_k=4))
        >>> _ = model(jnp.ones((2, 8, 8, 1)))
        >>> float(activation_sparsity_nnx(model)["layers/0"])
        0.75
    """
    found = []
    paths = []
    modules = list(nnx.iter_modules(model))
    # Modules already wrapped (and what they hold) are not wrapped again.
    wrapped = [tuple(parts) for parts, module in modules if isinstance(module, SparseActivation)]
    for path_parts, module in modules:
        if not path_parts or isinstance(module, SparseActivation):
            continue
        path = "/".join(str(p) for p in path_parts)
        paths.append(path)
        if any(tuple(path_parts[:len(w)]) == w for w in wrapped):
            continue
        if config.matches(path, module):
            found.append((path_parts, path, module))
    if not found:
        raise ValueError(f"ActivationSparsity where={config.where!r} matches no submodule; "
                         f"paths: {paths[:40]}")
    for path_parts, path, module in found:
        parent = model
        for part in path_parts[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        _set_child(parent, path_parts[-1], SparseActivation(module, config, path))
    return model


def activation_sparsity_nnx(model: nnx.Module) -> dict[str, jax.Array]:
    """NNX: the measured sparsity of every `SparseActivation` in `model`, by wrapped path.

    Example:
        >>> activation_sparsity_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        {}
    """
    return {
        module.path: module.measured.get_value()
        for _, module in nnx.iter_modules(model)
        if isinstance(module, SparseActivation)
    }
