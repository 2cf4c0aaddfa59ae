"""Segmentation metrics: known geometry in mm, empty-mask conventions, tables and summaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from lesionflow.seg.dice import dice, mean_foreground_dice
from lesionflow.seg.metrics import ClassMetrics, case_means, case_metrics, metrics_table, summarize

SPACING = (0.7, 1.3, 2.1)
SHAPE = (20, 16, 14)
NAMES = {2: "tumour", 5: "cyst"}


def _cube(lo: tuple[int, int, int], edge: int = 8, value: int = 2) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[lo[0] : lo[0] + edge, lo[1] : lo[1] + edge, lo[2] : lo[2] + edge] = value
    return out


def _surface_mm(mask: np.ndarray) -> np.ndarray:
    """Surface voxel centres in mm (voxels removed by one erosion, the border counting as outside)."""
    edges = mask & ~ndimage.binary_erosion(mask)
    return np.argwhere(edges) * np.asarray(SPACING)


def _reference(a: np.ndarray, b: np.ndarray, percentile: float, tol: float) -> tuple[float, float]:
    """Brute-force percentile Hausdorff (mm) and NSD between two binary masks."""
    d = cdist(_surface_mm(a), _surface_mm(b))
    a_to_b, b_to_a = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(a_to_b, percentile), np.percentile(b_to_a, percentile))
    nsd = ((a_to_b <= tol).sum() + (b_to_a <= tol).sum()) / (a_to_b.size + b_to_a.size)
    return float(hd), float(nsd)


def test_offset_cubes_in_mm() -> None:
    truth = _cube((4, 4, 3))
    pred = _cube((6, 4, 3))  # shifted by k = 2 voxels along x (0.7 mm): 1.4 mm
    [m] = case_metrics(pred, truth, SPACING, [0, 2], NAMES, hd_percentile=100.0, nsd_tolerance_mm=1.5)
    assert m.label == 2
    assert m.name == "tumour"
    assert m.dice == pytest.approx((8 - 2) / 8)
    assert m.hd95_mm == pytest.approx(2 * 0.7, abs=1e-5)  # the far faces are 2 voxels apart, nothing farther
    assert m.nsd == 1.0  # every surface voxel is within 1.4 mm <= 1.5 mm of the other surface
    assert (m.truth_voxels, m.pred_voxels) == (512, 512)

    [m95] = case_metrics(pred, truth, SPACING, [0, 2], NAMES)  # defaults: 95th percentile, 1 mm tolerance
    hd_ref, nsd_ref = _reference(pred == 2, truth == 2, 95.0, 1.0)
    assert m95.hd95_mm == pytest.approx(hd_ref, abs=1e-4)
    assert 0.0 < m95.hd95_mm <= 1.4 + 1e-6
    assert m95.nsd == pytest.approx(nsd_ref, abs=1e-6)
    assert 0.0 < m95.nsd < 1.0


def test_offset_along_the_coarse_axis_and_identity() -> None:
    truth = _cube((4, 4, 3))
    pred = _cube((4, 4, 4))  # one voxel along z: 2.1 mm
    [m] = case_metrics(pred, truth, SPACING, [0, 2], NAMES, hd_percentile=100.0)
    assert m.dice == pytest.approx(7 / 8)
    assert m.hd95_mm == pytest.approx(2.1, abs=1e-5)
    [same] = case_metrics(truth, truth, SPACING, [0, 2], NAMES)
    assert (same.dice, same.hd95_mm, same.nsd) == (1.0, 0.0, 1.0)


def test_empty_conventions_and_label_order() -> None:
    """Absent classes and empty predictions (issue 19): Dice as nnU-Net (NaN only when both masks are empty),
    HD95 and NSD exactly as MONAI's compute_hausdorff_distance / compute_surface_dice return them."""
    truth = _cube((4, 4, 3), value=2)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[0:3, 0:3, 0:3] = 7  # a label value not asked for: ignored
    metrics = case_metrics(pred, truth, SPACING, [0, 2, 5], {2: "tumour"})
    assert [(m.label, m.name) for m in metrics] == [(2, "tumour"), (5, "label_5")]
    missed, absent = metrics
    assert (missed.dice, missed.nsd, missed.outcome) == (0.0, 0.0, "missed")
    assert math.isnan(missed.hd95_mm)  # no surface to measure a distance to: undefined, not the volume diagonal
    assert (missed.truth_voxels, missed.pred_voxels) == (512, 0)
    assert absent.outcome == "absent"
    assert all(math.isnan(v) for v in (absent.dice, absent.hd95_mm, absent.nsd))  # nothing to score

    [hallucinated] = case_metrics(truth, pred, SPACING, [2], NAMES)  # prediction only
    assert (hallucinated.dice, hallucinated.nsd, hallucinated.outcome) == (0.0, 0.0, "false_positive")
    assert math.isnan(hallucinated.hd95_mm)
    [found] = case_metrics(truth, truth, SPACING, [2], NAMES)
    assert (found.dice, found.hd95_mm, found.nsd, found.outcome) == (1.0, 0.0, 1.0, "present")


