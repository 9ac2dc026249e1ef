"""Bad input across the quantization API: a ValueError naming the path and the value, never a
silent wrong answer, a NaN, or an error from deep inside."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.nn.quant import fake_quant_inputs
from jaxcomp.quant import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantParams,
    QuantSpec,
    calibrate,
    fake_quant,
    fake_quant_tree,
    kmeans_quantize,
    lsq_as_static,
    lsq_fake_quant,
    lsq_init,
    pact_fake_quant,
    pact_penalty,
    prepare_for_serving,
    qconv,
    qdot,
    quantize,
    quantize_tree,
)
from jaxcomp.quant.numerics import params_from_range, quant_params, quantize_codes

X = jnp.array([[0.5, -1.0, 0.25], [1.0, 0.0, -0.5]])
NAN_X = X.at[0, 1].set(jnp.nan)
S8 = QuantSpec()
W = quantize(jnp.array([[1.0, -2.0], [0.5, 0.25], [0.1, 0.3]]), QuantSpec(channel_axes=(-1,)))
K = quantize(jnp.ones((3, 3, 2, 4)) * 0.5, QuantSpec(channel_axes=(-1,)))
IMG = jnp.ones((1, 5, 5, 2))


@pytest.mark.parametrize(
    "call, message",
    [
        # Static params that would saturate or zero every code.
        (lambda: quantize_codes(X, QuantParams(jnp.float32(0.0)), S8, path="w"),
         "w: scales must be finite and positive"),
        (lambda: quantize_codes(X, QuantParams(jnp.float32(0.1), jnp.float32(300.0)),
                                QuantSpec(symmetric=False), path="w"), "w: zero points must lie in"),
        (lambda: quantize_codes(NAN_X, QuantParams(jnp.float32(0.1)), S8, path="w"), "w: 1 NaN/Inf"),
        (lambda: quant_params(NAN_X, S8, path="w"), "w: 1 NaN/Inf"),
        (lambda: params_from_range(jnp.float32(jnp.nan), jnp.float32(1.0), S8), "lo must be finite"),
        (lambda: lsq_init(NAN_X, S8, path="w"), "w: 1 NaN/Inf"),
        (lambda: lsq_fake_quant(NAN_X, jnp.float32(0.1), S8, path="w"), "w: 1 NaN/Inf"),
        (lambda: lsq_fake_quant(X, jnp.float32(0.1), S8, grad_scale=-1.0, path="w"),
         "w: grad_scale must be a finite number > 0"),
        (lambda: pact_fake_quant(NAN_X, jnp.float32(1.0), S8, path="w"), "w: 1 NaN/Inf"),
        # A NaN row would make every row NaN through the dynamic range.
        (lambda: qdot(NAN_X, W, path="layer"), "layer: 1 NaN/Inf"),
        (lambda: qdot(X, W, dimension_numbers=(((5,), (0,)), ((), ())), path="layer"),
         "layer: dimension_numbers .* name axis 5"),
        (lambda: qdot(X, W, dimension_numbers=(((1.0,), (0,)), ((), ())), path="layer"),
         "layer: dimension_numbers .* name axis 1.0"),
        (lambda: qdot(X, W, activations=QuantSpec(rounding="stochastic"), strategy="int8",
                      path="layer"), "layer: serving rounds activations to nearest"),
        (lambda: qdot(jnp.float32(1.0), W, path="layer"), "layer: qdot needs an input"),
        (lambda: qconv(IMG, K, window_strides=(1, 1), padding=((1.5, 1), (1, 1)), path="conv"),
         "conv: padding must be"),
        (lambda: qconv(IMG, K, window_strides=(1, 1), padding="SAME", feature_group_count=1.5,
                       path="conv"), "conv: feature_group_count must be"),
        (lambda: qconv(IMG, K, window_strides=(0, 1), padding="SAME", path="conv"),
         "conv: window_strides must be 2 int"),
        (lambda: qconv(IMG, K, window_strides=(1, 1), padding="same_upper", path="conv"),
         "conv: padding must be"),
        (lambda: qconv(IMG[0], K, window_strides=(1, 1), padding="SAME", path="conv"),
         "conv: qconv needs an input of the kernel's rank 4"),
        (lambda: qconv(jnp.ones((1, 5, 5, 3)), K, window_strides=(1, 1), padding="SAME",
                       path="conv"), "conv: the input has 3 features"),
        # Wrong types where a spec, params or a key belong.
        (lambda: fake_quant(X, None, path="w"), "w: expected a jaxcomp.quant.QuantSpec, got NoneType"),
        (lambda: quantize(X, "int8", path="w"), "w: expected a jaxcomp.quant.QuantSpec, got str"),
        (lambda: fake_quant(X, S8, params=0.1, path="w"), "w: expected QuantParams"),
        (lambda: fake_quant(X, QuantSpec(rounding="stochastic"), key=0, path="w"),
         "w: key must be a jax.random key"),
        (lambda: quantize_tree({"k": X}, S8, scales={"k": 0.1}), "k: expected QuantParams"),
        (lambda: prepare_for_serving({"k": W}, where="typo"), "where='typo' selects no leaf"),
        (lambda: quantize_tree({"k": X}, S8, key=0), "quantize_tree: key: key must be"),
        (lambda: fake_quant_tree({"k": X}, S8, key=0), "fake_quant_tree: key: key must be"),
        (lambda: qdot(X, W, act_params=0.1, path="layer"), "layer: expected QuantParams"),
        (lambda: calibrate(lambda b: b, [X], S8), "collect must return a flat"),
        (lambda: calibrate(lambda b: {"x": b}, [X], S8, observer=MinMaxObserver),
         "observer must be an Observer instance"),
        (lambda: PercentileObserver(percentile="99"), "percentile must be in"),
        (lambda: MSEObserver(num_candidates=None), "num_candidates must be an int"),
        (lambda: EMAObserver(base=None), "base must be an Observer"),
        (lambda: kmeans_quantize(X, 2, iters=None), "iters must be an int"),
        (lambda: lsq_as_static(None), "lsq_as_static: steps must map paths"),
        (lambda: lsq_as_static({"a": {"b": 0.1}}), "a: an LSQ step must be"),
        (lambda: MinMaxObserver().init(None, S8, "t"), "t: an observer needs the tensor's shape"),
        (lambda: MinMaxObserver().update(MinMaxObserver().init((2, 3), S8), None, S8, "t"),
         "t: an observer needs a float array"),
        (lambda: PercentileObserver().update(PercentileObserver().init((0, 3), S8),
                                             jnp.zeros((0, 3)), S8, "t"), "t: an empty batch"),
        (lambda: prepare_for_serving({"k": W}, batch_sizes=(2.5,)), "batch_sizes must be"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_params_given_as_a_plain_tuple_and_old_style_keys_are_accepted():
    """(scale, zero_point) tuples and jax.random.PRNGKey keys are fine where QuantParams and
    typed keys are."""
    np.testing.assert_array_equal(fake_quant(X, S8, params=(jnp.float32(0.01),)),
                                  fake_quant(X, S8, params=QuantParams(jnp.float32(0.01))))
    stochastic = QuantSpec(rounding="stochastic")
    np.testing.assert_array_equal(fake_quant(X, stochastic, key=jax.random.PRNGKey(3)),
                                  fake_quant(X, stochastic, key=jax.random.wrap_key_data(
                                      jax.random.PRNGKey(3))))


def test_pact_penalty_squares_in_float32():
    """int32 and float16 clips would overflow their own square."""
    assert float(pact_penalty({"a": jnp.array(2**20)}, weight=1.0)) == pytest.approx(2.0**40)
    assert np.isfinite(float(pact_penalty({"a": jnp.float16(300.0)}, weight=1.0)))


def test_fake_quant_inputs_with_a_where_that_selects_no_layer_that_ran():
    """A misspelled layer pattern warns when the block ends (a jitted call served from its cache
    runs no interceptor, so an error could be wrong)."""
    model = nn.Dense(3)
    variables = model.init(jax.random.key(0), X)
    with pytest.warns(UserWarning, match="where='dense_0' selected none of the layers that ran"):
        with fake_quant_inputs(S8, where="dense_0"):
            model.apply(variables, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fake_quant_inputs(S8, where=".*"):
            model.apply(variables, X)


def test_array_scalars_pass_where_numbers_do():
    """A grad_scale computed with jnp, and batch sizes given as an array, are accepted."""
    step = jnp.float32(0.1)
    got = jax.grad(lambda s: lsq_fake_quant(X, s, S8, grad_scale=1 / jnp.sqrt(6.0 * 127)).sum())(step)
    want = jax.grad(lambda s: lsq_fake_quant(X, s, S8, grad_scale=1 / np.sqrt(6.0 * 127)).sum())(step)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert prepare_for_serving({"k": W}, batch_sizes=jnp.array([1, 8]))["k"].shape == W.shape


def test_linen_calibration_and_serving_name_bare_params():
    """Bare params where Linen variables belong: a ValueError saying to wrap them, not Flax's
    ScopeCollectionNotFound."""
    from jaxcomp.nn.quant import calibrate_linen, init_input_steps_linen, serve_linen

    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    x = jnp.ones((2, 4))
    for call in (lambda: calibrate_linen(model, params, [x], QuantSpec()),
                 lambda: init_input_steps_linen(model, params, x, QuantSpec()),
                 lambda: serve_linen(model)(params, x)):
        with pytest.raises(ValueError, match=r"pass the Linen variables.*wrap them"):
            call()
