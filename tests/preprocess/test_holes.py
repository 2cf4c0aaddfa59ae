"""Hole filling: scipy's binary_fill_holes, exactly, on both paths (sparse background graph and scipy's dilation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from lesionflow.preprocess.holes import fill_holes


@settings(max_examples=80, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 9)] * 3),
    background=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**16),
    order=st.sampled_from(["C", "F"]),
)
def test_both_paths_fill_what_scipy_fills(
    shape: tuple[int, int, int], background: float, seed: int, order: str
) -> None:
    mask = np.asarray(np.random.default_rng(seed).random(shape) >= background, order=order)
    want = ndimage.binary_fill_holes(mask)
    np.testing.assert_array_equal(fill_holes(mask, sparse_limit=1.0), want)  # the sparse graph, always
    np.testing.assert_array_equal(fill_holes(mask, sparse_limit=0.0), want)  # scipy's dilation, always


def test_an_enclosed_cavity_is_filled_and_a_channel_to_the_border_is_not() -> None:
    mask = np.ones((7, 7, 7), dtype=bool)
    mask[3, 3, 3] = False  # enclosed: a hole
    mask[1:3, 5, 5] = False  # enclosed pair: a hole
    mask[3, 0:3, 1] = False  # touches the y = 0 face: background
    filled = fill_holes(mask, sparse_limit=1.0)
    assert filled[3, 3, 3]
    assert filled[1:3, 5, 5].all()
    assert not filled[3, 0:3, 1].any()
    assert filled.sum() == mask.size - 3


def test_a_2d_mask_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 3D"):
        fill_holes(np.ones((3, 3), dtype=bool))
