"""Pruner configuration, per-layer rules, one-shot pruning and scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "Dense_0": {"kernel": jax.random.normal(keys[0], (64, 32)), "bias": jnp.ones(32)},
        "Dense_1": {"kernel": jax.random.normal(keys[1], (32, 16)), "bias": jnp.ones(16)},
        "Conv_0": {"kernel": jax.random.normal(keys[2], (3, 3, 8, 16))},
    }


def _grads():
    return jax.tree.map(lambda p: jnp.cos(p * 3.0), _params())


def _zeros(tree, path):
    a, b = path.split("/")
    return float((np.asarray(tree[a][b]) == 0).mean())


def test_prune_now_prunes_every_kernel_uniformly_by_magnitude():
    """Default pruner: each kernel loses exactly its lowest-|w| fraction; biases stay."""
    params = _params()
    pruned, masks = sp.prune_now(params, sp.Pruner(sparsity=0.75))
    for path in ("Dense_0/kernel", "Dense_1/kernel", "Conv_0/kernel"):
        assert _zeros(pruned, path) == 0.75
    assert masks["Dense_0"]["bias"] is None
    kernel, mask = np.asarray(params["Dense_0"]["kernel"]), np.asarray(masks["Dense_0"]["kernel"])
    assert np.abs(kernel[mask]).min() >= np.abs(kernel[~mask]).max()


def test_rules_give_each_layer_its_own_granularity_score_and_sparsity():
    """where= rules: N:M on the conv, channels on Dense_1, 50% on Dense_0, first match wins."""
    pruner = sp.Pruner(
        sparsity=0.75,
        rules=[
            sp.Rule(where="Conv_0/.*", granularity=sp.NM(n=2, m=4)),
            sp.Rule(where="Dense_1/.*", granularity=sp.Channel(axis=-1), sparsity=0.25),
            sp.Rule(where="Dense_.*", sparsity=0.5, score=sp.Saliency()),
        ],
    )
    pruned, masks = sp.prune_now(_params(), pruner, grads=_grads())
    conv = np.asarray(masks["Conv_0"]["kernel"]).reshape(3, 3, 2, 4, 16)
    assert np.all(conv.sum(axis=3) == 2)
    dense1 = np.asarray(masks["Dense_1"]["kernel"])
    assert np.all(dense1.all(axis=0) | ~dense1.any(axis=0)) and (~dense1.any(axis=0)).sum() == 4
    assert _zeros(pruned, "Dense_0/kernel") == 0.5
    saliency = np.abs(np.asarray(_params()["Dense_0"]["kernel"] * _grads()["Dense_0"]["kernel"]))
    mask0 = np.asarray(masks["Dense_0"]["kernel"])
    assert saliency[mask0].min() >= saliency[~mask0].max()


def test_global_threshold_distribution_uses_one_cut_for_all_leaves():
    """GlobalThreshold: total sparsity exact, per-leaf sparsities follow the shared cut."""
    params = _params()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"] * 10.0
    pruner = sp.Pruner(sparsity=0.6, distribution=sp.GlobalThreshold())
    pruned, masks = sp.prune_now(params, pruner)
    stats = sp.sparsity_of(masks)
    assert int(stats.zeros) == round(0.6 * stats.size)
    assert float(stats.per_leaf["Dense_1/kernel"]) < 0.3 < float(stats.per_leaf["Dense_0/kernel"])


def test_erk_and_per_path_distributions():
    """ERK gives the larger layer more sparsity; PerPath sets each leaf's own target."""
    _, masks = sp.prune_now(_params(), sp.Pruner(sparsity=0.8, distribution=sp.ERK()))
    stats = sp.sparsity_of(masks)
    assert float(stats.per_leaf["Dense_0/kernel"]) > float(stats.per_leaf["Dense_1/kernel"])
    assert abs(float(stats.total) - 0.8) < 0.01
    targets = {"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.25, "Conv_0/kernel": 0.0}
    _, masks = sp.prune_now(_params(), sp.Pruner(sparsity=0.9, distribution=sp.PerPath(targets)))
    for path, target in targets.items():
        assert float(sp.sparsity_of(masks).per_leaf[path]) == target
    # A rule that only changes a granularity inherits the PerPath and takes its own leaves.
    pruner = sp.Pruner(sparsity=0.9, distribution=sp.PerPath(targets),
                       rules=[sp.Rule(where="Dense_1/kernel", granularity=sp.Block((2, 2)))])
    _, masks = sp.prune_now(_params(), pruner)
    for path, target in targets.items():
        assert float(sp.sparsity_of(masks).per_leaf[path]) == target
    with pytest.raises(ValueError, match=r"listed but not pruned: \['X/kernel'\]"):
        sp.prune_now(_params(), sp.Pruner(sparsity=0.9, distribution=sp.PerPath(
            {**targets, "X/kernel": 0.5}), rules=[sp.Rule(where="Dense_1/kernel", score=sp.Random())]),
            key=jax.random.key(0))


def test_block_granularity_and_global_threshold_count_weights():
    """Global threshold over 4x4 blocks prunes whole blocks to about the weight target."""
    pruner = sp.Pruner(sparsity=0.5, where="Dense_.*/kernel", granularity=sp.Block((4, 4)),
                       distribution=sp.GlobalThreshold())
    _, masks = sp.prune_now(_params(), pruner)
    stats = sp.sparsity_of(masks)
    assert 0.5 <= float(stats.total) < 0.5 + 16 / stats.size
    tiles = np.asarray(masks["Dense_0"]["kernel"]).reshape(16, 4, 8, 4)
    assert np.all(tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3)))


