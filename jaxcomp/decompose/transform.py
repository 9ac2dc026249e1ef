"""`decompose_tree`: turn the selected Dense and Conv kernels of a params tree into factorized leaves.

Kernels are recognised by their number of dimensions: 2 is a Dense kernel `(in, out)`, 4 a Conv
kernel HWIO. The result is the same tree with factorized leaves in place of those kernels, so
`model.apply({"params": jaxcomp.materialize(tree)}, x)` runs at once, and the Flax integrations
of `jaxcomp.nn.decompose` run the factor sequences instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxcomp._checks import as_int
from jaxcomp.core import is_compressed
from jaxcomp.decompose import _host
from jaxcomp.decompose.budget import allocate_ranks
from jaxcomp.decompose.factorize import (
    _check_iters,
    _check_seed,
    _cp_factors,
    _place_factors,
    _svd_method,
    _svd_factors,
    _tt_factors,
    _tucker2_factors,
    _warn_if_larger,
)
from jaxcomp.decompose.leaves import (
    CPKernel,
    ConvSpec,
    Factorized,
    SVDKernel,
    TTKernel,
    Tucker2Kernel,
)
from jaxcomp.decompose.ranks import (
    FlopBudget,
    ParamBudget,
    RankRule,
    as_rule,
    clip_ranks,
    select_ranks,
)
from jaxcomp.decompose.structure import CPModel, SVDModel, TTModel, Tucker2Model, balanced_modes
from jaxcomp.tree import Where, key_path_str, leaves_with_paths, map_selected, selected_paths

__all__ = ["METHODS", "decompose_tree", "map_factors"]

METHODS = ("auto", "svd", "tt", "tucker2", "cp")
_NDIM = {"svd": 2, "tt": 2, "tucker2": 4, "cp": 4}
DEFAULT_WHERE = r"(.*/)?kernel"


def _method_for(method: str, ndim: int) -> str | None:
    if method == "auto":
        return {2: "svd", 4: "tucker2"}.get(ndim)
    return method if _NDIM[method] == ndim else None


def _spec_for(conv_specs: Any, path: str) -> ConvSpec:
    if conv_specs is None:
        return ConvSpec()
    if isinstance(conv_specs, ConvSpec):
        return conv_specs
    if not isinstance(conv_specs, Mapping):
        raise ValueError(
            f"conv_specs must be a ConvSpec or a mapping from kernel paths to ConvSpec, got "
            f"{conv_specs!r}"
        )
    spec = conv_specs.get(path, ConvSpec())
    if not isinstance(spec, ConvSpec):
        raise ValueError(f"{path}: conv_specs must map paths to ConvSpec, got {spec!r}")
    return spec


def _model(method: str, host, path: str, tt_order: int):
    if method == "svd":
        return SVDModel(host)
    if method == "tucker2":
        return Tucker2Model(host)
    if method == "cp":
        return CPModel(host)
    n_in, n_out = host.shape
    return TTModel(host, balanced_modes(n_in, tt_order), balanced_modes(n_out, tt_order))


def _leaf(method: str, model, ranks, kernel, spec: ConvSpec, n_iter_max: int | None, seed: int, svd: str):
    if method == "svd":
        return SVDKernel(**_place_factors(_svd_factors(model, ranks, svd=svd, seed=seed), kernel))
    if method == "tt":
        cores = _place_factors(_tt_factors(model, ranks, svd=svd, seed=seed), kernel)["cores"]
        return TTKernel(cores, in_modes=model.in_modes, out_modes=model.out_modes)
    if method == "tucker2":
        factors = _tucker2_factors(model, ranks, n_iter_max=n_iter_max or 100, seed=seed, svd=svd)
        return Tucker2Kernel(**_place_factors(factors, kernel), spec=spec)
    factors = _cp_factors(model, ranks, n_iter_max=n_iter_max or 200, seed=seed, svd=svd)
    return CPKernel(**_place_factors(factors, kernel), spec=spec)


def _positions_ratio(rule: Any, path: str, kernel: Any, spec: ConvSpec,
                     model: Any = None) -> tuple[float, ...]:
    """Input positions per output position along each spatial axis of a convolution: what the
    first 1x1 factor of Tucker-2 or CP pays for (it runs on every input position)."""
    if getattr(kernel, "ndim", 0) != 4 or not isinstance(rule, FlopBudget):
        return spec.strides
    kernel_hw = tuple(kernel.shape[:2])
    if isinstance(model, Tucker2Model) and spec.strided_pointwise(kernel_hw):
        return (1.0, 1.0)  # subsampled before its first stage (`Tucker2Kernel.subsamples_first`)
    positions = rule.conv_positions.get(path)
    if positions is not None:
        # Over all the calls: Tucker-2's first 1x1 pays for the input positions, the rest for
        # the output positions (the product of this pair is what the cost model reads).
        return (positions[0] / positions[1], 1.0)
    input_hw = rule.input_hw.get(path)
    if input_hw is not None:
        out_hw = spec.output_hw(input_hw, kernel_hw)
        if min(out_hw) < 1:
            raise ValueError(f"{path}: FlopBudget.input_hw {input_hw} gives no output position "
                             f"for a {kernel_hw} kernel with {spec.describe()}")
        return tuple(n / o for n, o in zip(input_hw, out_hw))
    # Padding that keeps the output at ceil(input / stride) bounds the ratio by the stride.
    dilated = spec.dilated_kernel(kernel_hw)
    if isinstance(spec.padding, str) and spec.padding != "VALID":
        same = True  # SAME, CIRCULAR, REFLECT: ceil(input / stride) outputs
    else:
        pads = ((0, 0),) * 2 if spec.padding == "VALID" else spec.padding
        same = all(lo + hi >= k - 1 for (lo, hi), k in zip(pads, dilated))
    if same:
        return spec.strides
    raise ValueError(
        f"{path}: a convolution with {spec.describe()} has fewer output positions than input "
        "positions / strides, so the FLOPs of its factors depend on its input size, which the "
        "FlopBudget does not hold: pass dense_flops=jaxcomp.count_flops(...) itself (the "
        "FlopCount records it), or input_hw={path: (H, W)}"
    )


def decompose_tree(
    params: Any,
    ranks: RankRule,
    *,
    where: Where = DEFAULT_WHERE,
    method: str = "auto",
    conv_specs: ConvSpec | Mapping[str, ConvSpec] | None = None,
    tt_order: int = 3,
    n_iter_max: int | None = None,
    seed: int = 0,
    svd: str = "truncated",
) -> Any:
    """Replaces the selected Dense/Conv kernels of `params` by factorized leaves.

    Runs once, outside `jit` (the decompositions run on the host). Leaves that `where` selects
    but that are not 2-D or 4-D arrays, or are already compressed, are left as they are; with an
    explicit `method`, kernels of the other kind are left dense too (`method="tucker2"`
    factorizes the 4-D kernels only). A selected 2-D or 4-D kernel that is not floating point,
    empty, abstract or not finite raises (a `ValueError` naming its path).

    Args:
      params: a params tree (Linen `params` dict, NNX `State`, any pytree).
      ranks: an int, a tuple of ints, a per-layer rule (`FixedRank`, `RankRatio`, `ParamRatio`,
        `Energy`, `VBMF`) applied to each kernel, or a `ParamBudget`/`FlopBudget` shared by all.
      where: which leaves (regex on "/"-joined paths, predicate or bool tree); by default every
        leaf named `kernel`.
      method: `"auto"` (SVD for Dense, Tucker-2 for Conv), `"svd"`, `"tt"`, `"tucker2"`, `"cp"`.
      conv_specs: stride, padding and dilation of each convolution (one `ConvSpec` for all, or a
        mapping from kernel path); stored in the leaves for the standalone apply functions.
        Default: stride 1, SAME. `jaxcomp.nn.decompose` fills it from the model.
      tt_order: number of TT cores (input and output sizes are split into balanced factors).
      n_iter_max: iterations of HOOI (Tucker-2, default 100) or ALS (CP, default 200); an int >= 1.
      seed: seed for tensorly's random completions, so results are deterministic.
      svd: `"truncated"` (exact LAPACK SVD), `"symeig"` (Gram-matrix eigenvectors, faster on large
        kernels) or `"randomized"` (seeded, approximate, fastest at low rank).

    Returns:
      The tree with factorized leaves in place of the selected kernels.

    Raises:
      ValueError: naming the path and value, for an invalid rank or method, a selected kernel
        that is not a finite, non-empty float array, or when `where` selects no kernel that
        `method` applies to; and for a `tt_order` or `n_iter_max` that is not an int (>= 2,
        >= 1), a `seed` that is not an int in [0, 2**32) or None, or `conv_specs` that is not a
        `ConvSpec` or a mapping to them.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
        >>> out = decompose_tree(params, 2)
        >>> type(out["Dense_0"]["kernel"]).__name__, out["Dense_0"]["kernel"].rank
        ('SVDKernel', (2,))
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if as_int(tt_order) is None or tt_order < 2:
        raise ValueError(f"tt_order must be an int >= 2, got {tt_order!r}")
    tt_order = int(tt_order)
    if n_iter_max is not None:
        n_iter_max = _check_iters(n_iter_max)
    seed = _check_seed(seed)
    _svd_method(svd)
    if conv_specs is not None and not isinstance(conv_specs, (ConvSpec, Mapping)):
        _spec_for(conv_specs, "")
    rule = as_rule(ranks)
    chosen = set(selected_paths(params, where))
    targets: dict[str, tuple[str, Any]] = {}
    for path, leaf in leaves_with_paths(params):
        if path not in chosen or is_compressed(leaf) or not hasattr(leaf, "ndim"):
            continue
        kind = _method_for(method, leaf.ndim)
        if kind is not None:
            targets[path] = (kind, leaf)
    if not targets:
        compressed = [p for p, x in leaves_with_paths(params) if p in chosen and is_compressed(x)]
        others = {p: getattr(x, "shape", type(x).__name__) for p, x in leaves_with_paths(params)
                  if p in chosen and not is_compressed(x)}
        if compressed and not others:
            raise ValueError(
                f"where={where!r} selects only kernels that are already compressed, so there is "
                f"nothing left to decompose: {compressed}"
            )
        note = f"; already compressed: {compressed}" if compressed else ""
        odd = [p for p, shape in others.items() if isinstance(shape, tuple) and len(shape) in (3, 5)]
        if odd:
            note += (f"; {odd[:4]} are 3-D or 5-D, which are not decomposed: DenseGeneral "
                     "kernels such as attention projections (in, heads, head_dim), kernels stacked "
                     "by nn.scan/nn.vmap (layer, in, out), 1-D and 3-D convolutions")
        raise ValueError(
            f"where={where!r} with method={method!r} selects no kernel to decompose (2-D Dense or "
            f"4-D Conv kernels); selected: {others}{note}"
        )
    hosts = {path: _host.to_host(leaf, path) for path, (_, leaf) in targets.items()}
    models = {path: _model(kind, hosts[path], path, tt_order) for path, (kind, _) in targets.items()}
    specs = {path: _spec_for(conv_specs, path) for path in targets}
    if isinstance(rule, (ParamBudget, FlopBudget)):
        strides = {path: _positions_ratio(rule, path, targets[path][1], specs[path], models[path])
                   for path in targets}
        allocated = allocate_ranks(models, rule, strides)
        chosen_ranks = {p: clip_ranks(models[p], r, p) for p, r in allocated.items() if r is not None}
    else:
        chosen_ranks = {path: select_ranks(models[path], rule, path) for path in targets}
    if not isinstance(rule, (ParamBudget, FlopBudget)):
        for path, ranks_ in chosen_ranks.items():
            _warn_if_larger(models[path], ranks_, path)
    leaves = {
        path: _leaf(
            targets[path][0], models[path], ranks_, targets[path][1], specs[path], n_iter_max, seed, svd
        )
        for path, ranks_ in chosen_ranks.items()
    }
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: leaves.get(key_path_str(kp), x), params, is_leaf=is_compressed
    )


