"""Sparsity and pruning: masks, scores, granularities, distributions, schedules, the optax
wrapper, dynamic sparse training and straight-through pruning.

The one call site is the optimizer:

    >>> import optax, jaxcomp.sparsity as sp
    >>> pruner = sp.Pruner(
    ...     sparsity=sp.polynomial_sparsity(0.9, begin_step=0, end_step=3000, frequency=100),
    ...     rules=[sp.Rule(where="Dense_2/kernel", sparsity=0.5)],
    ... )
    >>> tx = sp.prune(optax.adam(1e-3), pruner)

`tx.update(grads, state, params)` returns updates that leave pruned weights at exactly zero
after `optax.apply_updates`; `sp.masks_of(state)` gives the masks and `sp.to_masked` the
compressed form for `jaxcomp.report` and export.
"""

from jaxcomp.sparsity.distribution import (
    ERK,
    Distribution,
    GlobalThreshold,
    PerPath,
    Uniform,
    erk_sparsities,
    global_threshold_masks,
)
from jaxcomp.sparsity.dynamic import SET, RigL, drop_and_grow
from jaxcomp.sparsity.granularity import (
    NM,
    Block,
    Channel,
    Granularity,
    Unstructured,
    block_mask,
    channel_mask,
    nm_mask,
    unstructured_mask,
)
from jaxcomp.sparsity.masks import (
    Masked,
    Sparsity,
    apply_masks,
    mask_leaves,
    ones_masks,
    sparsity_of,
    to_masked,
)
from jaxcomp.sparsity.pruner import Pruner, Rule, compute_masks, prune_now
from jaxcomp.sparsity.schedules import (
    constant_sparsity,
    iterative_sparsity,
    one_shot_sparsity,
    polynomial_sparsity,
)
from jaxcomp.sparsity.scores import (
    Magnitude,
    Movement,
    Random,
    Saliency,
    Score,
    ScoreFn,
    Taylor,
    magnitude_scores,
    random_scores,
    saliency_scores,
)
from jaxcomp.sparsity.ste import pruned_forward, straight_through_mask
from jaxcomp.sparsity.wrapper import PruneState, masks_of, prune

__all__ = [
    "Block",
    "Channel",
    "Distribution",
    "ERK",
    "GlobalThreshold",
    "Granularity",
    "Magnitude",
    "Masked",
    "Movement",
    "NM",
    "PerPath",
    "PruneState",
    "Pruner",
    "Random",
    "RigL",
    "Rule",
    "SET",
    "Saliency",
    "Score",
    "ScoreFn",
    "Sparsity",
    "Taylor",
    "Uniform",
    "Unstructured",
    "apply_masks",
    "block_mask",
    "channel_mask",
    "compute_masks",
    "constant_sparsity",
    "drop_and_grow",
    "erk_sparsities",
    "global_threshold_masks",
    "iterative_sparsity",
    "magnitude_scores",
    "mask_leaves",
    "masks_of",
    "nm_mask",
    "one_shot_sparsity",
    "ones_masks",
    "polynomial_sparsity",
    "prune",
    "prune_now",
    "pruned_forward",
    "random_scores",
    "saliency_scores",
    "sparsity_of",
    "straight_through_mask",
    "to_masked",
    "unstructured_mask",
]
