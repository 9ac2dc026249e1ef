"""The structure of each factorization, as rank selection and budgets see it.

For one kernel under one method, a `RankModel` knows the full rank of each mode, the parameter
count and FLOPs (per output position) of a rank choice, and the singular values of the
unfoldings the rank rules read: the matrix for SVD, the channel unfoldings for Tucker-2, the bond
unfoldings of the tensorized matrix for TT. CP has no spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxcomp._checks import as_int
from jaxcomp.decompose.ranks import RankModel

__all__ = ["CPModel", "SVDModel", "TTModel", "Tucker2Model", "balanced_modes"]


def _svals(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(matrix, compute_uv=False)


class SVDModel(RankModel):
    method = "SVD"

    def __init__(self, kernel: np.ndarray):
        self.kernel = kernel
        n_in, n_out = kernel.shape
        self.full = (min(n_in, n_out),)
        self.dense_params = n_in * n_out

    @property
    def mode_names(self) -> str:
        return "(r,)"

    def params(self, ranks: Sequence[int]) -> int:
        return ranks[0] * sum(self.kernel.shape)

    def flops_per_position(self, ranks: Sequence[int], strides: Sequence[int]) -> int:
        return 2 * self.params(ranks)

    def spectra(self):
        return [(_svals(self.kernel), self.kernel.shape)]


class Tucker2Model(RankModel):
    method = "Tucker-2"

    def __init__(self, kernel: np.ndarray):
        self.kernel = kernel
        self.full = tuple(kernel.shape[2:])
        self.dense_params = kernel.size

    @property
    def mode_names(self) -> str:
        return "(r_in, r_out)"

    def _terms(self, ranks: Sequence[int]) -> tuple[int, int, int]:
        kh, kw, cin, cout = self.kernel.shape
        r_in, r_out = ranks
        first = cin * r_in if r_in < cin else 0
        last = r_out * cout if r_out < cout else 0
        return first, kh * kw * r_in * r_out, last

    def params(self, ranks: Sequence[int]) -> int:
        return sum(self._terms(ranks))

    def flops_per_position(self, ranks: Sequence[int], strides: Sequence[int]) -> int:
        first, core, last = self._terms(ranks)
        return 2 * (first * math.prod(strides) + core + last)

    def unfolding(self, mode: int) -> np.ndarray:
        return np.moveaxis(self.kernel, mode, 0).reshape(self.kernel.shape[mode], -1)

    def spectra(self):
        return [(_svals(self.unfolding(m)), self.unfolding(m).shape) for m in (2, 3)]


def balanced_modes(n: int, order: int) -> tuple[int, ...]:
    """Splits `n` into `order` factors as equal as possible (prime factors, largest first).

    Raises:
      ValueError: if `n` or `order` is not an int >= 1 (NumPy integers are accepted).

    Example:
        >>> balanced_modes(4096, 3), balanced_modes(784, 3), balanced_modes(10, 2)
        ((16, 16, 16), (14, 8, 7), (5, 2))
    """
    for name, value in (("n", n), ("order", order)):
        if as_int(value) is None:
            raise ValueError(f"balanced_modes: {name} must be an int, got {value!r}")
    n, order = int(n), int(order)
    if n < 1 or order < 1:
        raise ValueError(f"balanced_modes needs n >= 1 and order >= 1, got {n}, {order}")
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    modes = [1] * order
    for prime in sorted(primes, reverse=True):
        modes[int(np.argmin(modes))] *= prime
    return tuple(sorted(modes, reverse=True))


class TTModel(RankModel):
    method = "TT"

    def __init__(self, kernel: np.ndarray, in_modes: Sequence[int], out_modes: Sequence[int]):
        self.kernel = kernel
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.sizes = [m * n for m, n in zip(self.in_modes, self.out_modes)]
        d = len(self.sizes)
        self.full = tuple(
            min(math.prod(self.sizes[: k + 1]), math.prod(self.sizes[k + 1 :])) for k in range(d - 1)
        )
        self.dense_params = kernel.size

    @property
    def mode_names(self) -> str:
        return f"(one per bond between {len(self.sizes)} cores)"

    def _bonds(self, ranks: Sequence[int]) -> list[int]:
        return [1, *ranks, 1]

    def params(self, ranks: Sequence[int]) -> int:
        r = self._bonds(ranks)
        return sum(r[k] * s * r[k + 1] for k, s in enumerate(self.sizes))

    def flops_per_position(self, ranks: Sequence[int], strides: Sequence[int]) -> int:
        r = self._bonds(ranks)
        total, rest_in, done_out = 0, math.prod(self.in_modes), 1
        for k, (m, n) in enumerate(zip(self.in_modes, self.out_modes)):
            rest_in //= m
            total += 2 * rest_in * done_out * r[k] * m * n * r[k + 1]
            done_out *= n
        return total

    def interleaved(self) -> np.ndarray:
        d = len(self.sizes)
        tensor = self.kernel.reshape(*self.in_modes, *self.out_modes)
        order = [i for k in range(d) for i in (k, d + k)]
        return tensor.transpose(order)

    def spectra(self):
        tensor = self.interleaved().reshape(self.sizes)
        out = []
        for k in range(len(self.sizes) - 1):
            unfolding = tensor.reshape(math.prod(self.sizes[: k + 1]), -1)
            out.append((_svals(unfolding), unfolding.shape))
        return out


class CPModel(RankModel):
    method = "CP"

    def __init__(self, kernel: np.ndarray):
        self.kernel = kernel
        dims = kernel.shape
        # Any 4-way tensor has CP rank at most min_k prod_{j != k} n_j.
        self.full = (min(math.prod(dims) // n for n in dims),)
        self.dense_params = kernel.size

    @property
    def has_full_rank(self) -> bool:
        return False

    @property
    def mode_names(self) -> str:
        return "(r,)"

    def params(self, ranks: Sequence[int]) -> int:
        return ranks[0] * sum(self.kernel.shape)

    def flops_per_position(self, ranks: Sequence[int], strides: Sequence[int]) -> int:
        kh, kw, cin, cout = self.kernel.shape
        sh, sw = strides
        return 2 * ranks[0] * (sh * sw * cin + sw * kh + kw + cout)
