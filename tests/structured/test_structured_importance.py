"""Channel importance (magnitude, BatchNorm scale, Taylor, FPGM, activations), selection and
removal: values by hand, under jit, and bad input."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxcomp.structured import (
    ChannelGroup,
    activation_importance,
    bn_scale_importance,
    channel_groups,
    fpgm_importance,
    kept_count,
    magnitude_importance,
    remove_channels,
    select_channels,
    taylor_importance,
)


def _f(p, x):
    h = jax.nn.relu(x @ p["a"] + p["b"])
    return (h * p["s"]) @ p["c"]


P = {
    "a": jnp.array([[1.0, -2.0, 0.0, 3.0], [1.0, 2.0, 0.0, -1.0]]),
    "b": jnp.array([0.5, 0.0, -1.0, 0.0]),
    "s": jnp.array([1.0, -4.0, 2.0, 0.5]),
    "c": jnp.array([[1.0], [1.0], [2.0], [0.0]]),
}
X = jnp.array([[1.0, 1.0], [2.0, -1.0], [0.0, 1.0]])
GROUPS = channel_groups(_f, P, X)
NAME = "a"


class ImportanceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_magnitude_sums_the_coupled_weight_slices(self):
        """L1 adds |a[:, c]| and |c[c, :]|; L2 is the norm of both (vectors left out)."""
        l1 = self.variant(lambda p: magnitude_importance(p, GROUPS, ord=1))(P)
        l2 = self.variant(lambda p: magnitude_importance(p, GROUPS))(P)
        np.testing.assert_allclose(l1[NAME], [3.0, 5.0, 2.0, 4.0])
        np.testing.assert_allclose(l2[NAME], np.sqrt([3.0, 9.0, 4.0, 10.0]), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_taylor_is_the_squared_sum_of_weight_times_gradient(self):
        """(sum over the channel's parameters of w * dL/dw)^2, by hand."""
        grads = jax.grad(lambda p: _f(p, X).sum())(P)
        scores = self.variant(lambda p, g: taylor_importance(p, g, GROUPS))(P, grads)
        want = []
        for c in range(4):
            total = sum(float(jnp.sum(P[k][..., c] * grads[k][..., c])) for k in ("a", "b", "s"))
            want.append((total + float(jnp.sum(P["c"][c] * grads["c"][c]))) ** 2)
        np.testing.assert_allclose(scores[NAME], want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fpgm_scores_the_filter_nearest_the_others_lowest(self):
        """A filter amid the others (near their geometric median) has the lowest score."""
        p = dict(P, a=jnp.array([[0.0, 1.0, 0.0, 0.4], [0.0, 0.0, 1.0, 0.4]]),
                 c=jnp.zeros((4, 1)))
        scores = self.variant(lambda p: fpgm_importance(p, GROUPS))(p)[NAME]
        assert int(jnp.argmin(scores)) == 3
        np.testing.assert_allclose(scores[0], 2 + np.sqrt(0.32), rtol=1e-5)


def test_bn_scale_reads_the_scales_of_the_group():
    """Network slimming: |gamma| of the member named scale, summed per channel."""
    p = {"a": P["a"], "scale": jnp.array([1.0, -3.0, 0.0, 2.0]), "c": P["c"]}

    def f(p, x):
        return jax.nn.relu((x @ p["a"]) * p["scale"]) @ p["c"]

    groups = channel_groups(f, p, X)
    np.testing.assert_allclose(bn_scale_importance(p, groups)["a"], [1.0, 3.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="selects no member"):
        bn_scale_importance(P, GROUPS)


def test_activation_importance_mean_and_apoz():
    """Mean |activation| of each channel where the next layer reads it; APoZ counts zeros."""
    mean = activation_importance(_f, P, GROUPS, [X, X])[NAME]
    h = jax.nn.relu(X @ P["a"] + P["b"]) * P["s"]
    np.testing.assert_allclose(mean, jnp.abs(h).mean(0), rtol=1e-6)
    apoz = activation_importance(_f, P, GROUPS, iter([X]), kind="apoz")[NAME]
    np.testing.assert_allclose(apoz, (h != 0).mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="same shapes|shapes of the first"):
        activation_importance(_f, P, GROUPS, [X, X[:2]])
    with pytest.raises(ValueError, match="kind"):
        activation_importance(_f, P, GROUPS, [X], kind="median")
    with pytest.raises(ValueError, match="empty"):
        activation_importance(_f, P, GROUPS, [])
    with pytest.raises(ValueError, match=r"empty inputs of shapes \[\(0, 2\)\]"):
        activation_importance(_f, P, GROUPS, [X[:0]])  # a mean over nothing would be NaN
    with pytest.raises(ValueError, match="iterable"):
        activation_importance(_f, P, GROUPS, None)


def test_scores_reject_leaves_of_another_size_than_the_groups():
    """A tree or gradients whose member axis differs from the groups' (regression: clipped
    indices duplicated the last channel) is an error naming path, axis and both sizes."""
    wide = dict(P, a=jnp.ones((2, 6)))
    match = r"leaf 'a' has shape \(2, 6\) \(6 along axis 1\); the groups expect 4"
    for score in (magnitude_importance, fpgm_importance):
        with pytest.raises(ValueError, match=match):
            score(wide, GROUPS)
    with pytest.raises(ValueError, match=match):
        taylor_importance(wide, P, GROUPS)
    with pytest.raises(ValueError, match=r"grads leaf 'c' has shape \(3, 1\)"):
        taylor_importance(P, dict(P, c=jnp.ones((3, 1))), GROUPS)
    with pytest.raises(ValueError, match="ChannelGroups"):
        magnitude_importance(P, None)


def test_magnitude_of_float16_weights_does_not_overflow():
    """|w|**2 is summed in float32: 1000**2 is past float16's range (regression: inf)."""
    p = jax.tree.map(lambda x: (x * 1000).astype(jnp.float16), P)
    scores = magnitude_importance(p, GROUPS)[NAME]
    np.testing.assert_allclose(scores, 1000 * np.sqrt([3.0, 9.0, 4.0, 10.0]), rtol=1e-3)


def test_taylor_needs_gradients_on_the_group_paths():
    """Gradients with other paths (e.g. Linen params without the collection) are an error."""
    with pytest.raises(ValueError, match="share no path"):
        taylor_importance(P, {"x": jnp.ones(3)}, GROUPS)


def test_taylor_leaves_out_groups_it_does_not_read():
    """A group with no selected member (or no gradient) is absent, so `select_channels` keeps it
    whole, as with the other scores; all-zero scores would prune it by position."""

    def f(p, x):
        return jax.nn.relu(jax.nn.relu(x @ p["a"]) @ p["b"]) @ p["c"]

    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
         for k, s in (("a", (4, 6)), ("b", (6, 5)), ("c", (5, 3)))}
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    groups = channel_groups(f, p, x)
    grads = jax.grad(lambda p: (f(p, x) ** 2).sum())(p)
    only_a = taylor_importance(p, grads, groups, where=lambda path, _: path == "a")
    assert set(only_a) == {"a"}
    assert set(taylor_importance(p, {"a": grads["a"]}, groups)) == {"a"}
    keep = select_channels(groups, only_a, ratio=0.4)
    assert set(keep) == {"a"}
    with pytest.raises(ValueError, match="selects no member"):
        taylor_importance(p, grads, groups, where=lambda path, _: False)


def test_importance_works_on_bfloat16_weights():
    """bf16 parameters score in float32 and are cut without changing their dtype."""
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), P)
    scores = magnitude_importance(p, GROUPS, ord=1)
    assert scores[NAME].dtype == jnp.float32
    np.testing.assert_allclose(scores[NAME], [3.0, 5.0, 2.0, 4.0])
    small = remove_channels(p, GROUPS, select_channels(GROUPS, scores, ratio=0.5))
    assert small["a"].dtype == jnp.bfloat16 and small["a"].shape == (2, 2)
    np.testing.assert_array_equal(small["s"], jnp.array([-4.0, 0.5], jnp.bfloat16))


