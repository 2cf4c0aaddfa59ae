"""What a utility study reports: the learning curves, each arm against ``real``, and "real cases saved".

Input: the cells table, one row per (arm, fraction, ratio, seed, test case) with the case's Dice (its mean over
the lesion classes, the test metrics' rule) and its lesion-level detection counts (sums over the classes). The
learning curves and "real cases saved" use the main synthetic ratio (``dose`` False); the effects table holds every
(arm, ratio) against ``real`` at the same fraction, dose points included.

Output: plain dicts and tables (JSON- and CSV-ready) and two PNG figures
drawn like the other reports (matplotlib's Agg canvas, fixed size, no timestamp: same inputs, same bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionflow.seg.plots import figure, save_png
from lesionflow.study.stats import holm, paired_effect, real_cases_saved

CASE_METRICS = ("dice", "hd95_mm", "nsd")  # per case, mean over the lesion classes (evaluate's cases.csv)
CELL_KEYS = ("arm", "fraction", "ratio", "dose", "seed", "case_id")


def detection_columns(columns: Sequence[str]) -> list[str]:
    """The lesion-level detection counts among ``columns`` (evaluate's cases.csv): ``lesions``, ``detected``,
    ``false_positives`` and ``lesions_<bin>`` / ``detected_<bin>`` per size bin, in their order."""
    return [c for c in columns if c.split("_")[0] in ("lesions", "detected") or c == "false_positives"]


ARM_COLOURS = {
    "real": "#1c1c1e",
    "copies": "#8e8e93",
    "copy-paste": "#ff9f0a",
    "repaint": "#bf5af2",
    "lefusion": "#0a84ff",
    "lefusion+diffmask": "#34c759",
}


def _scores(table: pd.DataFrame, arm: str, fraction: float, ratio: float | None = None) -> dict[tuple[str, int], float]:
    """(case, seed) -> Dice of one arm. A case whose Dice is undefined (NaN: no lesion in the reference and none
    predicted, evaluate's convention) is no observation: it is left out, so the pairing drops it."""
    rows = table[(table["arm"] == arm) & (table["fraction"] == fraction)]
    rows = rows[~rows["dose"]] if ratio is None else rows[rows["ratio"] == ratio]
    return {(str(r.case_id), int(r.seed)): float(r.dice) for r in rows.itertuples() if pd.notna(r.dice)}


def learning_curves(table: pd.DataFrame, *, seed: int, n_resamples: int) -> pd.DataFrame:
    """Per arm and fraction: mean test Dice over cases (each case averaged over seeds) and its 95% bootstrap CI."""
    from scipy import stats

    rows = []
    for (arm, fraction), group in table[~table["dose"]].groupby(["arm", "fraction"], sort=True):
        # seeds averaged over their defined Dice; a case with none defined (NaN) is no point of the curve
        per_case = group.groupby("case_id")["dice"].mean().dropna().to_numpy(dtype=np.float64)
        low = high = float(per_case.mean())
        if per_case.size >= 2 and not np.allclose(per_case, per_case[0]):
            ci = stats.bootstrap(
                (per_case,), np.mean, n_resamples=n_resamples, method="BCa", rng=np.random.default_rng(seed)
            ).confidence_interval
            low, high = float(ci.low), float(ci.high)
        rows.append(
            {
                "arm": arm,
                "fraction": float(fraction),
                "mean_dice": float(per_case.mean()),
                "ci_low": low,
                "ci_high": high,
                "n_cases": int(per_case.size),
                "n_seeds": int(group["seed"].nunique()),
            }
        )
    return pd.DataFrame(rows)


def effects(table: pd.DataFrame, arms: Sequence[str], *, seed: int, n_resamples: int) -> list[dict[str, Any]]:
    """Each (arm, ratio) against ``real`` at each fraction, paired by case and seed; Holm over the rows of a
    fraction (dose points count as comparisons)."""
    out: list[dict[str, Any]] = []
    for fraction in sorted(table["fraction"].unique()):
        real = _scores(table, "real", fraction)
        at_fraction = table[(table["fraction"] == fraction) & (table["arm"] != "real")]
        found = []
        for arm in arms:
            for ratio, dose in sorted(
                {
                    (float(r), bool(d))
                    for r, d in at_fraction.loc[at_fraction["arm"] == arm, ["ratio", "dose"]].itertuples(index=False)
                }
            ):
                arm_scores = _scores(table, arm, fraction, ratio)
                if not arm_scores or not real:
                    continue
                effect = paired_effect(arm_scores, real, seed=seed, n_resamples=n_resamples)
                found.append({"arm": arm, "fraction": float(fraction), "ratio": ratio, "dose": dose, **asdict(effect)})
        for row, adjusted in zip(found, holm([r["p_value"] for r in found]), strict=True):
            row["p_holm"] = adjusted
        out += found
    return out


def detection(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Lesion-level detection per (arm, fraction, ratio), pooled over test cases and seeds: per size bin (and
    ``all``) the lesions, the detected ones and the sensitivity, plus false positives per case and seed."""
    counts = detection_columns(list(table.columns))
    if "lesions" not in counts:
        return []
    bins = ["all", *[c.removeprefix("lesions_") for c in counts if c.startswith("lesions_")]]
    rows: list[dict[str, Any]] = []
    for (arm, fraction, ratio), group in table.groupby(["arm", "fraction", "ratio"], sort=True):
        for name in bins:
            lesions = int(group["lesions" if name == "all" else f"lesions_{name}"].sum())
            found = int(group["detected" if name == "all" else f"detected_{name}"].sum())
            rows.append(
                {
                    "arm": arm,
                    "fraction": float(fraction),
                    "ratio": float(ratio),
                    "size_bin": name,
                    "lesions": lesions,
                    "detected": found,
                    "sensitivity": found / lesions if lesions else None,
                    "false_positives_per_case": float(group["false_positives"].mean()),
                }
            )
    return rows


def cases_saved(curves: pd.DataFrame, arms: Sequence[str], tolerance: float) -> dict[str, float | None]:
    """Per arm: the smallest real fraction matching ``real`` at the largest fraction within ``tolerance`` Dice."""
    full = curves[curves["arm"] == "real"]
    if full.empty:
        return {}
    target = float(full.sort_values("fraction")["mean_dice"].iloc[-1])
    out: dict[str, float | None] = {}
    for arm in arms:
        curve = curves[curves["arm"] == arm]
        out[arm] = real_cases_saved(dict(zip(curve["fraction"], curve["mean_dice"], strict=True)), target, tolerance)
    return out


def learning_curves_png(curves: pd.DataFrame, path: Path) -> None:
    """Mean test Dice against the real fraction, one line per arm, its 95% CI as a band (800 x 500 px)."""
    fig = figure(8.0, 5.0)
    ax = fig.subplots()
    for arm, group in curves.groupby("arm", sort=False):
        group = group.sort_values("fraction")
        colour = ARM_COLOURS.get(str(arm), "#ff375f")
        ax.plot(group["fraction"], group["mean_dice"], marker="o", color=colour, label=str(arm), linewidth=1.5)
        ax.fill_between(group["fraction"], group["ci_low"], group["ci_high"], color=colour, alpha=0.15)
    ax.set_xlabel("share of the real training cases")
    ax.set_ylabel("mean test Dice (95% CI)")
    ax.set_title("Learning curves: does synthetic data replace real cases?")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def effects_png(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Forest plot: each arm's Dice difference from real with its 95% CI, one row per (fraction, arm)."""
    fig = figure(8.0, max(2.5, 0.4 * len(rows) + 1.2))
    ax = fig.subplots()
    labels = [
        f"{r['arm']}{' x' + format(r['ratio'], 'g') if r.get('dose') else ''} @ {round(r['fraction'] * 100)}%"
        for r in rows
    ]
    for i, r in enumerate(rows):
        colour = ARM_COLOURS.get(str(r["arm"]), "#ff375f")
        ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=colour, linewidth=2)
        ax.plot([r["mean"]], [i], marker="s", color=colour)
    ax.axvline(0.0, color="#666666", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("test Dice difference from real at the same fraction (95% CI; > 0: synthetic helps)")
    ax.set_title("Effect of each arm, paired by case and seed")
    fig.tight_layout()
    save_png(fig, path)
