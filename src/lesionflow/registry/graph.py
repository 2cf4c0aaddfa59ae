"""Lineage as a picture: the data chain raw -> processed -> ROIs -> generators -> synthetic -> model, drawn with
matplotlib (no graphviz binary).

:func:`lineage_spec` decides the nodes (each labelled with its full sha256) and the edges; :func:`lineage_graph`
only lays them out. The chain runs top to bottom in the left column; without synthetic data it is raw ->
processed -> model. The real training cases also feed the model directly (processed -> model, drawn around the
chain on the left), and the inputs beside the chain (plans, test split, other datasets, code) in the right column
point at the model. The output format follows the suffix (``.png`` or ``.svg``; SVG text stays text, so digests
can be searched). Files carry no timestamp or software metadata and SVG ids use a fixed salt, so drawing the
same lineage twice gives identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from lesionflow.registry.lineage import (
    NOT_RECORDED,
    DatasetLineage,
    Lineage,
    cases_text,
    generator_training_data,
    ordered_datasets,
    synthetic_generators,
)
from lesionflow.registry.publish import NONE

_FORMATS = {".png": "png", ".svg": "svg"}
_WIDTH_CHARS = 78  # a method name and a 64-hex digest fit on one line
_CHAIN = ("raw", "processed", "rois", "generators", "synthetic")
_COLORS = {"data": "#e8f1fb", "synthetic": "#fbeee8", "code": "#eef7e8", "model": "#f3e8fb"}
# layout, in inches (the axes span the figure one to one)
_BOX_W = 5.3
_LEFT, _RIGHT = 0.45, 6.15  # the chain column leaves room for the processed -> model bracket
_FIG_W = _RIGHT + _BOX_W + 0.15
_LINE_H = 0.13
_GAP = 0.32
_FONT = 7


@dataclass(frozen=True)
class Node:
    id: str  # "raw", "processed", "rois", "generators", "synthetic", "model", "plans", "test-split", "code", ...
    kind: str  # colour: data | synthetic | code | model
    label: str  # lines; every digest in full


@dataclass(frozen=True)
class LineageSpec:
    chain: tuple[Node, ...]  # the left column, top to bottom, ending with the model
    side: tuple[Node, ...]  # the right column: inputs of the model beside the chain
    edges: tuple[tuple[str, str], ...]  # (from id, to id)


def _clip(text: str, width: int = _WIDTH_CHARS) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _tag(lineage: Lineage, key: str) -> str:
    value = lineage.tags.get(key)
    return NOT_RECORDED if value is None else value


def _dataset_node(dataset: DatasetLineage, kind: str = "data") -> Node:
    lines = [
        f"{dataset.name} ({dataset.context or '?'}): {cases_text(dataset)}",
        f"sha256 {dataset.digest}",
        _clip(f"source {dataset.source}"),
    ]
    return Node(dataset.name, kind, "\n".join(lines))


def _model_node(lineage: Lineage) -> Node:
    aliases = " ".join(f"@{a}" for a in lineage.aliases) or "no aliases"
    weights = lineage.version_tags.get("lesionflow.model_sha256", NOT_RECORDED)
    metrics = [_clip(f"{k} = {v:.4g}") for k, v in list(lineage.metrics.items())[:4]]
    lines = [
        _clip(f"model {lineage.model_name} v{lineage.version} ({aliases})"),
        f"weights sha256 {weights}",
        _clip(f"run {lineage.run_id} ({lineage.experiment_name}), {lineage.source.removeprefix('models:/')}"),
        *metrics,
    ]
    return Node("model", "model", "\n".join(lines))


def _code_node(lineage: Lineage) -> Node:
    lines = [
        "code",
        f"git {_tag(lineage, 'lesionflow.git_commit')}",
        _clip(f"version {_tag(lineage, 'lesionflow.code_version')}"),
        f"dvc.lock {_tag(lineage, 'lesionflow.dvc_lock_sha256')}",
        f"params   {_tag(lineage, 'lesionflow.params_sha256')}",
        _clip(f"prefect run {_tag(lineage, 'lesionflow.prefect_flow_run_id')}"),
    ]
    return Node("code", "code", "\n".join(lines))


def lineage_spec(lineage: Lineage) -> LineageSpec:
    """The nodes and edges of ``lineage``: the chain raw -> processed [-> rois -> generators -> synthetic] -> model,
    processed -> model when synthetic data sits between them, and every other input -> model."""
    by_name = {d.name: d for d in ordered_datasets(lineage)}
    missing = f"\nsha256 {NOT_RECORDED}"
    chain = [
        _dataset_node(by_name["raw"]) if "raw" in by_name else Node("raw", "data", "raw" + missing),
        _dataset_node(by_name["processed"])
        if "processed" in by_name
        else Node("processed", "data", "processed" + missing),
    ]
    synthetic = by_name.get("synthetic")
    if synthetic is not None:
        generators = synthetic_generators(lineage)
        rois = generator_training_data(generators) or (NOT_RECORDED,)
        chain.append(
            Node("rois", "data", "\n".join(["ROIs (generator training data)", *(f"sha256 {d}" for d in rois)]))
        )
        lines = [f"{g.method:<9} sha256 {g.sha256}" for g in generators] or [NOT_RECORDED]
        chain.append(Node("generators", "synthetic", "\n".join(["generators", *lines])))
        chain.append(_dataset_node(synthetic, "synthetic"))
    chain.append(_model_node(lineage))
    edges = [(a.id, b.id) for a, b in pairwise(chain)]
    inputs = [*(_dataset_node(d) for name, d in by_name.items() if name not in _CHAIN), _code_node(lineage)]
    edges += [(node.id, "model") for node in inputs]
    if synthetic is None:  # said, with no edge: nothing synthetic reached the model
        generator = lineage.tags.get("lesionflow.generator_model") or NOT_RECORDED
        inputs.insert(0, Node("synthetic", "synthetic", f"synthetic: {NONE}\ngenerator {generator}"))
    else:
        edges.append(("processed", "model"))  # the real training cases, beside the synthetic ones
    return LineageSpec(tuple(chain), tuple(inputs), tuple(edges))


def _height(label: str) -> float:
    return 0.16 + _LINE_H * (label.count("\n") + 1)


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
    spec = lineage_spec(lineage)
    column = [_height(n.label) for n in spec.chain]
    side = [_height(n.label) for n in spec.side]
    total = max(sum(column) + _GAP * (len(column) - 1), sum(side) + _GAP * (len(side) - 1)) + 0.2
    with matplotlib.rc_context({"svg.hashsalt": "lesionflow", "svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(_FIG_W, total), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_xlim(0.0, _FIG_W)
        ax.set_ylim(0.0, total)
        ax.axis("off")
        where: dict[str, tuple[float, float, float]] = {}  # id -> x, y top, height

        def box(node: Node, x: float, top: float) -> float:
            h = _height(node.label)
            ax.add_patch(
                FancyBboxPatch(
                    (x, top - h), _BOX_W, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                    facecolor=_COLORS[node.kind], edgecolor="#555555", linewidth=1.0,
                )
            )  # fmt: skip
            ax.text(x + 0.08, top - 0.08, node.label, va="top", ha="left", fontsize=_FONT, family="DejaVu Sans Mono")
            where[node.id] = (x, top, h)
            return top - h - _GAP

        top = total - 0.1
        for node in spec.chain:
            top = box(node, _LEFT, top)
        model_top = where["model"][1]
        top = max(model_top, sum(side) + _GAP * (len(side) - 1) + 0.1)  # the side column ends beside the model
        for node in spec.side:
            top = box(node, _RIGHT, top)
        for a, b in spec.edges:
            (xa, ta, ha), (xb, tb, hb) = where[a], where[b]
            style = "-|>"
            if xa == xb and (a, b) == ("processed", "model") and len(spec.chain) > 3:
                start, end = (xa, ta - ha / 2), (xb, tb - hb / 2)  # around the chain, on its left
                connection = "arc,angleA=180,angleB=180,armA=22,armB=22,rad=6"
            elif xa == xb:
                start, end = (xa + _BOX_W / 2, ta - ha), (xb + _BOX_W / 2, tb)
                connection = "arc3"
            else:
                start, end = (xa, ta - ha / 2), (xb + _BOX_W, tb - hb / 2)
                connection = "arc3"
            ax.add_patch(
                FancyArrowPatch(
                    start, end, arrowstyle=style, mutation_scale=11, color="#444444", linewidth=1.0,
                    connectionstyle=connection, shrinkA=2, shrinkB=2,
                )
            )  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata: dict[str, str | None] = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(path, format=fmt, metadata=metadata)
    return path
