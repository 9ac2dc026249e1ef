"""Non-uniform quantization: `Codebook` leaves (k-means weight sharing, power-of-two levels) and
centroid fine-tuning inside a normal optax step.

A `Codebook` stores a small integer index per weight (uint2 / uint4 / uint8 for 2..8 bits) and a
float table of `2**bits` centroids; `materialize()` is `centroids[indices]`.

* `kmeans_quantize` follows Deep Compression (Han et al. 2016): one table per tensor, centroids
  initialised linearly between the tensor's min and max (which keeps the rare large weights
  representable), then Lloyd iterations of 1-D k-means.
* `power_of_two_quantize` uses the levels `0, +-2**e` for the `2**(bits-1) - 1` exponents below
  the tensor's largest (multiplication-free inference: products become shifts).
* `codebook_finetune(optimizer, codebooks)` wraps any optax optimizer: the model trains on dense
  weights tied to the codebooks; each step sums the weights' gradients per centroid, lets the
  wrapped optimizer update the centroids, and returns the dense updates that keep every weight
  equal to its centroid, so one `optax.apply_updates` is the whole step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp._checks import as_int
from jaxcomp.core import CompressedLeaf, bit_width, compressed_leaf, is_compressed, static_field
from jaxcomp.quant.numerics import check_finite, check_float, dense_leaf
from jaxcomp.quant.qarray import pack_bits
from jaxcomp.tree import Where, map_selected, path_dict

__all__ = [
    "Codebook",
    "CodebookFinetuneState",
    "codebook_finetune",
    "finetuned_codebooks",
    "kmeans_quantize",
    "kmeans_tree",
    "power_of_two_quantize",
    "power_of_two_tree",
]


def _check_bits(bits: Any, path: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"{path}: codebook bits must be an int in 2..8, got {bits!r}")
    return int(bits)


def _index_dtype(bits: int) -> np.dtype:
    return np.dtype(jnp.uint2 if bits <= 2 else jnp.uint4 if bits <= 4 else jnp.uint8)


@compressed_leaf
class Codebook(CompressedLeaf):
    """A weight-shared tensor: an index per element into a small table of centroids.

    Attributes:
      indices: unsigned integer indices (uint2, uint4 or uint8), the dense shape.
      centroids: float32 table of `2**bits` values.
      bits: bits of index (static).
      dense_dtype: dtype `materialize` returns (static).
      method: "kmeans", "power-of-two" or "fine-tuned" (centroids moved by
        `codebook_finetune`, so no longer powers of two), shown by reports (static).
      zero_index: int16 scalar, the index of the centroid pinned at 0.0 for the tensor's exact
        zeros (a pruned model's removed weights), which `codebook_finetune` holds there; -1 (or
        `None`) when there is none.

    Example:
        >>> cb = kmeans_quantize(jnp.array([0.0, 0.3, 0.7, 1.0]), bits=2)
        >>> np.asarray(cb.materialize()).round(2), cb.nbytes
        (array([0. , 0.3, 0.7, 1. ], dtype=float32), 19)
    """

    indices: jax.Array
    centroids: jax.Array
    bits: int = static_field()
    dense_dtype: Any = static_field(default=np.dtype(np.float32))
    method: str = static_field(default="kmeans")
    zero_index: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dense_dtype)

    def materialize(self) -> jax.Array:
        return _materialize(self)

    def packed_indices(self) -> np.ndarray:
        """The indices bit-packed into a numpy `uint8` buffer (see `jaxcomp.quant.pack_bits`)."""
        return pack_bits(np.asarray(jax.device_get(self.indices)))

    @property
    def kind(self) -> str:
        return "Codebook"

    def summary(self) -> str:
        return f"{self.method}, {self.bits}-bit indices ({bit_width(self.indices.dtype)} stored), " \
               f"{self.centroids.shape[0]} centroids"


@jax.jit
def _materialize(cb: Codebook) -> jax.Array:
    return cb.centroids[cb.indices.astype(jnp.int32)].astype(cb.dense_dtype)


def _assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid of each element (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return jnp.searchsorted(midpoints, x, side="left").astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _kmeans(x: jax.Array, k: int, iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lloyd's 1-D k-means, linearly initialised; exact zeros (pruned weights), if any, get a
    centroid of their own pinned at 0.0 and the other weights share the other k - 1.

    Returns the indices, the table and the index of the pinned zero (-1 without zeros).
    """
    flat = x.reshape(-1).astype(jnp.float32)
    # Clustered at a power-of-two scale (exact), so that sums and ranges of weights near the
    # float32 limit do not overflow.
    absmax = jnp.max(jnp.abs(flat))
    scale = jnp.where(absmax > 0, jnp.exp2(jnp.floor(jnp.log2(jnp.where(absmax > 0, absmax, 1.0)))),
                      1.0)
    nonzero = flat != 0
    flat = flat / scale
    pin = ~jnp.all(nonzero)
    free = k - pin.astype(jnp.int32)  # centroids the clustered weights share
    counted = jnp.where(pin, nonzero, True)  # the weights that are clustered
    lo = jnp.min(jnp.where(counted, flat, jnp.inf))
    hi = jnp.max(jnp.where(counted, flat, -jnp.inf))
    lo, hi = jnp.where(jnp.any(counted), lo, 0.0), jnp.where(jnp.any(counted), hi, 0.0)
    slots = jnp.arange(k)
    t = slots / jnp.maximum(free - 1, 1).astype(jnp.float32)
    # Unused slots (the last one when pinning) sit at +inf: never nearest, and last once sorted.
    centroids = jnp.where(slots < free, lo * (1 - t) + hi * t, jnp.inf)
    def step(_, c):
        idx = _assign(flat, c)
        # The mean as the centroid plus the mean deviation from it: float32 sums of the weights
        # themselves lose digits over a large cluster (1-4% at a few million weights), sums of
        # deviations (zero for a constant tensor) do not. Counts are exact integers.
        deviation = jnp.where(counted, flat - c[idx], 0.0)
        shift = jax.ops.segment_sum(deviation, idx, num_segments=k)
        counts = jax.ops.segment_sum(counted.astype(jnp.int32), idx, num_segments=k)
        mean = c + shift / jnp.maximum(counts, 1).astype(jnp.float32)
        # An empty cluster keeps its centroid; sorting keeps the midpoint search valid.
        return jnp.sort(jnp.where(counts > 0, mean, c))

    centroids = jax.lax.fori_loop(0, iters, step, centroids)
    idx = _assign(flat, centroids)
    # Pinning: 0.0 takes the +inf slot; it sits after the `below` centroids that are negative.
    below = jnp.sum(centroids < 0)
    table = jnp.where(pin, jnp.sort(jnp.where(slots < free, centroids, 0.0)), centroids) * scale
    idx = jnp.where(pin, jnp.where(nonzero, idx + (idx >= below), below), idx)
    zero_index = jnp.where(pin, below, -1).astype(jnp.int16)
    return idx.reshape(x.shape), table, zero_index


