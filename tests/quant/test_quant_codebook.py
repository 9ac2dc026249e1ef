"""Codebook leaves: k-means weight sharing, power-of-two levels, centroid fine-tuning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcomp
from jaxcomp.quant import (
    Codebook,
    codebook_finetune,
    finetuned_codebooks,
    kmeans_quantize,
    kmeans_tree,
    power_of_two_quantize,
    power_of_two_tree,
)

W = jax.random.normal(jax.random.key(0), (32, 16))


@pytest.mark.parametrize("bits, index_dtype", [(2, jnp.uint2), (3, jnp.uint4), (4, jnp.uint4), (8, jnp.uint8)])
def test_kmeans_codebook_stores_indices_and_a_table_of_2_to_the_bits(bits, index_dtype):
    """Indices of 2..8 bits into 2**bits sorted centroids; nbytes = index bits + table + the
    int16 index of the pinned zero (-1 here: W has no zeros)."""
    cb = kmeans_quantize(W, bits)
    assert cb.indices.dtype == index_dtype and cb.centroids.shape == (2**bits,)
    assert bool(jnp.all(jnp.diff(cb.centroids) >= 0))
    width = jaxcomp.bit_width(index_dtype)
    assert cb.nbytes == W.size * width // 8 + 4 * 2**bits + 2 and int(cb.zero_index) == -1
    assert cb.packed_indices().nbytes == W.size * width // 8
    assert cb.materialize().shape == W.shape


def test_kmeans_iterations_reduce_the_error_of_the_linear_initialisation():
    """Lloyd steps from the linear init lower the squared error; every weight maps to its
    nearest centroid."""
    init = kmeans_quantize(W, 3, iters=0)
    tuned = kmeans_quantize(W, 3, iters=20)
    err = lambda cb: float(jnp.sum((cb.materialize() - W) ** 2))  # noqa: E731
    assert err(tuned) < err(init)
    nearest = jnp.argmin(jnp.abs(W[..., None] - tuned.centroids), axis=-1)
    chex.assert_trees_all_equal(tuned.centroids[nearest], tuned.centroids[tuned.indices.astype(jnp.int32)])
    np.testing.assert_allclose(init.centroids, np.linspace(float(W.min()), float(W.max()), 8), rtol=1e-5)


def test_power_of_two_levels_are_zero_and_signed_powers_of_two():
    """Values round in the log domain to +-2**e below the top exponent, tiny ones to zero."""
    x = jnp.array([3.0, -0.3, 0.7, 0.01, 0.0, -5.0])
    cb = power_of_two_quantize(x, 3)  # e_max = round(log2 5) = 2: levels 4, 2, 1
    np.testing.assert_array_equal(cb.materialize(), [4.0, 0.0, 1.0, 0.0, 0.0, -4.0])
    values = np.abs(np.asarray(power_of_two_quantize(W, 4).materialize()))
    nonzero = values[values > 0]
    np.testing.assert_array_equal(np.log2(nonzero), np.round(np.log2(nonzero)))
    assert cb.summary().startswith("power-of-two")


def test_power_of_two_eight_bits_keeps_zeros_zero():
    """With 8 bits the smallest levels are subnormal for max|x| < 1.4: zeros must still map to
    0 (regression: they took the largest level)."""
    x = jnp.array([0.2, 0.0, -0.0, -0.1, 1e-30])
    np.testing.assert_array_equal(power_of_two_quantize(x, 8).materialize()[1:3], [0.0, 0.0])
    np.testing.assert_array_equal(power_of_two_quantize(jnp.zeros(3), 8).materialize(), 0.0)
    out = np.asarray(power_of_two_quantize(x, 8).materialize())
    np.testing.assert_allclose(out[[0, 3]], [0.25, -0.125])


def test_codebook_trees_and_bad_input_name_the_path():
    """Tree versions select by where=; bad bits, NaN and non-float leaves raise ValueError."""
    params = {"Dense_0": {"kernel": W, "bias": jnp.zeros(16)}}
    tree = kmeans_tree(params, 4, where=r".*kernel")
    assert isinstance(tree["Dense_0"]["kernel"], Codebook)
    assert isinstance(power_of_two_tree(params, 4, where=r".*kernel")["Dense_0"]["kernel"], Codebook)
    with pytest.raises(ValueError, match="Dense_0/kernel: codebook bits must be an int in 2..8, got 9"):
        kmeans_tree(params, 9, where=r".*kernel")
    with pytest.raises(ValueError, match=r"w: 1 NaN/Inf value\(s\)"):
        kmeans_quantize(W.at[0, 0].set(jnp.inf), 4, path="w")
    with pytest.raises(ValueError, match="selects no leaf"):
        kmeans_tree(params, 4, where=r"nothing")
    with pytest.raises(ValueError, match="floating-point"):
        power_of_two_quantize(jnp.ones(3, jnp.int32), 4)


def _lloyd(x, k, iters):
    """Reference 1-D k-means in numpy: linear initialisation, empty clusters keep their centroid."""
    c = np.linspace(x.min(), x.max(), k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x, side="left")
        c = np.sort([x[idx == j].mean() if np.any(idx == j) else c[j] for j in range(k)])
    return c


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.7, 0.95])
def test_kmeans_keeps_pruned_weights_at_zero_and_clusters_the_rest(bits, sparsity):
    """Deep Compression clusters the surviving weights: the zeros get a centroid pinned at 0.0,
    the others share 2**bits - 1 centroids, the ones numpy's k-means finds on them alone."""
    x = np.asarray(W, np.float64).ravel()
    x[np.argsort(np.abs(x))[: int(sparsity * x.size)]] = 0.0
    cb = kmeans_quantize(jnp.asarray(x.reshape(W.shape), jnp.float32), bits, iters=30)
    dense = np.asarray(cb.materialize()).ravel()
    assert np.all(dense[x == 0] == 0.0) and np.count_nonzero(dense[x != 0]) == np.count_nonzero(x)
    centroids = np.asarray(cb.centroids)
    assert np.count_nonzero(centroids == 0.0) >= 1 and np.all(np.diff(centroids) >= 0)
    free = np.delete(centroids, np.flatnonzero(centroids == 0.0)[0])
    np.testing.assert_allclose(free, _lloyd(x[x != 0].astype(np.float32), 2**bits - 1, 30),
                               rtol=1e-4, atol=1e-5)


