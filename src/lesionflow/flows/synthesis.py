"""The synthesis flow: extract-rois -> train-generator -> synthesize -> validate-synthetic.

Regenerates the synthetic lesions on data that is already ingested, planned, preprocessed and through the
processed gate (it refuses, in one line, when one of those stages never ran in the workspace). Useful to try
other generators or sample counts without rerunning the rest; the next training run picks up the accepted
samples. The workspace lock is held for the whole run, and a failed synthetic gate stops it with its report
and montage attached.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lesionflow.flows.common import DEFAULT_LOCK_TIMEOUT_S, require_done, run_flow
from lesionflow.flows.forms import Overrides
from lesionflow.params import (
    EvaluateParams,
    Params,
    PreprocessParams,
    ProjectParams,
    QualityParams,
    RegistryParams,
    TrainParams,
)
from lesionflow.params_synth import SynthParams
from lesionflow.workspace import Workspace

FLOW_NAME = "lesionflow-synthesis"
STAGE_NAMES = ("extract-rois", "train-generator", "synthesize", "validate-synthetic")


def _prerequisites(ws: Workspace, params: Params) -> None:
    require_done(ws, params, STAGE_NAMES[0], FLOW_NAME)


@flow(name=FLOW_NAME, log_prints=True)
def synthesis_flow(
    workspace: str = ".",
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project: Overrides[ProjectParams] | None = None,
    synth: Overrides[SynthParams] | None = None,
    quality: Overrides[QualityParams] | None = None,
    train: Overrides[TrainParams] | None = None,
    registry: Overrides[RegistryParams] | None = None,
    preprocess: Overrides[PreprocessParams] | None = None,
    evaluate: Overrides[EvaluateParams] | None = None,
    wait_for_lock: bool = True,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Train the lesion generators, synthesize samples and run the synthetic gate on processed data.

    Args:
        workspace: Workspace root (holds params.yaml, dvc.yaml and data/); relative to the worker's directory.
        params_file: params.yaml to read, relative to the workspace unless absolute.
        overrides: Extra `section.key=value` overrides, applied last (e.g. synth.new_per_case=2).
        project: Overrides of params.yaml's `project` section; only the keys given replace params.yaml's values.
        synth: Overrides of the `synth` section (generators, sample counts); only the keys given are replaced.
        quality: Overrides of the `quality` section (the synthetic gate's thresholds); only the keys given.
        train: Overrides of the `train` section (val_fraction picks the cases synthesis uses); only the keys given.
        registry: Overrides of the `registry` section (the acceptance filter's champion); only the keys given.
        preprocess: Overrides of the `preprocess` section (memory_limit of each worker); only the keys given.
        evaluate: Overrides of the `evaluate` section (device of the acceptance filter); only the keys given.
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
        sections={
            "project": project,
            "synth": synth,
            "quality": quality,
            "train": train,
            "registry": registry,
            "preprocess": preprocess,
            "evaluate": evaluate,
        },
        wait_for_lock=wait_for_lock,
        lock_timeout_s=lock_timeout_s,
        before=_prerequisites,
    )
    return result


if __name__ == "__main__":
    synthesis_flow()
