"""Tensor decomposition: factorized Dense and Conv kernels, rank selection, apply functions.

Trained kernels become compressed leaves (`SVDKernel`, `TTKernel`, `Tucker2Kernel`, `CPKernel`)
that `jaxcomp.materialize` turns back into dense kernels and the apply functions run as
sequences of small matmuls and convolutions:

    >>> import jax.numpy as jnp
    >>> from jaxcomp import decompose
    >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 16, 16)), "bias": jnp.zeros(16)}}
    >>> out = decompose.decompose_tree(params, decompose.Energy(0.9))
    >>> out["Conv_0"]["kernel"].kind
    'Tucker2'
"""

from jaxcomp.decompose.apply import cp_conv, factorized_apply, svd_dense, tt_dense, tucker2_conv
from jaxcomp.decompose.budget import allocate_ranks
from jaxcomp.decompose.factorize import (
    decompose_cp,
    decompose_svd,
    decompose_tt,
    decompose_tucker2,
)
from jaxcomp.decompose.leaves import (
    CPKernel,
    ConvSpec,
    Factorized,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
)
from jaxcomp.decompose.ranks import (
    VBMF,
    Energy,
    FixedRank,
    FlopBudget,
    ParamBudget,
    ParamRatio,
    RankRatio,
    RankRule,
    energy_rank,
)
from jaxcomp.decompose.structure import balanced_modes
from jaxcomp.decompose.transform import decompose_tree, map_factors
from jaxcomp.decompose.vbmf import VBMFResult, vbmf, vbmf_rank, vbmf_spectrum

__all__ = [
    "CPKernel",
    "ConvSpec",
    "Energy",
    "Factorized",
    "FixedRank",
    "FlopBudget",
    "ParamBudget",
    "ParamRatio",
    "RankRatio",
    "RankRule",
    "SVDKernel",
    "TTKernel",
    "Tucker2Kernel",
    "VBMF",
    "VBMFResult",
    "allocate_ranks",
    "balanced_modes",
    "cp_conv",
    "decompose_cp",
    "decompose_svd",
    "decompose_tree",
    "decompose_tt",
    "decompose_tucker2",
    "energy_rank",
    "factorized_apply",
    "map_factors",
    "svd_dense",
    "tt_dense",
    "tucker2_conv",
    "vbmf",
    "vbmf_rank",
    "vbmf_spectrum",
]
