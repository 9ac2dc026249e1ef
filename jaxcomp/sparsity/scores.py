"""Scores: how important each weight is. Higher scores are kept, lower ones pruned.

A score is an object with `__call__(params, grads, state, key) -> scores`, plus `init` and
`accumulate` for scores that gather statistics over steps (movement, Taylor). `params` and
`grads` hold the leaves being pruned and `None` elsewhere; the returned tree has the same
structure. `jaxcomp.sparsity.prune` calls `accumulate` on every step and the score itself only on
the steps that recompute masks.

* `Magnitude`: `|w|` (L1 magnitude pruning).
* `Random`: uniform noise from an explicit key.
* `Saliency`: `|w * g|`; used once at initialisation it is SNIP (Lee et al. 2019).
* `Movement`: the sum over steps of -w * g (Sanh et al. 2020): weights moving away from zero
  score high.
* `Taylor`: first-order Taylor importance (w * g)^2, averaged over steps by an exponential moving
  average (Molchanov et al. 2019); the score is its square root, which ranks the same.
* `ScoreFn`: your own `fn(params, grads, state) -> scores`, with optional `init`/`accumulate`.

Example:
    >>> params = {"w": jnp.array([0.5, -2.0, 1.0])}
    >>> Magnitude()(params, None, (), None)
    {'w': Array([0.5, 2. , 1. ], dtype=float32)}
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp._checks import as_real, check_key
from jaxcomp.tree import assert_same_structure, key_path_str

__all__ = [
    "Magnitude",
    "Movement",
    "Random",
    "Saliency",
    "Score",
    "ScoreFn",
    "Taylor",
    "as_score",
    "magnitude_scores",
    "random_scores",
    "saliency_scores",
]


def _need_grads(name: str, grads: Any, params: Any = None) -> None:
    if grads is None:
        raise ValueError(f"{name} scores need gradients: pass grads= (prune() passes them itself)")
    if params is None:
        return
    # Gradients of another shape would broadcast against the weights: a silently wrong score.
    assert_same_structure(params, grads, what="the gradients")
    # Both flattened the same way (into compressed leaves too), so the pairs line up.
    for (key_path, p), g in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(grads)):
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(f"{key_path_str(key_path)}: {name} needs gradients of the weights' "
                             f"shape {jnp.shape(p)}, got {jnp.shape(g)}")


class Score(abc.ABC):
    """Base class of scores. Subclasses implement `__call__`; stateful ones `init`/`accumulate`.

    Class attributes `needs_grads` and `needs_key` say what the score uses, so `prune_now` and
    `prune` can check their inputs before tracing. Scores are ranked in float32, and those of
    magnitude below 2**-98 (about 3e-30) count as 0: they tie with zero and are pruned by
    position, so rescale a score that can be that small.

    Example:
        >>> class Squared(Score):
        ...     def __call__(self, params, grads, state, key):
        ...         return jax.tree.map(jnp.square, params)
        >>> Squared()({"w": jnp.array([-3., 1.])}, None, (), None)["w"]
        Array([9., 1.], dtype=float32)
    """

    needs_grads: bool = False
    needs_key: bool = False

    def init(self, params: Any) -> Any:
        """The score's state for `params` (leaves being pruned, `None` elsewhere)."""
        del params
        return ()

    def accumulate(self, state: Any, params: Any, grads: Any) -> Any:
        """The state after one more step with these params and gradients."""
        del params, grads
        return state

    @abc.abstractmethod
    def __call__(self, params: Any, grads: Any, state: Any, key: jax.Array | None) -> Any:
        """A tree of scores shaped like `params` (`None` where params are `None`)."""


@dataclasses.dataclass(frozen=True)
class Magnitude(Score):
    """`|w|`: the L1 magnitude of each weight.

    Example:
        >>> Magnitude()({"w": jnp.array([-3., 1.])}, None, (), None)["w"]
        Array([3., 1.], dtype=float32)
    """

    def __call__(self, params, grads, state, key):
        return jax.tree.map(jnp.abs, params)


@dataclasses.dataclass(frozen=True)
class Random(Score):
    """Uniform random scores from the key that `prune`/`prune_now` are given.

    Example:
        >>> s = Random()({"w": jnp.zeros(3)}, None, (), jax.random.key(0))["w"]
        >>> s.shape
        (3,)
    """

    needs_key = True

    def __call__(self, params, grads, state, key):
        if key is None:
            raise ValueError("Random scores need a key: pass key=jax.random.key(...)")
        check_key(key, "Random scores: key")
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, max(len(leaves), 1))
        return jax.tree.unflatten(
            treedef,
            [jax.random.uniform(k, p.shape, jnp.float32) for k, p in zip(keys, leaves)],
        )


@dataclasses.dataclass(frozen=True)
class Saliency(Score):
    """`|w * g|`: the first-order estimate of the loss change when a weight is removed.

    Applied once at initialisation (a one-shot schedule at step 0), this is SNIP.

    Example:
        >>> Saliency()({"w": jnp.array([2., 1.])}, {"w": jnp.array([0.1, -3.])}, (), None)["w"]
        Array([0.2, 3. ], dtype=float32)
    """

    needs_grads = True

    def __call__(self, params, grads, state, key):
        _need_grads("Saliency", grads, params)
        return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)


