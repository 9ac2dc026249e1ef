"""Integer matmul and convolution: equal to fake-quant float math, on int8 operands."""

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax import lax

from jaxcomp.quant import (
    QuantParams,
    QuantSpec,
    chosen_strategies,
    fake_quant,
    prepare_for_serving,
    qconv,
    qdot,
    quantize,
)
from jaxcomp.quant import tuning

KX, KW = jax.random.split(jax.random.key(0))
X = jax.random.normal(KX, (6, 16))
W = jax.random.normal(KW, (16, 8))
PER_CHANNEL = QuantSpec(channel_axes=(-1,))


def _dot_operand_dtypes(fn, *args):
    """(lhs, rhs, out) dtypes of every dot_general / conv in fn's jaxpr, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, eqn.outvars[0].aval.dtype))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _reference(x, w, act_spec, act_params=None):
    return fake_quant(x, act_spec, params=act_params) @ w.materialize()


CASES = {
    "per-tensor": (QuantSpec(), QuantSpec()),
    "per-channel": (PER_CHANNEL, QuantSpec()),
    "per-row activations": (PER_CHANNEL, QuantSpec(channel_axes=(0,))),
    "asymmetric activations": (PER_CHANNEL, QuantSpec(symmetric=False)),
    "unsigned activations": (PER_CHANNEL, QuantSpec(signed=False, symmetric=False)),
    "asymmetric weights": (QuantSpec(symmetric=False, channel_axes=(-1,)), QuantSpec(symmetric=False)),
    "int4 weights": (QuantSpec(bits=4, channel_axes=(-1,)), QuantSpec()),
    "per-group int4": (QuantSpec(bits=4, group_size=4, channel_axes=(-1,)), QuantSpec(symmetric=False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_int8_path_equals_fake_quant_float_math(name):
    """s_x s_w (q_x - z_x)(q_w - z_w) with int32 sums equals fq(x) @ dequantize(w)."""
    w_spec, act_spec = CASES[name]
    w = quantize(W, w_spec)
    out = jax.jit(lambda x, w: qdot(x, w, activations=act_spec, strategy="int8"))(X, w)
    chex.assert_trees_all_close(out, _reference(X, w, act_spec), atol=2e-5, rtol=2e-5)
    ops = _dot_operand_dtypes(lambda x, w: qdot(x, w, activations=act_spec, strategy="int8"), X, w)
    assert ops and all(o[:2] == (jnp.int8, jnp.int8) and o[2] == jnp.int32 for o in ops)


def test_transposed_storage_and_padding_give_the_same_result():
    """Codes stored (N, K) and rows padded to 8 change speed, not values."""
    w = quantize(W, PER_CHANNEL)
    ref = qdot(X[:3], w, strategy="int8")
    for strategy in ("int8", "int8_padded", "dequantize"):
        chex.assert_trees_all_close(qdot(X[:3], w.transpose_storage((1, 0)), strategy=strategy),
                                    ref, atol=2e-5, rtol=2e-5)


def test_static_activation_params_are_used_instead_of_the_batch_range():
    """A calibrated scale clips values outside it, as fake_quant does."""
    w = quantize(W, PER_CHANNEL)
    params = QuantParams(jnp.float32(0.01))
    out = qdot(X, w, act_params=params, strategy="int8")
    chex.assert_trees_all_close(out, _reference(X, w, QuantSpec(), params), atol=2e-5, rtol=2e-5)



@pytest.mark.parametrize("strategy", ["int8", "int8_padded", "dequantize"])
@pytest.mark.parametrize("zero_point", [None, 3.0])
def test_a_nan_with_static_activation_params_is_rejected_or_propagates(strategy, zero_point):
    """A NaN has no integer code: eagerly a ValueError (as fake_quant), under jit its row's
    outputs are NaN and the other rows are untouched (regression: finite garbage on int8)."""
    w = quantize(W, PER_CHANNEL)
    spec = QuantSpec(symmetric=zero_point is None)
    params = QuantParams(jnp.float32(0.01), None if zero_point is None else jnp.float32(zero_point))
    x = X.at[2, 5].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN/Inf"):
        qdot(x, w, activations=spec, act_params=params, strategy=strategy)
    out = jax.jit(lambda x: qdot(x, w, activations=spec, act_params=params, strategy=strategy))(x)
    assert bool(jnp.isnan(out[2]).all()) and not bool(jnp.isnan(jnp.delete(out, 2, axis=0)).any())
    chex.assert_trees_all_close(jnp.delete(out, 2, axis=0),
                                jnp.delete(_reference(X, w, spec, params), 2, axis=0),
                                atol=2e-5, rtol=2e-5)
    wc = quantize(jax.random.normal(KW, (3, 3, 2, 4)), PER_CHANNEL)
    clean = jax.random.uniform(KW, (2, 5, 5, 2))
    xc = clean.at[0, 1, 1, 0].set(jnp.nan)
    conv = functools.partial(qconv, w=wc, window_strides=(1, 1), padding="SAME",
                             activations=spec, act_params=params, strategy=strategy.replace(
                                 "_padded", ""))
    with pytest.raises(ValueError, match="NaN/Inf"):
        conv(xc)
    # qconv's input scale is per tensor: the NaN's image is NaN, the other image is untouched.
    out = jax.jit(conv)(xc)
    assert bool(jnp.isnan(out[0]).any()) and not bool(jnp.isnan(out[1]).any())
    chex.assert_trees_all_close(out[1], conv(clean)[1], atol=1e-6, rtol=1e-6)

def test_weight_only_mode_multiplies_float_activations_by_the_codes():
    """activations=None: x @ dequantize(w), with no int8 activation anywhere."""
    for spec in (PER_CHANNEL, QuantSpec(bits=4, symmetric=False, channel_axes=(-1,)),
                 QuantSpec(bits=4, group_size=4, channel_axes=(-1,))):
        w = quantize(W, spec)
        chex.assert_trees_all_close(qdot(X, w, activations=None), X @ w.materialize(), atol=1e-5, rtol=1e-5)
    ops = _dot_operand_dtypes(lambda x, w: qdot(x, w, activations=None), X, quantize(W, PER_CHANNEL))
    assert all(o[0] == jnp.float32 for o in ops)


def test_general_dimension_numbers_contract_several_axes():
    """A DenseGeneral-style kernel (2, 8, 8) contracted over two input axes."""
    x = X.reshape(6, 2, 8)
    kernel = W.reshape(2, 8, 8)
    w = quantize(kernel, PER_CHANNEL)
    dims = (((1, 2), (0, 1)), ((), ()))
    out = qdot(x, w, dimension_numbers=dims, strategy="int8")
    ref = lax.dot_general(fake_quant(x, QuantSpec()), w.materialize(), dims)
    chex.assert_trees_all_close(out, ref, atol=2e-5, rtol=2e-5)


def test_fp8_weights_and_batch_dims_fall_back_to_float_math():
    """fp8 codes have no integer path: the product runs in float with the same numbers."""
    w = quantize(W, QuantSpec(fp8="e4m3", channel_axes=(-1,)))
    chex.assert_trees_all_close(qdot(X, w), _reference(X, w, QuantSpec()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act_spec", [QuantSpec(channel_axes=(-1,)), QuantSpec(group_size=4, group_axis=-1)])
def test_activation_scales_along_the_contracted_axis_serve_in_float(act_spec):
    """Per-input-channel or per-group activation scales have no integer product: they run the
    dequantize path (the same numbers in float), whatever the strategy asks."""
    w = quantize(W, PER_CHANNEL)
    f = lambda x: qdot(x, w, activations=act_spec, strategy="int8")  # noqa: E731
    chex.assert_trees_all_close(jax.jit(f)(X), _reference(X, w, act_spec), atol=2e-5, rtol=2e-5)
    assert all(o[0] == jnp.float32 for o in _dot_operand_dtypes(f, X))


def test_qdot_errors_name_the_problem():
    """Bad weights, strategies and activation granularities raise ValueError."""
    w = quantize(W, PER_CHANNEL)
    with pytest.raises(ValueError, match="expects a QArray"):
        qdot(X, W)
    with pytest.raises(ValueError, match="strategy must be"):
        qdot(X, w, strategy="fast")
    with pytest.raises(ValueError, match="expected a floating-point"):
        qdot(X.astype(jnp.int32), w)


def test_auto_strategy_measures_once_per_shape_outside_the_hot_path(monkeypatch):
    """The first trace of a large enough shape times the strategies; later traces reuse it."""
    calls = []
    original = tuning.time_calls
    monkeypatch.setattr(tuning, "time_calls", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(tuning, "MIN_MEASURED_MACS", 0)  # measure even this small shape
    x = jax.random.normal(KX, (3, 16))
    w = quantize(jax.random.normal(KW, (16, 24)), PER_CHANNEL)
    before = len(chosen_strategies())
    f = jax.jit(lambda x, w: qdot(x, w))
    out = f(x, w)
    assert len(calls) == 1 and len(chosen_strategies()) == before + 1
    jax.jit(lambda x, w: qdot(x, w) * 2)(x, w)  # a new trace, same shape: cached
    assert len(calls) == 1
    chex.assert_trees_all_close(out, qdot(x, w, strategy="int8"), atol=1e-4, rtol=1e-4)


def test_prepare_for_serving_changes_the_layout_not_the_values():
    """Re-laid-out kernels materialize to the same array; non-2-D leaves are untouched."""
    tree = {"dense": quantize(W, PER_CHANNEL), "conv": quantize(jnp.ones((3, 3, 2, 4)), PER_CHANNEL),
            "bias": jnp.zeros(8)}
    out = prepare_for_serving(tree)
    chex.assert_trees_all_equal(out["dense"].materialize(), tree["dense"].materialize())
    assert out["conv"] is tree["conv"] and out["bias"] is tree["bias"]


CONV_X = jax.random.normal(KX, (2, 7, 7, 3))
CONV_W = jax.random.normal(KW, (3, 3, 3, 4))


@pytest.mark.parametrize(
    "act_spec, options",
    [
        (QuantSpec(), dict(window_strides=(1, 1), padding="SAME")),
        (QuantSpec(symmetric=False), dict(window_strides=(2, 2), padding="SAME")),
        (QuantSpec(signed=False, symmetric=False), dict(window_strides=(1, 1), padding=((2, 1), (0, 1)),
                                                        rhs_dilation=(2, 1))),
        # Negative pads crop (as in lax and nn.Conv); the positive ones hold the zero point.
        (QuantSpec(symmetric=False), dict(window_strides=(1, 1), padding=((-1, 0), (1, -2)))),
    ],
)
def test_qconv_equals_fake_quant_convolution_on_int8(act_spec, options):
    """qconv's int8 convolution (zero-point padding included) equals the float reference."""
    w = quantize(CONV_W, PER_CHANNEL)
    f = lambda x, w: qconv(x, w, activations=act_spec, strategy="int8", **options)  # noqa: E731
    ref = lax.conv_general_dilated(fake_quant(CONV_X, act_spec), w.materialize(),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), **options)
    chex.assert_trees_all_close(jax.jit(f)(CONV_X, w), ref, atol=3e-5, rtol=3e-5)
    assert all(o[:2] == (jnp.int8, jnp.int8) for o in _dot_operand_dtypes(f, CONV_X, w))


