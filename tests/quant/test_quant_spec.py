"""QuantSpec validation, integer grids, storage dtypes and layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import QuantSpec, layout


@pytest.mark.parametrize(
    "kwargs, grid, dtype",
    [
        (dict(bits=8), (-127, 127), jnp.int8),
        (dict(bits=8, symmetric=False), (-128, 127), jnp.int8),
        (dict(bits=8, signed=False), (0, 255), jnp.uint8),
        (dict(bits=4), (-7, 7), jnp.int4),
        (dict(bits=3, symmetric=False), (-4, 3), jnp.int4),
        (dict(bits=2), (-1, 1), jnp.int2),
        (dict(bits=2, signed=False), (0, 3), jnp.uint2),
        (dict(bits=6), (-31, 31), jnp.int8),
        (dict(bits=16), (-32767, 32767), jnp.int16),
        (dict(fp8="e4m3"), (-448.0, 448.0), jnp.float8_e4m3fn),
        (dict(fp8="e5m2"), (-57344.0, 57344.0), jnp.float8_e5m2),
    ],
)
def test_grid_and_storage_dtype_follow_bits_sign_and_symmetry(kwargs, grid, dtype):
    """qmin/qmax and the storage dtype match the documented conventions."""
    spec = QuantSpec(**kwargs)
    assert (spec.qmin, spec.qmax) == grid
    assert spec.storage_dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=32), "bits"),
        (dict(bits=True), "bits"),
        (dict(rounding="up"), "rounding"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=2.5), "group_size"),
        (dict(channel_axes=(1, 1)), "repeated"),
        (dict(group_size=4, group_axis=-1, channel_axes=(-1,)), "group_axis"),
        (dict(fp8="e3m4"), "fp8"),
        (dict(fp8="e4m3", bits=4), "fp8"),
        (dict(fp8="e4m3", symmetric=False), "fp8"),
        (dict(fp8="e4m3", rounding="stochastic"), "fp8"),
        (dict(bits=8.0), "bits"),
        (dict(channel_axes=(1.5,)), "channel_axes"),
        (dict(channel_axes="-1"), "channel_axes"),
        (dict(signed=None), "signed"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(group_size=4, group_axis=0.0), "group_axis"),
    ],
)
def test_invalid_spec_raises_value_error_naming_the_value(kwargs, match):
    """Bad configuration is rejected at construction with a ValueError."""
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_spec_is_hashable_and_normalizes_an_int_channel_axis():
    """Specs are static metadata: hashable, comparable, int axes become tuples."""
    assert QuantSpec(channel_axes=-1) == QuantSpec(channel_axes=(-1,))
    assert len({QuantSpec(), QuantSpec(), QuantSpec(bits=4)}) == 2


def test_layout_groups_the_group_axis_and_keeps_channel_axes():
    """Per-group scales split the group axis; channel axes keep their size."""
    lay = layout((8, 6), QuantSpec(group_size=4, channel_axes=(-1,)))
    assert lay.grouped_shape == (2, 4, 6)
    assert lay.params_shape == (2, 1, 6)
    assert lay.elements_per_scale == 4
    assert layout((3, 5), QuantSpec()).params_shape == (1, 1)


@pytest.mark.parametrize(
    "shape, spec, match",
    [
        ((4, 6), QuantSpec(group_size=4, group_axis=1), "group_size=4 does not divide"),
        ((4, 6), QuantSpec(channel_axes=(2,)), "channel_axes=2 is out of range"),
        ((4, 6), QuantSpec(group_size=2, group_axis=-3), "group_axis=-3 is out of range"),
        ((4, 6), QuantSpec(channel_axes=(0, -2)), "same axis twice"),
    ],
)
def test_layout_errors_name_the_path_and_the_bad_value(shape, spec, match):
    """Axes out of range and indivisible groups raise ValueError naming the path."""
    with pytest.raises(ValueError, match=match) as info:
        layout(shape, spec, "Dense_0/kernel")
    assert "Dense_0/kernel" in str(info.value)
