"""Size report of a parameter tree: per leaf and in total, with compressed leaves counted as stored.

`jaxcomp.report(tree)` walks one tree of leaf types: plain arrays count their dtype's bytes,
compressed leaves count what they really store (`CompressedLeaf.nbytes`: packed integer values,
scales, tables, masks). The dense size is what the materialized float tree would take, so the
printed compression ratio is the real one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from jaxcomp.core import bit_width, is_compressed, stored_nbytes
from jaxcomp.tree import Where, leaves_with_paths, selected_paths

__all__ = ["Report", "ReportRow", "ReportTotals", "report"]


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One leaf of a `Report`.

    Attributes:
      path: the "/"-joined key path.
      kind: `"dense"` for a plain array, else the compressed leaf's `kind` (e.g. `"QArray"`).
      shape: shape of the dense array the leaf stands for.
      dtype: dtype of that dense array, as a string.
      params: number of elements of the dense array.
      nbytes: bytes the leaf stores.
      dense_nbytes: bytes of the dense array.
      detail: the compressed leaf's one-line `summary()` (empty for plain arrays).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    nbytes: int
    dense_nbytes: int
    detail: str = ""

    @property
    def bits_per_param(self) -> float:
        """Stored bits per dense element."""
        return 8.0 * self.nbytes / self.params if self.params else 0.0


@dataclasses.dataclass(frozen=True)
class ReportTotals:
    """Totals over every row of a `Report`."""

    params: int
    nbytes: int
    dense_nbytes: int

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over stored bytes (1.0 for an uncompressed tree)."""
        return self.dense_nbytes / self.nbytes if self.nbytes else 1.0

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.params if self.params else 0.0


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of `jaxcomp.report`: rows (one per leaf) and totals.

    `str(report)` is a readable table; `report.to_dict()` is JSON-serialisable.
    """

    rows: tuple[ReportRow, ...]

    @property
    def totals(self) -> ReportTotals:
        return ReportTotals(
            params=sum(r.params for r in self.rows),
            nbytes=sum(r.nbytes for r in self.rows),
            dense_nbytes=sum(r.dense_nbytes for r in self.rows),
        )

    def to_dict(self) -> dict[str, Any]:
        totals = self.totals
        return {
            "rows": [
                {**dataclasses.asdict(r), "shape": list(r.shape), "bits_per_param": r.bits_per_param}
                for r in self.rows
            ],
            "totals": {
                **dataclasses.asdict(totals),
                "compression_ratio": totals.compression_ratio,
                "bits_per_param": totals.bits_per_param,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        header = ("path", "kind", "shape", "dtype", "params", "bytes", "bits/param", "detail")
        lines = [
            (
                r.path,
                r.kind,
                "x".join(map(str, r.shape)) or "scalar",
                r.dtype,
                f"{r.params:,}",
                _human_bytes(r.nbytes),
                f"{r.bits_per_param:.2f}",
                r.detail,
            )
            for r in self.rows
        ]
        t = self.totals
        total = (
            "total",
            "",
            "",
            "",
            f"{t.params:,}",
            _human_bytes(t.nbytes),
            f"{t.bits_per_param:.2f}",
            f"{t.compression_ratio:.2f}x smaller than dense ({_human_bytes(t.dense_nbytes)})",
        )
        widths = [max(len(row[i]) for row in [header, total, *lines]) for i in range(len(header))]
        numeric = {4, 5, 6}

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, lines), rule, fmt(total)])


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _row(path: str, leaf: Any) -> ReportRow:
    if is_compressed(leaf):
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        return ReportRow(
            path=path,
            kind=leaf.kind,
            shape=shape,
            dtype=str(dtype),
            params=math.prod(shape),
            nbytes=leaf.nbytes,
            dense_nbytes=-(-math.prod(shape) * bit_width(dtype) // 8),
            detail=leaf.summary(),
        )
    shape = tuple(np.shape(leaf))
    dtype = np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
    nbytes = stored_nbytes(leaf)
    return ReportRow(
        path=path,
        kind="dense",
        shape=shape,
        dtype=str(dtype),
        params=math.prod(shape),
        nbytes=nbytes,
        dense_nbytes=nbytes,
    )


def report(tree: Any, *, where: Where = None) -> Report:
    """Size report of `tree`: one row per leaf (path, kind, shape, dtype, params, bytes) + totals.

    Works on concrete arrays and on abstract ones (`jax.ShapeDtypeStruct`, e.g. from
    `jax.eval_shape`), on Linen params, NNX `State` and nested containers. Call it outside `jit`.

    Args:
      tree: a tree of arrays and compressed leaves.
      where: restrict the report to the selected leaves (see `jaxcomp.tree.select`).

    Returns:
      A `Report`; `print(report)` shows a table, `report.totals` the sums.

    Example:
        >>> r = report({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})
        >>> r.totals.params, r.totals.nbytes
        (15, 60)
    """
    keep = None if where is None else set(selected_paths(tree, where))
    rows = tuple(
        _row(path, leaf)
        for path, leaf in leaves_with_paths(tree)
        if keep is None or path in keep
    )
    return Report(rows=rows)
