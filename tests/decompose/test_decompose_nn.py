"""Flax integration: NNX module surgery and the Linen interceptor run the factor sequences."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp
from jaxcomp.decompose import CPKernel, ConvSpec, Energy, Tucker2Kernel
from jaxcomp.nn.decompose import (
    FactorizedConv,
    FactorizedKernel,
    FactorizedLinear,
    conv_specs_linen,
    decompose_linen,
    decompose_nnx,
    intercept_factorized,
)
from jaxcomp.testing import models

from decompose_helpers import numpy_init

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
Y = jnp.array([1, 3])


class Tiny(nnx.Module):
    """A small NNX model with a stride-2 conv, a dilated conv, a 1x1 stride-2 shortcut, BatchNorm
    and two Linear layers. Built with zero initializers (no per-shape random compile), then given
    random weights from numpy."""

    def __init__(self):
        rngs, zeros = nnx.Rngs(0), nnx.initializers.zeros
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, kernel_init=zeros, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), kernel_dilation=2, kernel_init=zeros, rngs=rngs)
        self.shortcut = nnx.Conv(3, 8, (1, 1), strides=2, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.hidden = nnx.Linear(8, 12, kernel_init=zeros, rngs=rngs)
        self.head = nnx.Linear(12, 10, kernel_init=zeros, rngs=rngs)
        rng = np.random.default_rng(0)
        for layer in (self.conv1, self.conv2, self.shortcut, self.hidden, self.head):
            shape = layer.kernel.get_value().shape
            layer.kernel.set_value(jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32))

    def __call__(self, x):
        y = self.conv2(nnx.relu(self.conv1(x)))
        y = nnx.relu(self.norm(y + self.shortcut(x)))
        return self.head(nnx.relu(self.hidden(y.mean(axis=(1, 2)))))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    model.eval()
    return model


@nnx.jit
def nnx_forward(model, x):
    return model(x)


def test_nnx_surgery_replaces_layers_and_keeps_the_models_call(tiny):
    """decompose_nnx swaps the selected Conv/Linear layers for factorized ones (stride-2 and dilated
    convs keep their spec); the model's own __call__ runs them; the original model is unchanged."""
    model = tiny
    new = decompose_nnx(model, 2, where=r"(conv.|shortcut|head)/kernel")
    assert isinstance(new.conv1, FactorizedConv) and isinstance(new.shortcut, FactorizedConv)
    assert new.conv1.kernel.as_leaf().spec == ConvSpec(strides=2)
    assert new.conv2.kernel.as_leaf().spec == ConvSpec(dilation=2)
    assert isinstance(new.head, FactorizedLinear) and isinstance(new.hidden, nnx.Linear)
    assert isinstance(model.conv1, nnx.Conv) and new.shortcut.bias is None
    out = nnx_forward(new, X)
    # The same factors, materialized into the original layers, give the same function.
    reference = nnx.clone(model)
    for parts, module in nnx.iter_modules(new):
        if isinstance(module, (FactorizedConv, FactorizedLinear)):
            target = reference
            for part in parts:
                target = target[part] if isinstance(part, int) else getattr(target, part)
            target.kernel.set_value(module.kernel.as_leaf().materialize())
    chex.assert_trees_all_close(out, nnx_forward(reference, X), atol=1e-5)


def test_nnx_full_rank_is_the_original_function(tiny):
    """At full rank (Energy(1.0)) the decomposed model computes the original function."""
    new = decompose_nnx(tiny, Energy(1.0))
    chex.assert_trees_all_close(nnx_forward(new, X), nnx_forward(tiny, X), atol=1e-5)


def test_nnx_factors_are_params_at_kernel_paths_and_fine_tune_with_optax(tiny):
    """The factors are nnx.Params under each layer's kernel path; nnx.Optimizer trains them."""
    model = decompose_nnx(tiny, 2, where=r"(conv2|hidden)/kernel")
    model.train()
    paths = jaxcomp.tree_paths(nnx.state(model, nnx.Param))
    assert {"conv2/kernel/core", "conv2/kernel/u_in", "conv2/kernel/u_out",
            "hidden/kernel/u", "hidden/kernel/v", "conv2/bias"} <= set(paths)
    before = model.conv2.kernel.core.get_value()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.conv2.kernel.core.get_value(), before)