def test_random_score_uses_the_explicit_key():
    """Random scores: same key, same mask; another key, another mask."""
    pruner = sp.Pruner(sparsity=0.5, score=sp.Random(), where="Dense_1/kernel")
    a = sp.compute_masks(_params(), pruner, key=jax.random.key(1))
    b = sp.compute_masks(_params(), pruner, key=jax.random.key(1))
    c = sp.compute_masks(_params(), pruner, key=jax.random.key(2))
    np.testing.assert_array_equal(a["Dense_1"]["kernel"], b["Dense_1"]["kernel"])
    assert np.any(np.asarray(a["Dense_1"]["kernel"]) != np.asarray(c["Dense_1"]["kernel"]))


def test_movement_taylor_and_user_scores():
    """Movement keeps -w*g largest; Taylor (w*g)^2; a user function ranks by its own score."""
    params, grads = _params(), _grads()
    w, g = np.asarray(params["Dense_1"]["kernel"]), np.asarray(grads["Dense_1"]["kernel"])
    for score, expected in [
        (sp.Movement(), -w * g),
        (sp.Taylor(decay=0.0), (w * g) ** 2),
        (lambda p, gr, s: jax.tree.map(lambda x: -jnp.abs(x), p), -np.abs(w)),
    ]:
        pruner = sp.Pruner(sparsity=0.5, score=score, where="Dense_1/kernel")
        mask = np.asarray(sp.compute_masks(params, pruner, grads=grads)["Dense_1"]["kernel"])
        assert expected[mask].min() >= expected[~mask].max()


