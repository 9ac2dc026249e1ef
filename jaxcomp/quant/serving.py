"""`prepare_for_serving`: store each quantized Dense kernel in the layout that runs fastest.

On XLA's CPU backend the int8 dot is several times faster with a Dense kernel stored (N, K),
contracting on its last axis, at some shapes and slower at others; this module measures both
layouts of each 2-D kernel once for the batch sizes a deployment will see and stores the codes
accordingly (`QArray.perm`). `materialize` and every report still see the dense (K, N) array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from jaxcomp._checks import as_int
from jaxcomp.quant import tuning
from jaxcomp.quant.matmul import DEFAULT_ACTIVATIONS, qdot
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.spec import QuantSpec
from jaxcomp.tree import Where, map_selected

__all__ = ["ServedOp", "prepare_for_serving", "serving_ops"]


def prepare_for_serving(
    params: Any,
    *,
    where: Where = None,
    batch_sizes: Sequence[int] = (8,),
    activations: QuantSpec | None = DEFAULT_ACTIVATIONS,
    allow_float: bool = False,
) -> Any:
    """Stores each 2-D `QArray` (a Dense kernel, (K, N)) in the layout `qdot` runs fastest.

    For every selected 2-D `QArray`, `qdot` is timed once per shape (and cached) at each of
    `batch_sizes` rows with the codes stored (K, N) and (N, K); the faster total wins and the
    codes are transposed accordingly (`QArray.perm`). Values, `materialize()` and `nbytes` are
    unchanged. Call it once, outside `jit`, on the output of `quantize_tree`.

    With `allow_float=True`, a float32 matmul with the dequantized kernel is a third candidate:
    where it is measured faster (on XLA's CPU backend, typically small layers at batch 1), the
    leaf comes back as a dense float array, trading that layer's memory saving for speed.

    Args:
      params: a tree with `QArray` leaves.
      where: which leaves to consider (default: every 2-D `QArray`).
      batch_sizes: the batch sizes (rows of the activations) the model will be served at.
      activations: the activation spec the model will be served with.
      allow_float: let a measured-faster float32 kernel replace the `QArray`.

    Returns:
      The tree with re-laid-out `QArray` leaves (or float kernels, with `allow_float`).

    Raises:
      ValueError: if a given `where` selects nothing, for `batch_sizes` that are not positive
        ints, or `activations` that are not a `QuantSpec` or None.

    Example:
        >>> q = quantize_tree({"k": jnp.ones((16, 8))}, QuantSpec(channel_axes=(-1,)))
        >>> prepare_for_serving(q)["k"].shape
        (16, 8)
    """
    if isinstance(batch_sizes, (np.ndarray, jax.Array)):
        batch_sizes = np.asarray(batch_sizes).tolist()
    try:
        sizes = tuple(batch_sizes)
    except TypeError:
        sizes = ()
    if not sizes or not all((as_int(b) or 0) >= 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive ints, got "
                         f"{batch_sizes!r}")
    sizes = tuple(int(b) for b in sizes)
    if activations is not None and not isinstance(activations, QuantSpec):
        raise ValueError(f"activations must be a QuantSpec or None, got {type(activations).__name__} "
                         f"{activations!r}")

    def one(leaf):
        if not isinstance(leaf, QArray) or len(leaf.shape) != 2 or leaf.spec.is_fp8:
            return leaf
        choice = _choose_layout(leaf, sizes, activations, allow_float)
        if choice == "float":
            return leaf.materialize()
        return leaf.transpose_storage((1, 0) if choice == "nk" else None)

    # where=None takes every leaf (a tree without a QArray comes back as it is); a `where` given
    # explicitly must select something, so a misspelled pattern is not silently a no-op.
    return map_selected(one, params, where=where, allow_empty=where is None)


def _choose_layout(w: QArray, batch_sizes: tuple[int, ...], activations, allow_float: bool) -> str:
    k, n = w.shape
    if max(batch_sizes) * k * n < tuning.MIN_MEASURED_MACS or activations is None:
        return "nk"
    key = ("layout", *tuning.device_key(), (k, n), str(w.values.dtype), w.spec, batch_sizes,
           activations, allow_float)

    def measure():
        w_t = tuning.random_like(w.transpose_storage(None), jax.random.key(1))
        candidates = {"kn": w_t, "nk": w_t.transpose_storage((1, 0))}
        if allow_float:
            candidates["float"] = w_t.materialize()

        # Weights are arguments, not closed-over constants (XLA may re-lay-out constants).
        float_dot = jax.jit(lambda x_, w_: x_ @ w_)
        int_dot = jax.jit(lambda x_, w_: qdot(x_, w_, activations=activations))
        total = dict.fromkeys(candidates, 0.0)
        for b in batch_sizes:
            x_t = jax.random.normal(jax.random.key(2), (b, k), jnp.float32)
            fns = {name: functools.partial(float_dot if name == "float" else int_dot, w_=candidates[name])
                   for name in candidates}
            for name, t in tuning.time_calls(fns, (x_t,)).items():
                total[name] += t
        return total

    return tuning.measure_once(key, measure)


class ServedOp(NamedTuple):
    """One matmul or convolution of a traced function (see `serving_ops`).

    Attributes:
      scope: where it runs: the name stack of the trace (Flax Linen module paths such as
        `"MLP/Dense_0"`; empty where nothing names it).
      op: `"dot_general"` or `"conv_general_dilated"`.
      operands: the dtypes of its two operands, e.g. `("int8", "int8")`.
      integer: whether both operands are integers (an integer product).
    """

    scope: str
    op: str
    operands: tuple[str, str]
    integer: bool


def _ops(jaxpr: Any, scope: str) -> Iterator[ServedOp]:
    for eqn in jaxpr.eqns:
        stack = str(eqn.source_info.name_stack)
        here = "/".join(part for part in (scope, stack) if part)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            dtypes = tuple(str(v.aval.dtype) for v in eqn.invars[:2])
            yield ServedOp(here, eqn.primitive.name, dtypes,
                           all(jnp.issubdtype(d, jnp.integer) for d in dtypes))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jex.ClosedJaxpr):
                    yield from _ops(sub.jaxpr, here)
                elif isinstance(sub, jex.Jaxpr):
                    yield from _ops(sub, here)


def serving_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[ServedOp]:
    """Every matmul and convolution `fn(*args, **kwargs)` runs, with its operand dtypes: which
    layers of a served model really run on integers, and which on floats (a layer left in
    float, a spec that takes the dequantize path, a strategy measured faster in float).

    `fn` is traced, not run (abstract `jax.ShapeDtypeStruct` arguments are fine). Scopes are
    the trace's name stack: Flax Linen names its modules there, so a `serve_linen` model's ops
    carry their layer paths; NNX modules and plain functions leave it empty.

    Args:
      fn: e.g. `serve_linen(model, act_params=...)`, or any function.
      *args: its arguments.
      **kwargs: its keyword arguments.

    Returns:
      A list of `ServedOp`, in program order (a `cond` lists both branches' ops).

    Example:
        >>> from jaxcomp.quant import QuantSpec, qdot, quantize
        >>> w = quantize(jnp.ones((4, 3)), QuantSpec(channel_axes=(-1,)))
        >>> [(op.op, op.operands) for op in serving_ops(lambda x: qdot(x, w, strategy="int8"),
        ...                                             jnp.ones((8, 4)))]
        [('dot_general', ('int8', 'int8'))]
    """
    closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    return list(_ops(closed.jaxpr, ""))