def test_nnx_cp_and_tt_layers(tiny):
    """CP convolutions and TT dense layers are module-surgery targets too."""
    new = decompose_nnx(tiny, 3, method="cp", where=r"conv2/kernel")
    new = decompose_nnx(new, 2, method="tt", tt_order=2, where=r"hidden/kernel")
    assert isinstance(new.conv2.kernel.as_leaf(), CPKernel)
    assert isinstance(new.hidden, FactorizedLinear) and new.hidden.kernel.as_leaf().kind == "TT"
    assert nnx_forward(new, X).shape == (2, 10)


def test_nnx_surgery_rejects_unsupported_layers(tiny):
    """Grouped convolutions raise ValueError naming the path; selecting no layer raises."""

    class Grouped(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, kernel_init=nnx.initializers.zeros,
                                 rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="conv/kernel: grouped convolution"):
        decompose_nnx(Grouped(), 2)
    with pytest.raises(ValueError, match="selects no kernel of an nnx.Linear or nnx.Conv"):
        decompose_nnx(tiny, 2, where=r".*norm.*")


def test_factorized_kernel_module_round_trips_the_leaf():
    """FactorizedKernel holds one Param per factor and rebuilds the same leaf (None factors too)."""
    leaf = Tucker2Kernel(jnp.ones((3, 3, 2, 2)), None, jnp.ones((2, 5)), spec=ConvSpec(strides=2))
    module = FactorizedKernel(leaf)
    chex.assert_trees_all_equal(module.as_leaf(), leaf)
    assert sorted(nnx.state(module, nnx.Param).keys()) == ["core", "u_out"]


LINEN = models.ResNet(stage_features=(4, 8), blocks_per_stage=1)
LINEN_VARS = numpy_init(LINEN, X)


@jax.jit
def linen_dense(variables, x):
    return LINEN.apply(variables, x)


@jax.jit
def linen_factorized(variables, x):
    with intercept_factorized():
        return LINEN.apply(variables, x)


def test_linen_interceptor_runs_the_factors_and_equals_materialize():
    """With intercept_factorized, nn.Conv/nn.Dense with factorized kernels run their factor
    sequences (strides from the module) and match the dense model on the materialized tree."""
    variables = decompose_linen(LINEN, LINEN_VARS, X, ranks=2, where=r".*(Conv|conv).*kernel|head/kernel")
    kernel = variables["params"]["stage1_block0"]["Conv_0"]["kernel"]
    assert isinstance(kernel, Tucker2Kernel) and kernel.spec == ConvSpec(strides=2)
    got = linen_factorized(variables, X)
    want = linen_dense(jaxcomp.materialize(variables), X)
    chex.assert_trees_all_close(got, want, atol=1e-5)
    counted = jaxcomp.count_flops(lambda p, x: linen_factorized({**variables, "params": p}, x), variables["params"], X)
    assert counted["stage1_block0/Conv_0/kernel"] == kernel.flops((2, 8, 8, 4))


def test_linen_interceptor_with_other_compressed_kernels_asks_to_densify_them():
    """A tree that also holds other compressed kernels (pruned, quantized) raises naming the
    layer; materialize(keep=Factorized) densifies those and keeps the factors running."""
    from jaxcomp.decompose import Factorized
    from jaxcomp.quant import QuantSpec, quantize

    variables = decompose_linen(LINEN, LINEN_VARS, X, ranks=2, where=r"head/kernel")
    params = dict(variables["params"])
    stem = dict(params["stem_conv"])
    stem["kernel"] = quantize(stem["kernel"], QuantSpec(channel_axes=(-1,)))
    params["stem_conv"] = stem
    variables = {**variables, "params": params}
    with pytest.raises(ValueError, match="stem_conv/kernel: intercept_factorized runs factorized kernels; "
                                         "this one is a QArray"):
        linen_factorized(variables, X)
    kept = jaxcomp.materialize(variables, keep=Factorized)
    assert isinstance(kept["params"]["head"]["kernel"], Factorized)
    chex.assert_trees_all_close(linen_factorized(kept, X),
                                linen_dense(jaxcomp.materialize(variables), X), atol=1e-5)