def test_schedule_needs_a_step_for_one_shot_use():
    """prune_now evaluates a schedule at step=; without it, ValueError."""
    pruner = sp.Pruner(sparsity=sp.polynomial_sparsity(0.5, begin_step=0, end_step=10))
    with pytest.raises(ValueError, match="step"):
        sp.prune_now(_params(), pruner)
    pruned, _ = sp.prune_now(_params(), pruner, step=10)
    assert _zeros(pruned, "Dense_1/kernel") == 0.5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sp.Pruner(sparsity=1.5), "sparsity"),
        (lambda: sp.Pruner(sparsity=0.5, granularity="nm_2,4"), "Granularity"),
        (lambda: sp.Pruner(sparsity=0.5, granularity=sp.NM(), distribution=sp.ERK()), "N:M"),
        (lambda: sp.Pruner(sparsity=0.5, granularity=sp.Block((2, 2)), dynamic=sp.RigL(
            end_step=10)), "dynamic"),
        (lambda: sp.Rule(where="x", sparsity=-0.5), "sparsity"),
        (lambda: sp.PerPath({"a": 1.0}), "a"),
        (lambda: sp.Taylor(decay=1.0), "decay"),
        (lambda: sp.RigL(update_every=0, end_step=10), "update_every"),
        (lambda: sp.SET(drop_fraction=1.0, end_step=10), "drop_fraction"),
        (lambda: sp.Pruner(sparsity="0.5"), "must be a number in"),
        (lambda: sp.Pruner(sparsity=True), "must be a number in"),
        (lambda: sp.NM(axis="x"), "axis must be an int"),
        (lambda: sp.Pruner(sparsity=0.9, granularity=sp.NM(2, 4)), "sparsity=0.9 cannot be met"),
        (lambda: sp.Channel(axis=1.0), "axis must be an int"),
        (lambda: sp.prune_now(_params(), sp.Pruner(sparsity=lambda step: jnp.zeros(2)), step=0),
         "must return a scalar sparsity"),
    ],
)
def test_bad_configuration_raises_at_construction(make, message):
    """Typed, validated configuration: bad values raise ValueError when built."""
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "pruner, message",
    [
        (sp.Pruner(sparsity=0.5, where="nothing"), "selects no leaf"),
        (sp.Pruner(sparsity=0.5, rules=[sp.Rule(where="Dense_9/.*", sparsity=0.1)]), "rule 0"),
        (sp.Pruner(sparsity=0.5, granularity=sp.Block((128, 1))),
         r"exceeds the leaf's trailing axes .*granularity=Block\(\("),
        (sp.Pruner(sparsity=0.5, where=".*bias", granularity=sp.NM()), "Dense_0/bias"),
        (sp.Pruner(sparsity=0.5, distribution=sp.PerPath({"Dense_0/kernel": 0.5})), "unlisted"),
        (sp.Pruner(sparsity=lambda step: 1.5), "1.5"),
    ],
)
def test_settings_that_do_not_fit_the_params_name_the_path(pruner, message):
    """A where= matching nothing, blocks larger than a leaf, bad schedules: ValueError."""
    with pytest.raises(ValueError, match=message):
        sp.compute_masks(_params(), pruner)


def test_gradient_scores_without_grads_raise():
    """Saliency without grads is an error, not a silent magnitude fallback."""
    with pytest.raises(ValueError, match="grads"):
        sp.prune_now(_params(), sp.Pruner(sparsity=0.5, score=sp.Saliency()))


def test_bfloat16_params_are_pruned():
    """bf16 (a jnp floating type numpy does not count as floating) prunes like float32."""
    params = {"kernel": jnp.array([[1., -4.], [0.5, 2.]], jnp.bfloat16)}
    pruned, _ = sp.prune_now(params, sp.Pruner(sparsity=0.5))
    assert pruned["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pruned["kernel"], np.float32), [[0, -4], [0, 2]])


@pytest.mark.parametrize("granularity", [sp.Channel(-1), sp.Block((4, 4))])
def test_global_structured_ties_are_split_by_position(granularity):
    """A zero kernel next to a random one: exactly the target, not the whole tied layer."""
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (16, 16))},
              "b": {"kernel": jnp.zeros((16, 16))}}
    pruner = sp.Pruner(sparsity=0.25, granularity=granularity,
                       distribution=sp.GlobalThreshold())
    _, masks = sp.prune_now(params, pruner)
    assert float(sp.sparsity_of(masks).total) == 0.25
    assert bool(np.all(masks["a"]["kernel"]))


