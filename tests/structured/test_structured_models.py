"""The reference models, Linen and NNX: expected groups, exact outputs after removing dead
channels, and shapes, parameter counts and FLOPs that shrink as computed."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcomp import count_flops
from jaxcomp.nn.structured import (
    linen_channel_groups,
    nnx_channel_groups,
    prune_and_finetune_linen,
    prune_and_finetune_nnx,
    prune_linen,
    prune_nnx,
    rebuild_linen,
    shrink_nnx,
)
from jaxcomp.structured import UnfollowedOpWarning, magnitude_importance, select_channels
from jaxcomp.testing import models, nnx_models
from jaxcomp.tree import leaves_with_paths

INPUT = (8, 8, 1)
X = jnp.asarray(np.random.default_rng(1).uniform(size=(3, *INPUT)), jnp.float32)

LINEN = {
    "mlp": models.MLP(features=(32, 16)),
    "lenet5": models.LeNet5(),
    "resnet": models.ResNet(stage_features=(8, 16), blocks_per_stage=1),
    "transformer": models.TransformerEncoder(d_model=16, num_heads=4, mlp_dim=32),
}
# The same architectures built by hand with half of every prunable width.
LINEN_HALF = {
    "mlp": models.MLP(features=(16, 8)),
    "lenet5": models.LeNet5(conv_features=(3, 8), dense_features=(60, 42)),
    "resnet": models.ResNet(stage_features=(4, 8), blocks_per_stage=1),
    "transformer": models.TransformerEncoder(d_model=16, num_heads=2, mlp_dim=16, qkv_features=8),
}
NNX = {
    "mlp": lambda w=(32, 16): nnx_models.MLP(INPUT, features=w, rngs=nnx.Rngs(0)),
    "lenet5": lambda c=(6, 16), d=(120, 84): nnx_models.LeNet5(INPUT, c, d, rngs=nnx.Rngs(0)),
    "resnet": lambda s=(8, 16): nnx_models.ResNet(INPUT, s, blocks_per_stage=1, rngs=nnx.Rngs(0)),
    "transformer": lambda h=4, m=32, q=None: nnx_models.TransformerEncoder(
        INPUT, d_model=16, num_heads=h, mlp_dim=m, qkv_features=q, rngs=nnx.Rngs(0)),
}
NNX_HALF = {
    "mlp": lambda: NNX["mlp"]((16, 8)),
    "lenet5": lambda: NNX["lenet5"]((3, 8), (60, 42)),
    "resnet": lambda: NNX["resnet"]((4, 8)),
    "transformer": lambda: NNX["transformer"](2, 16, 8),
}


def _bn(module):
    return {f"params/{module}/scale[0]", f"params/{module}/bias[0]",
            f"batch_stats/{module}/mean[0]", f"batch_stats/{module}/var[0]"}


def _dense(name, nxt, prefix="params/"):
    return {f"{prefix}{name}/kernel[1]", f"{prefix}{name}/bias[0]", f"{prefix}{nxt}/kernel[0]"}


def _conv(name, nxt, prefix="params/", bias=True):
    out = {f"{prefix}{name}/kernel[3]", f"{prefix}{nxt}/kernel[2]"}
    return out | ({f"{prefix}{name}/bias[0]"} if bias else set())


S0, S1 = "params/stage0_block0", "params/stage1_block0"
ATTENTION = {f"params/attention/{n}/kernel[1]" for n in ("query", "key", "value")} | {
    f"params/attention/{n}/bias[0]" for n in ("query", "key", "value")} | {
    "params/attention/out/kernel[0]"}

EXPECTED_LINEN = {
    "mlp": {
        "params/Dense_0/kernel": (32, _dense("Dense_0", "Dense_1")),
        "params/Dense_1/kernel": (16, _dense("Dense_1", "Dense_2")),
    },
    "lenet5": {
        "params/Conv_0/kernel": (6, _conv("Conv_0", "Conv_1")),
        "params/Conv_1/kernel": (16, {"params/Conv_1/kernel[3]", "params/Conv_1/bias[0]",
                                      "params/Dense_0/kernel[0]"}),
        "params/Dense_0/kernel": (120, _dense("Dense_0", "Dense_1")),
        "params/Dense_1/kernel": (84, _dense("Dense_1", "Dense_2")),
    },
    "resnet": {
        f"{S0}/Conv_0/kernel": (8, _conv("stage0_block0/Conv_0", "stage0_block0/Conv_1",
                                         bias=False) | _bn("stage0_block0/BatchNorm_0")),
        f"{S0}/Conv_1/kernel": (8, {"params/stem_conv/kernel[3]", f"{S0}/Conv_0/kernel[2]",
                                    f"{S0}/Conv_1/kernel[3]", f"{S1}/Conv_0/kernel[2]",
                                    f"{S1}/shortcut_conv/kernel[2]"}
                                | _bn("stage0_block0/BatchNorm_1") | _bn("stem_norm")),
        f"{S1}/Conv_0/kernel": (16, _conv("stage1_block0/Conv_0", "stage1_block0/Conv_1",
                                          bias=False) | _bn("stage1_block0/BatchNorm_0")),
        f"{S1}/Conv_1/kernel": (16, {f"{S1}/Conv_1/kernel[3]", f"{S1}/shortcut_conv/kernel[3]",
                                     "params/head/kernel[0]"}
                                | _bn("stage1_block0/BatchNorm_1")
                                | _bn("stage1_block0/shortcut_norm")),
    },
    "transformer": {
        "params/attention/key/kernel[1]": (4, ATTENTION),
        "params/mlp_in/kernel": (32, _dense("mlp_in", "mlp_out")),
    },
}


EXPECTED_NNX = {
    "mlp": {"layers/0/kernel": (32, 3), "layers/1/kernel": (16, 3)},
    "lenet5": {"convs/0/kernel": (6, 3), "convs/1/kernel": (16, 3), "dense/0/kernel": (120, 3),
               "dense/1/kernel": (84, 3)},
    "resnet": {"blocks/0/conv1/kernel": (8, 6), "blocks/0/conv2/kernel": (8, 13),
               "blocks/1/conv1/kernel": (16, 6), "blocks/1/conv2/kernel": (16, 11)},
    "transformer": {"attention/key/kernel[1]": (4, 7), "mlp_in/kernel": (32, 3)},
}


def _signature(groups):
    return {g.name: (g.size, {f"{m.path}[{m.axis}]" for m in g.members}) for g in groups}


def _plant(tree, groups):
    """Zeros the weight slices of the second half of every group's channels; returns the dropped."""
    arrays = {p: np.array(x) for p, x in leaves_with_paths(tree)}
    dropped = {}
    for g in groups:
        chans = np.arange(g.size // 2, g.size)
        dropped[g.name] = chans
        for m in g.members:
            if arrays[m.path].ndim >= 2:
                index = [slice(None)] * arrays[m.path].ndim
                index[m.axis] = m.indices[chans].ravel()
                arrays[m.path][tuple(index)] = 0.0
    leaves = [jnp.asarray(arrays[p]) for p, _ in leaves_with_paths(tree)]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves), dropped