def kmeans_quantize(x: jax.Array, bits: int, *, iters: int = 30, path: str = "x") -> Codebook:
    """Deep Compression weight sharing: 1-D k-means with `2**bits` linearly initialised centroids.

    Exact zeros (the weights a pruned model has removed) are not clustered with the others, as in
    Deep Compression, where only the surviving weights are: they get one centroid of their own,
    pinned at 0.0, and the other weights share the other `2**bits - 1`. A pruned model stays
    pruned; a tensor without zeros uses all `2**bits` centroids.

    Args:
      x: a float array (one table for the whole tensor).
      bits: index bits, 2 to 8.
      iters: Lloyd iterations (each is one pass over `x`).
      path: the name used in error messages.

    Returns:
      A `Codebook`.

    Raises:
      ValueError: naming `path` for bits outside 2..8, a non-float or empty `x`, or NaN/Inf
        in `x`.

    Example:
        >>> np.asarray(kmeans_quantize(jnp.array([0.0, 0.3, 0.7, 1.0, 0.9]), bits=2).centroids).round(2)
        array([0.  , 0.3 , 0.7 , 0.95], dtype=float32)
    """
    bits = _check_bits(bits, path)
    check_float(x, path)
    x = jnp.asarray(x)
    check_finite(x, path)
    if as_int(iters) is None or iters < 0:
        raise ValueError(f"{path}: iters must be an int >= 0, got {iters!r}")
    if x.size == 0:
        raise ValueError(f"{path}: k-means needs at least one value, got shape {x.shape}")
    indices, centroids, zero_index = _kmeans(x, 2**bits, int(iters))
    return Codebook(indices.astype(_index_dtype(bits)), centroids, bits, np.dtype(x.dtype), "kmeans",
                    zero_index)