def test_global_blocks_count_the_weights_they_hold():
    """Equal block scores split by position; clipped edge blocks weigh what they hold."""
    tied = {"a": {"kernel": jnp.ones((8, 8)).at[:4, :4].set(10.)},
            "b": {"kernel": jnp.ones((8, 8)).at[:4, :4].set(20.)}}
    pruner = sp.Pruner(sparsity=0.5, granularity=sp.Block((4, 4)),
                       distribution=sp.GlobalThreshold())
    assert float(sp.sparsity_of(sp.compute_masks(tied, pruner)).total) == 0.5
    # 5x5 leaves in 4x4 blocks hold units of 16, 4, 4 and 1 weights. Ranked: a's small blocks
    # (9 weights), b's (18 in all), then 16-weight blocks: 18 of 50 is nearest 25.
    w = jnp.ones((5, 5)).at[:4, :4].set(10.)
    masks = sp.compute_masks({"a": {"kernel": w}, "b": {"kernel": 2 * w}}, pruner)
    assert int(sp.sparsity_of(masks).zeros) == 18


@pytest.mark.parametrize("granularity, distribution", [
    (sp.Unstructured(), sp.Uniform()), (sp.Channel(-1), sp.Uniform()),
    (sp.Block((4, 4)), sp.Uniform()), (sp.Channel(-1), sp.GlobalThreshold()),
    (sp.Unstructured(), sp.GlobalThreshold()),
])
def test_a_sparsity_below_one_keeps_a_unit_of_every_leaf(granularity, distribution):
    """0.999 never empties a leaf: its best unit stays (TF-MOT keeps max(round(...), 1))."""
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))},
              "b": {"kernel": jnp.zeros((4, 4))}}
    pruner = sp.Pruner(sparsity=0.999, granularity=granularity, distribution=distribution)
    masks = sp.compute_masks(params, pruner)
    for name in ("a", "b"):
        assert bool(np.any(masks[name]["kernel"])), name
    assert int(np.sum(sp.unstructured_mask(jnp.arange(100.), 0.999))) == 1
    assert int(np.sum(sp.channel_mask(jnp.ones((3, 6)), 0.95))) == 3


@pytest.mark.parametrize("value", [np.float32(1.5), np.array(1.0), jnp.float32(1.5),
                                   jnp.float32(-0.5), jnp.float32(np.nan)])
def test_mask_functions_check_numpy_and_jax_scalars(value):
    """Concrete array sparsities are range-checked like Python floats; traced ones pass."""
    with pytest.raises(ValueError, match="sparsity"):
        sp.unstructured_mask(jnp.arange(4.), value)
    with pytest.raises(ValueError, match="sparsity"):
        sp.global_threshold_masks({"a": jnp.arange(4.)}, value)
    mask = jax.jit(sp.unstructured_mask)(jnp.arange(4.), jnp.float32(0.5))
    np.testing.assert_array_equal(mask, [False, False, True, True])


def test_taylor_ranks_tiny_products_and_the_floor_holds_for_user_scores():
    """Taylor does not square |w*g| under the 2**-98 floor; a tiny user score ties with 0."""
    w = jnp.array([0.5, 4., 1., 3.])
    grads = {"w": jnp.full(4, 1e-16)}
    mask = sp.compute_masks({"w": w}, sp.Pruner(sparsity=0.5, where="w", score=sp.Taylor()),
                            grads=grads)["w"]
    np.testing.assert_array_equal(mask, [False, True, False, True])


def test_bad_inputs_are_value_errors_naming_the_path():
    """None masks at a pruned leaf and grads of the wrong shape name the path."""
    params = _params()
    masks = jax.tree.map(lambda _: None, params)
    with pytest.raises(ValueError, match=r"\w+/kernel: masks=: None"):
        sp.compute_masks(params, sp.Pruner(sparsity=0.5), masks=masks)
    grads = _grads()
    grads["Dense_1"]["kernel"] = grads["Dense_1"]["kernel"].T
    with pytest.raises(ValueError, match=r"Dense_1/kernel.*\(16, 32\)"):
        sp.prune_now(params, sp.Pruner(sparsity=0.5, score=sp.Saliency()), grads=grads)
    with pytest.raises(ValueError, match="rules"):
        sp.Pruner(sparsity=0.5, rules=42)


def test_numpy_ints_configure_granularities_and_schedules():
    assert sp.NM(n=np.int64(2), m=np.int64(4)) == sp.NM(2, 4)
    assert sp.Block((np.int64(2), 2)).shape == (2, 2)
    schedule = sp.polynomial_sparsity(0.5, begin_step=np.int64(0), end_step=np.int64(10))
    assert float(schedule(10)) == 0.5


