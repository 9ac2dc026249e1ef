"""Which channels to keep: per-group or global ratios, minimum counts, rounding to a multiple."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxcomp._checks import as_int, as_real
from jaxcomp.structured.groups import ChannelGroup, check_groups

__all__ = ["kept_count", "select_channels"]


def _check_ratio(value: Any, what: str) -> float:
    number = as_real(value)  # Python, NumPy or 0-d array numbers
    if number is None:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    value = number
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return value


def _check_count(value: Any, what: str) -> int:
    """`value` as a Python int >= 1 (NumPy integers accepted), or a ValueError naming it."""
    if (as_int(value) or 0) < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return as_int(value)


def kept_count(size: int, ratio: float, *, min_channels: int = 1, round_to: int = 1) -> int:
    """Channels kept when removing `ratio` of `size`: rounded up to a multiple, at least a minimum.

    Args:
      size: channels in the group (an integer >= 1).
      ratio: fraction removed, in [0, 1).
      min_channels: the fewest kept (>= 1, capped at `size`).
      round_to: the kept count is rounded up to a multiple of this (>= 1, capped at `size`).

    Returns:
      The number of channels kept.

    Raises:
      ValueError: if `size`, `min_channels` or `round_to` is not an integer >= 1, or `ratio` is
        not a number in [0, 1).

    Example:
        >>> kept_count(120, 0.5), kept_count(84, 0.5, round_to=8)
        (60, 48)
        >>> kept_count(6, 0.9, min_channels=2)
        2
    """
    size = _check_count(size, "kept_count: size")
    ratio = _check_ratio(ratio, "kept_count: ratio")
    min_channels = _check_count(min_channels, "kept_count: min_channels")
    round_to = _check_count(round_to, "kept_count: round_to")
    keep = size - math.floor(ratio * size + 1e-9)
    # The minimum counts before rounding, so the result stays a multiple of round_to (unless
    # capped at size).
    keep = max(keep, min_channels)
    return min(size, -(-keep // round_to) * round_to)


def _ratios(groups: Sequence[ChannelGroup], ratio: Any) -> dict[str, float]:
    if not isinstance(ratio, Mapping):
        value = _check_ratio(ratio, "ratio")
        return {g.name: value for g in groups}
    out: dict[str, float] = {}
    for pattern, value in ratio.items():
        value = _check_ratio(value, f"ratio[{pattern!r}]")
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"ratio key {pattern!r} is not a regular expression: {e}") from e
        hits = [g.name for g in groups if regex.fullmatch(g.name)]
        if not hits:
            raise ValueError(
                f"ratio key {pattern!r} matches no group; groups: {[g.name for g in groups]}"
            )
        for name in hits:
            out.setdefault(name, value)
    return out


def _host_scores(
    groups: Sequence[ChannelGroup], scores: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    if not isinstance(scores, Mapping):
        raise ValueError(
            "select_channels: scores must map group names to scores (from an importance "
            f"function), got {type(scores).__name__}"
        )
    names = {g.name: g for g in groups}
    unknown = [k for k in scores if k not in names]
    if unknown:
        raise ValueError(f"scores name unknown groups {unknown}; groups: {list(names)}")
    out = {}
    for name, value in jax.device_get(dict(scores)).items():
        if np.iscomplexobj(value):
            raise ValueError(f"scores[{name!r}] must be real, got {np.asarray(value).dtype}")
        arr = np.asarray(value, np.float64)
        if arr.shape != (names[name].size,):
            raise ValueError(
                f"scores[{name!r}] has shape {arr.shape}; the group has {names[name].size} channels"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"scores[{name!r}] has non-finite values: {arr.tolist()}")
        out[name] = arr
    if not out:
        raise ValueError("select_channels: no scores; every group would be kept whole")
    return out


def select_channels(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, Any],
    *,
    ratio: float | Mapping[str, float],
    scope: str = "group",
    min_channels: int = 1,
    round_to: int = 1,
    normalize: bool = True,
) -> dict[str, np.ndarray]:
    """Chooses the channels to keep in every scored group.

    With `scope="group"` each group loses `ratio` of its channels, the lowest-scoring ones.
    With `scope="global"` the lowest-scoring `ratio` of all scored channels go, wherever they
    are (scores are first divided by their group's mean when `normalize`, so layers of different
    scales compare). Either way a group keeps at least `min_channels` and its kept count is
    rounded *up* to a multiple of `round_to` (hardware-friendly widths, e.g. 8).

    Args:
      groups: the channel groups (a `ChannelGroups`).
      scores: `{group name: scores}` from an importance function; groups without scores are
        kept whole.
      ratio: the fraction of channels to remove, in [0, 1); or, with `scope="group"`, a mapping
        from regexes over group names to ratios (first match wins; unmatched groups keep all).
      scope: `"group"` or `"global"`.
      min_channels: the fewest channels a group keeps (>= 1).
      round_to: kept counts are rounded up to a multiple of this (>= 1).
      normalize: in global scope, divide each group's scores by their mean first.

    Returns:
      ``{group name: bool mask of kept channels}`` (numpy), for `remove_channels`.

    Raises:
      ValueError: on a ratio outside [0, 1), a ratio key that matches no group, an unknown
        scope, `min_channels` or `round_to` below 1, scores of the wrong shape, non-finite
        scores, or scores for unknown groups.

    Example:
        >>> from jaxcomp.structured.groups import ChannelGroup
        >>> g = ChannelGroup("g", 4, ())
        >>> select_channels([g], {"g": jnp.array([3.0, 1.0, 2.0, 0.5])}, ratio=0.5)["g"].tolist()
        [True, False, True, False]
    """
    groups = check_groups("select_channels", groups)
    if scope not in ("group", "global"):
        raise ValueError(f"scope must be 'group' or 'global', got {scope!r}")
    min_channels = _check_count(min_channels, "min_channels")
    round_to = _check_count(round_to, "round_to")
    if scope == "global" and isinstance(ratio, Mapping):
        raise ValueError("scope='global' takes one ratio, not a mapping of ratios")
    host = _host_scores(groups, scores)
    by_name = {g.name: g for g in groups if g.name in host}
    if scope == "group":
        ratios = _ratios(list(by_name.values()), ratio)
        counts = {
            name: kept_count(g.size, ratios.get(name, 0.0), min_channels=min_channels,
                             round_to=round_to)
            for name, g in by_name.items()
        }
    else:
        counts = _global_counts(by_name, host, _check_ratio(ratio, "ratio"), min_channels,
                                normalize)
        counts = {
            name: min(by_name[name].size, -(-n // round_to) * round_to)
            for name, n in counts.items()
        }
    keep = {}
    for name, n in counts.items():
        order = np.argsort(-host[name], kind="stable")
        mask = np.zeros(by_name[name].size, bool)
        mask[order[:n]] = True
        keep[name] = mask
    return keep


def _global_counts(
    by_name: Mapping[str, ChannelGroup], host: Mapping[str, np.ndarray], ratio: float,
    min_channels: int, normalize: bool,
) -> dict[str, int]:
    names, values = [], []
    for name, arr in host.items():
        if normalize:
            mean = float(np.mean(np.abs(arr)))
            arr = arr / mean if mean > 0 else arr
        names.extend([name] * len(arr))
        values.append(arr)
    flat = np.concatenate(values)
    total = len(flat)
    to_remove = math.floor(ratio * total + 1e-9)
    counts = {name: g.size for name, g in by_name.items()}
    floor = {name: min(min_channels, g.size) for name, g in by_name.items()}
    for i in np.argsort(flat, kind="stable"):
        if to_remove == 0:
            break
        name = names[i]
        if counts[name] > floor[name]:
            counts[name] -= 1
            to_remove -= 1
    return counts
