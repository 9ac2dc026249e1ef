"""Decompose one kernel into a factorized leaf: SVD, tensor-train matrix, Tucker-2, CP.

The decompositions run once, outside `jit`, in float64 on the host with tensorly's numpy backend
(selected for the current thread only; the JAX x64 flag is left as it was). Factors come back in
the kernel's dtype, on its devices: a factor axis that is one of the kernel's axes keeps that
axis's sharding, rank axes are replicated. The kernel itself is gathered to the host for the
decomposition (an SVD needs the whole matrix).

Each `decompose_*` function takes the rank as an int, a tuple of ints or a per-layer rank rule
(`FixedRank`, `RankRatio`, `ParamRatio`, `Energy`, `VBMF`; see `jaxcomp.decompose.ranks`).
Results are deterministic: SVD-based initialisations, seeded where tensorly draws at random.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcomp._checks import as_int
from jaxcomp.decompose import _host
from jaxcomp.decompose.leaves import CPKernel, ConvSpec, SVDKernel, TTKernel, Tucker2Kernel
from jaxcomp.decompose.ranks import (
    FlopBudget,
    ParamBudget,
    RankModel,
    RankRule,
    as_rule,
    select_ranks,
)
from jaxcomp.decompose.structure import (
    CPModel,
    SVDModel,
    TTModel,
    Tucker2Model,
    balanced_modes,
)

__all__ = [
    "balanced_modes",
    "decompose_cp",
    "decompose_svd",
    "decompose_tt",
    "decompose_tucker2",
]


def _layer_rule(ranks: RankRule, name: str):
    rule = as_rule(ranks)
    if isinstance(rule, (ParamBudget, FlopBudget)):
        raise ValueError(
            f"{name}: {type(rule).__name__} allocates ranks across layers; use decompose_tree"
        )
    return rule


def _check_ndim(host: np.ndarray, ndim: int, method: str, name: str) -> None:
    if host.ndim != ndim:
        layout = "(in, out)" if ndim == 2 else "(kh, kw, cin, cout)"
        raise ValueError(f"{name}: {method} expects a {ndim}-D kernel {layout}, got shape {host.shape}")


def _warn_if_larger(model: RankModel, ranks: tuple[int, ...], name: str) -> None:
    if model.params(ranks) >= model.dense_params:
        warnings.warn(
            f"{name}: {model.method} ranks {ranks} store {model.params(ranks)} parameters, not "
            f"fewer than the dense kernel's {model.dense_params}",
            stacklevel=3,
        )


def _check_iters(n_iter_max: Any, what: str = "n_iter_max") -> int:
    """`n_iter_max` as a Python int >= 1, or a ValueError naming it."""
    if as_int(n_iter_max) is None or n_iter_max < 1:
        raise ValueError(f"{what} must be an int >= 1, got {n_iter_max!r}")
    return int(n_iter_max)


def _check_seed(seed: Any) -> int | None:
    """`seed` as a Python int in [0, 2**32) (or None: tensorly's unseeded state)."""
    if seed is None:
        return None
    if as_int(seed) is None or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32) or None, got {seed!r}")
    return int(seed)


def _check_spec(spec: Any, name: str) -> ConvSpec:
    if spec is None:
        return ConvSpec()
    if not isinstance(spec, ConvSpec):
        raise ValueError(f"{name}: spec must be a ConvSpec, got {spec!r}")
    return spec


def _check_modes(modes: Any, what: str, name: str) -> tuple[int, ...]:
    """TT modes as a tuple of Python ints (NumPy integers accepted), or a ValueError."""
    if (not isinstance(modes, (tuple, list, np.ndarray)) or np.ndim(modes) != 1
            or not all(as_int(m) is not None for m in modes)):
        raise ValueError(f"{name}: TT {what} must be a sequence of ints, got {modes!r}")
    return tuple(int(m) for m in modes)


_SVD_METHODS = {"truncated": "truncated_svd", "symeig": "symeig_svd", "randomized": "randomized_svd"}


def _svd_method(svd: str) -> str:
    """tensorly's name of an SVD algorithm, or ValueError."""
    if svd not in _SVD_METHODS:
        raise ValueError(f"svd={svd!r} is not one of {tuple(_SVD_METHODS)}")
    return _SVD_METHODS[svd]


