"""Quantization under a device mesh: 8 simulated CPU devices in a subprocess."""

CODE = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxcomp
from jaxcomp.nn.quant import fake_quant_inputs, serve_linen
from jaxcomp.quant import EMAObserver, QArray, QuantSpec, fake_quant_tree, quantize_tree
from jaxcomp.testing import models
from jaxcomp.testing.train import init_linen

assert len(jax.devices()) == 8
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
model = models.MLP(features=(32,))
params = init_linen(model, (4, 4, 1))["params"]
x = jax.random.uniform(jax.random.key(1), (16, 4, 4, 1))
y = jnp.arange(16) % 10
W_SPEC, A_SPEC = QuantSpec(bits=4, channel_axes=(-1,)), QuantSpec(bits=8)

def spec_for(path, leaf):
    return P(None, "model") if leaf.ndim == 2 else P("model")

shardings = jax.tree_util.tree_map_with_path(
    lambda kp, leaf: NamedSharding(mesh, spec_for(kp, leaf)), params)
sharded = jax.device_put(params, shardings)
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
tx = optax.adam(1e-3)

def loss(p, x, y):
    with fake_quant_inputs(A_SPEC):
        logits = model.apply({"params": fake_quant_tree(p, W_SPEC, where=r".*kernel")}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

@jax.jit
def step(p, s, x, y):
    value, g = jax.value_and_grad(loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

p1, _, l1 = step(sharded, tx.init(sharded), xs, y)
p0, _, l0 = step(params, tx.init(params), x, y)
np.testing.assert_allclose(l1, l0, rtol=1e-5)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p0)
for (path, leaf), sh in zip(jaxcomp.leaves_with_paths(p1), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (path, leaf.sharding, sh)

q = quantize_tree(sharded, QuantSpec(bits=8, channel_axes=(-1,)), where=r".*kernel")
q0 = quantize_tree(params, QuantSpec(bits=8, channel_axes=(-1,)), where=r".*kernel")
for path, leaf in jaxcomp.leaves_with_paths(q):
    if isinstance(leaf, QArray):
        want = NamedSharding(mesh, P(None, "model"))
        assert leaf.values.sharding.is_equivalent_to(want, 2), (path, leaf.values.sharding)
        assert leaf.scale.sharding.is_equivalent_to(want, 2), (path, leaf.scale.sharding)
serve = jax.jit(serve_linen(model, strategy="int8"))
out = serve({"params": q}, xs)
ref = serve({"params": q0}, x)
np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

obs, spec = EMAObserver(), QuantSpec(channel_axes=(-1,))
h = jax.device_put(jax.random.normal(jax.random.key(2), (16, 32)), NamedSharding(mesh, P("data", "model")))
state = jax.jit(lambda s, h: obs.update(s, h, spec))(obs.init(h.shape, spec), h)
assert state.hi.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2), state.hi.sharding
print("OK")
"""


def test_qat_step_and_integer_serving_keep_shardings_and_match_one_device(subprocess_runner):
    """With params sharded over a 4x2 mesh, a jitted QAT step and the integer forward pass give
    the single-device results; updated params, QArray codes and scales, and observer state keep
    the sharding of their parameter (output channels on the "model" axis)."""
    assert subprocess_runner(CODE).strip().endswith("OK")
