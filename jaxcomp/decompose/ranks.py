"""Rank selection: how many components each factorization keeps.

A rank rule is a frozen dataclass, validated at construction:

* `FixedRank(r)`: the given rank(s), clipped to valid values with a warning (or, with
  `clip=False`, a `ValueError` naming the path).
* `RankRatio(0.5)`: a fraction of each mode's full rank.
* `ParamRatio(0.25)`: the largest ranks (scaled together) that keep at most this fraction of the
  layer's parameters.
* `Energy(0.9)`: the smallest rank whose singular values keep this fraction of the squared
  Frobenius norm (explained variance), per unfolding.
* `VBMF()`: the EVBMF rank of each unfolding (Kim et al. 2016); see `jaxcomp.decompose.vbmf`.
* `ParamBudget(total)` / `FlopBudget(total, dense_flops)`: a total over all selected layers,
  allocated by `jaxcomp.decompose.budget` (only through `decompose_tree`).

Which spectra a rule reads depends on the method: the matrix for SVD, the input- and
output-channel unfoldings for Tucker-2 (HOSVD), the unfoldings of the tensorized matrix for TT.
CP has no spectrum, so it takes `FixedRank`, `ParamRatio` and the budgets only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Union

import jax
import numpy as np

from jaxcomp._checks import as_int, as_real
from jaxcomp.decompose.vbmf import vbmf_spectrum
from jaxcomp.flops import FlopCount

__all__ = [
    "Energy",
    "FixedRank",
    "FlopBudget",
    "ParamBudget",
    "ParamRatio",
    "RankRatio",
    "RankRule",
    "VBMF",
]


def _check_fraction(rule: object, field: str, name: str) -> None:
    """Checks `rule.<field>` is a real number in (0, 1] and stores it as a Python float (NumPy
    and concrete JAX scalars are accepted)."""
    value = getattr(rule, field)
    real = (isinstance(value, (int, float, np.integer, np.floating))
            or (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
                and np.issubdtype(np.asarray(value).dtype, np.floating)))
    if isinstance(value, (bool, np.bool_)) or not real or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    object.__setattr__(rule, field, float(value))


@dataclasses.dataclass(frozen=True)
class FixedRank:
    """Fixed rank(s): an int for every mode, or one int per mode.

    Modes: SVD and CP have one rank; Tucker-2 has `(r_in, r_out)` (an int sets both); TT has one
    rank per bond between its cores (an int sets all).

    Attributes:
      rank: an int >= 1, or a tuple of them.
      clip: clip ranks above a mode's dimension to it, with a warning; when False such a request
        raises `ValueError` naming the path.

    Example:
        >>> FixedRank((16, 32)).rank
        (16, 32)
    """

    rank: Union[int, tuple[int, ...]]
    clip: bool = True

    def __post_init__(self):
        if isinstance(self.rank, (int, np.integer)):
            ranks = (self.rank,)
        elif isinstance(self.rank, (tuple, list)):
            ranks = tuple(self.rank)
        else:
            ranks = ()  # 2.5, None, a string: not a rank
        if not ranks or any(
            not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1 for r in ranks
        ):
            raise ValueError(f"FixedRank.rank must be a positive int or a tuple of them, got {self.rank!r}")
        object.__setattr__(
            self, "rank", int(ranks[0]) if isinstance(self.rank, (int, np.integer)) else tuple(int(r) for r in ranks)
        )


@dataclasses.dataclass(frozen=True)
class RankRatio:
    """Each mode keeps `ceil(ratio * full rank)` components (at least 1).

    Example:
        >>> RankRatio(0.5).ratio
        0.5
    """

    ratio: float

    def __post_init__(self):
        _check_fraction(self, "ratio", "RankRatio.ratio")


@dataclasses.dataclass(frozen=True)
class ParamRatio:
    """The largest ranks, scaled together, whose factors hold at most `ratio` of the parameters.

    Example:
        >>> ParamRatio(0.25).ratio
        0.25
    """

    ratio: float

    def __post_init__(self):
        _check_fraction(self, "ratio", "ParamRatio.ratio")


@dataclasses.dataclass(frozen=True)
class Energy:
    """The smallest rank keeping `threshold` of the squared singular values, per unfolding.

    Example:
        >>> Energy(0.95).threshold
        0.95
    """

    threshold: float = 0.9

    def __post_init__(self):
        _check_fraction(self, "threshold", "Energy.threshold")


@dataclasses.dataclass(frozen=True)
class VBMF:
    """The EVBMF rank of each unfolding (Nakajima et al. 2013, as Kim et al. 2016 use it).

    Attributes:
      sigma2: the noise variance if known (rarely); None estimates it per unfolding.

    Example:
        >>> VBMF().sigma2 is None
        True
    """

    sigma2: float | None = None

    def __post_init__(self):
        if self.sigma2 is None:
            return
        value = as_real(self.sigma2)
        if value is None or not value > 0 or not math.isfinite(value):
            raise ValueError(f"VBMF.sigma2 must be a positive number or None, got {self.sigma2!r}")
        object.__setattr__(self, "sigma2", value)


@dataclasses.dataclass(frozen=True)
class ParamBudget:
    """A total number of kernel parameters over all selected layers, allocated by sensitivity.

    Layers are compressed greedily where the reconstruction error grows least per parameter
    saved; a layer for which no rank saves anything stays dense. Counts only the selected
    kernels (biases and other leaves are not part of the budget).

    Example:
        >>> ParamBudget(total=100_000).total
        100000
    """

    total: int

    def __post_init__(self):
        if (as_int(self.total) or 0) < 1:
            raise ValueError(f"ParamBudget.total must be a positive int, got {self.total!r}")
        object.__setattr__(self, "total", as_int(self.total))


@dataclasses.dataclass(frozen=True)
class FlopBudget:
    """A total number of FLOPs over all selected layers, allocated by sensitivity.

    Attributes:
      total: the target FLOPs of the selected layers together.
      dense_flops: FLOPs of each selected kernel in the dense model, by path: the `FlopCount`
        that `jaxcomp.count_flops(fn, params, x)` returns, or a mapping such as its `per_path`
        (stored as a dict). They fix each layer's number of positions (batch x output pixels).
      input_hw: the spatial size `(H, W)` of each convolution's input, by kernel path, given by
        hand. The first 1x1 convolution of Tucker-2 runs on every input position, which
        outnumber the output positions by the strides under SAME padding, and by more under
        VALID or small explicit padding.
      conv_positions: `(input positions, output positions)` of each convolution summed over its
        calls, by kernel path: taken from a `FlopCount` given as `dense_flops` (which records
        them, exact for a layer called on inputs of several sizes), and filled in by
        `decompose_linen` from its trace, except for paths whose `input_hw` is given by hand
        (which takes precedence). A convolution with neither, whose padding can shrink its
        output (VALID, small explicit pads), is a `ValueError` at allocation.

    Raises:
      ValueError: for a `total` that is not a positive int, `dense_flops` that is neither a
        `FlopCount` nor a mapping of positive numbers, `input_hw` that is not a mapping of
        positive int pairs, `conv_positions` that is not a mapping of positive int pairs, or a
        path given both.

    Example:
        >>> FlopBudget(total=10**6, dense_flops={"Dense_0/kernel": 4 * 10**6}).total
        1000000
    """

    total: int
    dense_flops: Mapping[str, int] | FlopCount = dataclasses.field(default_factory=dict, hash=False)
    input_hw: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict, hash=False)
    conv_positions: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict,
                                                                      hash=False)

    def __post_init__(self):
        if (as_int(self.total) or 0) < 1:
            raise ValueError(f"FlopBudget.total must be a positive int, got {self.total!r}")
        object.__setattr__(self, "total", as_int(self.total))
        dense = self.dense_flops
        input_hw = _int_pairs(self.input_hw, "input_hw", "(H, W)")
        given = _int_pairs(self.conv_positions, "conv_positions", "(input positions, output positions)")
        both = sorted(set(input_hw) & set(given))
        if both:
            raise ValueError(f"FlopBudget: {both} given both input_hw and conv_positions; give one")
        positions = {}
        if isinstance(dense, FlopCount):
            # What is given by hand takes precedence over what the count recorded.
            positions = {p: n for p, n in dense.conv_positions.items() if p not in input_hw}
            dense = dense.per_path
        positions.update(given)
        object.__setattr__(self, "input_hw", input_hw)
        object.__setattr__(self, "conv_positions", positions)
        if not isinstance(dense, Mapping):
            raise ValueError(
                "FlopBudget.dense_flops must be a jaxcomp.FlopCount or a mapping from kernel path "
                f"to FLOPs, got {type(dense).__name__} {dense!r}"
            )
        flops = dict(dense)
        bad = {p: f for p, f in flops.items() if not _positive_number(f)}
        if bad:
            raise ValueError(f"FlopBudget.dense_flops must be positive numbers, got {bad}")
        object.__setattr__(self, "dense_flops", flops)


def _int_pairs(mapping: object, name: str, what: str) -> dict[str, tuple[int, int]]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"FlopBudget.{name} must map kernel paths to {what}, got "
                         f"{type(mapping).__name__} {mapping!r}")
    out = {}
    for path, pair in mapping.items():
        try:
            pair = tuple(pair)
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2 or not all((as_int(d) or 0) > 0 for d in pair):
            raise ValueError(f"FlopBudget.{name}[{path!r}] must be a pair of positive ints, got "
                             f"{mapping[path]!r}")
        out[path] = (as_int(pair[0]), as_int(pair[1]))
    return out


def _positive_number(value: object) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and bool(np.isfinite(value)) and value > 0)


RankRule = Union[int, tuple, FixedRank, RankRatio, ParamRatio, Energy, VBMF, ParamBudget, FlopBudget]
LayerRule = Union[FixedRank, RankRatio, ParamRatio, Energy, VBMF]


def as_rule(ranks: RankRule) -> Union[LayerRule, ParamBudget, FlopBudget]:
    """An int or tuple of ints means `FixedRank`; rule objects pass through.

    Raises:
      ValueError: for anything else (a float, a string, ...).

    Example:
        >>> as_rule((4, 8))
        FixedRank(rank=(4, 8), clip=True)
    """
    if isinstance(ranks, (FixedRank, RankRatio, ParamRatio, Energy, VBMF, ParamBudget, FlopBudget)):
        return ranks
    if isinstance(ranks, (int, np.integer, tuple, list)) and not isinstance(ranks, bool):
        return FixedRank(ranks if isinstance(ranks, (int, np.integer)) else tuple(ranks))
    raise ValueError(
        f"ranks={ranks!r} is not a rank rule: pass an int, a tuple of ints, FixedRank, RankRatio, "
        "ParamRatio, Energy, VBMF, ParamBudget or FlopBudget"
    )


def energy_rank(spectrum: np.ndarray, threshold: float) -> int:
    """The smallest `r` with `sum(s[:r]**2) >= threshold * sum(s**2)` (at least 1).

    Args:
      spectrum: the singular values, a non-empty 1-D array of finite values >= 0 (in
        decreasing order, as an SVD returns them).
      threshold: the fraction of the squared norm to keep, in (0, 1].

    Returns:
      The rank, between 1 and `len(spectrum)`.

    Raises:
      ValueError: if `threshold` is not a number in (0, 1], or `spectrum` is not a non-empty
        1-D array of finite, non-negative values.

    Example:
        >>> energy_rank(np.array([3.0, 1.0, 0.1]), 0.85), energy_rank(np.array([3.0, 1.0, 0.1]), 0.95)
        (1, 2)
    """
    if not 0.0 < (as_real(threshold) or 0.0) <= 1.0:
        raise ValueError(f"energy_rank: threshold must be a number in (0, 1], got {threshold!r}")
    try:
        s = np.asarray(spectrum, np.float64)
    except (TypeError, ValueError):
        s = None
    if s is None or s.ndim != 1 or s.size == 0:
        shape = "not numeric" if s is None else f"shape {s.shape}"
        raise ValueError(
            f"energy_rank: spectrum must be a non-empty 1-D array of singular values, got "
            f"{type(spectrum).__name__} ({shape})"
        )
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(
            f"energy_rank: spectrum must hold finite values >= 0 (singular values), got "
            f"{s.tolist()[:8]}"
        )
    energy = np.cumsum(s**2)
    if energy[-1] == 0.0:
        return 1
    return max(1, int(np.searchsorted(energy, threshold * energy[-1] * (1 - 1e-12)) + 1))


def tail_energy(spectrum: np.ndarray) -> np.ndarray:
    """`t[r]` = fraction of the squared norm outside the first `r` singular values, r = 0..n.

    Example:
        >>> tail_energy(np.array([2.0, 1.0])).tolist()
        [1.0, 0.2, 0.0]
    """
    s2 = np.asarray(spectrum, np.float64) ** 2
    total = s2.sum()
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


class RankModel:
    """What rank selection needs to know about one kernel under one method.

    Subclasses (in `jaxcomp.decompose.factorize`) give the full rank of each mode, the parameter
    count and FLOPs of a rank choice, and the spectra the rules read.
    """

    method: str = ""
    full: tuple[int, ...] = ()
    dense_params: int = 0

    def params(self, ranks: Sequence[int]) -> int:
        raise NotImplementedError

    def flops_per_position(self, ranks: Sequence[int], strides: Sequence[int]) -> int:
        """FLOPs of the factor sequence per output position (batch x output pixels)."""
        raise NotImplementedError

    def dense_flops_per_position(self) -> int:
        return 2 * self.dense_params

    def spectra(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """`(singular values, unfolding shape)` of each mode's unfolding."""
        raise ValueError(f"{self.method} has no spectrum")

    @property
    def has_full_rank(self) -> bool:
        """Whether "a fraction of the full rank" means something (not for CP)."""
        return True

    def expand(self, rank: Union[int, tuple[int, ...]], name: str) -> tuple[int, ...]:
        """One rank per mode from an int or a tuple."""
        if isinstance(rank, int):
            return (rank,) * len(self.full)
        if len(rank) != len(self.full):
            raise ValueError(
                f"{name}: {self.method} takes {len(self.full)} rank(s) {self.mode_names}, got {rank}"
            )
        return tuple(rank)

    @property
    def mode_names(self) -> str:
        return ""


