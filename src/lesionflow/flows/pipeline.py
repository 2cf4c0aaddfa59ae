"""The training pipeline flow (the nightly retrain): every registered stage in order, each as a Prefect task.

Stages: ingest -> validate-raw -> plan -> preprocess -> validate-processed -> extract-rois -> train-generator ->
synthesize -> validate-synthetic -> train -> evaluate -> validate-metrics -> register. Every gate stops the flow
when it fails, with its failed expectations and HTML report attached to the run as artifacts. After each stage
the flow runs ``dvc commit`` for it (and data.dvc), so dvc.lock records what the flow produced and
``dvc status`` is clean. The workspace lock is held for the whole run.

The parameters are typed, so the Prefect UI's "Custom run" form shows each params section with its keys, types,
bounds and descriptions; its inputs start empty and only the keys filled in replace params.yaml's values
(``lesionflow.flows.forms``; ``lesionflow.flows.common.resolve_params`` merges them over params.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lesionflow.flows.common import DEFAULT_LOCK_TIMEOUT_S, run_flow
from lesionflow.flows.forms import Overrides
from lesionflow.params import (
    EvaluateParams,
    IngestParams,
    PlanParams,
    PreprocessParams,
    ProjectParams,
    QualityParams,
    RegistryParams,
    StorageParams,
    TrainParams,
)
from lesionflow.params_synth import SynthParams
from lesionflow.stages.registry import pipeline_order

FLOW_NAME = "lesionflow-pipeline"


@flow(name=FLOW_NAME, log_prints=True)
def training_pipeline(
    workspace: str = ".",
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project: Overrides[ProjectParams] | None = None,
    ingest: Overrides[IngestParams] | None = None,
    quality: Overrides[QualityParams] | None = None,
    plan: Overrides[PlanParams] | None = None,
    preprocess: Overrides[PreprocessParams] | None = None,
    synth: Overrides[SynthParams] | None = None,
    train: Overrides[TrainParams] | None = None,
    evaluate: Overrides[EvaluateParams] | None = None,
    registry: Overrides[RegistryParams] | None = None,
    storage: Overrides[StorageParams] | None = None,
    wait_for_lock: bool = True,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Run every stage in order in a workspace; a failed quality gate stops the run with its report attached.

    Args:
        workspace: Workspace root (holds params.yaml, dvc.yaml and data/); relative to the worker's directory.
        params_file: params.yaml to read, relative to the workspace unless absolute.
        overrides: Extra `section.key=value` overrides, applied last (e.g. train.steps=500).
        project: Overrides of params.yaml's `project` section; only the keys given replace params.yaml's values.
        ingest: Overrides of the `ingest` section (e.g. a new `source`); only the keys given are replaced.
        quality: Overrides of the `quality` section (gate thresholds); only the keys given are replaced.
        plan: Overrides of the `plan` section; only the keys given are replaced.
        preprocess: Overrides of the `preprocess` section (Dask workers, scheduler address); only the keys given.
        synth: Overrides of the `synth` section (generators, sample counts); only the keys given are replaced.
        train: Overrides of the `train` section (network, steps, device); only the keys given are replaced.
        evaluate: Overrides of the `evaluate` section; only the keys given are replaced.
        registry: Overrides of the `registry` section (MLflow server, model name); only the keys given.
        storage: Overrides of the `storage` section (the team's s3://bucket/prefix, retries); only the keys given.
        wait_for_lock: When another run holds the workspace, wait for it (true) or fail at once (false).
        lock_timeout_s: Longest wait for the workspace lock, in seconds (0: no limit).

    Returns:
        One result per stage (summary, outputs, findings, whether it was up to date).
    """
    sections = {
        "project": project,
        "ingest": ingest,
        "quality": quality,
        "plan": plan,
        "preprocess": preprocess,
        "synth": synth,
        "train": train,
        "evaluate": evaluate,
        "registry": registry,
        "storage": storage,
    }
    result: list[dict[str, Any]] = run_flow(
        FLOW_NAME,
        pipeline_order(),
        workspace=workspace,
        params_file=params_file,
        overrides=overrides,
        sections=sections,
        wait_for_lock=wait_for_lock,
        lock_timeout_s=lock_timeout_s,
    )
    return result


if __name__ == "__main__":
    training_pipeline()
