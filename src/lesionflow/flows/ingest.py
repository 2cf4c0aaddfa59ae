"""The ingest flow: read a source into data/raw and run the raw quality gate (ingest -> validate-raw).

For new data arriving between nightly runs (a deployment triggered by hand or by an event): it takes the
workspace lock, records both stages in dvc.lock like the pipeline flow, and stops with the gate's report
attached when the raw gate fails. Point it at new data with the `ingest` section, e.g. `{"source": "s3://..."}`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lesionflow.flows.common import DEFAULT_LOCK_TIMEOUT_S, run_flow
from lesionflow.flows.forms import Overrides
from lesionflow.params import IngestParams, ProjectParams, QualityParams

FLOW_NAME = "lesionflow-ingest"
STAGE_NAMES = ("ingest", "validate-raw")


@flow(name=FLOW_NAME, log_prints=True)
def ingest_flow(
    workspace: str = ".",
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project: Overrides[ProjectParams] | None = None,
    ingest: Overrides[IngestParams] | None = None,
    quality: Overrides[QualityParams] | None = None,
    wait_for_lock: bool = True,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Ingest a source into data/raw (quarantining bad cases) and run the raw quality gate.

    Args:
        workspace: Workspace root (holds params.yaml, dvc.yaml and data/); relative to the worker's directory.
        params_file: params.yaml to read, relative to the workspace unless absolute.
        overrides: Extra `section.key=value` overrides, applied last (e.g. ingest.modality=CT).
        project: Overrides of params.yaml's `project` section; only the keys given replace params.yaml's values.
        ingest: Overrides of the `ingest` section (e.g. a new `source`); only the keys given are replaced.
        quality: Overrides of the `quality` section (raw gate thresholds); only the keys given are replaced.
        wait_for_lock: When another run holds the workspace, wait for it (true) or fail at once (false).
        lock_timeout_s: Longest wait for the workspace lock, in seconds (0: no limit).

    Returns:
        One result per stage (summary, outputs, findings, whether it was up to date).
    """
    result: list[dict[str, Any]] = run_flow(
        FLOW_NAME,
        STAGE_NAMES,
        workspace=workspace,
        params_file=params_file,
        overrides=overrides,
        sections={"project": project, "ingest": ingest, "quality": quality},
        wait_for_lock=wait_for_lock,
        lock_timeout_s=lock_timeout_s,
    )
    return result


if __name__ == "__main__":
    ingest_flow()