def map_factors(
    fn: Callable[..., Any], tree: Any, *, where: Where = None, with_path: bool = False
) -> Any:
    """Applies `fn` to every factor array of the factorized leaves of `tree`.

    jaxcomp's `where=` treats a compressed leaf as one leaf at its kernel's path; this reaches
    inside it, so a transform written for arrays (fake quantization, pruning, noise) applies to
    the factors: `"Conv_0/kernel/core"`, `"Conv_0/kernel/u_in"`, `"Dense_0/kernel/cores/1"`.
    (A plain `jax.tree.map` reaches the factors too, without their paths.)

    Args:
      fn: `fn(factor)`, or `fn(path, factor)` with `with_path`; it may return an array or a
        compressed leaf (a quantized factor is materialized when the kernel runs).
      tree: a tree holding factorized leaves.
      where: which factorized leaves, by their kernel path (default: all).
      with_path: pass the factor's "/"-joined path first.

    Returns:
      The tree with the factors replaced.

    Raises:
      ValueError: if `fn` is not callable or `where` selects no factorized leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = decompose_tree({"Dense_0": {"kernel": jnp.ones((8, 4))}}, 2)
        >>> halved = map_factors(lambda f: f / 2, tree)
        >>> float(halved["Dense_0"]["kernel"].materialize()[0, 0])
        0.25
    """
    if not callable(fn):
        raise ValueError(f"map_factors: fn must be callable, got {fn!r}")

    def on_leaf(path: str, leaf: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: fn(f"{path}/{key_path_str(kp)}", x) if with_path else fn(x),
            leaf,
            is_leaf=lambda x: x is not leaf and is_compressed(x),
        )

    def factorized(path: str, leaf: Any) -> bool:
        return isinstance(leaf, Factorized)

    chosen = set(selected_paths(tree, where)) & set(selected_paths(tree, factorized, allow_empty=True))
    if not chosen:
        raise ValueError(f"where={where!r} selects no factorized leaf")
    return map_selected(on_leaf, tree, where=lambda p, x: p in chosen, with_path=True)
