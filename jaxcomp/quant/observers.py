"""Observers: static quantization ranges from data, kept as array state, and `calibrate`.

An observer turns batches of a tensor into a range `(lo, hi)` per scale of a spec. Its state is
a `RangeState` NamedTuple of arrays, so `update` runs inside `jax.jit`, shards like its tensor's
scales and checkpoints with orbax:

* `AbsMaxObserver`, `MinMaxObserver`: the running extremes over every batch;
* `PercentileObserver`: the mean over batches of a percentile of each batch (clips outliers);
* `MSEObserver`: the mean over batches of the clipping range, among `num_candidates` fractions
  of the batch's range, with the smallest quantization mean squared error;
* `EMAObserver`: an exponential moving average of another observer's batch ranges.

`calibrate(collect, batches, spec)` runs a function that returns named activations over a few
batches and returns each name's `QuantParams`; the Flax helpers in `jaxcomp.nn.quant` build on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_int, as_real
from jaxcomp.quant.numerics import (
    Layout,
    QuantParams,
    check_finite,
    check_float,
    codes_from_grouped,
    layout,
    params_from_range,
    quant_range,
    to_grouped,
    values_from_codes,
)
from jaxcomp.quant.spec import QuantSpec

__all__ = [
    "AbsMaxObserver",
    "EMAObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "RangeState",
    "calibrate",
]


class RangeState(NamedTuple):
    """Array state of an observer.

    Attributes:
      lo: lower ends of the ranges, in the grouped keepdims shape of the spec.
      hi: upper ends, same shape.
      count: int32 scalar, the number of batches observed.
      finite: bool scalar, False once a batch held NaN or Inf.
    """

    lo: jax.Array
    hi: jax.Array
    count: jax.Array
    finite: jax.Array


@dataclasses.dataclass(frozen=True)
class Observer:
    """Base class: subclasses define `batch_range` and, if not running extremes, `combine`."""

    def init(self, shape: tuple[int, ...], spec: QuantSpec, path: str = "x") -> RangeState:
        """Empty state for a tensor of `shape` under `spec`.

        Raises:
          ValueError: naming `path` when the spec's axes or groups do not fit `shape`.
        """
        try:
            shape = tuple(shape)
        except TypeError:
            raise ValueError(f"{path}: an observer needs the tensor's shape (a tuple of ints), got "
                             f"{shape!r}") from None
        lay = layout(shape, spec, path)
        zeros = jnp.zeros(lay.params_shape, jnp.float32)
        return RangeState(zeros, zeros, jnp.zeros((), jnp.int32), jnp.ones((), bool))

    def batch_range(self, x: jax.Array, spec: QuantSpec, lay: Layout) -> tuple[jax.Array, jax.Array]:
        """The range of one batch; `(lo, hi)` of shape `lay.params_shape`."""
        raise NotImplementedError

    def combine(self, state: RangeState, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Merges a batch range into the state's range (running extremes by default)."""
        first = state.count == 0
        return (jnp.where(first, lo, jnp.minimum(state.lo, lo)),
                jnp.where(first, hi, jnp.maximum(state.hi, hi)))

    def update(self, state: RangeState, x: jax.Array, spec: QuantSpec, path: str = "x") -> RangeState:
        """Observes one batch `x`; jittable. Non-finite values are ignored for the range and
        recorded in `state.finite` (`params` then raises).

        Raises:
          ValueError: naming `path` for a non-float `x` or a shape the spec does not fit.
        """
        if x is None or isinstance(x, (str, bytes)):
            raise ValueError(f"{path}: an observer needs a float array, got {x!r}")
        check_float(x, path)
        x = jnp.asarray(x)
        if x.size == 0:
            raise ValueError(f"{path}: an empty batch (shape {x.shape}) has no range to observe")
        lay = layout(x.shape, spec, path)
        finite = jnp.all(jnp.isfinite(x))
        clean = jnp.where(jnp.isfinite(x), x, 0).astype(jnp.promote_types(x.dtype, jnp.float32))
        lo, hi = self.batch_range(clean, spec, lay)
        lo, hi = self.combine(state, lo.astype(jnp.float32), hi.astype(jnp.float32))
        return RangeState(lo, hi, state.count + 1, state.finite & finite)

    def params(self, state: RangeState, spec: QuantSpec, path: str = "x") -> QuantParams:
        """Scale and zero point from the observed range.

        Raises:
          ValueError: naming `path` when a concrete state saw NaN/Inf or no batch at all.
        """
        if not isinstance(state.count, jax.core.Tracer):
            if int(state.count) == 0:
                raise ValueError(f"{path}: the observer has seen no batch; call update first")
            if not bool(state.finite):
                raise ValueError(f"{path}: a calibration batch held NaN/Inf values")
        return params_from_range(state.lo, state.hi, spec)


