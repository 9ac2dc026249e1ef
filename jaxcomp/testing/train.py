"""Small classifier training loops for tests, benchmarks, examples and the demo.

They are the ordinary Flax + optax loop, written once so every compression technique is measured
the same way: a `params_transform` runs inside the loss (fake quantization, STE pruning,
`jaxcomp.materialize`), and any optax `GradientTransformation` (plain or wrapped by jaxcomp)
updates the params. Not part of jaxcomp's API promise.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxcomp.testing.data import Dataset, batches

__all__ = [
    "TrainState",
    "cross_entropy",
    "evaluate_linen",
    "evaluate_nnx",
    "fit_linen",
    "fit_nnx",
    "init_linen",
    "make_linen_train_step",
]

ParamsTransform = Callable[[Any], Any]


class TrainState(NamedTuple):
    """Arrays of a Linen training run.

    Attributes:
      params: the trainable parameters.
      batch_stats: BatchNorm running statistics (an empty dict for models without BatchNorm).
      opt_state: the optimizer state.
    """

    params: Any
    batch_stats: Any
    opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def init_linen(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """`model.init` on a zero batch of one `input_shape` example; returns the variables.

    The init is jitted: run eagerly, every op of a larger model compiles on its own.
    """
    x = jnp.zeros((1, *input_shape), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    return dict(init(jax.random.key(seed), x))


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_linen_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    params_transform: ParamsTransform | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """A jitted `step(state, x, y) -> (state, loss)` for a Linen classifier.

    Args:
      model: a Linen module called as `model.apply(variables, x, train=True)`.
      tx: any optax transformation; it receives `params` in `update` (as weight decay and
        jaxcomp's pruning wrapper need).
      params_transform: applied to the params inside the loss, so gradients flow through it.
      loss_fn: `(logits, labels) -> scalar`.
    """
    transform = params_transform or (lambda p: p)

    def loss_and_stats(params, batch_stats, x, y):
        variables = _variables(transform(params), batch_stats)
        if batch_stats:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply(variables, x, train=True)
        return loss_fn(logits, y), batch_stats

    @jax.jit
    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(
            state.params, state.batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state), loss

    return step


@functools.lru_cache(maxsize=64)
def _linen_predict(model: nn.Module, params_transform: ParamsTransform | None):
    transform = params_transform or (lambda p: p)

    @jax.jit
    def predict(variables, xb):
        variables = {**variables, "params": transform(variables["params"])}
        return jnp.argmax(model.apply(variables, xb, train=False), axis=-1)

    return predict


def evaluate_linen(
    model: nn.Module,
    variables: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    params_transform: ParamsTransform | None = None,
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of a Linen classifier (in eval mode) on `(x, y)`.

    The jitted prediction is cached per `(model, params_transform)`, so repeated evaluations
    compile once.
    """
    predict = _linen_predict(model, params_transform)
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((np.asarray(predict(variables, xb)) == yb).sum())
    return correct / len(y)


def fit_linen(
    model: nn.Module,
    variables: dict[str, Any],
    data: Dataset,
    tx: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    params_transform: ParamsTransform | None = None,
    opt_state: Any = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Trains a Linen classifier for `epochs` epochs; returns `(variables, opt_state)`.

    `log`, when given, receives one line per epoch with the loss, eval accuracy and time.
    """
    params = variables["params"]
    state = TrainState(
        params, variables.get("batch_stats", {}), tx.init(params) if opt_state is None else opt_state
    )
    step = make_linen_train_step(model, tx, params_transform)
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=seed + epoch):
            state, loss = step(state, xb, yb)
            losses.append(loss)
        if log is not None:
            current = _variables(state.params, state.batch_stats)
            acc = evaluate_linen(model, current, data.x_eval, data.y_eval, params_transform)
            log(
                f"epoch {epoch + 1:3d}/{epochs}  loss {float(np.mean(jax.device_get(losses))):.4f}"
                f"  eval accuracy {100 * acc:6.2f}%  ({time.perf_counter() - start:.1f} s)"
            )
    return _variables(state.params, state.batch_stats), state.opt_state


@nnx.jit
def _nnx_predict(model: nnx.Module, xb: jax.Array) -> jax.Array:
    return jnp.argmax(model(xb), axis=-1)


def evaluate_nnx(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of an NNX classifier on `(x, y)`, in eval mode (restores train mode after)."""
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((np.asarray(_nnx_predict(model, xb)) == yb).sum())
    model.train()
    return correct / len(y)


def fit_nnx(
    model: nnx.Module,
    data: Dataset,
    tx: optax.GradientTransformation,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> nnx.Optimizer:
    """Trains an NNX classifier in place; returns the `nnx.Optimizer` (holding the model)."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(xb), yb))(model)
        optimizer.update(model, grads)
        return loss

    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=seed + epoch):
            losses.append(step(model, optimizer, xb, yb))
        if log is not None:
            acc = evaluate_nnx(model, data.x_eval, data.y_eval)
            log(
                f"epoch {epoch + 1:3d}/{epochs}  loss {float(np.mean(jax.device_get(losses))):.4f}"
                f"  eval accuracy {100 * acc:6.2f}%  ({time.perf_counter() - start:.1f} s)"
            )
    return optimizer