def clip_ranks(model: RankModel, ranks: Sequence[int], name: str, *, clip: bool = True) -> tuple[int, ...]:
    """Ranks clipped to `[1, full]` per mode, warning when a rank changes.

    Raises:
      ValueError: naming `name`, for a rank below 1, or above the full rank when `clip` is False.

    Example:
        >>> from jaxcomp.decompose.structure import Tucker2Model
        >>> clip_ranks(Tucker2Model(np.ones((3, 3, 4, 8))), (2, 6), "conv/kernel")
        (2, 6)
    """
    out = []
    for k, (r, full) in enumerate(zip(ranks, model.full)):
        if r < 1 and not clip:
            raise ValueError(f"{name}: rank {r} of mode {k} must be at least 1")
        if r > full and not clip:
            raise ValueError(
                f"{name}: rank {r} of mode {k} exceeds its full rank {full} ({model.method}, "
                f"kernel modes {model.full}); lower it or pass FixedRank(..., clip=True)"
            )
        new = min(max(int(r), 1), full)
        if new != r:
            warnings.warn(f"{name}: {model.method} rank {r} of mode {k} clipped to {new}", stacklevel=3)
        out.append(new)
    return tuple(out)


def _param_ratio_ranks(model: RankModel, ratio: float) -> tuple[int, ...]:
    target = ratio * model.dense_params

    def ranks_at(t: float) -> tuple[int, ...]:
        return tuple(max(1, math.floor(t * f)) for f in model.full)

    lo, hi = 0.0, 1.0
    if model.params(ranks_at(hi)) <= target:
        return ranks_at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if model.params(ranks_at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return ranks_at(lo)


def select_ranks(model: RankModel, rule: LayerRule, name: str) -> tuple[int, ...]:
    """The ranks a per-layer rule picks for `model`, clipped and validated.

    Raises:
      ValueError: naming `name`, when the rule does not apply to the method or a fixed rank is
        invalid.

    Example:
        >>> from jaxcomp.decompose.structure import SVDModel
        >>> select_ranks(SVDModel(np.diag([3.0, 1.0, 0.1])), Energy(0.85), "dense/kernel")
        (1,)
    """
    if isinstance(rule, FixedRank):
        return clip_ranks(model, model.expand(rule.rank, name), name, clip=rule.clip)
    if isinstance(rule, ParamRatio):
        ranks = _param_ratio_ranks(model, rule.ratio)
        if model.params(ranks) > rule.ratio * model.dense_params:
            warnings.warn(
                f"{name}: even rank {ranks} keeps {model.params(ranks)} of {model.dense_params} "
                f"parameters, more than ParamRatio({rule.ratio})",
                stacklevel=2,
            )
        return ranks
    if isinstance(rule, RankRatio):
        if not model.has_full_rank:
            raise ValueError(
                f"{name}: RankRatio needs a full rank, which {model.method} does not have; use "
                "FixedRank or ParamRatio"
            )
        return clip_ranks(model, tuple(max(1, math.ceil(rule.ratio * f)) for f in model.full), name)
    try:
        spectra = model.spectra()
    except ValueError as e:
        raise ValueError(
            f"{name}: {type(rule).__name__} ranks need singular values, which {model.method} does "
            "not have; use FixedRank, ParamRatio or a budget"
        ) from e
    if isinstance(rule, Energy):
        return clip_ranks(model, tuple(energy_rank(s, rule.threshold) for s, _ in spectra), name)
    if isinstance(rule, VBMF):
        # A mode of dimension 1 has nothing to choose (and one singular value estimates no noise).
        ranks = tuple(
            1 if full == 1 else vbmf_spectrum(s, shape, sigma2=rule.sigma2).rank
            for (s, shape), full in zip(spectra, model.full)
        )
        if min(ranks) < 1:
            warnings.warn(
                f"{name}: VBMF finds no component above the noise level in some mode {ranks}; "
                "keeping rank 1 there",
                stacklevel=2,
            )
        return clip_ranks(model, tuple(max(r, 1) for r in ranks), name)
    raise ValueError(f"{name}: {type(rule).__name__} is not a per-layer rank rule")
