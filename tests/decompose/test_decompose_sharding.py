"""Sharded kernels (8 simulated devices) and a tensorly backend chosen by environment variable."""


def test_factors_keep_the_kernel_sharding_and_run_sharded(subprocess_runner):
    """On an 8-device mesh, factor axes that are kernel axes keep that axis's sharding (rank axes
    are replicated), the jitted factorized layers match the materialized ones, and importing
    tensorly with TENSORLY_BACKEND=jax inside a decomposition leaves jax_enable_x64 off."""
    out = subprocess_runner(
        """
        import os
        os.environ["TENSORLY_BACKEND"] = "jax"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxcomp.decompose import decompose_tree, tucker2_conv, svd_dense

        assert not jax.config.jax_enable_x64
        mesh = Mesh(np.array(jax.devices()).reshape(8), ("model",))
        rng = np.random.default_rng(0)
        dense = jax.device_put(rng.normal(size=(16, 32)).astype(np.float32), NamedSharding(mesh, P(None, "model")))
        conv = jax.device_put(rng.normal(size=(3, 3, 16, 32)).astype(np.float32),
                              NamedSharding(mesh, P(None, None, None, "model")))
        tree = decompose_tree({"dense": {"kernel": dense}, "conv": {"kernel": conv}}, 4)

        import tensorly as tl
        assert tl.get_backend() == "jax", tl.get_backend()
        assert not jax.config.jax_enable_x64

        svd, tucker = tree["dense"]["kernel"], tree["conv"]["kernel"]
        assert svd.v.sharding.spec == P(None, "model"), svd.v.sharding
        assert svd.u.sharding.spec == P(None, None) and svd.u.sharding.mesh == mesh
        assert tucker.u_out.sharding.spec == P(None, "model"), tucker.u_out.sharding
        assert tucker.core.sharding.spec == P(None, None, None, None)

        x = jax.device_put(rng.normal(size=(8, 6, 6, 16)).astype(np.float32), NamedSharding(mesh, P("model")))
        y = jax.jit(tucker2_conv)(x, tucker)
        ref = jax.lax.conv_general_dilated(x, tucker.materialize(), (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-4)
        xd = jax.device_put(rng.normal(size=(8, 16)).astype(np.float32), NamedSharding(mesh, P("model")))
        np.testing.assert_allclose(np.asarray(jax.jit(svd_dense)(xd, svd)), np.asarray(xd @ svd.materialize()), atol=1e-4)

        # Explicit sharding (jax.make_mesh's default): the TT layer's reshapes keep the batch's.
        from jax.sharding import AxisType
        from jaxcomp.decompose import tt_dense
        explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
        tt = decompose_tree({"d": {"kernel": np.asarray(dense)}}, 2, method="tt")["d"]["kernel"]
        xe = jax.device_put(np.asarray(xd), NamedSharding(explicit, P("data")))
        with jax.set_mesh(explicit):
            ye = jax.jit(tt_dense)(xe, tt)
        assert ye.sharding.spec[0] == "data", ye.sharding
        np.testing.assert_allclose(np.asarray(ye), np.asarray(xd) @ np.asarray(tt.materialize()), atol=1e-4)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
