"""Every docstring example in jaxcomp runs and prints what it shows.

An example sees its own module's names and those of its technique's package (`jaxcomp.quant`
for `jaxcomp.quant.conv`, ...), plus `jax`, `jnp`, `np`, `optax`, Flax's `nn` and `nnx`.
"""

import doctest
import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp

TOP = [
    "jaxcomp",
    "jaxcomp.core",
    "jaxcomp.tree",
    "jaxcomp.report",
    "jaxcomp.flops",
    "jaxcomp.distill",
    "jaxcomp.testing.benchmark",
]
PACKAGES = ["jaxcomp.quant", "jaxcomp.sparsity", "jaxcomp.structured", "jaxcomp.decompose",
            "jaxcomp.nn"]


def _modules() -> list[str]:
    names = list(TOP)
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [info.name for info in pkgutil.walk_packages(path, package + ".")]
    return names


def _globals(name: str) -> dict:
    globs = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "nn": nn, "nnx": nnx,
             "jaxcomp": jaxcomp}
    parts = name.split(".")
    for depth in range(2, len(parts)):  # the enclosing technique packages, outermost first
        globs.update(vars(importlib.import_module(".".join(parts[:depth]))))
    globs.update(vars(importlib.import_module(name)))
    return globs


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs=_globals(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
