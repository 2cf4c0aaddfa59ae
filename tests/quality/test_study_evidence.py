"""Utility in the loop: the study's verdict on the current generators' arm, one line for every refusal."""

from __future__ import annotations

from typing import Any

import pytest

from lesionflow.errors import GateFailed
from lesionflow.quality.study_evidence import study_verdict

DIGESTS = {"lefusion": "a" * 64, "diffmask": "b" * 64}


def _summary(ci_low: float, generators: dict[str, str] | None = None) -> dict[str, Any]:
    effect = {"arm": "lefusion+diffmask", "mean": ci_low + 0.02, "ci_low": ci_low, "ci_high": ci_low + 0.04}
    return {
        "fractions": {"0.5": {"generators": {}}, "1": {"generators": DIGESTS if generators is None else generators}},
        "effects": [
            {**effect, "fraction": 0.5, "ci_low": 0.5},  # a smaller fraction never decides
            {**effect, "fraction": 1.0, "dose": True, "ratio": 0.5, "ci_low": 0.5},  # nor a dose point
            {**effect, "fraction": 1.0, "dose": False},
        ],
    }


def test_a_study_showing_no_harm_admits_the_data() -> None:
    note = study_verdict(_summary(0.001), "lefusion+diffmask", DIGESTS, 0.0, source="s.json")
    assert "+2.10 Dice points (95% CI +0.10 to +4.10)" in note


def test_a_ci_below_the_minimum_refuses_with_the_numbers_and_the_fix() -> None:
    with pytest.raises(GateFailed, match=r"changes test Dice by \+1\.00 Dice points \(95% CI -1\.00 to \+3\.00\).*"
                       r"min_study_effect = 0.*rerun `lesionflow study`"):  # fmt: skip
        study_verdict(_summary(-0.01), "lefusion+diffmask", DIGESTS, 0.0, source="s.json")
    with pytest.raises(GateFailed, match=r"min_study_effect = 0\.02"):
        study_verdict(_summary(0.001), "lefusion+diffmask", DIGESTS, 0.02, source="s.json")


def test_other_generators_missing_arms_and_pie_are_refused() -> None:
    other = {"lefusion": "c" * 64, "diffmask": "b" * 64}
    with pytest.raises(GateFailed, match=r"measured other lefusion weights .*lefusion aaaaaaaaaaaa vs cccccccccccc"):
        study_verdict(_summary(0.01), "lefusion+diffmask", other, 0.0, source="s.json")
    with pytest.raises(GateFailed, match=r"no effect for arm 'repaint' at fraction 1; add 'repaint' to study.arms"):
        study_verdict(_summary(0.01), "repaint", {}, 0.0, source="s.json")
    with pytest.raises(GateFailed, match="makes no study arm"):
        study_verdict(_summary(0.01), None, {}, 0.0, source="s.json")
    with pytest.raises(GateFailed, match="holds no study fractions"):
        study_verdict({}, "lefusion", {}, 0.0, source="s.json")
