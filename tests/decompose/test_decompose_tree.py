"""decompose_tree on params trees, map_factors, and the tensorly backend / x64 hygiene."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl

import jaxcomp
from jaxcomp.decompose import (
    ConvSpec,
    Energy,
    FlopBudget,
    ParamBudget,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
    decompose_tree,
    map_factors,
)
from jaxcomp.testing.models import LeNet5

from decompose_helpers import numpy_init

MODEL = LeNet5()
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
PARAMS = numpy_init(MODEL, X)["params"]
APPLY = jax.jit(lambda p, x: MODEL.apply({"params": p}, x))


def test_every_kernel_is_factorized_and_the_model_runs_on_materialize():
    """By default every kernel is factorized (Tucker-2 for Conv, SVD for Dense); biases stay; the
    materialized tree runs in the model's own apply, exactly at full rank."""
    tree = decompose_tree(PARAMS, Energy(1.0))
    kinds = {p: type(x).__name__ for p, x in jaxcomp.leaves_with_paths(tree)}
    assert kinds["Conv_0/kernel"] == kinds["Conv_1/kernel"] == "Tucker2Kernel"
    assert kinds["Dense_0/kernel"] == "SVDKernel" and kinds["Conv_0/bias"] == "ArrayImpl"
    chex.assert_trees_all_close(APPLY(jaxcomp.materialize(tree), X), APPLY(PARAMS, X), atol=1e-5)


def test_where_and_method_select_kernels():
    """`where` picks kernels by path; an explicit method leaves the other kind of kernel dense."""
    tree = decompose_tree(PARAMS, 2, where=r"Dense_0/kernel")
    assert isinstance(tree["Dense_0"]["kernel"], SVDKernel)
    assert not jaxcomp.is_compressed(tree["Conv_1"]["kernel"])
    tree = decompose_tree(PARAMS, 2, method="tt", where=r"Dense_1/kernel")
    assert isinstance(tree["Dense_1"]["kernel"], TTKernel)
    tree = decompose_tree(PARAMS, (1, 2), method="tucker2")
    assert isinstance(tree["Conv_1"]["kernel"], Tucker2Kernel)
    assert not jaxcomp.is_compressed(tree["Dense_0"]["kernel"])


def test_already_factorized_kernels_are_left_alone():
    """Running decompose_tree twice does not decompose the factors again."""
    once = decompose_tree(PARAMS, 2, where=r"Conv_1/kernel")
    twice = decompose_tree(once, 3)
    assert twice["Conv_1"]["kernel"].rank == (2, 2)
    with pytest.raises(ValueError, match=r"only kernels that are already compressed.*Conv_1/"):
        decompose_tree(once, 3, where=r"Conv_1/kernel")
    with pytest.raises(ValueError, match=r"already compressed: \['Conv_1/kernel'\]"):
        decompose_tree(once, 3, where=r"Conv_1/.*")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ranks": 2, "method": "qr"}, "method='qr'"),
        ({"ranks": 2, "where": r"nothing"}, "selects no leaf"),
        ({"ranks": 2, "where": r".*bias"}, "selects no kernel"),
        ({"ranks": 2.5}, "not a rank rule"),
        ({"ranks": 2, "method": "tt", "tt_order": 1}, "tt_order"),
        ({"ranks": Energy(0.9), "method": "cp"}, "Conv_0/kernel: Energy ranks need singular values"),
        ({"ranks": 2, "conv_specs": "SAME"}, "conv_specs must be a ConvSpec or a mapping"),
        ({"ranks": 2, "n_iter_max": 0}, "n_iter_max must be an int >= 1, got 0"),
        ({"ranks": 2, "n_iter_max": 2.5}, "n_iter_max"),
        ({"ranks": 2, "seed": "a"}, "seed must be an int"),
        ({"ranks": 2, "method": "tt", "tt_order": 2.0}, "tt_order"),
    ],
)
def test_bad_requests_raise_value_error(kwargs, match):
    """Unknown methods, empty selections, float ranks and rules a method lacks raise ValueError."""
    with pytest.raises(ValueError, match=match):
        decompose_tree(PARAMS, **kwargs)


def test_conv_specs_are_stored_in_the_leaves():
    """conv_specs (one for all, or by path) end up as each Tucker-2 leaf's spec."""
    spec = ConvSpec(strides=2, padding="VALID")
    tree = decompose_tree(PARAMS, 2, method="tucker2", conv_specs={"Conv_1/kernel": spec})
    assert tree["Conv_1"]["kernel"].spec == spec and tree["Conv_0"]["kernel"].spec == ConvSpec()


