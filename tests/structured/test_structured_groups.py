"""Channel groups from the jaxpr: the coupling rules on small functions, and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcomp.structured import UnfollowedOpWarning, channel_groups, remove_channels

def _members(group):
    return {f"{m.path}[{m.axis}]": m.role for m in group.members}


def _dense(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _relu_chain(p, x):
    h = jax.nn.relu(x @ p["a"] + p["b"])
    return h @ p["c"]


CHAIN = {"a": _dense((4, 6)), "b": jnp.zeros(6), "c": _dense((6, 3))}


def test_dense_chain_couples_producer_bias_and_consumer():
    """A Dense output axis shrinks with its bias and the next layer's input axis."""
    groups = channel_groups(_relu_chain, CHAIN, jnp.ones((2, 4)))
    assert groups.names == ("a",)
    assert groups[0].size == 6 and groups["a"] is groups[0]
    assert groups.summary() == "a: 6 channels; a[1], b[0], c[0]"
    with pytest.raises(KeyError, match="no channel group named 'z'"):
        groups["z"]
    assert _members(groups[0]) == {"a[1]": "out", "b[0]": "other", "c[0]": "in"}
    assert groups.unprunable["a[0]"].startswith("meets an axis")  # the model input
    assert groups.unprunable["c[1]"] == "part of the function's output"


def test_residual_add_ties_both_sides():
    """Both operands of an add shrink together, so a residual stream is one group."""
    p = {"a": _dense((4, 6)), "r": _dense((6, 6), 1), "c": _dense((6, 3), 2)}

    def f(p, x):
        h = x @ p["a"]
        h = h + jax.nn.relu(h @ p["r"])
        return h @ p["c"]

    (group,) = channel_groups(f, p, jnp.ones((2, 4)))
    assert _members(group) == {"a[1]": "out", "r[0]": "in", "r[1]": "out", "c[0]": "in"}


def test_concatenate_offsets_the_parts():
    """The parts of a concatenation are separate groups at their offsets in the consumer."""
    p = {"a": _dense((4, 3)), "b": _dense((4, 5), 1), "c": _dense((8, 2), 2)}
    f = lambda p, x: jnp.concatenate([x @ p["a"], x @ p["b"]], axis=-1) @ p["c"]  # noqa: E731
    groups = channel_groups(f, p, jnp.ones((2, 4)))
    assert groups.names == ("a", "b")
    c_of = {g.name: next(m for m in g.members if m.path == "c") for g in groups}
    np.testing.assert_array_equal(c_of["a"].indices[:, 0], np.arange(3))
    np.testing.assert_array_equal(c_of["b"].indices[:, 0], np.arange(3, 8))


def _conv(x, w, groups=1):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_depthwise_convolution_ties_input_and_output_channels():
    """A depthwise conv (groups = channels, multiplier 2) removes a channel with its outputs."""
    p = {"a": _dense((1, 1, 1, 4)), "dw": _dense((3, 3, 1, 8), 1), "c": _dense((1, 1, 8, 2), 2)}
    f = lambda p, x: _conv(_conv(_conv(x, p["a"]), p["dw"], 4), p["c"]).sum((1, 2))  # noqa: E731
    (group,) = channel_groups(f, p, jnp.ones((1, 5, 5, 1)))
    assert group.size == 4
    dw = next(m for m in group.members if m.path == "dw")
    np.testing.assert_array_equal(dw.indices, [[0, 1], [2, 3], [4, 5], [6, 7]])
    c = next(m for m in group.members if m.path == "c")
    np.testing.assert_array_equal(c.indices, dw.indices)


def test_grouped_convolution_shrinks_every_group_alike():
    """A grouped conv (2 groups) ties channel j of every group, so the groups stay equal."""
    p = {"a": _dense((1, 1, 1, 4)), "g": _dense((3, 3, 2, 6), 1), "c": _dense((1, 1, 6, 2), 2)}
    f = lambda p, x: _conv(_conv(_conv(x, p["a"]), p["g"], 2), p["c"]).sum((1, 2))  # noqa: E731
    groups = {g.name: g for g in channel_groups(f, p, jnp.ones((1, 5, 5, 1)))}
    a = next(m for m in groups["a"].members if m.path == "a")
    np.testing.assert_array_equal(a.indices, [[0, 2], [1, 3]])  # input j of both groups
    out = next(m for m in groups["g"].members if m.path == "g" and m.axis == 3)
    np.testing.assert_array_equal(out.indices, [[0, 3], [1, 4], [2, 5]])