def test_surface_conventions_are_monais() -> None:
    """The three empty cases scored by MONAI itself: the same NSD as case_metrics, and no finite HD95 (MONAI
    returns NaN or inf, depending on which mask is empty; case_metrics writes NaN: undefined, left out)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    lesion, empty = _cube((4, 4, 3), value=2), np.zeros(SHAPE, dtype=np.uint8)
    for pred, truth in ((empty, lesion), (lesion, empty), (empty, empty)):
        [ours] = case_metrics(pred, truth, SPACING, [2], NAMES)
        y_pred = torch.from_numpy((pred == 2)[None, None].astype(np.float32))
        y = torch.from_numpy((truth == 2)[None, None].astype(np.float32))
        with warnings.catch_warnings():  # MONAI warns about the empty mask
            warnings.simplefilter("ignore")
            hd = float(compute_hausdorff_distance(y_pred, y, include_background=True, spacing=SPACING)[0, 0])
            nsd = float(compute_surface_dice(y_pred, y, [1.0], include_background=True, spacing=SPACING)[0, 0])
        assert not math.isfinite(hd)
        assert math.isnan(ours.hd95_mm)
        np.testing.assert_equal(ours.nsd, nsd)  # 0 where one mask is empty, NaN where both are


def test_the_one_dice_empty_mask_rule_by_value() -> None:
    empty, two = np.zeros(SHAPE, dtype=bool), _cube((4, 4, 3), edge=2) > 0
    assert dice(empty, empty) == 1.0  # both empty: nothing to find, nothing found
    assert dice(two, empty) == 0.0  # missed
    assert dice(empty, two) == 0.0  # hallucinated
    assert dice(two, two) == 1.0
    shifted = _cube((5, 4, 3), edge=2) > 0  # 4 of 8 voxels shared
    assert dice(two, shifted) == 2 * 4 / 16
    with pytest.raises(ValueError, match="same grid"):
        dice(two, two[:-1])


def test_the_one_dice_imports_neither_torch_nor_monai() -> None:
    """synth/ and the validation loop import it at module level: it must stay pure numpy."""
    code = "import sys, lesionflow.seg.dice; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_validation_and_test_dice_agree_where_the_test_dice_is_defined() -> None:
    """Validation (mean_foreground_dice) scores a class like the test metrics wherever truth or prediction holds
    it; a class absent from both scores 1.0 in validation (a selection score, never NaN) and NaN in the test
    metrics (excluded from their means)."""
    truth = _cube((2, 2, 2), edge=5, value=2)
    pred = _cube((3, 2, 2), edge=5, value=2)  # class 5 absent from both
    tumour, cyst = case_metrics(pred, truth, SPACING, [0, 2, 5], NAMES)
    assert tumour.dice == pytest.approx(4 / 5)
    assert math.isnan(cyst.dice)
    assert mean_foreground_dice(pred, truth, (0, 2)) == tumour.dice
    assert mean_foreground_dice(pred, truth, (0, 2, 5)) == pytest.approx((4 / 5 + 1.0) / 2)
    empty = np.zeros(SHAPE, dtype=np.uint8)
    assert mean_foreground_dice(empty, empty, (0, 2, 5)) == 1.0
    assert mean_foreground_dice(empty, truth, (0, 2)) == 0.0
    assert mean_foreground_dice(empty, empty, (0,)) == 1.0  # no foreground class at all


def test_mixed_classes_in_one_call() -> None:
    truth = _cube((2, 2, 2), edge=5, value=2) + _cube((11, 9, 7), edge=5, value=5)
    pred = _cube((3, 2, 2), edge=5, value=2)  # class 5 missed
    tumour, cyst = case_metrics(pred, truth, SPACING, [0, 2, 5], NAMES)
    assert tumour.dice == pytest.approx(4 / 5)
    assert cyst.dice == 0.0


def test_shape_mismatch_and_bad_parameters() -> None:
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros((4, 4, 5), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        case_metrics(a, b, (1.0, 1.0, 1.0), [0, 1], {1: "x"})
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, (1.0, 0.0, 1.0), [0, 1], {1: "x"})
    with pytest.raises(ValueError, match="hd_percentile"):
        case_metrics(a, a, (1.0, 1.0, 1.0), [0, 1], {1: "x"}, hd_percentile=0.0)


def _m(label: int, name: str, dice: float, hd: float, nsd: float) -> ClassMetrics:
    return ClassMetrics(label, name, dice, hd, nsd, truth_voxels=10, pred_voxels=12)


def test_table_summary_and_case_ranking() -> None:
    rows = {
        "case_b": [_m(2, "tumour", 0.8, 2.0, 0.9), _m(5, "cyst", 0.4, 6.0, 0.5)],
        "case_a": [_m(2, "tumour", 0.6, 4.0, 0.7), _m(5, "cyst", 1.0, 0.0, 1.0)],
        "case_c": [_m(2, "tumour", 0.2, 10.0, 0.1), _m(5, "cyst", 0.2, 8.0, 0.3)],
    }
    table = metrics_table(rows)
    assert list(table.columns) == [
        "case_id",
        "label",
        "name",
        "dice",
        "hd95_mm",
        "nsd",
        "truth_voxels",
        "pred_voxels",
        "outcome",
    ]
    assert len(table) == 6
    assert list(table["case_id"]) == ["case_b", "case_b", "case_a", "case_a", "case_c", "case_c"]
    assert table["label"].dtype == np.int64

    summary = summarize(table)
    assert summary["mean_dice"] == pytest.approx(3.2 / 6)
    assert summary["mean_hd95_mm"] == pytest.approx(30.0 / 6)
    assert summary["mean_nsd"] == pytest.approx(3.5 / 6)
    assert summary["dice_tumour"] == pytest.approx(1.6 / 3)
    assert summary["hd95_mm_cyst"] == pytest.approx(14.0 / 3)
    assert summary["nsd_cyst"] == pytest.approx(1.8 / 3)
    assert summary["n_cases"] == 3
    assert (summary["n_dice"], summary["n_hd95_mm"], summary["n_nsd"]) == (6, 6, 6)
    assert (summary["n_present"], summary["n_absent"], summary["n_missed"], summary["n_false_positive"]) == (6, 0, 0, 0)
    assert set(summary) == {
        "mean_dice",
        "mean_hd95_mm",
        "mean_nsd",
        "n_dice",
        "n_hd95_mm",
        "n_nsd",
        "n_cases",
        "n_cases_without_lesion",
        "n_false_positive_cases",
        *(f"n_{o}" for o in ("present", "missed", "false_positive", "absent")),
        *(f"{m}_{n}" for m in ("dice", "hd95_mm", "nsd") for n in ("tumour", "cyst")),
        *(f"n_{o}_{n}" for o in ("present", "missed", "false_positive", "absent") for n in ("tumour", "cyst")),
    }

    means = case_means(table)
    assert list(means.columns) == ["case_id", "dice", "hd95_mm", "nsd"]
    assert list(means["case_id"]) == ["case_a", "case_b", "case_c"]  # best first (0.8, 0.6, 0.2)
    assert means["hd95_mm"].tolist() == pytest.approx([2.0, 4.0, 9.0])
    assert means["nsd"].tolist() == pytest.approx([0.85, 0.7, 0.2])

    flat = [(case_id, m) for case_id, ms in rows.items() for m in ms]  # (case_id, ClassMetrics) pairs
    assert metrics_table(flat).equals(table)
    nested = metrics_table([("only", [_m(2, "tumour", 0.5, 1.0, 0.5)])])
    assert summarize(nested)["n_cases"] == 1
    with pytest.raises(ValueError, match="empty"):
        summarize(metrics_table({}))


def test_a_case_without_lesion_neither_averages_to_half_nor_scores_the_volume_diagonal() -> None:
    """Issue 19: a case with no lesion, a false positive in one class and the other class absent scored Dice 0.5
    and HD95 = the volume diagonal, and led the montage as "best". Means are over defined values only, with the
    outcome counts beside them; the summary is strict JSON (undefined means are null, never NaN)."""
    truth = _cube((4, 4, 3), value=2)
    shifted = _cube((5, 4, 3), value=2)
    specks = np.zeros(SHAPE, dtype=np.uint8)
    specks[15:18, 12:15, 10:13] = 2  # a false positive in a case without lesions
    empty = np.zeros(SHAPE, dtype=np.uint8)
    rows = {
        "lesion": case_metrics(shifted, truth, SPACING, [0, 2, 5], NAMES),
        "clean": case_metrics(specks, empty, SPACING, [0, 2, 5], NAMES),
        "nothing": case_metrics(empty, empty, SPACING, [0, 2, 5], NAMES),
    }
    table = metrics_table(rows)
    assert table["outcome"].tolist() == ["present", "absent", "false_positive", "absent", "absent", "absent"]
    lesion_tumour = rows["lesion"][0]
    summary = summarize(table)
    assert summary["mean_dice"] == pytest.approx((lesion_tumour.dice + 0.0) / 2)  # the false positive counts as 0
    assert summary["n_dice"] == 2
    assert summary["mean_hd95_mm"] == pytest.approx(lesion_tumour.hd95_mm)  # only where both surfaces exist
    assert summary["mean_hd95_mm"] < 3.0
    assert summary["n_hd95_mm"] == 1
    assert summary["mean_nsd"] == pytest.approx((lesion_tumour.nsd + 0.0) / 2)
    assert summary["n_nsd"] == 2
    assert summary["dice_cyst"] is None
    assert summary["hd95_mm_cyst"] is None
    assert (summary["n_absent_cyst"], summary["n_absent_tumour"], summary["n_false_positive_tumour"]) == (3, 1, 1)
    assert (summary["n_present"], summary["n_missed"], summary["n_false_positive"], summary["n_absent"]) == (1, 0, 1, 4)
    assert (summary["n_cases"], summary["n_cases_without_lesion"], summary["n_false_positive_cases"]) == (3, 2, 1)
    json.dumps(summary, allow_nan=False)

    means = case_means(table)
    assert list(means["case_id"]) == ["lesion", "clean", "nothing"]  # undefined last
    assert means["dice"].tolist()[:2] == [pytest.approx(lesion_tumour.dice), 0.0]
    assert math.isnan(means["dice"].iloc[2])
    assert math.isnan(means["hd95_mm"].iloc[1])
