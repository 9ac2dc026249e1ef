"""Selection rules: regex, predicate, bool trees, empty matches, and the trees they apply to."""

import re

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxcomp import (
    assert_same_structure,
    leaves_with_paths,
    map_selected,
    path_dict,
    select,
    selected_paths,
    tree_paths,
)
from jaxcomp.testing import models, nnx_models
from leaves import make_scaled_int

PARAMS = {
    "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
}


def test_paths_of_a_linen_params_dict_are_slash_joined_keys():
    variables = models.MLP(features=(5,)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    assert tree_paths(variables["params"]) == [
        "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel",
    ]
    assert tree_paths(variables)[0] == "params/Dense_0/bias"


def test_nnx_state_paths_skip_the_variable_value_attribute():
    model = nnx_models.MLP(input_shape=(4, 4, 1), features=(5,), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert tree_paths(state) == ["head/bias", "head/kernel", "layers/0/bias", "layers/0/kernel"]


def test_optax_state_paths_name_the_moment_and_the_param():
    opt_state = optax.adam(1e-3).init(PARAMS)
    paths = tree_paths(opt_state)
    assert "0/mu/Dense_0/kernel" in paths and "0/nu/Dense_1/bias" in paths and "0/count" in paths


def test_regex_is_a_full_match_on_the_path():
    assert selected_paths(PARAMS, r".*kernel") == ["Dense_0/kernel", "Dense_1/kernel"]
    assert selected_paths(PARAMS, re.compile(r"Dense_1/.*")) == ["Dense_1/bias", "Dense_1/kernel"]
    # "kernel" alone does not match "Dense_0/kernel": a full match, not a search.
    with pytest.raises(ValueError, match="selects no leaf"):
        select(PARAMS, "kernel")


def test_predicate_receives_path_and_leaf():
    seen = []

    def where(path, leaf):
        seen.append(path)
        return leaf.ndim == 2 and path.startswith("Dense_0")

    assert select(PARAMS, where) == {
        "Dense_0": {"kernel": True, "bias": False},
        "Dense_1": {"kernel": False, "bias": False},
    }
    assert sorted(seen) == sorted(tree_paths(PARAMS))


def test_bool_tree_full_and_prefix():
    full = {"Dense_0": {"kernel": True, "bias": False}, "Dense_1": {"kernel": False, "bias": False}}
    assert selected_paths(PARAMS, full) == ["Dense_0/kernel"]
    prefix = {"Dense_0": False, "Dense_1": True}
    assert selected_paths(PARAMS, prefix) == ["Dense_1/bias", "Dense_1/kernel"]


def test_bool_tree_with_a_wrong_structure_is_a_value_error():
    with pytest.raises(ValueError, match="where="):
        select(PARAMS, {"Dense_0": True})
    with pytest.raises(ValueError, match="bools"):
        select(PARAMS, {"Dense_0": {"kernel": "yes", "bias": False}, "Dense_1": False})


def test_empty_match_lists_the_available_paths():
    with pytest.raises(ValueError) as info:
        select(PARAMS, r".*conv.*")
    message = str(info.value)
    assert "Dense_0/kernel" in message and "Dense_1/bias" in message
    assert select(PARAMS, r".*conv.*", allow_empty=True) == jax.tree.map(lambda _: False, PARAMS)


def test_invalid_regex_is_a_value_error():
    with pytest.raises(ValueError, match="regular expression"):
        select(PARAMS, r"(unclosed")


def test_a_list_of_patterns_points_to_the_alternation_syntax():
    with pytest.raises(ValueError, match="join the alternatives with '\\|'"):
        select(PARAMS, [r".*kernel", r".*bias"])


def test_none_selects_every_leaf():
    assert selected_paths(PARAMS, None) == tree_paths(PARAMS)


def test_map_selected_touches_only_selected_leaves_and_zips_other_trees():
    scales = jax.tree.map(lambda x: 2.0, PARAMS)
    out = map_selected(lambda x, s: x * s, PARAMS, scales, where=r".*kernel")
    chex.assert_trees_all_close(out["Dense_0"]["kernel"], 2 * jnp.ones((3, 4)))
    assert out["Dense_0"]["bias"] is PARAMS["Dense_0"]["bias"]
    named = map_selected(lambda p, x: p, PARAMS, where=r".*bias", with_path=True)
    assert named["Dense_1"]["bias"] == "Dense_1/bias"


def test_map_selected_rejects_a_mismatched_extra_tree():
    with pytest.raises(ValueError, match="missing paths: 'Dense_1/kernel'"):
        map_selected(lambda x, y: x, PARAMS, {"Dense_0": PARAMS["Dense_0"],
                                              "Dense_1": {"bias": 1}}, where=None)


def test_map_selected_on_nnx_state_returns_a_state():
    model = nnx_models.MLP(input_shape=(4, 4, 1), features=(5,), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    zeroed = map_selected(jnp.zeros_like, state, where=r".*kernel")
    assert isinstance(zeroed, nnx.State)
    nnx.update(model, zeroed)
    assert float(jnp.abs(model.head.kernel[...]).sum()) == 0.0
    assert float(jnp.abs(model.head.bias[...]).sum()) == 0.0  # zero-initialised anyway


def test_compressed_leaves_are_single_leaves():
    tree = {"a": make_scaled_int(), "b": jnp.ones(2)}
    assert tree_paths(tree) == ["a", "b"]
    assert leaves_with_paths(tree)[0][1] is tree["a"]
    kinds = map_selected(lambda x: type(x).__name__, tree, where=None)
    assert kinds == {"a": "ScaledInt", "b": "ArrayImpl"}


def test_plain_containers_lists_and_tuples():
    tree = [jnp.ones(2), (jnp.ones(3), {"w": jnp.ones(1)})]
    assert tree_paths(tree) == ["0", "1/0", "1/1/w"]
    assert path_dict(tree)["1/1/w"].shape == (1,)


def test_assert_same_structure_names_the_difference():
    assert_same_structure(PARAMS, jax.tree.map(lambda x: x > 0, PARAMS), what="masks")
    with pytest.raises(ValueError, match="masks does not match.*missing paths: 'Dense_1/"):
        assert_same_structure(PARAMS, {"Dense_0": PARAMS["Dense_0"]}, what="masks")


def test_colliding_paths_are_an_error_not_a_silent_swap():
    """A key containing "/" that collides with a nested key would make where= ambiguous (and
    once swapped two kernels in decompose_tree)."""
    tree = {"a/kernel": jnp.ones((2, 2)), "a": {"kernel": jnp.zeros((2, 2))}}
    with pytest.raises(ValueError, match="two leaves of the tree have the path 'a/kernel'"):
        select(tree, r".*kernel")


def test_a_plain_dict_prefix_selects_in_nnx_state_and_frozen_dicts():
    """The docs' dict-prefix form works whatever the params' container types are."""
    from flax.core import freeze

    state = nnx.state(nnx_models.MLP(rngs=nnx.Rngs(0)), nnx.Param)
    first = tree_paths(state)[0].split("/")[0]
    chosen = selected_paths(state, {first: True, **{k: False for k in state if k != first}})
    assert chosen and all(p.startswith(first + "/") for p in chosen)
    frozen = freeze({"a": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}})
    assert selected_paths(frozen, {"a": {"kernel": True, "bias": False}}) == ["a/kernel"]
    with pytest.raises(ValueError, match="names 'nope', which is not a path"):
        selected_paths(frozen, {"a": True, "nope": False})