def test_param_budget_over_the_tree():
    """A ParamBudget caps the total kernel parameters of the selected layers."""
    kernels = r"(Conv_1|Dense_0|Dense_1)/kernel"
    dense_total = sum(x.size for p, x in jaxcomp.leaves_with_paths(PARAMS) if p in jaxcomp.selected_paths(PARAMS, kernels))
    tree = decompose_tree(PARAMS, ParamBudget(total=dense_total // 4), where=kernels)
    selected = [x for p, x in jaxcomp.leaves_with_paths(tree) if p in jaxcomp.selected_paths(PARAMS, kernels)]
    used = sum(x.num_params if jaxcomp.is_compressed(x) else x.size for x in selected)
    assert used <= dense_total // 4


def test_flop_budget_over_the_tree_with_count_flops():
    """A FlopBudget built from count_flops of the dense model is met by the factorized layers."""
    dense_flops = jaxcomp.count_flops(lambda p, x: MODEL.apply({"params": p}, x), PARAMS, X).per_path
    kernels = r"(Conv_1|Dense_0)/kernel"
    target = (dense_flops["Conv_1/kernel"] + dense_flops["Dense_0/kernel"]) // 3
    tree = decompose_tree(PARAMS, FlopBudget(total=target, dense_flops=dense_flops), where=kernels)
    counted = jaxcomp.count_flops(lambda p, x: MODEL.apply({"params": jaxcomp.materialize(p)}, x), tree, X)
    shapes = {"Conv_1/kernel": (2, 4, 4, 6), "Dense_0/kernel": (2, 64)}
    used = sum(
        tree_leaf.flops(shapes[p]) if jaxcomp.is_compressed(tree_leaf) else counted[p]
        for p, tree_leaf in jaxcomp.leaves_with_paths(tree) if p in shapes
    )
    assert used <= target


def test_map_factors_reaches_every_factor_with_its_path():
    """map_factors applies an array transform to each factor, with paths under the kernel path."""
    tree = decompose_tree(PARAMS, 2, where=r"(Conv_1|Dense_1)/kernel")
    tree = decompose_tree(tree, 2, method="tt", where=r"Dense_0/kernel")
    seen = []
    out = map_factors(lambda path, f: (seen.append(path), 2 * f)[1], tree, with_path=True)
    assert seen == [
        "Conv_1/kernel/core", "Conv_1/kernel/u_in", "Conv_1/kernel/u_out",
        "Dense_0/kernel/cores/0", "Dense_0/kernel/cores/1", "Dense_0/kernel/cores/2",
        "Dense_1/kernel/u", "Dense_1/kernel/v",
    ]
    chex.assert_trees_all_close(out["Dense_1"]["kernel"].materialize(), 4 * tree["Dense_1"]["kernel"].materialize())
    chex.assert_trees_all_equal(out["Dense_1"]["bias"], tree["Dense_1"]["bias"])
    with pytest.raises(ValueError, match="no factorized leaf"):
        map_factors(lambda f: f, PARAMS)
    with pytest.raises(ValueError, match="fn must be callable, got None"):
        map_factors(None, tree)


def test_fine_tuning_the_factors_with_optax():
    """Factors are ordinary leaves: optax fits them through materialize inside jit."""
    import optax

    leaf = decompose_tree({"k": jnp.asarray(PARAMS["Conv_1"]["kernel"])}, 2, where=None)["k"]
    target = 1.5 * leaf.materialize()
    tx = optax.adam(1e-2)

    @jax.jit
    def step(leaf, state):
        value, grads = jax.value_and_grad(lambda l: jnp.sum((l.materialize() - target) ** 2))(leaf)
        updates, state = tx.update(grads, state, leaf)
        return optax.apply_updates(leaf, updates), state, value

    state, new, losses = tx.init(leaf), leaf, []
    for _ in range(10):
        new, state, value = step(new, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    assert isinstance(new, Tucker2Kernel) and new.spec == leaf.spec


def test_tensorly_backend_and_x64_flag_are_left_as_the_user_had_them():
    """Decomposing selects tensorly's numpy backend only for itself: a user's jax backend stays,
    and jax_enable_x64 stays off (tensorly's jax backend switches it on when it loads)."""
    previous, x64 = tl.get_backend(), bool(jax.config.jax_enable_x64)
    try:
        tl.set_backend("jax")
        jax.config.update("jax_enable_x64", False)
        tree = decompose_tree(PARAMS, 2, where=r"Conv_1/kernel")
        assert tl.get_backend() == "jax"
        assert not jax.config.jax_enable_x64
        assert tree["Conv_1"]["kernel"].core.dtype == jnp.float32
    finally:
        tl.set_backend(previous)
        jax.config.update("jax_enable_x64", x64)
    decompose_tree(PARAMS, 2, where=r"Conv_1/kernel")
    assert tl.get_backend() == previous and bool(jax.config.jax_enable_x64) == x64
