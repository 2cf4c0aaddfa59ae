"""Paired effects, Holm and "real cases saved", checked by value against hand computations and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lesionflow.study.stats import holm, paired_effect, per_case_differences, real_cases_saved


def _scores(values: dict[str, list[float]]) -> dict[tuple[str, int], float]:
    return {(case, seed): v for case, vs in values.items() for seed, v in enumerate(vs)}


def test_differences_are_paired_by_case_and_seed_then_averaged_over_seeds() -> None:
    real = _scores({"a": [0.5, 0.6, 0.7], "b": [0.2, 0.2, 0.2]})
    arm = _scores({"a": [0.6, 0.6, 0.9], "b": [0.1, 0.2, 0.3]})
    arm[("c", 0)] = 0.9  # no real partner: not paired, not counted
    assert per_case_differences(arm, real) == pytest.approx([0.1, 0.0])


def test_effect_mean_ci_and_p_match_scipy_on_the_per_case_differences() -> None:
    rng = np.random.default_rng(3)
    real = {(f"c{i}", s): float(rng.uniform(0.3, 0.7)) for i in range(12) for s in range(3)}
    arm = {k: v + 0.05 + float(rng.normal(0, 0.02)) for k, v in real.items()}
    effect = paired_effect(arm, real, seed=0, n_resamples=2000)
    diffs = per_case_differences(arm, real)
    assert effect.mean == pytest.approx(diffs.mean())
    assert (effect.n_cases, effect.n_pairs) == (12, 36)
    assert effect.ci_low < effect.mean < effect.ci_high
    assert effect.ci_low > 0  # a clear gain: the CI excludes 0
    assert effect.p_value == pytest.approx(stats.wilcoxon(diffs).pvalue)
    again = paired_effect(arm, real, seed=0, n_resamples=2000)
    assert again == effect  # seeded: same inputs, same numbers


def test_no_effect_and_a_loss_are_reported_as_such() -> None:
    real = _scores({f"c{i}": [0.5, 0.5] for i in range(6)})
    same = paired_effect(real, real, seed=0)
    assert (same.mean, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(1)
    worse = {k: v - 0.1 + float(rng.normal(0, 0.01)) for k, v in real.items()}
    loss = paired_effect(worse, real, seed=0, n_resamples=2000)
    assert loss.ci_high < 0
    assert loss.mean == pytest.approx(-0.1, abs=0.01)
    with pytest.raises(ValueError, match="at least 2 test cases"):
        paired_effect({("a", 0): 1.0}, {("a", 0): 0.5}, seed=0)


def test_holm_by_value() -> None:
    # m = 4: sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (running max), 0.04 -> 0.06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == pytest.approx([0.2])


def test_real_cases_saved_interpolates_on_the_learning_curve() -> None:
    curve = {0.25: 0.50, 0.5: 0.60, 1.0: 0.70}
    assert real_cases_saved(curve, target=0.70, tolerance=0.01) == pytest.approx(0.5 + 0.09 / 0.10 * 0.5)
    assert real_cases_saved(curve, target=0.50, tolerance=0.01) == 0.25
    assert real_cases_saved(curve, target=0.80, tolerance=0.01) is None
