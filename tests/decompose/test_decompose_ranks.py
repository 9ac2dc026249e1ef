"""Rank rules, EVBMF and the budget allocator."""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcomp
from jaxcomp.decompose import (
    VBMF,
    Energy,
    FixedRank,
    FlopBudget,
    ParamBudget,
    ParamRatio,
    RankRatio,
    allocate_ranks,
    decompose_cp,
    decompose_svd,
    decompose_tt,
    decompose_tucker2,
    energy_rank,
    vbmf,
    vbmf_spectrum,
)
from jaxcomp.decompose.structure import SVDModel, Tucker2Model
from jaxcomp.decompose.vbmf import _tau_bar

RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(3, 3, 8, 10))
DENSE = RNG.normal(size=(20, 12))


def planted(rows, cols, rank, noise, rng, strength=8.0):
    """A rank-`rank` signal well above the noise edge, plus Gaussian noise of variance noise**2."""
    u = np.linalg.qr(rng.normal(size=(rows, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(cols, rank)))[0]
    edge = noise * (math.sqrt(rows) + math.sqrt(cols))
    signal = (u * (strength * edge * np.linspace(1.0, 2.0, rank))) @ v.T
    return signal + noise * rng.normal(size=(rows, cols))


@pytest.mark.parametrize(
    "rule", [lambda: FixedRank(0), lambda: FixedRank((2, -1)), lambda: FixedRank(True),
             lambda: FixedRank(2.5), lambda: FixedRank(None), lambda: FixedRank("2"),
             lambda: RankRatio(0.0), lambda: ParamRatio(1.5), lambda: Energy(0.0),
             lambda: VBMF(sigma2=-1.0), lambda: ParamBudget(0), lambda: FlopBudget(10, {"a": 0}),
             lambda: VBMF(sigma2="1"), lambda: ParamBudget(True)],
)
def test_invalid_rules_raise_at_construction(rule):
    """Rank 0, negative ranks, bools, fractions outside (0, 1], sigma2 <= 0 and empty budgets raise."""
    with pytest.raises(ValueError):
        rule()


def test_fractions_take_numpy_and_jax_scalars_and_reject_other_types():
    assert Energy(np.float32(0.5)).threshold == 0.5 and RankRatio(jnp.float32(0.25)).ratio == 0.25
    assert ParamRatio(1).ratio == 1.0
    for bad in (True, "0.5", None, np.array([0.5])):
        with pytest.raises(ValueError, match="Energy.threshold must be a number in"):
            Energy(bad)


def test_rank_above_the_dimension_is_clipped_with_a_warning():
    """FixedRank above a mode's dimension is clipped to it, with a warning naming the path."""
    with pytest.warns(UserWarning, match="conv/kernel: Tucker-2 rank 50 of mode 1 clipped to 10"):
        leaf = decompose_tucker2(CONV, (4, 50), name="conv/kernel")
    assert leaf.rank == (4, 10)


def test_rank_above_the_dimension_raises_without_clipping():
    """With clip=False the same request raises ValueError naming the path and the value."""
    with pytest.raises(ValueError, match=r"dense/kernel: rank 13 of mode 0 exceeds its full rank 12"):
        decompose_svd(DENSE, FixedRank(13, clip=False), name="dense/kernel")


def test_wrong_number_of_ranks_raises():
    """Tucker-2 takes two ranks; three raise ValueError naming the path."""
    with pytest.raises(ValueError, match="k: Tucker-2 takes 2 rank"):
        decompose_tucker2(CONV, (2, 3, 4), name="k")


def test_energy_rank_keeps_the_threshold_of_the_squared_norm():
    """energy_rank is the smallest r whose leading singular values hold the threshold of s**2."""
    s = np.array([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert [energy_rank(s, t) for t in (0.5, 0.72, 0.73, 0.95, 1.0)] == [1, 1, 2, 3, 4]
    assert energy_rank(list(s), np.float32(0.5)) == 1


@pytest.mark.parametrize(
    "spectrum, threshold, match",
    [
        (np.array([3.0, 1.0]), 0.0, r"threshold must be a number in \(0, 1\], got 0"),
        (np.array([3.0, 1.0]), 1.5, "threshold .* got 1.5"),
        (np.array([3.0, 1.0]), None, "threshold"),
        (np.array([]), 0.9, "non-empty 1-D"),
        (None, 0.9, "non-empty 1-D"),
        (np.ones((2, 2)), 0.9, "non-empty 1-D"),
        (np.array([np.nan, 1.0]), 0.9, "finite values >= 0"),
        (np.array([-3.0, 1.0]), 0.9, "finite values >= 0"),
    ],
)
def test_energy_rank_rejects_bad_spectra_and_thresholds(spectrum, threshold, match):
    """Regression: an empty spectrum raised IndexError; NaN, negative values, None or a threshold
    outside (0, 1] gave a rank silently."""
    with pytest.raises(ValueError, match=match):
        energy_rank(spectrum, threshold)


@settings(max_examples=20, deadline=None)
@given(st.floats(0.05, 1.0))
def test_energy_rule_on_svd_meets_the_threshold(threshold):
    """The Energy rule's SVD keeps at least `threshold` of the energy, and one rank less would not."""
    leaf = decompose_svd(DENSE, Energy(threshold))
    s2 = np.linalg.svd(DENSE, compute_uv=False) ** 2
    r = leaf.rank[0]
    assert s2[:r].sum() >= threshold * s2.sum() * (1 - 1e-9)
    assert r == 1 or s2[: r - 1].sum() < threshold * s2.sum()


def test_rank_ratio_and_param_ratio():
    """RankRatio keeps ceil(ratio * dimension) per mode; ParamRatio stays within its fraction."""
    assert decompose_tucker2(CONV, RankRatio(0.5)).rank == (4, 5)
    for method, kernel in [(decompose_tucker2, CONV), (decompose_svd, DENSE), (decompose_cp, CONV)]:
        leaf = method(kernel, ParamRatio(0.3))
        assert leaf.num_params <= 0.3 * kernel.size
    tt = decompose_tt(RNG.normal(size=(64, 64)), ParamRatio(0.25), order=3)
    assert tt.num_params <= 0.25 * 64 * 64


def test_tau_bar_is_the_zero_of_the_evb_equation():
    """tau solves log(t + 1) + alpha log(t / alpha + 1) = t; it is 2.5129 at alpha = 1."""
    assert _tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.1, 0.5, 0.9):
        t = _tau_bar(alpha)
        assert math.log1p(t) + alpha * math.log1p(t / alpha) == pytest.approx(t, abs=1e-10)


@settings(max_examples=20, deadline=None)
@given(
    st.integers(12, 30), st.integers(12, 60), st.integers(1, 5), st.floats(0.01, 1.0), st.integers(0, 2**31)
)
def test_vbmf_recovers_a_planted_rank_and_noise_level(rows, cols, rank, noise, seed):
    """EVBMF finds the rank of a strong low-rank signal in Gaussian noise, and its variance, when
    the rank is well below the EVB limit L / (1 + alpha) (Nakajima et al.'s recovery condition)."""
    small, large = sorted((rows, cols))
    rank = min(rank, int(small / (1 + small / large) / 2))
    result = vbmf(planted(rows, cols, rank, noise, np.random.default_rng(seed)))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(noise**2, rel=0.6)


def test_vbmf_on_pure_noise_and_known_variance():
    """Pure noise has EVBMF rank 0; with the true variance given, the threshold is sqrt(M s2 x_bar)."""
    noise = RNG.normal(size=(40, 80))
    assert vbmf(noise).rank == 0
    s = np.linalg.svd(noise, compute_uv=False)
    known = vbmf_spectrum(s, (40, 80), sigma2=1.0)
    alpha, tau = 0.5, _tau_bar(0.5)
    assert known.threshold == pytest.approx(math.sqrt(80 * (1 + tau) * (1 + alpha / tau)))
    assert vbmf(np.zeros((4, 5))).rank == 0


def test_vbmf_ranks_for_tucker2_use_both_channel_unfoldings():
    """VBMF on a kernel with planted channel ranks (2 in, 3 out) finds them; a pure-noise mode is
    kept at rank 1 with a warning."""
    rng = np.random.default_rng(1)
    core = rng.normal(size=(3, 3, 2, 3))
    u_in, u_out = np.linalg.qr(rng.normal(size=(16, 2)))[0], np.linalg.qr(rng.normal(size=(24, 3)))[0]
    kernel = np.einsum("hwab,ia,ob->hwio", core, u_in, u_out) * 10 + 0.01 * rng.normal(size=(3, 3, 16, 24))
    assert decompose_tucker2(kernel, VBMF()).rank == (2, 3)
    with pytest.warns(UserWarning, match="VBMF finds no component"):
        assert decompose_svd(rng.normal(size=(30, 40)), VBMF()).rank == (1,)


def test_cp_rejects_spectrum_rules_and_per_kernel_functions_reject_budgets():
    """CP has no singular values (Energy/VBMF/RankRatio raise); budgets need decompose_tree."""
    for rule in (Energy(0.9), VBMF(), RankRatio(0.5)):
        with pytest.raises(ValueError, match="c/kernel"):
            decompose_cp(CONV, rule, name="c/kernel")
    with pytest.raises(ValueError, match="decompose_tree"):
        decompose_svd(DENSE, ParamBudget(100))


def test_param_budget_is_met_and_spent_where_error_is_cheapest():
    """The allocation fits the budget; a layer with a low-rank kernel is cut more than a noisy one."""
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(64, 4)) @ rng.normal(size=(4, 64)) + 0.01 * rng.normal(size=(64, 64))
    noisy = rng.normal(size=(64, 64))
    models = {"low": SVDModel(low_rank), "noisy": SVDModel(noisy)}
    ranks = allocate_ranks(models, ParamBudget(total=4096))
    used = sum(models[p].params(r) if r else models[p].dense_params for p, r in ranks.items())
    assert used <= 4096
    assert ranks["low"] is not None and ranks["low"][0] <= 4
    assert ranks["noisy"] is None or ranks["noisy"][0] > ranks["low"][0]


def test_flop_budget_counts_positions_and_strides():
    """A FlopBudget is met with each layer's FLOPs = positions x FLOPs per position of its ranks."""
    rng = np.random.default_rng(3)
    models = {"a": Tucker2Model(rng.normal(size=(3, 3, 16, 16))), "b": SVDModel(rng.normal(size=(32, 32)))}
    dense = {"a": 2 * 100 * 9 * 256, "b": 2 * 8 * 1024}
    ranks = allocate_ranks(models, FlopBudget(total=sum(dense.values()) // 3, dense_flops=dense),
                           strides={"a": (2, 2)})
    positions = {"a": 100, "b": 8}
    used = sum(
        positions[p] * models[p].flops_per_position(r, (2, 2) if p == "a" else (1, 1)) if r else dense[p]
        for p, r in ranks.items()
    )
    assert used <= sum(dense.values()) // 3


def test_flop_budget_takes_a_flop_count_or_a_mapping_and_names_anything_else():
    """dense_flops may be count_flops' FlopCount or a mapping; other values are a ValueError."""
    params = {"Dense_0": {"kernel": jnp.ones((16, 8))}}
    count = jaxcomp.count_flops(lambda p, x: x @ p["Dense_0"]["kernel"], params, jnp.ones((4, 16)))
    budget = FlopBudget(count.total // 4, dense_flops=count)
    assert budget.dense_flops == dict(count.per_path) == {"Dense_0/kernel": 2 * 4 * 16 * 8}
    assert FlopBudget(10, dense_flops=count.per_path).dense_flops == budget.dense_flops
    for bad in (count.total, [("Dense_0/kernel", 10)], {"Dense_0/kernel": "10"}):
        with pytest.raises(ValueError, match="FlopBudget.dense_flops"):
            FlopBudget(10, dense_flops=bad)


def test_a_flop_budget_over_a_tensor_train_whose_bonds_pay_off_only_together():
    """Lowering one TT bond alone saves nothing on a small Dense kernel; the allocator scales
    all bonds down together rather than calling a reachable budget out of reach."""
    from jaxcomp.decompose.structure import TTModel

    kernel = np.random.default_rng(1).normal(size=(64, 48))
    model = TTModel(kernel, (4, 4, 4), (4, 4, 3))
    dense = {"d": 2 * 3 * 64 * 48}
    for total in (dense["d"] * 6 // 10, dense["d"] * 3 // 10):
        ranks = allocate_ranks({"d": model}, FlopBudget(total=total, dense_flops=dense))["d"]
        assert ranks is not None
        assert 3 * model.flops_per_position(ranks, (1, 1)) <= total
    with pytest.raises(ValueError, match=f"need at least {3 * model.flops_per_position((1, 1), (1, 1))} "):
        allocate_ranks({"d": model}, FlopBudget(total=10, dense_flops=dense))


def test_flop_budget_input_sizes_are_validated():
    """input_hw maps kernel paths to (H, W) pairs of positive ints and wins over the positions
    a FlopCount recorded; conv_positions takes (input, output) pairs."""
    assert FlopBudget(10, {"c": 5}, input_hw={"c": [8, np.int64(6)]}).input_hw == {"c": (8, 6)}
    for bad in ({"c": (8,)}, {"c": (0, 4)}, {"c": 8}, {"c": (8.0, 4)}, [("c", (8, 8))]):
        with pytest.raises(ValueError, match="FlopBudget.input_hw"):
            FlopBudget(10, {"c": 5}, input_hw=bad)
        with pytest.raises(ValueError, match="FlopBudget.conv_positions"):
            FlopBudget(10, {"c": 5}, conv_positions=bad)
    # A size given by hand takes precedence over the positions a FlopCount recorded.
    count = jaxcomp.FlopCount(total=5, per_path={"c": 5}, conv_positions={"c": (64, 16)})
    budget = FlopBudget(10, count, input_hw={"c": (8, 8)})
    assert budget.conv_positions == {} and budget.input_hw == {"c": (8, 8)}
    assert FlopBudget(10, count).conv_positions == {"c": (64, 16)}
    with pytest.raises(ValueError, match="given both input_hw and conv_positions"):
        FlopBudget(10, {"c": 5}, input_hw={"c": (8, 8)}, conv_positions={"c": (64, 16)})


def test_unreachable_budgets_and_missing_flops_raise():
    """A budget below rank 1 everywhere, CP in a budget, or a path missing from dense_flops raise."""
    models = {"d": SVDModel(DENSE)}
    with pytest.raises(ValueError, match="out of reach"):
        allocate_ranks(models, ParamBudget(total=5))
    with pytest.raises(ValueError, match="d: FlopBudget.dense_flops has no entry"):
        allocate_ranks(models, FlopBudget(total=5, dense_flops={"x": 10}))
    from jaxcomp.decompose.structure import CPModel

    with pytest.raises(ValueError, match="c: a ParamBudget needs singular values"):
        allocate_ranks({"c": CPModel(CONV)}, ParamBudget(total=100))


def test_allocate_ranks_names_a_params_tree_passed_for_rank_models():
    """A params dict instead of rank models (regression: AttributeError 'spectra') or a rank
    instead of a budget is a ValueError pointing at decompose_tree."""
    with pytest.raises(ValueError, match=r"models\['d'\] must be a rank model .*decompose_tree"):
        allocate_ranks({"d": {"kernel": DENSE}}, ParamBudget(total=30))
    with pytest.raises(ValueError, match="models must be a non-empty mapping"):
        allocate_ranks(None, ParamBudget(total=30))
    with pytest.raises(ValueError, match="budget must be a ParamBudget or FlopBudget, got 2"):
        allocate_ranks({"d": SVDModel(DENSE)}, 2)


def test_warning_when_factors_are_not_smaller():
    """Ranks whose factors hold at least the dense kernel's parameters warn (they still work)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decompose_svd(DENSE, 12)
    assert any("not fewer than the dense kernel" in str(w.message) for w in caught)