def power_of_two_quantize(x: jax.Array, bits: int, *, path: str = "x") -> Codebook:
    """Logarithmic quantization to `0` and `+-2**e`, `e` in the `2**(bits-1) - 1` exponents up to
    `round(log2(max|x|))`; magnitudes round in the log domain, and values below half the smallest
    level become 0.

    Args:
      x: a float array.
      bits: index bits, 2 to 8 (2 bits: `{0, +-2**e_max}`).
      path: the name used in error messages.

    Returns:
      A `Codebook` with `method="power-of-two"`.

    Raises:
      ValueError: naming `path` for bits outside 2..8, a non-float or empty `x`, or NaN/Inf in `x`.

    Example:
        >>> power_of_two_quantize(jnp.array([0.3, -1.0, 0.01]), bits=3).materialize()
        Array([ 0.25, -1.  ,  0.  ], dtype=float32)
    """
    bits = _check_bits(bits, path)
    check_float(x, path)
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError(f"{path}: cannot quantize an empty array (shape {x.shape}) to a "
                         "power-of-two codebook")
    check_finite(x, path)
    indices, centroids = _power_of_two(x, bits)
    # The 0 level holds the tensor's exact zeros (and its smallest weights): pinned when there
    # are zeros, so that fine-tuning keeps a pruned model pruned.
    zero_index = jnp.where(jnp.any(x == 0), 0, -1).astype(jnp.int16)
    return Codebook(indices.astype(_index_dtype(bits)), centroids, bits, np.dtype(x.dtype),
                    "power-of-two", zero_index)


@functools.partial(jax.jit, static_argnums=(1,))
def _power_of_two(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    n = 2 ** (bits - 1) - 1  # magnitudes per sign
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf))
    e_max = jnp.where(absmax > 0, jnp.round(jnp.log2(jnp.where(absmax > 0, absmax, 1.0))), 0.0)
    # The largest level must be finite in the dense dtype (3e38 would round up to 2**128).
    e_max = jnp.minimum(e_max, float(np.floor(np.log2(float(jnp.finfo(x.dtype).max)))))
    e_min = e_max - (n - 1)
    magnitudes = 2.0 ** (e_max - jnp.arange(n, dtype=jnp.float32))
    # Table: [0, +2**e_max .. +2**e_min, -2**e_max .. -2**e_min, 0 (unused code)].
    centroids = jnp.concatenate([jnp.zeros(1), magnitudes, -magnitudes, jnp.zeros(1)])
    mag = jnp.abs(xf)
    log_mag = jnp.log2(jnp.where(mag > 0, mag, 1.0))
    exponent = jnp.clip(jnp.round(log_mag), e_min, e_max)
    level = (e_max - exponent).astype(jnp.int32)  # 0 for the largest magnitude
    index = jnp.where(xf >= 0, 1 + level, 1 + n + level)
    # Compared in the log domain: with 8 bits, 2**(e_min - 1) is subnormal for max|x| < 1.4,
    # which XLA's CPU backend reads as 0 (zeros would then take a level).
    index = jnp.where((mag == 0) | (log_mag < e_min - 1), 0, index)
    return index, centroids


def kmeans_tree(params: Any, bits: int, *, where: Where = None, iters: int = 30) -> Any:
    """`kmeans_quantize` on every leaf `where` selects (one codebook per tensor).

    Raises:
      ValueError: if `where` selects nothing, or naming the path of a leaf `kmeans_quantize`
        rejects.

    Example:
        >>> q = kmeans_tree({"Dense_0": {"kernel": jnp.ones((4, 4))}}, bits=2, where=r".*kernel")
        >>> type(q["Dense_0"]["kernel"]).__name__
        'Codebook'
    """
    return map_selected(
        lambda path, leaf: kmeans_quantize(
            dense_leaf(leaf, path, "kmeans_tree"), bits, iters=iters, path=path),
        params, where=where, with_path=True,
    )


