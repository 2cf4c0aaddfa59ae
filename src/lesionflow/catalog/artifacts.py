"""Every artifact of a workspace, declared once: name, path, kind, producer, digest rule and DVC role.

This is the one place a workspace path is spelled. Stages name the artifacts they read and write (the stage
registry, ``lesionflow.stages``); their cache state, their ``dvc.yaml`` entry, the Zarr stores a flow
publishes and the reasons ``lesionflow status`` prints are all derived from those names (Kedro's data
catalog, applied to every hand-off; nnU-Net's "plan as a versioned artifact", applied to every stage).

Contracts:
- ``path`` is workspace-relative and POSIX (``data/processed/plans.json``); ``${key}`` means the location is
  the value of that params key (an input from outside the workspace, e.g. ``${ingest.source}``).
- ``producer`` is the first stage that writes the artifact (None: it comes from outside the workspace).
- ``digest`` says how the cache measures the artifact's content (bytes only, never paths or mtimes); the
  rules themselves live in ``lesionflow.catalog.digests``.
- ``dvc`` says how ``dvc.yaml`` lists the artifact when its producer writes it.

This module imports nothing but the standard library and the Workspace type, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lesionflow.workspace import Workspace


class Kind(StrEnum):
    FILE = "file"  # one file of any format (JSON/CSV reports are FILE too; the suffix says the format)
    FOLDER = "folder"  # a folder of files
    ZARR = "zarr"  # a Zarr v3 store: one group per case
    MODEL = "model"  # a model folder: model.safetensors + config.json (+ metadata.json)
    SOURCE = "source"  # data outside the workspace, located by a params key (folder, dataset.json, s3://)
    REMOTE = "remote"  # state held by a service (the MLflow model registry)
    GATE_REPORT = "gate-report"  # a quality gate's folder: index.html (GX Data Docs linked) + summary.json


class Digest(StrEnum):
    BYTES = "bytes"  # sha256 of the file
    TREE = "tree"  # sha256 over (relative path, sha256) of every file below the folder
    RAW = "raw"  # data/raw by its manifest + dataset.json (the manifest holds every file's sha256)
    STORE_CASES = "store-cases"  # the complete cases of a Zarr store (their bytes are recorded in a table)
    SOURCE = "source"  # the bytes of an input folder; unknown (no cache key) for s3:// sources
    SYNTHETIC_SELECTION = "synthetic-selection"  # the synthetic store training uses + its gate verdict
    ACCEPTANCE_MODEL = "acceptance-model"  # identity of the synthetic gate's segmenter (folder, champion or off)
    OPTIONAL_FILE = "optional-file"  # a ``${key}`` file: "off" when the key is empty, else the file's bytes
    CHAMPION = "champion"  # the registry's champion version; unknown when the registry does not answer
    NONE = "none"  # not part of any cache state (scratch, resumable checkpoints, rendered pictures)


class Dvc(StrEnum):
    OUT = "out"  # cached output
    PERSIST = "persist"  # cached output DVC must not delete before a run (the stage caches per case inside)
    METRIC = "metric"  # small JSON, `dvc metrics show`, not cached
    PLOT = "plot"  # CSV for `dvc plots show`, not cached
    REPORT = "report"  # rebuilt report (HTML gate pages, PNG), an uncached output
    DATA_DVC = "data.dvc"  # tracked by the top-level data.dvc; stages that read it depend on its last writer
    NONE = "none"  # not in dvc.yaml


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str
    kind: Kind
    producer: str | None
    digest: Digest
    dvc: Dvc
    description: str
    plot_axes: tuple[str, str] | None = None  # (x, y) columns `dvc plots show` draws (Dvc.PLOT only)
    plot_series: str | None = None  # the column whose values are separate lines (Dvc.PLOT; None: one line)

    @property
    def param_key(self) -> str | None:
        """The params key holding the location (``${key}`` paths), else None."""
        return self.path[2:-1] if self.path.startswith("${") else None

    def at(self, ws: Workspace) -> Path:
        """The artifact's path in ``ws`` (not for ``${key}`` artifacts: resolve those from params)."""
        if self.param_key is not None:
            raise ValueError(f"{self.name} is located by params key {self.param_key}; use ws.path(<value>)")
        return ws.root / self.path

    @property
    def is_zarr(self) -> bool:
        return self.kind is Kind.ZARR


