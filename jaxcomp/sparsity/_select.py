"""Exact "prune the k lowest scores" without sorting: a search on the threshold by counting.

Every mask in `jaxcomp.sparsity` comes from here. Sorting a parameter (or concatenating all of
them for a global threshold) costs O(n log n) time, a copy of every score and, on a mesh, a
gather of the whole array onto one device. Instead the threshold is searched: each step counts
the scores below a candidate threshold, which is one fused, memory-light reduction that XLA
partitions like any sum. Candidates come from interpolating the empirical CDF between the
bracket's ends; when the bracket stops shrinking, its ends close onto the nearest scores (one
max-reduction) and bisection in the bits of the float takes over. A smooth score distribution
needs about ten passes, tied or discrete scores (already pruned zeros, quantized weights) about
as many, and any input at most about 64.

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


def count_below(x: jax.Array, t: jax.Array) -> jax.Array:
    """Number of elements of `x` strictly below `t`, as an exact int32."""
    return _exact_sum(below(x, t))


def count_true(mask: jax.Array) -> jax.Array:
    """Number of True elements of `mask`, as an exact int32."""
    return _exact_sum(jnp.where(mask, 1.0, 0.0))


def _exact_sum(ones: jax.Array) -> jax.Array:
    """Exact int32 sum of an array of float32 zeros and ones.

    Summed in float32, which XLA fuses with the expression producing `ones` (an integer sum
    materializes the converted array first); partial sums stay below 2**24, where float32 counts
    exactly.
    """
    if ones.size < _EXACT_F32:
        return jnp.sum(ones).astype(jnp.int32)
    inner, axis = 1, ones.ndim
    while axis > 0 and inner * ones.shape[axis - 1] < _EXACT_F32:
        axis -= 1
        inner *= ones.shape[axis]
    if axis == ones.ndim:  # one axis alone holds 2**24 elements: count in integers
        return jnp.sum(ones.astype(jnp.int32))
    partial = jnp.sum(ones, axis=tuple(range(axis, ones.ndim))).astype(jnp.int32)
    return jnp.sum(partial)


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


def _total(s: jax.Array, w: Weight) -> int:
    return int(w.array.sum()) if isinstance(w, UnitWeights) else s.size * w


def _largest(w: Weight) -> int:
    return int(w.array.max(initial=1)) if isinstance(w, UnitWeights) else w


def _weighted_count(marked: jax.Array, w: Weight) -> jax.Array:
    """Total weight of the marked elements, as an exact int32."""
    if isinstance(w, UnitWeights):
        return jnp.sum(jnp.where(marked, jnp.asarray(w.array), 0))
    return count_true(marked) * w


def _one_per_group(groups: Sequence[int], num_groups: int) -> bool:
    return tuple(groups) == tuple(range(num_groups))


# With one leaf per group (the common case) the per-group values are the per-leaf ones: a
# stack, not a product with a one-hot constant or a scatter. Every constant and every reducer
# computation is a buffer that XLA's CPU runtime sets up on each call of the program, even
# where the search sits in a branch that does not run.
def _group_sum(per_leaf: list[jax.Array], groups: Sequence[int], num_groups: int) -> jax.Array:
    if _one_per_group(groups, num_groups):
        return jnp.stack(per_leaf)
    onehot = np.zeros((len(per_leaf), num_groups), per_leaf[0].dtype)
    onehot[np.arange(len(per_leaf)), np.asarray(groups)] = 1
    return jnp.stack(per_leaf) @ jnp.asarray(onehot)


def _group_max(per_leaf: list[jax.Array], groups: Sequence[int], num_groups: int) -> jax.Array:
    if _one_per_group(groups, num_groups):
        return jnp.stack(per_leaf).astype(jnp.float32)
    out = jnp.full((num_groups,), -jnp.inf, jnp.float32)
    return out.at[np.asarray(groups)].max(jnp.stack(per_leaf))


def _sample(x: jax.Array, size: int) -> jax.Array:
    """About `size` elements of `x` on a regular grid (strided slices shard like `x`)."""
    step = x.size / max(size, 1)
    strides = [1] * x.ndim
    for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
        if step <= 1:
            break
        strides[axis] = max(1, min(x.shape[axis], int(step)))
        step /= strides[axis]
    return x[tuple(slice(None, None, s) for s in strides)].reshape(-1)


def _sample_bracket(
    scores: list[jax.Array],
    groups: Sequence[int],
    weights: Sequence[Weight],
    k: jax.Array,
    totals: np.ndarray,
) -> tuple[jax.Array, jax.Array]:
    """Per group, two thresholds that likely bracket the k-th score: quantiles of a small
    regular sample at k/total -+ 3 standard errors (NaN where the quantile falls outside).

    Sample ranks come from all pairwise comparisons, not a sort: XLA's CPU sort is slower than
    a few hundred thousand vectorized comparisons.
    """
    num_groups = len(totals)
    per_group = int(np.clip(_SAMPLE // num_groups, _MIN_SAMPLE, _SAMPLE))
    samples: list[list[jax.Array]] = [[] for _ in range(num_groups)]
    masses: list[list[np.ndarray]] = [[] for _ in range(num_groups)]
    for s, g, w in zip(scores, groups, weights):
        sample = _sample(s, max(1, round(per_group * _total(s, w) / totals[g])))
        samples[g].append(sample)
        masses[g].append(np.full(sample.shape[0], _total(s, w) / sample.shape[0], np.float32))
    width = max(sum(x.shape[0] for x in group) for group in samples)
    values, mass = [], np.zeros((num_groups, width), np.float32)
    for g in range(num_groups):
        row = jnp.concatenate(samples[g])
        values.append(jnp.pad(row, (0, width - row.shape[0]), constant_values=_FMAX))
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
    scores: list[jax.Array],
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
    totals = np.zeros(num_groups, np.int64)
    unit = np.ones(num_groups, np.int32)
    for s, g, w in zip(scores, groups, weights):
        totals[g] += _total(s, w)
        unit[g] = max(unit[g], _largest(w))
    if totals.max() >= 2**31:
        raise ValueError(f"a group of pruned leaves holds {int(totals.max())} elements; at most "
                         "2**31 - 1 are supported")
    target = k.astype(jnp.float32) + 0.5

    def counts(keys: jax.Array, scores: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Per group and per leaf."""
        thresholds = from_key(keys)[groups_arr]
        per_leaf = [count_below(s, thresholds[i]) if w == 1
                    else _weighted_count(below(s, thresholds[i]) > 0, w)
                    for i, (s, w) in enumerate(zip(scores, weights))]
        return _group_sum(per_leaf, groups, num_groups), jnp.stack(per_leaf)

    def nearest(keys: jax.Array, upward: jax.Array, scores: list[jax.Array]) -> jax.Array:
        """Largest score below the threshold (or, where `upward`, the smallest at or above)."""
        thresholds = from_key(keys)[groups_arr]
        up = upward[groups_arr]
        per_leaf = []
        for i, s in enumerate(scores):
            # One expression feeding the max, so it fuses into the reduction (no temporary).
            take = (below(s, thresholds[i]) > 0) != up[i]
            per_leaf.append(jnp.max(jnp.where(take, jnp.where(up[i], -s, s), -_FMAX)))
        best = _group_max(per_leaf, groups, num_groups)
        return jnp.where(upward, -best, best)

    lo = jnp.full((num_groups,), to_key(jnp.float32(-_FMAX)))
    hi = jnp.full((num_groups,), to_key(jnp.float32(jnp.inf)))
    c_lo = jnp.zeros((num_groups,), jnp.int32)
    c_hi = jnp.asarray(totals, jnp.int32)
    unit = jnp.asarray(unit)
    # The first two steps try quantiles of a small sample: most times a tight bracket.
    sample_lo, sample_hi = _sample_bracket(scores, groups, weights, k, totals)
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
        jnp.zeros((len(scores),), jnp.int32),
        jnp.asarray([_total(s, w) for s, w in zip(scores, weights)], jnp.int32),
        scores,
    )
    # The scores ride in the loop state and come back out (the barrier keeps XLA from seeing
    # through): passed as loop constants and read again afterwards, they would be copied.
    _, lo, hi, c_lo, c_hi, *_, leaf_lo, leaf_hi, scores = lax.while_loop(cond, body, state)
    return lo, hi, c_lo, c_hi, leaf_hi - leaf_lo, scores


