"""Dynamic sparse training: SET and RigL change which weights are active at constant sparsity.

Every `update_every` steps until `end_step`, each pruned leaf drops the fraction f_t of its
active weights with the smallest magnitude and grows as many inactive ones: at random (SET,
Mocanu et al. 2018) or those with the largest gradient magnitude (RigL, Evci et al. 2020).
f_t = f_0 / 2 * (1 + cos(pi * t / end_step)). Grown weights start at zero, their optimizer
moments are reset, and the number of active weights stays constant. The initial topology comes
from the pruner's own score and schedule (RigL uses a random one: `score=Random()` with a
constant schedule).

Use it through `Pruner(dynamic=RigL(...))`; `drop_and_grow` is the step itself.

Example:
    >>> rigl = RigL(update_every=100, end_step=1000, drop_fraction=0.3)
    >>> round(float(rigl.fraction(0)), 3), round(float(rigl.fraction(500)), 3)
    (0.3, 0.15)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_int, as_real
from jaxcomp.sparsity._select import lowest_k

__all__ = ["RigL", "SET", "drop_and_grow"]


def _positive_int(value: object) -> bool:
    return 1 <= (as_int(value) or 0) < 2**31


def _check(name: str, update_every: int, end_step: int, drop_fraction: float) -> None:
    if not _positive_int(update_every):
        raise ValueError(f"{name}: update_every must be a positive int, got {update_every!r}")
    if not _positive_int(end_step):
        raise ValueError(f"{name}: end_step must be a positive int below 2**31, got {end_step!r}")
    if not 0.0 < (as_real(drop_fraction) or 0.0) < 1.0:
        raise ValueError(f"{name}: drop_fraction must be in (0, 1), got {drop_fraction!r}")


@dataclasses.dataclass(frozen=True)
class _DropAndGrow:
    update_every: int = 100
    end_step: int = 10_000
    drop_fraction: float = 0.3

    grow_by_gradient = False

    def __post_init__(self):
        _check(type(self).__name__, self.update_every, self.end_step, self.drop_fraction)
        object.__setattr__(self, "update_every", int(self.update_every))
        object.__setattr__(self, "end_step", int(self.end_step))
        object.__setattr__(self, "drop_fraction", as_real(self.drop_fraction))

    def fraction(self, step: jax.typing.ArrayLike) -> jax.Array:
        """Cosine-decayed drop fraction at `step`."""
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / self.end_step, 1.0)
        return 0.5 * self.drop_fraction * (1.0 + jnp.cos(math.pi * progress))

    def is_update_step(self, step: jax.Array) -> jax.Array:
        """True on the steps that change the topology (never step 0, never from `end_step`)."""
        return (step > 0) & (step < self.end_step) & (step % self.update_every == 0)


@dataclasses.dataclass(frozen=True)
class SET(_DropAndGrow):
    """Sparse Evolutionary Training: drop the smallest weights, grow random ones.

    Attributes:
      update_every: steps between topology updates.
      end_step: no updates from this step on; the cosine decay of the fraction ends here.
      drop_fraction: f_0, the fraction of active weights dropped at step 0 of the decay.

    Example:
        >>> SET(update_every=10, end_step=100).is_update_step(jnp.int32(20))
        Array(True, dtype=bool)
    """


@dataclasses.dataclass(frozen=True)
class RigL(_DropAndGrow):
    """Rigged Lottery: drop the smallest weights, grow those with the largest `|gradient|`.

    Attributes:
      update_every: steps between topology updates.
      end_step: no updates from this step on; the cosine decay of the fraction ends here.
      drop_fraction: f_0, the fraction of active weights dropped at step 0 of the decay.

    Example:
        >>> RigL(end_step=100).grow_by_gradient
        True
    """

    grow_by_gradient = True


def drop_and_grow(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    masks: Sequence[jax.Array],
    fraction: jax.typing.ArrayLike,
    *,
    key: jax.Array | None = None,
) -> list[jax.Array]:
    """One SET/RigL topology update of each leaf: same number of active weights, new positions.

    Args:
      params: the weights of the pruned leaves.
      grads: their dense gradients (used to grow when `key` is None: RigL).
      masks: their current bool keep-masks.
      fraction: fraction of each leaf's active weights to drop (and grow back elsewhere), in
        [0, 1]; checked when concrete.
      key: grow at random from this key (SET) instead of by gradient magnitude; NaN gradients
        grow last.

    Returns:
      The new masks. A weight dropped at this step is not regrown at the same step.

    Raises:
      ValueError: for a concrete fraction outside [0, 1].

    Example:
        >>> new = drop_and_grow([jnp.array([3., 0., 1., 0.])], [jnp.array([0., 5., 0., 1.])],
        ...                     [jnp.array([True, False, True, False])], 0.5)
        >>> new[0]
        Array([ True,  True, False, False], dtype=bool)
    """
    if not isinstance(fraction, jax.core.Tracer):
        value = np.asarray(fraction)
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.number) or not 0 <= value <= 1:
            raise ValueError(f"drop_and_grow: fraction must be a number in [0, 1], got {fraction!r}")
    for name, seq in (("params", params), ("grads", grads), ("masks", masks)):
        if not isinstance(seq, (list, tuple)) and not (name == "grads" and seq is None):
            raise ValueError(f"drop_and_grow: {name} must be a list of arrays (one per leaf), got "
                             f"{type(seq).__name__}")
    if not len(params) == len(masks) == (len(grads) if grads is not None else len(params)):
        raise ValueError(f"drop_and_grow: params, grads and masks must have one entry per leaf, "
                         f"got {len(params)}, {None if grads is None else len(grads)}, {len(masks)}")
    for i, (p, g, m) in enumerate(zip(params, grads if grads is not None else [None] * len(params),
                                      masks)):
        if jnp.shape(p) != jnp.shape(m):
            raise ValueError(f"drop_and_grow: leaf {i}: mask of shape {jnp.shape(m)} does not match "
                             f"its weights of shape {jnp.shape(p)}")
        if g is not None and jnp.shape(g) != jnp.shape(p):
            # A broadcast gradient would decide which weights grow.
            raise ValueError(f"drop_and_grow: leaf {i}: gradient of shape {jnp.shape(g)} does not "
                             f"match its weights of shape {jnp.shape(p)}")
    masks = [m.astype(bool) for m in masks]
    fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
    active = [jnp.sum(m.astype(jnp.int32)) for m in masks]
    inactive = [m.size - a for m, a in zip(masks, active)]
    count = jnp.stack([
        jnp.minimum(jnp.minimum(jnp.round(fraction * a.astype(jnp.float32)).astype(jnp.int32),
                                i), a)
        for a, i in zip(active, inactive)
    ])
    # Drop: the lowest magnitudes among active weights (inactive ones are never chosen).
    drop_scores = [jnp.where(m, jnp.abs(p).astype(jnp.float32), jnp.inf)
                   for p, m in zip(params, masks)]
    dropped = lowest_k(drop_scores, count)
    if key is None:
        # NaN gradients grow last (|g| >= 0 elsewhere), not first as the lowest -|g| would.
        growth = [jnp.nan_to_num(jnp.abs(g).astype(jnp.float32), nan=-1.0) for g in grads]
    else:
        keys = jax.random.split(key, len(masks))
        growth = [jax.random.uniform(k, m.shape) for k, m in zip(keys, masks)]
    # Grow: the highest growth scores among weights inactive before this step.
    grow_scores = [jnp.where(m, jnp.inf, -s) for s, m in zip(growth, masks)]
    grown = lowest_k(grow_scores, count)
    return [(m & ~d) | g for m, d, g in zip(masks, dropped, grown)]
