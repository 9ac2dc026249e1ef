"""The size report: rows, totals, compressed leaves counted as stored, the table."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxcomp import report
from jaxcomp.testing import nnx_models
from leaves import make_scaled_int


def test_rows_and_totals_of_a_plain_tree():
    params = {"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3, jnp.bfloat16)}}
    r = report(params)
    assert [row.path for row in r.rows] == ["Dense_0/bias", "Dense_0/kernel"]
    bias, kernel = r.rows
    assert (bias.shape, bias.dtype, bias.params, bias.nbytes) == ((3,), "bfloat16", 3, 6)
    assert (kernel.shape, kernel.params, kernel.nbytes) == ((4, 3), 12, 48)
    assert r.totals.params == 15 and r.totals.nbytes == 54
    assert r.totals.compression_ratio == 1.0
    assert kernel.bits_per_param == 32.0


def test_compressed_leaf_counts_what_it_stores():
    leaf = make_scaled_int((8, 4), dtype=jnp.int4)
    r = report({"q": leaf, "w": jnp.zeros(4)})
    q = r.rows[0]
    assert q.kind == "ScaledInt" and q.shape == (8, 4) and q.dtype == "float32"
    assert q.params == 32 and q.nbytes == 16 + 32 and q.dense_nbytes == 128
    assert r.totals.nbytes == 48 + 16 and r.totals.dense_nbytes == 128 + 16
    assert abs(r.totals.compression_ratio - 144 / 64) < 1e-12
    assert "int4" in q.detail


def test_table_shows_every_path_and_the_totals():
    r = report({"a": {"kernel": jnp.zeros((2, 2))}, "q": make_scaled_int()})
    text = str(r)
    assert "a/kernel" in text and "ScaledInt" in text
    assert text.splitlines()[-1].startswith("total")
    assert "smaller than dense" in text


def test_stored_params_count_factors_and_kept_values():
    """A factorized leaf stores its factors and a Masked one its kept values: the `stored`
    column and total say so (regression: only the dense count was shown, so a decomposed model
    seemed to keep every parameter)."""
    from jaxcomp.decompose import FixedRank, decompose_tree
    from jaxcomp.sparsity import Masked

    params = {"a": jax.random.normal(jax.random.key(0), (16, 8)), "b": jnp.zeros(8)}
    tree = decompose_tree(params, FixedRank(2), where="a")
    tree["m"] = Masked(jnp.ones((4, 4)), jnp.eye(4, dtype=bool))
    r = report(tree)
    rows = {row.path: row for row in r.rows}
    assert (rows["a"].params, rows["a"].stored_params) == (128, 16 * 2 + 2 * 8)
    assert (rows["m"].params, rows["m"].stored_params) == (16, 4)
    assert (rows["b"].params, rows["b"].stored_params) == (8, 8)
    assert r.totals.stored_params == 48 + 4 + 8 and r.totals.params == 152
    header, *_, total = str(r).splitlines()
    assert header.split()[4:6] == ["params", "stored"] and total.split()[1:3] == ["152", "60"]
    assert json.loads(r.to_json())["totals"]["stored_params"] == 60
    # Masked under eval_shape: every value counts; a plain tree shows no stored column.
    assert report(jax.eval_shape(lambda: tree["m"])).rows[0].stored_params == 16
    assert "stored" not in str(report(params))


def test_abstract_arrays_and_where():
    abstract = jax.eval_shape(lambda: {"k": jnp.zeros((10, 10)), "b": jnp.zeros(10)})
    r = report(abstract, where=r"k")
    assert [row.path for row in r.rows] == ["k"] and r.totals.nbytes == 400


def test_nnx_state_and_json():
    model = nnx_models.LeNet5(input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
    r = report(nnx.state(model, nnx.Param))
    assert r.totals.params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = json.loads(r.to_json())
    assert data["totals"]["params"] == r.totals.params
    assert data["rows"][0]["path"] == "convs/0/bias"


def test_sparsity_counts_exact_zeros_and_is_unknown_for_abstract_trees():
    params = {"w": jnp.ones((4, 5)).at[:2].set(0.0), "b": jnp.zeros(5)}
    r = report(params)
    assert [row.sparsity for row in r.rows] == [1.0, 0.5]
    assert r.totals.sparsity == 15 / 25
    abstract = report(jax.eval_shape(lambda: params))
    assert abstract.rows[0].sparsity is None and abstract.totals.sparsity is None


def test_bytes_of_complex_python_scalar_and_key_leaves():
    """complex64 counts 8 bytes an element; Python scalars count as JAX stores them (int32 and
    float32 without x64); PRNG keys (an NNX model's full state) count their key data."""
    r = report({"c": jnp.zeros(2, jnp.complex64), "i": 3, "f": 1.5})
    assert {row.path: row.nbytes for row in r.rows} == {"c": 16, "i": 4, "f": 4}
    model = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    rows = {row.path: row for row in report(nnx.state(model)).rows}
    key = next(row for path, row in rows.items() if path.endswith("key"))
    assert key.nbytes == 8 and "key" in key.dtype
    # A key holds no weights: it does not make the total sparsity of a concrete tree unknown.
    state = nnx.state(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    assert key.sparsity == 0.0 and report(state).totals.sparsity is not None


@pytest.mark.parametrize("flops", [5, {"d/kernel": "x"}, [1, 2], {"d/kernel": -3}])
def test_report_names_flops_it_cannot_read(flops):
    """flops must be a FlopCount or a path -> number mapping."""
    with pytest.raises(ValueError, match="report: flops must be"):
        report({"d": {"kernel": jnp.ones((2, 2))}}, flops=flops)


def test_report_fits_flops_of_a_variables_dict_and_rejects_flops_of_another_tree():
    """FLOPs counted over {'params': ...} fill a report of the params; FLOPs at paths that no
    leaf has are a ValueError, not an empty column over a total that counts them."""
    import jaxcomp

    params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}

    def f(v, x):
        return x @ v["params"]["d"]["kernel"] + v["params"]["d"]["bias"]

    count = jaxcomp.count_flops(f, {"params": params}, jnp.ones((4, 3)))
    rows = {r.path: r.flops for r in report(params, flops=count).rows}
    assert rows["d/kernel"] == count.per_path["params/d/kernel"] > 0
    assert {r.path: r.flops for r in report({"params": params}, flops=count).rows} == {
        "params/" + k: v for k, v in rows.items()}
    with pytest.raises(ValueError, match="none of which is a leaf of the tree"):
        report({"other": {"kernel": jnp.ones((3, 2))}}, flops=count)
    # An activation x activation product (attention) adds an "(activations)" entry: still fits.
    def attention(v, x):
        h = f(v, x)
        return h @ h.T

    count = jaxcomp.count_flops(attention, {"params": params}, jnp.ones((4, 3)))
    assert jaxcomp.flops.ACTIVATIONS in count.per_path
    rows = {r.path: r.flops for r in report(params, flops=count).rows}
    assert rows["d/kernel"] == count.per_path["params/d/kernel"] > 0
    assert report(params, flops=count).totals.flops == count.total


def test_a_tree_stored_larger_than_dense_says_larger():
    """A tiny codebook stores more than its dense array: the total says 'larger', not '0.54x
    smaller'."""
    from jaxcomp.quant import kmeans_quantize

    leaf = kmeans_quantize(jnp.array([0.0, 1.0, 2.0, 3.0, 4.0]), 4)
    r = report({"w": leaf})
    assert r.totals.compression_ratio < 1
    assert f"{r.totals.nbytes / r.totals.dense_nbytes:.2f}x larger than dense" in str(r)
