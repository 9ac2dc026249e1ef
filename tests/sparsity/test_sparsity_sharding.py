"""Pruning params sharded over a mesh of 8 simulated devices (in a subprocess)."""

CODE = r"""
import re
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxcomp.sparsity as sp

assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("x",))
shardings = {"a": {"kernel": NamedSharding(mesh, P(None, "x")), "bias": NamedSharding(mesh, P())},
             "b": {"kernel": NamedSharding(mesh, P("x", None))}}
keys = jax.random.split(jax.random.key(0), 2)
params = {"a": {"kernel": jax.random.normal(keys[0], (24, 64)), "bias": jnp.zeros(64)},
          "b": {"kernel": jax.random.normal(keys[1], (64, 16))}}
params = jax.device_put(params, shardings)
x = jax.random.normal(jax.random.key(1), (8, 24))

def loss(params):
    h = jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"])
    return jnp.mean((h @ params["b"]["kernel"]) ** 2)

pruner = sp.Pruner(sparsity=sp.one_shot_sparsity(0.75, step=1),
                   distribution=sp.GlobalThreshold())
tx = sp.prune(optax.adam(1e-2), pruner)
state = tx.init(params)

@jax.jit
def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

for _ in range(3):
    params, state = step(params, state)

pruned = 0
for name in ("a", "b"):
    mask, kernel = state.masks[name]["kernel"], params[name]["kernel"]
    assert mask.sharding.is_equivalent_to(kernel.sharding, 2), (name, mask.sharding)
    assert np.all(np.asarray(kernel)[~np.asarray(mask)] == 0)
    pruned += int((~np.asarray(mask)).sum())
    print(name, "ok", mask.sharding.spec)
assert pruned == round(0.75 * (24 * 64 + 64 * 16)), pruned

# No collective moves a whole parameter: only scalars and small samples cross devices.
hlo = step.lower(params, state).compile().as_text()
sizes = [int(np.prod([int(d) for d in shape.split(",") if d] or [1]))
         for shape in re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-(?:gather|to-all)\(", hlo)]
assert all(size < 24 * 64 for size in sizes), sizes
"""


def test_pruned_train_step_on_sharded_params(subprocess_runner):
    """Uniform and global-threshold masks keep the params' sharding, exact sparsity, no gather."""
    out = subprocess_runner(CODE)
    assert "a ok" in out and "b ok" in out
