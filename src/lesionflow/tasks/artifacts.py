"""Prefect UI artifacts for each stage, built from what the stage wrote under reports/ (stages never import Prefect).

What a run shows in the UI (keys are stable, so the Artifacts page keeps one versioned history per key):

* every gate (validate-raw, validate-processed, validate-synthetic, validate-metrics): ``<stage>-failed-checks``,
  a table of failed expectations (dataset-level failures first, then rejected cases), and ``<stage>-report``, a
  link to its HTML report. Both come from ``reports/quality/<gate>/summary.json``, which the gate writes before
  it decides, so a failed gate publishes them too and the failed flow run carries its report.
* train: ``train-metrics`` (the summary's numbers) and ``train-curves`` (the loss/Dice plot); train-generator:
  ``train-generator-curves``; evaluate: ``evaluate-metrics``.
* synthesize: ``synthesize-samples`` (samples per kind); validate-synthetic: ``validate-synthetic-montage`` (real vs
  synthetic lesions). synthesize itself draws no montage: the gate draws it from the samples it checks.
* register: ``register-model``, markdown with the model version, aliases, champion decision and its lineage
  command (plus the MLflow UI link when the registry is a server).

Images are inlined as ``data:image/png;base64`` URLs: the UI shows an image artifact with ``<img src=URL>``, and a
browser does not load ``file://`` images into an ``http://`` page. An image above ``MAX_INLINE_IMAGE_BYTES``
is published as a link instead, to keep the Prefect database small. Links to files under ``reports/`` (gate
reports, large images) point at the report server of ``lesionflow serve`` when the flow runs under it
(:data:`lesionflow.serve.REPORTS_URL_ENV`, ``http://127.0.0.1:<port + 1>/...``); a browser blocks ``file://``
links from the UI, so the ``file://`` fallback (a flow run outside serve) says how to get a served link.

Publishing is best effort: the stage has already succeeded (or failed for its own reason) when its artifacts are
made, so an API error here is logged as one warning line and never changes the outcome. Prefect's client already
retries API calls with backoff (PREFECT_CLIENT_MAX_RETRIES), so there is no retry layer here.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lesionflow.catalog.artifacts import METRICS, Artifact, Dvc, Kind
from lesionflow.catalog.readers import read_json, stage_summary
from lesionflow.params import Params
from lesionflow.stages.registry import STAGES
from lesionflow.workspace import Workspace

MAX_INLINE_IMAGE_BYTES = 512 * 1024
ArtifactKind = Literal["table", "link", "markdown", "image"]


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact to publish: plain data, so what a stage shows can be tested without a Prefect server."""

    kind: ArtifactKind
    key: str  # lowercase letters, digits and dashes (Prefect's rule for keyed artifacts)
    description: str
    table: list[dict[str, Any]] | dict[str, list[Any]] | None = None
    link: str = ""
    link_text: str = ""
    markdown: str = ""
    image_url: str = ""


def gate_reports(stage: str) -> tuple[Artifact, ...]:
    """The gate report folders a stage writes (from its declaration)."""
    return tuple(a for a in STAGES[stage].writes if a.kind is Kind.GATE_REPORT)


def pictures(stage: str) -> tuple[Artifact, ...]:
    """The PNG reports a stage writes (from its declaration)."""
    return tuple(a for a in STAGES[stage].writes if a.dvc is Dvc.REPORT and a.path.endswith(".png"))


def _key(artifact: Artifact) -> str:
    """A stable Prefect artifact key from the catalog name (``train.curves`` -> ``train-curves``)."""
    return artifact.name.removesuffix(".report").replace(".", "-")


def report_link(ws: Workspace, path: Path) -> str:
    """The URL a browser opens for a file under ``reports/``: served by ``lesionflow serve``, else ``file://``."""
    import os
    from urllib.parse import quote

    from lesionflow.serve import REPORTS_URL_ENV

    base = os.environ.get(REPORTS_URL_ENV, "")
    reports = ws.root / "reports"
    if base and path.resolve().is_relative_to(reports.resolve()):
        return base.rstrip("/") + "/" + quote(path.resolve().relative_to(reports.resolve()).as_posix())
    return path.resolve().as_uri()


