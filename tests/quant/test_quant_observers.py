"""Observers (static ranges kept as array state) and calibrate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import (
    AbsMaxObserver,
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantSpec,
    calibrate,
    fake_quant,
)

BATCHES = [jnp.array([[0.5, -2.0], [1.0, 0.25]]), jnp.array([[3.0, -0.5], [0.0, 1.0]])]


def _run(observer, spec, batches=BATCHES):
    state = observer.init(batches[0].shape, spec)
    update = jax.jit(lambda s, x: observer.update(s, x, spec))
    for x in batches:
        state = update(state, x)
    return state


def test_absmax_and_minmax_keep_running_extremes():
    """AbsMax keeps max |x| over all batches; MinMax keeps min and max (zero included)."""
    state = _run(AbsMaxObserver(), QuantSpec())
    assert float(state.hi.squeeze()) == 3.0 and float(state.lo.squeeze()) == -3.0
    state = _run(MinMaxObserver(), QuantSpec(symmetric=False, channel_axes=(-1,)))
    np.testing.assert_array_equal(state.lo, [[0.0, -2.0]])
    np.testing.assert_array_equal(state.hi, [[3.0, 1.0]])
    assert int(state.count) == 2 and bool(state.finite)


def test_ema_observer_averages_batch_ranges_exponentially():
    """EMA: the first batch sets the range, later ones move it by (1 - decay)."""
    state = _run(EMAObserver(base=AbsMaxObserver(), decay=0.75), QuantSpec())
    assert float(state.hi.squeeze()) == pytest.approx(0.75 * 2.0 + 0.25 * 3.0)


def test_percentile_observer_clips_outliers_and_averages_batches():
    """The 90th percentile of |x| ignores one huge value; batches are averaged."""
    x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 99), jnp.array([1000.0])])
    state = _run(PercentileObserver(percentile=90.0), QuantSpec(), [x, x * 2])
    assert 1.0 < float(state.hi.squeeze()) < 2.0


def test_mse_observer_clip_has_lower_error_than_the_full_range():
    """On heavy-tailed data the MSE-optimal clip quantizes with less error than absmax."""
    x = jnp.asarray(np.random.default_rng(0).standard_t(2.0, 1024), jnp.float32)
    spec = QuantSpec(bits=4)
    full = _run(AbsMaxObserver(), spec, [x])
    best = _run(MSEObserver(num_candidates=8), spec, [x])
    assert float(best.hi.squeeze()) < float(full.hi.squeeze())
    error = jax.jit(lambda x, p: jnp.mean((fake_quant(x, spec, params=p) - x) ** 2))

    def mse(state, obs):
        return float(error(x, obs.params(state, spec)))

    assert mse(best, MSEObserver()) < mse(full, AbsMaxObserver())


def test_observer_state_is_arrays_and_jittable_with_ema():
    """The state is a NamedTuple of arrays that passes through jit and tree maps."""
    observer = EMAObserver()
    state = _run(observer, QuantSpec(channel_axes=(-1,)))
    chex.assert_tree_all_finite(state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))


def test_non_finite_batches_are_recorded_and_rejected():
    """NaN/Inf are kept out of the range, flagged in the state, and params() raises."""
    observer, spec = MinMaxObserver(), QuantSpec()
    state = _run(observer, spec, [jnp.array([1.0, jnp.nan, 2.0])])
    assert not bool(state.finite) and float(state.hi.squeeze()) == 2.0
    with pytest.raises(ValueError, match="act/Dense_0: a calibration batch held NaN/Inf"):
        observer.params(state, spec, "act/Dense_0")
    with pytest.raises(ValueError, match="seen no batch"):
        observer.params(observer.init((3,), spec), spec)


def test_calibrate_returns_params_per_name_and_names_a_bad_batch():
    """calibrate() observes named tensors over batches; a NaN names the tensor and batch."""
    params = calibrate(lambda b: {"x": b, "y": 2 * b}, BATCHES, QuantSpec())
    assert float(params["x"].scale.squeeze()) == pytest.approx(3.0 / 127)
    assert float(params["y"].scale.squeeze()) == pytest.approx(6.0 / 127)
    bad = [BATCHES[0], BATCHES[1].at[1, 1].set(jnp.inf)]
    with pytest.raises(ValueError, match=r"y \(calibration batch 1\): 1 NaN/Inf value\(s\), e.g. inf "
                                         r"at index \(1, 1\)"):
        calibrate(lambda b: {"x": b[0], "y": b}, bad, QuantSpec())
    with pytest.raises(ValueError, match="no batches"):
        calibrate(lambda b: {"x": b}, [], QuantSpec())


def test_calibrate_names_the_first_tensor_that_received_a_nan():
    """The tensor named is the first one `collect` produced with a NaN (for layer inputs, the
    layer where it came in), not the first in alphabetical order."""
    bad = BATCHES[0].at[0, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"z_first \(calibration batch 0\).*index \(0, 1\)"):
        calibrate(lambda b: {"z_first": b, "a_late": b.sum(axis=1, keepdims=True)}, [bad], QuantSpec())


def test_fp8_specs_calibrate_with_every_range_observer():
    """fp8 activations calibrate with the default min-max and the EMA observers."""
    for observer in (MinMaxObserver(), EMAObserver()):
        params = calibrate(lambda b: {"x": b}, BATCHES, QuantSpec(fp8="e4m3"), observer=observer)
        assert np.isfinite(np.asarray(params["x"].scale)).all()


def test_observer_configuration_is_validated():
    """Out-of-range observer settings raise ValueError."""
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=40.0)
    with pytest.raises(ValueError, match="decay"):
        EMAObserver(decay=1.0)
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(num_candidates=0)


def test_calibrating_a_per_row_spec_over_batches_of_other_sizes_is_a_value_error():
    batches = [jnp.ones((8, 4)), jnp.ones((4, 4))]
    params = calibrate(lambda b: {"a": b}, batches, QuantSpec(channel_axes=(-1,)))
    assert params["a"].scale.shape == (1, 4)
    with pytest.raises(ValueError, match="a: calibration batch 1 gives quantization parameters"):
        calibrate(lambda b: {"a": b}, batches, QuantSpec(channel_axes=(0,)))
