"""The synthetic gate never fails open: a statistic that is not finite rejects its sample (or, for a dataset
statistic, fails) unless it is explicitly not applicable, with the reason; DDPM lesions (no condition
histogram) are compared with the real training lesions instead of reporting a W1 of 0.

The rows are built by the stage's own row builder on tiny hand-made volumes (an 8^3 case, one 4^3 lesion)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from lesionflow.params import Params
from lesionflow.quality.synthetic_checks import KsResult, histogram_w1, nearest_histogram_w1
from lesionflow.quality.synthetic_suite import SyntheticStats, SyntheticThresholds, run_synthetic_gate
from lesionflow.stages.validate_synthetic import _lesion_crops, _lesion_rows, _population_stats, _real_texture

NAN = float("nan")
SIZE = (8, 8, 8)
BINS = 16


def _params() -> Params:
    return Params()  # the row builder reads synth.lefusion.bins (16); crops are cut at SIZE below


def _cube() -> np.ndarray:
    m = np.zeros(SIZE, bool)
    m[2:6, 2:6, 2:6] = True
    return m


def _real_lesion(value: float) -> SimpleNamespace:
    """A real training lesion ROI: constant ``value`` inside the cube, 0 around it."""
    mask = _cube()
    image = np.where(mask, value, 0.0).astype(np.float32)[None]
    return SimpleNamespace(image=image, mask=mask, label=mask.astype(np.uint8), voxels=int(mask.sum()))


def _rows(
    lesion_value: float,
    lesion: dict[str, Any],
    real_values: tuple[float, ...] = (0.5,),
    classes: tuple[int, ...] = (1,),
    real_gradient: float | None = None,
) -> list[dict[str, Any]]:
    """The stage's rows for one synthetic case holding one generated cube lesion of constant ``lesion_value``."""
    region = _cube()
    source_image = np.zeros((1, *SIZE), np.float32)
    image = np.where(region, lesion_value, 0.0).astype(np.float32)[None]
    case = SimpleNamespace(image=image, label=region.astype(np.uint8), generated=region.astype(np.uint8))
    source = SimpleNamespace(image=source_image, organ=np.ones(SIZE, np.uint8))
    real = SimpleNamespace(lesions=[_real_lesion(v) for v in real_values])
    record = {"origin": [0, 0, 0], "cluster": None, "histogram": [], **lesion}
    sample = {"sample_id": "s", "kind": "new", "lesions": [record]}
    ctx = {
        "class_values": classes,
        "lesion_values": classes,
        "real_gradient": 0.5 if real_gradient is None else real_gradient,
        "value_range": (-1.0, 1.0),
        **_real_texture(real, BINS, None),
    }
    lesions = _lesion_crops(sample, case, SIZE)
    return _lesion_rows(sample, case, source, lesions, real, _params(), ctx, None)


def _gate(rows: list[dict[str, Any]], tmp_path: Path, stats: SyntheticStats | None = None) -> Any:
    table = pd.DataFrame(rows)
    stats = stats or SyntheticStats(volume_ks_pvalue=0.5, diversity=0.3, acceptance_rate=0.9)
    thresholds = SyntheticThresholds(max_reject_fraction=1.0, boundary_gradient_ratio=(0.0, 100.0))
    return run_synthetic_gate(table, stats, thresholds, tmp_path / "gate", data_docs=False)


def test_a_lesion_whose_w1_is_nan_fails_the_gate_with_the_reason(tmp_path: Path) -> None:
    # Two classes; the lesion is all class 1, its condition only has class 2: no block is non-zero in both.
    condition = [0.0] * BINS + [1.0] + [0.0] * (BINS - 1)
    (bad,) = _rows(0.5, {"mask_source": "real", "histogram": condition}, classes=(1, 2))
    assert math.isnan(bad["histogram_w1"])  # was 0.0: a perfect score
    assert bad["histogram_reference"] == "condition"
    assert "histogram_w1 is not finite (nan): no lesion class is present in both" in bad["notes"]
    (good,) = _rows(0.5, {"mask_source": "real", "histogram": [0.0] * 12 + [1.0] + [0.0] * 3 + [0.0] * BINS},
                    classes=(1, 2))  # fmt: skip
    good["sample_id"] = "ok#0"
    assert math.isfinite(good["histogram_w1"])
    result = _gate([bad, good], tmp_path)
    assert sorted(result.rejected) == ["s#0"]
    (check,) = result.rejected["s#0"]
    assert check.expectation == "expect_column_values_to_not_be_null"
    assert check.column == "histogram_w1"
    assert "no lesion class is present in both the lesion and its condition histogram" in check.detail


