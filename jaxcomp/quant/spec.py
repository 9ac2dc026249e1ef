"""`QuantSpec`: how a tensor is quantized (bits, sign, zero point, granularity, rounding, fp8).

A spec is a frozen, validated dataclass: it says *how* to quantize, never *what* (selection is
`where=`) and holds no arrays, so it is static metadata of a `QArray` and a hashable argument of
jitted functions. The integer grid follows the uniform affine convention
`q = clip(round(x / s) + z, qmin, qmax)`, `x_hat = s * (q - z)`:

* signed symmetric: `z = 0`, `qmin = -qmax` with `qmax = 2**(bits-1) - 1` (the most negative
  code, e.g. -128 for int8, is left unused so the grid is symmetric around zero);
* signed asymmetric: `[-2**(bits-1), 2**(bits-1) - 1]` and a zero point;
* unsigned: `[0, 2**bits - 1]` (symmetric means `z = 0`, for non-negative data such as ReLU
  outputs; negative values clip to zero);
* fp8: values are cast to `float8_e4m3fn` / `float8_e5m2` after scaling the absolute maximum to
  the format's largest finite value.

Granularity: per tensor (the default), per channel (`channel_axes`, the axes that keep their own
scale) and per group (`group_size` consecutive elements along `group_axis` share a scale, on top
of any `channel_axes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from jaxcomp.tree import select, selected_paths

__all__ = ["QuantSpec"]

_ROUNDING = ("nearest", "stochastic")
_FP8 = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
_VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize a tensor; validated at construction.

    Attributes:
      bits: integer bit width, 2 to 8 or 16 (must be 8 with `fp8`). Values are stored in the
        smallest of int2 / int4 / int8 / int16 (or the unsigned twins) that holds them.
      signed: signed integer grid (weights) or unsigned (non-negative activations).
      symmetric: zero point fixed at 0 (True) or fitted to the range (False).
      channel_axes: axes with their own scale (per-channel quantization), e.g. `(-1,)` for the
        output channels of a Flax Dense or Conv kernel. Empty for one scale per tensor (or group).
      group_size: when set, each run of `group_size` consecutive elements along `group_axis` has
        its own scale (per-group quantization). The axis length must be divisible by it.
      group_axis: the axis split into groups; defaults to -2, the input-feature axis of Flax
        Dense (K, N) and Conv (H, W, I, O) kernels.
      rounding: "nearest" (half to even) or "stochastic" (`floor(v + u)`, `u ~ U[0, 1)`, which
        needs an explicit `key` where it is used).
      fp8: None for an integer grid, or "e4m3" / "e5m2" for the `jnp.float8_*` formats.

    Raises:
      ValueError: on bits outside 2..8 and 16, an unknown rounding or fp8 format, a group size
        below 1, repeated channel axes, `group_axis` in `channel_axes`, or fp8 combined with an
        asymmetric, unsigned, stochastic or non-8-bit spec.

    Example:
        >>> spec = QuantSpec(bits=4, channel_axes=(-1,))
        >>> spec.qmin, spec.qmax, spec.storage_dtype
        (-7, 7, dtype(int4))
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    channel_axes: tuple[int, ...] = ()
    group_size: int | None = None
    group_axis: int = -2
    rounding: Literal["nearest", "stochastic"] = "nearest"
    fp8: Literal["e4m3", "e5m2"] | None = None

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        axes = self.channel_axes
        if is_int(axes):
            object.__setattr__(self, "channel_axes", (int(axes),))
        elif isinstance(axes, Sequence) and not isinstance(axes, str) and all(map(is_int, axes)):
            object.__setattr__(self, "channel_axes", tuple(int(a) for a in axes))
        else:
            raise ValueError(f"channel_axes must be an int or a tuple of ints, got {axes!r}")
        if not is_int(self.bits) or self.bits not in _VALID_BITS:
            raise ValueError(f"bits must be one of 2..8 or 16 (an int), got {self.bits!r}")
        for name in ("signed", "symmetric"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if not is_int(self.group_axis):
            raise ValueError(f"group_axis must be an int, got {self.group_axis!r}")
        if self.rounding not in _ROUNDING:
            raise ValueError(f"rounding must be one of {_ROUNDING}, got {self.rounding!r}")
        if len(set(self.channel_axes)) != len(self.channel_axes):
            raise ValueError(f"channel_axes has repeated axes: {self.channel_axes!r}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) \
                    or self.group_size < 1:
                raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
            if self.group_axis in self.channel_axes:
                raise ValueError(
                    f"group_axis={self.group_axis} is also in channel_axes={self.channel_axes}"
                )
        if self.fp8 is not None:
            if self.fp8 not in _FP8:
                raise ValueError(f"fp8 must be None, 'e4m3' or 'e5m2', got {self.fp8!r}")
            if self.bits != 8 or not self.symmetric or not self.signed:
                raise ValueError(
                    f"fp8={self.fp8!r} needs bits=8, signed and symmetric; got bits={self.bits}, "
                    f"signed={self.signed}, symmetric={self.symmetric}"
                )
            if self.rounding != "nearest":
                raise ValueError(f"fp8={self.fp8!r} supports rounding='nearest' only")

    @property
    def is_fp8(self) -> bool:
        """True for a float8 format."""
        return self.fp8 is not None

    @property
    def qmin(self) -> int | float:
        """Smallest code of the grid (a float for fp8)."""
        if self.is_fp8:
            return -float(jnp.finfo(_FP8[self.fp8]).max)
        if not self.signed:
            return 0
        if self.symmetric:
            return -(2 ** (self.bits - 1) - 1)
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int | float:
        """Largest code of the grid (the largest finite float8 value for fp8)."""
        if self.is_fp8:
            return float(jnp.finfo(_FP8[self.fp8]).max)
        if not self.signed:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype `QArray` values are stored in."""
        if self.is_fp8:
            return np.dtype(_FP8[self.fp8])
        width = next(w for w in (2, 4, 8, 16) if self.bits <= w)
        name = f"{'' if self.signed else 'u'}int{width}"
        return np.dtype(getattr(jnp, name))

    @property
    def granularity(self) -> str:
        """"tensor", "channel" or "group", for summaries."""
        if self.group_size is not None:
            return "group"
        return "channel" if self.channel_axes else "tensor"

    def describe(self) -> str:
        """Short human-readable description, e.g. 'int4 sym per-group(128, axis -2)'."""
        name = f"fp8-{self.fp8}" if self.is_fp8 else f"{'' if self.signed else 'u'}int{self.bits}"
        parts = [name, "sym" if self.symmetric else "asym"]
        if self.group_size is not None:
            parts.append(f"per-group({self.group_size}, axis {self.group_axis})")
        if self.channel_axes:
            parts.append(f"per-channel{tuple(self.channel_axes)}")
        if self.group_size is None and not self.channel_axes:
            parts.append("per-tensor")
        if self.rounding == "stochastic":
            parts.append("stochastic")
        return " ".join(parts)

    def normalized_axes(self, ndim: int, path: str = "x") -> tuple[tuple[int, ...], int | None]:
        """Channel axes and group axis made non-negative for an array of rank `ndim`.

        Raises:
          ValueError: naming `path` when an axis is out of range.
        """
        def norm(axis: int, what: str) -> int:
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{path}: {what}={axis} is out of range for an array of rank {ndim}"
                )
            return axis % ndim

        channels = tuple(norm(a, "channel_axes") for a in self.channel_axes)
        group = norm(self.group_axis, "group_axis") if self.group_size is not None else None
        if len(set(channels)) != len(channels):
            raise ValueError(f"{path}: channel_axes={self.channel_axes} name the same axis twice")
        if group is not None and group in channels:
            raise ValueError(f"{path}: group_axis={self.group_axis} is also a channel axis")
        return channels, group