_UNSERVED = " (file link: browsers open it only outside the UI; under `lesionflow serve` this is an http link)"


def _link_note(link: str) -> str:
    return _UNSERVED if link.startswith("file://") else ""


def image_artifact(ws: Workspace, stage: str, artifact: Artifact) -> list[ArtifactSpec]:
    rel, key, what = artifact.path, _key(artifact), artifact.description
    path = artifact.at(ws)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        link = report_link(ws, path)
        return [
            ArtifactSpec(
                "link",
                key,
                f"{stage}: {what} ({len(data) // 1024} KiB, not inlined){_link_note(link)}",
                link=link,
                link_text=rel,
            )
        ]
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return [ArtifactSpec("image", key, f"{stage}: {what} ({rel})", image_url=url)]


def _number_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """(metric, value) rows for the scalar numbers and short strings of a summary, in key order."""
    rows = []
    for key in sorted(summary):
        value = summary[key]
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            rows.append({"metric": key, "value": None if math.isnan(value) else round(value, 6)})
        elif isinstance(value, int):
            rows.append({"metric": key, "value": value})
    return rows


def gate_artifacts(ws: Workspace, stage: str, gate: Artifact) -> list[ArtifactSpec]:
    """The failed-expectations table and the HTML report link of one gate report (empty when it wrote nothing)."""
    folder = gate.at(ws)
    summary = read_json(folder / "summary.json")
    if summary is None:
        return []
    rows: dict[str, list[Any]] = {"case": [], "check": [], "detail": []}

    def add(case: str, check: dict[str, Any]) -> None:
        expectation = str(check.get("expectation", "")).removeprefix("expect_")
        rows["case"].append(case)
        rows["check"].append(f"{check['column']}: {expectation}" if check.get("column") else expectation)
        rows["detail"].append(str(check.get("detail", "")))

    for check in summary.get("dataset_failures", []):
        add("(dataset)", check)
    for case, checks in sorted(summary.get("rejected", {}).items()):
        for check in checks:
            add(case, check)
    verdict = "PASSED" if summary.get("success") else "FAILED"
    line = (
        f"{summary.get('gate', stage)} gate {verdict}: {summary.get('n_cases', 0)} cases, "
        f"{summary.get('n_rejected', 0)} rejected, {len(summary.get('dataset_failures', []))} dataset-level failure(s)"
    )
    specs = [
        ArtifactSpec(
            "table", f"{_key(gate)}-failed-checks", f"{line}. Failed expectations (none when empty).", table=rows
        )
    ]
    report = folder / "index.html"
    if report.is_file():
        link = report_link(ws, report)
        specs.append(
            ArtifactSpec(
                "link",
                f"{_key(gate)}-report",
                f"{line}. HTML report (GX Data Docs linked inside){_link_note(link)}.",
                link=link,
                link_text=f"{stage} report",
            )
        )
    return specs


def _train(ws: Workspace, result: dict[str, Any] | None, params: Params) -> list[ArtifactSpec]:
    summary = stage_summary(ws, "train")
    specs = (
        [
            ArtifactSpec(
                "table",
                "train-metrics",
                "train: training summary (steps, loss, validation Dice, speed)",
                table=_number_rows(summary),
            )
        ]
        if summary
        else []
    )
    return specs


def _evaluate(ws: Workspace, result: dict[str, Any] | None, params: Params) -> list[ArtifactSpec]:
    metrics = read_json(METRICS.at(ws))
    if not metrics:
        return []
    return [
        ArtifactSpec(
            "table",
            "evaluate-metrics",
            f"evaluate: test-split metrics ({METRICS.path})",
            table=_number_rows(metrics),
        )
    ]


def _synthesize(ws: Workspace, result: dict[str, Any] | None, params: Params) -> list[ArtifactSpec]:
    summary = stage_summary(ws, "synthesize")
    if not summary:
        return []
    by_kind = summary.get("by_kind", {})
    rows = [{"kind": kind, "samples": int(n)} for kind, n in sorted(by_kind.items())]
    rows.append({"kind": "total", "samples": int(summary.get("n_samples", 0))})
    what = (
        f"synthesize: synthetic samples per kind ({summary.get('n_lesions', 0)} lesions; "
        f"generators {summary.get('generator_model', '?')})"
    )
    return [ArtifactSpec("table", "synthesize-samples", what, table=rows)]


