"""The study grid: nested, seeded, lesion-balanced subsets; cells, dose series, arms as settings."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionflow.errors import ParamsError
from lesionflow.params import StudyArm, validate_params
from lesionflow.study.design import ARM_SYNTH, ARMS, Cell, arm_generators, arm_of_synth, grid, nested_subsets

cases_strategy = st.dictionaries(
    st.from_regex(r"case_[0-9]{1,3}", fullmatch=True), st.booleans(), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(cases=cases_strategy, seed=st.integers(0, 2**31), fractions=st.lists(st.floats(0.05, 1.0), min_size=1))
def test_subsets_are_nested_seeded_and_keep_enough_lesions(
    cases: dict[str, bool], seed: int, fractions: list[float]
) -> None:
    if not any(cases.values()):
        with pytest.raises(ParamsError, match="with lesions are needed"):
            nested_subsets(cases, fractions, seed, min_cases=1)
        return
    subsets = nested_subsets(cases, fractions, seed, min_cases=1)  # a lesion case comes first in the order
    ordered = [subsets[f] for f in sorted(subsets)]
    for small, large in itertools.pairwise(ordered):
        assert set(small) <= set(large)
    assert subsets == nested_subsets(dict(reversed(list(cases.items()))), fractions, seed, min_cases=1)
    if 1.0 in subsets:
        assert set(subsets[1.0]) == set(cases)
    for subset in subsets.values():
        assert sum(cases[c] for c in subset) >= 1


def test_a_fraction_with_too_few_lesion_cases_is_one_line() -> None:
    cases = {f"c{i}": i < 4 for i in range(16)}  # 4 of 16 with lesions
    subsets = nested_subsets(cases, [0.5, 1.0], seed=7)
    assert sum(cases[c] for c in subsets[0.5]) == 2  # the lesion share is kept in the prefix
    with pytest.raises(ParamsError, match=r"study.fractions: 0.1 keeps 2 training case\(s\), 1 with lesions"):
        nested_subsets(cases, [0.1], seed=7)
    with pytest.raises(ParamsError, match=r"1.5 is not in \(0, 1\]"):
        nested_subsets(cases, [1.5], seed=7)


def test_arms_are_checked_and_cells_laid_out() -> None:
    assert set(ARMS) == set(get_args(StudyArm))  # one list of arms: the params type
    with pytest.raises(ParamsError, match=r"'study.arms.1' = 'gan' is invalid: Input should be 'real'"):
        validate_params({"study": {"arms": ["real", "gan"]}})
    with pytest.raises(ParamsError, match="must include 'real'"):
        validate_params({"study": {"arms": ["lefusion"]}})
    with pytest.raises(ParamsError, match=r"each fraction must lie in \(0, 1\]"):
        validate_params({"study": {"fractions": [0.5, 2]}})
    cells = grid(["real", "lefusion"], [1.0, 0.25], [0, 1])
    assert [c.cell_id for c in cells[:3]] == ["real@025#0", "real@025#1", "lefusion@025#0"]
    assert len(cells) == 8
    assert set(ARMS) >= {c.arm for c in cells}
    assert all(c.ratio == (0.0 if c.arm == "real" else 0.25) and not c.dose for c in cells)


def test_a_dose_series_adds_cells_at_the_smallest_fraction_only() -> None:
    with pytest.raises(ParamsError, match=r"each dose ratio must lie in \(0, 1\)"):
        validate_params({"study": {"dose_ratios": [0.5, 1.0]}})
    cells = grid(["real", "copies"], [0.5, 1.0], [0], ratio=0.25, dose_ratios=[0.1, 0.25, 0.5])
    dose = [c for c in cells if c.dose]
    assert [(c.arm, c.fraction, c.ratio) for c in dose] == [("copies", 0.5, 0.1), ("copies", 0.5, 0.5)]
    assert [c.cell_id for c in dose] == ["copiesx010@050#0", "copiesx050@050#0"]
    assert dose[0].folder == "cells/copies/x010/seed0"
    assert Cell("copies", 0.5, 0, 0.25).folder == "cells/copies/seed0"  # the main ratio keeps its folder
    assert len(cells) == 4 + 2


@pytest.mark.parametrize("arm", [a for a in ARM_SYNTH])
def test_each_synthetic_arm_is_read_back_from_the_settings_it_makes(arm: StudyArm) -> None:
    synth = validate_params({"synth": {"new_per_case": 1, **ARM_SYNTH[arm]}}).synth
    assert arm_of_synth(synth) == arm
    assert arm_generators([arm]) == ARM_SYNTH[arm]["generators"]
    assert arm_of_synth(validate_params({"synth": {"method": "pie", "generators": ["pie"]}}).synth) is None