def power_of_two_tree(params: Any, bits: int, *, where: Where = None) -> Any:
    """`power_of_two_quantize` on every leaf `where` selects.

    Example:
        >>> q = power_of_two_tree({"w": jnp.array([1.1, 3.0])}, bits=3)
        >>> q["w"].materialize()
        Array([1., 4.], dtype=float32)
    """
    return map_selected(
        lambda path, leaf: power_of_two_quantize(
            dense_leaf(leaf, path, "power_of_two_tree"), bits, path=path),
        params, where=where, with_path=True,
    )


class CodebookFinetuneState(NamedTuple):
    """State of `codebook_finetune`.

    Attributes:
      indices: `{path: indices}` of the shared weights (fixed during fine-tuning).
      centroids: `{path: centroids}`, updated every step.
      inner_state: the wrapped optimizer's state, over the params with each shared weight
        replaced by its centroid table.
      zero_index: `{path: int16 scalar}`, each codebook's `zero_index`: the centroid held at
        0.0, which holds the pruned weights (-1 for none).
    """

    indices: dict[str, jax.Array]
    centroids: dict[str, jax.Array]
    inner_state: Any
    zero_index: dict[str, jax.Array]


def _pinned(zero_index: jax.Array, centroids: jax.Array) -> jax.Array:
    """Which entry of the table is held at 0.0 (none for a zero index of -1)."""
    return jnp.arange(centroids.shape[0]) == zero_index.astype(jnp.int32)


def codebook_finetune(
    optimizer: optax.GradientTransformation, codebooks: Any
) -> optax.GradientTransformationExtraArgs:
    """Fine-tunes k-means centroids inside a normal optax step (Deep Compression).

    The model trains on dense params that start as `jaxcomp.materialize(codebooks)`. Each
    update sums the dense gradients of the weights assigned to each centroid
    (`segment_sum`), lets `optimizer` update the centroids (and every other param as usual), and
    returns the dense updates that move each shared weight to its new centroid.
    `finetuned_codebooks(opt_state, params)` gives the `Codebook` leaves back.

    The centroid a codebook pinned at 0.0 for the tensor's exact zeros (`Codebook.zero_index`,
    see `kmeans_quantize`) stays there, with no gradient: it holds the weights that pruning
    removed, so a pruned model stays pruned, as in Deep Compression, where the pruned weights are
    held at zero while the centroids train. Every other centroid trains, one at 0.0 included.

    Args:
      optimizer: any optax optimizer (it sees centroid tables in place of shared weights).
      codebooks: a tree with `Codebook` leaves at the shared weights, e.g. from `kmeans_tree`;
        other leaves are ignored.

    Returns:
      An optax `GradientTransformationExtraArgs` whose state is a `CodebookFinetuneState`.

    Raises:
      ValueError: if `codebooks` holds no `Codebook`, or at `init` when a codebook path is not a
        param of matching shape.

    Example:
        >>> params = {"w": jnp.array([0.0, 0.3, 0.7, 1.0])}
        >>> books = kmeans_tree(params, bits=2)
        >>> tx = codebook_finetune(optax.sgd(0.1), books)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.ones(4)}, state, params)
        >>> np.asarray(finetuned_codebooks(state, params)["w"].centroids).round(2)  # 0.0: pinned
        array([0. , 0.2, 0.6, 0.9], dtype=float32)
    """
    books = {p: leaf for p, leaf in path_dict(codebooks).items() if isinstance(leaf, Codebook)}
    if not books:
        raise ValueError("codebook_finetune: `codebooks` holds no Codebook leaf")

    def trainable(params, centroids):
        return map_selected(lambda path, _: centroids[path], params,
                            where=lambda path, _: path in centroids, with_path=True)

    def init(params):
        dense = path_dict(params)
        for path, book in books.items():
            if path not in dense:
                raise ValueError(f"codebook_finetune: codebook path {path!r} is not in the params")
            if tuple(jnp.shape(dense[path])) != book.shape:
                raise ValueError(f"codebook_finetune: {path!r} has shape {jnp.shape(dense[path])}, "
                                 f"its codebook {book.shape}")
            value = dense[path]
            if not isinstance(value, jax.core.Tracer) and not is_compressed(value):
                # Weights that are not the codebook's would train untied (the centroid sums
                # mix weights of other values) and the codebook returned would not be the model.
                tied = np.asarray(book.materialize(), np.float32)
                if not np.array_equal(np.asarray(value, np.float32), tied):
                    raise ValueError(
                        f"codebook_finetune: the params at {path!r} are not its codebook's values "
                        "(start from jaxcomp.materialize(codebooks))")
        indices = {p: b.indices for p, b in books.items()}
        centroids = {p: b.centroids for p, b in books.items()}
        zero_index = {p: jnp.asarray(-1 if b.zero_index is None else b.zero_index, jnp.int16)
                      for p, b in books.items()}
        return CodebookFinetuneState(indices, centroids, optimizer.init(trainable(params, centroids)),
                                     zero_index)

    def update(updates, state, params=None, **extra_args):
        def centroid_grad(path, grad):
            idx = state.indices[path].astype(jnp.int32).reshape(-1)
            k = state.centroids[path].shape[0]
            summed = jax.ops.segment_sum(grad.reshape(-1), idx, num_segments=k)
            pinned = _pinned(state.zero_index[path], state.centroids[path])
            return jnp.where(pinned, jnp.zeros((), summed.dtype), summed)

        grads = map_selected(centroid_grad, updates, where=lambda p, _: p in state.indices,
                             with_path=True)
        inner_params = None if params is None else trainable(params, state.centroids)
        inner_updates, inner_state = optimizer.update(grads, state.inner_state, inner_params,
                                                      **extra_args)
        flat = path_dict(inner_updates)
        # Pinned centroids stay exactly 0.0 whatever the optimizer does (weight decay, ...).
        centroids = {p: jnp.where(_pinned(state.zero_index[p], state.centroids[p]), 0.0,
                                  state.centroids[p] + flat[p])
                     .astype(state.centroids[p].dtype) for p in state.centroids}

        dense = None if params is None else path_dict(params)

        def dense_update(path, leaf):
            idx = state.indices[path].astype(jnp.int32)
            if dense is None:
                return (centroids[path][idx] - state.centroids[path][idx]).astype(leaf.dtype)
            # Each shared weight lands exactly on its new centroid, rounded to the weight's
            # dtype as `materialize` rounds it: a difference of centroids, rounded to bfloat16
            # on every step, would let the weights drift away from the table. The update is
            # computed in float32 (at least), where the difference of the two values is exact.
            p = dense[path]
            wide = jnp.promote_types(p.dtype, jnp.float32)
            return centroids[path][idx].astype(p.dtype).astype(wide) - p.astype(wide)

        dense_updates = map_selected(dense_update, updates, where=lambda p, _: p in centroids,
                                     with_path=True)
        dense_updates = map_selected(lambda path, _: flat[path], dense_updates,
                                     where=lambda p, _: p not in centroids, with_path=True,
                                     allow_empty=True)
        return dense_updates, CodebookFinetuneState(state.indices, centroids, inner_state,
                                                    state.zero_index)

    return optax.GradientTransformationExtraArgs(init, update)


