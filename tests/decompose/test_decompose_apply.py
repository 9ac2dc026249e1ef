"""Apply functions: the factor sequence equals the dense layer on the materialized kernel."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcomp
from jaxcomp.decompose import (
    CPKernel,
    ConvSpec,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
    cp_conv,
    decompose_cp,
    decompose_svd,
    decompose_tt,
    decompose_tucker2,
    factorized_apply,
    svd_dense,
    tt_dense,
    tucker2_conv,
)

RNG = np.random.default_rng(0)
KERNEL = RNG.normal(size=(3, 3, 6, 5))
X = jnp.asarray(RNG.normal(size=(2, 8, 7, 6)), jnp.float32)
BIAS = jnp.arange(5.0)
DENSE = RNG.normal(size=(12, 8))
XD = jnp.asarray(RNG.normal(size=(3, 2, 12)), jnp.float32)


def dense_conv(x, kernel, bias, spec: ConvSpec):
    """The reference: one lax convolution with the dense kernel (CIRCULAR as Flax pads it)."""
    padding = spec.padding
    if padding == "CIRCULAR":
        pads = spec.resolve(x.shape[1:3], kernel.shape[:2])
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="wrap")
        padding = "VALID"
    y = lax.conv_general_dilated(
        x, kernel, spec.strides, padding, rhs_dilation=spec.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias


SPECS = [
    ConvSpec(),
    ConvSpec(strides=2),
    ConvSpec(strides=2, padding="VALID"),
    ConvSpec(padding=((1, 0), (2, 1))),
    ConvSpec(strides=(2, 1), dilation=2),
    ConvSpec(padding="VALID", dilation=(1, 2)),
    ConvSpec(strides=2, padding="CIRCULAR"),
]
LEAVES = {
    "tucker2": lambda spec: decompose_tucker2(KERNEL, (3, 2), spec=spec),
    "tucker1": lambda spec: decompose_tucker2(KERNEL, (6, 2), spec=spec),
    "cp": lambda spec: decompose_cp(KERNEL, 4, spec=spec),
}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("kind", sorted(LEAVES))
def test_factorized_conv_equals_dense_conv_on_the_reconstruction(kind, spec):
    """For stride 1/2, SAME/VALID/explicit/CIRCULAR padding and dilation, with a bias, the factor
    sequence (jitted) equals one dense convolution with `materialize()`."""
    leaf = LEAVES[kind](spec)
    got = jax.jit(factorized_apply)(X, leaf, BIAS)
    want = dense_conv(X, leaf.materialize(), BIAS, spec)
    assert got.shape == want.shape
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


class DenseApplyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_svd_and_tt_dense_equal_the_matmul(self):
        """svd_dense and tt_dense equal `x @ materialize() + bias` for inputs with extra batch axes."""
        for leaf, fn in [(decompose_svd(DENSE, 3), svd_dense), (decompose_tt(DENSE, 3, order=2), tt_dense)]:
            got = self.variant(fn)(XD, leaf, jnp.ones(8))
            chex.assert_trees_all_close(got, XD @ leaf.materialize() + 1.0, atol=1e-5, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unbatched_conv_input(self):
        """A conv input without batch axis (H, W, C) works, as in Flax."""
        leaf = decompose_tucker2(KERNEL, (3, 2))
        got = self.variant(tucker2_conv)(X[0], leaf)
        chex.assert_trees_all_close(got, tucker2_conv(X, leaf)[0], atol=1e-6)


def test_bfloat16_inputs_and_factors_stay_bfloat16():
    """bf16 inputs with bf16 factors compute in bf16; results stay close to float32."""
    leaf = decompose_tucker2(jnp.asarray(KERNEL, jnp.bfloat16), (3, 2))
    y = tucker2_conv(X.astype(jnp.bfloat16), leaf)
    assert y.dtype == jnp.bfloat16
    ref = tucker2_conv(X, jax.tree.map(lambda a: a.astype(jnp.float32), leaf))
    assert float(jnp.abs(y.astype(jnp.float32) - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_wrong_input_features_raise():
    """An input whose channel count differs from the kernel's raises ValueError."""
    with pytest.raises(ValueError, match="features"):
        tucker2_conv(X[..., :5], decompose_tucker2(KERNEL, 2))
    with pytest.raises(ValueError, match="expects a factorized kernel .* got ArrayImpl"):
        factorized_apply(X, jnp.ones((3, 3, 6, 5)))


def test_apply_functions_reject_the_wrong_kernel_class_and_scalar_inputs():
    """Another kernel class or a scalar input is a ValueError naming what is expected
    (regression: AttributeError and IndexError from inside)."""
    svd = SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4)))
    tt = TTKernel((jnp.ones((1, 2, 2, 2)), jnp.ones((2, 3, 2, 1))), in_modes=(2, 3),
                  out_modes=(2, 2))
    with pytest.raises(ValueError, match=r"svd_dense expects a SVDKernel kernel, got TTKernel "
                                         r"\(a TTKernel runs with tt_dense\)"):
        svd_dense(jnp.ones((1, 6)), tt)
    with pytest.raises(ValueError, match="tt_dense expects a TTKernel kernel, got SVDKernel"):
        tt_dense(jnp.ones((1, 6)), svd)
    with pytest.raises(ValueError, match="tucker2_conv expects a Tucker2Kernel kernel"):
        tucker2_conv(X, svd)
    with pytest.raises(ValueError, match="cp_conv expects a CPKernel kernel, got ArrayImpl"):
        cp_conv(X, jnp.ones((3, 3, 6, 5)))
    for fn, leaf in ((svd_dense, svd), (tt_dense, tt)):
        with pytest.raises(ValueError, match="scalar"):
            fn(jnp.float32(1.0), leaf)
        with pytest.raises(ValueError, match="must be an array, got NoneType"):
            fn(None, leaf)