def _random(tree, seed=0):
    """Random values for an abstract tree (compiling `init` costs far more than the tests).

    Biases and statistics are nonzero, so only the coupling (not luck) keeps outputs equal.
    """
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in leaves_with_paths(tree):
        if path.endswith("var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(size=leaf.shape) * (0.5 if len(leaf.shape) > 1 else 0.3)
        leaves.append(jnp.asarray(value, leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _count(tree):
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@functools.cache
def _linen_case(name):
    model = LINEN[name]
    variables = _random(jax.eval_shape(model.init, jax.random.key(0), X))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfollowedOpWarning)  # every op of these is followed
        groups = linen_channel_groups(model, variables, X)
    return model, variables, groups


@functools.cache
def _linen_pruned(name):
    model, variables, groups = _linen_case(name)
    planted, dropped = _plant(variables, groups)
    keep = select_channels(groups, magnitude_importance(planted, groups), ratio=0.5)
    small, small_vars = rebuild_linen(model, planted, groups, keep)
    return planted, dropped, keep, small, small_vars


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_groups_are_the_expected_ones(name):
    """Each reference model couples exactly the axes its architecture implies."""
    assert _signature(_linen_case(name)[2]) == EXPECTED_LINEN[name]


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_removing_dead_channels_keeps_outputs(name):
    """Channels with planted zero weights score zero, are removed, and outputs do not change."""
    model = _linen_case(name)[0]
    planted, dropped, keep, small, small_vars = _linen_pruned(name)
    for group_name, chans in dropped.items():
        assert not keep[group_name][chans].any()
    apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    np.testing.assert_allclose(apply(small, small_vars, X), apply(model, planted, X),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_pruned_model_is_the_half_width_model(name):
    """The rebuilt module has the half widths; its parameter count and FLOPs are that model's."""
    model = _linen_case(name)[0]
    _, _, _, small, small_vars = _linen_pruned(name)
    half = LINEN_HALF[name]
    assert small == half
    half_vars = jax.eval_shape(half.init, jax.random.key(0), X)
    assert jax.tree.map(jnp.shape, small_vars) == jax.tree.map(jnp.shape, half_vars)
    assert _count(small_vars["params"]) == _count(half_vars["params"])
    flops = lambda m, v: count_flops(lambda v, x: m.apply(v, x), v, X).total  # noqa: E731
    assert flops(small, small_vars) < flops(model, _linen_case(name)[1])
    assert flops(small, small_vars) == flops(half, half_vars)


def test_mlp_shrinks_by_the_hand_count():
    """LeNet-300-100 shape at half width: parameters and FLOPs by the closed form."""
    _, _, _, small, small_vars = _linen_pruned("mlp")
    assert _count(small_vars) == (64 * 16 + 16) + (16 * 8 + 8) + (8 * 10 + 10)
    flops = count_flops(lambda v, x: small.apply(v, x), small_vars, X)
    assert flops.total == 2 * 3 * (64 * 16 + 16 * 8 + 8 * 10)


@functools.cache
def _nnx_case(name):
    graphdef, state = nnx.split(nnx.eval_shape(NNX[name]))
    model = nnx.merge(graphdef, _random(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfollowedOpWarning)
        return model, nnx_channel_groups(model, X)


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_groups_are_the_expected_ones(name):
    """The NNX twins give the same groups (named by their own paths): sizes and member counts."""
    groups = _nnx_case(name)[1]
    assert {g.name: (g.size, len(g.members)) for g in groups} == EXPECTED_NNX[name]


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_removing_dead_channels_keeps_outputs_and_shrinks(name):
    """NNX surgery: dead channels removed, same outputs, half-width shapes, counts and FLOPs."""
    model, groups = _nnx_case(name)
    graphdef, state = nnx.split(model)
    planted, dropped = _plant(state, groups)
    model = nnx.merge(graphdef, planted)
    keep = select_channels(groups, magnitude_importance(planted, groups), ratio=0.5)
    for group_name, chans in dropped.items():
        assert not keep[group_name][chans].any()
    small = shrink_nnx(model, groups, keep)
    model.eval()
    small.eval()
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(small, X),
                               nnx.jit(lambda m, x: m(x))(model, X), rtol=1e-5, atol=1e-5)
    half = nnx.eval_shape(NNX_HALF[name])
    small_state, half_state = nnx.state(small), nnx.state(half)
    assert jax.tree.map(jnp.shape, small_state) == jax.tree.map(jnp.shape, half_state)

    def flops(m):
        gd, st = nnx.split(m)
        return count_flops(lambda s, x: nnx.merge(gd, s)(x), st, X).total

    assert flops(small) == flops(half) < flops(model)


def test_nnx_surgery_updates_module_attributes_and_leaves_the_model_alone():
    """The new modules report their new widths; the original model keeps its own."""
    model, groups = _nnx_case("transformer")
    keep = {"attention/key/kernel[1]": [0, 3], "mlp_in/kernel": np.arange(8)}
    small = shrink_nnx(model, groups, keep)
    assert (small.attention.num_heads, small.attention.qkv_features) == (2, 8)
    assert small.mlp_in.out_features == small.mlp_out.in_features == 8
    assert (model.attention.num_heads, model.mlp_in.out_features) == (4, 32)
    assert model.mlp_in.kernel.shape == (16, 32)


def test_linen_resnet_with_uneven_widths_needs_explicit_hidden_fields():
    """Global pruning gives blocks different widths: a clear error naming the module when the
    widths come from one field, and a rebuilt model once `hidden_features` is explicit."""
    model, variables, groups = _linen_case("resnet")
    keep = {name: np.arange(g.size) < (2 if "Conv_0" in name else g.size)
            for name, g in zip(groups.names, groups)}
    keep[f"{S1}/Conv_0/kernel"] = np.arange(16) < 16
    with pytest.raises(ValueError, match=r"stage0_block0/Conv_0' \(Conv\) field features"):
        rebuild_linen(model, variables, groups, keep)
    explicit = model.clone(hidden_features=(8, 16))
    groups = linen_channel_groups(explicit, variables, X)
    small, _ = rebuild_linen(explicit, variables, groups, keep)
    assert small.hidden_features == (2, 16) and small.stage_features == (8, 16)


class _HardCoded(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(8)(x.reshape(x.shape[0], -1))
        return nn.Dense(3)(nn.relu(hidden))


def test_linen_hard_coded_width_names_the_module_that_cannot_be_rebuilt():
    """A width written in the module body, not a field, is reported with its module path."""
    model = _HardCoded()
    variables = _random(jax.eval_shape(model.init, jax.random.key(0), X))
    with pytest.raises(ValueError, match=r"module 'Dense_0' \(Dense\).*hard-coded"):
        prune_linen(model, variables, X, ratio=0.5)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio_is_an_error_and_leaves_models_untouched(ratio):
    """A ratio outside [0, 1) raises before anything is cut."""
    model, variables, _ = _linen_case("mlp")
    before = jax.tree.map(np.array, variables)
    with pytest.raises(ValueError, match="ratio"):
        prune_linen(model, variables, X, ratio=ratio)
    jax.tree.map(np.testing.assert_array_equal, variables, before)
    nnx_model = _nnx_case("mlp")[0]
    with pytest.raises(ValueError, match="ratio"):
        prune_nnx(nnx_model, X, ratio=ratio)
    assert nnx_model.layers[0].kernel.shape == (64, 32)


def test_protecting_every_layer_and_wrong_inputs_are_errors():
    """Protecting every group, or example inputs of the wrong shape, raise clear errors."""
    model, variables, _ = _linen_case("lenet5")
    with pytest.raises(ValueError, match="protects every prunable group"):
        prune_linen(model, variables, X, ratio=0.5, where=r"params/Dense_2/.*")
    with pytest.raises(ValueError, match="example inputs of shapes"):
        prune_linen(model, variables, jnp.ones((2, 12, 12, 1)), ratio=0.5)
    with pytest.raises(ValueError, match="example inputs of shapes"):
        prune_nnx(_nnx_case("mlp")[0], jnp.ones((2, 7, 8, 1)), ratio=0.5)


def test_where_protects_a_layer_in_prune_linen():
    """Protecting Dense_1 keeps its outputs while the others shrink."""
    model, variables, _ = _linen_case("mlp")
    small, _ = prune_linen(model, variables, X, ratio=0.5,
                           where=lambda path, _: "Dense_1" not in path)
    assert small.features == (16, 16)


def _linen_loss(model, variables, batch):
    x, y = batch
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}


def test_prune_and_finetune_reaches_the_target_widths():
    """Two rounds of 25% each (of the original) give half widths, and training changes the
    weights in between; the NNX twin does the same in one round."""
    model, variables, _ = _linen_case("mlp")
    batch = (X, jnp.arange(3))
    small, trained = prune_and_finetune_linen(
        model, variables, X, batches=iter([batch] * 2), tx=optax.sgd(0.1),
        loss_fn=_linen_loss, ratio=0.5, rounds=2, steps=1)
    assert small.features == (16, 8)
    untrained = prune_linen(model, variables, X, ratio=0.5)[1]
    assert not np.allclose(trained["params"]["Dense_2"]["bias"],
                           untrained["params"]["Dense_2"]["bias"])
    nnx_small = prune_and_finetune_nnx(
        _nnx_case("mlp")[0], X, batches=iter([batch]), tx=optax.sgd(0.1),
        loss_fn=lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean(),
        ratio=0.5, rounds=1, steps=1)
    assert [layer.out_features for layer in nnx_small.layers] == [16, 8]


def test_prune_and_finetune_rejects_bad_schedules():
    """Rounds below 1, negative steps or a ratio outside [0, 1) are errors."""
    model, variables, _ = _linen_case("mlp")
    for kwargs in ({"rounds": 0, "steps": 1, "ratio": 0.5},
                   {"rounds": 1, "steps": -1, "ratio": 0.5},
                   {"rounds": 1, "steps": 1, "ratio": 1.0}):
        with pytest.raises(ValueError, match="rounds|steps|ratio"):
            prune_and_finetune_linen(model, variables, X, batches=iter([]), tx=optax.sgd(0.1),
                                     loss_fn=_linen_loss, **kwargs)