def _summary(stage: str) -> Artifact:
    return Artifact(
        f"{stage}.summary",
        f"reports/{stage}/summary.json",
        Kind.FILE,
        stage,
        Digest.BYTES,
        Dvc.REPORT,
        f"what {stage} did: numbers, digests, paths and notes (its numbers are also {stage}.metrics)",
    )


def _metrics(stage: str) -> Artifact:
    """``metrics/<stage>.json``: the numbers of a stage's summary, for DVC.

    Contract: a small JSON object of numbers only (nested objects allowed; no strings, hashes or paths),
    outside the git-ignored reports/ so that git versions it: ``dvc exp run`` commits it into the experiment,
    so ``dvc exp show`` and ``dvc metrics diff`` can read it at every revision.
    """
    return Artifact(
        f"{stage}.metrics",
        f"metrics/{stage}.json",
        Kind.FILE,
        stage,
        Digest.BYTES,
        Dvc.METRIC,
        f"the numbers of what {stage} did (`dvc metrics show`, `dvc exp show`; versioned by git)",
    )


def stage_report_dir(ws: Workspace, stage: str) -> Path:
    """``reports/<stage>/``: a stage's own report folder (its summary, curves, plots, cache record)."""
    return ws.root / "reports" / stage


# ---- ingest and the raw gate ------------------------------------------------------------------------------
DEMO_DATA = Artifact(
    "demo-data",
    "data/demo",
    Kind.FOLDER,
    None,
    Digest.NONE,
    Dvc.NONE,
    "the MSD-layout dataset `lesionflow demo-data` writes: the default ingest source",
)
SOURCE = Artifact("source", "${ingest.source}", Kind.SOURCE, None, Digest.SOURCE, Dvc.NONE, "the dataset ingest reads")
RAW = Artifact(
    "raw", "data/raw", Kind.FOLDER, "ingest", Digest.RAW, Dvc.DATA_DVC, "immutable ingested scans + manifest"
)
RAW_CASES = Artifact(
    "raw.cases", "data/raw/cases", Kind.FOLDER, "ingest", Digest.NONE, Dvc.NONE, "one folder per ingested case"
)
RAW_MANIFEST = Artifact(
    "raw.manifest", "data/raw/manifest.csv", Kind.FILE, "ingest", Digest.NONE, Dvc.NONE, "one row per raw case"
)
RAW_DATASET = Artifact(
    "raw.dataset", "data/raw/dataset.json", Kind.FILE, "ingest", Digest.NONE, Dvc.NONE, "labels and modalities"
)
RAW_CASE_FILES = {"image": "image.nii.gz", "label": "label.nii.gz", "organ": "organ.nii.gz"}  # one case's folder


def raw_case_file(case_folder: Path, role: str) -> Path:
    """The NIfTI of ``role`` (image, label, organ) in a raw case folder (data/raw/cases/<id> or its staging copy)."""
    return case_folder / RAW_CASE_FILES[role]


QUARANTINE = Artifact(
    "quarantine",
    "data/quarantine",
    Kind.FOLDER,
    "ingest",
    Digest.NONE,
    Dvc.NONE,
    "rejected inputs, each with a reason file",
)
INGEST_SUMMARY = _summary("ingest")
INGEST_METRICS = _metrics("ingest")
INGEST_MONTAGE = Artifact(
    "ingest.montage", "reports/ingest/montage.png", Kind.FILE, "ingest", Digest.NONE, Dvc.NONE, "raw slices"
)
RAW_GATE_REPORT = Artifact(
    "validate-raw.report", "reports/quality/raw", Kind.GATE_REPORT, "validate-raw", Digest.NONE, Dvc.REPORT, "GX report"
)
VALIDATE_RAW_SUMMARY = _summary("validate-raw")
VALIDATE_RAW_METRICS = _metrics("validate-raw")

