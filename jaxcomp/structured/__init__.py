"""Structured pruning that makes models smaller and faster: channels are removed for real.

The coupling between parameter axes is read from the model's jaxpr (`channel_groups`), so there
are no per-architecture rules: a Dense/Conv output axis shrinks with its bias, the BatchNorm that
follows, the next layer's input axis, the other side of a residual add, the heads of attention.
Score the channels (`magnitude_importance`, `bn_scale_importance`, `taylor_importance`,
`fpgm_importance`, `activation_importance`), choose what to keep (`select_channels`), and cut
(`remove_channels`). `jaxcomp.nn.structured` rebuilds Linen modules and shrinks NNX modules.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxcomp import structured
    >>> params = {"a": {"kernel": jnp.ones((4, 8))}, "b": {"kernel": jnp.ones((8, 2))}}
    >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
    >>> groups = structured.channel_groups(f, params, jnp.ones((1, 4)))
    >>> keep = structured.select_channels(
    ...     groups, structured.magnitude_importance(params, groups), ratio=0.5)
    >>> small = structured.remove_channels(params, groups, keep)
    >>> small["a"]["kernel"].shape, small["b"]["kernel"].shape
    ((4, 4), (4, 2))
"""

from jaxcomp.structured.activations import activation_importance
from jaxcomp.structured.groups import (
    ChannelGroup,
    ChannelGroups,
    GroupMember,
    UnfollowedOpWarning,
    channel_groups,
)
from jaxcomp.structured.importance import (
    bn_scale_importance,
    fpgm_importance,
    magnitude_importance,
    member_slices,
    taylor_importance,
)
from jaxcomp.structured.remove import keep_indices, remove_channels
from jaxcomp.structured.select import kept_count, select_channels

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "GroupMember",
    "UnfollowedOpWarning",
    "activation_importance",
    "bn_scale_importance",
    "channel_groups",
    "fpgm_importance",
    "keep_indices",
    "kept_count",
    "magnitude_importance",
    "member_slices",
    "remove_channels",
    "select_channels",
    "taylor_importance",
]
