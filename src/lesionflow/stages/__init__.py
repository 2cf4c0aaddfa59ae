"""The stage registry: the one list of stages the CLI, dvc.yaml and the Prefect flows all use.

Each stage is a plain function ``run(workspace, params) -> StageResult``; ``deps``/``outs`` are the
workspace-relative paths dvc.yaml must declare for it (``${...}`` is DVC's params templating). A test
parses dvc.yaml and checks it against this registry, so the two paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lesionflow.params import Params
from lesionflow.stages import (
    evaluate,
    extract_rois,
    ingest,
    plan,
    preprocess,
    register,
    synthesize,
    train,
    train_generator,
    validate_metrics,
    validate_processed,
    validate_raw,
    validate_synthetic,
)
from lesionflow.stages.base import StageResult
from lesionflow.workspace import Workspace


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[Workspace, Params], StageResult]
    inputs: Callable[[Workspace, Params], dict[str, str] | None]  # content digests the stage reads
    description: str
    params: tuple[str, ...]  # params.yaml keys (sections or dotted keys) the stage reads
    deps: tuple[str, ...]  # dvc.yaml deps
    outs: tuple[str, ...] = ()  # cached outputs (dvc.yaml outs)
    persist_outs: tuple[str, ...] = ()  # outputs DVC must not delete before a run (per-case caching inside)
    metrics: tuple[str, ...] = ()  # small JSON outputs DVC shows with `dvc metrics show` (cache: false)
    uncached_outs: tuple[str, ...] = ()  # reports that are rebuilt, not versioned (cache: false)
    state_outputs: tuple[str, ...] = ()  # outputs whose digest is part of the stage's cache state
    plots: tuple[str, ...] = ()  # CSV files `dvc plots show` renders (cache: false)
    uses_dask: bool = False  # fans out on a Dask cluster (a flow run shares one between such stages)

    @property
    def zarr_stores(self) -> tuple[str, ...]:
        """The Zarr stores among the outputs: what a flow publishes to the team storage after the stage."""
        return tuple(path for path in (*self.outs, *self.persist_outs) if path.endswith(".zarr"))


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="ingest",
            run=ingest.run,
            inputs=ingest.inputs,
            description="Read the source (folder, dataset.json, DICOM, s3://) into data/raw; quarantine bad cases.",
            params=("project.seed", "ingest"),
            deps=("${ingest.source}", "src/lesionflow/io", "src/lesionflow/stages/ingest.py"),
            metrics=("reports/ingest/summary.json",),
            state_outputs=("reports/ingest/summary.json",),
        ),
        StageSpec(
            name="validate-raw",
            run=validate_raw.run,
            inputs=validate_raw.inputs,
            description="Raw quality gate (great-expectations) over the per-volume metadata; quarantine failing cases.",
            params=("quality",),
            deps=("reports/ingest/summary.json", "src/lesionflow/quality", "src/lesionflow/stages/validate_raw.py"),
            metrics=("reports/validate-raw/summary.json",),
            uncached_outs=("reports/quality/raw",),
            state_outputs=("reports/validate-raw/summary.json",),
        ),
        StageSpec(
            name="plan",
            run=plan.run,
            inputs=plan.inputs,
            description="Dataset fingerprint -> plans.json: target spacing, normalization, patch and chunk size.",
            params=("project.seed", "plan"),
            deps=("reports/validate-raw/summary.json", "src/lesionflow/planning", "src/lesionflow/stages/plan.py"),
            outs=("data/processed/plans.json", "data/processed/fingerprint.json"),
            metrics=("reports/plan/summary.json",),
            state_outputs=("data/processed/plans.json", "data/processed/fingerprint.json"),
        ),
        StageSpec(
            name="preprocess",
            run=preprocess.run,
            inputs=preprocess.inputs,
            description="One Dask task per volume: RAS, crop, normalize, resample -> sharded Zarr v3 store.",
            params=("preprocess",),
            deps=(
                "data/processed/plans.json",
                "reports/validate-raw/summary.json",
                "src/lesionflow/preprocess",
                "src/lesionflow/store",
                "src/lesionflow/stages/preprocess.py",
            ),
            persist_outs=("data/processed/store.zarr", "data/processed/metadata.csv"),
            uses_dask=True,
            metrics=("reports/preprocess/summary.json",),
            state_outputs=("data/processed/metadata.csv",),
        ),
        StageSpec(
            name="validate-processed",
            run=validate_processed.run,
            inputs=validate_processed.inputs,
            description="Processed quality gate over the store's metadata; writes the accepted case list.",
            params=("quality",),
            deps=(
                "data/processed/metadata.csv",
                "data/processed/plans.json",
                "src/lesionflow/quality",
                "src/lesionflow/stages/validate_processed.py",
            ),
            outs=("data/processed/accepted.json",),
            metrics=("reports/validate-processed/summary.json",),
            uncached_outs=("reports/quality/processed",),
            state_outputs=("data/processed/accepted.json", "reports/validate-processed/summary.json"),
        ),
        StageSpec(
            name="extract-rois",
            run=extract_rois.run,
            inputs=extract_rois.inputs,
            description="Lesion-centred and lesion-free (organ) ROIs of the training cases -> data/rois.",
            params=(
                "project.seed",
                "train.val_fraction",
                "synth.roi_size",
                "synth.min_lesion_voxels",
                "synth.candidates_per_case",
            ),
            deps=(
                "data/processed/accepted.json",
                "data/processed/metadata.csv",
                "data/processed/plans.json",
                "src/lesionflow/synth/rois.py",
                "src/lesionflow/stages/extract_rois.py",
            ),
            outs=("data/rois",),
            metrics=("reports/extract-rois/summary.json",),
            state_outputs=("data/rois",),
        ),
        StageSpec(
            name="train-generator",
            run=train_generator.run,
            inputs=train_generator.inputs,
            description="Diffusion generators of synth.generators (LeFusion, DiffMask, DDPM, PIE) on the ROIs; "
            "resumable.",
            params=(
                "project.seed",
                "train.cpu_threads",
                "synth.generators",
                "synth.device",
                "synth.roi_size",
                "synth.lefusion",
                "synth.diffmask",
                "synth.ddpm",
                "synth.pie",
            ),
            deps=(
                "data/rois",
                "data/processed/plans.json",
                "src/lesionflow/diffusion",
                "src/lesionflow/synth",
                "src/lesionflow/stages/train_generator.py",
            ),
            outs=("models/generators",),
            metrics=("reports/train-generator/summary.json",),
            uncached_outs=("reports/train-generator/curves.png",),
            plots=("reports/train-generator/curves.csv",),
            state_outputs=("models/generators",),
        ),
        StageSpec(
            name="synthesize",
            run=synthesize.run,
            inputs=synthesize.inputs,
            description="One Dask task per (case, sample) and per PIE trajectory: lesions pasted into full volumes "
            "and progression frames -> Zarr.",
            params=("project.seed", "train.val_fraction", "synth"),
            deps=(
                "models/generators",
                "data/rois",
                "data/processed/accepted.json",
                "src/lesionflow/synth",
                "src/lesionflow/stages/synthesize.py",
                "src/lesionflow/stages/progression.py",
            ),
            outs=("data/synthetic/manifest.json", "data/synthetic/progression.json"),
            persist_outs=("data/synthetic/store.zarr", "data/synthetic/progression.zarr"),
            uses_dask=True,
            metrics=("reports/synthesize/summary.json",),
            state_outputs=("data/synthetic/manifest.json", "data/synthetic/progression.json"),
        ),
        StageSpec(
            name="validate-synthetic",
            run=validate_synthetic.run,
            inputs=validate_synthetic.inputs,
            description="Synthetic gate: exact background, mask checks, texture/volume/boundary stats, acceptance; "
            "PIE trajectories: outside-ROI bound, severity trend, convergence.",
            params=("quality.synthetic", "synth.lefusion.bins", "synth.lefusion.value_range", "registry.model_name"),
            deps=(
                "data/synthetic/manifest.json",
                "data/synthetic/progression.json",
                "data/rois",
                "src/lesionflow/quality",
                "src/lesionflow/stages/validate_synthetic.py",
            ),
            outs=("data/synthetic/accepted.json",),
            metrics=("reports/validate-synthetic/summary.json",),
            uncached_outs=("reports/validate-synthetic/montage.png", "reports/quality/synthetic"),
            state_outputs=("data/synthetic/accepted.json", "reports/validate-synthetic/summary.json"),
        ),
        StageSpec(
            name="train",
            run=train.run,
            inputs=train.inputs,
            description="MONAI network on Zarr patches (fg oversampling, augmentation); resumable checkpoints.",
            params=("project.seed", "train"),
            deps=(
                "data/processed/accepted.json",
                "data/processed/metadata.csv",
                "data/processed/plans.json",
                "data/synthetic/accepted.json",
                "src/lesionflow/seg",
                "src/lesionflow/stages/train.py",
            ),
            outs=("models/segmenter",),
            metrics=("reports/train/summary.json",),
            uncached_outs=("reports/train/curves.png",),
            plots=("reports/train/curves.csv",),
            state_outputs=("models/segmenter/model.safetensors", "models/segmenter/config.json"),
        ),
        StageSpec(
            name="evaluate",
            run=evaluate.run,
            inputs=evaluate.inputs,
            description="Sliding-window inference on the test split, mapped to the raw grid: Dice, HD95, NSD.",
            params=("evaluate",),
            deps=(
                "models/segmenter",
                "data/processed/accepted.json",
                "reports/ingest/summary.json",
                "src/lesionflow/seg",
                "src/lesionflow/stages/evaluate.py",
            ),
            outs=("data/predictions",),
            metrics=("reports/metrics.json",),
            uncached_outs=("reports/evaluate",),
            state_outputs=("reports/metrics.json", "data/predictions"),
        ),
        StageSpec(
            name="validate-metrics",
            run=validate_metrics.run,
            inputs=validate_metrics.inputs,
            description="Metrics gate: Dice floors, no NaN; champion comparison on the same test cases.",
            params=("quality", "evaluate", "registry"),
            deps=(
                "reports/metrics.json",
                "src/lesionflow/quality",
                "src/lesionflow/stages/validate_metrics.py",
            ),
            metrics=("reports/validate-metrics/summary.json",),
            uncached_outs=("reports/quality/metrics",),
        ),
        StageSpec(
            name="register",
            run=register.run,
            inputs=register.inputs,
            description="MLflow model version with lineage; candidate alias always, champion through the gate.",
            params=("registry", "storage.remote"),
            deps=(
                "reports/validate-metrics/summary.json",
                "models/segmenter",
                "src/lesionflow/registry",
                "src/lesionflow/stages/register.py",
            ),
            metrics=("reports/register/summary.json",),
        ),
    )
}


def pipeline_order() -> list[str]:
    """Stages in the order the training pipeline runs them."""
    return list(STAGES)
