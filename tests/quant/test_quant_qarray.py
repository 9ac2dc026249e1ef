"""QArray storage: bytes counted at real bit widths, packing, quantize_tree, reports."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcomp
from jaxcomp.quant import QArray, QuantSpec, pack_bits, quantize, quantize_tree, unpack_bits

W = jax.random.normal(jax.random.key(0), (64, 32))


@pytest.mark.parametrize("bits, width", [(8, 8), (4, 4), (3, 4), (2, 2)])
def test_nbytes_counts_sub_byte_codes_at_their_width_plus_scales(bits, width):
    """int4 codes count 4 bits and int2 codes 2 bits (jnp counts a byte), plus the scales."""
    q = quantize(W, QuantSpec(bits=bits, channel_axes=(-1,)))
    assert q.nbytes == W.size * width // 8 + 32 * 4
    asym = quantize(W, QuantSpec(bits=bits, channel_axes=(-1,), symmetric=False))
    assert asym.nbytes == q.nbytes + 32 * width // 8


@pytest.mark.parametrize("bits, fraction", [(8, 1), (4, 2), (2, 4)])
def test_packed_values_really_are_a_half_or_a_quarter_of_int8(bits, fraction):
    """packed_values() is a uint8 buffer of size * width / 8 bytes that unpacks to the codes."""
    q = quantize(W, QuantSpec(bits=bits))
    packed = q.packed_values()
    assert packed.dtype == np.uint8
    assert packed.nbytes == W.size // fraction
    codes = unpack_bits(packed, q.values.dtype, q.shape)
    np.testing.assert_array_equal(codes.astype(np.int32), np.asarray(q.values).astype(np.int32))


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([jnp.int2, jnp.uint2, jnp.int4, jnp.uint4, jnp.int8, jnp.uint8, jnp.int16]),
    data=st.data(),
)
def test_pack_unpack_round_trips_every_code(dtype, data):
    """unpack_bits(pack_bits(codes)) == codes for every integer storage dtype and odd sizes."""
    info = jnp.iinfo(dtype)
    codes = data.draw(hnp.arrays(np.int32, st.integers(1, 37),
                                 elements=st.integers(int(info.min), int(info.max))))
    typed = codes.astype(dtype)
    out = unpack_bits(pack_bits(typed), dtype, typed.shape)
    np.testing.assert_array_equal(out.astype(np.int32), codes)


@pytest.mark.parametrize("codes", [None, [1.5], np.array([1.5]), np.array([1.0], jnp.bfloat16),
                                   np.array(["a"])])
def test_pack_bits_takes_only_codes(codes):
    """Floats, lists and objects are not codes: packing their raw bytes would be no format."""
    with pytest.raises(ValueError, match="pack_bits packs integer or float8 codes"):
        pack_bits(codes)


def test_fp8_values_pack_one_byte_each():
    """float8 codes are stored and packed a byte per element."""
    q = quantize(W, QuantSpec(fp8="e4m3", channel_axes=(-1,)))
    assert q.values.dtype == jnp.float8_e4m3fn
    assert q.packed_values().nbytes == W.size
    assert q.nbytes == W.size + 32 * 4


def test_report_counts_real_bits_and_the_compression_ratio():
    """jaxcomp.report sees QArray rows at their stored size: about 8x for int4 weights."""
    params = {"Dense_0": {"kernel": W, "bias": jnp.zeros(32)}}
    q = quantize_tree(params, QuantSpec(bits=4, channel_axes=(-1,)), where=r".*kernel")
    rep = jaxcomp.report(q)
    row = {r.path: r for r in rep.rows}["Dense_0/kernel"]
    assert row.kind == "QArray" and row.nbytes == 64 * 32 // 2 + 32 * 4
    assert row.dense_nbytes == W.size * 4
    assert "int4 sym per-channel" in row.detail
    assert rep.totals.compression_ratio == pytest.approx((W.size * 4 + 128) / (row.nbytes + 128))


def test_qarray_is_a_pytree_that_jits_and_materializes():
    """QArray passes through jit; materialize gives the dense array; shape/dtype are dense."""
    q = quantize(W.astype(jnp.bfloat16), QuantSpec(bits=8, channel_axes=(-1,)))
    assert q.shape == (64, 32) and q.dtype == jnp.bfloat16
    out = jax.jit(lambda t: jaxcomp.materialize(t))(q)
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(jnp.float32), W, atol=0.05)


def test_transposed_storage_keeps_the_dense_view():
    """Codes stored (N, K) still materialize, count and pack like the dense (K, N) array."""
    q = quantize(W, QuantSpec(bits=4, channel_axes=(-1,)))
    t = q.transpose_storage((1, 0))
    assert t.values.shape == (32, 64) and t.shape == (64, 32)
    chex.assert_trees_all_equal(t.materialize(), q.materialize())
    assert t.nbytes == q.nbytes
    np.testing.assert_array_equal(t.packed_values(), q.packed_values())
    with pytest.raises(ValueError, match="not a permutation"):
        q.transpose_storage((0, 0))


def test_quantize_rejects_nan_and_non_float_naming_the_path():
    """NaN/Inf and integer inputs raise ValueError naming the path and the value."""
    params = {"Dense_0": {"kernel": W.at[3, 5].set(jnp.nan)}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"Dense_0/kernel: 1 NaN/Inf value\(s\), e.g. nan at index \(3, 5\)"):
        quantize_tree(params, QuantSpec(), where=r".*kernel")
    with pytest.raises(ValueError, match="step: expected a floating-point array, got dtype int32"):
        quantize_tree(params, QuantSpec(), where="step")
    with pytest.raises(ValueError, match="selects no leaf"):
        quantize_tree(params, QuantSpec(), where=r"nothing")


def test_quantize_with_static_params_uses_them():
    """quantize(params=...) uses the given scale instead of the data's range."""
    from jaxcomp.quant import QuantParams

    q = quantize(jnp.array([0.2, 5.0]), QuantSpec(), params=QuantParams(jnp.float32(0.1)))
    np.testing.assert_array_equal(q.values, [2, 50])
    assert isinstance(q, QArray)