def test_flatten_ties_each_channel_to_its_spatial_positions():
    """A reshape of (H, W, C) into a Dense input gives each channel H*W rows of the kernel."""
    p = {"conv": _dense((3, 3, 1, 4)), "dense": _dense((2 * 2 * 4, 3), 1)}

    def f(p, x):
        h = _conv(x, p["conv"])[:, ::1]
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return h.reshape(h.shape[0], -1) @ p["dense"]

    (group,) = channel_groups(f, p, jnp.ones((2, 4, 4, 1)))
    rows = next(m for m in group.members if m.path == "dense")
    np.testing.assert_array_equal(rows.indices[1], [1, 5, 9, 13])


def test_reshape_merging_two_channel_axes_pins_both():
    """Flattening an outer product of two channel axes keeps the channels of both axes."""
    p = {"a": _dense((4, 6)), "c": _dense((6, 2), 1), "d": _dense((4, 5), 2),
         "e": _dense((5, 3), 3)}

    def f(p, x):
        outer = jax.nn.relu(x @ p["a"])[:, :, None] * p["c"][None]
        return outer.reshape(x.shape[0], -1).mean(-1, keepdims=True) + jax.nn.relu(
            x @ p["d"]) @ p["e"]

    with pytest.warns(UnfollowedOpWarning, match="merges two channel axes") as record:
        groups = channel_groups(f, p, jnp.ones((2, 4)))
    assert groups.names == ("d",)
    assert "merges two channel axes" in groups.unprunable["a[1]"]
    message = " ".join(str(w.message) for w in record)
    assert "a[1]" in message and "c[0]" in message


def test_attention_heads_are_one_group_and_head_width_is_pinned():
    """q/k/v heads and the output projection form a group; q.k's head width is pinned."""
    d, h, hd = 6, 2, 3
    p = {n: _dense((d, h, hd), i) for i, n in enumerate("qkv")}
    p["o"] = _dense((h, hd, d), 3)

    def f(p, x):
        q, k, v = (jnp.einsum("btd,dhe->bthe", x, p[n]) for n in "qkv")
        w = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(hd), axis=-1)
        return jnp.einsum("bhqk,bkhe,hed->bqd", w, v, p["o"])

    groups = {g.name: g for g in channel_groups(f, p, jnp.ones((2, 5, d)))}
    assert _members(groups["k[1]"]) == {"k[1]": "out", "q[1]": "out", "v[1]": "out", "o[0]": "in"}
    assert "contracted between two activations" in channel_groups(
        f, p, jnp.ones((2, 5, d))).unprunable["q[2]"]


