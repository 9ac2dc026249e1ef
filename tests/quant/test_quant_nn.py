"""Flax integration: activation quantization, calibration and integer serving (Linen and NNX)."""

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp
from jaxcomp.nn.quant import (
    QuantizedInput,
    QuantizedLayer,
    calibrate_linen,
    calibrate_nnx,
    fake_quant_inputs,
    init_input_steps_linen,
    quantize_inputs_nnx,
    serve_linen,
    serve_nnx,
)
from jaxcomp.quant import (
    QArray,
    QuantSpec,
    fake_quant,
    kmeans_tree,
    lsq_as_static,
    pact_as_static,
    quantize_tree,
)
from jaxcomp.testing import models, nnx_models
from jaxcomp.testing.train import init_linen

X = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
ACT = QuantSpec(bits=8)
WEIGHTS = QuantSpec(bits=8, channel_axes=(-1,))
MLP = models.MLP(features=(16,))
MLP_VARS = init_linen(MLP, (8, 8, 1), seed=1)
LENET = models.LeNet5(conv_features=(4, 8), dense_features=(16,))
LENET_VARS = init_linen(LENET, (8, 8, 1), seed=2)
TRANSFORMER = models.TransformerEncoder(d_model=8, num_heads=2, mlp_dim=16)
TRANSFORMER_VARS = init_linen(TRANSFORMER, (8, 8, 1), seed=3)
ATTENTION = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
ATTENTION_VARS = jax.jit(ATTENTION.init)(jax.random.key(4), X[:1, :, :, 0])


def _int_products(fn, *args):
    """(lhs dtype, rhs dtype) of every dot_general / conv in the jaxpr of fn, nested included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _apply_quantized(model, variables, x, spec, **tables):
    """model.apply under fake_quant_inputs, jitted (one compile instead of op-by-op dispatch)."""

    @jax.jit
    def run(variables, x, tables):
        with fake_quant_inputs(spec, **tables):
            return model.apply(variables, x)

    return run(variables, x, tables)


def _mlp_by_hand(params, x, quantize_input):
    h = x.reshape(x.shape[0], -1)
    h = nn.relu(quantize_input(h) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return quantize_input(h) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def test_linen_inputs_are_fake_quantized_and_gradients_flow():
    """Every Dense input is fake-quantized (dynamic ranges); the STE lets gradients through."""
    params = MLP_VARS["params"]

    def loss(p):
        with fake_quant_inputs(ACT):
            return MLP.apply({"params": p}, X).sum()

    out = _apply_quantized(MLP, MLP_VARS, X, ACT)
    chex.assert_trees_all_close(out, _mlp_by_hand(params, X, lambda h: fake_quant(h, ACT)), atol=1e-5)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def _where_dense_1(variables, x):
    with fake_quant_inputs(ACT, where="Dense_1"):
        return MLP.apply(variables, x)


def test_linen_where_selects_layers_by_module_path():
    """where= on module paths: only Dense_1's input is quantized."""
    out = jax.jit(lambda v, x: _where_dense_1(v, x))(MLP_VARS, X)
    ref = _mlp_by_hand(MLP_VARS["params"], X, lambda h: h if h.shape[-1] == 64 else fake_quant(h, ACT))
    chex.assert_trees_all_close(out, ref, atol=1e-5)


def test_linen_calibration_gives_static_ranges_per_layer():
    """calibrate_linen observes each layer's input; static ranges then replace dynamic ones."""
    params = calibrate_linen(LENET, LENET_VARS, [X[:4], X[4:]], ACT)
    assert sorted(params) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    np.testing.assert_allclose(params["Conv_0"].scale.squeeze(), float(X.max()) / 127, rtol=1e-6)
    static = _apply_quantized(LENET, LENET_VARS, X, ACT, params=params)
    dynamic = _apply_quantized(LENET, LENET_VARS, X, ACT)
    chex.assert_trees_all_close(static, dynamic, atol=0.05)
    with pytest.raises(ValueError, match="params has no entry for module 'Conv_0'"), \
            fake_quant_inputs(ACT, params={"Dense_0": params["Dense_0"]}):
        LENET.apply(LENET_VARS, X)


