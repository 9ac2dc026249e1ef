"""The compressed-leaf protocol, checked with a trivial leaf (int values times a scale)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp
from jaxcomp import CompressedLeaf, compressed_leaf, is_compressed, materialize, stored_nbytes
from leaves import ScaledInt, make_scaled_int


def test_is_compressed_distinguishes_leaves_from_arrays():
    assert is_compressed(make_scaled_int())
    assert not is_compressed(jnp.ones(3))
    assert not is_compressed({"a": make_scaled_int()})


def test_materialize_replaces_compressed_leaves_and_keeps_plain_ones():
    leaf = make_scaled_int()
    plain = jnp.arange(3.0)
    out = materialize({"q": leaf, "w": plain, "n": None})
    chex.assert_trees_all_close(out["q"], leaf.values.astype(jnp.float32) * leaf.scale)
    assert out["w"] is plain
    assert out["n"] is None
    chex.assert_trees_all_close(materialize(leaf), out["q"])


def test_materialize_keeps_the_leaf_classes_asked_for():
    leaf = make_scaled_int()
    out = materialize({"q": leaf, "w": jnp.ones(2)}, keep=ScaledInt)
    assert out["q"] is leaf
    assert materialize({"q": leaf}, keep=(ScaledInt,))["q"] is leaf
    assert materialize({"q": leaf}, keep=[ScaledInt])["q"] is leaf
    with pytest.raises(ValueError, match="keep must be compressed-leaf classes, got 'ScaledInt'"):
        materialize({"q": leaf}, keep="ScaledInt")


def test_an_abstract_leaf_knows_its_shape_and_dtype():
    """Fields that are ShapeDtypeStructs (jax.eval_shape) still give the dense shape and dtype."""
    abstract = jax.eval_shape(lambda: make_scaled_int((4, 3)))
    assert abstract.shape == (4, 3) and abstract.dtype == jnp.float32


class MaterializeUnderJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_result_with_and_without_jit(self):
        tree = {"a": make_scaled_int(seed=1), "b": [make_scaled_int((2, 5), seed=2), jnp.ones(2)]}
        got = self.variant(materialize)(tree)
        want = jax.tree.map(
            lambda x: x.materialize() if is_compressed(x) else x, tree, is_leaf=is_compressed
        )
        chex.assert_trees_all_close(got, want)


def test_compressed_leaves_flatten_and_unflatten_as_pytrees():
    leaf = make_scaled_int()
    children, treedef = jax.tree.flatten(leaf)
    assert len(children) == 2  # values and scale; the label is static metadata
    rebuilt = jax.tree.unflatten(treedef, children)
    assert isinstance(rebuilt, ScaledInt) and rebuilt.label == "test"
    doubled = jax.tree.map(lambda x: x * 2, leaf)
    assert isinstance(doubled, ScaledInt)
    chex.assert_trees_all_close(doubled.scale, leaf.scale * 2)


def test_static_fields_are_part_of_the_tree_structure():
    a, b = make_scaled_int(), ScaledInt(make_scaled_int().values, make_scaled_int().scale, "other")
    assert jax.tree.structure(a) != jax.tree.structure(b)


def test_a_leaf_passes_through_jit_as_argument_and_result():
    @jax.jit
    def rescale(leaf):
        return ScaledInt(leaf.values, leaf.scale * 3, leaf.label)

    out = rescale(make_scaled_int())
    assert isinstance(out, ScaledInt)
    chex.assert_trees_all_close(out.materialize(), 3 * make_scaled_int().materialize())


def test_materialize_adds_nothing_to_a_jaxpr_without_compressed_leaves():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    x = jnp.ones((2, 3))

    def step(params, x):
        return jnp.sum(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])

    plain = jax.make_jaxpr(jax.jit(jax.grad(step)))(params, x)
    wrapped = jax.make_jaxpr(jax.jit(jax.grad(lambda p, x: step(materialize(p), x))))(params, x)
    # The jitted function's name differs (`step` vs `<lambda>`); the computation must not.
    assert str(plain).replace("step", "f") == str(wrapped).replace("<lambda>", "f")
    assert str(plain.jaxpr.eqns[0].params["jaxpr"]) == str(wrapped.jaxpr.eqns[0].params["jaxpr"])


def test_shape_dtype_size_and_summary_of_a_leaf():
    leaf = make_scaled_int((4, 3))
    assert leaf.shape == (4, 3) and leaf.dtype == jnp.float32 and leaf.size == 12
    assert leaf.ndim == 2 and leaf.kind == "ScaledInt"
    assert "int8" in leaf.summary()


def test_nbytes_counts_sub_byte_dtypes_at_their_width():
    int8_leaf = make_scaled_int((8, 4), dtype=jnp.int8)
    int4_leaf = make_scaled_int((8, 4), dtype=jnp.int4)
    assert int8_leaf.nbytes == 32 + 8 * 4
    assert int4_leaf.nbytes == 16 + 8 * 4
    assert stored_nbytes({"a": int4_leaf, "b": jnp.zeros(3, jnp.int2)}) == 48 + 1


def test_bit_width_and_stored_nbytes_reject_what_jax_cannot_store():
    """bit_width(None) is not NumPy's float64 (regression: 64); a Python int past int32 is a
    ValueError naming its path (regression: OverflowError), small ones count 4 bytes."""
    for bad in (None, "floatx", 5):
        with pytest.raises(ValueError, match="bit_width"):
            jaxcomp.core.bit_width(bad)
    assert stored_nbytes({"a": 3, "b": 2.0}) == 8
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match=r"stored_nbytes: leaf 'x/a': the Python int 1099"):
            stored_nbytes({"x": {"a": 2**40}})


def test_compressed_leaf_decorator_rejects_other_classes():
    with pytest.raises(TypeError, match="CompressedLeaf"):
        compressed_leaf(int)


def test_an_abstract_leaf_must_implement_materialize():
    @compressed_leaf
    class Incomplete(CompressedLeaf):
        values: jax.Array

    with pytest.raises(TypeError):
        Incomplete(jnp.ones(2))


def test_leaves_survive_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {"q": make_scaled_int((6, 2), seed=3), "w": jnp.arange(4.0)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", tree)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    assert isinstance(restored["q"], ScaledInt)
    chex.assert_trees_all_equal(restored, tree)


def test_device_put_with_a_sharding_keeps_the_leaf():
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    moved = jax.device_put(make_scaled_int(), sharding)
    assert isinstance(moved, ScaledInt)
    assert moved.values.sharding == sharding


def test_leaves_shard_over_a_mesh_of_eight_devices(subprocess_runner):
    out = subprocess_runner(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxcomp import materialize
        from leaves import make_scaled_int
        assert jax.device_count() == 8
        mesh = Mesh(jax.devices(), ("x",))
        sharding = NamedSharding(mesh, P("x"))
        leaf = jax.device_put(make_scaled_int((16, 4)), sharding)
        assert leaf.values.sharding == sharding and leaf.scale.sharding == sharding
        dense = jax.jit(materialize)(leaf)
        assert dense.sharding.is_equivalent_to(sharding, 2), dense.sharding
        assert (dense == make_scaled_int((16, 4)).materialize()).all()
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_unsigned_sub_byte_codes_checkpoint_with_orbax(tmp_path):
    """Orbax cannot write uint4/uint2 (4-bit codebook indices, unsigned 4- and 2-bit codes);
    checkpointable / from_checkpointable carry the same bits through int4/int2, bit-identically."""
    import orbax.checkpoint as ocp

    from jaxcomp.core import checkpointable, from_checkpointable
    from jaxcomp.quant import QuantSpec, kmeans_tree, quantize_tree

    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
              "b": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))}}
    tree = {"books": kmeans_tree(params, bits=4, where=r"a/kernel"),
            "codes": quantize_tree(params, QuantSpec(bits=2, signed=False), where=r"b/kernel"),
            "step": jnp.int32(7)}
    abstract = jax.eval_shape(lambda: tree)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", checkpointable(tree))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", checkpointable(abstract))
    back = from_checkpointable(restored, like=abstract)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="differ in structure"):
        from_checkpointable(restored, like={"other": abstract})
