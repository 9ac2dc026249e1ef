"""Budgeted rank allocation across layers: a total parameter or FLOP count, spent by sensitivity.

Every layer starts dense. Its reconstruction error at ranks `r` is estimated from singular values,
without decomposing: the relative squared energy outside the kept components, summed over the
unfoldings (exact for SVD; the HOSVD bound for Tucker-2; the TT-SVD bound for tensor trains).
The allocator then repeatedly applies the single rank reduction, over all layers and modes, with
the smallest increase of error per parameter (or FLOP) saved, until the total fits the budget.
A layer whose factorization would not be smaller than its dense kernel stays dense, so the first
move of a layer jumps straight to the largest ranks that save something.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence

from jaxcomp.decompose.ranks import FlopBudget, ParamBudget, RankModel, tail_energy

__all__ = ["allocate_ranks"]


class _Layer:
    def __init__(self, name: str, model: RankModel, budget, strides: Sequence[float]):
        self.name, self.model, self.strides = name, model, tuple(strides)
        try:
            self.tails = [tail_energy(s) for s, _ in model.spectra()]
        except ValueError as e:
            raise ValueError(
                f"{name}: a {type(budget).__name__} needs singular values to rank layers by "
                f"sensitivity, which {model.method} does not have; use Tucker-2, SVD or TT, or "
                "fixed ranks"
            ) from e
        if isinstance(budget, FlopBudget):
            if name not in budget.dense_flops:
                raise ValueError(
                    f"{name}: FlopBudget.dense_flops has no entry for this kernel; pass "
                    "jaxcomp.count_flops(...).per_path of the dense model"
                )
            self.dense_cost = float(budget.dense_flops[name])
            self.positions = self.dense_cost / model.dense_flops_per_position()
        else:
            self.dense_cost = float(model.dense_params)
            self.positions = 0.0
        self.flops = isinstance(budget, FlopBudget)
        self.ranks = tuple(model.full)
        self.version = 0

    def cost(self, ranks: Sequence[int]) -> float:
        if self.flops:
            factored = self.positions * self.model.flops_per_position(ranks, self.strides)
        else:
            factored = float(self.model.params(ranks))
        return min(factored, self.dense_cost)

    def error(self, ranks: Sequence[int]) -> float:
        if self.cost(ranks) >= self.dense_cost:
            return 0.0
        return float(sum(tail[r] for tail, r in zip(self.tails, ranks)))

    @property
    def dense(self) -> bool:
        return self.cost(self.ranks) >= self.dense_cost

    def best_move(self) -> tuple[float, float, tuple[int, ...]] | None:
        """(error increase per unit saved, -saving, new ranks) of the best single-mode reduction.

        A dense layer where no single mode saves anything (a tensor train whose bonds pay off
        only together) scales all its ranks down at once instead, as far as needed to save."""
        here_cost, here_err = self.cost(self.ranks), self.error(self.ranks)
        best = None

        def consider(ranks: tuple[int, ...]) -> bool:
            nonlocal best
            saving = here_cost - self.cost(ranks)
            if saving <= 0:
                return False
            move = ((self.error(ranks) - here_err) / saving, -saving, ranks)
            if best is None or move[:2] < best[:2]:
                best = move
            return True

        for mode, rank in enumerate(self.ranks):
            for new_rank in range(rank - 1, 0, -1):
                if consider(self.ranks[:mode] + (new_rank,) + self.ranks[mode + 1 :]):
                    break
        if best is None and self.dense:
            top = max(self.ranks)
            for k in range(top - 1, 0, -1):
                if consider(tuple(max(1, -(-r * k // top)) for r in self.ranks)):
                    break
        return best


def allocate_ranks(
    models: Mapping[str, RankModel],
    budget: ParamBudget | FlopBudget,
    strides: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...] | None]:
    """Ranks per layer that fit `budget`, or None for a layer left dense.

    Args:
      models: the rank model of each selected kernel, by path.
      budget: a `ParamBudget` or `FlopBudget` over these kernels together.
      strides: each convolution's strides (for the FLOPs of Tucker-2's first 1x1 convolution).

    Returns:
      ``{path: ranks or None}``.

    Raises:
      ValueError: naming the path, for a method without singular values (CP) or a missing FLOP
        count; when even rank 1 everywhere exceeds the budget; and when `models` is not a
        non-empty mapping to rank models (e.g. a params tree) or `budget` is not a budget.

    Example:
        >>> import numpy as np
        >>> from jaxcomp.decompose.structure import SVDModel
        >>> rng = np.random.default_rng(0)
        >>> low_rank = rng.normal(size=(32, 2)) @ rng.normal(size=(2, 32))
        >>> models = {"a": SVDModel(low_rank), "b": SVDModel(rng.normal(size=(32, 32)))}
        >>> ranks = allocate_ranks(models, ParamBudget(total=1024))
        >>> ranks["a"], ranks["b"] is None or ranks["b"][0] > 2
        ((2,), True)
    """
    if not isinstance(budget, (ParamBudget, FlopBudget)):
        raise ValueError(
            f"allocate_ranks: budget must be a ParamBudget or FlopBudget, got {budget!r}"
        )
    if not isinstance(models, Mapping) or not models:
        raise ValueError(
            "allocate_ranks: models must be a non-empty mapping from kernel paths to rank models "
            f"(SVDModel, Tucker2Model, TTModel), got {type(models).__name__}; to decompose a "
            "params tree under a budget use decompose_tree(params, budget)"
        )
    for name, model in models.items():
        if not isinstance(model, RankModel):
            raise ValueError(
                f"allocate_ranks: models[{name!r}] must be a rank model (SVDModel, Tucker2Model, "
                f"TTModel), got {type(model).__name__}; to decompose a params tree under a "
                "budget use decompose_tree(params, budget)"
            )
    if strides is not None and not isinstance(strides, Mapping):
        raise ValueError(
            f"allocate_ranks: strides must map kernel paths to strides, got {strides!r}"
        )
    strides = strides or {}
    layers = {name: _Layer(name, m, budget, strides.get(name, (1, 1))) for name, m in models.items()}
    total = sum(layer.cost(layer.ranks) for layer in layers.values())
    counter = itertools.count()
    heap: list = []

    def push(layer: _Layer) -> None:
        move = layer.best_move()
        if move is not None:
            heapq.heappush(heap, (move[0], move[1], next(counter), layer.name, layer.version, move[2]))

    for layer in layers.values():
        push(layer)
    while total > budget.total and heap:
        _, _, _, name, version, ranks = heapq.heappop(heap)
        layer = layers[name]
        if version != layer.version:
            continue
        total -= layer.cost(layer.ranks) - layer.cost(ranks)
        layer.ranks, layer.version = ranks, layer.version + 1
        push(layer)
    if total > budget.total:
        floor = sum(layer.cost((1,) * len(layer.ranks)) for layer in layers.values())
        raise ValueError(
            f"{type(budget).__name__}(total={budget.total}) is out of reach: the selected kernels "
            f"({', '.join(layers)}) need at least {int(floor)} at rank 1"
        )
    return {name: None if layer.dense else layer.ranks for name, layer in layers.items()}