def test_select_keeps_the_highest_scores_per_group():
    """Per group, the lowest-scoring share goes; minimum and rounding apply after."""
    g = ChannelGroup("g", 8, ())
    scores = {"g": jnp.arange(8.0)[::-1]}
    np.testing.assert_array_equal(
        select_channels([g], scores, ratio=0.5)["g"], [1, 1, 1, 1, 0, 0, 0, 0])
    assert select_channels([g], scores, ratio=0.9, min_channels=3)["g"].sum() == 3
    assert select_channels([g], scores, ratio=0.5, round_to=3)["g"].sum() == 6


def test_select_per_group_ratios_by_regex():
    """A mapping gives each group its own ratio; unmatched groups keep everything."""
    groups = [ChannelGroup("conv", 4, ()), ChannelGroup("dense", 4, ()), ChannelGroup("x", 2, ())]
    scores = {g.name: jnp.arange(float(g.size)) for g in groups}
    keep = select_channels(groups, scores, ratio={"conv": 0.5, "d.*": 0.25})
    assert [int(keep[n].sum()) for n in ("conv", "dense", "x")] == [2, 3, 2]
    with pytest.raises(ValueError, match="matches no group"):
        select_channels(groups, scores, ratio={"head": 0.5})


@pytest.mark.parametrize("ratio", [jnp.float32(0.5), np.float32(0.5), jnp.array(0.5)])
def test_select_takes_numpy_and_jax_scalar_ratios(ratio):
    """A 0-d NumPy or JAX ratio is a number like any other; a bool or a vector is not."""
    group = ChannelGroup("g", 4, ())
    scores = {"g": jnp.arange(4.0)}
    assert int(select_channels([group], scores, ratio=ratio)["g"].sum()) == 2
    assert int(select_channels([group], scores, ratio={"g": ratio})["g"].sum()) == 2
    for bad in (jnp.array(True), jnp.array([0.5])):
        with pytest.raises(ValueError, match="ratio must be a number"):
            select_channels([group], scores, ratio=bad)