def _tie_cutoffs(
    scores: list[jax.Array],
    groups: Sequence[int],
    weights: Sequence[Weight],
    tie_value: jax.Array,
    need: jax.Array,
    tie_counts: jax.Array,
) -> list[jax.Array]:
    """Per leaf, the index j such that the ties (score == tie_value of its group) at positions
    below j are the first ties of the group in (leaf, position) order whose weight is nearest
    `need` (exactly `need` ties when unweighted). `tie_counts` holds each leaf's (weighted)
    number of ties, which the search counted on its way."""
    groups_arr = np.asarray(groups)
    ties = [s == tie_value[g] for s, g in zip(scores, groups)]
    tie_counts = [tie_counts[i] for i in range(len(scores))]
    # Ties left for each leaf after the earlier leaves of its group took theirs.
    before = []
    running: dict[int, jax.Array] = {}
    for g, c in zip(groups, tie_counts):
        before.append(running.get(g, jnp.int32(0)))
        running[g] = before[-1] + c
    wanted = [jnp.clip(need[g] - b, 0, c) for g, b, c in zip(groups_arr, before, tie_counts)]

    def cutoff(tie: jax.Array, w: Weight, want: jax.Array, count: jax.Array) -> jax.Array:
        # A leaf takes none or all of its ties, except at most one per group, which takes its
        # first `want`: only that leaf pays for the search on positions (by counting, so it
        # shards like the leaf; a running sum would gather it).
        def split(tie):
            index = flat_index(tie.shape)

            def body(_, bounds):
                lo, hi = bounds
                mid = (lo + hi) // 2
                enough = _weighted_count(tie & (index < mid), w) >= want
                return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

            steps = int(math.ceil(math.log2(tie.size + 1))) + 1
            end = lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(tie.size)))[1]
            if not isinstance(w, UnitWeights) and w == 1:
                return end
            # The tie at end - 1 crosses `want`: leave it out when that lands nearer.
            over = _weighted_count(tie & (index < end), w)
            last = _weighted_count(index == end - 1, w)
            return jnp.where(over - want < want - (over - last), end, end - 1)

        def all_or_none(tie):
            return jnp.where(want > 0, jnp.int32(tie.size), jnp.int32(0))

        return lax.cond((want > 0) & (want < count), split, all_or_none, tie)

    return [cutoff(t, w, want, c) for t, w, want, c in zip(ties, weights, wanted, tie_counts)]


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
    scores = [sanitize(s) for s in scores]
    lo_key, hi_key, c_lo, c_hi, between, scores = _search(scores, groups, weights, k)
    at_hi = c_hi == k
    threshold = jnp.where(at_hi, from_key(hi_key), from_key(lo_key))
    marked = [below(s, threshold[g]) > 0 for s, g in zip(scores, groups)]
    # Groups whose k-th and (k+1)-th scores are equal: first ties by position.
    need = jnp.where(at_hi | (c_lo == k), 0, k - c_lo)
    tie_value = from_key(lo_key)

    def split_ties(marked):
        cutoffs = _tie_cutoffs(scores, groups, weights, tie_value, need, between)
        return [
            m | ((s == tie_value[g]) & (flat_index(s.shape) < j))
            for m, s, g, j in zip(marked, scores, groups, cutoffs)
        ]

    return lax.cond(any_of(need > 0), split_ties, lambda m: m, marked)
