"""Property tests of the quantization numerics (hypothesis) and fake_quant's forward pass."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.quant import (
    QuantParams,
    QuantSpec,
    dequantize,
    fake_quant,
    layout,
    quant_params,
    quantize,
)
from jaxcomp.quant.numerics import to_grouped

# A fixed family of specs covering every option, so compiled programs are reused across examples.
SPECS = st.sampled_from([
    QuantSpec(bits=8),
    QuantSpec(bits=4, channel_axes=(-1,)),
    QuantSpec(bits=2, symmetric=False),
    QuantSpec(bits=3, signed=False, channel_axes=(-1,)),
    QuantSpec(bits=8, signed=False, symmetric=False, group_size=2, channel_axes=(-1,)),
    QuantSpec(bits=4, symmetric=False, group_size=2),
])
ARRAYS = hnp.arrays(
    np.float32, (4, 6),
    elements=st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False),
)
_fq = jax.jit(fake_quant, static_argnames=("spec", "ste", "path"))
_fq_static = jax.jit(lambda x, spec, params: fake_quant(x, spec, params=params), static_argnums=1)
_quant_params = jax.jit(quant_params, static_argnames=("spec", "path"))


def _scale_per_element(x, spec):
    lay = layout(x.shape, spec)
    scale = _quant_params(jnp.asarray(x), spec).scale
    return np.asarray(jnp.broadcast_to(scale, lay.grouped_shape).reshape(x.shape))


def _representable(x, spec):
    """Elements inside the grid's range (unsigned grids clip negatives)."""
    return x >= 0 if not spec.signed else np.ones_like(x, bool)


@settings(max_examples=20, deadline=None)
@given(x=ARRAYS, spec=SPECS)
def test_nearest_rounding_error_is_at_most_half_a_scale(x, spec):
    """|x - fake_quant(x)| <= s/2 (+ float slack) for every element inside the range."""
    x_hat = np.asarray(_fq(jnp.asarray(x), spec))
    scale = _scale_per_element(x, spec)
    ok = _representable(x, spec)
    err = np.abs(x - x_hat)
    assert np.all(err[ok] <= scale[ok] * (0.5 + 1e-4) + 1e-6)


@settings(max_examples=20, deadline=None)
@given(x=ARRAYS, spec=SPECS)
def test_fake_quant_is_idempotent(x, spec):
    """Quantizing again with the same scale and zero point changes nothing; with dynamic ranges
    a symmetric grid is idempotent too (the absmax element lands on qmax, so the scale stays)."""
    x = jnp.asarray(x)
    params = _quant_params(x, spec)
    once = _fq_static(x, spec, params)
    chex.assert_trees_all_close(_fq_static(once, spec, params), once, atol=1e-5, rtol=1e-5)
    if spec.symmetric:
        once = _fq(x, spec)
        chex.assert_trees_all_close(_fq(once, spec), once, atol=1e-4, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(x=ARRAYS, spec=SPECS)
def test_dequantize_of_quantize_equals_fake_quant(x, spec):
    """dequantize(quantize(x)) is exactly the fake-quantized array."""
    chex.assert_trees_all_close(
        dequantize(quantize(jnp.asarray(x), spec)), _fq(jnp.asarray(x), spec), atol=1e-6, rtol=1e-6
    )


@settings(max_examples=20, deadline=None)
@given(x=ARRAYS, spec=SPECS)
def test_codes_stay_on_the_grid_and_zero_is_exact(x, spec):
    """Codes lie in [qmin, qmax] and an exact zero comes back exactly zero."""
    x = x.copy()
    x[0, 0] = 0.0
    q = quantize(jnp.asarray(x), spec)
    codes = np.asarray(q.values).astype(np.int32)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert float(q.materialize()[0, 0]) == 0.0


def test_stochastic_rounding_is_unbiased():
    """The mean of many stochastic roundings of a value is the value (within 4 sigma)."""
    spec = QuantSpec(bits=4, rounding="stochastic")
    x = jnp.full((20000,), 0.3, jnp.float32).at[0].set(7.0)  # scale = 1, so 0.3 is between codes
    out = fake_quant(x, spec, key=jax.random.key(0))[1:]
    assert set(np.unique(np.asarray(out))) <= {0.0, 1.0}
    sigma = np.sqrt(0.3 * 0.7 / out.size)
    assert abs(float(out.mean()) - 0.3) < 4 * sigma


def test_stochastic_rounding_needs_a_key():
    """A stochastic spec without a key raises ValueError naming the path."""
    with pytest.raises(ValueError, match="w: rounding='stochastic' needs an explicit key"):
        fake_quant(jnp.ones(3), QuantSpec(rounding="stochastic"), path="w")


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False), QuantSpec(channel_axes=(-1,)),
                                  QuantSpec(group_size=2), QuantSpec(fp8="e4m3")])