def test_select_global_compares_normalized_scores_across_groups():
    """Global scope removes the lowest scores wherever they are, after dividing by group means."""
    groups = [ChannelGroup("a", 4, ()), ChannelGroup("b", 4, ())]
    scores = {"a": jnp.array([10.0, 10.0, 10.0, 6.0]), "b": jnp.array([0.9, 1.0, 0.5, 1.6])}
    keep = select_channels(groups, scores, ratio=0.25, scope="global")
    np.testing.assert_array_equal(keep["a"], [1, 1, 1, 0])
    np.testing.assert_array_equal(keep["b"], [1, 1, 0, 1])
    raw = select_channels(groups, scores, ratio=0.25, scope="global", normalize=False)
    assert raw["a"].all()
    np.testing.assert_array_equal(raw["b"], [0, 1, 0, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.5}, "ratio"),
        ({"ratio": "half"}, "ratio"),
        ({"ratio": 0.5, "scope": "layer"}, "scope"),
        ({"ratio": 0.5, "min_channels": 0}, "min_channels"),
        ({"ratio": 0.5, "round_to": 0}, "round_to"),
        ({"ratio": {"g": 0.5}, "scope": "global"}, "one ratio"),
    ],
)
def test_select_rejects_bad_options(kwargs, match):
    """Every option is validated with a message naming it."""
    with pytest.raises(ValueError, match=match):
        select_channels([ChannelGroup("g", 4, ())], {"g": jnp.ones(4)}, **kwargs)


def test_select_rejects_bad_scores():
    """Scores of the wrong shape, NaNs or unknown groups are errors, not silent choices."""
    g = ChannelGroup("g", 4, ())
    for scores, match in [({"g": jnp.ones(3)}, "shape"), ({"g": jnp.array([1.0, jnp.nan, 1, 1])},
                          "non-finite"), ({"h": jnp.ones(4)}, "unknown groups"),
                         ({"g": jnp.ones(4) * 1j}, "must be real"), (None, "must map")]:
        with pytest.raises(ValueError, match=match):
            select_channels([g], scores, ratio=0.5)


def test_remove_rejects_bad_keep_and_stale_trees():
    """Keeping nothing, a wrong mask, an unknown group or an already-cut tree are errors."""
    small = remove_channels(P, GROUPS, {NAME: [0, 1]})
    for keep, match in [({NAME: []}, "keeps no channel"), ({NAME: np.ones(3, bool)}, "mask"),
                        ({"z": [0]}, "unknown groups"), ({NAME: [0, 9]}, "outside"),
                        ({NAME: [1, 0, 1, 0]}, "repeats channel indices .*bool mask"),
                        ({NAME: [2, 2]}, "repeats")]:
        with pytest.raises(ValueError, match=match):
            remove_channels(P, GROUPS, keep)
    with pytest.raises(ValueError, match="already pruned"):
        remove_channels(small, GROUPS, {NAME: [0]})


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    ratio=st.floats(0.0, 0.99),
    min_channels=st.integers(1, 5),
    round_to=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_selection_properties(sizes, ratio, min_channels, round_to, seed):
    """Kept counts follow `kept_count`; kept channels outscore removed ones; global removes
    about `ratio` of all channels and never leaves a group under its minimum."""
    rng = np.random.default_rng(seed)
    groups = [ChannelGroup(f"g{i}", n, ()) for i, n in enumerate(sizes)]
    scores = {g.name: rng.permutation(g.size).astype(float) + 1 for g in groups}
    keep = select_channels(groups, scores, ratio=ratio, min_channels=min_channels,
                           round_to=round_to)
    for g in groups:
        mask = keep[g.name]
        assert mask.sum() == kept_count(g.size, ratio, min_channels=min_channels,
                                        round_to=round_to)
        assert 1 <= mask.sum() <= g.size
        if (~mask).any():
            assert scores[g.name][mask].min() > scores[g.name][~mask].max()
    kept = select_channels(groups, scores, ratio=ratio, scope="global", min_channels=min_channels)
    total = sum(sizes)
    removed = total - sum(int(m.sum()) for m in kept.values())
    assert removed <= int(np.floor(ratio * total + 1e-9))
    for g in groups:
        assert kept[g.name].sum() >= min(min_channels, g.size)