def _svd_factors(model: SVDModel, ranks: tuple[int, ...], *, svd: str = "truncated", seed: int = 0):
    with _host.tensorly_numpy() as tl:
        u, s, v = tl.tenalg.svd_interface(
            model.kernel, n_eigenvecs=ranks[0], method=_svd_method(svd), random_state=seed
        )
    root = np.sqrt(s)
    return {"u": u * root, "v": root[:, None] * v}


def _tt_factors(model: TTModel, ranks: tuple[int, ...], *, svd: str = "truncated", seed: int = 0):
    tensor = model.kernel.reshape(*model.in_modes, *model.out_modes)
    with _host.tensorly_numpy():
        from tensorly.decomposition import tensor_train_matrix

        cores = tensor_train_matrix(
            tensor, rank=[1, *ranks, 1], svd=_svd_method(svd), random_state=seed
        ).factors
    return {"cores": tuple(np.asarray(c) for c in cores)}


def _tucker2_factors(
    model: Tucker2Model, ranks: tuple[int, ...], *, n_iter_max: int, seed: int, svd: str = "truncated"
) -> dict[str, Any]:
    modes = [m for m, r, full in zip((2, 3), ranks, model.full) if r < full]
    factors: dict[str, Any] = {"u_in": None, "u_out": None}
    if not modes:
        return {"core": model.kernel, **factors}
    with _host.tensorly_numpy():
        from tensorly.decomposition import partial_tucker

        (core, mats), _ = partial_tucker(
            model.kernel, rank=[ranks[m - 2] for m in modes], modes=modes, init="svd",
            n_iter_max=n_iter_max, tol=1e-7, svd=_svd_method(svd), random_state=seed,
        )
    for mode, mat in zip(modes, mats):
        if mode == 2:
            factors["u_in"] = np.asarray(mat)
        else:
            factors["u_out"] = np.asarray(mat).T
    return {"core": np.asarray(core), **factors}


def _cp_factors(
    model: CPModel, ranks: tuple[int, ...], *, n_iter_max: int, seed: int, svd: str = "truncated"
) -> dict[str, Any]:
    with _host.tensorly_numpy():
        from tensorly.decomposition import parafac

        weights, (a_h, a_w, a_in, a_out) = parafac(
            model.kernel, rank=ranks[0], init="svd", svd=_svd_method(svd), n_iter_max=n_iter_max,
            tol=1e-8, random_state=seed,
        )
    cols = [np.asarray(a) for a in (a_h, a_w, a_in, np.asarray(a_out) * np.asarray(weights))]
    # Give the four columns of each rank-1 term the same norm: better conditioned to fine-tune.
    norms = np.stack([np.linalg.norm(c, axis=0) for c in cols])
    scale = np.prod(np.maximum(norms, 1e-300), axis=0) ** 0.25
    cols = [c * np.where(n > 0, scale / np.maximum(n, 1e-300), 1.0) for c, n in zip(cols, norms)]
    a_h, a_w, a_in, a_out = cols
    return {"a_in": a_in, "a_h": a_h, "a_w": a_w, "a_out": a_out.T}


# Which kernel axis each factor axis comes from (HWIO / (in, out)); None = a rank axis.
_AXES = {
    "u": (0, None), "v": (None, 1),
    "u_in": (2, None), "core": (0, 1, None, None), "u_out": (None, 3),
    "a_in": (2, None), "a_h": (0, None), "a_w": (1, None), "a_out": (None, 3),
}


def _place_factors(factors: dict[str, Any], kernel: Any) -> dict[str, Any]:
    """Host factors as arrays in the kernel's dtype, with the sharding of the axes they keep."""
    out: dict[str, Any] = {}
    for key, value in factors.items():
        if value is None:
            out[key] = None
        elif key == "cores":
            out[key] = tuple(_host.place_like(c, kernel, (None,) * 4) for c in value)
        else:
            axes = _AXES[key]
            if key == "core" and factors.get("u_in") is None:
                axes = axes[:2] + (2,) + axes[3:]
            if key == "core" and factors.get("u_out") is None:
                axes = axes[:3] + (3,)
            out[key] = _host.place_like(value, kernel, axes)
    return out