def test_qconv_grouped_convolution_and_weight_only_mode():
    """Depthwise (feature groups) runs on int8; weight-only mode is float x dequantized."""
    x = jax.random.normal(KX, (1, 5, 5, 4))
    w = quantize(jax.random.normal(KW, (3, 3, 1, 4)), PER_CHANNEL)
    ref = lax.conv_general_dilated(fake_quant(x, QuantSpec()), w.materialize(), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    out = qconv(x, w, window_strides=(1, 1), padding="SAME", feature_group_count=4, strategy="int8")
    chex.assert_trees_all_close(out, ref, atol=3e-5, rtol=3e-5)
    plain = qconv(x, w, window_strides=(1, 1), padding="SAME", feature_group_count=4, activations=None)
    ref = lax.conv_general_dilated(x, w.materialize(), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    chex.assert_trees_all_close(plain, ref, atol=1e-5, rtol=1e-5)


def test_qconv_unsigned_per_row_and_dilated_operands_match_the_float_reference():
    """Operands the int8 convolution cannot take exactly (uint8 kernels, per-example activation
    scales, a zero point under input dilation) give the fake-quant reference anyway."""
    conv = functools.partial(lax.conv_general_dilated, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pads = ((1, 1), (1, 1))
    cases = [
        (QuantSpec(signed=False, channel_axes=(-1,)), QuantSpec(), dict(window_strides=(1, 1), padding=pads)),
        (PER_CHANNEL, QuantSpec(channel_axes=(0,)), dict(window_strides=(1, 1), padding=pads)),
        (PER_CHANNEL, QuantSpec(signed=False), dict(window_strides=(1, 1), padding=pads, lhs_dilation=(2, 2))),
    ]
    for w_spec, act_spec, options in cases:
        w = quantize(CONV_W, w_spec)
        ref = conv(fake_quant(CONV_X, act_spec), w.materialize(), **options)
        out = qconv(CONV_X, w, activations=act_spec, strategy="int8", **options)
        assert out.shape == ref.shape
        chex.assert_trees_all_close(out, ref, atol=3e-5, rtol=3e-5)
    with pytest.raises(ValueError, match="x: padding 'SAME' is not defined with lhs_dilation"):
        qconv(CONV_X, quantize(CONV_W, PER_CHANNEL), window_strides=(1, 1), padding="SAME",
              lhs_dilation=(2, 2))


def test_qdot_unsigned_grouped_weights_match_the_float_reference():
    """uint8 weights with per-group scales (a zero point after the shift into int8) are exact."""
    w = quantize(jnp.abs(W), QuantSpec(signed=False, group_size=4, channel_axes=(-1,)))
    ref = fake_quant(X, QuantSpec()) @ w.materialize()
    chex.assert_trees_all_close(qdot(X, w, strategy="int8"), ref, atol=1e-4, rtol=1e-4)


def test_a_masked_conv_keeps_integer_operands_and_quantized_activations():
    """Flax Conv's `mask` on a symmetric QArray masks the codes: the conv still runs on int8
    and equals the fake-quant reference (it used to dequantize and skip activation quant)."""
    from jaxcomp.quant import layers

    x = jax.random.normal(KX, (2, 6, 6, 3))
    w = quantize(jax.random.normal(KW, (3, 3, 3, 4)), QuantSpec(channel_axes=(-1,)))
    mask = (jnp.arange(3 * 3 * 3 * 4).reshape(3, 3, 3, 4) % 3 != 0).astype(jnp.float32)
    run = functools.partial(layers.conv, kernel=w, mask=mask, padding="VALID")
    assert (jnp.int8, jnp.int8, jnp.int32) in _dot_operand_dtypes(lambda x: run(x), x)
    dn = ("NHWC", "HWIO", "NHWC")
    want = lax.conv_general_dilated(fake_quant(x, QuantSpec()), w.materialize() * mask, (1, 1),
                                    "VALID", dimension_numbers=dn)
    chex.assert_trees_all_close(run(x), want, atol=1e-4, rtol=1e-4)


def test_a_masked_asymmetric_conv_still_quantizes_its_input():
    """An asymmetric kernel is dequantized under a mask (code 0 is not the value 0); its input
    must still be fake-quantized, as the integer path does (it used to run on the float input)."""
    from jaxcomp.quant import layers

    x = jax.random.normal(KX, (2, 6, 6, 3))
    w = quantize(jax.random.normal(KW, (3, 3, 3, 4)), QuantSpec(symmetric=False, channel_axes=(-1,)))
    mask = (jnp.arange(3 * 3 * 3 * 4).reshape(3, 3, 3, 4) % 3 != 0).astype(jnp.float32)
    a4 = QuantSpec(bits=4)
    dn = ("NHWC", "HWIO", "NHWC")
    want = lax.conv_general_dilated(fake_quant(x, a4), w.materialize() * mask, (1, 1), "SAME",
                                    dimension_numbers=dn)
    got = layers.conv(x, w, mask=mask, activations=a4)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    static = QuantParams(jnp.float32(0.1), None)
    want = lax.conv_general_dilated(fake_quant(x, a4, params=static), w.materialize() * mask,
                                    (1, 1), "SAME", dimension_numbers=dn)
    got = layers.conv(x, w, mask=mask, activations=a4, act_params=static)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [0.0, float("nan"), -0.1])
def test_the_integer_einsum_rejects_bad_static_activation_params(scale):
    """The int8 einsum checks static activation params as qdot does (it used to run with them)."""
    from jaxcomp.quant import layers

    w = quantize(jax.random.normal(KW, (5, 4)), QuantSpec(channel_axes=(-1,)))
    with pytest.raises(ValueError, match="layer0: scales must be finite and positive"):
        layers.einsum("bk,kn->bn", jnp.ones((2, 5)), w, act_params=QuantParams(jnp.float32(scale)),
                      path="layer0")


@pytest.mark.parametrize(
    "act_params, message",
    [
        (QuantParams(jnp.float32(0.0), None), "scales must be finite and positive"),
        (QuantParams(jnp.float32(jnp.nan), None), "scales must be finite and positive"),
        (QuantParams(jnp.float32(0.05), jnp.float32(10.4)), "zero points must be whole numbers"),
    ],
)
def test_bad_static_activation_params_are_value_errors(act_params, message):
    """A zero or NaN scale would silently zero or NaN the layer; a fractional zero point would
    give different numbers on the integer and float paths."""
    spec = QuantSpec(symmetric=act_params.zero_point is None)
    x = jax.random.normal(KX, (2, 6, 6, 3))
    w = quantize(jax.random.normal(KW, (3, 3, 3, 4)), QuantSpec(channel_axes=(-1,)))
    with pytest.raises(ValueError, match=message):
        qdot(x[:, 0, 0, :], quantize(jnp.ones((3, 4)), QuantSpec()), activations=spec,
             act_params=act_params)
    with pytest.raises(ValueError, match=message):
        qconv(x, w, window_strides=(1, 1), padding="SAME", activations=spec, act_params=act_params)


def test_mismatched_contraction_and_abstract_or_list_inputs_are_value_errors():
    with pytest.raises(ValueError, match=r"input axis 1 of size 3 .* weight axis 0 of size 4"):
        qdot(jnp.ones((2, 3)), quantize(jnp.ones((4, 5)), QuantSpec()))
    with pytest.raises(ValueError, match="ShapeDtypeStruct.*jax.eval_shape"):
        quantize(jax.ShapeDtypeStruct((2, 2), jnp.float32), QuantSpec())
    with pytest.raises(ValueError, match="expected a floating-point array, got list"):
        quantize([1.0, 2.0], QuantSpec())
