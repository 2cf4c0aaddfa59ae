"""Statistics of the utility study: paired effects with bootstrap CIs, Wilcoxon p with Holm, "real cases saved".

Contracts:
- Scores are paired by (case, seed): arm minus ``real`` on the same test case, trained with the same seed at the
  same real fraction. Seeds of one case are not independent observations, so the unit of the statistics is the
  case: its differences are averaged over seeds first, then the mean over cases is the effect.
- The CI is scipy's bootstrap over cases (BCa, 95%); the p value is scipy's two-sided Wilcoxon signed-rank test over
  the per-case differences, adjusted over the arms of one fraction with Holm's step-down (Holm 1979, Scand. J.
  Statist. 6:65-70). An effect with all differences zero has p = 1 and a zero-width CI.
- "Real cases saved" reads the learning curve: the smallest real fraction at which an arm's mean score comes within
  ``tolerance`` of ``real`` trained on every real case, linearly interpolated between measured fractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Effect:
    """An arm against ``real`` at one fraction, in score units (Dice: 0.01 = one Dice point)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float  # Wilcoxon signed-rank, two-sided, before multiple-comparison adjustment
    n_cases: int
    n_pairs: int


def per_case_differences(arm: Mapping[tuple[str, int], float], real: Mapping[tuple[str, int], float]) -> np.ndarray:
    """(case, seed) -> score of each side; the seed-averaged difference per case, over the pairs both sides have."""
    pairs = sorted(set(arm) & set(real))
    by_case: dict[str, list[float]] = {}
    for case, seed in pairs:
        by_case.setdefault(case, []).append(arm[(case, seed)] - real[(case, seed)])
    return np.array([np.mean(v) for _, v in sorted(by_case.items())], dtype=np.float64)


def paired_effect(
    arm: Mapping[tuple[str, int], float],
    real: Mapping[tuple[str, int], float],
    *,
    seed: int,
    n_resamples: int = 9999,
) -> Effect:
    """The arm's mean difference from ``real`` with its 95% bootstrap CI and Wilcoxon p (see the module contract)."""
    n_pairs = len(set(arm) & set(real))
    diffs = per_case_differences(arm, real)
    if diffs.size < 2:
        raise ValueError(f"a paired effect needs at least 2 test cases scored by both arms, got {diffs.size}")
    mean = float(diffs.mean())
    if np.allclose(diffs, diffs[0]):  # no spread: the bootstrap and the rank test are degenerate
        return Effect(mean, mean, mean, 1.0 if diffs[0] == 0 else 0.0, int(diffs.size), n_pairs)
    boot = stats.bootstrap(
        (diffs,),
        np.mean,
        confidence_level=0.95,
        n_resamples=n_resamples,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    p = float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue) if np.any(diffs) else 1.0
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return Effect(mean, low, high, p, int(diffs.size), n_pairs)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values (same order as given): p_(i) * (m - i), running maximum, capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return [float(v) for v in out]


def real_cases_saved(curve: Mapping[float, float], target: float, tolerance: float) -> float | None:
    """The smallest real fraction at which ``curve`` (fraction -> mean score) reaches ``target - tolerance``.

    Linear interpolation between measured fractions; None when no measured fraction reaches it.
    """
    goal = target - tolerance
    points = sorted(curve.items())
    for i, (fraction, score) in enumerate(points):
        if score >= goal:
            if i == 0:
                return float(fraction)
            f0, s0 = points[i - 1]
            return float(f0 + (goal - s0) * (fraction - f0) / (score - s0))
    return None
