"""fake_quant gradients (STE), jit parity and fake_quant_tree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import QuantParams, QuantSpec, fake_quant, fake_quant_tree

STATIC = QuantParams(jnp.float32(0.25))  # 8-bit grid covers [-31.75, 31.75]


def test_clipped_ste_gradient_is_identity_inside_and_zero_outside():
    """With a static range, d fake_quant / dx is 1 where the code is in range, else 0."""
    x = jnp.array([-40.0, -31.7, -3.1, 0.0, 2.2, 31.7, 31.9, 50.0])
    grad = jax.grad(lambda v: fake_quant(v, QuantSpec(), params=STATIC).sum())(x)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 1, 0, 0])


def test_plain_ste_gradient_is_identity_everywhere():
    """The plain STE passes the incoming gradient unchanged, even outside the range."""
    x = jnp.array([-40.0, 0.3, 50.0])
    cot = jnp.array([2.0, -1.0, 3.0])
    _, vjp = jax.vjp(lambda v: fake_quant(v, QuantSpec(), params=STATIC, ste="plain"), x)
    chex.assert_trees_all_equal(vjp(cot)[0], cot)


def test_asymmetric_clipped_ste_uses_the_zero_point():
    """The clipping range of an asymmetric spec is [s (qmin - z), s (qmax - z)]."""
    spec = QuantSpec(bits=4, symmetric=False)  # grid [-8, 7]
    params = QuantParams(jnp.float32(1.0), jnp.float32(-8.0))  # range [0, 15]
    x = jnp.array([-1.0, 0.0, 7.0, 15.0, 16.0])
    grad = jax.grad(lambda v: fake_quant(v, spec, params=params).sum())(x)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(fake_quant(x, spec, params=params), [0, 0, 7, 15, 15])


def test_dynamic_range_gradient_passes_at_the_range_edge():
    """The absmax element itself, which defines the scale, keeps its gradient."""
    x = jnp.array([0.3, -1.7, 0.9])
    grad = jax.grad(lambda v: fake_quant(v, QuantSpec(bits=4)).sum())(x)
    np.testing.assert_array_equal(grad, [1, 1, 1])


class JitParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fake_quant_gives_the_same_result_under_jit_and_eagerly(self):
        """jit and eager evaluation agree, for the value and the STE gradient."""
        x = jax.random.normal(jax.random.key(0), (6, 4))
        spec = QuantSpec(bits=4, channel_axes=(-1,))

        @self.variant
        def f(v):
            return fake_quant(v, spec), jax.grad(lambda u: (fake_quant(u, spec) ** 2).sum())(v)

        out, grad = f(x)
        ref = fake_quant(x, spec)
        chex.assert_trees_all_close(out, ref, atol=1e-6)
        chex.assert_trees_all_close(grad, 2 * ref, atol=1e-5)


def test_non_float_input_raises_naming_the_path():
    """Integer inputs are rejected with the path in the message."""
    with pytest.raises(ValueError, match="Dense_0/kernel: expected a floating-point array, got dtype int32"):
        fake_quant(jnp.ones(3, jnp.int32), QuantSpec(), path="Dense_0/kernel")


def test_params_of_the_wrong_shape_and_unknown_ste_are_rejected():
    """Static params must broadcast to the scale shape; ste must be clipped or plain."""
    with pytest.raises(ValueError, match="scale of shape"):
        fake_quant(jnp.ones((4, 3)), QuantSpec(channel_axes=(-1,)), params=QuantParams(jnp.ones(4)))
    with pytest.raises(ValueError, match="ste must be"):
        fake_quant(jnp.ones(3), QuantSpec(), ste="smooth")
    with pytest.raises(ValueError, match="x: scales must be finite and positive, got \\[0.0\\]"):
        fake_quant(jnp.ones(3), QuantSpec(), params=QuantParams(jnp.float32(0.0)))


def test_static_params_calibrated_for_the_other_kind_of_grid_are_rejected():
    """Params without a zero point on an asymmetric spec (ranges from a symmetric calibration)
    would clip every negative value silently; a zero point on a symmetric spec has no place."""
    x = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    uint8 = QuantSpec(bits=8, signed=False, symmetric=False)
    with pytest.raises(ValueError, match="h/in: static params without a zero point do not fit "
                                         "uint8 asym per-tensor, which needs one"):
        fake_quant(x, uint8, params=QuantParams(jnp.float32(1 / 127)), path="h/in")
    with pytest.raises(ValueError, match="with a zero point do not fit int8 sym"):
        fake_quant(x, QuantSpec(), params=QuantParams(jnp.float32(0.01), jnp.float32(0.0)))
    # An explicit zero point of 0 is a grid starting at zero, as asked.
    out = fake_quant(x, uint8, params=QuantParams(jnp.float32(1 / 127), jnp.float32(0.0)))
    assert float(out[0]) == 0.0 and float(out[-1]) == 1.0


def test_a_concrete_non_finite_input_with_dynamic_ranges_is_rejected():
    """A range taken from Inf would turn every value into NaN: eager calls raise instead."""
    with pytest.raises(ValueError, match=r"k: 1 NaN/Inf value\(s\), e.g. inf at index \(1,\)"):
        fake_quant(jnp.array([1.0, jnp.inf]), QuantSpec(), path="k")


PARAMS = {
    "Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "bias": jnp.full(3, 0.123)},
    "Dense_1": {"kernel": jnp.linspace(-2.0, 0.5, 6).reshape(3, 2), "bias": jnp.zeros(2)},
}


def test_fake_quant_tree_touches_only_the_selected_leaves():
    """Selected kernels are fake-quantized; biases come back as they were."""
    spec = QuantSpec(bits=2)
    out = fake_quant_tree(PARAMS, spec, where=r".*kernel")
    chex.assert_trees_all_equal(out["Dense_0"]["bias"], PARAMS["Dense_0"]["bias"])
    chex.assert_trees_all_close(out["Dense_1"]["kernel"], fake_quant(PARAMS["Dense_1"]["kernel"], spec))
    assert len(np.unique(np.asarray(out["Dense_0"]["kernel"]))) <= 3


def test_fake_quant_tree_errors_name_the_path_and_value():
    """A where= matching nothing, and a leaf the spec does not fit, raise ValueError with paths."""
    with pytest.raises(ValueError, match="selects no leaf"):
        fake_quant_tree(PARAMS, QuantSpec(), where=r".*kernal")
    with pytest.raises(ValueError, match="Dense_1/kernel: group_size=4 does not divide"):
        fake_quant_tree(PARAMS, QuantSpec(group_size=4, group_axis=0), where=r".*kernel")
    with pytest.raises(ValueError, match="Dense_0/bias: channel_axes=-2 is out of range"):
        fake_quant_tree(PARAMS, QuantSpec(channel_axes=(-2,)), where=r".*bias")


def test_fake_quant_tree_stochastic_rounding_uses_a_different_key_per_leaf():
    """With one key, two identical leaves are rounded with independent noise."""
    leaf = jnp.linspace(-1.0, 1.0, 64)
    out = fake_quant_tree({"a": leaf, "b": leaf}, QuantSpec(bits=3, rounding="stochastic"),
                          key=jax.random.key(0))
    assert not np.array_equal(np.asarray(out["a"]), np.asarray(out["b"]))


def test_under_jit_a_nan_propagates_and_a_huge_asymmetric_range_stays_finite():
    """A NaN seen under jit (where it cannot be checked) gives NaN, not a scale of 1 that
    silently rounds the rest of the tensor; hi - lo near the float32 limit does not overflow."""
    x = jnp.array([[0.25, -1.5, jnp.nan], [0.3, 0.7, -0.2]])
    out = jax.jit(lambda x: fake_quant(x, QuantSpec()))(x)
    assert bool(jnp.isnan(out).all())
    huge = jnp.array([3e38, -3e38, 1e38])
    got = fake_quant(huge, QuantSpec(symmetric=False))
    assert bool(jnp.isfinite(got).all())
    np.testing.assert_allclose(got, huge, rtol=0, atol=6e38 / 255)  # within one step


def test_concrete_inf_raises_with_static_ranges_too():
    """Like quantize: an Inf is not silently clipped to the largest level."""
    with pytest.raises(ValueError, match="NaN/Inf"):
        fake_quant(jnp.array([1.0, jnp.inf]), QuantSpec(), params=QuantParams(jnp.float32(0.1), None))
