"""Training and evaluation figures as deterministic PNG files (same inputs -> same bytes).

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no backend switch), at a
fixed size and dpi (so the pixel size is known: ``figsize * DPI``), and saved with ``metadata={"Software":
None}`` so no version string or timestamp ends up in the file. Jitter of overlaid points is a fixed
pattern, not random.

Slice display convention (the same as :mod:`lesionflow.viz`): arrays are RAS-ordered ``(x, y)`` slices of
an axial plane; they are drawn transposed with the origin at the bottom, so x (patient Right) increases to
the right of the picture and y (Anterior) increases upwards: *neurological* convention (patient right on
viewer right, anterior up), seen from above (superior).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionflow.viz import window

DPI = 100
# One colour per label value (value v uses LABEL_COLOURS[(v - 1) % len]); truth and prediction share it.
LABEL_COLOURS = ("#ffd400", "#ff3b30", "#34c759", "#0a84ff", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f")
_METRIC_PANELS = (("dice", "Dice", (0.0, 1.02)), ("hd95_mm", "HD95 (mm)", None), ("nsd", "NSD", (0.0, 1.02)))


@dataclass(frozen=True)
class CaseTile:
    """One montage row: an axial slice ``(x, y)`` of the image (float, normalized units) and of the truth and
    predicted label maps (integer label values, same shape), RAS-ordered."""

    title: str
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray


def figure(width_in: float, height_in: float) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot state), ``width_in x height_in`` inches at DPI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG without the Software tag (same figure, same bytes); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#666666")


def training_curves_png(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Two panels (1000 x 400 px): training loss (and learning rate, right axis) against step, and validation
    Dice against step for the rows that have ``val_dice``. Rows need ``step``, ``loss``, ``lr``; linear axes."""
    for i, row in enumerate(history):
        missing = [k for k in ("step", "loss", "lr") if k not in row]
        if missing:
            raise ValueError(f"history row {i} lacks {missing}: expected keys step, loss, lr (val_dice optional)")
    fig = figure(10.0, 4.0)
    ax_loss, ax_dice = fig.subplots(1, 2)
    steps = [float(r["step"]) for r in history]
    if history:
        ax_loss.plot(steps, [float(r["loss"]) for r in history], color="#0a84ff", linewidth=1.2, label="loss")
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [float(r["lr"]) for r in history], color="#8e8e93", linewidth=1.0, linestyle="--")
        ax_lr.set_ylabel("learning rate (dashed)")
    else:
        _no_data(ax_loss, "no training steps")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss")

    val = [(float(r["step"]), float(r["val_dice"])) for r in history if r.get("val_dice") is not None]
    if val:
        ax_dice.plot([s for s, _ in val], [d for _, d in val], color="#34c759", marker="o", markersize=3)
    else:
        _no_data(ax_dice, "no validation")
    ax_dice.set_ylim(0.0, 1.02)
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("mean validation Dice")
    ax_dice.set_title("Validation Dice")
    fig.tight_layout()
    return save_png(fig, path)


def _jitter(n: int, width: float = 0.25) -> np.ndarray:
    """A fixed spread of ``n`` offsets in [-width/2, width/2] (deterministic, no RNG)."""
    if n <= 1:
        return np.zeros(n)
    return (np.arange(n) * 0.618034 % 1.0 - 0.5) * width


