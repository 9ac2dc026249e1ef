"""Host-side plumbing of the decompositions: tensorly on numpy, and placing factors back.

Decompositions run once, outside `jit`, in float64 numpy with tensorly's numpy backend. Loading
tensorly's JAX backend switches `jax_enable_x64` on for the whole process and `set_backend`
changes the process default, so jaxcomp never selects a backend globally: `tensorly_numpy()`
selects numpy for the current thread only and restores both the thread's backend and the x64
flag on exit, whatever they were.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@contextlib.contextmanager
def tensorly_numpy() -> Iterator[Any]:
    """Yields the `tensorly` module with the numpy backend selected for this thread.

    Restores the thread's tensorly backend and `jax_enable_x64` on exit (importing tensorly with
    `TENSORLY_BACKEND=jax` set would otherwise leave x64 on). Import tensorly's submodules inside
    this context only.
    """
    x64 = bool(jax.config.jax_enable_x64)
    try:
        import tensorly as tl

        with tl.backend_context("numpy", local_threadsafe=True), warnings.catch_warnings():
            # tensorly warns when an SVD initialisation asks for more vectors than a mode has
            # (it then completes the factor at random, seeded); that is expected for CP ranks.
            warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
            yield tl
    finally:
        if bool(jax.config.jax_enable_x64) != x64:
            jax.config.update("jax_enable_x64", x64)


def to_host(kernel: Any, name: str) -> np.ndarray:
    """The kernel as a float64 numpy array; non-arrays, abstract, non-float, empty or non-finite
    kernels raise `ValueError`."""
    if isinstance(kernel, jax.ShapeDtypeStruct):
        raise ValueError(f"{name}: cannot decompose an abstract array (ShapeDtypeStruct)")
    if not (hasattr(kernel, "shape") and hasattr(kernel, "dtype")):
        raise ValueError(f"{name}: kernel must be an array, got {type(kernel).__name__}")
    if not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
        raise ValueError(f"{name}: kernel must be floating point, got {jnp.result_type(kernel)}")
    if 0 in np.shape(kernel):
        raise ValueError(f"{name}: cannot decompose an empty kernel of shape {np.shape(kernel)}")
    host = np.asarray(jax.device_get(kernel), dtype=np.float64)
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{name}: kernel holds NaN or infinite values")
    return host


def place_like(factor: np.ndarray, like: Any, axes: Sequence[int | None]) -> jax.Array:
    """Puts a host factor on the devices of `like`, in `like`'s dtype.

    Factor axis `j` takes the mesh axes of `like`'s axis `axes[j]` (None: replicated), so a kernel
    sharded over its output channels gives a last factor sharded the same way and replicated
    rank axes. Kernels that are not `NamedSharding`-sharded give factors on their device.
    """
    dtype = jnp.result_type(like)
    value = np.asarray(factor).astype(dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
        new_spec = PartitionSpec(*(None if a is None else spec[a] for a in axes))
        return jax.device_put(value, NamedSharding(sharding.mesh, new_spec))
    if sharding is not None and len(sharding.device_set) == 1:
        device = next(iter(sharding.device_set))
        # On the default device, stay uncommitted like the outputs of `jit` (a committed factor
        # beside uncommitted params would make the first training step compile twice).
        if device == jax.devices()[0]:
            return jnp.asarray(value)
        return jax.device_put(value, device)
    if sharding is not None and sharding.is_fully_replicated:
        return jax.device_put(value, sharding)
    return jnp.asarray(value)
