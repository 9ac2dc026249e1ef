"""Flax cases beyond the reference models: depthwise convolutions, concatenated branches,
gradient and activation scores on Linen variables, removal under jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcomp.nn.structured import (
    linen_channel_groups,
    nnx_channel_groups,
    rebuild_linen,
    shrink_nnx,
)
from jaxcomp.structured import (
    activation_importance,
    channel_groups,
    remove_channels,
    taylor_importance,
)
from jaxcomp.testing.models import MLP, LeNet5
from jaxcomp.tree import leaves_with_paths

X = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 6, 1)), jnp.float32)


def _random(tree, seed=0):
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype) for _, x in
              leaves_with_paths(tree)]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _zero_consumers(tree, group, channels):
    """Zeros what the consumers read from `channels`, so removing them changes nothing."""
    arrays = {p: np.array(x) for p, x in leaves_with_paths(tree)}
    for m in group.members:
        if m.role == "in":
            index = [slice(None)] * arrays[m.path].ndim
            index[m.axis] = m.indices[channels].ravel()
            arrays[m.path][tuple(index)] = 0.0
    leaves = [jnp.asarray(arrays[p]) for p, _ in leaves_with_paths(tree)]
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


class _Depthwise(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (1, 1))(x))
        x = nn.relu(nn.Conv(self.width, (3, 3), feature_group_count=self.width)(x))
        return nn.Dense(3)(x.mean((1, 2)))


class _Grouped(nn.Module):
    width: int = 8
    out: int = 8
    groups: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (1, 1))(x))
        x = nn.relu(nn.Conv(self.out, (3, 3), feature_group_count=self.groups)(x))
        return nn.Dense(3)(x.mean((1, 2)))


class _Branches(nn.Module):
    left: int = 6
    right: int = 4

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        a, b = nn.relu(nn.Dense(self.left)(x)), nn.relu(nn.Dense(self.right)(x))
        return nn.Dense(3)(jnp.concatenate([a, b], axis=-1))


def _linen_roundtrip(model, keep_of):
    variables = _random(jax.eval_shape(model.init, jax.random.key(0), X))
    groups = linen_channel_groups(model, variables, X)
    keep = {g.name: keep_of(g) for g in groups}
    for g in groups:
        variables = _zero_consumers(variables, g, np.setdiff1d(np.arange(g.size), keep[g.name]))
    small, small_vars = rebuild_linen(model, variables, groups, keep)
    apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    np.testing.assert_allclose(apply(small, small_vars, X), apply(model, variables, X),
                               rtol=1e-5, atol=1e-5)
    return groups, small


def test_linen_depthwise_convolution_rebuilds_with_fewer_groups():
    """A depthwise conv shrinks with its input: features and feature_group_count both follow."""
    groups, small = _linen_roundtrip(_Depthwise(), lambda g: np.arange(0, g.size, 2))
    (group,) = groups
    assert {f"{m.path}[{m.axis}]" for m in group.members} >= {
        "params/Conv_0/kernel[3]", "params/Conv_1/kernel[3]", "params/Dense_0/kernel[0]"}
    assert small.width == 4


def test_linen_grouped_convolution_pruned_at_its_outputs_keeps_its_group_count():
    """A grouped (not depthwise) conv losing only outputs narrows each group, keeping 4 groups."""
    grouped = "params/Conv_1/kernel"
    groups, small = _linen_roundtrip(
        _Grouped(), lambda g: np.arange(1) if g.name == grouped else np.arange(g.size))
    assert groups.names == ("params/Conv_0/kernel", grouped)
    assert (small.width, small.out, small.groups) == (8, 4, 4)


def test_linen_concatenated_branches_keep_their_own_widths():
    """Each part of a concatenation is its own group and its own field."""
    groups, small = _linen_roundtrip(_Branches(), lambda g: np.arange(g.size // 2))
    assert groups.names == ("params/Dense_0/kernel", "params/Dense_1/kernel")
    assert (small.left, small.right) == (3, 2)


class _NNXDepthwise(nnx.Module):
    def __init__(self, width=4, *, rngs):
        self.pointwise = nnx.Conv(1, width, (1, 1), rngs=rngs)
        self.depthwise = nnx.Conv(width, 2 * width, (3, 3), feature_group_count=width, rngs=rngs)
        self.head = nnx.Linear(2 * width, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.depthwise(nnx.relu(self.pointwise(x))))
        return self.head(x.mean((1, 2)))


def test_nnx_depthwise_convolution_with_a_multiplier_shrinks_whole_groups():
    """Channel c of a depthwise conv with multiplier 2 goes with its two outputs."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NNXDepthwise(rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, _random(state))
    (group,) = nnx_channel_groups(model, X)
    depthwise = next(m for m in group.members if m.path == "depthwise/kernel")
    np.testing.assert_array_equal(depthwise.indices, [[0, 1], [2, 3], [4, 5], [6, 7]])
    planted = _zero_consumers(nnx.state(model), group, np.array([1, 2]))
    model = nnx.merge(graphdef, planted)
    small = shrink_nnx(model, nnx_channel_groups(model, X), {group.name: [0, 3]})
    assert (small.depthwise.in_features, small.depthwise.out_features) == (2, 4)
    assert small.depthwise.feature_group_count == 2
    np.testing.assert_allclose(small(X), model(X), rtol=1e-5, atol=1e-5)


