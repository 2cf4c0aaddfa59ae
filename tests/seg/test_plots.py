"""Figures: valid PNGs of the documented pixel size, byte-identical across runs; slice choice."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lesionflow.seg.metrics import ClassMetrics, metrics_table
from lesionflow.seg.plots import CaseTile, case_montage_png, metrics_boxplot_png, pick_slice, training_curves_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert b"Software" not in data  # no version string, no timestamp chunk
    assert b"tIME" not in data
    return int(width), int(height)


def _twice(tmp_path: Path, draw: Callable[[Path], Path]) -> Path:
    first = draw(tmp_path / "a" / "figure.png")
    second = draw(tmp_path / "b" / "figure.png")
    assert first == tmp_path / "a" / "figure.png"
    assert first.read_bytes() == second.read_bytes()
    return first


def test_training_curves(tmp_path: Path) -> None:
    history = [
        {
            "step": float(s),
            "loss": 1.0 / (1 + s),
            "lr": 1e-3 * (1 - s / 20),
            **({"val_dice": s / 20} if s % 5 == 0 else {}),
        }
        for s in range(20)
    ]
    path = _twice(tmp_path, lambda p: training_curves_png(history, p))
    assert _png_size(path) == (1000, 400)
    no_val = training_curves_png([{"step": 0.0, "loss": 1.0, "lr": 0.1}], tmp_path / "no_val.png")
    assert _png_size(no_val) == (1000, 400)
    with pytest.raises(ValueError, match="lr"):
        training_curves_png([{"step": 0.0, "loss": 1.0}], tmp_path / "bad.png")


def test_metrics_boxplot(tmp_path: Path) -> None:
    rows = {
        f"case_{i}": [
            ClassMetrics(2, "tumour", 0.5 + 0.05 * i, 3.0 - 0.2 * i, 0.6 + 0.03 * i, 100, 90),
            ClassMetrics(5, "cyst", 0.9 - 0.1 * i, 1.0 + i, 0.8, 40, 45),
        ]
        for i in range(5)
    }
    path = _twice(tmp_path, lambda p: metrics_boxplot_png(metrics_table(rows), p))
    assert _png_size(path) == (1200, 400)
    assert _png_size(metrics_boxplot_png(metrics_table({}), tmp_path / "empty.png")) == (1200, 400)


def test_metrics_boxplot_leaves_undefined_values_out(tmp_path: Path) -> None:
    """A class absent from a case (all metrics NaN) draws exactly what the table without that row draws: a NaN
    must neither blank a box nor shift the points."""
    nan = float("nan")
    rows = {
        f"case_{i}": [
            ClassMetrics(2, "tumour", 0.5 + 0.1 * i, 2.0 + i, 0.6 + 0.05 * i, 100, 90 + i),
            ClassMetrics(5, "cyst", 0.9 - 0.1 * i, 1.0 + i, 0.8, 40, 45),
        ]
        for i in range(4)
    }
    rows["case_4"] = [ClassMetrics(2, "tumour", nan, nan, nan, 0, 0), ClassMetrics(5, "cyst", 0.3, 6.0, 0.4, 40, 9)]
    table = metrics_table(rows)
    with_nan = metrics_boxplot_png(table, tmp_path / "nan.png").read_bytes()
    without = table[~((table["case_id"] == "case_4") & (table["label"] == 2))]
    assert with_nan == metrics_boxplot_png(without, tmp_path / "without.png").read_bytes()


def _tile(title: str, shift: int) -> CaseTile:
    x, y = np.meshgrid(np.arange(24), np.arange(20), indexing="ij")
    image = np.sin(x / 4.0) + np.cos(y / 3.0)
    truth = np.zeros((24, 20), dtype=np.uint8)
    truth[5:12, 4:10] = 2
    truth[15:20, 12:18] = 5
    pred = np.roll(truth, shift, axis=0)
    return CaseTile(title, image, truth, pred)


def test_case_montage(tmp_path: Path) -> None:
    tiles = [_tile("best", 0), _tile("median", 1), _tile("worst", 3)]
    path = _twice(tmp_path, lambda p: case_montage_png(tiles, p))
    assert _png_size(path) == (900, 900)
    assert _png_size(case_montage_png(tiles[:1], tmp_path / "one.png")) == (900, 300)
    bad = CaseTile("bad", np.zeros((4, 4)), np.zeros((4, 5), dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="bad"):
        case_montage_png([bad], tmp_path / "bad.png")


def test_pick_slice() -> None:
    truth = np.zeros((6, 5, 9), dtype=np.uint8)
    pred = np.zeros_like(truth)
    assert pick_slice(truth, pred) == 4  # both empty: middle slice
    truth[1:3, 1:3, 2] = 2  # 4 voxels on slice 2
    pred[0:3, 0:3, 6] = 5  # 9 voxels on slice 6
    pred[1:3, 1:3, 2] = 2  # overlaps truth: slice 2 still counts 4
    assert pick_slice(truth, pred) == 6
    truth[:, :, 2] = 2  # 30 voxels
    assert pick_slice(truth, pred) == 2
    with pytest.raises(ValueError, match="same"):
        pick_slice(truth, pred[..., :3])


def test_montage_orientation_is_neurological_anterior_up(tmp_path: Path) -> None:
    from matplotlib.image import imread

    truth = np.zeros((24, 20), dtype=np.uint8)
    truth[16:24, 14:20] = 2  # high x (patient right) and high y (anterior)
    tile = CaseTile("orientation", np.zeros((24, 20)), truth, np.zeros_like(truth))
    pixels = imread(case_montage_png([tile], tmp_path / "o.png"))  # (rows, columns, RGBA), row 0 at the top
    middle = pixels[:, 300:600, :3]  # the truth panel
    red = (middle[..., 0] > 0.3) & (middle[..., 1] < 0.2) & (middle[..., 2] < 0.2)
    rows, cols = np.nonzero(red)
    assert rows.size > 50
    assert cols.mean() > 150  # right half of the panel: x increases to the right
    assert rows.mean() < 150  # upper half: anterior is up