def test_quantize_checks_static_params_and_takes_empty_arrays():
    """Static params of the wrong shape or with a zero/negative/NaN scale raise naming the path;
    an empty array quantizes to an empty QArray (its range is zero, so its scale is 1)."""
    from jaxcomp.quant import QuantParams

    spec = QuantSpec(channel_axes=(-1,))
    with pytest.raises(ValueError, match=r"Dense_0/kernel: scale of shape \(8,\)"):
        quantize(jnp.ones((8, 4)), spec, params=QuantParams(jnp.ones(8)), path="Dense_0/kernel")
    for bad in (0.0, -1.0, jnp.nan):
        with pytest.raises(ValueError, match="k: scales must be finite and positive"):
            quantize(jnp.ones((8, 4)), spec, params=QuantParams(jnp.full(4, bad)), path="k")
    q = quantize(jnp.zeros((0, 4)), spec)
    assert q.materialize().shape == (0, 4)
    np.testing.assert_array_equal(q.scale, np.ones((1, 4)))


def test_spec_rules_give_each_layer_its_spec_first_match_wins():
    """quantize_tree and fake_quant_tree take {where: spec} or (where, spec) pairs: a
    transformer's q/k/v kernels per (heads, head_dim) channel, the rest per column, in one call;
    leaves no rule matches are left; a rule that quantizes nothing is an error."""
    from jaxcomp.quant import fake_quant, fake_quant_tree

    key = jax.random.key(0)
    params = {"attn": {"query": {"kernel": jax.random.normal(key, (16, 2, 8))},
                       "out": {"kernel": jax.random.normal(key, (2, 8, 16))}},
              "mlp": {"kernel": jax.random.normal(key, (16, 32)), "bias": jnp.ones(32)}}
    qkv, rest = QuantSpec(channel_axes=(1, 2)), QuantSpec(bits=4, channel_axes=(-1,))
    for rules in ({r"attn/query/kernel": qkv, r".*kernel": rest},
                  [(r"attn/query/kernel", qkv), (lambda path, _: path.endswith("kernel"), rest)]):
        q = quantize_tree(params, rules)
        assert q["attn"]["query"]["kernel"].spec == qkv and q["mlp"]["kernel"].spec == rest
        assert q["attn"]["out"]["kernel"].spec == rest and q["mlp"]["bias"] is params["mlp"]["bias"]
        fq = jax.jit(lambda p, rules=rules: fake_quant_tree(p, rules))(params)
        chex.assert_trees_all_close(fq["attn"]["query"]["kernel"],
                                    fake_quant(params["attn"]["query"]["kernel"], qkv))
        chex.assert_trees_all_close(fq["mlp"]["kernel"], fake_quant(params["mlp"]["kernel"], rest))
    # where= still narrows the selection.
    q = quantize_tree(params, {r".*kernel": rest}, where=r"mlp/.*")
    assert isinstance(q["mlp"]["kernel"], QArray) and not isinstance(q["attn"]["out"]["kernel"], QArray)
    with pytest.raises(ValueError, match=r"rule where='nothing' quantizes nothing: it matches no "
                                         r"selected leaf; selected: \['attn/out/kernel'"):
        quantize_tree(params, {"nothing": rest}, where=r".*kernel")
    with pytest.raises(ValueError, match="every leaf it matches is taken by an earlier rule"):
        fake_quant_tree(params, {r".*kernel": rest, r"mlp/kernel": qkv})
    with pytest.raises(ValueError, match="must give a QuantSpec, got 8"):
        quantize_tree(params, {r".*": 8})
    with pytest.raises(ValueError, match="spec must be a QuantSpec"):
        quantize_tree(params, None)


def test_a_factorized_kernel_is_not_silently_rebuilt_dense_to_be_quantized():
    """where=r".*kernel" on a decomposed tree selects factorized kernels: quantizing them would
    store the dense rebuild (more bytes and FLOPs than the factors), so it is a ValueError
    pointing at map_factors, which quantizes the factors."""
    from jaxcomp.decompose import FixedRank, decompose_tree, map_factors
    from jaxcomp.quant import fake_quant_tree, kmeans_tree, lsq_init_tree

    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (16, 12)), "bias": jnp.zeros(12)}}
    factored = decompose_tree(params, FixedRank(4))
    spec = QuantSpec(channel_axes=(-1,))
    for call in (lambda: quantize_tree(factored, spec, where=r".*kernel"),
                 lambda: fake_quant_tree(factored, spec, where=r".*kernel"),
                 lambda: kmeans_tree(factored, 4, where=r".*kernel"),
                 lambda: lsq_init_tree(factored, spec, where=r".*kernel")):
        with pytest.raises(ValueError, match=r"d/kernel is a factorized kernel \(SVD\); quantizing "
                                             r"it would rebuild .*map_factors"):
            call()
    quantized = map_factors(lambda f: quantize(f, spec), factored)
    assert isinstance(quantized["d"]["kernel"].u, QArray)
    assert jaxcomp.report(quantized).totals.nbytes < jaxcomp.report(factored).totals.nbytes
