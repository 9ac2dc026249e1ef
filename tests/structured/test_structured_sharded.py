"""Structured pruning of parameters sharded over 8 simulated devices."""


def test_scores_and_removal_keep_the_sharding_of_the_leaves(subprocess_runner):
    """Scores run under jit on sharded leaves; cut leaves keep their sharding when it divides,
    and every device holds only its shard."""
    out = subprocess_runner(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxcomp.structured import (channel_groups, magnitude_importance, remove_channels,
                                        select_channels)

        mesh = Mesh(jax.devices(), ("x",))
        rng = np.random.default_rng(0)
        params = {
            "a": jax.device_put(jnp.asarray(rng.normal(size=(6, 32)), jnp.float32),
                                NamedSharding(mesh, P(None, "x"))),
            "c": jax.device_put(jnp.asarray(rng.normal(size=(32, 3)), jnp.float32),
                                NamedSharding(mesh, P("x", None))),
        }
        f = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["c"]
        groups = channel_groups(f, params, jnp.ones((2, 6)))
        scores = jax.jit(lambda p: magnitude_importance(p, groups))(params)
        small = remove_channels(params, groups, select_channels(groups, scores, ratio=0.5))
        assert small["a"].shape == (6, 16) and small["c"].shape == (16, 3)
        assert small["a"].sharding.spec == P(None, "x"), small["a"].sharding
        assert small["c"].sharding.spec == P("x", None), small["c"].sharding
        assert {s.data.shape for s in small["a"].addressable_shards} == {(6, 2)}
        x = jnp.ones((4, 6))
        keep = np.asarray(select_channels(groups, scores, ratio=0.5)["a"])
        dense = jax.nn.relu(x @ params["a"][:, keep]) @ params["c"][keep]
        np.testing.assert_allclose(jax.jit(f)(small, x), dense, rtol=1e-5, atol=1e-5)
        odd = remove_channels(params, groups, {"a": np.arange(12)})
        assert odd["a"].shape == (6, 12)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