@dataclasses.dataclass(frozen=True)
class Movement(Score):
    """Movement pruning: the accumulated -w * g over steps (Sanh et al. 2020).

    The state is one float32 array per pruned leaf. `prune_now` accumulates the given gradients
    once, so a one-shot movement score is -w * g.

    Example:
        >>> m = Movement()
        >>> params, grads = {"w": jnp.array([1., -1.])}, {"w": jnp.array([-0.5, -0.5])}
        >>> state = m.accumulate(m.init(params), params, grads)
        >>> m(params, grads, state, None)["w"]
        Array([ 0.5, -0.5], dtype=float32)
    """

    needs_grads = True

    def init(self, params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def accumulate(self, state, params, grads):
        _need_grads("Movement", grads, params)
        return jax.tree.map(lambda s, p, g: s - (p * g).astype(jnp.float32), state, params, grads)

    def __call__(self, params, grads, state, key):
        return state


@dataclasses.dataclass(frozen=True)
class Taylor(Score):
    """First-order Taylor importance (w * g)^2, averaged over steps (Molchanov et al. 2019).

    The score (and the state) is the square root of that running average, which ranks the
    same: squaring would take any ``|w * g|`` below about 2**-49 under the 2**-98 floor of scores
    (see `Score`), where it ties with 0.

    Attributes:
      decay: weight of the running average; 0.0 scores the latest gradients only.

    Example:
        >>> t = Taylor(decay=0.0)
        >>> params, grads = {"w": jnp.array([2., 1.])}, {"w": jnp.array([1., 1.])}
        >>> t(params, grads, t.accumulate(t.init(params), params, grads), None)["w"]
        Array([2., 1.], dtype=float32)
    """

    decay: float = 0.9
    needs_grads = True

    def __post_init__(self):
        decay = as_real(self.decay)
        if decay is None or not 0.0 <= decay < 1.0:
            raise ValueError(f"Taylor: decay must be a number in [0, 1), got {self.decay!r}")
        object.__setattr__(self, "decay", float(decay))

    def init(self, params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def accumulate(self, state, params, grads):
        _need_grads("Taylor", grads, params)
        # sqrt(decay * s^2 + (1 - decay) * (w g)^2) by hypot, which scales instead of squaring.
        return jax.tree.map(
            lambda s, p, g: jnp.hypot(math.sqrt(self.decay) * s, math.sqrt(1 - self.decay)
                                      * (p * g).astype(jnp.float32)),
            state, params, grads,
        )

    def __call__(self, params, grads, state, key):
        return state


@dataclasses.dataclass(frozen=True)
class ScoreFn(Score):
    """Your own score: `fn(params, grads, state) -> scores`, optionally with state.

    Scores are ranked in float32; magnitudes below 2**-98 (about 3e-30) count as 0 (see
    `Score`).

    Attributes:
      fn: returns a tree of scores shaped like `params` (leaves being pruned; `None` elsewhere).
      init_fn: `params -> state` (default: no state, `()`).
      accumulate_fn: `(state, params, grads) -> state`, called on every step by `prune`.

    Example:
        >>> score = ScoreFn(lambda p, g, s: jax.tree.map(jnp.square, p))
        >>> score({"w": jnp.array([-2., 1.])}, None, (), None)["w"]
        Array([4., 1.], dtype=float32)
    """

    fn: Callable[[Any, Any, Any], Any]
    init_fn: Callable[[Any], Any] | None = None
    accumulate_fn: Callable[[Any, Any, Any], Any] | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"ScoreFn: fn must be callable, got {self.fn!r}")

    def init(self, params):
        return () if self.init_fn is None else self.init_fn(params)

    def accumulate(self, state, params, grads):
        return state if self.accumulate_fn is None else self.accumulate_fn(state, params, grads)

    def __call__(self, params, grads, state, key):
        return self.fn(params, grads, state)


def as_score(score: Score | Callable[[Any, Any, Any], Any]) -> Score:
    """A `Score` as is; a plain callable `(params, grads, state) -> scores` as a `ScoreFn`.

    Raises:
      ValueError: for anything else.

    Example:
        >>> as_score(Magnitude())
        Magnitude()
    """
    if isinstance(score, Score):
        return score
    if callable(score):
        return ScoreFn(score)
    raise ValueError(f"score must be a jaxcomp.sparsity Score or a callable, got {score!r}")


def magnitude_scores(params: Any) -> Any:
    """`|w|` for every leaf.

    Example:
        >>> magnitude_scores({"w": jnp.array([-1., 2.])})
        {'w': Array([1., 2.], dtype=float32)}
    """
    return Magnitude()(params, None, (), None)


def random_scores(params: Any, key: jax.Array) -> Any:
    """Uniform random scores for every leaf, from `key`.

    Example:
        >>> random_scores({"w": jnp.zeros(2)}, jax.random.key(0))["w"].shape
        (2,)
    """
    return Random()(params, None, (), key)


def saliency_scores(params: Any, grads: Any) -> Any:
    """`|w * g|` for every leaf (SNIP's score).

    Example:
        >>> saliency_scores({"w": jnp.array([2.])}, {"w": jnp.array([-0.5])})
        {'w': Array([1.], dtype=float32)}
    """
    return Saliency()(params, grads, (), None)