def test_linen_calibration_rejects_nan_and_empty_selections():
    """NaN in a calibration batch names the layer; a where= matching nothing is an error."""
    bad = X.at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"Dense_0 \(calibration batch 0\): \d+ NaN/Inf"):
        calibrate_linen(MLP, MLP_VARS, [bad], ACT)
    with pytest.raises(ValueError, match="selects no"):
        calibrate_linen(MLP, MLP_VARS, [X], ACT, where="Conv.*")
    # A model that is itself the layer has the path "": the message names the root module.
    dense = nn.Dense(3)
    row = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"^<root module> \(calibration batch 1\): 1 NaN/Inf"):
        calibrate_linen(dense, dense.init(jax.random.key(0), row), [row, row.at[0, 1].set(jnp.nan)],
                        ACT)


def test_linen_lsq_and_pact_scales_are_trained_with_the_params():
    """LSQ steps and PACT clips keyed by module path receive gradients in the same step."""
    steps = init_input_steps_linen(MLP, MLP_VARS, X, ACT)
    assert sorted(steps) == ["Dense_0", "Dense_1"]

    def loss(t, **table):
        with fake_quant_inputs(ACT, **{k: t[k] for k in table}):
            return jnp.sum(MLP.apply({"params": t["params"]}, X) ** 2)

    grads = jax.jit(jax.grad(lambda t: loss(t, steps=1)))({"params": MLP_VARS["params"], "steps": steps})
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["steps"]))
    alphas = {"Dense_0": jnp.float32(0.5), "Dense_1": jnp.float32(0.5)}
    grads = jax.jit(jax.grad(lambda t: loss(t, alphas=1)))({"params": MLP_VARS["params"], "alphas": alphas})
    assert float(grads["alphas"]["Dense_0"]) != 0.0
    with pytest.raises(ValueError, match="at most one"), fake_quant_inputs(ACT, steps=steps, alphas=alphas):
        pass


@pytest.mark.parametrize("name", ["mlp", "lenet", "attention"])
def test_linen_serving_runs_every_quantized_kernel_on_int8(name):
    """serve_linen gives the fake-quant forward pass's output, with an int8 x int8 product for
    every QArray kernel (Dense, Conv, and DenseGeneral contracting one or two axes)."""
    model, variables, x = {"mlp": (MLP, MLP_VARS, X), "lenet": (LENET, LENET_VARS, X),
                           "attention": (ATTENTION, ATTENTION_VARS, X[:, :, :, 0])}[name]
    qparams = quantize_tree(variables["params"], WEIGHTS, where=r".*kernel")
    serve = serve_linen(model, strategy="int8")
    out = jax.jit(serve)({"params": qparams}, x)
    ref = _apply_quantized(model, {"params": jaxcomp.materialize(qparams)}, x, ACT)
    chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)
    products = _int_products(serve, {"params": qparams}, x)
    kernels = sum(isinstance(v, QArray) for v in jaxcomp.path_dict(qparams).values())
    assert sum(p == (jnp.int8, jnp.int8) for p in products) == kernels


def test_linen_serving_with_static_ranges_and_other_compressed_leaves():
    """Calibrated ranges are used; a Codebook embedding (no integer path) is materialized."""
    params = TRANSFORMER_VARS["params"]
    qparams = quantize_tree(params, WEIGHTS, where=r".*kernel")
    qparams = kmeans_tree(qparams, 4, where="pos_embedding")
    ranges = calibrate_linen(TRANSFORMER, {"params": qparams}, [X], ACT)
    out = jax.jit(serve_linen(TRANSFORMER, act_params=ranges, strategy="int8"))({"params": qparams}, X)
    ref = _apply_quantized(TRANSFORMER, {"params": jaxcomp.materialize(qparams)}, X, ACT, params=ranges)
    chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)


