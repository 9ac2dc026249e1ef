"""Reference models, both Flax flavours: init, apply, and one jitted optax train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcomp.testing import models, nnx_models
from jaxcomp.testing.train import TrainState, cross_entropy, init_linen, make_linen_train_step

INPUT = (8, 8, 1)
X = jax.random.uniform(jax.random.key(1), (16, *INPUT))
Y = jnp.arange(16) % 10

LINEN = {
    "mlp": models.MLP(features=(32, 16)),
    "lenet5": models.LeNet5(),
    "resnet": models.ResNet(stage_features=(8, 16), blocks_per_stage=1),
    "transformer": models.TransformerEncoder(d_model=16, num_heads=2, mlp_dim=32),
}
NNX = {
    "mlp": lambda: nnx_models.MLP(INPUT, features=(32, 16), rngs=nnx.Rngs(0)),
    "lenet5": lambda: nnx_models.LeNet5(INPUT, rngs=nnx.Rngs(0)),
    "resnet": lambda: nnx_models.ResNet(INPUT, (8, 16), blocks_per_stage=1, rngs=nnx.Rngs(0)),
    "transformer": lambda: nnx_models.TransformerEncoder(
        INPUT, d_model=16, num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0)
    ),
}


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_model_trains_one_jitted_step(name):
    model = LINEN[name]
    variables = init_linen(model, INPUT)
    assert jax.eval_shape(model.apply, variables, X).shape == (16, 10)
    tx = optax.adam(1e-2)
    params = variables["params"]
    state = TrainState(params, variables.get("batch_stats", {}), tx.init(params))
    step = make_linen_train_step(model, tx)
    state, loss0 = step(state, X, Y)
    for _ in range(4):
        state, loss = step(state, X, Y)
    assert np.isfinite(float(loss)) and float(loss) < float(loss0)
    if name == "resnet":
        # Training mode updated the running statistics.
        before = jax.tree.leaves(variables["batch_stats"])
        after = jax.tree.leaves(state.batch_stats)
        assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_model_trains_one_jitted_step(name):
    model = NNX[name]()
    assert nnx.eval_shape(lambda m: m(X), model).shape == (16, 10)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    loss0 = step(model, optimizer, X, Y)
    for _ in range(4):
        loss = step(model, optimizer, X, Y)
    assert np.isfinite(float(loss)) and float(loss) < float(loss0)


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_and_nnx_twins_have_the_same_parameter_count(name):
    linen_params = jax.eval_shape(LINEN[name].init, jax.random.key(0), X)["params"]
    nnx_params = nnx.state(nnx.eval_shape(NNX[name]), nnx.Param)
    count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
    assert count(linen_params) == count(nnx_params)


def test_resnet_has_projection_shortcuts_where_width_or_stride_changes():
    model = models.ResNet(stage_features=(8, 16, 32), blocks_per_stage=2)
    x = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only, no compile
    params = variables["params"]
    assert "shortcut_conv" not in params["stage0_block0"]
    assert "shortcut_conv" in params["stage1_block0"] and "shortcut_conv" in params["stage2_block0"]
    assert "shortcut_conv" not in params["stage1_block1"]
    assert params["stage2_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