def metrics_boxplot_png(table: pd.DataFrame, path: Path) -> Path:
    """Three panels (1200 x 400 px): per-class box plots of Dice, HD95 (mm) and NSD from a
    :func:`lesionflow.seg.metrics.metrics_table` table, one box per class (label order) with every case
    drawn as a point on top; undefined (NaN) values are left out."""
    missing = [c for c in ("label", "name", "dice", "hd95_mm", "nsd") if c not in table.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}: expected a metrics_table() result")
    fig = figure(12.0, 4.0)
    axes = fig.subplots(1, 3)
    labels = sorted(int(v) for v in table["label"].unique())
    names = [str(table.loc[table["label"] == v, "name"].iloc[0]) for v in labels]
    for ax, (column, title, ylim) in zip(axes, _METRIC_PANELS, strict=True):
        # undefined values (NaN, lesionflow.seg.metrics' empty-mask convention) are not drawn
        groups = [table.loc[table["label"] == v, column].dropna().to_numpy(dtype=np.float64) for v in labels]
        if groups:
            ax.boxplot(groups, positions=list(range(1, len(groups) + 1)), widths=0.5, showfliers=False)
            for i, (value, values) in enumerate(zip(labels, groups, strict=True)):
                colour = LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]
                ax.scatter(i + 1 + _jitter(len(values)), values, s=12, color=colour, edgecolors="black", zorder=3)
            ax.set_xticks(list(range(1, len(groups) + 1)), names)
        else:
            _no_data(ax, "no cases")
        if ylim is not None:
            ax.set_ylim(*ylim)
        elif groups:
            ax.set_ylim(bottom=0.0)
        ax.set_xlabel("class")
        ax.set_ylabel(title)
        ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def pick_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """Axial (z, last axis) index of ``(x, y, z)`` label maps with the most voxels labelled in truth or
    prediction (ties: the lowest index); the middle slice ``z // 2`` when both are empty."""
    if truth.shape != pred.shape or truth.ndim != 3:
        raise ValueError(f"truth shape {truth.shape} / prediction shape {pred.shape}: expected the same (x, y, z)")
    counts = np.count_nonzero((truth > 0) | (pred > 0), axis=(0, 1))
    if not counts.any():
        return int(truth.shape[2] // 2)
    return int(np.argmax(counts))


def _overlay(ax: Any, labels: np.ndarray) -> None:
    from matplotlib.colors import to_rgba

    values = [int(v) for v in np.unique(labels) if v > 0]
    rgba = np.zeros((*labels.T.shape, 4), dtype=np.float32)
    for value in values:
        rgba[(labels == value).T] = to_rgba(LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)], alpha=0.45)
    ax.imshow(rgba, origin="lower", interpolation="nearest")
    for value in values:
        mask = (labels == value).T.astype(np.float32)
        colour = LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]
        ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.8)  # Z[0, 0] at (0, 0), like imshow


def case_montage_png(rows: Sequence[CaseTile], path: Path) -> Path:
    """One row per case (900 px wide, 300 px high per row), three columns: the image slice, the
    image with the ground truth, the image with the prediction (filled overlay + contour, one colour per label
    value). Orientation: neurological, anterior up (module docstring)."""
    for tile in rows:
        if tile.image.ndim != 2 or tile.truth.shape != tile.image.shape or tile.pred.shape != tile.image.shape:
            raise ValueError(
                f"tile {tile.title!r}: image {tile.image.shape}, truth {tile.truth.shape}, pred {tile.pred.shape}; "
                "expected three (x, y) slices of the same shape"
            )
    n = max(1, len(rows))
    fig = figure(9.0, 3.0 * n)
    axes = fig.subplots(n, 3, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not rows:
        _no_data(axes[0, 1], "no cases")
    for row_axes, tile in zip(axes, rows, strict=False):
        lo, hi = window(tile.image, is_ct=False)
        panels = ((None, "image"), (tile.truth, "truth"), (tile.pred, "prediction"))
        for ax, (labels, suffix) in zip(row_axes, panels, strict=True):
            ax.imshow(
                np.nan_to_num(tile.image.T), cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest"
            )
            if labels is not None:
                _overlay(ax, labels)
            ax.set_title(f"{tile.title}: {suffix}", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def loss_curves_png(histories: Mapping[str, Sequence[float]], path: Path) -> Path:
    """One panel per named loss history (e.g. one per generator), loss against optimizer step, log y-axis."""
    names = list(histories) or ["none"]
    fig = figure(4.0 * len(names), 3.2)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        values = [float(v) for v in histories.get(name, [])]
        if values and all(v > 0 for v in values):
            ax.plot(range(1, len(values) + 1), values, color="#0a84ff", linewidth=1.0)
            ax.set_yscale("log")
        else:
            _no_data(ax, "no steps")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(name)
    fig.tight_layout()
    return save_png(fig, path)
