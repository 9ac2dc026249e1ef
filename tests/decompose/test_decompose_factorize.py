"""Factorized leaves and the per-kernel decompositions: reconstruction, counts, pytree behaviour."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp
from jaxcomp.decompose import (
    CPKernel,
    ConvSpec,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
    balanced_modes,
    decompose_cp,
    decompose_svd,
    decompose_tt,
    decompose_tucker2,
)

RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(3, 3, 6, 8)).astype(np.float32)
DENSE = RNG.normal(size=(12, 8)).astype(np.float32)


def rel_error(leaf, kernel):
    return float(np.linalg.norm(np.asarray(leaf.materialize()) - kernel) / np.linalg.norm(kernel))


def test_conv_spec_normalises_flax_style_arguments():
    """ConvSpec accepts Flax's int / sequence / string forms and stores canonical tuples."""
    spec = ConvSpec(strides=2, padding=[1, (0, 2)], dilation=None)
    assert spec == ConvSpec(strides=(2, 2), padding=((1, 1), (0, 2)), dilation=(1, 1))
    assert ConvSpec(padding="same").padding == "SAME"
    assert hash(spec) == hash(ConvSpec(strides=(2, 2), padding=((1, 1), (0, 2))))


@pytest.mark.parametrize(
    "kwargs",
    [{"strides": 0}, {"dilation": (1, 2, 3)}, {"padding": "CAUSAL"}, {"padding": [1, 2, 3]},
     {"strides": 2.0}, {"strides": (2, 1.5)}, {"padding": 1.5}, {"padding": ((1, 1.5), 0)},
     {"dilation": True}],
)
def test_conv_spec_rejects_bad_values(kwargs):
    """A stride of 0, a 3-D dilation, CAUSAL padding, three pad pairs, or float strides and pads
    (regression: TypeError, or silently truncated) raise ValueError."""
    with pytest.raises(ValueError, match="ConvSpec"):
        ConvSpec(**kwargs)


def test_conv_spec_same_stride_two_is_asymmetric():
    """SAME with stride 2 and k = 3 on an even input pads (0, 1), as XLA does (not k // 2)."""
    assert ConvSpec(strides=2).resolve((8, 8), (3, 3)) == ((0, 1), (0, 1))
    assert ConvSpec(strides=2).output_hw((8, 8), (3, 3)) == (4, 4)


@pytest.mark.parametrize(
    "make, kernel",
    [
        (lambda k: decompose_svd(k, 8), DENSE),
        (lambda k: decompose_tt(k, 100, in_modes=(3, 4), out_modes=(2, 4)), DENSE),
        (lambda k: decompose_tucker2(k, (6, 8)), CONV),
    ],
    ids=["svd", "tt", "tucker2"],
)
def test_full_rank_reconstruction_is_exact(make, kernel):
    """At full rank, SVD, TT and Tucker-2 reproduce the kernel to float32 rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaf = make(kernel)
    assert rel_error(leaf, kernel) < 1e-5


def test_cp_recovers_an_exact_low_rank_kernel():
    """A kernel that is exactly CP rank 3 is reconstructed by a rank-3 CP decomposition."""
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=(n, 3)) for n in (3, 3, 6, 8)]
    kernel = np.einsum("hr,wr,ir,or->hwio", *factors)
    assert rel_error(decompose_cp(kernel, 3, n_iter_max=500), kernel) < 1e-4


@pytest.mark.parametrize(
    "make, ranks, kernel",
    [
        (decompose_svd, [1, 2, 4, 6, 8], DENSE),
        (lambda k, r: decompose_tucker2(k, (r, r)), [1, 2, 4, 6], CONV),
        (lambda k, r: decompose_tt(k, r, in_modes=(3, 4), out_modes=(2, 4)), [1, 2, 4, 8], DENSE),
    ],
    ids=["svd", "tucker2", "tt"],
)
def test_error_decreases_with_rank(make, ranks, kernel):
    """The relative reconstruction error does not grow as the rank grows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = [rel_error(make(kernel, r), kernel) for r in ranks]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > errors[-1]


def test_full_rank_tucker_mode_is_folded_into_the_core():
    """A Tucker-2 mode kept at full rank has no factor: a 1-channel first layer is Tucker-1."""
    kernel = RNG.normal(size=(5, 5, 1, 6))
    leaf = decompose_tucker2(kernel, (1, 3))
    assert leaf.u_in is None and leaf.u_out.shape == (3, 6) and leaf.core.shape == (5, 5, 1, 3)
    assert leaf.num_params == 25 * 3 + 3 * 6


def test_parameter_counts_match_the_hand_formulas():
    """num_params: SVD r(in+out), Tucker-2 cin r_in + kh kw r_in r_out + r_out cout, CP r(sum dims)."""
    assert decompose_svd(DENSE, 3).num_params == 3 * (12 + 8)
    assert decompose_tucker2(CONV, (2, 5)).num_params == 6 * 2 + 9 * 2 * 5 + 5 * 8
    assert decompose_cp(CONV, 4).num_params == 4 * (3 + 3 + 6 + 8)
    tt = decompose_tt(DENSE, 2, in_modes=(3, 4), out_modes=(2, 4))
    assert tt.num_params == 1 * 6 * 2 + 2 * 16 * 1
    assert tt.dense_params == 96 and tt.rank == (2,)


