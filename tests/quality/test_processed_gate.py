"""The processed gate checks normalization where it happened, and stays strict for real faults (issue 17)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lesionflow.catalog.artifacts import METADATA
from lesionflow.catalog.readers import METADATA_COLUMNS
from lesionflow.errors import SourceError
from lesionflow.params import Params, load_params
from lesionflow.preprocess import ops
from lesionflow.preprocess.normstats import normalization_stats, stored_image_checks
from lesionflow.quality.processed_suite import run_processed_gate
from lesionflow.stages.registry import STAGES
from lesionflow.workspace import Workspace

TARGET = (1.5, 1.5, 2.0)


def _head(spacing: tuple[float, float, float], shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Noisy tissue in an ellipsoid with a brighter core; exactly 0 outside (skull-stripped MR)."""
    rng = np.random.default_rng(seed)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) * np.array(spacing)
    r = (((world - (np.array(shape) - 1) / 2 * np.array(spacing)) / np.array([13.0, 11.0, 12.0])) ** 2).sum(-1)
    image = rng.normal(300.0, 40.0, shape).astype(np.float32) + np.float32(200.0) * (r < 0.3)
    image[r >= 1] = 0.0
    return image


def _row(case_id: str, stored: np.ndarray, record: ops.PreprocessRecord) -> dict[str, Any]:
    """A metadata.csv row as the preprocess stage writes it (geometry columns from the record, no label)."""
    spacing = ops.spacing_of(np.asarray(record.final_affine))
    shape = stored.shape[1:]
    return {
        "case_id": case_id,
        "split": "train",
        "cache_key": "k",
        "digest": "d",
        **{f"shape_{a}": n for a, n in zip("xyz", shape, strict=True)},
        "shape_min": min(shape),
        "shape_max": max(shape),
        **{f"spacing_{a}": s for a, s in zip("xyz", spacing, strict=True)},
        "spacing_dev_mm": float(np.max(np.abs(np.subtract(spacing, TARGET)))),
        **dataclasses.asdict(stored_image_checks(stored, record.normalization)),
        "label_values_raw": "[]",
        "label_values_processed": "[]",
        "label_set_unchanged": True,
        "fg_volume_raw_mm3": 0.0,
        "fg_volume_processed_mm3": 0.0,
        "fg_kept_ratio": 1.0,
    }


def _case(seed: int, spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> tuple:
    image = _head(spacing, shape, seed)
    out, _, record = ops.preprocess_arrays(image, None, np.diag([*spacing, 1.0]), TARGET, {"schemes": ["zscore"]})
    return image, out, record


def test_mixed_spacings_pass_and_unnormalized_cases_are_still_rejected(tmp_path: Path) -> None:
    rows = []
    for seed in range(6):  # three 1 mm and three 2x2x3 mm cases, all resampled to TARGET
        spacing, shape = ((1.0, 1.0, 1.0), (30, 26, 28)) if seed % 2 else ((2.0, 2.0, 3.0), (15, 13, 10))
        _, out, record = _case(seed, spacing, shape)
        rows.append(_row(f"good_{seed}", out, record))

    image, out, record = _case(7, (2.0, 2.0, 3.0), (15, 13, 10))
    # 1. the record says the normalization was wrong (std 3 in its mask)
    (stats,) = record.normalization
    wrong_std = dataclasses.replace(record, normalization=(dataclasses.replace(stats, std=3.0),))
    rows.append(_row("record_std_3", out, wrong_std))
    # 2. an image that was never normalized, stored with the record of a proper normalization
    raw_crop = image[record.crop.slices()][None]
    raw_out = ops.resample_image(raw_crop, record.spacing_before, TARGET)
    rows.append(_row("stored_raw", raw_out, record))
    # 3. normalization skipped altogether: the statistics measured where it should have happened say so
    skipped = dataclasses.replace(record, normalization=normalization_stats(raw_crop, [raw_crop[0] != 0], ["zscore"]))
    rows.append(_row("not_normalized", raw_out, skipped))
    # 4. normalized with a 3x scale (the record right, the stored image not)
    rows.append(_row("scaled_3x", out * 3, record))
    table = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))

    result = run_processed_gate(table, Params().quality, tmp_path / "report")  # default params
    assert sorted(result.rejected) == ["not_normalized", "record_std_3", "scaled_3x", "stored_raw"]
    columns = {case: {c.column for c in checks} for case, checks in result.rejected.items()}
    assert columns["record_std_3"] == {"zscore_std_dev"}
    assert columns["stored_raw"] == {"range_excess"}
    assert columns["not_normalized"] == {"zscore_mean_abs", "zscore_std_dev"}  # image and record agree: raw
    assert columns["scaled_3x"] == {"range_excess"}
    detail = next(c.detail for c in result.rejected["stored_raw"])
    assert "quality.processed.max_range_excess" in detail
    assert "stored intensities" in detail
    # 4 of 10 rejected is more than the default 0.25: a dataset this broken fails as a whole
    assert not result.success


def test_empty_recorded_statistics_reject_the_case(tmp_path: Path) -> None:
    _, out, record = _case(0, (2.0, 2.0, 3.0), (15, 13, 10))
    rows = [_row(f"c{i}", out, record) for i in range(4)]
    rows[0]["zscore_std_dev"] = None  # GX skips nulls in between-checks; the not-null check must not
    table = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    result = run_processed_gate(table, Params().quality, tmp_path / "report")
    assert list(result.rejected) == ["c0"]
    assert result.success


def test_metadata_of_an_older_preprocess_is_refused_in_one_line(workspace: Path) -> None:
    ws = Workspace.at(workspace)
    path = METADATA.at(ws)
    path.parent.mkdir(parents=True)
    old_columns = [c for c in METADATA_COLUMNS if c not in ("intensity_min", "intensity_max", "range_excess")]
    path.write_text(",".join(old_columns) + "\n" + ",".join("0" for _ in old_columns) + "\n")
    with pytest.raises(SourceError) as err:
        STAGES["validate-processed"].run(ws, load_params(ws.params_file))
    message = str(err.value)
    assert "\n" not in message
    assert "range_excess" in message
    assert "lesionflow stage preprocess" in message
    assert not (ws.root / "data" / "processed" / "accepted.json").exists()
    assert json.loads(json.dumps(message)) == message
