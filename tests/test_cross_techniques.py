"""Techniques compose: each one's output is an ordinary tree the next one accepts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcomp
from jaxcomp import decompose, quant
from jaxcomp import sparsity as sp
from jaxcomp.nn.decompose import conv_specs_linen, intercept_factorized
from jaxcomp.nn.quant import serve_linen
from jaxcomp.testing.models import LeNet5

MODEL = LeNet5(num_classes=10)
X = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
Y = jnp.arange(4) % 10
VARIABLES = MODEL.init(jax.random.key(0), X)
W8 = quant.QuantSpec(bits=8, channel_axes=(-1,))


def _factorized():
    specs = conv_specs_linen(MODEL, VARIABLES, X)
    return decompose.decompose_tree(
        VARIABLES["params"], 3, where=r"Conv_1/kernel|Dense_0/kernel", conv_specs=specs)


def _loss(params):
    with intercept_factorized():
        logits = MODEL.apply({"params": params}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def test_decompose_then_fake_quantize_the_factors_trains_the_factors():
    """QAT on factors: fake-quantized factors run the factorized layers, gradients reach them."""
    params = _factorized()

    def qat_loss(params):
        return _loss(decompose.map_factors(lambda f: quant.fake_quant(f, W8), params))

    loss, grads = jax.jit(jax.value_and_grad(qat_loss))(params)
    assert np.isfinite(float(loss))
    assert isinstance(grads["Conv_1"]["kernel"], decompose.Tucker2Kernel)
    assert isinstance(grads["Dense_0"]["kernel"], decompose.SVDKernel)
    for factor in jax.tree.leaves(grads["Conv_1"]["kernel"]) + jax.tree.leaves(grads["Dense_0"]):
        assert float(jnp.abs(factor).max()) > 0
    # 8-bit factors change the loss by little; an optax step on the factors lowers it.
    assert abs(float(loss) - float(_loss(params))) < 0.05
    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(qat_loss(optax.apply_updates(params, updates))) < float(loss)


def test_decompose_then_quantize_factors_to_integers_is_reported_and_runs():
    """Factors stored as QArrays: the report counts their int8 bytes and the model still runs."""
    params = _factorized()
    qparams = decompose.map_factors(lambda f: quant.quantize(f, W8), params)
    ref = jax.jit(_loss)(decompose.map_factors(lambda f: quant.fake_quant(f, W8), params))
    chex.assert_trees_all_close(jax.jit(_loss)(qparams), ref, atol=1e-5)
    before, after = jaxcomp.report(params).totals, jaxcomp.report(qparams).totals
    assert after.nbytes < before.nbytes
    assert after.params == before.params


def test_prune_then_quantize_keeps_the_zeros_and_serves_on_integers():
    """Pruned zeros survive symmetric int8 quantization; serving matches fake quantization."""
    pruned, masks = sp.prune_now(VARIABLES["params"], sp.Pruner(sparsity=0.5))
    qparams = quant.quantize_tree(pruned, W8, where=r".*kernel")
    kernel = qparams["Dense_1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel.values) == 0,
                                  ~np.asarray(masks["Dense_1"]["kernel"]))
    size = jaxcomp.report(qparams)
    kernel_rows = [r for r in size.rows if r.path.endswith("kernel")]
    assert all(r.sparsity == pytest.approx(0.5, abs=0.01) for r in kernel_rows)
    assert all(r.kind == "QArray" for r in kernel_rows)
    served = jax.jit(serve_linen(MODEL, activations=None))({"params": qparams}, X)
    expected = MODEL.apply({"params": jaxcomp.materialize(qparams)}, X)
    chex.assert_trees_all_close(served, expected, atol=1e-4, rtol=1e-4)


def test_pruning_wrapper_with_fake_quantized_forward_keeps_exact_zeros():
    """Sparse QAT: the pruning wrapper and fake quantization share one jitted train step."""
    pruner = sp.Pruner(sparsity=sp.one_shot_sparsity(0.6, step=1))
    tx = sp.prune(optax.adam(1e-2), pruner)
    params = VARIABLES["params"]
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            p = quant.fake_quant_tree(p, W8, where=r".*kernel")
            logits = MODEL.apply({"params": p}, X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    stats = sp.sparsity_of(params, where=r".*kernel")
    assert float(stats.total) == pytest.approx(0.6, abs=0.01)
    masks = sp.masks_of(state)
    for path, mask in jaxcomp.path_dict(masks).items():
        if mask is not None:
            assert not np.any(np.asarray(jaxcomp.path_dict(params)[path])[~np.asarray(mask)])