def test_normalization_over_channels_pins_them():
    """A mean over the channel axis (LayerNorm) makes its channels un-prunable, silently."""
    p = {"a": _dense((4, 6)), "c": _dense((6, 3), 1), "d": _dense((4, 5), 2),
         "e": _dense((5, 3), 3)}

    def f(p, x):
        h = x @ p["a"]
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
        return h @ p["c"] + jax.nn.relu(x @ p["d"]) @ p["e"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = channel_groups(f, p, jnp.ones((2, 4)))
    assert groups.names == ("d",)
    assert "reduce" in groups.unprunable["a[1]"]


def test_nested_jit_custom_derivatives_and_remat_are_followed():
    """Channels pass through jit, custom_jvp (relu), custom_vjp and checkpoint calls."""

    @jax.custom_vjp
    def clip(x):
        return jnp.clip(x, -1.0, 1.0)

    clip.defvjp(lambda x: (clip(x), None), lambda _, g: (g,))

    @jax.jit
    def f(p, x):
        h = jax.checkpoint(lambda h: jax.nn.gelu(h))(x @ p["a"] + p["b"])
        return clip(jax.nn.relu(h)) @ p["c"]

    (group,) = channel_groups(f, CHAIN, jnp.ones((2, 4)))
    assert _members(group) == {"a[1]": "out", "b[0]": "other", "c[0]": "in"}


def test_spatial_mean_and_broadcasting_keep_channels():
    """Global average pooling and broadcast per-channel vectors keep channel identity."""
    p = {"conv": _dense((3, 3, 1, 4)), "scale": jnp.ones(4), "head": _dense((4, 2), 1)}
    f = lambda p, x: (_conv(x, p["conv"]) * p["scale"]).mean((1, 2)) @ p["head"]  # noqa: E731
    (group,) = channel_groups(f, p, jnp.ones((2, 5, 5, 1)))
    assert _members(group) == {"conv[3]": "out", "scale[0]": "other", "head[0]": "in"}


@pytest.mark.parametrize(
    "op, name",
    [
        (lambda h: jnp.flip(h, axis=-1), "rev"),
        (lambda h: jnp.pad(h, ((0, 0), (0, 2)))[:, 1:7], "pad"),
        (lambda h: lax.scan(lambda c, r: (c, r * 2.0), 0.0, h.T)[1].T, "scan"),
        (lambda h: jnp.fft.fft(h).real, "fft"),
    ],
)
def test_unfollowed_ops_pin_channels_with_a_warning_naming_the_op(op, name):
    """An op the walk cannot follow keeps the channels that reach it and warns with its name."""
    p = {"a": _dense((4, 6)), "c": _dense((6, 3), 1), "d": _dense((4, 5), 2),
         "e": _dense((5, 3), 3)}
    f = lambda p, x: op(x @ p["a"]) @ p["c"] + jax.nn.relu(x @ p["d"]) @ p["e"]  # noqa: E731
    with pytest.warns(UnfollowedOpWarning, match=name) as record:
        groups = channel_groups(f, p, jnp.ones((2, 4)))
    assert groups.names == ("d",)
    assert any("a[1]" in str(w.message) for w in record)


def test_slicing_a_channel_axis_pins_it():
    """A static slice of channels (e.g. a split in half) is not followed: its size is baked in."""
    p = {"a": _dense((4, 6)), "c": _dense((3, 3), 1)}
    with pytest.warns(UnfollowedOpWarning, match="slice"):
        with pytest.raises(ValueError, match="no prunable channel group"):
            channel_groups(lambda p, x: (x @ p["a"])[:, :3] @ p["c"], p, jnp.ones((2, 4)))


def test_where_protects_groups_by_their_producers():
    """`where` keeps a group whose producing leaf it does not select."""
    p = {"a": _dense((4, 6)), "c": _dense((6, 5), 1), "e": _dense((5, 3), 2)}
    f = lambda p, x: jax.nn.relu(jax.nn.relu(x @ p["a"]) @ p["c"]) @ p["e"]  # noqa: E731
    groups = channel_groups(f, p, jnp.ones((2, 4)), where=lambda path, _: path != "c")
    assert groups.names == ("a",)
    assert [g.name for g in groups.protected] == ["c"]


def test_where_protects_a_depthwise_conv_whatever_the_leaf_order():
    """A depthwise conv produces its channels too, so excluding it protects the group, even when
    its producer's leaf comes later in the tree (regression: only the 1x1 conv before it was
    taken as the producer, so where= excluding the depthwise conv was ignored)."""
    p = {"dw": _dense((3, 3, 1, 4)), "pw": _dense((1, 1, 1, 4), 1), "z": _dense((1, 1, 4, 2), 2)}
    f = lambda p, x: _conv(_conv(_conv(x, p["pw"]), p["dw"], 4), p["z"]).sum((1, 2))  # noqa: E731
    (group,) = channel_groups(f, p, jnp.ones((1, 5, 5, 1)))
    roles = {(m.path, m.axis): m.role for m in group.members}
    assert roles[("dw", 3)] == roles[("pw", 3)] == "out" and roles[("z", 2)] == "in"
    with pytest.raises(ValueError, match="protects every prunable group"):
        channel_groups(f, p, jnp.ones((1, 5, 5, 1)), where=lambda path, _: path != "dw")
    with pytest.raises(ValueError, match="protects every prunable group"):
        channel_groups(f, p, jnp.ones((1, 5, 5, 1)), where=lambda path, _: path != "pw")


def test_where_protecting_every_group_is_an_error():
    """Protecting every layer leaves nothing to prune: a clear error."""
    with pytest.raises(ValueError, match="protects every prunable group"):
        channel_groups(_relu_chain, CHAIN, jnp.ones((2, 4)), where=r"c")


def test_wrong_example_input_shape_is_a_clear_error():
    """Inputs the function rejects raise ValueError naming their shapes."""
    with pytest.raises(ValueError, match=r"example inputs of shapes \[\(2, 5\)\]"):
        channel_groups(_relu_chain, CHAIN, jnp.ones((2, 5)))


def test_function_without_prunable_group_is_an_error():
    """A single layer from input to output has nothing to prune."""
    with pytest.raises(ValueError, match="no prunable channel group"):
        channel_groups(lambda p, x: x @ p["a"], {"a": _dense((4, 3))}, jnp.ones((2, 4)))


def test_removal_keeps_the_function_exact_on_dead_channels():
    """Channels whose consumer rows are zero can be removed without changing the output."""
    p = dict(CHAIN, c=CHAIN["c"].at[jnp.array([1, 4])].set(0.0))
    groups = channel_groups(_relu_chain, p, jnp.ones((2, 4)))
    small = remove_channels(p, groups, {"a": np.array([0, 2, 3, 5])})
    x = _dense((3, 4), 9)
    run = jax.jit(_relu_chain)
    np.testing.assert_allclose(run(small, x), run(p, x), rtol=1e-6, atol=1e-6)
    assert small["a"].shape == (4, 4) and small["b"].shape == (4,) and small["c"].shape == (4, 3)