def test_kmeans_without_zeros_uses_every_centroid_and_all_zeros_stay_zero():
    """A dense tensor is clustered into 2**bits centroids as before; an all-zero tensor, or
    one under jit, works too."""
    x = np.asarray(W, np.float32).ravel()
    np.testing.assert_allclose(np.asarray(kmeans_quantize(W, 3).centroids), _lloyd(x, 8, 30),
                               rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(kmeans_quantize(jnp.zeros((3, 2)), 2).materialize()) == 0)
    pruned = jnp.where(jnp.abs(W) < 0.5, 0.0, W)
    jitted = jax.jit(lambda w: kmeans_quantize(w, 2).materialize())(pruned)
    np.testing.assert_array_equal(jitted, kmeans_quantize(pruned, 2).materialize())


def test_finetune_holds_the_pruned_weights_at_zero():
    """The centroid pinned at 0.0 gets no gradient and no update (not even weight decay's):
    fine-tuning a pruned and shared model leaves it exactly as sparse."""
    pruned = jnp.where(jnp.abs(W) < 1.0, 0.0, W)
    books = kmeans_tree({"w": pruned}, 4)
    params = jaxcomp.materialize(books)
    tx = codebook_finetune(optax.adamw(0.05, weight_decay=0.1), books)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.mean((q["w"] - 0.3) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(3):
        params, state = step(params, state)
    assert np.all(np.asarray(params["w"])[np.asarray(pruned) == 0] == 0.0)
    result = finetuned_codebooks(state, params)["w"]
    moved = np.asarray(result.centroids) != np.asarray(books["w"].centroids)
    assert moved.sum() == 15 and float(result.centroids[~moved][0]) == 0.0
    chex.assert_trees_all_close(result.materialize(), params["w"], atol=1e-6)


def test_only_the_pinned_zero_is_held_not_a_cluster_whose_mean_is_zero():
    """{1, -1} has mean 0.0: without zeros in the tensor that centroid is an ordinary one and
    trains; the codebook records which centroid (if any) was pinned, and keeps it through
    finetuned_codebooks. Power-of-two codebooks pin their 0 level only for exact zeros."""
    w = jnp.array([1.0, 5.0, -1.0, -3.0, -2.0])
    books = kmeans_tree({"w": w}, 2)
    assert 0.0 in np.asarray(books["w"].centroids).tolist() and int(books["w"].zero_index) == -1
    tx = codebook_finetune(optax.sgd(0.1), books)
    params = jaxcomp.materialize(books)
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(5)}, state, params)
    assert np.all(np.asarray(updates["w"]) != 0)
    assert int(finetuned_codebooks(state, params)["w"].zero_index) == -1
    pruned = kmeans_tree({"w": w.at[0].set(0.0)}, 2)["w"]
    assert float(pruned.centroids[int(pruned.zero_index)]) == 0.0
    assert int(power_of_two_quantize(w, 3).zero_index) == -1
    assert int(power_of_two_quantize(w.at[0].set(0.0), 3).zero_index) == 0