def test_linen_serving_fake_quantizes_the_inputs_of_calibrated_float_layers():
    """A layer left in float but calibrated keeps its quantized input, as in calibration/QAT
    and as serve_nnx does (regression: served silently with a float input)."""
    params = MLP_VARS["params"]
    qparams = quantize_tree(params, WEIGHTS, where=r"Dense_0/kernel")
    ranges = calibrate_linen(MLP, {"params": qparams}, [X], ACT)
    assert set(ranges) == {"Dense_0", "Dense_1"}
    serve = jax.jit(serve_linen(MLP, act_params=ranges, strategy="int8"))
    ref = _apply_quantized(MLP, {"params": jaxcomp.materialize(qparams)}, X, ACT, params=ranges)
    chex.assert_trees_all_close(serve({"params": qparams}, X), ref, atol=1e-5, rtol=1e-5)
    # Without an entry (or with dynamic ranges) the float layer's input stays float.
    only_first = {"Dense_0": ranges["Dense_0"]}
    with fake_quant_inputs(ACT, params=only_first, where="Dense_0"):
        ref = MLP.apply({"params": jaxcomp.materialize(qparams)}, X)
    out = jax.jit(serve_linen(MLP, act_params=only_first, strategy="int8"))({"params": qparams}, X)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_linen_serving_from_learned_steps_and_clips_reproduces_training():
    """lsq_as_static / pact_as_static turn learned steps and clips into static serving ranges
    that give the training-time forward pass (with the quantized weights)."""
    qparams = quantize_tree(MLP_VARS["params"], WEIGHTS, where=r".*kernel")
    dense = {"params": jaxcomp.materialize(qparams)}
    steps = {"Dense_0": jnp.float32(0.01), "Dense_1": jnp.float32(0.02)}
    out = jax.jit(serve_linen(MLP, act_params=lsq_as_static(steps), strategy="int8"))({"params": qparams}, X)
    chex.assert_trees_all_close(out, _apply_quantized(MLP, dense, X, ACT, steps=steps), atol=1e-4, rtol=1e-4)
    unsigned = QuantSpec(bits=8, signed=False)
    alphas = {"Dense_0": jnp.float32(0.9), "Dense_1": jnp.float32(2.0)}
    out = jax.jit(serve_linen(MLP, activations=unsigned, act_params=pact_as_static(alphas, unsigned),
                              strategy="int8"))({"params": qparams}, X)
    ref = _apply_quantized(MLP, dense, X, unsigned, alphas=alphas)
    chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)


def test_linen_serving_of_a_whole_lsq_model_reproduces_its_training_forward():
    """quantize_tree(scales=lsq_as_static(w_steps)) stores the trained weight grid, so serving
    gives the LSQ forward pass of weights and inputs; absmax scales would not."""
    from jaxcomp.quant import lsq_fake_quant_tree, lsq_init_tree

    params = MLP_VARS["params"]
    w4 = QuantSpec(bits=4, channel_axes=(-1,))
    w_steps = {p: 0.7 * s for p, s in lsq_init_tree(params, w4, where=r".*kernel").items()}
    a_steps = init_input_steps_linen(MLP, MLP_VARS, X, ACT)
    with fake_quant_inputs(ACT, steps=a_steps):
        trained = MLP.apply({"params": lsq_fake_quant_tree(params, w_steps, w4)}, X)
    qparams = quantize_tree(params, w4, where=r".*kernel", scales=lsq_as_static(w_steps))
    served = serve_linen(MLP, act_params=lsq_as_static(a_steps), strategy="int8")({"params": qparams}, X)
    chex.assert_trees_all_close(served, trained, atol=1e-4, rtol=1e-4)
    absmax = quantize_tree(params, w4, where=r".*kernel")
    assert not np.allclose(materialize_kernels(absmax), materialize_kernels(qparams))
    with pytest.raises(ValueError, match="scales has paths that where"):
        quantize_tree(params, w4, where=r"Dense_0/kernel", scales=lsq_as_static(w_steps))


