"""Every docstring example in the listed modules runs and prints what it shows."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp

MODULES = [
    "jaxcomp",
    "jaxcomp.core",
    "jaxcomp.tree",
    "jaxcomp.report",
    "jaxcomp.flops",
    "jaxcomp.distill",
    "jaxcomp.testing.benchmark",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "jax": jax, "jnp": jnp, "np": np, "jaxcomp": jaxcomp}
    result = doctest.testmod(
        module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