def test_leaves_are_pytrees_of_plain_arrays_with_static_metadata():
    """Factors are the children (plain arrays any tree transform reaches); the spec is metadata."""
    leaf = decompose_tucker2(CONV, (2, 3), spec=ConvSpec(strides=2))
    children, treedef = jax.tree.flatten(leaf)
    assert [c.shape for c in children] == [(3, 3, 2, 3), (6, 2), (3, 8)]
    assert all(isinstance(c, jax.Array) for c in children)
    rebuilt = jax.tree.unflatten(treedef, [2 * c for c in children])
    assert rebuilt.spec == ConvSpec(strides=2)
    chex.assert_trees_all_close(rebuilt.materialize(), 8 * leaf.materialize(), rtol=1e-5)


def test_materialize_and_report_see_factorized_leaves():
    """jaxcomp.materialize gives the dense kernel; the report counts the factors' bytes."""
    tree = {"conv": {"kernel": decompose_tucker2(CONV, (2, 3)), "bias": jnp.zeros(8)}}
    dense = jaxcomp.materialize(tree)
    assert dense["conv"]["kernel"].shape == (3, 3, 6, 8)
    row = next(r for r in jaxcomp.report(tree).rows if r.path == "conv/kernel")
    assert row.kind == "Tucker2" and row.nbytes == 4 * (54 + 12 + 24)
    assert "ranks (2, 3)" in row.detail


def test_materialize_runs_under_jit():
    """materialize of every leaf type traces under jit and matches the eager result."""
    leaves = [
        decompose_svd(DENSE, 3), decompose_tt(DENSE, 2, order=2), decompose_tucker2(CONV, 2),
        decompose_cp(CONV, 3),
    ]
    for leaf in leaves:
        chex.assert_trees_all_close(jax.jit(lambda l: l.materialize())(leaf), leaf.materialize())


def test_factors_keep_the_kernel_dtype():
    """A bfloat16 kernel gives bfloat16 factors (the decomposition runs in float64 on the host)."""
    leaf = decompose_svd(jnp.asarray(DENSE, jnp.bfloat16), 4)
    assert leaf.u.dtype == jnp.bfloat16 and leaf.dtype == jnp.bfloat16
    assert rel_error(decompose_svd(DENSE, 4), DENSE) == pytest.approx(
        rel_error(leaf, DENSE), abs=0.02
    )


def test_decompositions_are_deterministic():
    """Two decompositions of the same kernel give identical factors (seeded, SVD-initialised)."""
    for make in (lambda: decompose_cp(CONV, 5, seed=3), lambda: decompose_tucker2(CONV, (3, 4))):
        chex.assert_trees_all_equal(make(), make())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: decompose_svd(CONV, 2), "expects a 2-D kernel"),
        (lambda: decompose_tucker2(DENSE, 2), "expects a 4-D kernel"),
        (lambda: decompose_svd(np.full((4, 4), np.nan), 2), "NaN"),
        (lambda: decompose_svd(jax.ShapeDtypeStruct((4, 4), jnp.float32), 2), "abstract"),
        (lambda: decompose_svd(np.ones((4, 4), np.int32), 2), "floating point"),
        (lambda: decompose_svd(np.ones((0, 4), np.float32), 1), r"empty kernel of shape \(0, 4\)"),
        (lambda: decompose_tt(DENSE, 2, in_modes=(5, 2), out_modes=(2, 4)), "do not factor"),
        (lambda: decompose_svd(None, 2), "kernel must be an array, got NoneType"),
        (lambda: decompose_tt(DENSE, 2, in_modes=12, out_modes=8), "in_modes must be a sequence"),
        (lambda: decompose_tt(DENSE, 2, in_modes=(3.0, 4.0), out_modes=(2, 4)), "in_modes"),
        (lambda: decompose_tt(DENSE, 2, order=2.0), r"order must be an int >= 2, got 2\.0"),
        (lambda: decompose_tucker2(CONV, 2, n_iter_max=0), "n_iter_max must be an int >= 1"),
        (lambda: decompose_tucker2(CONV, 2, n_iter_max=2.5), "n_iter_max .* got 2.5"),
        (lambda: decompose_cp(CONV, 2, seed="a"), "seed must be an int"),
        (lambda: decompose_tucker2(CONV, 2, spec="SAME"), "spec must be a ConvSpec"),
    ],
)
def test_bad_kernels_raise_value_error_naming_the_kernel(call, match):
    """Wrong rank of kernel, NaNs, abstract or integer kernels and bad TT modes raise ValueError."""
    with pytest.raises(ValueError, match=match):
        call()


def test_balanced_modes_factor_the_size():
    """balanced_modes returns `order` factors whose product is n."""
    for n, order in [(4096, 3), (784, 3), (300, 2), (13, 3)]:
        modes = balanced_modes(n, order)
        assert len(modes) == order and math.prod(modes) == n
    assert balanced_modes(np.int64(12), np.int64(2)) == (4, 3)
    for n, order in [(12.0, 2), (12, 2.0), (True, 2)]:
        with pytest.raises(ValueError, match="must be an int"):
            balanced_modes(n, order)


def test_hand_built_leaves_report_shapes():
    """The leaf classes can be built by hand from factors (e.g. loaded from a checkpoint)."""
    assert SVDKernel(jnp.ones((4, 2)), jnp.ones((2, 3))).shape == (4, 3)
    assert TTKernel((jnp.ones((1, 2, 2, 3)), jnp.ones((3, 2, 3, 1))), in_modes=(2, 2), out_modes=(2, 3)).shape == (4, 6)
    assert CPKernel(jnp.ones((5, 2)), jnp.ones((3, 2)), jnp.ones((1, 2)), jnp.ones((2, 7))).shape == (3, 1, 5, 7)
    assert Tucker2Kernel(jnp.ones((1, 1, 2, 2)), None, jnp.ones((2, 9))).shape == (1, 1, 2, 9)