def _register(ws: Workspace, result: dict[str, Any] | None, params: Params) -> list[ArtifactSpec]:
    from lesionflow.io.remote import redact_uri
    from lesionflow.registry.tracking import is_http, resolve_tracking_uri

    summary = stage_summary(ws, "register")
    if not summary:
        return []
    name, version = summary.get("model_name", "?"), summary.get("version", "?")
    uri = resolve_tracking_uri(params.registry.tracking_uri, ws.root)
    lines = [
        f"# Model `{name}` version {version}",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| aliases | {', '.join(summary.get('aliases', [])) or 'none'} |",
        f"| champion decision | {summary.get('champion_status', '?')} |",
        f"| reused an existing version | {summary.get('reused_existing_version', False)} |",
        f"| MLflow run | `{summary.get('run_id', '?')}` |",
        f"| model URI | `{summary.get('model_uri', '?')}` |",
        f"| registry | `{redact_uri(uri)}` |",
        "",
        "Lineage (data digests, dvc.lock, git commit, params, this flow run):",
        "",
        f"```\n{summary.get('lineage', f'lesionflow lineage {name}/{version}')}\n```",
    ]
    if is_http(uri):
        lines += ["", f"[Open in the MLflow UI]({redact_uri(uri).rstrip('/')}/#/models/{name}/versions/{version})"]
    return [
        ArtifactSpec(
            "markdown", "register-model", f"register: {name} v{version} and its lineage", markdown="\n".join(lines)
        )
    ]


_PUBLISHERS: dict[str, Callable[[Workspace, dict[str, Any] | None, Params], list[ArtifactSpec]]] = {
    "train": _train,
    "evaluate": _evaluate,
    "synthesize": _synthesize,
    "register": _register,
}


def stage_artifacts(
    stage: str, ws: Workspace, params: Params, result: dict[str, Any] | None, *, gate_failed: bool = False
) -> list[ArtifactSpec]:
    """What stage ``stage`` shows in the UI, from its report files.

    ``result`` is the stage's result, or None when it failed. ``gate_failed``: it failed as a gate (GateFailed),
    after writing its report and pictures, so they describe this run; after any other failure the files on disk
    may be an earlier run's, and nothing is published.
    """
    gates = gate_reports(stage)
    if result is None and not (gate_failed and gates):
        return []
    specs = [spec for gate in gates for spec in gate_artifacts(ws, stage, gate)]
    publisher = _PUBLISHERS.get(stage)
    if publisher is not None:
        specs += publisher(ws, result, params)
    return specs + [spec for picture in pictures(stage) for spec in image_artifact(ws, stage, picture)]


def create(spec: ArtifactSpec) -> None:
    """Create one artifact in the current Prefect run (flow or task)."""
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    if spec.kind == "table":
        create_table_artifact(table=spec.table or [], key=spec.key, description=spec.description)
    elif spec.kind == "link":
        create_link_artifact(
            link=spec.link, link_text=spec.link_text or None, key=spec.key, description=spec.description
        )
    elif spec.kind == "markdown":
        create_markdown_artifact(markdown=spec.markdown, key=spec.key, description=spec.description)
    else:
        create_image_artifact(image_url=spec.image_url, key=spec.key, description=spec.description)


def publish(specs: list[ArtifactSpec]) -> list[str]:
    """Create ``specs`` in the current run; the keys created. A failing API call is one warning, never an error."""
    import httpx
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.exceptions import PrefectException
    from prefect.logging import get_run_logger

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return []  # called outside a run (e.g. a unit test of the task function): nothing to attach to
    created = []
    for spec in specs:
        try:
            create(spec)
        except (httpx.HTTPError, PrefectException, OSError, ValueError) as err:
            get_run_logger().warning(
                "artifact %s not published: %s", spec.key, str(err).splitlines()[0] if str(err) else type(err).__name__
            )
            continue
        created.append(spec.key)
    return created
