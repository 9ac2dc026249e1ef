"""Exact selection by counting: masks, granularities and distributions."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcomp.sparsity as sp
from jaxcomp.sparsity._select import TINY, lowest_k

# lowest_k is jitted inside: calling it directly reuses one compiled search per leaf shapes.
def _lowest_one(x, k):
    return lowest_k([x], k[None])[0]


def _lowest_group(xs, k):
    return lowest_k(xs, k[None], groups=[0] * len(xs))

_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, np.inf, -np.inf, np.nan]),
)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (48,), elements=_values), st.integers(0, 48))
def test_lowest_k_marks_exactly_k_lowest(x, k):
    """Exactly k elements are marked, none scoring above an unmarked one (NaN is lowest; scores
    below TINY in magnitude tie with zero, as documented in `sanitize`)."""
    marked = np.asarray(_lowest_one(jnp.asarray(x), jnp.int32(k)))
    assert marked.sum() == k
    ordered = np.where(np.isnan(x), -np.inf, np.where(np.abs(x) < TINY, 0.0, x))
    if 0 < k < x.size:
        assert ordered[marked].max() <= ordered[~marked].min()


def _tied_scores(kind, rng):
    shape = (40, 100)
    if kind == "mostly_zero":  # magnitudes of an already pruned layer
        return np.where(rng.random(shape) < 0.8, 0.0, np.abs(rng.normal(size=shape)))
    if kind == "two_values":
        return rng.integers(0, 2, shape) * 3.0
    if kind == "quantized":
        return np.round(np.abs(rng.normal(size=shape)) * 20)
    if kind == "powers_of_two":
        return 2.0 ** rng.integers(-60, 60, shape)
    return np.abs(rng.normal(size=shape)) * 1e-28  # "below_tiny": all tie with zero


@pytest.mark.parametrize("kind", ["mostly_zero", "two_values", "quantized", "powers_of_two",
                                  "below_tiny"])
def test_lowest_k_is_exact_on_tied_and_discrete_scores(kind):
    """Ties at the threshold (one value, or zero and the scores that tie with it) are split by
    position, so the count is exact for every k; the search closes onto the data values."""
    x = _tied_scores(kind, np.random.default_rng(0)).astype(np.float32)
    ordered = np.where(np.abs(x) < TINY, 0.0, x).ravel()
    for k in [1, 4, 400, 2000, 3600, 3996, 3999]:
        marked = np.asarray(_lowest_one(jnp.asarray(x), jnp.int32(k))).ravel()
        assert marked.sum() == k
        assert ordered[marked].max() <= ordered[~marked].min()
        # Among the tied scores at the threshold, the first positions are taken.
        tie = ordered == ordered[marked].max()
        assert not np.any(~marked[tie][:-1] & marked[tie][1:])


def test_lowest_k_breaks_ties_by_position():
    """Among equal scores the earlier positions are marked first."""
    marked = _lowest_one(jnp.zeros(48), jnp.int32(5))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(marked)), np.arange(5))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 60))
def test_lowest_k_across_a_group_of_leaves(seed, k):
    """A shared group is cut at the global k-th score across differently shaped leaves."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=s).astype(np.float32) for s in [(4, 5), (7,), (3, 1, 11)]]
    marked = _lowest_group([jnp.asarray(x) for x in xs], jnp.int32(k))
    assert sum(int(m.sum()) for m in marked) == k
    flat = np.concatenate([x.ravel() for x in xs])
    threshold = np.sort(flat)[k - 1] if k else -np.inf
    for x, m in zip(xs, marked):
        assert np.all(x[np.asarray(m)] <= threshold)


def test_unstructured_mask_traced_sparsity_is_exact():
    """Under jit with a traced sparsity the mask prunes round(s * n) weights."""
    scores = jax.random.normal(jax.random.key(0), (48,))
    f = jax.jit(sp.unstructured_mask)
    for s in (0.0, 0.25, 0.5, 0.9):
        assert int((~f(scores, s)).sum()) == round(s * scores.size)
        assert int((~sp.unstructured_mask(scores, s)).sum()) == round(s * scores.size)