def decompose_svd(
    kernel: Any, ranks: RankRule, *, svd: str = "truncated", seed: int = 0, name: str = "kernel"
) -> SVDKernel:
    """Truncated SVD of a Dense kernel `(in, out)` (Denton et al. 2014).

    Args:
      kernel: the kernel (any array; gathered to the host).
      ranks: an int, `FixedRank`, `RankRatio`, `ParamRatio`, `Energy` or `VBMF`.
      svd: `"truncated"` (LAPACK SVD, exact), `"symeig"` (eigenvectors of the Gram matrix:
        faster on large kernels, exact for the leading components) or `"randomized"` (seeded
        randomized SVD: fastest at low rank, approximate).
      seed: seed of the randomized SVD.
      name: the path used in messages.

    Returns:
      An `SVDKernel` with `u = U sqrt(S)` and `v = sqrt(S) V^T`.

    Raises:
      ValueError: naming `name`, for a non-2-D or non-finite kernel or an invalid rank; and for
        an unknown `svd` or a `seed` that is not an int in [0, 2**32) or None.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = decompose_svd(jnp.eye(8), 3)
        >>> leaf.rank, leaf.shape
        ((3,), (8, 8))
    """
    seed = _check_seed(seed)
    _svd_method(svd)
    host = _host.to_host(kernel, name)
    _check_ndim(host, 2, "SVD", name)
    model = SVDModel(host)
    ranks_ = select_ranks(model, _layer_rule(ranks, name), name)
    _warn_if_larger(model, ranks_, name)
    return SVDKernel(**_place_factors(_svd_factors(model, ranks_, svd=svd, seed=seed), kernel))


def decompose_tt(
    kernel: Any,
    ranks: RankRule,
    *,
    in_modes: Sequence[int] | None = None,
    out_modes: Sequence[int] | None = None,
    order: int = 3,
    svd: str = "truncated",
    seed: int = 0,
    name: str = "kernel",
) -> TTKernel:
    """Tensor-train matrix of a Dense kernel (Novikov et al. 2015), for large layers.

    Args:
      kernel: `(in, out)`.
      ranks: an int (every bond), a tuple (one per bond), or a rank rule.
      in_modes: factors of `in` (default: `balanced_modes(in, order)`).
      out_modes: factors of `out` (default: `balanced_modes(out, order)`).
      order: number of cores when the modes are not given (an int >= 2).
      svd: the SVD algorithm of the TT-SVD sweeps (see `decompose_svd`).
      seed: seed of the randomized SVD.
      name: the path used in messages.

    Returns:
      A `TTKernel`.

    Raises:
      ValueError: naming `name`, for bad modes or `order` (ints; `order` >= 2), a non-2-D kernel,
        an invalid rank, an unknown `svd` or a bad `seed`.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = decompose_tt(jnp.ones((16, 16)), 2, order=2)
        >>> leaf.in_modes, leaf.rank
        ((4, 4), (2,))
    """
    seed = _check_seed(seed)
    _svd_method(svd)
    if as_int(order) is None or (order < 2 and (in_modes is None or out_modes is None)):
        raise ValueError(f"{name}: TT order must be an int >= 2, got {order!r}")
    host = _host.to_host(kernel, name)
    _check_ndim(host, 2, "TT", name)
    in_modes = (_check_modes(in_modes, "in_modes", name) if in_modes is not None
                else balanced_modes(host.shape[0], int(order)))
    out_modes = (_check_modes(out_modes, "out_modes", name) if out_modes is not None
                 else balanced_modes(host.shape[1], int(order)))
    if math.prod(in_modes) != host.shape[0] or math.prod(out_modes) != host.shape[1]:
        raise ValueError(
            f"{name}: TT modes {in_modes} x {out_modes} do not factor the kernel shape {host.shape}"
        )
    if len(in_modes) != len(out_modes) or len(in_modes) < 2 or min(in_modes + out_modes) < 1:
        raise ValueError(
            f"{name}: TT needs as many (>= 2) positive input as output modes, got {in_modes}, {out_modes}"
        )
    model = TTModel(host, in_modes, out_modes)
    ranks_ = select_ranks(model, _layer_rule(ranks, name), name)
    _warn_if_larger(model, ranks_, name)
    factors = _place_factors(_tt_factors(model, ranks_, svd=svd, seed=seed), kernel)
    return TTKernel(factors["cores"], in_modes=in_modes, out_modes=out_modes)


