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
"""

from jaxcomp import distill
from jaxcomp.core import (
    CompressedLeaf,
    bit_width,
    compressed_leaf,
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

__all__ = [
    "CompressedLeaf",
    "FlopCount",
    "Report",
    "ReportRow",
    "ReportTotals",
    "Where",
    "assert_same_structure",
    "bit_width",
    "compressed_leaf",
    "distill",
    "count_flops",
    "is_compressed",
    "key_path_str",
    "leaves_with_paths",
    "map_selected",
    "materialize",
    "path_dict",
    "report",
    "select",
    "selected_paths",
    "static_field",
    "stored_nbytes",
    "tree_paths",
]
