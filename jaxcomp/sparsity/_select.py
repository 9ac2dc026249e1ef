"""Exact "prune the k lowest scores" without sorting: a search on the threshold by counting.

Every mask in `jaxcomp.sparsity` comes from here. Sorting a parameter (or concatenating all of
them for a global threshold) costs O(n log n) time, a copy of every score and, on a mesh, a
gather of the whole array onto one device. Instead the threshold is searched: each step counts
the scores below a candidate threshold, which is one fused, memory-light reduction that XLA
partitions like any sum. Candidates come from interpolating the empirical CDF between the
bracket's ends; when the bracket stops shrinking, its ends close onto the nearest scores (one
max-reduction) and bisection in the bits of the float takes over. A smooth score distribution
needs about ten passes, tied or discrete scores (already pruned zeros, quantized weights) about
as many, and any input at most about 64. On a single device, leaves of one shape are stacked
and searched as one array (`_Blocks`): each pass is one reduction per shape, not per leaf.

The count is `min(ceil(max(t - x, 0)), 1)` summed in float32: exactly 1 for x < t, 0 otherwise,
and 2-10x faster on CPU than summing a comparison (XLA vectorizes the arithmetic, not the
predicate). The same expression decides the mask, so counts and masks agree bit for bit.
Ties at the threshold are broken by position (leaf order, then row-major index), so the number
of pruned elements is exactly k.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_FMAX = float(np.finfo(np.float32).max)
# Partial sums of 0/1 in float32 are exact below 2**24.
_EXACT_F32 = 1 << 24
_MAX_STEPS = 128
# Elements in the sample that brackets the threshold before the search.
_SAMPLE = 512
_MIN_SAMPLE = 64
_SIGN = np.uint32(0x80000000)
# Scores below this magnitude tie with zero: differences of larger floats are never subnormal.
TINY = float(2.0**-98)


def finite(scores: jax.Array) -> jax.Array:
    """float32 scores with NaN as the lowest finite value and infinities clipped to finite."""
    scores = scores.astype(jnp.float32)
    return jnp.nan_to_num(scores, nan=-_FMAX, posinf=_FMAX, neginf=-_FMAX)


def sanitize(scores: jax.Array) -> jax.Array:
    """Finite float32 scores in the same order: NaN and -inf lowest, +inf highest.

    Finite values are halved (exact, order-preserving) so that the infinities can map to the
    finite extremes and still sort strictly beyond every finite score. Scores of magnitude below
    `TINY` count as zero: the count `t - x` must never be a subnormal, which XLA's CPU backend
    flushes to zero, so tiny scores tie with 0 (and are pruned by position among the zeros).
    """
    scores = scores.astype(jnp.float32)
    half = scores * 0.5
    half = jnp.where(jnp.abs(half) < TINY / 2, jnp.zeros((), jnp.float32), half)
    return jnp.where(
        jnp.isnan(scores) | (scores == -jnp.inf),
        -_FMAX,
        jnp.where(scores == jnp.inf, _FMAX, half),
    )


def to_key(x: jax.Array) -> jax.Array:
    """Order-preserving map of float32 to uint32 (for -0.0 < +0.0; NaN excluded)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def from_key(key: jax.Array) -> jax.Array:
    """Inverse of `to_key`."""
    bits = jnp.where(key >= _SIGN, key & ~_SIGN, ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


_KEY_ZERO = np.uint32(0x80000000)  # to_key(+0.0)
_KEY_MIN_NORMAL = np.uint32(0x80800000)  # to_key(2**-126)


def succ(key: jax.Array) -> jax.Array:
    """The next threshold key after `key` that counts differently on sanitized scores.

    XLA's CPU backend reads subnormal inputs as zero, so a threshold between 0 and 2**-126 counts
    like 0 itself; sanitized scores have none there, so the first threshold past 0 is 2**-126.
    """
    return jnp.where(key == _KEY_ZERO, _KEY_MIN_NORMAL, key + 1)


def _normal_candidate(cand: jax.Array, lo: jax.Array) -> jax.Array:
    """A candidate inside (lo, hi) that is not a positive subnormal (see `succ`)."""
    subnormal = (cand > _KEY_ZERO) & (cand < _KEY_MIN_NORMAL)
    return jnp.where(subnormal, jnp.where(lo < _KEY_ZERO, _KEY_ZERO, _KEY_MIN_NORMAL), cand)


def below(x: jax.Array, t: jax.Array) -> jax.Array:
    """1.0 where x < t, else 0.0, by arithmetic that XLA vectorizes (see the module docstring)."""
    return jnp.minimum(jnp.ceil(jnp.maximum(t - x, 0.0)), 1.0)


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major position of every element, built from iotas so it shards like the leaf."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return index


# XLA's CPU runtime sets up a buffer for each value of every reduction's reducer (and for
# every constant) on each call of a program, even where the reduction sits in a branch that
# does not run, as the mask search does in every pruned train step. Reductions over a handful
# of per-group flags are unrolled into elementwise operations to keep that program small
# (docs/sparsity.md measures what it does and does not change in a train step).
_UNROLL = 16


def any_of(x: jax.Array) -> jax.Array:
    """`jnp.any(x)`; without a reduction when `x` is small."""
    x = jnp.ravel(x)
    if x.size > _UNROLL:
        return jnp.any(x)
    out = jnp.zeros((), bool)
    for i in range(x.size):
        out = out | x[i]
    return out


def all_of(x: jax.Array) -> jax.Array:
    """`jnp.all(x)`; without a reduction when `x` is small."""
    return ~any_of(~jnp.asarray(x, bool))


class UnitWeights:
    """Per-element weights of one leaf (e.g. the weights each block holds), hashable so the
    jitted search can take them as a static argument."""

    def __init__(self, weights: np.ndarray):
        self.array = np.asarray(weights, np.int32)
        self._key = (self.array.shape, self.array.tobytes())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, UnitWeights) and self._key == other._key