def test_linen_interceptor_names_a_factorized_param_that_is_not_a_kernel():
    """A factorized embedding table (decompose_tree accepts any 2-D leaf) is named with the fix,
    not left to Flax's shape error."""
    from jaxcomp.decompose import FixedRank, decompose_tree

    class Tagger(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Dense(3, name="head")(nn.Embed(32, 16, name="embed")(tokens))

    model, tokens = Tagger(), jnp.arange(6).reshape(2, 3)
    params = model.init(jax.random.key(0), tokens)["params"]
    factored = decompose_tree(params, FixedRank(4), where="embed/embedding")
    with pytest.raises(ValueError, match="embed/embedding: intercept_factorized runs factorized "
                                         "kernels of nn.Dense and nn.Conv layers only; this Embed "
                                         "param is a SVD"):
        with intercept_factorized():
            model.apply({"params": factored}, tokens)
    out = model.apply({"params": jaxcomp.materialize(factored)}, tokens)
    assert out.shape == (2, 3, 3)
    from jaxcomp.quant import QuantSpec, quantize_tree

    quantized = quantize_tree(params, QuantSpec(), where="embed/embedding")
    with pytest.raises(ValueError, match=r"this Embed param is a QArray: densify the other "
                                         r"compressed leaves first with jaxcomp.materialize"):
        with intercept_factorized():
            model.apply({"params": quantized}, tokens)


def test_linen_interceptor_uses_the_modules_own_spec():
    """The interceptor takes stride/padding/dilation from the Linen module, not the leaf."""
    tree = jaxcomp.decompose.decompose_tree(LINEN_VARS["params"], 2, where=r"stage1_block0/Conv_0/kernel")
    assert tree["stage1_block0"]["Conv_0"]["kernel"].spec == ConvSpec()
    got = linen_factorized({**LINEN_VARS, "params": tree}, X)
    chex.assert_trees_all_close(got, linen_dense({**LINEN_VARS, "params": jaxcomp.materialize(tree)}, X), atol=1e-5)


def test_linen_conv_specs_are_read_from_the_model():
    """conv_specs_linen reads each nn.Conv's stride, padding and dilation by kernel path."""
    specs = conv_specs_linen(LINEN, LINEN_VARS, X)
    assert specs["stage1_block0/Conv_0/kernel"] == ConvSpec(strides=2)
    assert specs["stage1_block0/shortcut_conv/kernel"] == ConvSpec(strides=2)
    assert specs["stem_conv/kernel"] == ConvSpec()


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_linen_fine_tuning_through_the_interceptor():
    """A jitted optax step through the interceptor trains the factors (gradients reach them)."""
    model = TinyLinen()
    variables = decompose_linen(model, numpy_init(model, X), X, ranks=2)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            with intercept_factorized():
                logits = model.apply({"params": p}, X)
            return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state = variables["params"], tx.init(variables["params"])
    losses = []
    for _ in range(5):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    assert isinstance(params["Conv_0"]["kernel"], Tucker2Kernel)
    assert params["Conv_0"]["kernel"].spec == ConvSpec(strides=2)


def test_linen_without_interceptor_fails_loudly_and_mismatch_raises():
    """Without the interceptor Flax rejects the factorized kernel's shape; a Conv kernel in a Dense
    layer raises ValueError naming the path."""
    model = nn.Dense(4)
    variables = numpy_init(model, jnp.ones((1, 8)))
    tree = jaxcomp.decompose.decompose_tree(variables["params"], 2)
    with pytest.raises(Exception, match="shape"):
        model.apply({"params": tree}, jnp.ones((1, 8)))
    wrong = {"kernel": Tucker2Kernel(jnp.ones((1, 1, 8, 4))), "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match="kernel: a Dense layer holds a Tucker2 kernel"):
        with intercept_factorized():
            model.apply({"params": wrong}, jnp.ones((1, 8)))


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.ConvTranspose(6, (3, 3), strides=(2, 2))(x)


def linen_apply(model, variables, x):
    with intercept_factorized():
        return model.apply(variables, x)


def test_linen_layers_the_interceptor_cannot_run_are_left_dense_or_named():
    """By default decompose_linen skips nn.ConvTranspose; selecting it, or running a tree that
    holds one factorized, is a ValueError naming the layer."""
    model = Upsample()
    variables = numpy_init(model, X)
    out = decompose_linen(model, variables, X, ranks=2)
    assert isinstance(out["params"]["Conv_0"]["kernel"], Tucker2Kernel)
    assert not jaxcomp.is_compressed(out["params"]["ConvTranspose_0"]["kernel"])
    chex.assert_trees_all_close(linen_apply(model, out, X),
                                model.apply(jaxcomp.materialize(out), X), atol=1e-5)
    with pytest.raises(ValueError, match="ConvTranspose_0/kernel: .* not of ConvTranspose"):
        decompose_linen(model, variables, X, ranks=2, where=r".*kernel")
    tree = jaxcomp.decompose.decompose_tree(variables["params"], 2)
    with pytest.raises(ValueError, match="ConvTranspose_0/kernel: intercept_factorized .* not of "
                                         "ConvTranspose"):
        linen_apply(model, {"params": tree}, X)


class _Valid(nn.Module):
    """VALID 5x5 convolutions on a small map: the input outnumbers the output positions."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (5, 5), padding="VALID")(x))
        x = nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_a_flop_budget_holds_for_valid_convolutions():
    """Tucker-2's first 1x1 runs on every input position: under VALID padding that is more than
    strides x output positions, and the budget must count it (it used to overshoot by 10-20%).
    decompose_linen reads the input sizes from its trace; decompose_tree needs them given."""
    from jaxcomp.decompose import FlopBudget, decompose_tree

    x = jnp.ones((2, 12, 12, 3))
    variables = numpy_init(_Valid(), x)
    dense = jaxcomp.count_flops(lambda p, x: _Valid().apply({"params": p}, x), variables["params"], x)
    kernel = "Conv_1/kernel"

    def factorized_flops(params):
        def run(p, x):
            with intercept_factorized():
                return _Valid().apply({"params": p}, x)

        return jaxcomp.count_flops(run, params, x)[kernel]

    for fraction in (0.9, 0.5):
        total = int(fraction * dense[kernel])
        for flops in ({kernel: dense[kernel]}, dense):  # a mapping (traced sizes) or the FlopCount
            out = decompose_linen(_Valid(), variables, x, where=kernel,
                                  ranks=FlopBudget(total, dense_flops=flops))
            assert isinstance(out["params"]["Conv_1"]["kernel"], Tucker2Kernel)
            assert factorized_flops(out["params"]) <= total
    params = {"c": {"kernel": variables["params"]["Conv_1"]["kernel"]}}
    spec = {"c/kernel": ConvSpec(padding="VALID")}
    with pytest.raises(ValueError, match="c/kernel: .*VALID.*input size"):
        decompose_tree(params, FlopBudget(10**5, {"c/kernel": dense[kernel]}), conv_specs=spec)
    tree = decompose_tree(params, FlopBudget(dense[kernel] // 2, {"c/kernel": dense[kernel]},
                                             input_hw={"c/kernel": (8, 8)}), conv_specs=spec)
    assert tree["c"]["kernel"].flops((2, 8, 8, 32)) <= dense[kernel] // 2


class _Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise: the factors cannot run it
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class _NnxDepthwise(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 8, 4, rngs=rngs)

    def __call__(self, x):
        x = self.depthwise(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


def test_the_default_selection_leaves_grouped_convolutions_dense():
    """A depthwise conv, which the factor sequence cannot run, is left dense by the default
    `where` (as other unsupported layers are); selecting it explicitly names it in a ValueError."""
    variables = numpy_init(_Depthwise(), X)
    out = decompose_linen(_Depthwise(), variables, X, ranks=2)["params"]
    assert isinstance(out["Conv_0"]["kernel"], Tucker2Kernel)
    assert not jaxcomp.is_compressed(out["Conv_1"]["kernel"])
    with pytest.raises(ValueError, match="Conv_1/kernel: grouped convolution"):
        decompose_linen(_Depthwise(), variables, X, ranks=2, where=r"Conv_\d/kernel")
    model = decompose_nnx(_NnxDepthwise(), 2)
    assert isinstance(model.conv, FactorizedConv) and isinstance(model.depthwise, nnx.Conv)
    assert model(X).shape == (2, 4)
    with pytest.raises(ValueError, match="depthwise/kernel: grouped convolution"):
        decompose_nnx(_NnxDepthwise(), 2, where=r"depthwise/kernel")


class _SharedValid(nn.Module):
    """One VALID conv run on a 12x12 map and on 6x6 maps: their input/output ratios differ."""

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(16, (5, 5), padding="VALID")
        big = conv(x)
        small = conv(x[:, :6, :6].repeat(4, axis=0))
        return big.sum() + small.sum()


def test_a_flop_budget_holds_for_a_convolution_run_on_several_sizes():
    """Positions are summed over the calls, so a layer run on maps of several sizes is costed
    for all of them (the largest map's ratio undercounted the small ones)."""
    from jaxcomp.decompose import FlopBudget

    x = jnp.ones((1, 12, 12, 16))
    variables = numpy_init(_SharedValid(), x)
    apply = lambda p, x: _SharedValid().apply({"params": p}, x)  # noqa: E731
    dense = jaxcomp.count_flops(apply, variables["params"], x)
    kernel = "Conv_0/kernel"

    def run(p, x):
        with intercept_factorized():
            return apply(p, x)

    for fraction in (0.6, 0.3):
        total = int(fraction * dense[kernel])
        for flops in (dense, {kernel: dense[kernel]}):  # the FlopCount, or traced positions
            out = decompose_linen(_SharedValid(), variables, x, where=kernel,
                                  ranks=FlopBudget(total, dense_flops=flops))
            assert jaxcomp.count_flops(run, out["params"], x)[kernel] <= total


def test_array_valued_conv_options_decompose_like_tuples():
    """Flax accepts NumPy arrays for strides and padding; so do ConvSpec, VBMF and the default
    selection of decompose_nnx (it used to leave such a conv dense, silently)."""
    from jaxcomp.decompose import VBMF

    assert ConvSpec(strides=np.array([2, 2]), padding=np.array([[1, 1], [1, 1]])) == ConvSpec(
        strides=2, padding=1)
    assert VBMF(sigma2=jnp.float32(0.5)).sigma2 == 0.5

    class Strided(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 8, (3, 3), strides=np.array([2, 2]), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.conv(x)

    assert isinstance(decompose_nnx(Strided(), 2).conv, FactorizedConv)


def test_interceptors_entered_inside_intercept_factorized_still_run():
    """fake_quant_inputs entered inside intercept_factorized quantizes the factorized layer's
    input as it does when entered outside (regression: the factors replaced the layer's call, so
    interceptors entered after intercept_factorized were skipped silently)."""
    from jaxcomp.decompose import FixedRank, decompose_tree
    from jaxcomp.nn.quant import fake_quant_inputs
    from jaxcomp.quant import QuantSpec, fake_quant

    x = jax.random.normal(jax.random.key(1), (8, 16))
    model = nn.Dense(12)
    params = decompose_tree(model.init(jax.random.key(0), x)["params"], FixedRank(4))
    k = params["kernel"]
    want = fake_quant(x, QuantSpec(bits=4)) @ k.u @ k.v + params["bias"]
    with fake_quant_inputs(QuantSpec(bits=4)), intercept_factorized():
        outside = model.apply({"params": params}, x)
    with intercept_factorized(), fake_quant_inputs(QuantSpec(bits=4)):
        inside = model.apply({"params": params}, x)
    np.testing.assert_allclose(outside, want, atol=1e-5)
    np.testing.assert_allclose(inside, want, atol=1e-5)
