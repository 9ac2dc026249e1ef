"""Channel labels: what the jaxpr walk knows of every axis of every value.

Every axis of every parameter leaf gets one integer id per position ("channel id"). The walk
carries, for every jaxpr variable, one label array per axis: position `i` of an axis holds the
channel id it comes from, `FIXED` (an axis that cannot change size: the batch, the pixels of the
input, a constant) or `FREE` (a broadcast axis that takes any size). Ops *tie* ids (an `add`
ties its operands position by position; a matmul ties the contracted axes) and *pin* ids that
meet something that cannot shrink with them. Tied ids form one channel; a channel with a pinned
id is not prunable. Rules are conservative: an op the walk does not know pins what reaches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

FIXED = -1
FREE = -2

ROLE_OTHER, ROLE_IN, ROLE_OUT = 0, 1, 2


def fixed(n: int) -> np.ndarray:
    """The label of an axis that cannot change size (a size-1 axis broadcasts: FREE)."""
    return np.full(n, FIXED if n > 1 else FREE, np.int64)


def free(n: int) -> np.ndarray:
    """The label of a broadcast axis, which takes the size of whatever it meets."""
    return np.full(n, FREE, np.int64)


@dataclasses.dataclass
class Value:
    """What the walk knows of one jaxpr variable: a label array per axis, and data dependence."""

    labels: tuple[np.ndarray, ...]
    data: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(x) for x in self.labels)


@dataclasses.dataclass(frozen=True)
class Tap:
    """An activation axis entering a matmul or convolution with a weight (for activation scores)."""

    var: Any
    axis: int
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Pin:
    ids: np.ndarray
    reason: str
    warn: bool


class State:
    """Ties, pins, roles and taps collected by one walk over `num_ids` channel ids."""

    def __init__(self, num_ids: int, collect_taps: bool = False):
        self.num_ids = num_ids
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.pins: list[Pin] = []
        self.roles = np.zeros(num_ids, np.int8)
        self.taps: list[Tap] | None = [] if collect_taps else None

    def pin(self, label: np.ndarray, reason: str, warn: bool = False) -> None:
        ids = label[label >= 0]
        if ids.size:
            self.pins.append(Pin(np.unique(ids), reason, warn))

    def tie(self, labels: Sequence[np.ndarray], where: str) -> np.ndarray:
        """Ties equal-length label arrays position by position; returns the merged label."""
        if len(labels) == 1:
            return labels[0]
        stack = np.stack(labels)
        merged = stack.max(axis=0)  # an id if any, else FIXED if any, else FREE
        has_id = merged >= 0
        for row in stack:
            mask = (row >= 0) & (row != merged)
            if mask.any():
                self.edges.append((row[mask], merged[mask]))
        clash = has_id & (stack == FIXED).any(axis=0)
        if clash.any():
            self.pin(stack[:, clash].ravel(), f"meets an axis that cannot shrink in '{where}'")
        return merged

    def mark(self, label: np.ndarray, role: int) -> None:
        ids = label[label >= 0]
        self.roles[ids] = np.maximum(self.roles[ids], role)


def leaf_labels(shapes: Sequence[tuple[int, ...]]) -> tuple[list[tuple[np.ndarray, ...]], int]:
    """Fresh channel ids for every axis of every leaf (size-1 axes are FREE); and the id count."""
    out, base = [], 0
    for shape in shapes:
        labels = []
        for n in shape:
            if n > 1:
                labels.append(np.arange(base, base + n, dtype=np.int64))
                base += n
            else:
                labels.append(free(n))
        out.append(tuple(labels))
    return out, base
