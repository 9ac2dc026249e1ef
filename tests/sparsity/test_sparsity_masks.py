"""Mask trees, the Masked compressed leaf, and sparsity_of."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp
import jaxcomp.sparsity as sp


def _params():
    return {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.ones(2)}}


def _masks():
    return {"Dense_0": {"kernel": jnp.array([[True, False], [True, False]]), "bias": None}}


def test_apply_masks_zeroes_pruned_weights_and_keeps_the_rest():
    """apply_masks gives where(mask, w, 0) at masked leaves, unmasked leaves untouched."""
    out = sp.apply_masks(_params(), _masks())
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], [[1.0, 0.0], [3.0, 0.0]])
    assert out["Dense_0"]["bias"] is _params()["Dense_0"]["bias"] or np.all(
        out["Dense_0"]["bias"] == 1.0)


def test_uint8_and_broadcastable_masks_are_accepted():
    """A uint8 mask, or one broadcastable to the weight (a column mask), works like bool."""
    masks = {"Dense_0": {"kernel": jnp.array([[1, 0]], jnp.uint8), "bias": None}}
    out = sp.apply_masks(_params(), masks)
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], [[1.0, 0.0], [3.0, 0.0]])


@pytest.mark.parametrize(
    "masks, message",
    [
        ({"Dense_0": {"kernel": jnp.ones((3, 2), bool), "bias": None}}, "Dense_0/kernel"),
        ({"Dense_0": {"kernel": jnp.ones((2, 2), jnp.float32), "bias": None}}, "Dense_0/kernel"),
        ({"Dense_1": {"kernel": jnp.ones((2, 2), bool)}}, "structure"),
    ],
)
def test_mismatched_masks_raise_value_error_naming_the_path(masks, message):
    """Wrong shape, dtype or structure raises ValueError naming the path."""
    with pytest.raises(ValueError, match=message):
        sp.apply_masks(_params(), masks)


def test_masked_leaf_materializes_and_counts_a_packed_bitmask():
    """Masked materializes to where(mask, value, 0); nbytes = bitmask + kept values."""
    tree = sp.to_masked(_params(), _masks())
    leaf = tree["Dense_0"]["kernel"]
    assert isinstance(leaf, sp.Masked) and jaxcomp.is_compressed(leaf)
    np.testing.assert_array_equal(jaxcomp.materialize(tree)["Dense_0"]["kernel"],
                                  [[1.0, 0.0], [3.0, 0.0]])
    assert leaf.nbytes == 1 + 2 * 4
    big = sp.Masked(jnp.ones((100, 80)), jnp.arange(8000).reshape(100, 80) % 10 == 0)
    assert big.nbytes == 1000 + 800 * 4
    assert "90.0% pruned" in big.summary()


def test_abstract_masked_leaf_counts_every_value_as_kept():
    """Under eval_shape the mask has no values: nbytes and the report count all as kept."""
    leaf = sp.Masked(jnp.ones((64, 64)), jnp.eye(64, dtype=bool))
    abstract = jax.eval_shape(lambda: leaf)
    assert isinstance(abstract.mask, jax.ShapeDtypeStruct)
    assert abstract.nbytes == 64 * 64 // 8 + 64 * 64 * 4
    assert "pruned" not in abstract.summary()
    assert jaxcomp.report({"k": abstract}).totals.nbytes == abstract.nbytes


def test_masked_leaves_show_in_the_report():
    """jaxcomp.report counts Masked leaves as stored (bitmask + kept values)."""
    weights = jax.random.normal(jax.random.key(0), (64, 32))
    params = {"Dense_0": {"kernel": weights}}
    pruned, masks = sp.prune_now(params, sp.Pruner(sparsity=0.9))
    report = jaxcomp.report(sp.to_masked(pruned, masks))
    row = report.rows[0]
    assert row.kind == "Masked"
    assert row.nbytes == 64 * 32 // 8 + round(0.1 * 64 * 32) * 4
    assert abs(row.sparsity - 0.9) < 1e-3


def test_masked_is_a_pytree_that_jits():
    """Masked leaves go through jit and tree maps as their two arrays."""
    leaf = sp.Masked(jnp.ones(4), jnp.array([True, False, True, False]))
    out = jax.jit(lambda t: jaxcomp.materialize(t))({"w": leaf})
    np.testing.assert_array_equal(out["w"], [1.0, 0.0, 1.0, 0.0])
    assert len(jax.tree.leaves(leaf)) == 2


def test_sparsity_of_counts_per_leaf_and_globally():
    """Per-leaf and global zero fractions, on params and on masks, also under jit."""
    tree = {"a": jnp.array([0.0, 1.0, 0.0, 2.0]), "b": jnp.zeros(4), "c": None}
    stats = jax.jit(sp.sparsity_of)(tree)
    assert float(stats.per_leaf["a"]) == 0.5 and float(stats.total) == 0.75
    assert stats.size == 8 and "c" not in stats.per_leaf
    mask_stats = sp.sparsity_of(_masks())
    assert float(mask_stats.total) == 0.5
    assert float(sp.sparsity_of(tree, where="a").total) == 0.5


def test_ones_masks_select_kernels_only():
    """ones_masks keeps everything at the selected leaves and puts None elsewhere."""
    masks = sp.ones_masks(_params())
    assert masks["Dense_0"]["bias"] is None
    assert bool(masks["Dense_0"]["kernel"].all())
    with pytest.raises(ValueError):
        sp.ones_masks(_params(), where="nothing_matches")


def test_masked_nbytes_counts_sub_byte_values_at_their_width():
    """int4 kept values count 4 bits each (regression: 8)."""
    leaf = jaxcomp.sparsity.Masked(jnp.arange(4, dtype=jnp.int4), jnp.array([1, 1, 1, 0], bool))
    assert leaf.nbytes == 1 + 2  # 4-bit mask in one byte, 3 kept int4 values in two