def test_a_concrete_step_checks_the_schedules_value_and_empty_leaves_are_named():
    """prune_now(step=) evaluates the schedule there: 1.5 or NaN is an error, not a clip."""
    for bad in (1.5, float("nan")):
        pruner = sp.Pruner(sparsity=lambda step, bad=bad: jnp.where(step == 50, bad, 0.5))
        with pytest.raises(ValueError, match="the sparsity of rule 0 at step 50 must be in"):
            sp.prune_now(_params(), pruner, step=50)
    with pytest.raises(ValueError, match=r"kernel: an empty leaf \(shape \(0, 4\)\)"):
        sp.prune_now({"kernel": jnp.zeros((0, 4))}, sp.Pruner(sparsity=0.5))


def test_an_int_block_is_square_and_a_single_rule_is_accepted():
    """Block(2) is Block((2, 2)); rules=Rule(...) is rules=[Rule(...)]."""
    assert sp.Block(2).shape == (2, 2)
    rule = sp.Rule(where="Dense_1/kernel", sparsity=0.25)
    assert sp.Pruner(sparsity=0.5, rules=rule).rules == (rule,)


def test_a_rule_sparsity_under_an_inherited_nm_granularity_is_checked():
    """A rule that sets sparsity 0.9 where the pruner's N:M applies cannot be met: ValueError
    (regression: it was silently pruned 2:4). Inheriting the sparsity stays allowed."""
    with pytest.raises(ValueError, match="N:M sparsity is fixed"):
        sp.Pruner(sparsity=0.5, granularity=sp.NM(2, 4),
                  rules=[sp.Rule(where="d0/kernel", sparsity=0.9)])
    sp.Pruner(sparsity=0.5, granularity=sp.NM(2, 4), rules=[sp.Rule(where="d0", sparsity=0.5)])
    sp.Pruner(sparsity=0.9, rules=[sp.Rule(where="d0", granularity=sp.NM(2, 4))])


def test_channels_along_an_axis_of_length_one_warn_naming_the_leaf():
    """Channel(axis=-2) on a depthwise kernel (H, W, 1, C) has one unit: nothing (or all) is
    pruned, so a warning names the leaf (regression: 0% pruned silently)."""
    params = {"dw": {"kernel": jnp.arange(1.0, 37.0).reshape(3, 3, 1, 4)}}
    with pytest.warns(UserWarning, match=r"dw/kernel: Channel\(axis=-2\) slices along an axis of "
                                         "length 1"):
        pruned, _ = sp.prune_now(params, sp.Pruner(sparsity=0.5, granularity=sp.Channel(axis=-2)))
    assert float(sp.sparsity_of(pruned).total) == 0.0
    pruned, _ = sp.prune_now(params, sp.Pruner(sparsity=0.5, granularity=sp.Channel(axis=-1)))
    assert float(sp.sparsity_of(pruned).total) == 0.5


def test_an_nm_axis_shorter_than_m_warns_naming_the_leaf():
    """NM along an axis shorter than M (the heads axis of a DenseGeneral kernel) prunes little or
    nothing: a warning names the leaf and the axis; an explicit axis prunes 2:4 as asked."""
    params = {"attn": {"query": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 2, 4)}}}
    with pytest.warns(UserWarning, match="attn/query/kernel: NM\\(2, 4\\) .* length 2 .*nothing is pruned"):
        pruned, _ = sp.prune_now(params, sp.Pruner(sparsity=0.5, granularity=sp.NM(2, 4)))
    assert float(sp.sparsity_of(pruned).total) == 0.0
    pruned, _ = sp.prune_now(params, sp.Pruner(sparsity=0.5, granularity=sp.NM(2, 4, axis=0)))
    kept = np.asarray(pruned["attn"]["query"]["kernel"] != 0).reshape(2, 4, 2, 4).sum(axis=1)
    assert (kept == 2).all()