@dataclasses.dataclass(frozen=True)
class AbsMaxObserver(Observer):
    """Running `max(|x|)` per scale: the symmetric range `(-absmax, absmax)`.

    Example:
        >>> obs, spec = AbsMaxObserver(), QuantSpec()
        >>> state = obs.update(obs.init((2,), spec), jnp.array([0.5, -2.0]), spec)
        >>> obs.params(state, spec).scale * 127
        Array([2.], dtype=float32)
    """

    def batch_range(self, x, spec, lay):
        hi = jnp.max(jnp.abs(to_grouped(x, lay)), axis=lay.reduce_axes, keepdims=True)
        return -hi, hi


@dataclasses.dataclass(frozen=True)
class MinMaxObserver(Observer):
    """Running minimum and maximum per scale (with zero always inside).

    Example:
        >>> obs, spec = MinMaxObserver(), QuantSpec(symmetric=False)
        >>> state = obs.update(obs.init((2,), spec), jnp.array([0.5, -2.0]), spec)
        >>> float(state.lo.squeeze()), float(state.hi.squeeze())
        (-2.0, 0.5)
    """

    def batch_range(self, x, spec, lay):
        xg = to_grouped(x, lay)
        return (jnp.min(xg, axis=lay.reduce_axes, keepdims=True, initial=0.0),
                jnp.max(xg, axis=lay.reduce_axes, keepdims=True, initial=0.0))


def _running_mean(state: RangeState, lo: jax.Array, hi: jax.Array):
    n = state.count.astype(jnp.float32)
    return (state.lo * n + lo) / (n + 1), (state.hi * n + hi) / (n + 1)


@dataclasses.dataclass(frozen=True)
class PercentileObserver(Observer):
    """Per batch, the `percentile` of `|x|` (symmetric specs) or the `100 - percentile` and
    `percentile` points of `x` (asymmetric); averaged over batches.

    Attributes:
      percentile: in (50, 100].

    Example:
        >>> obs, spec = PercentileObserver(percentile=75.0), QuantSpec()
        >>> state = obs.update(obs.init((5,), spec), jnp.array([1.0, 2.0, 3.0, 4.0, 100.0]), spec)
        >>> state.hi
        Array([4.], dtype=float32)
    """

    percentile: float = 99.99

    def __post_init__(self):
        if not 50.0 < (as_real(self.percentile) or 0.0) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        object.__setattr__(self, "percentile", as_real(self.percentile))

    def batch_range(self, x, spec, lay):
        xg, axes = to_grouped(x, lay), lay.reduce_axes
        if spec.symmetric:
            hi = jnp.percentile(jnp.abs(xg), self.percentile, axis=axes, keepdims=True)
            return -hi, hi
        lo = jnp.percentile(xg, 100.0 - self.percentile, axis=axes, keepdims=True)
        hi = jnp.percentile(xg, self.percentile, axis=axes, keepdims=True)
        return jnp.minimum(lo, 0), jnp.maximum(hi, 0)

    def combine(self, state, lo, hi):
        return _running_mean(state, lo, hi)


@dataclasses.dataclass(frozen=True)
class MSEObserver(Observer):
    """Per batch, the clipping range `ratio * (lo, hi)` with the least quantization MSE, among
    `num_candidates` ratios evenly spaced in `[min_ratio, 1]`; averaged over batches.

    Attributes:
      num_candidates: ratios tried (each costs one pass over the batch).
      min_ratio: the smallest fraction of the full range tried, in (0, 1].

    Example:
        >>> obs, spec = MSEObserver(), QuantSpec(bits=4)
        >>> x = jnp.concatenate([jnp.linspace(-1, 1, 999), jnp.array([10.0])])
        >>> state = obs.update(obs.init(x.shape, spec), x, spec)
        >>> bool(state.hi.squeeze() < 10.0)
        True
    """

    num_candidates: int = 32
    min_ratio: float = 0.05

    def __post_init__(self):
        if (as_int(self.num_candidates) or 0) < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {self.num_candidates!r}")
        if not 0.0 < (as_real(self.min_ratio) or 0.0) <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio!r}")
        object.__setattr__(self, "num_candidates", as_int(self.num_candidates))
        object.__setattr__(self, "min_ratio", as_real(self.min_ratio))

    def batch_range(self, x, spec, lay):
        lo, hi = quant_range(x, spec, lay)
        xg = to_grouped(x, lay)
        ratios = jnp.linspace(self.min_ratio, 1.0, self.num_candidates)

        def error(ratio):
            params = params_from_range(lo * ratio, hi * ratio, spec)
            x_hat = values_from_codes(codes_from_grouped(xg, params, spec), params)
            return jnp.sum(jnp.square(x_hat - xg), axis=lay.reduce_axes, keepdims=True)

        errors = jax.lax.map(error, ratios)
        best = ratios[jnp.argmin(errors, axis=0)]
        return lo * best, hi * best

    def combine(self, state, lo, hi):
        return _running_mean(state, lo, hi)