def finetuned_codebooks(opt_state: Any, params: Any) -> Any:
    """`params` with each fine-tuned weight replaced by its `Codebook` (the centroids reached).

    Args:
      opt_state: an optimizer state containing a `CodebookFinetuneState` (possibly nested in
        `optax.chain` or other wrappers).
      params: the current params (the dtype of each shared weight is kept).

    Returns:
      The params tree with `Codebook` leaves at the fine-tuned paths.

    Raises:
      ValueError: if `opt_state` holds no `CodebookFinetuneState`.

    Example:
        >>> params = {"w": jnp.array([0.0, 1.0])}
        >>> tx = codebook_finetune(optax.sgd(0.1), kmeans_tree(params, bits=2))
        >>> type(finetuned_codebooks(tx.init(params), params)["w"]).__name__
        'Codebook'
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, CodebookFinetuneState))
             if isinstance(s, CodebookFinetuneState)]
    if not found:
        raise ValueError("finetuned_codebooks: opt_state holds no CodebookFinetuneState")
    state = found[0]

    def book(path, leaf):
        k = state.centroids[path].shape[0]
        return Codebook(state.indices[path], state.centroids[path], int(round(np.log2(k))),
                        np.dtype(leaf.dtype), "fine-tuned", state.zero_index[path])

    return map_selected(book, params, where=lambda p, _: p in state.indices, with_path=True)
