"""Factorized kernels: compressed leaves that hold the factors of a Dense or Conv kernel.

Each leaf stores its factors in the layout of the small layer they run as (Flax's `(in, out)` for
matmuls, HWIO for convolutions), so `materialize` rebuilds the dense kernel and the apply
functions of `jaxcomp.decompose.apply` run the factor sequence. Convolution leaves carry the
original convolution's stride, padding and dilation as static metadata (`ConvSpec`).

| leaf | dense kernel | factors |
| --- | --- | --- |
| `SVDKernel` | Dense `(in, out)` | `u (in, r)`, `v (r, out)` |
| `TTKernel` | Dense `(prod(in_modes), prod(out_modes))` | cores `(r[k-1], in_modes[k], out_modes[k], r[k])` |
| `Tucker2Kernel` | Conv `(kh, kw, cin, cout)` | `u_in (cin, r_in)`, `core (kh, kw, r_in, r_out)`, `u_out (r_out, cout)` |
| `CPKernel` | Conv `(kh, kw, cin, cout)` | `a_in (cin, r)`, `a_h (kh, r)`, `a_w (kw, r)`, `a_out (r, cout)` |

A Tucker-2 mode kept at full rank has no factor (`u_in` or `u_out` is `None`): the orthogonal
matrix is folded into the core, which saves its parameters and its 1x1 convolution.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp._checks import as_int
from jaxcomp.core import CompressedLeaf, compressed_leaf, is_compressed, static_field

__all__ = [
    "CPKernel",
    "ConvSpec",
    "Factorized",
    "SVDKernel",
    "TTKernel",
    "Tucker2Kernel",
]

Padding = Union[str, tuple[tuple[int, int], ...]]

_PADDING_STRINGS = ("SAME", "VALID", "SAME_LOWER", "CIRCULAR", "REFLECT")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if value is None:
        return (1, 1)
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value).tolist()
    if as_int(value) is not None:
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(as_int(v) is not None and v >= 1 for v in value)):
        raise ValueError(f"ConvSpec.{name} must be a positive int or a pair of them, got {value!r}")
    return (int(value[0]), int(value[1]))


def _padding(value: Any) -> Padding:
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value).tolist()
    if isinstance(value, str):
        upper = value.upper()
        if upper not in _PADDING_STRINGS:
            raise ValueError(
                f"ConvSpec.padding={value!r} is not one of {_PADDING_STRINGS} or explicit pads"
            )
        return upper
    if as_int(value) is not None:
        return ((int(value), int(value)),) * 2
    bad = ValueError(
        f"ConvSpec.padding={value!r} is not one of {_PADDING_STRINGS}, an int, or one int or "
        "(low, high) pair of ints per spatial axis"
    )
    if not isinstance(value, (tuple, list)):
        raise bad
    pads = []
    for p in value:
        if as_int(p) is not None:
            pads.append((int(p), int(p)))
        elif isinstance(p, (tuple, list)) and len(p) == 2 and all(as_int(v) is not None for v in p):
            pads.append((int(p[0]), int(p[1])))
        else:
            raise bad
    if len(pads) != 2:
        raise ValueError(f"ConvSpec.padding needs one (low, high) pair per spatial axis, got {value}")
    return tuple(pads)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Stride, padding and dilation of a 2-D convolution, as Flax's `Conv` takes them.

    Values are normalised at construction: `strides=2` becomes `(2, 2)`, `padding=1` becomes
    `((1, 1), (1, 1))`, padding strings are upper-cased. The padding is resolved per axis at apply
    time with `lax.padtype_to_pads`, so SAME with stride 2 pads `(0, 1)` where XLA does.

    Attributes:
      strides: `(sh, sw)`.
      padding: `"SAME"`, `"VALID"`, `"SAME_LOWER"`, `"CIRCULAR"`, `"REFLECT"` (the last two as
        Flax implements them: the input is padded by `((k - 1) // 2, k // 2)` per axis), or
        `((top, bottom), (left, right))`.
      dilation: kernel dilation `(dh, dw)`.

    Example:
        >>> ConvSpec(strides=2, padding=1)
        ConvSpec(strides=(2, 2), padding=((1, 1), (1, 1)), dilation=(1, 1))
    """

    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self):
        object.__setattr__(self, "strides", _pair(self.strides, "strides"))
        object.__setattr__(self, "dilation", _pair(self.dilation, "dilation"))
        object.__setattr__(self, "padding", _padding(self.padding))

    def dilated_kernel(self, kernel_hw: Sequence[int]) -> tuple[int, int]:
        """Spatial extent of the kernel after dilation."""
        return tuple((k - 1) * d + 1 for k, d in zip(kernel_hw, self.dilation))  # type: ignore

    def output_hw(self, input_hw: Sequence[int], kernel_hw: Sequence[int]) -> tuple[int, int]:
        """Output spatial size for an input of spatial size `input_hw`."""
        pads = self.resolve(input_hw, kernel_hw)
        out = []
        for n, k, s, (lo, hi) in zip(input_hw, self.dilated_kernel(kernel_hw), self.strides, pads):
            out.append((n + lo + hi - k) // s + 1)
        return tuple(out)  # type: ignore[return-value]

    def resolve(self, input_hw: Sequence[int], kernel_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Explicit `(low, high)` pads per spatial axis for an input of spatial size `input_hw`."""
        if isinstance(self.padding, tuple):
            return self.padding
        kernel = self.dilated_kernel(kernel_hw)
        if self.padding in ("CIRCULAR", "REFLECT"):
            return tuple(((k - 1) // 2, k // 2) for k in kernel)
        return tuple(
            tuple(p) for p in jax.lax.padtype_to_pads(tuple(input_hw), kernel, self.strides, self.padding)
        )

    def strided_pointwise(self, kernel_hw: Sequence[int]) -> bool:
        """Whether a `kernel_hw` kernel is a strided 1x1 with no padding (a padding string
        resolves to none for 1x1): it reads only every stride-th input position.

        Example:
            >>> ConvSpec(strides=2).strided_pointwise((1, 1)), ConvSpec(strides=2).strided_pointwise((3, 3))
            (True, False)
        """
        return (tuple(kernel_hw) == (1, 1) and self.strides != (1, 1)
                and (isinstance(self.padding, str) or all(p == (0, 0) for p in self.padding)))

    def describe(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else str(list(self.padding))
        text = f"stride {self.strides[0]}x{self.strides[1]} {pad}"
        if self.dilation != (1, 1):
            text += f" dilation {self.dilation[0]}x{self.dilation[1]}"
        return text


def _size(x: Any) -> int:
    return 0 if x is None else math.prod(x.shape)


class Factorized(CompressedLeaf):
    """Base class of the factorized kernels of `jaxcomp.decompose`.

    Adds to `CompressedLeaf` the figures a user compares layers by: `num_params` (elements of the
    factors), `dense_params`, `rank`, and `flops(input_shape)` (multiply-adds x 2 of the factor
    sequence, the convention of `jaxcomp.count_flops`).
    """

    @property
    def factors(self) -> dict[str, jax.Array]:
        """The factor arrays by field name (absent `None` factors left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.metadata.get("static") and getattr(self, f.name) is not None
        }

    def _factor_leaves(self) -> list[Any]:
        return jax.tree.leaves(self, is_leaf=lambda x: x is not self and is_compressed(x))

    def dense_factors(self):
        """The same leaf with every factor that is itself a compressed leaf (a quantized factor,
        say) materialized; a leaf of plain arrays comes back as it is."""
        if not any(is_compressed(x) for x in self._factor_leaves()):
            return self
        return jax.tree.map(
            lambda x: x.materialize() if is_compressed(x) else x,
            self,
            is_leaf=lambda x: x is not self and is_compressed(x),
        )

    @property
    def num_params(self) -> int:
        """Elements of the factors (at their dense size when a factor is itself compressed)."""
        return sum(math.prod(x.shape) for x in self._factor_leaves())

    @property
    def dense_params(self) -> int:
        """Elements of the dense kernel."""
        return math.prod(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.result_type(*(x.dtype for x in self._factor_leaves()))

    @property
    @abc.abstractmethod
    def rank(self) -> tuple[int, ...]:
        """The rank(s) of the factorization."""

    @abc.abstractmethod
    def flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs (2 x multiply-adds) of the factor sequence on an input of `input_shape`."""

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs of the dense layer on an input of `input_shape` (a matmul, or the original
        convolution with its stride, padding and dilation)."""
        if len(self.shape) == 2:
            return 2 * math.prod(input_shape[:-1]) * self.shape[0] * self.shape[1]
        kh, kw, cin, cout = self.shape
        out_hw = self.spec.output_hw(tuple(input_shape[-3:-1]), (kh, kw))
        return 2 * math.prod(input_shape[:-3]) * math.prod(out_hw) * kh * kw * cin * cout


@compressed_leaf
class SVDKernel(Factorized):
    """A Dense kernel `(in, out)` as a truncated SVD `u @ v`, singular values split evenly.

    Runs as Dense(in -> r, no bias) then Dense(r -> out): `2 * batch * r * (in + out)` FLOPs.

    Example:
        >>> leaf = SVDKernel(jnp.ones((6, 2)), jnp.ones((2, 4)))
        >>> leaf.shape, leaf.num_params, leaf.rank
        ((6, 4), 20, (2,))
    """

    u: jax.Array
    v: jax.Array

    def materialize(self) -> jax.Array:
        f = self.dense_factors()
        return f.u @ f.v

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.u.shape[0], self.v.shape[1])

    @property
    def rank(self) -> tuple[int, ...]:
        return (self.u.shape[1],)

    def flops(self, input_shape: Sequence[int]) -> int:
        batch = math.prod(input_shape[:-1])
        return 2 * batch * self.rank[0] * (self.shape[0] + self.shape[1])

    @property
    def kind(self) -> str:
        return "SVD"

    def summary(self) -> str:
        return f"SVD rank {self.rank[0]} of {min(self.shape)}"


@compressed_leaf
class TTKernel(Factorized):
    """A Dense kernel as a tensor-train matrix (Novikov et al. 2015).

    The input axis is split into `in_modes` and the output axis into `out_modes` (row-major), and
    core `k` has shape `(r[k-1], in_modes[k], out_modes[k], r[k])` with `r[-1] = r[d] = 1`.

    Example:
        >>> cores = (jnp.ones((1, 2, 3, 2)), jnp.ones((2, 4, 2, 1)))
        >>> TTKernel(cores, in_modes=(2, 4), out_modes=(3, 2)).shape
        (8, 6)
    """

    cores: tuple[jax.Array, ...]
    in_modes: tuple[int, ...] = static_field(default=())
    out_modes: tuple[int, ...] = static_field(default=())

    def materialize(self) -> jax.Array:
        cores = self.dense_factors().cores
        # Contract the train left to right into (m1, n1, ..., mk, nk, r_k).
        full = cores[0][0]
        for core in cores[1:]:
            full = jnp.tensordot(full, core, axes=((full.ndim - 1,), (0,)))
        full = full[..., 0]
        d = len(self.cores)
        order = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return full.transpose(order).reshape(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (math.prod(self.in_modes), math.prod(self.out_modes))

    @property
    def rank(self) -> tuple[int, ...]:
        return tuple(core.shape[-1] for core in self.cores[:-1])

    def flops(self, input_shape: Sequence[int]) -> int:
        batch = math.prod(input_shape[:-1])
        total = 0
        rest_in = math.prod(self.in_modes)
        done_out = 1
        for core in self.cores:
            r0, m, n, r1 = core.shape
            rest_in //= m
            total += 2 * batch * rest_in * done_out * r0 * m * n * r1
            done_out *= n
        return total

    @property
    def kind(self) -> str:
        return "TT"

    def summary(self) -> str:
        return f"TT ranks {list(self.rank)} modes {list(self.in_modes)}x{list(self.out_modes)}"


@compressed_leaf
class Tucker2Kernel(Factorized):
    """A Conv kernel `(kh, kw, cin, cout)` in Tucker-2 form on the channel modes (Kim et al. 2016).

    Runs as 1x1 conv `cin -> r_in` (`u_in`), `kh x kw` conv `r_in -> r_out` (`core`, with the
    original stride, padding and dilation), 1x1 conv `r_out -> cout` (`u_out`). A mode at full
    rank has no factor (`None`). Parameters: `cin*r_in + kh*kw*r_in*r_out + r_out*cout`.

    Example:
        >>> leaf = Tucker2Kernel(jnp.ones((3, 3, 2, 2)), jnp.ones((8, 2)), jnp.ones((2, 8)))
        >>> leaf.shape, leaf.rank, leaf.num_params
        ((3, 3, 8, 8), (2, 2), 68)
    """

    core: jax.Array
    u_in: jax.Array | None = None
    u_out: jax.Array | None = None
    spec: ConvSpec = static_field(default=ConvSpec())

    def materialize(self) -> jax.Array:
        f = self.dense_factors()
        kernel = f.core
        if f.u_in is not None:
            kernel = jnp.einsum("hwab,ia->hwib", kernel, f.u_in)
        if f.u_out is not None:
            kernel = jnp.einsum("hwib,bo->hwio", kernel, f.u_out)
        return kernel

    @property
    def shape(self) -> tuple[int, ...]:
        kh, kw, r_in, r_out = self.core.shape
        cin = r_in if self.u_in is None else self.u_in.shape[0]
        cout = r_out if self.u_out is None else self.u_out.shape[1]
        return (kh, kw, cin, cout)

    @property
    def rank(self) -> tuple[int, ...]:
        return tuple(self.core.shape[2:])

    def subsamples_first(self) -> bool:
        """Whether the layer is a strided 1x1 convolution without padding: its input is then
        subsampled before the first 1x1 stage, which runs on the output positions only."""
        return self.spec.strided_pointwise(self.shape[:2])

    def flops(self, input_shape: Sequence[int]) -> int:
        n = math.prod(input_shape[:-3])
        in_hw = tuple(input_shape[-3:-1])
        kh, kw, cin, cout = self.shape
        r_in, r_out = self.rank
        out_hw = self.spec.output_hw(in_hw, (kh, kw))
        positions_in, positions_out = n * math.prod(in_hw), n * math.prod(out_hw)
        if self.subsamples_first():
            positions_in = positions_out
        total = 2 * positions_out * kh * kw * r_in * r_out
        if self.u_in is not None:
            total += 2 * positions_in * cin * r_in
        if self.u_out is not None:
            total += 2 * positions_out * r_out * cout
        return total

    @property
    def kind(self) -> str:
        return "Tucker2"

    def summary(self) -> str:
        kh, kw, cin, cout = self.shape
        return (
            f"Tucker-2 ranks ({self.rank[0]}, {self.rank[1]}) of ({cin}, {cout}), "
            f"{kh}x{kw} {self.spec.describe()}"
        )


@compressed_leaf
class CPKernel(Factorized):
    """A Conv kernel `(kh, kw, cin, cout)` as a rank-`r` CP decomposition (Lebedev et al. 2015).

    `W[h, w, i, o] = sum_r a_h[h, r] a_w[w, r] a_in[i, r] a_out[r, o]` (the CP weights are folded
    into `a_out`). Runs as 1x1 conv `cin -> r`, depthwise `kh x 1` conv (vertical stride, padding
    and dilation), depthwise `1 x kw` conv (horizontal ones), 1x1 conv `r -> cout`.
    Parameters: `r * (cin + kh + kw + cout)`.

    Example:
        >>> leaf = CPKernel(jnp.ones((8, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)), jnp.ones((4, 8)))
        >>> leaf.shape, leaf.num_params
        ((3, 3, 8, 8), 88)
    """

    a_in: jax.Array
    a_h: jax.Array
    a_w: jax.Array
    a_out: jax.Array
    spec: ConvSpec = static_field(default=ConvSpec())

    def materialize(self) -> jax.Array:
        f = self.dense_factors()
        return jnp.einsum("hr,wr,ir,ro->hwio", f.a_h, f.a_w, f.a_in, f.a_out)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.a_h.shape[0], self.a_w.shape[0], self.a_in.shape[0], self.a_out.shape[1])

    @property
    def rank(self) -> tuple[int, ...]:
        return (self.a_in.shape[1],)

    def flops(self, input_shape: Sequence[int]) -> int:
        n = math.prod(input_shape[:-3])
        height, width = input_shape[-3:-1]
        kh, kw, cin, cout = self.shape
        (r,) = self.rank
        out_h, out_w = self.spec.output_hw((height, width), (kh, kw))
        # The vertical stage runs over the padded width when the input is padded up front.
        mid_w = width + sum(self.spec.resolve((height, width), (kh, kw))[1]) if isinstance(
            self.spec.padding, str) and self.spec.padding in ("CIRCULAR", "REFLECT") else width
        return 2 * n * r * (height * width * cin + out_h * mid_w * kh + out_h * out_w * (kw + cout))

    @property
    def kind(self) -> str:
        return "CP"

    def summary(self) -> str:
        kh, kw, cin, cout = self.shape
        return f"CP rank {self.rank[0]}, {cin}->{cout} {kh}x{kw} {self.spec.describe()}"