Weight = int | UnitWeights


def _largest(w: Weight) -> int:
    return int(w.array.max(initial=1)) if isinstance(w, UnitWeights) else w


def _one_per_group(groups: Sequence[int], num_groups: int) -> bool:
    return tuple(groups) == tuple(range(num_groups))


class _Blocks:
    """The leaves of a search, stacked: leaves of one shape and one whole-number weight share a
    block `(n, *shape)`, and each pass of the search is one reduction per block, not per leaf
    (a transformer's layers compile and run as a handful of arrays). Stacking copies no more
    than the sanitized scores already are; it happens on a single device only, where no leaf
    can be sharded (stacking leaves sharded differently would reshard them).

    Per-leaf vectors stay in leaf order; `per_block` and `to_leaves` move them between leaf
    order and the blocks' rows.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], weights: Sequence[Weight]):
        self.members: list[list[int]] = []
        if jax.device_count() == 1:
            index: dict[tuple, int] = {}
            for i, (shape, w) in enumerate(zip(shapes, weights)):
                key = None if isinstance(w, UnitWeights) else (tuple(shape), w)
                if key is not None and key in index:
                    self.members[index[key]].append(i)
                else:
                    if key is not None:
                        index[key] = len(self.members)
                    self.members.append([i])
        else:
            self.members = [[i] for i in range(len(shapes))]
        self.order = np.array([i for m in self.members for i in m], np.int64)
        self.identity = bool(np.array_equal(self.order, np.arange(len(shapes))))
        self.inverse = np.argsort(self.order)
        self.starts = np.cumsum([0] + [len(m) for m in self.members])[:-1]
        self.weights = [weights[m[0]] for m in self.members]
        self.sizes = [math.prod(shapes[m[0]]) for m in self.members]

    def stack(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
        return [leaves[m[0]][None] if len(m) == 1 else jnp.stack([leaves[i] for i in m])
                for m in self.members]

    def per_block(self, per_leaf: jax.Array) -> list[jax.Array]:
        """A per-leaf vector (leaf order) as one `(n,)` vector per block."""
        in_order = per_leaf if self.identity else per_leaf[self.order]
        return [in_order[s:s + len(m)] for s, m in zip(self.starts, self.members)]

    def to_leaves(self, per_block: Sequence[jax.Array]) -> jax.Array:
        """One `(n,)` vector per block as a per-leaf vector in leaf order."""
        flat = per_block[0] if len(per_block) == 1 else jnp.concatenate(per_block)
        return flat if self.identity else flat[self.inverse]

    def unstack(self, blocks: Sequence[jax.Array]) -> list[jax.Array]:
        out: list[Any] = [None] * len(self.order)
        for block, members in zip(blocks, self.members):
            for row, i in enumerate(members):
                out[i] = block[row]
        return out


def _rows(v: jax.Array, ndim: int) -> jax.Array:
    """A per-row vector `(n,)` broadcast against a block of rank `ndim`."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _row_axes(block: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, block.ndim))