def specs_by_path(tree: Any, spec: Any, where: Any, caller: str) -> tuple[Any, dict[str, QuantSpec]]:
    """The selection and the spec of each selected leaf, for a `spec` that is one `QuantSpec`
    or rules: a mapping `{where: QuantSpec}` or a sequence of `(where, QuantSpec)` pairs, first
    match wins (a transformer's q/k/v kernels per (heads, head_dim) channel, the rest per
    output column, in one call).

    With rules, the leaves quantized are those `where` selects (default: all) that a rule
    matches. A rule that matches none of them, a value that is not a `QuantSpec`, or nothing
    selected at all is a `ValueError`.
    """
    if isinstance(spec, QuantSpec):
        return where, {}
    if isinstance(spec, Mapping):
        rules = list(spec.items())
    elif isinstance(spec, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 for r in spec):
        rules = [tuple(r) for r in spec]
    else:
        raise ValueError(f"{caller}: spec must be a QuantSpec, a {{where: QuantSpec}} mapping or "
                         f"(where, QuantSpec) pairs, got {spec!r}")
    if not rules:
        raise ValueError(f"{caller}: spec has no rule")
    for rule_where, rule_spec in rules:
        if not isinstance(rule_spec, QuantSpec):
            raise ValueError(f"{caller}: the rule for where={rule_where!r} must give a QuantSpec, "
                             f"got {rule_spec!r}")
    chosen = set(selected_paths(tree, where))
    specs: dict[str, QuantSpec] = {}
    for rule_where, rule_spec in rules:
        matched = [p for p in selected_paths(tree, rule_where, allow_empty=True) if p in chosen]
        fresh = [p for p in matched if p not in specs]
        if not fresh:
            reason = ("every leaf it matches is taken by an earlier rule" if matched else
                      f"it matches no selected leaf; selected: {sorted(chosen)[:10]}")
            raise ValueError(f"{caller}: the spec rule where={rule_where!r} quantizes nothing: "
                             f"{reason}")
        specs.update((p, rule_spec) for p in fresh)
    return select(tree, lambda path, _leaf: path in specs), specs