def test_scores_from_gradients_and_activations_on_linen_variables():
    """Taylor scores take `{"params": grads}`; activation scores run the model's own jaxpr."""
    mlp = MLP(features=(8, 4))
    variables = _random(jax.eval_shape(mlp.init, jax.random.key(0), X))
    groups = linen_channel_groups(mlp, variables, X)
    grads = jax.jit(jax.grad(lambda p: mlp.apply({"params": p}, X).sum()))(variables["params"])
    taylor = taylor_importance(variables, {"params": grads}, groups)
    assert set(taylor) == set(groups.names)
    model = LeNet5(conv_features=(4, 6), dense_features=(8, 8))
    variables = _random(jax.eval_shape(model.init, jax.random.key(0), X))
    groups = linen_channel_groups(model, variables, X)
    apply = lambda v, x: model.apply(v, x)  # noqa: E731
    apoz = activation_importance(apply, variables, groups, [X], kind="apoz")
    assert set(apoz) == set(groups.names)
    for name, g in zip(groups.names, groups):
        assert apoz[name].shape == (g.size,)
        assert ((apoz[name] >= 0) & (apoz[name] <= 1)).all()


def test_remove_channels_traces_under_jit_with_a_static_keep():
    """With `keep` known at trace time, the cut itself can sit inside a jitted function."""
    params = {"a": jnp.ones((4, 6)), "c": jnp.ones((6, 3))}
    f = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["c"]  # noqa: E731
    groups = channel_groups(f, params, jnp.ones((1, 4)))
    out = jax.jit(lambda p: remove_channels(p, groups, {"a": np.array([0, 2, 4])}))(params)
    assert out["a"].shape == (4, 3) and out["c"].shape == (3, 3)


class _NNXGrouped(nnx.Module):
    def __init__(self, *, rngs):
        self.c1 = nnx.Conv(1, 8, (1, 1), rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), feature_group_count=4, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.c1(x))))
        return self.head(x.mean((1, 2)))


def test_nnx_grouped_convolution_pruned_at_its_outputs_keeps_its_group_count():
    """Only the outputs of a grouped conv go: each of its 4 groups keeps 2 inputs and 1 output."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NNXGrouped(rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, _random(state))
    groups = nnx_channel_groups(model, X)
    model = nnx.merge(graphdef, _zero_consumers(nnx.state(model), groups["c2/kernel"],
                                                np.array([1])))
    small = shrink_nnx(model, nnx_channel_groups(model, X), {"c2/kernel": [0]})
    assert small.c2.kernel.shape == (3, 3, 2, 4)
    assert (small.c2.in_features, small.c2.out_features, small.c2.feature_group_count) == (8, 4, 4)
    np.testing.assert_allclose(small(X), model(X), rtol=1e-5, atol=1e-5)