def materialize_kernels(tree):
    return np.concatenate([np.ravel(x) for p, x in jaxcomp.leaves_with_paths(jaxcomp.materialize(tree))
                           if p.endswith("kernel")])


def test_linen_serving_rejects_a_qarray_kernel_without_an_integer_path():
    """A quantized ConvTranspose kernel raises ValueError naming its path."""
    model = nn.ConvTranspose(2, (3, 3))
    variables = jax.jit(model.init)(jax.random.key(0), X[:1])
    qparams = quantize_tree(variables["params"], WEIGHTS, where=r".*kernel")
    with pytest.raises(ValueError, match="kernel of <root ConvTranspose> is a QArray but "
                                         "ConvTranspose has no integer path"):
        serve_linen(model)({"params": qparams}, X)


# Built by one jitted program each (eager construction dispatches every op on its own).
_nnx_mlp = nnx.jit(lambda: nnx_models.MLP(input_shape=(8, 8, 1), features=(16,), rngs=nnx.Rngs(0)))


_forward = nnx.jit(lambda model, x: model(x))


def test_nnx_wrapping_quantizes_inputs_and_keeps_params_trainable():
    """quantize_inputs_nnx wraps each Linear; outputs match fake-quant by hand; training works."""
    model = _nnx_mlp()
    ref_params = {"Dense_0": {"kernel": model.layers[0].kernel.get_value(), "bias": model.layers[0].bias.get_value()},
                  "Dense_1": {"kernel": model.head.kernel.get_value(), "bias": model.head.bias.get_value()}}
    quantize_inputs_nnx(model, ACT)
    assert isinstance(model.layers[0], QuantizedInput) and isinstance(model.head, QuantizedInput)
    by_hand = jax.jit(lambda p, x: _mlp_by_hand(p, x, lambda h: fake_quant(h, ACT)))(ref_params, X)
    chex.assert_trees_all_close(_forward(model, X), by_hand, atol=1e-5)
    assert "layers/0/layer/kernel" in jaxcomp.path_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = model.head.layer.kernel.get_value()

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    assert not np.allclose(before, model.head.layer.kernel.get_value())


def test_nnx_serving_keeps_a_dynamic_wrappers_own_spec():
    """A model trained with 4-bit dynamic input quantization is served on 4-bit inputs, not on
    serve_nnx's default 8 bits."""
    four = QuantSpec(bits=4)
    model = quantize_inputs_nnx(_nnx_mlp(), four)
    qstate = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    graphdef, state = nnx.split(model)
    ref = _forward(nnx.merge(graphdef, nnx.merge_state(state, jaxcomp.materialize(qstate))), X)
    out = _forward(serve_nnx(model, qstate), X)
    chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)


def test_nnx_a_bare_layer_model_says_it_cannot_be_replaced_in_place():
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    qstate = quantize_tree(nnx.state(layer, nnx.Param), WEIGHTS, where=r".*kernel")
    with pytest.raises(ValueError, match="serve_nnx: the model is itself a Linear"):
        serve_nnx(layer, qstate)
    with pytest.raises(ValueError, match="quantize_inputs_nnx: the model is itself a Linear"):
        quantize_inputs_nnx(layer, ACT)


def test_nnx_calibration_sets_static_lsq_and_pact_values():
    """calibrate_nnx sets static ranges, LSQ steps and PACT clips from the observed inputs."""
    static = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), ACT, method="static"), [X[:4], X[4:]])
    np.testing.assert_allclose(static.layers[0].scale.get_value(), float(X.max()) / 127, rtol=1e-6)
    lsq = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), ACT, method="lsq"), [X])
    np.testing.assert_allclose(lsq.layers[0].step.get_value(), 2 * float(jnp.abs(X).mean()) / np.sqrt(127),
                               rtol=1e-5)
    pact = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), QuantSpec(signed=False), method="pact"), [X])
    np.testing.assert_allclose(pact.layers[0].alpha.get_value(), float(X.max()), rtol=1e-6)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X) ** 2)))(lsq)
    assert float(jnp.abs(grads["layers"][0]["step"].get_value())) > 0
    with pytest.raises(ValueError, match="no QuantizedInput"):
        calibrate_nnx(_nnx_mlp(), [X])