def test_kmeans_of_weights_near_the_float32_limit_stays_finite():
    """A range wider than float32's max neither overflows the initialisation nor the means."""
    for x in (jnp.array([0.0, 3e38, 2e38, 1e38]), jnp.array([3e38, -3e38, 2e38, -2e38, 1.0])):
        cb = kmeans_quantize(x, 2)
        assert bool(jnp.all(jnp.isfinite(cb.centroids)))
        assert float(jnp.max(jnp.abs(cb.materialize() - x))) <= 1.01e38


def test_finetune_sums_weight_gradients_per_centroid_and_keeps_weights_tied():
    """One SGD step moves each centroid by -lr * (sum of its weights' gradients); every weight
    stays equal to its centroid, and finetuned_codebooks returns Codebook leaves."""
    params = {"w": W, "b": jnp.ones(16)}
    books = kmeans_tree(params, 2, where="w")
    params = jaxcomp.materialize(books)
    grads = {"w": jax.random.normal(jax.random.key(1), W.shape), "b": jnp.full(16, 2.0)}
    tx = codebook_finetune(optax.sgd(0.1), books)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    idx = books["w"].indices.astype(jnp.int32)
    summed = jax.ops.segment_sum(grads["w"].ravel(), idx.ravel(), num_segments=4)
    expected = books["w"].centroids - 0.1 * summed
    result = finetuned_codebooks(state, new)
    chex.assert_trees_all_close(result["w"].centroids, expected, atol=1e-5)
    chex.assert_trees_all_close(new["w"], expected[idx], atol=1e-5)
    chex.assert_trees_all_close(new["b"], jnp.full(16, 0.8), atol=1e-6)
    chex.assert_trees_all_close(result["w"].materialize(), new["w"], atol=1e-5)


def test_finetune_works_with_adam_and_reduces_a_loss():
    """Inside a normal jitted optax loop the loss on tied weights goes down."""
    target = W * 0.5
    books = kmeans_tree({"w": W}, 3)
    params = jaxcomp.materialize(books)
    tx = codebook_finetune(optax.adam(0.05), books)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((q["w"] - target) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] / 2
    assert len(np.unique(np.asarray(params["w"]))) <= 8