def _exact_row_sums(ones: jax.Array) -> jax.Array:
    """Exact int32 sum of each row of a block of float32 zeros and ones.

    Summed in float32, which XLA fuses with the expression producing `ones` (an integer sum
    materializes the converted array first); partial sums stay below 2**24, where float32 counts
    exactly.
    """
    if math.prod(ones.shape[1:]) < _EXACT_F32:
        return jnp.sum(ones, axis=_row_axes(ones)).astype(jnp.int32)
    inner, axis = 1, ones.ndim
    while axis > 1 and inner * ones.shape[axis - 1] < _EXACT_F32:
        axis -= 1
        inner *= ones.shape[axis]
    if axis == ones.ndim:  # one axis alone holds 2**24 elements: count in integers
        return jnp.sum(ones.astype(jnp.int32), axis=_row_axes(ones))
    partial = jnp.sum(ones, axis=tuple(range(axis, ones.ndim))).astype(jnp.int32)
    return jnp.sum(partial, axis=tuple(range(1, axis)))


def _row_weighted_counts_of_ones(ones: jax.Array, w: int) -> jax.Array:
    """`_row_weighted_counts` of `ones > 0`, summing the float ones (fused with what makes
    them: the count of scores below a threshold)."""
    counts = _exact_row_sums(ones)
    return counts if w == 1 else counts * w


def _row_weighted_counts(marked: jax.Array, w: Weight) -> jax.Array:
    """Total weight of the marked elements of each row of a block, as exact int32s."""
    if isinstance(w, UnitWeights):
        return jnp.sum(jnp.where(marked, jnp.asarray(w.array)[None], 0), axis=_row_axes(marked))
    counts = _exact_row_sums(jnp.where(marked, 1.0, 0.0))
    return counts if w == 1 else counts * w


# With one leaf per group (the common case) the per-group values are the per-leaf ones, not a
# product with a one-hot constant or a scatter. Every constant and every reducer computation is
# a buffer that XLA's CPU runtime sets up on each call of the program, even where the search
# sits in a branch that does not run.
def _group_sum(per_leaf: jax.Array, groups: Sequence[int], num_groups: int) -> jax.Array:
    if _one_per_group(groups, num_groups):
        return per_leaf
    onehot = np.zeros((len(groups), num_groups), np.int32)
    onehot[np.arange(len(groups)), np.asarray(groups)] = 1
    return per_leaf @ jnp.asarray(onehot)


def _group_max(per_leaf: jax.Array, groups: Sequence[int], num_groups: int) -> jax.Array:
    if _one_per_group(groups, num_groups):
        return per_leaf.astype(jnp.float32)
    out = jnp.full((num_groups,), -jnp.inf, jnp.float32)
    return out.at[np.asarray(groups)].max(per_leaf)