# ---- plan and preprocess ----------------------------------------------------------------------------------
PLANS = Artifact(
    "plans", "data/processed/plans.json", Kind.FILE, "plan", Digest.BYTES, Dvc.OUT, "the data-derived plan"
)
FINGERPRINT = Artifact(
    "fingerprint",
    "data/processed/fingerprint.json",
    Kind.FILE,
    "plan",
    Digest.BYTES,
    Dvc.OUT,
    "per-case geometry and intensity statistics the plan is derived from",
)
PLAN_SUMMARY = _summary("plan")
PLAN_METRICS = _metrics("plan")
STORE = Artifact(
    "store",
    "data/processed/store.zarr",
    Kind.ZARR,
    "preprocess",
    Digest.STORE_CASES,
    Dvc.PERSIST,
    "preprocessed cases (one sharded group per case)",
)
METADATA = Artifact(
    "metadata",
    "data/processed/metadata.csv",
    Kind.FILE,
    "preprocess",
    Digest.BYTES,
    Dvc.PERSIST,
    "one row per processed case: geometry, intensities, digests",
)
PREPROCESS_SUMMARY = _summary("preprocess")
PREPROCESS_METRICS = _metrics("preprocess")
ACCEPTED = Artifact(
    "accepted",
    "data/processed/accepted.json",
    Kind.FILE,
    "validate-processed",
    Digest.BYTES,
    Dvc.OUT,
    "the cases the processed gate let through",
)
PROCESSED_GATE_REPORT = Artifact(
    "validate-processed.report",
    "reports/quality/processed",
    Kind.GATE_REPORT,
    "validate-processed",
    Digest.NONE,
    Dvc.REPORT,
    "GX report",
)
VALIDATE_PROCESSED_SUMMARY = _summary("validate-processed")
VALIDATE_PROCESSED_METRICS = _metrics("validate-processed")

# ---- synthesis --------------------------------------------------------------------------------------------
ROIS = Artifact(
    "rois",
    "data/rois",
    Kind.FOLDER,
    "extract-rois",
    Digest.TREE,
    Dvc.OUT,
    "lesion and lesion-free ROIs of the training cases (rois.zarr + rois.csv)",
)
ROIS_STORE = Artifact(
    "rois.store", "data/rois/rois.zarr", Kind.ZARR, "extract-rois", Digest.TREE, Dvc.NONE, "the ROI arrays"
)
ROIS_TABLE = Artifact(
    "rois.table", "data/rois/rois.csv", Kind.FILE, "extract-rois", Digest.NONE, Dvc.NONE, "one row per ROI"
)
EXTRACT_ROIS_SUMMARY = _summary("extract-rois")
EXTRACT_ROIS_METRICS = _metrics("extract-rois")
GENERATORS = Artifact(
    "generators",
    "models/generators",
    Kind.FOLDER,
    "train-generator",
    Digest.TREE,
    Dvc.OUT,
    "one model folder per method (EMA weights, config.json with the method's extras)",
)
GENERATOR_CHECKPOINTS = Artifact(
    "generators.checkpoints",
    "models/checkpoints/generators",
    Kind.FOLDER,
    "train-generator",
    Digest.NONE,
    Dvc.NONE,
    "resumable training state, per method and run key",
)
TRAIN_GENERATOR_SUMMARY = _summary("train-generator")
TRAIN_GENERATOR_METRICS = _metrics("train-generator")
TRAIN_GENERATOR_CURVES = Artifact(
    "train-generator.curves-csv",
    "reports/train-generator/curves.csv",
    Kind.FILE,
    "train-generator",
    Digest.NONE,
    Dvc.PLOT,
    "loss per step, one line per generator",
    plot_axes=("step", "loss"),
    plot_series="method",
)
TRAIN_GENERATOR_CURVES_PNG = Artifact(
    "train-generator.curves",
    "reports/train-generator/curves.png",
    Kind.FILE,
    "train-generator",
    Digest.NONE,
    Dvc.REPORT,
    "generator loss curves",
)
SYNTHETIC_STORE = Artifact(
    "synthetic.store",
    "data/synthetic/store.zarr",
    Kind.ZARR,
    "synthesize",
    Digest.STORE_CASES,
    Dvc.PERSIST,
    "full synthetic cases, same layout as the processed store",
)
SYNTHETIC_MANIFEST = Artifact(
    "synthetic.manifest",
    "data/synthetic/manifest.json",
    Kind.FILE,
    "synthesize",
    Digest.BYTES,
    Dvc.OUT,
    "one record per synthetic sample (seeds, generator digests)",
)
PROGRESSION_STORE = Artifact(
    "progression.store",
    "data/synthetic/progression.zarr",
    Kind.ZARR,
    "synthesize",
    Digest.STORE_CASES,
    Dvc.PERSIST,
    "PIE trajectories: frames, masks and the ROI",
)
PROGRESSION_MANIFEST = Artifact(
    "progression.manifest",
    "data/synthetic/progression.json",
    Kind.FILE,
    "synthesize",
    Digest.BYTES,
    Dvc.OUT,
    "one record per PIE trajectory",
)
PROGRESSION_PICTURES = Artifact(
    "progression.pictures",
    "reports/synthesize/progression",
    Kind.FOLDER,
    "synthesize",
    Digest.NONE,
    Dvc.NONE,
    "GIF and PNG strip per trajectory",
)
SYNTHESIZE_SUMMARY = _summary("synthesize")
SYNTHESIZE_METRICS = _metrics("synthesize")
SYNTHETIC_ACCEPTED = Artifact(
    "synthetic.accepted",
    "data/synthetic/accepted.json",
    Kind.FILE,
    "validate-synthetic",
    Digest.BYTES,
    Dvc.OUT,
    "the synthetic samples the gate let through (the only ones the segmenter trains on)",
)
ACCEPTANCE_MODEL = Artifact(
    "acceptance-model",
    "${quality.synthetic.acceptance_model}",
    Kind.MODEL,
    None,
    Digest.ACCEPTANCE_MODEL,
    Dvc.NONE,
    "the segmenter of the synthetic gate's acceptance filter: a folder, the registry champion, or off",
)
STUDY_EVIDENCE = Artifact(
    "study-evidence",
    "${quality.synthetic.study_evidence}",
    Kind.FILE,
    None,
    Digest.OPTIONAL_FILE,
    Dvc.NONE,
    "utility in the loop: the study summary whose effect admits synthetic data (empty = off)",
)
SYNTHETIC_GATE_REPORT = Artifact(
    "validate-synthetic.report",
    "reports/quality/synthetic",
    Kind.GATE_REPORT,
    "validate-synthetic",
    Digest.NONE,
    Dvc.REPORT,
    "GX report",
)
SYNTHETIC_MONTAGE = Artifact(
    "validate-synthetic.montage",
    "reports/validate-synthetic/montage.png",
    Kind.FILE,
    "validate-synthetic",
    Digest.NONE,
    Dvc.REPORT,
    "real vs synthetic lesions per class",
)
PROGRESSION_GATE_REPORT = Artifact(
    "validate-synthetic.progression",
    "reports/quality/progression",
    Kind.GATE_REPORT,
    "validate-synthetic",
    Digest.NONE,
    Dvc.NONE,  # written only when there are trajectories: DVC would call a missing declared output an error
    "GX report of the PIE trajectories",
)
VALIDATE_SYNTHETIC_SUMMARY = _summary("validate-synthetic")
VALIDATE_SYNTHETIC_METRICS = _metrics("validate-synthetic")