def test_finetune_validates_its_inputs():
    """No Codebook, a missing path, or a wrong shape raise ValueError."""
    with pytest.raises(ValueError, match="holds no Codebook"):
        codebook_finetune(optax.sgd(0.1), {"w": W})
    tx = codebook_finetune(optax.sgd(0.1), kmeans_tree({"w": W}, 2))
    with pytest.raises(ValueError, match="'w' is not in the params"):
        tx.init({"v": W})
    with pytest.raises(ValueError, match="has shape"):
        tx.init({"w": W[:4]})
    with pytest.raises(ValueError, match="no CodebookFinetuneState"):
        finetuned_codebooks(optax.sgd(0.1).init({"w": W}), {"w": W})


def test_power_of_two_levels_stay_finite_in_the_dense_dtype():
    """max|x| near the dtype's limit: the top level is clamped, not rounded up to inf."""
    for x in (jnp.array([3e38, 1.0]), jnp.array([60000.0, 1.0], jnp.float16)):
        assert bool(jnp.isfinite(power_of_two_quantize(x, 4).materialize()).all())


def test_bfloat16_weights_stay_on_their_finetuned_centroids():
    """With bfloat16 weights each step lands on the new centroids exactly as `materialize`
    rounds them (regression: rounded differences of centroids let the weights drift away from
    the table by up to 0.87 in 300 SGD steps)."""
    w = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16) * 0.05
    books = kmeans_tree({"w": w}, bits=3)
    params = jaxcomp.materialize(books)
    tx = codebook_finetune(optax.adam(1e-3), books)
    state = tx.init(params)
    target = jax.random.normal(jax.random.key(1), (64, 32))

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((p["w"].astype(jnp.float32) - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(50):
        params, state = step(params, state)
    assert params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["w"], np.float32),
                                  np.asarray(finetuned_codebooks(state, params)["w"].materialize(),
                                             np.float32))


def test_finetuning_refuses_params_that_are_not_the_codebooks_values():
    """Untied weights would train untied and the codebook returned would not be the model."""
    params = {"w": jnp.linspace(-1.0, 1.0, 32)}
    books = kmeans_tree(params, bits=2)
    with pytest.raises(ValueError, match="params at 'w' are not its codebook's values"):
        codebook_finetune(optax.sgd(0.1), books).init(params)
    codebook_finetune(optax.sgd(0.1), books).init(jaxcomp.materialize(books))


def test_centroids_are_cluster_means_on_large_and_constant_tensors():
    """Centroids are the means of their clusters to float32 precision on millions of weights,
    and a tensor with at most 2**bits values comes back exactly (regression: float32 sums of
    the weights put a constant 0.1 at 0.0961 at 4e6 elements)."""
    for n in (2_000, 1_000_000):
        const = jnp.full((n,), 0.1, jnp.float32)
        np.testing.assert_array_equal(kmeans_quantize(const, 4).materialize(), const)
        two = jnp.where(jnp.arange(n) % 3 == 0, 0.3, -0.7).astype(jnp.float32)
        np.testing.assert_array_equal(kmeans_quantize(two, 2).materialize(), two)
    # Lloyd's iterations in float64 from the same linear start give the same table.
    x = jax.random.normal(jax.random.key(2), (1024, 1024))
    flat = np.asarray(x, np.float64).ravel()
    table = np.linspace(flat.min(), flat.max(), 16)
    for _ in range(30):
        idx = np.searchsorted((table[1:] + table[:-1]) / 2, flat)
        sums, counts = np.bincount(idx, flat, 16), np.bincount(idx, minlength=16)
        table = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), table))
    np.testing.assert_allclose(kmeans_quantize(x, 4, iters=30).centroids, table, rtol=2e-5,
                               atol=1e-6)


def test_an_empty_tensor_is_a_value_error_naming_it_for_power_of_two_too():
    with pytest.raises(ValueError, match="head/bias: cannot quantize an empty array"):
        power_of_two_quantize(jnp.zeros((0, 3)), 4, path="head/bias")