def test_nnx_calibration_of_signed_pact_per_channel_lsq_and_all_zero_inputs():
    """A signed PACT clip covers max|x| (not max x); LSQ steps follow the spec's granularity; an
    all-zero calibration gives a step and a clip of 1 (a zero one would fail the next call)."""
    x = jnp.concatenate([-4.0 * jnp.ones((2, 8, 8, 1)), 0.5 * X[:2]])
    signed = QuantSpec(bits=8)
    pact = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), signed, method="pact"), [x])
    np.testing.assert_allclose(pact.layers[0].alpha.get_value(), 4.0, rtol=1e-6)
    per_channel = QuantSpec(bits=8, channel_axes=(-1,))
    lsq = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), per_channel, method="lsq"), [x])
    step = lsq.layers[0].step.get_value()
    assert step.shape == (1, 64)
    want = 2 * jnp.abs(_flatten(x)).mean(axis=0, keepdims=True) / np.sqrt(127)
    np.testing.assert_allclose(step, want, rtol=1e-5)
    zeros = jnp.zeros((4, 8, 8, 1))
    for method, name in (("lsq", "step"), ("pact", "alpha")):
        model = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), signed, method=method), [zeros])
        assert float(getattr(model.layers[0], name).get_value().max()) == 1.0
        np.testing.assert_array_equal(model(zeros), _nnx_mlp()(zeros))