@dataclasses.dataclass(frozen=True)
class EMAObserver(Observer):
    """An exponential moving average of `base`'s batch ranges: `r <- decay * r + (1 - decay) *
    r_batch` (the first batch sets `r`). The usual observer for activation ranges during QAT.

    Attributes:
      base: the observer whose `batch_range` is averaged.
      decay: in [0, 1).

    Example:
        >>> obs, spec = EMAObserver(decay=0.5), QuantSpec()
        >>> state = obs.init((1,), spec)
        >>> for v in (1.0, 3.0):
        ...     state = obs.update(state, jnp.array([v]), spec)
        >>> float(state.hi.squeeze())
        2.0
    """

    base: Observer = dataclasses.field(default_factory=MinMaxObserver)
    decay: float = 0.99

    def __post_init__(self):
        decay = as_real(self.decay)
        if decay is None or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        if not isinstance(self.base, Observer):
            raise ValueError(f"base must be an Observer instance, got {self.base!r}")
        object.__setattr__(self, "decay", decay)

    def batch_range(self, x, spec, lay):
        return self.base.batch_range(x, spec, lay)

    def combine(self, state, lo, hi):
        first = state.count == 0
        d = self.decay
        return (jnp.where(first, lo, d * state.lo + (1 - d) * lo),
                jnp.where(first, hi, d * state.hi + (1 - d) * hi))


def _label(name: str) -> str:
    """A tensor's name in error messages: a layer's path, or "<root module>" for the root (path "")."""
    return name or "<root module>"


def calibrate(
    collect: Callable[[Any], Mapping[str, jax.Array]],
    batches: Iterable[Any],
    spec: QuantSpec,
    *,
    observer: Observer | None = None,
) -> dict[str, QuantParams]:
    """Static quantization parameters of named tensors, observed over a few batches.

    `collect(batch)` returns `{name: tensor}` (for instance the inputs of each layer); it is
    jitted together with the observer updates, once per batch shape.

    Args:
      collect: a jittable function of one batch returning a flat dict of float arrays.
      batches: an iterable of batches (anything `collect` accepts).
      spec: the spec the tensors will be quantized with (sets the scale granularity).
      observer: how ranges are observed; `MinMaxObserver()` by default.

    Returns:
      ``{name: QuantParams}``.

    Raises:
      ValueError: if `batches` is empty, or naming the tensor and batch index when a batch held
        NaN/Inf.

    Example:
        >>> batches = [jnp.array([1.0, -2.0]), jnp.array([0.5, 4.0])]
        >>> params = calibrate(lambda b: {"x": b}, batches, QuantSpec())
        >>> params["x"].scale * 127
        Array([4.], dtype=float32)
    """
    observer = observer or MinMaxObserver()
    if not isinstance(observer, Observer):
        raise ValueError(f"calibrate: observer must be an Observer instance (e.g. MinMaxObserver()), "
                         f"got {observer!r}")
    if not callable(collect):
        raise ValueError(f"calibrate: collect must be a function batch -> {{name: tensor}}, got "
                         f"{collect!r}")
    if batches is None:
        raise ValueError("calibrate: batches is None; pass an iterable of batches")
    states: dict[str, RangeState] | None = None

    @jax.jit
    def step(states, batch):
        tensors = collect(batch)
        return {name: observer.update(states[name], x, spec, _label(name)) for name, x in tensors.items()}

    kept: dict[str, tuple[int, ...]] = {}
    for index, batch in enumerate(batches):
        shapes = jax.eval_shape(collect, batch)
        if not isinstance(shapes, Mapping) or not all(
                isinstance(s, jax.ShapeDtypeStruct) for s in shapes.values()):
            raise ValueError(f"calibrate: collect must return a flat {{name: tensor}} dict, got "
                             f"{jax.tree.map(lambda s: s.shape, shapes)!r} for batch {index}")
        if states is None:
            states = {name: observer.init(s.shape, spec, _label(name)) for name, s in shapes.items()}
            kept = {name: layout(s.shape, spec, _label(name)).params_shape for name, s in shapes.items()}
        for name, s in shapes.items():
            now = layout(s.shape, spec, _label(name)).params_shape if name in kept else None
            if now != kept.get(name):
                raise ValueError(
                    f"{_label(name)}: calibration batch {index} gives quantization parameters of shape "
                    f"{now}, the first batch {kept.get(name)}: {spec.describe()} keeps an axis "
                    "whose size changes between batches (a per-row spec has no static range); "
                    "calibrate per tensor or per channel on a feature axis")
        states = step(states, batch)
        finite = jax.device_get({name: s.finite for name, s in states.items()})
        bad = [name for name, ok in finite.items() if not np.all(ok)]
        if bad:
            # Eagerly, so the tensors come in the order `collect` produced them (for layer
            # inputs, execution order): the first one named is where the NaN/Inf came in.
            tensors = collect(batch)
            for name in (name for name in tensors if name in bad):
                check_finite(tensors[name], f"{_label(name)} (calibration batch {index})")
            raise ValueError(f"calibration batch {index}: NaN/Inf in {[_label(n) for n in bad]}")
    if states is None:
        raise ValueError("calibrate got no batches")
    return {name: observer.params(state, spec, _label(name)) for name, state in states.items()}
