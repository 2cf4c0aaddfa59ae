"""The stage registry: the one list of stages the CLI, dvc.yaml and the Prefect flows all use.

Each stage is a plain function ``run(workspace, params) -> StageResult``; ``deps``/``outs`` are the
workspace-relative paths dvc.yaml must declare for it (``${...}`` is DVC's params templating). A test
parses dvc.yaml and checks it against this registry, so the two paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lesionflow.params import Params
from lesionflow.stages import ingest, validate_raw
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[Workspace, Params], StageResult]
    description: str
    params: tuple[str, ...]  # params.yaml keys (sections or dotted keys) the stage reads
    deps: tuple[str, ...]
    outs: tuple[str, ...] = ()  # cached outputs
    metrics: tuple[str, ...] = ()  # small JSON outputs DVC shows with `dvc metrics show` (cache: false)
    uncached_outs: tuple[str, ...] = ()  # reports that are rebuilt, not versioned (cache: false)


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="ingest",
            run=ingest.run,
            description="Read the source (folder, dataset.json, DICOM, s3://) into data/raw; quarantine bad cases.",
            params=("project.seed", "ingest"),
            deps=("${ingest.source}", "src/lesionflow/io", "src/lesionflow/stages/ingest.py"),
            metrics=("reports/ingest/summary.json",),
        ),
        StageSpec(
            name="validate-raw",
            run=validate_raw.run,
            description="Raw quality gate (great-expectations) over the per-volume metadata; quarantine failing cases.",
            params=("quality",),
            deps=("reports/ingest/summary.json", "src/lesionflow/quality", "src/lesionflow/stages/validate_raw.py"),
            metrics=("reports/validate-raw/summary.json",),
            uncached_outs=("reports/quality/raw",),
        ),
    )
}


def pipeline_order() -> list[str]:
    """Stages in the order the training pipeline runs them."""
    return list(STAGES)
