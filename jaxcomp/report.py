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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_real
from jaxcomp.core import bit_width, is_compressed, leaf_dtype, stored_nbytes
from jaxcomp.flops import ACTIVATIONS, FlopCount
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
      sparsity: fraction of exact zeros in the dense array (None for abstract arrays).
      flops: FLOPs charged to this leaf by `jaxcomp.count_flops` (None when not given).
      stored_params: the weights the leaf stores: the factors' elements of a factorized leaf,
        the kept values of a `Masked` one, else `params` (scales and tables are not weights).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    nbytes: int
    dense_nbytes: int
    detail: str = ""
    sparsity: float | None = None
    flops: int | None = None
    stored_params: int | None = None

    def __post_init__(self):
        if self.stored_params is None:
            object.__setattr__(self, "stored_params", self.params)

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
    zeros: int | None = None
    flops: int | None = None
    stored_params: int | None = None

    def __post_init__(self):
        if self.stored_params is None:
            object.__setattr__(self, "stored_params", self.params)

    @property
    def sparsity(self) -> float | None:
        """Fraction of exact zeros over all dense elements (None if any leaf is abstract)."""
        return None if self.zeros is None or not self.params else self.zeros / self.params

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

    flops_total: int | None = None

    @property
    def totals(self) -> ReportTotals:
        known = all(r.sparsity is not None for r in self.rows)
        return ReportTotals(
            params=sum(r.params for r in self.rows),
            nbytes=sum(r.nbytes for r in self.rows),
            dense_nbytes=sum(r.dense_nbytes for r in self.rows),
            zeros=sum(round(r.sparsity * r.params) for r in self.rows) if known else None,
            flops=self.flops_total,
            stored_params=sum(r.stored_params for r in self.rows),
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
                "sparsity": totals.sparsity,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        show_flops = self.flops_total is not None
        # A "stored" column (weights stored) when some leaf stores fewer than its dense count.
        show_stored = any(r.stored_params != r.params for r in self.rows)

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        def numbers(params, stored, nbytes, bits, sparsity, flops):
            cells = [f"{params:,}"] + ([f"{stored:,}"] if show_stored else [])
            cells += [_human_bytes(nbytes), f"{bits:.2f}", pct(sparsity)]
            return cells + ([f"{flops:,}" if flops else "-"] if show_flops else [])

        header = ["path", "kind", "shape", "dtype", "params", *(["stored"] if show_stored else []),
                  "bytes", "bits/param", "zeros", *(["FLOPs"] if show_flops else []), "detail"]
        lines = []
        for r in self.rows:
            line = [r.path, r.kind, "x".join(map(str, r.shape)) or "scalar", r.dtype]
            line += numbers(r.params, r.stored_params, r.nbytes, r.bits_per_param, r.sparsity,
                            r.flops)
            lines.append((*line, r.detail))
        t = self.totals
        total = ["total", "", "", ""]
        total += numbers(t.params, t.stored_params, t.nbytes, t.bits_per_param, t.sparsity,
                         t.flops)
        total.append(
            f"{t.compression_ratio:.2f}x smaller than dense ({_human_bytes(t.dense_nbytes)})"
            if t.compression_ratio >= 1 else
            f"{t.nbytes / max(t.dense_nbytes, 1):.2f}x larger than dense "
            f"({_human_bytes(t.dense_nbytes)})"
        )
        rows = [tuple(header), tuple(total), *lines]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        numeric = set(range(4, len(header) - 1))

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(tuple(header)))
        return "\n".join([fmt(tuple(header)), rule, *map(fmt, lines), rule, fmt(tuple(total))])


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _zeros_fraction(leaf: Any) -> float | None:
    try:
        dense = leaf.materialize() if is_compressed(leaf) else leaf
        if not isinstance(dense, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            return None  # abstract (ShapeDtypeStruct): no values to count
        if isinstance(dense, jax.Array) and jnp.issubdtype(dense.dtype, jax.dtypes.prng_key):
            return 0.0  # a PRNG key holds no weights: nothing pruned
        array = np.asarray(jax.device_get(dense))
    except (TypeError, AttributeError, jax.errors.TracerArrayConversionError):
        return None  # abstract or traced children
    return float((array == 0).mean()) if array.size else 0.0


def _stored_params(leaf: Any) -> int:
    stored = getattr(leaf, "num_params", None)
    return int(stored) if isinstance(stored, (int, np.integer)) else math.prod(leaf.shape)


def _row(path: str, leaf: Any, flops: int | None) -> ReportRow:
    sparsity = _zeros_fraction(leaf)
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
            sparsity=sparsity,
            flops=flops,
            stored_params=_stored_params(leaf),
        )
    shape = tuple(np.shape(leaf))
    dtype = leaf_dtype(leaf)
    nbytes = stored_nbytes(leaf)
    return ReportRow(
        path=path,
        kind="dense",
        shape=shape,
        dtype=str(dtype),
        params=math.prod(shape),
        nbytes=nbytes,
        dense_nbytes=nbytes,
        sparsity=sparsity,
        flops=flops,
    )