def test_global_threshold_matches_sorted_threshold():
    """The global threshold keeps the same weights as sorting all scores would."""
    rng = np.random.default_rng(1)
    scores = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=(7,)),
              "c": rng.normal(size=(3, 1, 11)), "d": None}
    scores = jax.tree.map(lambda x: jnp.asarray(np.abs(x), jnp.float32), scores)
    masks = sp.global_threshold_masks(scores, 0.7)
    flat = np.concatenate([np.asarray(scores[n]).ravel() for n in "abc"])
    cut = np.sort(flat)[round(0.7 * flat.size) - 1]
    for name in "abc":
        np.testing.assert_array_equal(np.asarray(masks[name]), np.asarray(scores[name]) > cut)
    assert masks["d"] is None


@pytest.mark.parametrize("length", [8, 10, 7])
def test_nm_keeps_n_of_every_m_with_a_short_last_group(length):
    """2:4 keeps 2 per full group; a last group of r < 4 keeps min(2, r), the top scores."""
    scores = jax.random.normal(jax.random.key(length), (length, 3))
    keep = np.asarray(sp.nm_mask(scores, 2, 4, axis=0))
    for start in range(0, length, 4):
        group = keep[start:start + 4]
        assert np.all(group.sum(axis=0) == min(2, group.shape[0]))
        values = np.asarray(scores)[start:start + 4]
        for col in range(3):
            kept, dropped = values[group[:, col], col], values[~group[:, col], col]
            if dropped.size:
                assert kept.min() >= dropped.max()


def test_block_mask_prunes_whole_blocks_including_edges():
    """Blocks are kept or pruned whole; clipped edge blocks pool only what they hold."""
    scores = jnp.arange(35.0).reshape(5, 7)
    keep = np.asarray(sp.block_mask(scores, 0.5, (2, 3)))
    blocks = [keep[r:r + 2, c:c + 3] for r in range(0, 5, 2) for c in range(0, 7, 3)]
    assert all(b.all() or not b.any() for b in blocks)
    assert sum(not b.any() for b in blocks) == round(0.5 * len(blocks))
    assert not keep[0, 0] and keep[4, 6]


def test_block_max_pooling_keeps_blocks_with_one_large_score():
    """Max pooling scores a block by its largest weight."""
    scores = jnp.zeros((6, 9)).at[0, 0].set(10.0).at[2, 3].set(1.0)
    keep = np.asarray(sp.block_mask(scores, 4 / 9, (2, 3), pool_by="max"))
    assert keep[:2, :3].all() and keep[2:4, 3:6].all() and not keep[:2, 3:].any()


