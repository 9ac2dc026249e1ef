"""Shared tests for scalar arguments: Python numbers, NumPy scalars and 0-d arrays alike."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_int(value: Any) -> int | None:
    """`value` as a Python int if it is an integer (Python, NumPy, or a 0-d integer array; not a
    bool), else None.

    Example:
        >>> as_int(np.int64(3)), as_int(2.0), as_int(True)
        (3, None, None)
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if getattr(value, "shape", None) == () and jnp.issubdtype(getattr(value, "dtype", np.float32),
                                                               jnp.integer):
        try:
            return int(value)
        except TypeError:  # a tracer
            return None
    return None


def as_real(value: Any) -> float | None:
    """`value` as a Python float if it is a real number (Python, NumPy, or a 0-d real array;
    not a bool), else None.

    Example:
        >>> as_real(np.float32(0.5)), as_real("0.5"), as_real(1)
        (0.5, None, 1.0)
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) == () and dtype is not None and (
            jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        try:
            return float(value)
        except TypeError:  # a tracer
            return None
    return None


def check_key(key: object, path: str = "key") -> None:
    """Raises `ValueError` naming `path` unless `key` is a `jax.random` key (new-style typed, or
    old-style uint32 key data such as `jax.random.PRNGKey(0)`).

    Example:
        >>> check_key(jax.random.key(0))
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                              or (dtype == jnp.uint32 and getattr(key, "ndim", 0) >= 1)):
        return
    raise ValueError(f"{path}: key must be a jax.random key (jax.random.key(seed)), got "
                     f"{type(key).__name__} {key!r}")