def test_kept_count_rounds_after_the_minimum():
    """min_channels above round_to: the count stays a multiple of round_to (regression: 3)."""
    assert kept_count(7, 0.9, min_channels=3, round_to=2) == 4
    assert kept_count(7, 0.9, min_channels=7, round_to=4) == 7  # capped at the size
    assert kept_count(64, 0.5, min_channels=3, round_to=8) == 32
    assert kept_count(np.int64(8), 0.5, round_to=np.int64(4)) == 4


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 0.5), {}, "size must be an integer >= 1, got 0"),
        ((8.5, 0.5), {}, "size .* got 8.5"),
        ((8, 1.5), {}, r"ratio must be in \[0, 1\), got 1.5"),
        ((8, -0.5), {}, "ratio"),
        ((8, None), {}, "ratio must be a number"),
        ((8, 0.5), {"round_to": 0}, "round_to must be an integer >= 1, got 0"),
        ((8, 0.5), {"round_to": 2.5}, "round_to"),
        ((8, 0.9), {"min_channels": 0}, "min_channels must be an integer >= 1, got 0"),
    ],
)
def test_kept_count_rejects_bad_arguments(args, kwargs, match):
    """Each argument is validated with its name and value (regression: round_to=0 divided by
    zero, a ratio of 1.5 kept one channel)."""
    with pytest.raises(ValueError, match=match):
        kept_count(*args, **kwargs)


def test_compressed_trees_are_a_value_error_naming_the_leaf():
    """Structured pruning reads and cuts dense arrays: every entry point names the first
    QArray or Masked leaf (groups computed on the dense params), not a TypeError from jnp."""
    from jaxcomp.quant import QuantSpec, quantize_tree
    from jaxcomp.sparsity import Pruner, prune_now, to_masked
    from jaxcomp.structured import channel_groups, magnitude_importance, remove_channels

    params = {"a": {"kernel": jnp.ones((4, 6))}, "b": {"kernel": jnp.ones((6, 2))}}

    def f(p, x):
        return jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]

    groups = channel_groups(f, params, jnp.ones((1, 4)))
    keep = {groups[0].name: [0, 1, 2]}
    pruned, masks = prune_now(params, Pruner(sparsity=0.5))
    for tree, kind in ((quantize_tree(params, QuantSpec(bits=8)), "QArray"),
                       (to_masked(pruned, masks), "Masked")):
        message = f"the leaf at 'a/kernel' is a compressed leaf \\({kind}\\)"
        with pytest.raises(ValueError, match="channel_groups: " + message):
            channel_groups(f, tree, jnp.ones((1, 4)))
        with pytest.raises(ValueError, match="magnitude_importance: " + message):
            magnitude_importance(tree, groups)
        with pytest.raises(ValueError, match="taylor_importance: " + message):
            taylor_importance(tree, params, groups)
        with pytest.raises(ValueError, match="remove_channels: " + message):
            remove_channels(tree, groups, keep)
    # A compressed leaf outside every group (a quantized embedding) is neither read nor cut.
    tree = {**params, "emb": quantize_tree({"e": jnp.ones((5, 4))}, QuantSpec(bits=8))["e"]}
    assert set(magnitude_importance(tree, groups)) == {g.name for g in groups}
    small = remove_channels(tree, groups, keep)
    assert small["a"]["kernel"].shape == (4, 3) and small["emb"] is tree["emb"]