# ---- segmentation -----------------------------------------------------------------------------------------
TRAINING_SYNTHETIC = Artifact(
    "train.synthetic",
    "${train.synthetic_store}",
    Kind.ZARR,
    None,
    Digest.SYNTHETIC_SELECTION,
    Dvc.NONE,
    "the synthetic store training mixes in (accepted.json beside it is the gate's verdict)",
)
SEGMENTER = Artifact(
    "segmenter",
    "models/segmenter",
    Kind.MODEL,
    "train",
    Digest.TREE,
    Dvc.OUT,
    "the trained segmenter: model.safetensors, config.json, metadata.json",
)
SEGMENTER_CHECKPOINTS = Artifact(
    "segmenter.checkpoints",
    "models/checkpoints/segmenter",
    Kind.FOLDER,
    "train",
    Digest.NONE,
    Dvc.NONE,
    "resumable training state, per run key",
)
TRAIN_SUMMARY = _summary("train")
TRAIN_METRICS = _metrics("train")
TRAIN_CURVES = Artifact(
    "train.curves-csv",
    "reports/train/curves.csv",
    Kind.FILE,
    "train",
    Digest.BYTES,
    Dvc.PLOT,
    "loss and val Dice",
    plot_axes=("step", "loss"),
)
TRAIN_CURVES_PNG = Artifact(
    "train.curves",
    "reports/train/curves.png",
    Kind.FILE,
    "train",
    Digest.BYTES,
    Dvc.REPORT,
    "loss and validation Dice per step",
)
PREDICTIONS = Artifact(
    "predictions",
    "data/predictions",
    Kind.FOLDER,
    "evaluate",
    Digest.TREE,
    Dvc.OUT,
    "test-split predictions on the raw grid",
)
METRICS = Artifact(
    "metrics",
    "reports/metrics.json",
    Kind.FILE,
    "evaluate",
    Digest.BYTES,
    Dvc.REPORT,
    "test metrics with the split and model digests (its numbers are also evaluate.metrics)",
)
EVALUATE_METRICS = _metrics("evaluate")
EVALUATE_REPORT = Artifact(
    "evaluate.report",
    "reports/evaluate",
    Kind.FOLDER,
    "evaluate",
    Digest.NONE,  # the folder also holds evaluate's cache record: its own digest would change after every run
    Dvc.REPORT,
    "cases.csv (one row per case and label), box plot, montage",
)
EVALUATE_CASES = Artifact(
    "evaluate.cases",
    "reports/evaluate/cases.csv",
    Kind.FILE,
    "evaluate",
    Digest.BYTES,
    Dvc.NONE,
    "test metrics per case and label",
)
EVALUATE_LESIONS = Artifact(
    "evaluate.lesions",
    "reports/evaluate/lesions.csv",
    Kind.FILE,
    "evaluate",
    Digest.BYTES,
    Dvc.NONE,  # inside reports/evaluate, which dvc.yaml lists as a whole
    "test truth lesions: size (voxels, mm3, equivalent diameter mm), size bin, detected",
)
EVALUATIONS = Artifact(
    "evaluations",
    "reports/evaluations",
    Kind.FOLDER,
    None,
    Digest.NONE,
    Dvc.NONE,
    "`lesionflow evaluate-model` reports, one folder per evaluation",
)
REGISTRY = Artifact(
    "registry",
    "${registry.tracking_uri}",
    Kind.REMOTE,
    "register",
    Digest.CHAMPION,
    Dvc.NONE,
    "the MLflow model registry: versions, aliases, lineage",
)
METRICS_GATE_REPORT = Artifact(
    "validate-metrics.report",
    "reports/quality/metrics",
    Kind.GATE_REPORT,
    "validate-metrics",
    Digest.NONE,
    Dvc.REPORT,
    "GX report",
)
VALIDATE_METRICS_SUMMARY = _summary("validate-metrics")
VALIDATE_METRICS_METRICS = _metrics("validate-metrics")
REGISTER_SUMMARY = _summary("register")
REGISTER_METRICS = _metrics("register")