def decompose_tucker2(
    kernel: Any,
    ranks: RankRule,
    *,
    spec: ConvSpec | None = None,
    n_iter_max: int = 100,
    seed: int = 0,
    svd: str = "truncated",
    name: str = "kernel",
) -> Tucker2Kernel:
    """Tucker-2 of a Conv kernel `(kh, kw, cin, cout)` on its channel modes (Kim et al. 2016).

    tensorly's `partial_tucker` (HOOI from an SVD start) on the input- and output-channel modes.
    A mode whose rank equals its dimension is not factorized (its factor would be an orthogonal
    matrix, folded into the core), so a first layer with few input channels becomes Tucker-1.

    Args:
      kernel: HWIO kernel.
      ranks: an int (both modes), `(r_in, r_out)`, or a rank rule.
      spec: the convolution's stride, padding and dilation (default: stride 1, SAME).
      n_iter_max: HOOI iterations (an int >= 1).
      seed: seed for tensorly's random completion of factors.
      svd: the SVD algorithm of the initialisation (see `decompose_svd`).
      name: the path used in messages.

    Returns:
      A `Tucker2Kernel`.

    Raises:
      ValueError: naming `name`, for a non-4-D kernel, an invalid rank, a `spec` that is not a
        `ConvSpec`, `n_iter_max` that is not an int >= 1, or a bad `seed` or `svd`.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = decompose_tucker2(jnp.ones((3, 3, 8, 8)), (2, 4))
        >>> leaf.rank, leaf.shape
        ((2, 4), (3, 3, 8, 8))
    """
    n_iter_max, seed = _check_iters(n_iter_max), _check_seed(seed)
    spec = _check_spec(spec, name)
    _svd_method(svd)
    host = _host.to_host(kernel, name)
    _check_ndim(host, 4, "Tucker-2", name)
    model = Tucker2Model(host)
    ranks_ = select_ranks(model, _layer_rule(ranks, name), name)
    _warn_if_larger(model, ranks_, name)
    factors = _place_factors(_tucker2_factors(model, ranks_, n_iter_max=n_iter_max, seed=seed, svd=svd), kernel)
    return Tucker2Kernel(**factors, spec=spec)


def decompose_cp(
    kernel: Any,
    ranks: RankRule,
    *,
    spec: ConvSpec | None = None,
    n_iter_max: int = 200,
    seed: int = 0,
    svd: str = "truncated",
    name: str = "kernel",
) -> CPKernel:
    """CP decomposition of a Conv kernel `(kh, kw, cin, cout)` (Lebedev et al. 2015).

    tensorly's `parafac` (ALS from an SVD start); the CP weights are folded into the factors,
    balanced so the four columns of each term have equal norms.

    Args:
      kernel: HWIO kernel.
      ranks: an int, `FixedRank` or `ParamRatio` (CP has no singular values for the others).
      spec: the convolution's stride, padding and dilation (default: stride 1, SAME).
      n_iter_max: ALS iterations (an int >= 1).
      seed: seed for tensorly's random completion of the initial factors.
      svd: the SVD algorithm of the initialisation (see `decompose_svd`).
      name: the path used in messages.

    Returns:
      A `CPKernel`.

    Raises:
      ValueError: naming `name`, for a non-4-D kernel, an invalid rank, a `spec` that is not a
        `ConvSpec`, `n_iter_max` that is not an int >= 1, or a bad `seed` or `svd`.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = decompose_cp(jnp.ones((3, 3, 4, 4)), 1)
        >>> bool(jnp.allclose(leaf.materialize(), 1.0, atol=1e-5))
        True
    """
    n_iter_max, seed = _check_iters(n_iter_max), _check_seed(seed)
    spec = _check_spec(spec, name)
    _svd_method(svd)
    host = _host.to_host(kernel, name)
    _check_ndim(host, 4, "CP", name)
    model = CPModel(host)
    ranks_ = select_ranks(model, _layer_rule(ranks, name), name)
    _warn_if_larger(model, ranks_, name)
    factors = _place_factors(_cp_factors(model, ranks_, n_iter_max=n_iter_max, seed=seed, svd=svd), kernel)
    return CPKernel(**factors, spec=spec)
