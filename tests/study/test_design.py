"""The study grid: nested, seeded, lesion-balanced subsets; cells and their keys."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionflow.errors import ParamsError
from lesionflow.params import StudyArm, validate_params
from lesionflow.study.design import ARMS, Cell, cell_key, grid, nested_subsets

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


def test_arms_are_checked_and_cells_keyed() -> None:
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
    key = cell_key(Cell("real", 0.25, 0), "subset", {"ratio": 0.0}, "v1")
    assert key == cell_key(Cell("real", 0.25, 0), "subset", {"ratio": 0.0}, "v1")
    assert key != cell_key(Cell("real", 0.25, 1), "subset", {"ratio": 0.0}, "v1")
    assert key != cell_key(Cell("real", 0.25, 0), "other", {"ratio": 0.0}, "v1")