def _sample_strides(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """Strides of a regular grid of about `size` elements of an array of `shape`."""
    step = math.prod(shape) / max(size, 1)
    strides = [1] * len(shape)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if step <= 1:
            break
        strides[axis] = max(1, min(shape[axis], int(step)))
        step /= strides[axis]
    return tuple(strides)


def _sample_bracket(
    blocks: list[jax.Array],
    layout: _Blocks,
    groups: Sequence[int],
    weights: Sequence[Weight],
    k: jax.Array,
    totals: np.ndarray,
    leaf_totals: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
    """Per group, two thresholds that likely bracket the k-th score: quantiles of a small
    regular sample at k/total -+ 3 standard errors (NaN where the quantile falls outside).

    Sample ranks come from all pairwise comparisons, not a sort: XLA's CPU sort is slower than
    a few hundred thousand vectorized comparisons. Strided slices shard like the leaves.
    """
    num_groups = len(totals)
    per_group = int(np.clip(_SAMPLE // num_groups, _MIN_SAMPLE, _SAMPLE))
    samples: list[list[jax.Array]] = [[] for _ in range(num_groups)]
    masses: list[list[np.ndarray]] = [[] for _ in range(num_groups)]
    wanted = [max(1, round(per_group * leaf_totals[i] / totals[g])) for i, g in enumerate(groups)]
    leaf_samples: list[Any] = [None] * len(groups)
    for block, members in zip(blocks, layout.members):
        # One strided slice per block; rows whose sample size differs are sliced on their own.
        strides = {_sample_strides(block.shape[1:], wanted[i]) for i in members}
        if len(strides) == 1:
            grid = block[(slice(None),) + tuple(slice(None, None, t) for t in strides.pop())]
            grid = grid.reshape(block.shape[0], -1)
            for row, i in enumerate(members):
                leaf_samples[i] = grid[row]
        else:
            for row, i in enumerate(members):
                t = _sample_strides(block.shape[1:], wanted[i])
                leaf_samples[i] = block[row][tuple(slice(None, None, s) for s in t)].reshape(-1)
    for i, (sample, g) in enumerate(zip(leaf_samples, groups)):
        samples[g].append(sample)
        masses[g].append(np.full(sample.shape[0], leaf_totals[i] / sample.shape[0], np.float32))
    width = max(sum(x.shape[0] for x in group) for group in samples)
    values, mass = [], np.zeros((num_groups, width), np.float32)
    for g in range(num_groups):
        row = samples[g][0] if len(samples[g]) == 1 else jnp.concatenate(samples[g])
        values.append(row if row.shape[0] == width else
                      jnp.pad(row, (0, width - row.shape[0]), constant_values=_FMAX))
        mass[g, : row.shape[0]] = np.concatenate(masses[g])
    values = jnp.stack(values)
    order = np.arange(width)
    # Mass of the sample strictly before each element (ties broken by position), per group.
    before = (values[:, None, :] < values[:, :, None]) | (
        (values[:, None, :] == values[:, :, None]) & (order[None, :] < order[:, None]))
    through = jnp.sum(jnp.where(before, mass[:, None, :], 0.0), axis=2) + mass
    sizes = np.array([sum(x.shape[0] for x in group) for group in samples], np.float32)
    q = k.astype(jnp.float32) / jnp.asarray(totals, jnp.float32)
    margin = 3.0 * jnp.sqrt(q * (1.0 - q) / sizes + 1.0 / sizes**2)

    # Both quantiles in one reduction. A fraction >= 1 takes (nearly) the largest sample: the
    # sample's total mass is the group's total only up to float32 rounding.
    fraction = jnp.stack([q - margin, q + margin])
    target = jnp.minimum(fraction, 1.0 - 1e-4) * jnp.asarray(totals, jnp.float32)
    reached = (through >= target[:, :, None]) & (mass > 0)
    value = jnp.min(jnp.where(reached, values, jnp.inf), axis=2)
    value = jnp.where((fraction > 0) & (value < jnp.inf), value, jnp.nan)
    return value[0], value[1]


def _search(
    blocks: list[jax.Array],
    layout: _Blocks,
    groups: Sequence[int],
    weights: Sequence[Weight],
    k: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, list[jax.Array]]:
    """Per group, keys lo < hi with c(lo) <= k <= c(hi) and c(lo) == k, c(hi) == k, or nothing
    between them to split (hi == succ(lo)); and per leaf, the weight of its scores in [lo, hi)
    (the ties at `from_key(lo)` in the last case).

    c(key) is the weighted count of scores strictly below `from_key(key)`.
    """
    num_groups = k.shape[0]
    groups_arr = np.asarray(groups)
    leaf_totals = [0] * len(groups)
    for block, members, w in zip(blocks, layout.members, layout.weights):
        for i in members:
            leaf_totals[i] = (int(w.array.sum()) if isinstance(w, UnitWeights)
                              else math.prod(block.shape[1:]) * w)
    totals = np.zeros(num_groups, np.int64)
    unit = np.ones(num_groups, np.int32)
    for i, (g, w) in enumerate(zip(groups, weights)):
        totals[g] += leaf_totals[i]
        unit[g] = max(unit[g], _largest(w))
    if totals.max() >= 2**31:
        raise ValueError(f"a group of pruned leaves holds {int(totals.max())} elements; at most "
                         "2**31 - 1 are supported")
    target = k.astype(jnp.float32) + 0.5

    def counts(keys: jax.Array, blocks: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Per group and per leaf."""
        thresholds = layout.per_block(from_key(keys)[groups_arr])
        per_leaf = layout.to_leaves([
            _row_weighted_counts(below(b, _rows(t, b.ndim)) > 0, w) if isinstance(w, UnitWeights)
            else _row_weighted_counts_of_ones(below(b, _rows(t, b.ndim)), w)
            for b, t, w in zip(blocks, thresholds, layout.weights)])
        return _group_sum(per_leaf, groups, num_groups), per_leaf

    def nearest(keys: jax.Array, upward: jax.Array, blocks: list[jax.Array]) -> jax.Array:
        """Largest score below the threshold (or, where `upward`, the smallest at or above)."""
        thresholds = layout.per_block(from_key(keys)[groups_arr])
        ups = layout.per_block(upward[groups_arr])
        per_block = []
        for b, t, up in zip(blocks, thresholds, ups):
            up = _rows(up, b.ndim)
            # One expression feeding the max, so it fuses into the reduction (no temporary).
            take = (below(b, _rows(t, b.ndim)) > 0) != up
            per_block.append(jnp.max(jnp.where(take, jnp.where(up, -b, b), -_FMAX),
                                     axis=_row_axes(b)))
        best = _group_max(layout.to_leaves(per_block), groups, num_groups)
        return jnp.where(upward, -best, best)

    lo = jnp.full((num_groups,), to_key(jnp.float32(-_FMAX)))
    hi = jnp.full((num_groups,), to_key(jnp.float32(jnp.inf)))
    c_lo = jnp.zeros((num_groups,), jnp.int32)
    c_hi = jnp.asarray(totals, jnp.int32)
    unit = jnp.asarray(unit)
    # The first two steps try quantiles of a small sample: most times a tight bracket.
    sample_lo, sample_hi = _sample_bracket(blocks, layout, groups, weights, k, totals, leaf_totals)
    queue = jnp.stack([to_key(sample_lo), to_key(sample_hi)], axis=1)
    queued = jnp.stack([~jnp.isnan(sample_lo), ~jnp.isnan(sample_hi)], axis=1)

    def done(lo, hi, c_lo, c_hi):
        return (c_lo == k) | (c_hi == k) | (hi <= succ(lo))

    def cond(state):
        step, lo, hi, c_lo, c_hi = state[:5]
        return (step < _MAX_STEPS) & ~all_of(done(lo, hi, c_lo, c_hi))

    def body(state):
        (step, lo, hi, c_lo, c_hi, f_lo, f_hi, side, nxt, has_nxt, ref_width, since, leaf_lo,
         leaf_hi, scores) = state
        active = ~done(lo, hi, c_lo, c_hi)
        width = hi - lo
        frac = jnp.clip(-f_lo / (f_hi - f_lo), 0.0, 1.0)
        v_lo, v_hi = from_key(lo), from_key(hi)
        span = v_hi - v_lo
        by_value = to_key(v_lo + span * frac)
        by_key = lo + (width.astype(jnp.float32) * frac).astype(jnp.uint32)
        guess = jnp.where(jnp.isfinite(span) & (span < 1e30), by_value, by_key)
        # Interpolation that has not halved the bracket in three steps gives way to bisection.
        guess = jnp.where(since >= 3, lo + width // 2, guess)
        slot = jnp.minimum(step, 1)
        sampled = queue[:, slot]
        guess = jnp.where((step < 2) & queued[:, slot] & (sampled > lo) & (sampled < hi),
                          sampled, guess)
        cand = jnp.clip(jnp.where(has_nxt, nxt, guess), lo + 1, jnp.maximum(hi, lo + 2) - 1)
        cand = _normal_candidate(cand, lo)
        c, per_leaf = counts(cand, scores)
        up = active & (c <= k)
        down = active & (c > k)
        leaf_lo = jnp.where(up[groups_arr], per_leaf, leaf_lo)
        leaf_hi = jnp.where(down[groups_arr], per_leaf, leaf_hi)
        f_c = c.astype(jnp.float32) - target
        # Illinois: an end kept twice in a row counts half, so the interpolation moves it.
        f_hi = jnp.where(down, f_c, jnp.where(up & (side < 0), f_hi * 0.5, f_hi))
        f_lo = jnp.where(up, f_c, jnp.where(down & (side > 0), f_lo * 0.5, f_lo))
        side = jnp.where(up, -1, jnp.where(down, 1, side))
        lo, c_lo = jnp.where(up, cand, lo), jnp.where(up, c, c_lo)
        hi, c_hi = jnp.where(down, cand, hi), jnp.where(down, c, c_hi)
        # One element off, the nearest score pins the exact threshold (or a tie) next step. A
        # bracket that stopped shrinking closes onto the nearest score: on discrete or tied
        # scores, interpolation between thresholds that count alike gets nowhere.
        open_ = active & ~done(lo, hi, c_lo, c_hi)
        off_by_one = open_ & (unit == 1) & ((c == k + 1) | (c == k - 1))
        snap = off_by_one | (open_ & (since >= 2))
        upward = c < k

        def snapped(args):
            lo, hi = args
            value_key = to_key(nearest(cand, upward, scores))
            lo = jnp.where(snap & upward, value_key, lo)
            hi = jnp.where(snap & ~upward, succ(value_key), hi)
            return lo, hi, jnp.where(upward, succ(value_key), value_key)

        # Snapping moves an end onto the nearest score: no score lies between, so the counts
        # at the ends (per group and per leaf) stay as they are.
        lo, hi, nxt = lax.cond(any_of(snap), snapped, lambda a: (*a, cand), (lo, hi))
        new_width = hi - lo
        halved = new_width <= ref_width // 2
        ref_width = jnp.where(halved, new_width, ref_width)
        since = jnp.where(halved | snap, 0, since + 1)
        return (step + 1, lo, hi, c_lo, c_hi, f_lo, f_hi, side, nxt, off_by_one, ref_width, since,
                leaf_lo, leaf_hi, lax.optimization_barrier(scores))

    zeros_i = jnp.zeros((num_groups,), jnp.int32)
    state = (
        jnp.int32(0), lo, hi, c_lo, c_hi,
        c_lo.astype(jnp.float32) - target, c_hi.astype(jnp.float32) - target,
        zeros_i, lo, jnp.zeros((num_groups,), bool), hi - lo, zeros_i,
        jnp.zeros((len(groups),), jnp.int32),
        jnp.asarray(leaf_totals, jnp.int32),
        blocks,
    )
    # The scores ride in the loop state and come back out (the barrier keeps XLA from seeing
    # through): passed as loop constants and read again afterwards, they would be copied.
    _, lo, hi, c_lo, c_hi, *_, leaf_lo, leaf_hi, blocks = lax.while_loop(cond, body, state)
    return lo, hi, c_lo, c_hi, leaf_hi - leaf_lo, blocks


def _tie_cutoffs(
    blocks: list[jax.Array],
    layout: _Blocks,
    groups: Sequence[int],
    tie_value: jax.Array,
    need: jax.Array,
    tie_counts: jax.Array,
) -> list[jax.Array]:
    """Per leaf (one `(n,)` vector per block), the index j such that the ties (score ==
    tie_value of its group) at positions below j are the first ties of the group in (leaf,
    position) order whose weight is nearest `need` (exactly `need` ties when unweighted).
    `tie_counts` holds each leaf's (weighted) number of ties, which the search counted on its
    way."""
    groups_arr = np.asarray(groups)
    # Ties left for each leaf after the earlier leaves of its group took theirs.
    before = []
    running: dict[int, jax.Array] = {}
    for i, g in enumerate(groups):
        before.append(running.get(g, jnp.int32(0)))
        running[g] = before[-1] + tie_counts[i]
    wanted = jnp.clip(need[groups_arr] - jnp.stack(before), 0, tie_counts)
    values = layout.per_block(tie_value[groups_arr])
    out = []
    for block, w, value, want, count in zip(blocks, layout.weights, values,
                                            layout.per_block(wanted), layout.per_block(tie_counts)):
        size = math.prod(block.shape[1:])
        tie = block == _rows(value, block.ndim)
        # A leaf takes none or all of its ties, except at most one per group, which takes its
        # first `want`: only blocks holding such a leaf pay for the search on positions (by
        # counting, so it shards like the leaf; a running sum would gather it).
        splits = (want > 0) & (want < count)
        all_or_none = jnp.where(want > 0, jnp.int32(size), jnp.int32(0))

        def split(tie, w=w, want=want, size=size):
            index = flat_index(tie.shape[1:])[None]

            def body(_, bounds):
                lo, hi = bounds
                mid = (lo + hi) // 2
                enough = _row_weighted_counts(tie & (index < _rows(mid, tie.ndim)), w) >= want
                return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

            steps = int(math.ceil(math.log2(size + 1))) + 1
            rows = tie.shape[0]
            end = lax.fori_loop(0, steps, body, (jnp.zeros((rows,), jnp.int32),
                                                 jnp.full((rows,), size, jnp.int32)))[1]
            if not isinstance(w, UnitWeights) and w == 1:
                return end
            # The tie at end - 1 crosses `want`: leave it out when that lands nearer.
            over = _row_weighted_counts(tie & (index < _rows(end, tie.ndim)), w)
            last = _row_weighted_counts(
                jnp.broadcast_to(index == _rows(end - 1, tie.ndim), tie.shape), w)
            return jnp.where(over - want < want - (over - last), end, end - 1)

        cut = lax.cond(any_of(splits), split, lambda tie: all_or_none, tie)
        out.append(jnp.where(splits, cut, all_or_none))
    return out


def lowest_k(
    scores: Sequence[jax.Array],
    k: jax.Array,
    *,
    groups: Sequence[int] | None = None,
    weights: Sequence[jax.typing.ArrayLike] | None = None,
) -> list[jax.Array]:
    """Marks the k lowest scores of each group of leaves (True = among the lowest).

    Scores rank by (score, leaf, position): ties at the threshold are split by position.

    Args:
      scores: arrays (any shapes); NaN counts as the lowest score.
      k: int array of shape (num_groups,): how many elements (weighted) each group marks.
      groups: the group of each leaf (default: one group per leaf).
      weights: elements each score stands for, per leaf: an int, or a concrete int array of
        the leaf's shape (default 1). Unweighted groups mark exactly k elements; weighted ones
        the shortest prefix of that order whose weight is nearest k (the shorter on a draw).

    Returns:
      One bool array per leaf.
    """
    groups = tuple(range(len(scores))) if groups is None else tuple(int(g) for g in groups)
    weights = (1,) * len(scores) if weights is None else tuple(
        _as_weight(w, s) for w, s in zip(weights, scores))
    # Jitted as a whole: called eagerly, its many small operations would each dispatch alone.
    return _lowest_k(list(scores), jnp.asarray(k, jnp.int32), groups, weights)


def _as_weight(weights: jax.typing.ArrayLike, scores: jax.Array) -> Weight:
    array = np.broadcast_to(np.asarray(weights, np.int64), np.shape(scores))
    if array.size and np.all(array == array.flat[0]):
        return int(array.flat[0])
    return UnitWeights(array)


# One search serves every group at once (its control logic is vectorized over groups), which
# keeps the compiled program small however many leaves are pruned separately.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _lowest_k(
    scores: list[jax.Array], k: jax.Array, groups: tuple[int, ...], weights: tuple[Weight, ...]
) -> list[jax.Array]:
    layout = _Blocks([tuple(s.shape) for s in scores], weights)
    blocks = layout.stack([sanitize(s) for s in scores])
    lo_key, hi_key, c_lo, c_hi, between, blocks = _search(blocks, layout, groups, weights, k)
    groups_arr = np.asarray(groups)
    at_hi = c_hi == k
    threshold = jnp.where(at_hi, from_key(hi_key), from_key(lo_key))
    thresholds = layout.per_block(threshold[groups_arr])
    marked = [below(b, _rows(t, b.ndim)) > 0 for b, t in zip(blocks, thresholds)]
    # Groups whose k-th and (k+1)-th scores are equal: first ties by position.
    need = jnp.where(at_hi | (c_lo == k), 0, k - c_lo)
    tie_value = from_key(lo_key)

    def split_ties(marked):
        cutoffs = _tie_cutoffs(blocks, layout, groups, tie_value, need, between)
        values = layout.per_block(tie_value[groups_arr])
        return [
            m | ((b == _rows(v, b.ndim)) & (flat_index(b.shape[1:])[None] < _rows(j, b.ndim)))
            for m, b, v, j in zip(marked, blocks, values, cutoffs)
        ]

    return layout.unstack(lax.cond(any_of(need > 0), split_ties, lambda m: m, marked))