def test_ddpm_lesion_is_compared_with_the_real_lesions_not_reported_as_zero(tmp_path: Path) -> None:
    # the real lesions are constant 0.5 and -0.5; a DDPM lesion (no condition) of 0.5 matches the first exactly
    (same,) = _rows(0.5, {"mask_source": "sphere"}, real_values=(0.5, -0.5))
    assert (same["histogram_reference"], same["histogram_w1"], same["notes"]) == ("real", 0.0, "")
    # the support is the real lesion voxels' 0.5-99.5th percentiles + 10% margin: [-0.6, 0.6], 16 bins of 0.075
    real = SimpleNamespace(lesions=[_real_lesion(0.5), _real_lesion(-0.5)])
    assert _real_texture(real, BINS, None)["real_value_range"] == (-0.6, 0.6)
    # 0.0 falls in bin 8, 0.5 in bin 14, -0.5 in bin 1: 6 bins to the nearest real lesion
    (other,) = _rows(0.0, {"mask_source": "sphere"}, real_values=(0.5, -0.5))
    assert math.isclose(other["histogram_w1"], 6 * 0.075)
    # -0.9 is clipped into the edge bin 0, one bin from -0.5
    (far,) = _rows(-0.9, {"mask_source": "sphere"}, real_values=(0.5, -0.5))
    assert math.isclose(far["histogram_w1"], 0.075)
    strict = SyntheticThresholds(max_histogram_w1=0.3, max_reject_fraction=1.0, boundary_gradient_ratio=(0.0, 100.0))
    result = run_synthetic_gate(pd.DataFrame([other]), SyntheticStats(0.5, 0.3, 0.9), strict, tmp_path / "g",
                                data_docs=False)  # fmt: skip
    assert list(result.rejected) == ["s#0"]
    assert "expected at most 0.3" in result.rejected["s#0"][0].detail


def test_removal_is_not_applicable_explicitly_and_no_real_lesion_rejects(tmp_path: Path) -> None:
    (removal,) = _rows(0.0, {"mask_source": "removal"})
    assert removal["histogram_reference"] == "none"
    assert math.isnan(removal["histogram_w1"])
    assert "histogram_w1 not applicable: a removal sample" in removal["notes"]
    (lonely,) = _rows(0.5, {"mask_source": "sphere"}, real_values=())
    lonely["sample_id"] = "lonely#0"
    assert math.isnan(lonely["histogram_w1"])
    assert math.isnan(lonely["nn_similarity"])
    assert "no real training lesion histogram to compare with" in lonely["notes"]
    (flat,) = _rows(0.5, {"mask_source": "sphere"}, real_gradient=NAN)
    flat["sample_id"] = "flat#0"
    assert math.isnan(flat["boundary_gradient_ratio"])
    result = _gate([removal, lonely, flat], tmp_path)
    assert sorted(result.rejected) == ["flat#0", "lonely#0"]  # the removal sample passes: W1 does not apply
    (ratio,) = result.rejected["flat#0"]
    assert ratio.column == "boundary_gradient_ratio"
    assert "no real lesion boundary gradient to compare with" in ratio.detail
    page = result.report_html.read_text()
    assert "histogram_reference != &#x27;none&#x27;" in page or "histogram_reference != 'none'" in page


def test_non_finite_dataset_statistic_fails_unless_not_measured_with_a_reason(tmp_path: Path) -> None:
    (row,) = _rows(0.5, {"mask_source": "sphere"})
    unexplained = _gate([row], tmp_path / "a", SyntheticStats(NAN, 0.3, math.inf))
    assert not unexplained.success
    details = {f.column: f.detail for f in unexplained.dataset_failures}
    assert set(details) == {"volume_ks_pvalue", "acceptance_rate"}
    assert "volume_ks_pvalue = nan is not finite" in details["volume_ks_pvalue"]
    assert "acceptance_rate = inf is not finite" in details["acceptance_rate"]
    # the stage's stats: one new volume vs one real one is not testable, said so; no fake p = 1.0
    stats = _population_stats(KsResult(NAN, 1.0, 1, 1), NAN, NAN, segmenter=False)
    assert math.isnan(stats.volume_ks_pvalue)
    assert set(stats.not_measured) == {"volume_ks_pvalue", "diversity", "acceptance_rate"}
    explained = _gate([row], tmp_path / "b", stats)
    assert explained.success, explained.dataset_failures
    page = explained.report_html.read_text()
    assert "the KS test needs 2 on each side" in page
    assert "no acceptance segmenter" in page


def test_nearest_histogram_w1() -> None:
    a, b, c = np.eye(4)[0], np.eye(4)[1], np.eye(4)[3]
    assert nearest_histogram_w1(a, [c, b], (0.0, 4.0)) == histogram_w1(a, b, (0.0, 4.0)) == 1.0
    assert math.isnan(nearest_histogram_w1(a, [], (0.0, 4.0)))
    assert math.isnan(nearest_histogram_w1(a, [np.zeros(4)], (0.0, 4.0)))