def _align_flops(per_path: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """`per_path` keyed like the tree's leaves.

    FLOPs counted over a Linen variables dict are keyed `params/Conv_0/kernel`; a report of
    `variables["params"]` has `Conv_0/kernel`: the shared first component is dropped. FLOPs that
    match no leaf at all are a `ValueError` (a silent column of dashes would read as zero).
    """
    # ACTIVATIONS (activation x activation products) never names a leaf.
    weights = {k: v for k, v in per_path.items() if k != ACTIVATIONS}
    counted = {k: v for k, v in weights.items() if as_real(v)}
    if not counted or any(k in paths for k in counted):
        return per_path
    heads = {k.split("/", 1)[0] for k in weights}
    if len(heads) == 1 and all("/" in k for k in weights):
        stripped = {k.split("/", 1)[1]: v for k, v in weights.items()}
        if any(k in paths for k in stripped):
            return {**stripped, **{k: v for k, v in per_path.items() if k == ACTIVATIONS}}
    raise ValueError(
        f"report: the FLOPs are counted at paths such as {sorted(counted)[:2]}, none of which is "
        f"a leaf of the tree (its paths are such as {sorted(paths)[:2]}); count the FLOPs over "
        f"the tree you report")


def report(
    tree: Any, *, where: Where = None, flops: FlopCount | Mapping[str, int] | None = None
) -> Report:
    """Size report of `tree`: one row per leaf (path, kind, shape, dtype, params, bytes, zeros)
    and totals.

    Works on concrete arrays and on abstract ones (`jax.ShapeDtypeStruct`, e.g. from
    `jax.eval_shape`; their sparsity is unknown), on Linen params, NNX `State` and nested
    containers. Call it outside `jit`.

    Args:
      tree: a tree of arrays and compressed leaves.
      where: restrict the report to the selected leaves (see `jaxcomp.tree.select`).
      flops: per-path FLOPs to show, usually `jaxcomp.count_flops(apply_fn, tree, x)`; the total
        includes FLOPs of unselected leaves and of activation products. FLOPs counted over a
        Linen variables dict (`params/...` paths) fit a report of its `params`.

    Returns:
      A `Report`; `print(report)` shows a table, `report.totals` the sums.

    Raises:
      ValueError: for `flops` that is not a FLOP count, or whose paths match no leaf of `tree`.

    Example:
        >>> r = report({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})
        >>> r.totals.params, r.totals.nbytes, r.totals.sparsity
        (15, 60, 1.0)
    """
    keep = None if where is None else set(selected_paths(tree, where))
    per_path = getattr(flops, "per_path", flops) or {}
    if not isinstance(per_path, Mapping) or not all(
            as_real(v) is not None and 0 <= as_real(v) < math.inf for v in per_path.values()):
        raise ValueError("report: flops must be a jaxcomp.FlopCount or a mapping from path to a "
                         f"non-negative number, got {flops!r}")
    per_path = dict(per_path)
    pairs = leaves_with_paths(tree)
    per_path = _align_flops(per_path, {path for path, _ in pairs})
    rows = tuple(
        _row(path, leaf, per_path.get(path) if flops is not None else None)
        for path, leaf in pairs
        if keep is None or path in keep
    )
    total = None
    if flops is not None:
        total = flops.total if isinstance(flops, FlopCount) else sum(per_path.values())
    return Report(rows=rows, flops_total=total)
