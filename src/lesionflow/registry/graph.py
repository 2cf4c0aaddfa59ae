"""Lineage as a picture: data and code boxes -> run -> model version, drawn with matplotlib (no graphviz binary).

The output format follows the suffix (``.png`` or ``.svg``). Files carry no timestamp or software metadata and
SVG ids use a fixed salt, so drawing the same lineage twice gives identical bytes.
"""

from __future__ import annotations

from pathlib import Path

from lesionflow.registry.lineage import Lineage, cases_text, ordered_datasets, short
from lesionflow.registry.publish import NONE

_FORMATS = {".png": "png", ".svg": "svg"}
_WIDTH_CHARS = 37
_BOX_W = 2.6
_COLUMNS = (0.0, 3.4, 6.8)  # left edges: inputs, run, model
_COLORS = {"data": "#e8f1fb", "code": "#eef7e8", "run": "#fdf3e1", "model": "#f3e8fb"}


def _clip(text: str, width: int = _WIDTH_CHARS) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _tag(lineage: Lineage, key: str, digest: bool = False) -> str:
    value = lineage.tags.get(key)
    if value is None:
        return "not recorded"
    if value == NONE:
        return NONE
    return short(value) if digest else value


def _boxes(lineage: Lineage) -> tuple[list[tuple[str, str]], str, str]:
    """(inputs as (kind, label)), run label, model label."""
    inputs: list[tuple[str, str]] = []
    for dataset in ordered_datasets(lineage):
        lines = [f"{dataset.name} ({dataset.context or '?'})", f"{cases_text(dataset)}, digest {short(dataset.digest)}"]
        lines.append(_clip(dataset.source))
        if dataset.name == "synthetic":
            generator = dataset.tags.get("generator_model") or _tag(lineage, "lesionflow.generator_model")
            lines.append(_clip(f"generator {generator}"))
        inputs.append(("data", "\n".join(lines)))
    if not lineage.dataset("synthetic"):
        inputs.append(("data", f"synthetic: none\ngenerator {_tag(lineage, 'lesionflow.generator_model')}"))
    code = [
        "code",
        f"git {_tag(lineage, 'lesionflow.git_commit', digest=True)}",
        _clip(f"version {_tag(lineage, 'lesionflow.code_version')}"),
        f"dvc.lock {_tag(lineage, 'lesionflow.dvc_lock_sha256', digest=True)}",
        f"params {_tag(lineage, 'lesionflow.params_sha256', digest=True)}",
        f"plans {_tag(lineage, 'lesionflow.plans_hash', digest=True)}",
        _clip(f"prefect run {_tag(lineage, 'lesionflow.prefect_flow_run_id')}"),
    ]
    inputs.append(("code", "\n".join(code)))
    metrics = [_clip(f"{k} = {v:.4g}") for k, v in list(lineage.metrics.items())[:6]]
    run = "\n".join(
        [
            f"run {short(lineage.run_id)}",
            _clip(f"experiment {lineage.experiment_name}"),
            f"started {(lineage.start_time or '?')[:19]}",
            *metrics,
        ]
    )
    aliases = " ".join(f"@{a}" for a in lineage.aliases) or "no aliases"
    logged = lineage.source.removeprefix("models:/")
    model = "\n".join(
        [_clip(f"model {lineage.model_name} v{lineage.version}"), _clip(aliases), f"logged model {short(logged)}"]
    )
    return inputs, run, model


def _height(label: str) -> float:
    return 0.3 + 0.22 * (label.count("\n") + 1)


def lineage_graph(lineage: Lineage, path: Path) -> Path:
    """Draw ``lineage`` into ``path`` (``.png`` or ``.svg``) and return the path."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"lineage graph {path}: use a .png or .svg file name")
    inputs, run_label, model_label = _boxes(lineage)
    gap = 0.3
    heights = [_height(label) for _, label in inputs]
    total = max(sum(heights) + gap * (len(heights) - 1), _height(run_label), _height(model_label))
    with matplotlib.rc_context({"svg.hashsalt": "lesionflow", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(10.5, max(3.0, total * 0.62 + 0.6)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
        ax.set_xlim(-0.1, _COLUMNS[2] + _BOX_W + 0.1)
        ax.set_ylim(-0.1, total + 0.1)
        ax.axis("off")

        def box(x: float, y_top: float, label: str, kind: str) -> tuple[float, float, float]:
            h = _height(label)
            ax.add_patch(
                FancyBboxPatch(
                    (x, y_top - h), _BOX_W, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                    facecolor=_COLORS[kind], edgecolor="#555555", linewidth=1.0,
                )
            )  # fmt: skip
            ax.text(x + 0.1, y_top - 0.18, label, va="top", ha="left", fontsize=8, family="DejaVu Sans Mono")
            return x, y_top - h / 2, h

        def arrow(start: tuple[float, float], end: tuple[float, float]) -> None:
            ax.add_patch(
                FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#444444", linewidth=1.0)
            )

        y = total
        anchors = []
        for kind, label in inputs:
            _, mid, h = box(_COLUMNS[0], y, label, kind)
            anchors.append(mid)
            y -= h + gap
        run_top = total / 2 + _height(run_label) / 2
        _, run_mid, _ = box(_COLUMNS[1], run_top, run_label, "run")
        model_top = total / 2 + _height(model_label) / 2
        _, model_mid, _ = box(_COLUMNS[2], model_top, model_label, "model")
        for mid in anchors:
            arrow((_COLUMNS[0] + _BOX_W, mid), (_COLUMNS[1], run_mid))
        arrow((_COLUMNS[1] + _BOX_W, run_mid), (_COLUMNS[2], model_mid))
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata: dict[str, str | None] = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(path, format=fmt, metadata=metadata)
    return path