def test_channel_mask_prunes_whole_columns_and_rows():
    """Channel masks prune whole slices along the chosen axis."""
    scores = jnp.array([[1.0, 5.0, 2.0], [1.0, 5.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(sp.channel_mask(scores, 0.34)),
                                  [[False, True, True]] * 2)
    rows = np.asarray(sp.channel_mask(scores.T, 0.34, axis=0))
    np.testing.assert_array_equal(rows[:, 0], [False, True, True])


def test_erk_gives_denser_small_layers_and_matches_total():
    """ERK: smaller/thinner layers are denser and the size-weighted sparsity is the target."""
    shapes = {"big": (256, 256), "thin": (256, 10), "tiny": (3, 3, 1, 4)}
    out = sp.erk_sparsities(shapes, 0.9)
    sizes = {p: np.prod(s) for p, s in shapes.items()}
    total = sum(out[p] * sizes[p] for p in shapes) / sum(sizes.values())
    assert abs(total - 0.9) < 1e-4
    assert out["big"] > out["thin"] > out["tiny"]
    assert out["tiny"] >= 0.0


def test_erk_makes_layers_dense_when_needed():
    """A layer whose ERK density would exceed 1 is dense and the rest absorb the budget."""
    out = sp.erk_sparsities({"big": (1000, 1000), "small": (2, 2)}, 0.5)
    assert out["small"] == 0.0
    assert abs(out["big"] - (0.5 * 1_000_004) / 1_000_000) < 1e-4


@pytest.mark.parametrize(
    "call",
    [
        lambda: sp.unstructured_mask(jnp.ones(4), 1.0),
        lambda: sp.unstructured_mask(jnp.ones(4), -0.1),
        lambda: sp.global_threshold_masks({"a": jnp.ones(3)}, 1.5),
        lambda: sp.NM(n=5, m=4),
        lambda: sp.NM(n=0, m=4),
        lambda: sp.block_mask(jnp.ones((3, 3)), 0.5, (4, 1)),
        lambda: sp.Block((0, 2)),
        lambda: sp.Channel(pool_by="median"),
        lambda: sp.nm_mask(jnp.ones((4,)), 2, 4, axis=-2),
        lambda: sp.erk_sparsities({"a": (2, 2)}, 1.0),
        lambda: sp.ERK(power=-1.0),
    ],
)
def test_bad_selection_arguments_raise_value_error(call):
    """Sparsity outside [0, 1), N > M, oversized blocks, bad axes raise ValueError."""
    with pytest.raises(ValueError):
        call()


def test_ties_across_the_leaves_of_a_group_are_taken_in_leaf_then_position_order():
    """With many ties, a group marks exactly the k first of a stable sort over all its leaves."""
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 3, size=shape).astype(np.float32) for shape in [(3, 5), (7,), (2, 4)]]
    flat = np.concatenate([x.ravel() for x in xs])
    order = np.argsort(flat, kind="stable")
    for k in (0, 1, 6, 13, 20, flat.size):
        out = lowest_k([jnp.asarray(x) for x in xs], jnp.asarray([k]), groups=[0, 0, 0])
        expected = np.zeros(flat.size, bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(np.concatenate([np.asarray(o).ravel() for o in out]),
                                      expected, err_msg=f"k={k}")


@pytest.mark.parametrize("scores, k, expected", [
    ([1., 2., 3.], 6, [True, True, False]),     # weights 4, 5, 9 so far: 5 is nearest 6
    ([1., 2., 3.], 8, [True, True, True]),      # 9 is nearest 8
    ([1., 2., 3.], 7, [True, True, False]),     # a draw goes to the shorter prefix
    ([1., 1., 1.], 6, [True, True, False]),     # ties split by position, by weight
    ([2., 1., 1.], 4, [False, True, True]),     # 1 then 5: 5 is nearest 4
])
def test_weighted_lowest_k_marks_the_prefix_nearest_k(scores, k, expected):
    """Per-element weights: the prefix of (score, position) order whose weight is nearest k."""
    marked = lowest_k([jnp.array(scores)], jnp.array([k]), weights=[np.array([4, 1, 4])])
    np.testing.assert_array_equal(marked[0], expected)


def _reference_lowest_k(xs, ks, groups, weights):
    """Brute force: per group, the prefix of the stable (score, leaf, position) order whose
    weight is nearest k, the shorter on a draw (NaN lowest)."""
    out = [np.zeros(x.size, bool) for x in xs]
    for g, k in enumerate(ks):
        items = []
        for i, (x, w) in enumerate(zip(xs, weights)):
            if groups[i] == g:
                w = np.broadcast_to(np.asarray(w), x.shape).ravel()
                items += [(-np.inf if np.isnan(v) else v, i, p, w[p])
                          for p, v in enumerate(x.ravel())]
        items.sort(key=lambda item: item[:3])
        reached = np.concatenate([[0], np.cumsum([item[3] for item in items])])
        for _, i, p, _ in items[: int(np.argmin(np.abs(reached - k)))]:
            out[i][p] = True
    return [o.reshape(x.shape) for o, x in zip(out, xs)]


@pytest.mark.parametrize("seed", range(6))
def test_lowest_k_matches_a_brute_force_reference(seed):
    """Random groups, per-leaf and per-element weights, ties and NaN: the same marks as sorting."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(1, 6, size=rng.integers(1, 3))) for _ in range(4)]
    xs = [rng.integers(0, 4, size=s).astype(np.float32) if seed % 2 else
          rng.normal(size=s).astype(np.float32) for s in shapes]
    xs[0].ravel()[0] = np.nan
    groups = [0, 1, 0, 1]
    weights = [rng.integers(1, 4, size=shapes[0]), 2, 1, 3]
    totals = [sum(np.broadcast_to(np.asarray(w), x.shape).sum()
                  for x, w, g in zip(xs, weights, groups) if g == group) for group in (0, 1)]
    for ks in ([int(rng.integers(0, t + 1)) for t in totals], [1, totals[1] - 1]):
        got = lowest_k([jnp.asarray(x) for x in xs], jnp.asarray(ks), groups=groups,
                       weights=weights)
        for a, b in zip(got, _reference_lowest_k(xs, ks, groups, weights)):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"ks={ks}")


def test_uniform_weights_above_one_take_the_tie_prefix_nearest_k():
    """Ties of a leaf whose units each stand for 3 elements: k=1 takes none (0 is nearer than
    3), k=5 stops at 4 (not 7). Regression: only per-element weights used the nearest rule."""
    xs = [jnp.array([0.5, -1.0]), jnp.array([[0.2], [0.9]])]
    for k, expected in [(1, [[0, 0], [0, 0]]), (5, [[0, 1], [1, 0]])]:
        got = lowest_k(xs, jnp.array([k]), groups=[0, 0], weights=[3, 1])
        assert [np.asarray(g).ravel().astype(int).tolist() for g in got] == expected


def test_global_threshold_keeps_each_leafs_best_next_to_infinite_scores():
    """Another leaf's +inf scores do not tie with the unit each leaf keeps (regression: leaf
    `a` lost its best score 5.0 to the tie and was emptied)."""
    got = sp.global_threshold_masks({"a": jnp.array([5., 1.]), "b": jnp.array([np.inf] * 2)}, 0.5)
    assert np.asarray(got["a"]).tolist() == [True, False]
    assert np.asarray(got["b"]).tolist() == [True, False]
    params = {"a": {"kernel": jnp.array([5., 1.])}, "b": {"kernel": jnp.array([np.inf, -np.inf])}}
    masks = sp.compute_masks(params, sp.Pruner(sparsity=0.5, distribution=sp.GlobalThreshold()))
    assert np.asarray(masks["a"]["kernel"]).tolist() == [True, False]


def test_global_threshold_takes_integer_scores():
    """Integer scores (regression: OverflowError writing inf into an int array)."""
    got = sp.global_threshold_masks({"a": jnp.array([1, 5, 3]), "b": jnp.array([2, 4])}, 0.4)
    assert np.asarray(got["a"]).tolist() == [False, True, True]
    assert np.asarray(got["b"]).tolist() == [False, True]


def test_the_unit_a_leaf_keeps_is_its_first_among_scores_that_tie_with_zero():
    """Scores below TINY tie with 0, also when choosing the unit each leaf keeps."""
    got = sp.global_threshold_masks({"a": jnp.array([0., 1e-31]), "b": jnp.array([5., 6.])}, 0.5)
    assert np.asarray(got["a"]).tolist() == [True, False]
    assert np.asarray(got["b"]).tolist() == [False, True]


@pytest.mark.parametrize("seed", range(4))
def test_leaves_of_one_shape_searched_as_one_block_match_the_reference(seed):
    """Leaves of equal shape and weight are stacked into one block on a single device: groups
    that mix blocks, interleaved leaf order, per-element weights, ties across leaves and NaN
    give the same marks as sorting, in (leaf, position) order."""
    rng = np.random.default_rng(100 + seed)
    shapes = [(3, 4), (5,), (3, 4), (3, 4), (5,), (2, 2, 2), (3, 4)]
    xs = [rng.integers(0, 3, size=s).astype(np.float32) if seed % 2 else
          rng.normal(size=s).astype(np.float32) for s in shapes]
    xs[2].ravel()[3] = np.nan
    for groups, weights in (([0, 1, 2, 3, 4, 5, 6], [1] * 7),
                            ([0, 0, 1, 0, 1, 1, 0], [1, 2, 1, 1, 2, rng.integers(1, 4, (2, 2, 2)), 1]),
                            ([0] * 7, [2, 1, 2, 2, 1, 1, 3])):
        totals = [sum(np.broadcast_to(np.asarray(w), x.shape).sum()
                      for x, w, g in zip(xs, weights, groups) if g == group)
                  for group in range(max(groups) + 1)]
        for ks in ([int(rng.integers(0, t + 1)) for t in totals], [t // 2 for t in totals]):
            got = lowest_k([jnp.asarray(x) for x in xs], jnp.asarray(ks), groups=groups,
                           weights=weights)
            for a, b in zip(got, _reference_lowest_k(xs, ks, groups, weights)):
                np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{groups} ks={ks}")
