"""FLOP counts from the jaxpr: hand-computed totals, attribution to parameter paths."""

import jax
import jax.numpy as jnp
import pytest

from jaxcomp import count_flops, report
from jaxcomp.flops import ACTIVATIONS
from jaxcomp.testing import models
from leaves import make_scaled_int

X = jnp.zeros((2, 8, 8, 1))


def _linen_flops(model, x=X):
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    rest = {k: v for k, v in variables.items() if k != "params"}
    return count_flops(lambda p, x: model.apply({"params": p, **rest}, x), variables["params"], x)


def test_lenet5_matches_the_hand_count():
    count = _linen_flops(models.LeNet5())
    # 2 * output elements * window * input channels for convs; 2 * batch * in * out for dense.
    assert count.per_path == {
        "Conv_0/kernel": 2 * (2 * 8 * 8 * 6) * 25 * 1,
        "Conv_1/kernel": 2 * (2 * 4 * 4 * 16) * 25 * 6,
        "Dense_0/kernel": 2 * 2 * 64 * 120,
        "Dense_1/kernel": 2 * 2 * 120 * 84,
        "Dense_2/kernel": 2 * 2 * 84 * 10,
    }
    assert count.total == sum(count.per_path.values())


def test_attention_scores_count_as_activations():
    count = _linen_flops(models.TransformerEncoder(d_model=16, num_heads=2, mlp_dim=32))
    tokens, d = 8, 16
    assert count["attention/query/kernel"] == 2 * 2 * tokens * d * d
    # q @ k^T and weights @ v: 2 * batch * heads * tokens * tokens * head_dim each.
    assert count[ACTIVATIONS] == 2 * (2 * 2 * 2 * tokens * tokens * 8)


def test_strided_and_grouped_convolutions():
    def conv(p, x):
        y = jax.lax.conv_general_dilated(x, p["k"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.conv_general_dilated(y, p["dw"], (1, 1), "SAME", feature_group_count=4,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    params = {"k": jnp.zeros((3, 3, 1, 4)), "dw": jnp.zeros((3, 3, 1, 4))}
    count = count_flops(conv, params, X)
    assert count["k"] == 2 * (2 * 4 * 4 * 4) * 9 * 1
    assert count["dw"] == 2 * (2 * 4 * 4 * 4) * 9 * 1  # depthwise: one input channel per group


def test_a_compressed_leaf_materialized_inside_the_forward_is_charged_to_its_path():
    params = {"q": make_scaled_int((4, 3)), "b": jnp.zeros(3)}

    def apply(p, x):
        return x @ p["q"].materialize() + p["b"]

    assert count_flops(apply, params, jnp.ones((5, 4))).per_path == {"q": 2 * 5 * 4 * 3}


def test_weight_only_products_are_charged_to_every_factor():
    params = {"u": jnp.ones((6, 2)), "v": jnp.ones((2, 5))}
    count = count_flops(lambda p, x: x @ (p["u"] @ p["v"]), params, jnp.ones((3, 6)))
    # u @ v: 2*6*2*5 = 120 shared by both factors; x @ w: 2*3*6*5 = 180 shared too.
    assert count.total == 300 and count["u"] + count["v"] == 300


def test_scan_multiplies_by_its_length():
    params = {"w": jnp.ones((4, 4))}

    def apply(p, x):
        return jax.lax.scan(lambda c, _: (c @ p["w"], None), x, None, length=3)[0]

    assert count_flops(apply, params, jnp.ones((2, 4)))["w"] == 3 * 2 * 2 * 4 * 4


def test_report_shows_flops_and_totals():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    count = count_flops(lambda p, x: x @ p["w"] + p["b"], params, jnp.ones((2, 4)))
    r = report(params, flops=count)
    assert [row.flops for row in r.rows] == [None, 48]
    assert r.totals.flops == 48 and "FLOPs" in str(r)


def test_mismatched_inputs_are_explained():
    with pytest.raises(Exception):
        count_flops(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 3))}, jnp.ones((2, 5)))




def test_transposed_convolution_counts_inputs_not_inserted_zeros():
    """fvcore/Torch convention: batch * input positions * window * in * out channels * 2."""
    from flax import linen as nn

    x = jnp.zeros((1, 5, 5, 4))
    count = _linen_flops(nn.ConvTranspose(6, (3, 3), strides=(2, 2)), x)
    assert count.per_path == {"kernel": 2 * 25 * 9 * 4 * 6}