def test_nnx_serving_names_the_layer_and_rejects_a_spec_for_the_state():
    """Errors from a served layer name its path in the model; a QuantSpec given where the
    quantized state belongs is a ValueError saying what to pass."""
    model = quantize_inputs_nnx(_nnx_mlp(), QuantSpec(bits=8, channel_axes=(-1,)))
    q = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    with pytest.raises(ValueError, match="layers/0: 1 NaN/Inf"):
        serve_nnx(model, q)(X.at[0, 3, 3, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="qstate must be the quantized params"):
        serve_nnx(_nnx_mlp(), WEIGHTS)


def test_nnx_calibration_runs_in_eval_mode_and_restores_the_mode():
    """Calibrating a model in train mode leaves its BatchNorm statistics untouched, observes the
    inputs without dropout, and gives the model back in the mode it was in."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs),
                           nnx.Dropout(0.5, rngs=rngs), nnx.Linear(6, 3, rngs=rngs))
    quantize_inputs_nnx(model, ACT, method="static")
    x = jax.random.normal(jax.random.key(3), (16, 4)) + 2.0
    mean = np.asarray(model.layers[1].mean.get_value()).copy()
    calibrate_nnx(model, [x])
    np.testing.assert_array_equal(model.layers[1].mean.get_value(), mean)
    assert model.layers[1].use_running_average is False and model.layers[2].deterministic is False
    model.eval()
    eval_input = model.layers[2](model.layers[1](model.layers[0].layer(x)))  # observed unquantized
    np.testing.assert_allclose(model.layers[3].scale.get_value(),
                               float(jnp.abs(eval_input).max()) / 127, rtol=1e-6)


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def test_nnx_serving_replaces_layers_with_integer_kernels():
    """serve_nnx swaps Linear / Conv layers for QuantizedLayer with QArray kernels; the output
    is the static fake-quant forward pass, computed on int8."""
    model = nnx.jit(lambda: nnx.Sequential(
        nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), _flatten, nnx.Linear(256, 10, rngs=nnx.Rngs(1))))()
    calibrate_nnx(quantize_inputs_nnx(model, ACT, method="static"), [X])
    qstate = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    graphdef, state = nnx.split(model)
    float_model = nnx.merge(graphdef, nnx.merge_state(state, jaxcomp.materialize(qstate)))
    ref = _forward(float_model, X)
    serve_nnx(model, qstate, strategy="int8")
    assert isinstance(model.layers[0], QuantizedLayer) and isinstance(model.layers[2], QuantizedLayer)
    out = _forward(model, X)
    chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)
    products = _int_products(lambda x: model(x), X)
    assert len(products) == 2 and all(p == (jnp.int8, jnp.int8) for p in products)
    kernels = [v for p, v in jaxcomp.path_dict(nnx.state(model, nnx.Param)).items() if p.endswith("kernel")]
    assert len(kernels) == 2 and all(isinstance(k, QArray) for k in kernels)
    with pytest.raises(ValueError, match="no QArray kernel"):
        serve_nnx(_nnx_mlp(), {"unrelated": jnp.ones(2)})


def test_nnx_attention_serves_its_linear_general_projections_on_int8():
    """LinearGeneral projections inside MultiHeadAttention are served on int8 too."""
    model = nnx.jit(lambda: nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)))()
    x = X[:, :, :, 0]
    qstate = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    graphdef, state = nnx.split(model)
    ref = _forward(nnx.merge(graphdef, nnx.merge_state(state, jaxcomp.materialize(qstate))), x)
    serve_nnx(model, qstate, strategy="int8")
    assert isinstance(model.query, QuantizedLayer) and isinstance(model.out, QuantizedLayer)
    products = _int_products(lambda x: model(x), x)
    assert sum(p == (jnp.int8, jnp.int8) for p in products) == 4
    chex.assert_trees_all_close(_forward(model, x), ref, atol=0.05)


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_nnx_serving_carries_learned_steps_and_clips(method):
    """serve_nnx on LSQ / PACT wrappers serves the learned grid (as trained, to float error)."""
    spec = QuantSpec(signed=False) if method == "pact" else ACT
    model = calibrate_nnx(quantize_inputs_nnx(_nnx_mlp(), spec, method=method), [X])
    qstate = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    graphdef, state = nnx.split(model)
    ref = _forward(nnx.merge(graphdef, nnx.merge_state(state, jaxcomp.materialize(qstate))), X)
    serve_nnx(model, qstate, strategy="int8")
    chex.assert_trees_all_close(_forward(model, X), ref, atol=1e-4, rtol=1e-4)


def test_nnx_serving_writes_other_quantized_leaves_materialized():
    """A quantized leaf no served layer computes on (an Embed table) runs on its dequantized
    values, so the served model computes what the quantized tree does."""

    class Net(nnx.Module):
        def __init__(self):
            self.emb = nnx.Embed(20, 8, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(8, 4, rngs=nnx.Rngs(1))

        def __call__(self, t):
            return self.head(self.emb(t))

    tokens = jnp.arange(6).reshape(2, 3)
    model, ref_model = Net(), Net()
    qstate = quantize_tree(nnx.state(model, nnx.Param), QuantSpec(bits=2, channel_axes=(-1,)),
                           where=r".*kernel|.*embedding")
    nnx.update(ref_model, jaxcomp.materialize(qstate))
    serve_nnx(model, qstate, activations=None)
    chex.assert_trees_all_close(model(tokens), ref_model(tokens), atol=1e-5, rtol=1e-5)


def test_linen_calibration_of_layers_inside_nn_scan_says_why_it_cannot():
    """Inputs traced inside nn.scan cannot leave it: a ValueError says so (no leaked tracer)."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(8)(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan()(x, None)[0]

    model, x = Stack(), jnp.ones((2, 8))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="calibrate_linen: a selected layer runs inside a Flax lifted"):
        calibrate_linen(model, variables, [x], ACT)
    with pytest.raises(ValueError, match="init_input_steps_linen: a selected layer runs inside"):
        init_input_steps_linen(model, variables, x, ACT)
    # Serving: per-layer scales (stacking axis kept) run; scales shared across layers say why not.
    serve = serve_linen(model)
    per_layer = quantize_tree(variables["params"], QuantSpec(channel_axes=(0, -1)), where=r".*kernel")
    assert serve({"params": per_layer}, x).shape == (2, 8)
    shared = quantize_tree(variables["params"], QuantSpec(channel_axes=(-1,)), where=r".*kernel")
    with pytest.raises(ValueError, match=r"inside nn.scan .*channel_axes=\(0, -1\)"):
        serve({"params": shared}, x)

    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=None, axis_size=3)
            return dense(4)(x)

    ensemble = Ensemble()
    params = ensemble.init(jax.random.key(0), x)["params"]
    shared = quantize_tree(params, QuantSpec(channel_axes=(-1,)), where=r".*kernel")
    with pytest.raises(ValueError, match=r"inside nn.vmap .*channel_axes=\(0, -1\)"):
        serve_linen(ensemble)({"params": shared}, x)
    per_member = quantize_tree(params, QuantSpec(channel_axes=(0, -1)), where=r".*kernel")
    assert serve_linen(ensemble)({"params": per_member}, x).shape == (3, 2, 4)