def test_all_zero_tensors_and_channels_stay_zero_without_nan(spec):
    """A zero range gives scale 1: no division by zero, zeros stay zeros, gradients finite."""
    x = jnp.zeros((4, 3)).at[:, 0].set(jnp.array([1.0, -2.0, 0.5, 0.0]))
    zeros = jnp.zeros((4, 3))
    for value in (x, zeros):
        out = fake_quant(value, spec)
        assert bool(jnp.all(jnp.isfinite(out)))
        grad = jax.grad(lambda v: fake_quant(v, spec).sum())(value)
        assert bool(jnp.all(jnp.isfinite(grad)))
    chex.assert_trees_all_equal(fake_quant(zeros, spec), zeros)
    np.testing.assert_array_equal(np.asarray(fake_quant(x, QuantSpec(channel_axes=(-1,)))[:, 1:]), 0.0)


def test_per_channel_and_per_group_scales_follow_their_slices():
    """Per-channel scales are each column's absmax / qmax; per-group ones each group's."""
    x = jnp.array([[1.0, -4.0], [2.0, 0.5], [-8.0, 1.0], [0.25, 2.0]])
    spec = QuantSpec(channel_axes=(-1,))
    np.testing.assert_allclose(quant_params(x, spec).scale, [[8 / 127, 4 / 127]], rtol=1e-6)
    grouped = QuantSpec(group_size=2, channel_axes=(-1,))
    scale = quant_params(x, grouped).scale
    assert scale.shape == (2, 1, 2)
    np.testing.assert_allclose(scale[:, 0, :] * 127, [[2.0, 4.0], [8.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(to_grouped(x, layout(x.shape, grouped))[1, :, 0], [-8.0, 0.25])


def test_asymmetric_grid_uses_the_whole_range_of_one_sided_data():
    """ReLU-like data quantized asymmetrically (or unsigned) loses less than symmetric signed."""
    x = jax.random.uniform(jax.random.key(0), (1000,), minval=0.0, maxval=1.0)
    err = {name: float(jnp.mean((fake_quant(x, s) - x) ** 2)) for name, s in
           {"sym": QuantSpec(bits=4), "asym": QuantSpec(bits=4, symmetric=False),
            "unsigned": QuantSpec(bits=4, signed=False)}.items()}
    assert err["asym"] < err["sym"] / 2 and err["unsigned"] < err["sym"] / 2


def test_bfloat16_inputs_round_like_float32_and_keep_their_dtype():
    """bf16 arrays come back bf16, with the codes computed in float32."""
    x = jax.random.normal(jax.random.key(1), (64,), jnp.float32).astype(jnp.bfloat16)
    out = fake_quant(x, QuantSpec(bits=8))
    assert out.dtype == jnp.bfloat16
    ref = fake_quant(x.astype(jnp.float32), QuantSpec(bits=8)).astype(jnp.bfloat16)
    chex.assert_trees_all_equal(out, ref)
    q = quantize(x, QuantSpec(bits=8))
    assert q.materialize().dtype == jnp.bfloat16


def test_fp8_formats_round_to_float8_values():
    """fp8 fake quant equals a cast to the float8 dtype after scaling absmax to its max."""
    x = jnp.array([0.1, -0.37, 1.0, 3.3])
    for fmt, dtype in (("e4m3", jnp.float8_e4m3fn), ("e5m2", jnp.float8_e5m2)):
        spec = QuantSpec(fp8=fmt)
        scale = 3.3 / float(jnp.finfo(dtype).max)
        expected = (x / scale).astype(dtype).astype(jnp.float32) * scale
        chex.assert_trees_all_close(fake_quant(x, spec), expected, rtol=1e-6)
        assert quantize(x, spec).values.dtype == dtype


def test_static_zero_points_outside_the_integer_range_raise():
    """A uint8-style zero point (200) given to an int8 spec names the path and the range."""
    spec = QuantSpec(bits=8, symmetric=False)
    bad = QuantParams(jnp.float32(0.1), jnp.float32(200.0))
    with pytest.raises(ValueError, match=r"w: zero points must lie in \[-128, 127\]"):
        quantize(jnp.ones(4), spec, params=bad, path="w")
    with pytest.raises(ValueError, match=r"zero points must lie in"):
        fake_quant(jnp.ones(4), spec, params=bad)
    ok = QuantParams(jnp.float32(0.1), jnp.float32(-128.0))
    quantize(jnp.ones(4), spec, params=ok)


def test_quantizing_a_constant_captured_by_jit_works():
    """A concrete array closed over by a jitted function is staged like the rest of the program
    (regression: TracerBoolConversionError in the finiteness check)."""
    w = jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    out = jax.jit(lambda: quantize(w, QuantSpec(bits=8)).materialize())()
    np.testing.assert_allclose(out, w, atol=1 / 127)