def test_a_while_loop_body_counts_once_and_keeps_the_weights_path():
    """Unknown trip count: one body's FLOPs, charged to the weight, not to "(activations)"."""
    def fn(p, x, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ p["w"]),
                                  (0, x))[1]

    count = count_flops(fn, {"w": jnp.ones((4, 4))}, jnp.ones((2, 4)), 3)
    assert count.per_path == {"w": 2 * 2 * 4 * 4}


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_a_stride_one_transposed_conv_counts_inputs_times_the_window(padding):
    """Stride 1 VALID pads every side by the whole window (a full convolution): the padding
    zeros are not multiplied, as for the zeros a stride inserts (regression: counted 7x7)."""
    from flax import linen as nn

    x = jnp.zeros((2, 5, 5, 4))
    count = _linen_flops(nn.ConvTranspose(6, (3, 3), padding=padding), x)
    assert count.per_path == {"kernel": 2 * 2 * 25 * 9 * 4 * 6}
    # A strided 1x1 convolution (a downsampling shortcut) still counts its outputs.
    assert _linen_flops(nn.Conv(6, (1, 1), strides=2), x).per_path == {
        "kernel": 2 * 2 * 9 * 4 * 6}


@pytest.mark.parametrize("k,pad", [(2, 1), (3, 2)])
def test_an_ordinary_conv_padded_by_the_whole_window_counts_its_outputs(k, pad):
    """A regular `nn.Conv` padded by k - 1 looks like a stride-1 transposed convolution in the
    jaxpr, but it multiplies its padding: every output position counts (regression: counted
    per input, 0.64x at k=3)."""
    from flax import linen as nn

    x = jnp.zeros((2, 8, 8, 4))
    out = 8 + 2 * pad - k + 1
    count = _linen_flops(nn.Conv(6, (k, k), padding=pad), x)
    assert count.per_path == {"kernel": 2 * 2 * out * out * k * k * 4 * 6}


def test_the_input_gradient_of_a_conv_counts_like_its_forward():
    """The input gradient of a VALID convolution is a full convolution of the flipped kernel;
    it multiplies no padding, so a grad step counts twice the forward (weight and input
    gradients) on top of the forward itself."""
    from flax import linen as nn

    model = nn.Conv(6, (3, 3), padding="VALID")
    x = jnp.zeros((2, 8, 8, 4))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    forward = 2 * 2 * 6 * 6 * 9 * 4 * 6
    grad = jax.grad(lambda p, x: model.apply({"params": p}, x).sum(), argnums=(0, 1))
    assert count_flops(grad, params, x).total == 3 * forward


def test_a_scan_carry_that_starts_from_a_parameter_is_state_not_a_weight():
    """A learned initial state h0: every step's h @ U is charged to U (regression: half went to
    h0, from the first step's view of the carry)."""
    def fn(p, xs):
        def body(h, x):
            h = jnp.tanh(h @ p["U"] + x)
            return h, h
        return jax.lax.scan(body, jnp.broadcast_to(p["h0"], (2, 4)), xs)[1]

    params = {"U": jnp.ones((4, 4)), "h0": jnp.zeros((4,))}
    count = count_flops(fn, params, jnp.ones((5, 2, 4)))
    assert count.per_path == {"U": 5 * 2 * 2 * 4 * 4}


def test_each_convolution_kernel_records_its_positions():
    """FlopCount.conv_positions: (input, output) positions of each convolution kernel, batch x
    spatial, summed over its calls (what a factorized convolution's factors run on)."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            shared = nn.Conv(4, (3, 3), padding="VALID", name="shared")
            y = shared(x)
            y = shared(nn.Conv(4, (1, 1), name="proj")(x[:, :6, :5]))
            return nn.Conv(2, (5, 5), strides=2, name="last")(y)

    x = jnp.ones((2, 9, 7, 4))
    params = Net().init(jax.random.key(0), x)["params"]
    count = count_flops(lambda p, x: Net().apply({"params": p}, x), params, x)
    assert count.conv_positions == {"shared/kernel": (2 * 9 * 7 + 2 * 6 * 5, 2 * 7 * 5 + 2 * 4 * 3),
                                    "proj/kernel": (2 * 6 * 5, 2 * 6 * 5),
                                    "last/kernel": (2 * 4 * 3, 2 * 2 * 2)}


def test_conv_positions_add_the_counted_branch_of_a_cond_to_the_other_calls():
    """Positions inside a cond are those of the branch whose FLOPs count, added to the calls
    outside it (not a per-component maximum, which no branch has)."""
    import jax.lax as lax

    def conv(x, w, stride, padding):
        return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(p, x, y, flag):
        out = conv(x, p["k"], 1, "VALID").sum()
        return out + lax.cond(flag, lambda: conv(y, p["k"], 2, "SAME").sum(),
                              lambda: conv(y, p["k"], 1, "VALID").sum())

    params = {"k": jnp.ones((5, 5, 2, 3))}
    count = count_flops(f, params, jnp.ones((1, 8, 8, 2)), jnp.ones((1, 12, 12, 2)), True)
    # Outside: 8x8 -> 4x4. Inside, the VALID branch (12x12 -> 8x8) costs more than the strided
    # SAME one (12x12 -> 6x6), so its positions are the ones added.
    assert count.conv_positions["k"] == (64 + 144, 16 + 64)
    assert count["k"] == 2 * 5 * 5 * 2 * 3 * (16 + 64)


def test_count_flops_needs_a_function():
    with pytest.raises(ValueError, match="count_flops: fn must be a function"):
        count_flops(None, {}, jnp.ones(2))