def test_nnx_serving_walks_past_tuple_settings_and_refuses_kernels_it_cannot_serve():
    """A Conv with explicit (low, high) padding pairs is served (regression: a TypeError from
    walking the padding tuple); a QArray kernel of a ConvTranspose raises, as in serve_linen,
    instead of running on float values."""

    class Net(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(1, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
            self.up = nnx.ConvTranspose(4, 2, (2, 2), strides=(2, 2), rngs=nnx.Rngs(1))
            self.head = nnx.Linear(2, 3, rngs=nnx.Rngs(2))

        def __call__(self, x):
            return self.head(self.up(self.conv(x)).mean((1, 2)))

    model = Net()
    every = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    with pytest.raises(ValueError, match=r"up/kernel is a QArray but its layer \(ConvTranspose\) "
                                         "has no integer path"):
        serve_nnx(model, every)
    assert isinstance(model.conv, nnx.Conv)  # unchanged by the call that raised
    with pytest.raises(ValueError, match=r"conv/kernel is a QArray but its layer \(Conv\) is not "
                                         r"among modules=\['Linear'\]"):
        serve_nnx(model, every, modules=(nnx.Linear,))
    ref = nnx.clone(model)
    conv_only = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r"conv/kernel")
    serve_nnx(model, conv_only, activations=ACT, strategy="int8")
    assert isinstance(model.conv, QuantizedLayer)
    nnx.update(ref, jaxcomp.materialize(conv_only))
    expected = ref.head(ref.up(ref.conv(fake_quant(X, ACT))).mean((1, 2)))
    chex.assert_trees_all_close(model(X), expected, atol=1e-5, rtol=1e-5)


def test_nnx_layers_in_plain_lists_and_tuples_are_wrapped_and_served():
    """Layers held in `nnx.data([...])` (a plain list) or a tuple, also a tuple inside a list,
    are wrapped and served like those of an nnx.List (regression: silently left on float
    weights)."""

    class Net(nnx.Module):
        def __init__(self):
            self.layers = nnx.data([nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(2)]
                                   + [(nnx.Linear(8, 8, rngs=nnx.Rngs(4)),)])
            self.pair = nnx.data((nnx.Linear(8, 8, rngs=nnx.Rngs(2)),))
            self.out = nnx.Linear(8, 3, rngs=nnx.Rngs(3))

        def __call__(self, x):
            for layer in [*self.layers[:2], *self.layers[2], *self.pair]:
                x = nnx.relu(layer(x))
            return self.out(x)

    x = jax.random.normal(jax.random.key(0), (4, 8))
    model, ref = Net(), Net()
    quantize_inputs_nnx(model, ACT)
    every = lambda m: [*m.layers[:2], *m.layers[2], *m.pair, m.out]  # noqa: E731
    assert all(isinstance(m, QuantizedInput) for m in every(model))
    with pytest.raises(ValueError, match="layers/0 is already a QuantizedInput"):
        quantize_inputs_nnx(model, ACT)
    qstate = quantize_tree(nnx.state(model, nnx.Param), WEIGHTS, where=r".*kernel")
    serve_nnx(model, qstate, strategy="int8")
    assert all(isinstance(m, QuantizedLayer) for m in every(model))
    nnx.update(ref, jaxcomp.materialize(quantize_tree(nnx.state(ref, nnx.Param), WEIGHTS,
                                                      where=r".*kernel")))
    h = x  # the reference fake-quantizes each layer's input by hand
    for layer in every(ref)[:-1]:
        h = nnx.relu(layer(fake_quant(h, ACT)))
    chex.assert_trees_all_close(model(x), ref.out(fake_quant(h, ACT)), atol=1e-5, rtol=1e-5)


def test_nnx_serving_that_fails_leaves_the_model_unchanged_and_names_lsq_layers():
    """A serve_nnx call that raises (no QArray kernel) writes nothing into the model; a bad LSQ
    step names its layer's path."""

    class Net(nnx.Module):
        def __init__(self):
            self.emb = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

        def __call__(self, t):
            return self.head(self.emb(t))

    model, tokens = Net(), jnp.arange(6).reshape(2, 3)
    before = model(tokens)
    qstate = quantize_tree(nnx.state(model, nnx.Param), QuantSpec(bits=2), where=r".*embedding")
    with pytest.raises(ValueError, match="no QArray kernel"):
        serve_nnx(model, qstate)
    np.testing.assert_array_equal(model(tokens), before)
    lsq = quantize_inputs_nnx(_nnx_mlp(), ACT, method="lsq")
    path, wrapper = [(p, m) for p, m in nnx.iter_modules(lsq) if isinstance(m, QuantizedInput)][-1]
    wrapper.step.set_value(-jnp.ones(()))
    name = "/".join(str(part) for part in path)
    with pytest.raises(ValueError, match=f"{name}: the LSQ step must be finite and positive"):
        lsq(X)


def test_serving_ops_say_which_layers_run_on_integers():
    """serving_ops lists every matmul and convolution with its operand dtypes and the Linen
    layer it belongs to: the quantized layers on int8, the others on float32."""
    from jaxcomp.quant import serving_ops

    qparams = quantize_tree(LENET_VARS["params"], WEIGHTS, where=r"(Conv_0|Dense_0)/kernel")
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    ops = serving_ops(serve_linen(LENET, strategy="int8"), {"params": qparams}, x)
    by_layer = {op.scope.split("/")[-1]: op for op in ops}
    assert {k: (v.op, v.integer) for k, v in by_layer.items()} == {
        "Conv_0": ("conv_general_dilated", True), "Conv_1": ("conv_general_dilated", False),
        "Dense_0": ("dot_general", True), "Dense_1": ("dot_general", False)}
    assert by_layer["Conv_0"].operands == ("int8", "int8")
    assert by_layer["Dense_1"].operands == ("float32", "float32")


def test_linen_serving_runs_a_factorized_kernel_on_its_factors():
    """A decomposed layer (quantized factors, calibrated input) is served on its factors, as
    intercept_factorized runs them (regression: rebuilt dense on every call, 1.5x the dense
    layer's FLOPs), with its input fake-quantized by its calibrated range."""
    from jaxcomp.decompose import FixedRank, decompose_tree, map_factors
    from jaxcomp.nn.decompose import intercept_factorized
    from jaxcomp.quant import quantize

    x = jax.random.normal(jax.random.key(1), (8, 16))
    model = nn.Dense(12)
    params = model.init(jax.random.key(0), x)["params"]
    factored = map_factors(lambda f: quantize(f, WEIGHTS), decompose_tree(params, FixedRank(4)))
    ranges = calibrate_linen(model, {"params": params}, [x], ACT)
    serve = serve_linen(model, act_params=ranges)
    out = jax.jit(serve)({"params": factored}, x)
    with fake_quant_inputs(ACT, params=ranges), intercept_factorized():
        ref = model.apply({"params": jaxcomp.materialize(factored, keep=jaxcomp.decompose.Factorized)}, x)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)
    flops = jaxcomp.count_flops(lambda v, x: serve(v, x), {"params": factored}, x).total
    assert flops == 2 * 8 * (16 * 4 + 4 * 12)