def conv_flops_input():
    return (2, 8, 8, 6)


@pytest.mark.parametrize("spec", [ConvSpec(), ConvSpec(strides=2), ConvSpec(padding="VALID")],
                         ids=lambda s: s.describe())
def test_flops_by_hand_match_count_flops(spec):
    """Tucker-2/SVD/TT FLOPs by formula equal jaxcomp.count_flops of the apply function; CP's
    count_flops sees the two 1x1 stages (its depthwise stages are elementwise multiply-adds)."""
    x = jax.ShapeDtypeStruct(conv_flops_input(), jnp.float32)
    n, h, w, cin = conv_flops_input()
    tucker = decompose_tucker2(KERNEL, (3, 2), spec=spec)
    counted = jaxcomp.count_flops(lambda p, x: tucker2_conv(x, p["k"]), {"k": tucker}, x)["k"]
    ho, wo = spec.output_hw((h, w), (3, 3))
    by_hand = 2 * n * (h * w * cin * 3 + ho * wo * 9 * 3 * 2 + ho * wo * 2 * 5)
    assert counted == tucker.flops(conv_flops_input()) == by_hand

    cp = decompose_cp(KERNEL, 4, spec=spec)
    counted = jaxcomp.count_flops(lambda p, x: cp_conv(x, p["k"]), {"k": cp}, x)["k"]
    pointwise = 2 * n * 4 * (h * w * cin + ho * wo * 5)
    depthwise = 2 * n * 4 * (ho * w * 3 + ho * wo * 3)
    assert counted == pointwise and cp.flops(conv_flops_input()) == pointwise + depthwise
    dense = 2 * n * ho * wo * 9 * cin * 5
    assert tucker.dense_flops(conv_flops_input()) == cp.dense_flops(conv_flops_input()) == dense


@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", ((1, 0), (0, 1))])
def test_a_strided_pointwise_tucker2_conv_subsamples_before_its_first_stage(padding):
    """A strided 1x1 conv reads every stride-th position only: its first 1x1 stage runs on the
    output positions (regression: on every input position, so factorizing a stride-2
    projection shortcut could cost more than the dense conv). Padded 1x1s keep the full run."""
    kernel = jax.random.normal(jax.random.key(5), (1, 1, 12, 10))
    leaf = decompose_tucker2(kernel, (3, 2), spec=ConvSpec(strides=2, padding=padding))
    for hw in ((8, 8), (7, 9)):
        x = jax.random.normal(jax.random.key(6), (2, *hw, 12))
        pads = "VALID" if padding == "CIRCULAR" else leaf.spec.resolve(hw, (1, 1))
        ref = jax.lax.conv_general_dilated(x, leaf.materialize(), (2, 2), pads,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = tucker2_conv(x, leaf)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
        n, ho, wo = 2, *out.shape[1:3]
        counted = jaxcomp.count_flops(lambda p, x: tucker2_conv(x, p), leaf, x).total
        positions_in = n * ho * wo if padding != ((1, 0), (0, 1)) else n * hw[0] * hw[1]
        assert leaf.subsamples_first() == (padding != ((1, 0), (0, 1)))
        assert counted == leaf.flops(x.shape) == 2 * (positions_in * 12 * 3 + n * ho * wo * (3 * 2 + 2 * 10))


def test_dense_flops_by_hand_match_count_flops():
    """SVD: 2 b r (in + out); TT: the sum over cores of its contraction, as count_flops sees it."""
    x = jax.ShapeDtypeStruct((5, 12), jnp.float32)
    svd = decompose_svd(DENSE, 3)
    assert jaxcomp.count_flops(lambda p, x: svd_dense(x, p), svd, x).total == svd.flops((5, 12))
    assert svd.flops((5, 12)) == 2 * 5 * 3 * (12 + 8)
    tt = decompose_tt(DENSE, 2, in_modes=(3, 4), out_modes=(2, 4))
    assert jaxcomp.count_flops(lambda p, x: tt_dense(x, p), tt, x).total == tt.flops((5, 12))
    # core 1: 5 batch x 4 rest-in x (1 x 3 x 2 x 2) x 2; core 2: 5 x 2 done-out x (2 x 4 x 4 x 1) x 2
    assert tt.flops((5, 12)) == 2 * 5 * 4 * 12 + 2 * 5 * 2 * 32


def test_factors_that_are_compressed_leaves_are_materialized_when_run():
    """A factor replaced by a compressed leaf (e.g. quantized) is materialized by materialize and
    by the apply function."""
    from leaves import ScaledInt

    leaf = decompose_cp(KERNEL, 3)
    scale = jnp.abs(leaf.a_in).max(axis=1, keepdims=True) / 127
    q = jnp.round(leaf.a_in / scale).astype(jnp.int8)
    quantized = CPKernel(ScaledInt(q, scale), leaf.a_h, leaf.a_w, leaf.a_out)
    assert quantized.shape == leaf.shape and quantized.num_params == leaf.num_params
    y = cp_conv(X, quantized)
    chex.assert_trees_all_close(y, dense_conv(X, quantized.materialize(), 0.0, ConvSpec()), atol=1e-4)
    assert float(jnp.abs(quantized.materialize() - leaf.materialize()).max()) < 0.05


def test_hand_built_tucker_without_factors_is_a_plain_conv():
    """A Tucker2Kernel with neither factor is the core convolution itself."""
    leaf = Tucker2Kernel(jnp.asarray(KERNEL))
    chex.assert_trees_all_close(tucker2_conv(X, leaf), dense_conv(X, KERNEL, 0.0, ConvSpec()), atol=1e-5)