def accepted_beside(store: Path) -> Path:
    """The synthetic gate's accepted-sample list of a synthetic store: ``accepted.json`` next to it."""
    return store.parent / SYNTHETIC_ACCEPTED.path.rsplit("/", 1)[1]


# ---- the utility study (`lesionflow study`, a flow of its own) ---------------------------------------------
STUDY_WORK = Artifact(
    "study.work",
    "data/study",
    Kind.FOLDER,
    None,
    Digest.NONE,
    Dvc.NONE,
    "one workspace per real fraction (generators, synthetic stores per arm) and per cell (segmenter, predictions)",
)
STUDY_CELLS = Artifact(
    "study.cells",
    "reports/study/cells.csv",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.NONE,
    "one row per test case and cell (arm, real fraction, seed): Dice, HD95, NSD",
)
STUDY_CURVES = Artifact(
    "study.curves-csv",
    "reports/study/learning_curves.csv",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.PLOT,
    "mean test Dice per arm and real fraction with its 95% CI (`dvc plots show`)",
    plot_axes=("fraction", "mean_dice"),
)
STUDY_DETECTION = Artifact(
    "study.detection",
    "reports/study/detection.csv",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.NONE,
    "lesion-level sensitivity per lesion size bin and false positives per case, per arm, fraction and ratio",
)
STUDY_SUMMARY = Artifact(
    "study.summary",
    "reports/study/summary.json",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.METRIC,
    "each arm against real at each fraction (mean difference, CI, Holm p) and real cases saved",
)
STUDY_CURVES_PNG = Artifact(
    "study.curves",
    "reports/study/learning_curves.png",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.NONE,
    "learning curves: mean test Dice against the real fraction, one line per arm, CI bands",
)
STUDY_EFFECTS_PNG = Artifact(
    "study.effects",
    "reports/study/effects.png",
    Kind.FILE,
    None,
    Digest.NONE,
    Dvc.NONE,
    "forest plot: each arm's Dice difference from real with its 95% CI, per fraction",
)

ARTIFACTS: dict[str, Artifact] = {
    a.name: a for a in list(globals().values()) if isinstance(a, Artifact)
}  # declaration order: the pipeline's order


def summary_artifact(stage: str) -> Artifact:
    """``reports/<stage>/summary.json`` of a stage, as declared above."""
    return ARTIFACTS[f"{stage}.summary"]


def metrics_artifact(stage: str) -> Artifact:
    """``metrics/<stage>.json`` of a stage, as declared above."""
    return ARTIFACTS[f"{stage}.metrics"]
