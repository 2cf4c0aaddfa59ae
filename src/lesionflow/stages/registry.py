"""The stage registry: the one list of stages the CLI, dvc.yaml and the Prefect flows all use.

Each stage is a plain function ``run(workspace, params) -> StageResult`` with a declaration (``StageSpec``):
the params keys it reads, the catalog artifacts it reads and writes, and the code it runs. Its cache state,
its dvc.yaml entry and what a flow publishes after it are derived from that declaration
(``lesionflow.stages.spec``); a test renders dvc.yaml from this registry and compares it byte for byte.
Stage modules never import each other: hand-offs go through ``lesionflow.catalog.readers``.
"""

from __future__ import annotations

from lesionflow.catalog import artifacts as a
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
from lesionflow.stages.spec import StageSpec

_SPLITS = ("project.seed", "train.val_fraction")  # what lesionflow.catalog.readers.splits reads

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="ingest",
            fn=ingest.run,
            description="Read the source (folder, dataset.json, DICOM, s3://) into data/raw; quarantine bad cases.",
            params=("project.seed", "ingest"),
            reads=(a.SOURCE,),
            writes=(a.RAW, a.QUARANTINE, a.INGEST_SUMMARY, a.INGEST_METRICS, a.INGEST_MONTAGE),
            code=("src/lesionflow/io",),
        ),
        StageSpec(
            name="validate-raw",
            fn=validate_raw.run,
            description="Raw quality gate (great-expectations) over the per-volume metadata; quarantine failing cases.",
            params=("quality",),
            reads=(a.RAW,),
            writes=(a.RAW, a.QUARANTINE, a.RAW_GATE_REPORT, a.VALIDATE_RAW_SUMMARY, a.VALIDATE_RAW_METRICS),
            code=("src/lesionflow/quality",),
        ),
        StageSpec(
            name="plan",
            fn=plan.run,
            description="Dataset fingerprint -> plans.json: target spacing, normalization, patch and chunk size.",
            params=("project.seed", "plan"),
            reads=(a.RAW,),
            writes=(a.PLANS, a.FINGERPRINT, a.PLAN_SUMMARY, a.PLAN_METRICS),
            code=("src/lesionflow/planning",),
        ),
        StageSpec(
            name="preprocess",
            fn=preprocess.run,
            description="One Dask task per volume: RAS, crop, normalize, resample -> sharded Zarr v3 store.",
            params=("preprocess",),
            reads=(a.PLANS, a.RAW),
            writes=(a.STORE, a.METADATA, a.QUARANTINE, a.PREPROCESS_SUMMARY, a.PREPROCESS_METRICS),
            code=("src/lesionflow/preprocess", "src/lesionflow/store"),
            uses_dask=True,
        ),
        StageSpec(
            name="validate-processed",
            fn=validate_processed.run,
            description="Processed quality gate over the store's metadata; writes the accepted case list.",
            params=("quality",),
            reads=(a.METADATA, a.PLANS),
            writes=(
                a.ACCEPTED,
                a.QUARANTINE,
                a.PROCESSED_GATE_REPORT,
                a.VALIDATE_PROCESSED_SUMMARY,
                a.VALIDATE_PROCESSED_METRICS,
            ),
            code=("src/lesionflow/quality",),
        ),
        StageSpec(
            name="extract-rois",
            fn=extract_rois.run,
            description="Lesion-centred and lesion-free (organ) ROIs of the training cases -> data/rois.",
            params=(
                *_SPLITS,
                "synth.roi_size",
                "synth.min_lesion_voxels",
                "synth.candidates_per_case",
                "synth.lesion_labels",
                "synth.organ_labels",
                "synth.max_lesion_share",
                "synth.min_median_lesion_voxels",
            ),
            reads=(a.ACCEPTED, a.METADATA, a.PLANS, a.STORE),
            writes=(a.ROIS, a.EXTRACT_ROIS_SUMMARY, a.EXTRACT_ROIS_METRICS),
            code=("src/lesionflow/synth/rois.py",),
        ),
        StageSpec(
            name="train-generator",
            fn=train_generator.run,
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
                "synth.lesion_labels",
                "synth.organ_labels",
            ),
            reads=(a.ROIS, a.PLANS),
            writes=(
                a.GENERATORS,
                a.GENERATOR_CHECKPOINTS,
                a.TRAIN_GENERATOR_SUMMARY,
                a.TRAIN_GENERATOR_METRICS,
                a.TRAIN_GENERATOR_CURVES_PNG,
                a.TRAIN_GENERATOR_CURVES,
            ),
            code=("src/lesionflow/diffusion", "src/lesionflow/synth"),
        ),
        StageSpec(
            name="synthesize",
            fn=synthesize.run,
            description="One Dask task per (case, sample) and per PIE trajectory: lesions pasted into full volumes "
            "and progression frames -> Zarr.",
            params=(*_SPLITS, "synth", "preprocess.memory_limit", "preprocess.compression"),
            reads=(a.GENERATORS, a.ROIS, a.ACCEPTED, a.METADATA, a.PLANS, a.STORE),
            writes=(
                a.SYNTHETIC_MANIFEST,
                a.PROGRESSION_MANIFEST,
                a.SYNTHETIC_STORE,
                a.PROGRESSION_STORE,
                a.PROGRESSION_PICTURES,
                a.SYNTHESIZE_SUMMARY,
                a.SYNTHESIZE_METRICS,
            ),
            code=("src/lesionflow/synth",),
            uses_dask=True,
        ),
        StageSpec(
            name="validate-synthetic",
            fn=validate_synthetic.run,
            description="Synthetic gate: exact background, mask checks, texture/volume/boundary stats, acceptance; "
            "PIE trajectories: outside-ROI bound, severity trend, convergence.",
            params=(
                "quality.synthetic",
                "synth.roi_size",
                "synth.method",  # these three name the study arm of quality.synthetic.study_evidence
                "synth.generators",
                "synth.new_per_case",
                "synth.lefusion.bins",
                "synth.lefusion.multi_class",
                "synth.lesion_labels",
                "synth.organ_labels",
                "evaluate.device",
                "registry.tracking_uri",
                "registry.model_name",
            ),
            reads=(
                a.SYNTHETIC_MANIFEST,
                a.PROGRESSION_MANIFEST,
                a.ROIS,
                a.PLANS,
                a.METADATA,  # the guard that no test-split case reached the ROI table
                a.STORE,
                a.SYNTHETIC_STORE,
                a.PROGRESSION_STORE,
                a.GENERATORS,
                a.ACCEPTANCE_MODEL,
                a.STUDY_EVIDENCE,
            ),
            writes=(
                a.SYNTHETIC_ACCEPTED,
                a.SYNTHETIC_MONTAGE,
                a.SYNTHETIC_GATE_REPORT,
                a.PROGRESSION_GATE_REPORT,
                a.VALIDATE_SYNTHETIC_SUMMARY,
                a.VALIDATE_SYNTHETIC_METRICS,
            ),
            code=("src/lesionflow/quality",),
        ),
        StageSpec(
            name="train",
            fn=train.run,
            description="MONAI network on Zarr patches (fg oversampling, augmentation); resumable checkpoints.",
            params=("project.seed", "train", "registry.intended_use"),
            reads=(a.ACCEPTED, a.METADATA, a.PLANS, a.STORE, a.SYNTHETIC_ACCEPTED, a.TRAINING_SYNTHETIC, a.RAW),
            writes=(
                a.SEGMENTER,
                a.SEGMENTER_CHECKPOINTS,
                a.TRAIN_SUMMARY,
                a.TRAIN_METRICS,
                a.TRAIN_CURVES_PNG,
                a.TRAIN_CURVES,
            ),
            code=("src/lesionflow/seg",),
        ),
        StageSpec(
            name="evaluate",
            fn=evaluate.run,
            description="Sliding-window inference on the test split, mapped to the raw grid: Dice, HD95, NSD, "
            "lesion detection by size.",
            params=(*_SPLITS, "evaluate"),
            reads=(a.SEGMENTER, a.ACCEPTED, a.METADATA, a.RAW),
            writes=(a.PREDICTIONS, a.METRICS, a.EVALUATE_METRICS, a.EVALUATE_REPORT, a.EVALUATE_LESIONS),
            code=("src/lesionflow/seg",),
        ),
        StageSpec(
            name="validate-metrics",
            fn=validate_metrics.run,
            description="Metrics gate: Dice floors, no NaN; champion comparison on the same test cases.",
            params=("quality", "evaluate", "registry"),
            reads=(a.METRICS, a.EVALUATE_CASES, a.RAW, a.REGISTRY),
            writes=(a.METRICS_GATE_REPORT, a.VALIDATE_METRICS_SUMMARY, a.VALIDATE_METRICS_METRICS),
            code=("src/lesionflow/quality",),
        ),
        StageSpec(
            name="register",
            fn=register.run,
            description="MLflow model version with lineage; candidate alias always, champion through the gate.",
            params=(*_SPLITS, "train.synthetic_store", "train.synthetic_ratio", "registry", "storage.remote"),
            reads=(
                a.VALIDATE_METRICS_SUMMARY,
                a.SEGMENTER,
                a.METRICS,
                a.EVALUATE_REPORT,
                a.TRAIN_SUMMARY,
                a.TRAIN_CURVES,
                a.TRAIN_CURVES_PNG,
                a.RAW,
                a.PLANS,
                a.METADATA,
                a.STORE,
                a.ACCEPTED,
                a.SYNTHETIC_ACCEPTED,
                a.SYNTHETIC_MANIFEST,  # per-sample lineage rows (seeds, generators) of the synthetic samples used
                a.TRAINING_SYNTHETIC,
            ),
            writes=(a.REGISTRY, a.REGISTER_SUMMARY, a.REGISTER_METRICS),
            records_flow_run=True,
            code=("src/lesionflow/registry",),
        ),
    )
}


def pipeline_order() -> list[str]:
    """Stages in the order the training pipeline runs them."""
    return list(STAGES)
