"""What the study reports from its cells table: dose rows in the effects, lesion detection by size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesionflow.study.report import detection, detection_columns, effects, learning_curves
from lesionflow.study.stats import paired_effect


def _cells(rng: np.random.Generator) -> pd.DataFrame:
    """real, copies at the main ratio 0.25 and copies at dose 0.5; 6 test cases x 2 seeds, one fraction."""
    rows = []
    for arm, ratio, dose, shift in (
        ("real", 0.0, False, 0.0),
        ("copies", 0.25, False, 0.02),
        ("copies", 0.5, True, -0.05),
    ):
        for seed in (0, 1):
            for case in range(6):
                rows.append(
                    {
                        "arm": arm,
                        "fraction": 0.5,
                        "ratio": ratio,
                        "dose": dose,
                        "seed": seed,
                        "case_id": f"c{case}",
                        "dice": 0.5 + 0.03 * case + shift + rng.normal(0, 0.01),
                        "hd95_mm": 3.0,
                        "nsd": 0.6,
                        "lesions": 2,
                        "detected": 2 if arm == "copies" else 1,
                        "false_positives": case % 2,
                        "lesions_lt6mm": 1,
                        "detected_lt6mm": 1 if arm == "copies" else 0,
                        "lesions_ge6mm": 1,
                        "detected_ge6mm": 1,
                    }
                )
    return pd.DataFrame(rows)


def test_dose_points_are_paired_against_real_and_kept_out_of_the_learning_curve() -> None:
    table = _cells(np.random.default_rng(0))
    rows = effects(table, ["real", "copies"], seed=1, n_resamples=999)
    assert [(r["arm"], r["ratio"], r["dose"]) for r in rows] == [("copies", 0.25, False), ("copies", 0.5, True)]
    main, dose = rows

    def scores(ratio: float) -> dict[tuple[str, int], float]:
        part = table[(table["arm"] == ("real" if ratio == 0 else "copies")) & (table["ratio"] == ratio)]
        return {(r.case_id, int(r.seed)): float(r.dice) for r in part.itertuples()}

    assert main["mean"] == pytest.approx(paired_effect(scores(0.25), scores(0.0), seed=1, n_resamples=999).mean)
    assert dose["mean"] == pytest.approx(paired_effect(scores(0.5), scores(0.0), seed=1, n_resamples=999).mean)
    assert main["mean"] > 0 > dose["mean"]
    assert all(r["p_holm"] >= r["p_value"] for r in rows)  # Holm over both rows of the fraction
    curves = learning_curves(table, seed=1, n_resamples=999)
    copies = curves[curves["arm"] == "copies"].iloc[0]
    assert copies["mean_dice"] == pytest.approx(table[(table["arm"] == "copies") & ~table["dose"]]["dice"].mean())


def test_detection_is_pooled_per_size_bin_with_false_positives_per_case() -> None:
    table = _cells(np.random.default_rng(0))
    assert detection_columns(list(table.columns)) == [
        "lesions", "detected", "false_positives", "lesions_lt6mm", "detected_lt6mm", "lesions_ge6mm", "detected_ge6mm"
    ]  # fmt: skip
    rows = {(r["arm"], r["ratio"], r["size_bin"]): r for r in detection(table)}
    assert rows[("real", 0.0, "all")]["sensitivity"] == pytest.approx(0.5)
    assert (rows[("real", 0.0, "lt6mm")]["lesions"], rows[("real", 0.0, "lt6mm")]["detected"]) == (12, 0)
    assert rows[("copies", 0.25, "lt6mm")]["sensitivity"] == pytest.approx(1.0)
    assert rows[("copies", 0.5, "ge6mm")]["false_positives_per_case"] == pytest.approx(0.5)
    assert detection(table.drop(columns=detection_columns(list(table.columns)))) == []
    empty = table.assign(lesions_lt6mm=0, detected_lt6mm=0)
    assert {r["sensitivity"] for r in detection(empty) if r["size_bin"] == "lt6mm"} == {None}


def test_cases_without_a_defined_dice_are_left_out_of_pairs_and_curves() -> None:
    """A test case with no lesion that neither arm predicts has no Dice (NaN, evaluate's convention): it is no
    paired observation and no point of the learning curve, instead of turning every statistic into NaN."""
    table = _cells(np.random.default_rng(0))
    clean = table["case_id"] == "c0"
    undefined = table.assign(dice=table["dice"].where(~clean))  # c0 undefined for every arm and seed
    one_sided = table.assign(dice=table["dice"].where(~(clean & (table["arm"] == "real"))))  # only real's c0
    expected = effects(table[~clean], ["real", "copies"], seed=1, n_resamples=999)
    for cells in (undefined, one_sided):
        rows = effects(cells, ["real", "copies"], seed=1, n_resamples=999)
        assert [r["n_cases"] for r in rows] == [5, 5]
        assert [r["mean"] for r in rows] == pytest.approx([r["mean"] for r in expected])
        assert all(np.isfinite(r["ci_low"]) and np.isfinite(r["p_value"]) for r in rows)
    curves = learning_curves(undefined, seed=1, n_resamples=999).set_index("arm")
    assert curves.loc["real", "n_cases"] == 5
    assert curves.loc["real", "mean_dice"] == pytest.approx(table[~clean & (table["arm"] == "real")]["dice"].mean())
