"""jaxcomp: compress JAX/Flax models with pure function transforms over parameter pytrees.

The whole surface rests on one idea: every technique produces *compressed leaves* (pytree
classes with a `materialize()`), so any model consumes a compressed tree through
`model.apply(jaxcomp.materialize(tree), x)` and one report walks every technique.

Example:
    >>> import jax.numpy as jnp, jaxcomp
    >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> jaxcomp.materialize(params)["Dense_0"]["kernel"].shape
    (4, 3)
    >>> jaxcomp.select(params, r".*kernel")
    {'Dense_0': {'bias': False, 'kernel': True}}

The techniques live in subpackages, imported on first use (`jaxcomp.quant` pulls in nothing
until touched): `jaxcomp.quant` (fake quantization, QAT, PTQ, integer serving, codebooks),
`jaxcomp.sparsity` (masks, scores, schedules, the optax pruning wrapper, sparse training),
`jaxcomp.structured` (channel removal that shrinks the model), `jaxcomp.decompose` (SVD, TT,
Tucker-2 and CP factorized leaves), `jaxcomp.distill` (distillation losses), and
`jaxcomp.nn` (their Flax Linen and NNX integration).
"""

import importlib

from jaxcomp import distill
from jaxcomp.core import (
    CompressedLeaf,
    bit_width,
    checkpointable,
    compressed_leaf,
    from_checkpointable,
    is_compressed,
    materialize,
    static_field,
    stored_nbytes,
)
from jaxcomp.flops import FlopCount, count_flops
from jaxcomp.report import Report, ReportRow, ReportTotals, report
from jaxcomp.tree import (
    Where,
    assert_same_structure,
    key_path_str,
    leaves_with_paths,
    map_selected,
    path_dict,
    select,
    selected_paths,
    tree_paths,
)

__version__ = "0.1.0"

_SUBPACKAGES = ("decompose", "nn", "quant", "sparsity", "structured", "testing")


def __getattr__(name: str):
    # Subpackages load on first attribute access, so `import jaxcomp` stays light.
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jaxcomp.{name}")
    raise AttributeError(f"module 'jaxcomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))

__all__ = [
    "CompressedLeaf",
    "FlopCount",
    "Report",
    "ReportRow",
    "ReportTotals",
    "Where",
    "assert_same_structure",
    "bit_width",
    "checkpointable",
    "compressed_leaf",
    "from_checkpointable",
    "distill",
    "count_flops",
    "decompose",
    "is_compressed",
    "key_path_str",
    "leaves_with_paths",
    "map_selected",
    "materialize",
    "nn",
    "path_dict",
    "quant",
    "report",
    "select",
    "selected_paths",
    "sparsity",
    "static_field",
    "stored_nbytes",
    "structured",
    "tree_paths",
]
