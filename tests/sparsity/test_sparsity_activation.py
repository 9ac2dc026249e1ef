"""Activation sparsity for Flax Linen (interception) and NNX (module wrapping)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp.nn.sparsity import (
    ActivationSparsity,
    SparseActivation,
    activation_sparsity_nnx,
    sparse_activations,
    sparsify_activation,
    sparsify_nnx,
)
from jaxcomp.testing import models, nnx_models

_X = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))


def test_top_k_keeps_exactly_k_per_row_with_a_straight_through_gradient():
    """Top-k keeps k entries per row (largest |a|); every input gets its gradient."""
    x = jnp.array([[1.0, -3.0, 2.0, 0.5], [4.0, 4.0, -1.0, 0.0]])
    config = ActivationSparsity(where="", top_k=2)
    y, sparsity = sparsify_activation(x, config)
    np.testing.assert_array_equal(y, [[0.0, -3.0, 2.0, 0.0], [4.0, 4.0, 0.0, 0.0]])
    assert float(sparsity) == 0.5
    grad = jax.grad(lambda x: jnp.sum(sparsify_activation(x, config)[0] * 2.0))(x)
    np.testing.assert_array_equal(grad, jnp.full(x.shape, 2.0))


def test_threshold_and_value_modes():
    """threshold keeps scores above it; by='value' ranks signed values."""
    x = jnp.array([[1.0, -3.0, 2.0, 0.5]])
    y, _ = sparsify_activation(x, ActivationSparsity(where="", threshold=0.9))
    np.testing.assert_array_equal(y, [[1.0, -3.0, 2.0, 0.0]])
    y, _ = sparsify_activation(x, ActivationSparsity(where="", top_k=2, by="value"))
    np.testing.assert_array_equal(y, [[1.0, 0.0, 2.0, 0.0]])


def test_linen_interception_sparsifies_chosen_layers_under_jit_and_grad():
    """Only matching modules are sparsified; the stats come out of a jitted loss."""
    model = models.MLP(features=(16, 8))
    params = model.init(jax.random.key(0), _X)["params"]
    config = ActivationSparsity(where="Dense_0", keep_fraction=0.25, by="value")

    @jax.jit
    def loss(params):
        with sparse_activations(config) as stats:
            logits = model.apply({"params": params}, _X)
        return jnp.sum(logits ** 2), stats

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert sorted(stats) == ["Dense_0"] and float(stats["Dense_0"]) >= 0.75
    assert np.isfinite(float(value)) and np.any(np.asarray(grads["Dense_0"]["kernel"]) != 0)
    plain = jnp.sum(model.apply({"params": params}, _X) ** 2)
    assert float(plain) != float(value)


def test_nnx_wrapping_sparsifies_and_reports_measured_sparsity():
    """sparsify_nnx wraps matching submodules; the measured sparsity is readable after a call."""
    model = nnx_models.MLP(input_shape=(8, 8, 1), features=(16, 8), rngs=nnx.Rngs(0))
    sparsify_nnx(model, ActivationSparsity(where="layers/0", top_k=4))

    @nnx.jit
    def forward(model, x):
        return model(x)

    assert forward(model, _X).shape == (3, 10)
    stats = activation_sparsity_nnx(model)
    assert list(stats) == ["layers/0"] and float(stats["layers/0"]) == 0.75


@pytest.mark.parametrize(
    "make",
    [
        lambda: ActivationSparsity(where="x"),
        lambda: ActivationSparsity(where="x", top_k=2, threshold=0.1),
        lambda: ActivationSparsity(where="x", top_k=0),
        lambda: ActivationSparsity(where="x", keep_fraction=1.5),
        lambda: ActivationSparsity(where="(", top_k=1),
        lambda: ActivationSparsity(where="x", top_k=1, by="rank"),
    ],
)
def test_bad_activation_configs_raise(make):
    """Exactly one of top_k/keep_fraction/threshold, valid values and regex: else ValueError."""
    with pytest.raises(ValueError):
        make()


class _Encoder(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


class _TwoEncoders(nnx.Module):
    def __init__(self, rngs):
        self.inner = _Encoder(rngs)  # a user module named like SparseActivation's attribute
        self.outer = _Encoder(rngs)

    def __call__(self, x):
        return self.outer(self.inner(x)[:, :6])


def test_nnx_wraps_a_user_module_named_inner():
    """Only what a SparseActivation holds is skipped, not any path part named "inner"
    (regression: inner/fc was silently left dense)."""
    model = _TwoEncoders(nnx.Rngs(0))
    sparsify_nnx(model, ActivationSparsity(where=r".*/fc", top_k=2))
    model(jnp.ones((1, 6)))
    assert sorted(activation_sparsity_nnx(model)) == ["inner/fc", "outer/fc"]
    assert int((model.inner(jnp.ones((1, 6))) != 0).sum()) == 2
    assert isinstance(model.inner.fc, SparseActivation)
    assert not isinstance(model.inner.fc.inner, SparseActivation)


def test_nnx_where_matching_nothing_raises():
    """A where= that matches no submodule is an error that lists the paths."""
    model = nnx_models.MLP(input_shape=(8, 8, 1), features=(16,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layers/0"):
        sparsify_nnx(model, ActivationSparsity(where="conv", top_k=1))


@pytest.mark.parametrize("fraction, n, kept", [(0.07, 100, 7), (0.14, 100, 14),
                                               (0.035, 200, 7), (0.071, 100, 8)])
def test_keep_fraction_is_exact_as_written(fraction, n, kept):
    """ceil(fraction * n) in decimal: 0.07 of 100 is 7, not 8 from 7.000000000000001."""
    assert ActivationSparsity(where="", keep_fraction=fraction).keep(n) == kept


def test_linen_where_matching_nothing_raises():
    """A where= that matches no module that ran is an error that lists the paths."""
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="layers_0"):
        with sparse_activations(ActivationSparsity(where="Dense_0", top_k=1)):
            model.apply(variables, jnp.ones((1, 3)))


def test_linen_layers_inside_nn_remat_and_nn_scan_are_sparsified_without_leaking_tracers():
    """Lifted transforms trace their body on their own: those layers are sparsified, and the
    stats (which could not leave the transform) simply have no entry for them."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(16, name="mlp")(x)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.remat(nn.Dense)(16, name="rematted")(x)
            self.sow("intermediates", "hidden", x)
            x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=2)()(x, None)
            return nn.Dense(16, name="head")(x)

    x = jax.random.normal(jax.random.key(0), (5, 8))
    model = Model()
    variables = model.init(jax.random.key(1), x)
    config = ActivationSparsity(where=r"rematted|.*mlp|head", top_k=4)

    @jax.jit
    def run(variables):
        with sparse_activations(config) as stats:
            y, inter = model.apply(variables, x, mutable=["intermediates"])
        return y, inter["intermediates"]["hidden"][0], stats

    y, rematted, stats = run(variables)
    assert float((rematted == 0).mean()) == 0.75 and float((y == 0).mean()) >= 0.75
    assert set(stats) == {"head"} and float(stats["head"]) == float((y == 0).mean())
