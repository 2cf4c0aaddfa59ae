"""Typed pipeline parameters: one pydantic model per ``params.yaml`` section, validated once at load time.

``load_params(path, overrides)`` is the only reader of params.yaml. An invalid value raises
:class:`ParamsError` with one line naming the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import json
import os
import zoneinfo
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lesionflow.catalog.artifacts import DEMO_DATA, SYNTHETIC_STORE
from lesionflow.errors import ParamsError
from lesionflow.params_synth import StrictSection, SyntheticQualityParams, SynthParams

# Ten million optimizer steps: 40x nnU-Net's 1000 epochs x 250 steps; anything above is a typo, not a plan.
MAX_STEPS = 10_000_000


class _Section(StrictSection):
    pass


def workspace_output_path(value: str) -> str:
    """An output folder: workspace-relative paths must stay inside the workspace; elsewhere needs an absolute path.

    ``../../x`` would write beside (or above) the project without anyone having asked for it, while ``/data/x``
    says plainly where the files go.
    """
    if not value.strip():
        raise ValueError("expected a folder, got an empty path")
    path = PurePosixPath(value)
    if not path.is_absolute() and ".." in Path(os.path.normpath(value)).parts:
        raise ValueError("leaves the workspace; use a folder inside it, or an absolute path to write elsewhere")
    return value


class ProjectParams(_Section):
    """Settings shared by every stage."""

    seed: int = Field(0, ge=0, description="Global seed; every random choice derives from it and explicit inputs.")


class DemoParams(_Section):
    """What ``make run`` builds as its demo source (``lesionflow demo-data``)."""

    kind: Literal["brain-mri", "chest-ct"] = Field("brain-mri", description="Which demo dataset to build.")
    cases: int = Field(8, ge=2, le=500, description="Number of cases (train + test).")
    size: int = Field(64, ge=16, le=256, description="Longest spatial edge in voxels.")
    seed: int = Field(0, ge=0, description="Seed of the demo generator.")
    out: str = Field(
        DEMO_DATA.path,
        description="Folder the demo dataset is written to: inside the workspace when relative, or an absolute path.",
    )

    @field_validator("out")
    @classmethod
    def _inside_workspace(cls, v: str) -> str:
        return workspace_output_path(v)


REDACTED = "<redacted>"


class DeidParams(_Section):
    """DICOM PS3.15 basic-profile de-identification."""

    salt: str = Field(
        "lesionflow-demo",
        min_length=8,
        description="Secret for pseudonyms, UID remapping and date shifts; env LESIONFLOW_DEID_SECRET overrides it.",
    )
    max_date_shift_days: int = Field(365, ge=1, le=3650, description="Dates shift by a per-patient offset in [-N, N].")


class IngestParams(_Section):
    """Where raw scans come from and how they are read."""

    source: str = Field(
        DEMO_DATA.path, description="Local folder, MSD/nnU-Net dataset.json or folder, or s3://bucket/prefix."
    )
    modality: str = Field("auto", description="Modality when the source does not declare one (CT, MR, ...) or 'auto'.")
    labels: dict[int, str] = Field(
        default_factory=dict, description="Label value -> name, when the source has no dataset.json."
    )
    test_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of cases put in the test split when the source has no split."
    )
    test_holdout_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of labelled training cases held out as the test split when the source's test cases "
        "have no labels (MSD imagesTs); 0 = none.",
    )
    slice_spacing_tolerance: float = Field(
        0.01,
        gt=0.0,
        le=0.5,
        description="Relative deviation of DICOM slice gaps tolerated before a series is rejected.",
    )
    deid: DeidParams = Field(default_factory=DeidParams)


class RawQualityParams(_Section):
    """Expectations of the raw gate (validate-raw)."""

    min_cases: int = Field(2, ge=1, description="Fewest cases the dataset may have after rejection.")
    spacing_mm: tuple[float, float] = Field((0.1, 10.0), description="Plausible voxel size range in mm (min, max).")
    ct_range_hu: tuple[float, float] = Field((-1100.0, 4000.0), description="CT intensities must lie in this HU range.")
    max_abs_intensity: float = Field(1e7, gt=0, description="Non-CT intensities beyond this magnitude are implausible.")
    affine_tolerance_mm: float = Field(1e-3, gt=0, description="Image/label affines may differ by at most this much.")

    @field_validator("spacing_mm", "ct_range_hu")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"expected (min, max) with min < max, got {list(v)}")
        return v


class ProcessedQualityParams(_Section):
    """Expectations of the processed gate (validate-processed)."""

    spacing_tolerance_mm: float = Field(1e-4, gt=0, description="Stored spacing may differ from the plan by this much.")
    zscore_mean_tolerance: float = Field(
        0.05, gt=0, description="|mean| of a z-scored channel (in its mask) at most this."
    )
    zscore_std_tolerance: float = Field(0.05, gt=0, description="|std - 1| of a z-scored channel at most this.")
    max_range_excess: float = Field(
        0.5, ge=0, description="Stored image may leave its normalized [lo, hi] by this share of hi - lo."
    )
    min_foreground_kept: float = Field(
        0.9, gt=0, le=1, description="Share of the raw foreground volume left after cropping/resampling."
    )
    max_foreground_gain: float = Field(1.1, ge=1, description="Foreground volume may grow by at most this factor.")
    shape_range: tuple[int, int] = Field(
        (8, 1024), description="Allowed voxels per axis after preprocessing (min, max)."
    )


class MetricsQualityParams(_Section):
    """Expectations of the metrics gate (validate-metrics)."""

    min_mean_dice: float = Field(0.05, ge=0, le=1, description="Mean foreground Dice over test cases at least this.")
    min_case_dice: float = Field(0.0, ge=0, le=1, description="No case's mean foreground Dice below this.")
    champion_tolerance: float = Field(
        0.02, ge=0, le=1, description="Candidate may trail the champion's mean Dice by at most this."
    )


class QualityParams(_Section):
    """Quality gates: shared reject policy plus one block per gate."""

    max_reject_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="The gate fails above this share of rejected cases."
    )
    raw: RawQualityParams = Field(default_factory=RawQualityParams)
    processed: ProcessedQualityParams = Field(default_factory=ProcessedQualityParams)
    metrics: MetricsQualityParams = Field(default_factory=MetricsQualityParams)
    synthetic: SyntheticQualityParams = Field(default_factory=SyntheticQualityParams)


class PlanParams(_Section):
    """Planning (fingerprint -> plans.json); a non-null value overrides the planned one."""

    gpu_memory_gb: float = Field(
        8.0, gt=0, description="GPU memory the training patch must fit (nnU-Net's default: 8)."
    )
    foreground_samples: int = Field(
        10000, ge=100, description="Foreground voxels sampled per case for intensity stats."
    )
    target_spacing: tuple[float, float, float] | None = Field(
        None, description="Override the planned spacing (mm, RAS x y z)."
    )
    patch_size: tuple[int, int, int] | None = Field(None, description="Override the planned patch size (voxels).")
    chunk_shape: tuple[int, int, int] | None = Field(None, description="Override the Zarr inner chunk shape (voxels).")
    normalization: dict[str, Literal["ct", "zscore"]] = Field(
        default_factory=dict, description="Override the scheme per channel index, e.g. {'0': 'zscore'}."
    )

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"expected three spacings > 0 mm, got {list(v)}")
        return v


class PreprocessParams(_Section):
    """Preprocessing on a Dask cluster into the Zarr store."""

    workers: int = Field(2, ge=1, le=256, description="Local cluster worker processes (one thread each).")
    memory_limit: str = Field("4GiB", description="Memory limit per local worker (Dask syntax).")
    scheduler_address: str = Field(
        "", description="tcp://host:8786 of a running Dask scheduler; empty = local cluster."
    )
    image_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored images.")
    label_resampling: Literal["onehot_linear", "nearest"] = Field(
        "onehot_linear", description="How labels are resampled."
    )
    compression: Literal["zstd", "blosc-lz4", "none"] = Field(
        "zstd",
        description="Inner-chunk codec of the stores (processed and synthetic): zstd is the smallest, blosc-lz4 "
        "reads training patches faster, none fastest (docs/benchmarks.md, random patch reads).",
    )


class AugmentParams(_Section):
    """On-the-fly patch augmentation (nnU-Net's set, smaller defaults). Probabilities are per sample."""

    enabled: bool = Field(True, description="Apply augmentation to training patches.")
    flip_prob: float = Field(0.5, ge=0, le=1, description="Probability of a flip, drawn per axis.")
    rotate_prob: float = Field(0.2, ge=0, le=1, description="Probability of a random 3D rotation.")
    rotate_deg: float = Field(15.0, ge=0, le=180, description="Rotation angles drawn from [-r, r] degrees per axis.")
    scale_prob: float = Field(0.2, ge=0, le=1, description="Probability of a random isotropic zoom.")
    scale_range: tuple[float, float] = Field((0.85, 1.25), description="Zoom factor range (min, max); >1 zooms in.")
    intensity_prob: float = Field(0.15, ge=0, le=1, description="Probability of an intensity scale and shift.")
    intensity_scale: tuple[float, float] = Field((0.75, 1.25), description="Multiplicative intensity range.")
    gamma_prob: float = Field(0.15, ge=0, le=1, description="Probability of a gamma transform (on [0, 1]-rescaled).")
    gamma_range: tuple[float, float] = Field((0.7, 1.5), description="Gamma range.")
    noise_prob: float = Field(0.1, ge=0, le=1, description="Probability of additive Gaussian noise.")
    noise_std: float = Field(0.1, ge=0, description="Noise standard deviation (normalized intensity units).")

    @field_validator("scale_range", "intensity_scale", "gamma_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected (min, max) with 0 < min <= max, got {list(v)}")
        return v


class TrainParams(_Section):
    """Segmentation training on Zarr patches (defaults: the CPU ``toy`` preset; presets/gpu.yaml for GPUs)."""

    network: Literal["unet", "dynunet", "swinunetr"] = Field("unet", description="MONAI network.")
    channels: tuple[int, ...] = Field(
        (8, 16, 32), description="Feature widths per resolution level (SwinUNETR: feature_size = channels[0])."
    )
    num_res_units: int = Field(1, ge=0, le=4, description="Residual units per block (UNet).")
    patch_size: tuple[int, int, int] | None = Field(
        (32, 32, 32), description="Training patch (voxels); null = the plan's (the GPU preset)."
    )
    batch_size: int = Field(2, ge=1, le=512, description="Patches per step (per GPU under DDP).")
    steps: int = Field(250, ge=1, le=MAX_STEPS, description="Optimizer steps in total.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum (nnU-Net).")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-5, ge=0, description="Weight decay.")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["poly", "cosine", "constant"] = Field("poly", description="LR schedule over `steps`.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the soft Dice term of the loss.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy term of the loss.")
    foreground_fraction: float = Field(
        0.33, ge=0, le=1, description="Share of each batch centred on a foreground voxel (nnU-Net: 0.33)."
    )
    augmentation: AugmentParams = Field(default_factory=AugmentParams)
    seed: int | None = Field(
        None,
        description="Segmenter seed (initialisation, patch draws); empty = project.seed. The utility study "
        "varies it with the data fixed.",
    )
    synthetic_store: str = Field(
        SYNTHETIC_STORE.path, description="Second Zarr store of synthetic cases (empty = none)."
    )
    synthetic_ratio: float = Field(0.25, ge=0, le=1, description="Share of patches drawn from the synthetic store.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Share of training cases held out for validation.")
    val_every: int = Field(
        50, ge=1, le=MAX_STEPS, description="Validate (sliding window) every N steps and at the end."
    )
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N validations without gain (0 = off).")
    checkpoint_every: int = Field(
        50, ge=1, le=MAX_STEPS, description="Write a checkpoint every N steps and at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest removed first).")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision on CUDA (auto = bf16 when supported); always off on CPU."
    )
    compile: bool = Field(False, description="torch.compile the network.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    ddp_processes: int = Field(
        0, ge=0, le=64, description="DDP processes via torchrun: 0 = one per GPU when >1 GPU, else none."
    )
    num_workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes.")
    cache_mb: float = Field(
        1024.0, ge=0, description="Decoded cases kept per loader process (MiB, LRU); 0 = read the shards every time."
    )
    cpu_threads: int = Field(
        0, ge=0, le=512, description="torch CPU threads (0 = OMP_NUM_THREADS, else CPU quota/cores); fixes float sums."
    )
    sw_overlap: float = Field(0.25, ge=0, lt=1, description="Sliding-window overlap during validation.")

    @field_validator("channels")
    @classmethod
    def _widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 2 or min(v) < 1:
            raise ValueError(f"expected at least two positive feature widths, got {list(v)}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and min(v) < 8:
            raise ValueError(f"expected three edges >= 8 voxels, got {list(v)}")
        return v


class EvaluateParams(_Section):
    """Evaluation on the test split: sliding-window inference, metrics on the original grid."""

    sw_overlap: float = Field(0.5, ge=0, lt=1, description="Sliding-window overlap.")
    sw_batch_size: int = Field(2, ge=1, description="Windows per forward pass.")
    nsd_tolerance_mm: float = Field(1.0, gt=0, description="Surface Dice (NSD) tolerance in mm.")
    hd_percentile: float = Field(95.0, gt=0, le=100, description="Hausdorff distance percentile.")
    montage_cases: int = Field(2, ge=1, le=10, description="Best and worst cases shown in the montage.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    lesion_size_bins_mm: tuple[float, ...] = Field(
        (6.0, 10.0),
        min_length=1,
        max_length=8,
        description="Ascending equivalent-sphere diameter edges (mm) of the lesion-detection size bins.",
    )

    @field_validator("lesion_size_bins_mm")
    @classmethod
    def _ascending_bins(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        # bin names print edges with two decimals (lesionflow.seg.detection): equal at 0.01 mm would collide
        ascending = all(round(v[i + 1], 2) > round(v[i], 2) for i in range(len(v) - 1))
        if not ascending or not all(0 < e < float("inf") for e in v):
            raise ValueError(f"expected finite diameters > 0 mm, strictly increasing at 0.01 mm, got {list(v)}")
        return v


class RegistryParams(_Section):
    """MLflow registration (embedded SQLite under mlruns/ unless a server is given)."""

    model_name: str = Field("lesionflow-seg", min_length=1, description="Registered model name.")
    tracking_uri: str = Field(
        "", description="MLflow server URL; empty = env MLFLOW_TRACKING_URI, else <workspace>/mlruns (SQLite)."
    )
    experiment: str = Field("lesionflow", min_length=1, description="MLflow experiment.")
    intended_use: str = Field(
        "Research only: lesion segmentation trained by lesionflow; not for clinical use.",
        description="Intended use written into metadata.json.",
    )


class StorageParams(_Section):
    """The team's shared storage: the flow publishes the Zarr stores there, pushes the DVC data, keeps Prefect's task
    results and MLflow's artifacts. Endpoint and credentials come from the AWS_* environment, never from params.
    """

    remote: str = Field(
        "",
        description="s3://bucket/prefix of the team storage (endpoint: AWS_ENDPOINT_URL); empty = local only.",
    )
    retries: int = Field(3, ge=0, le=10, description="Retries of a publication or push whose endpoint did not answer.")
    retry_delay_s: float = Field(2.0, ge=0, le=600, description="First retry delay in seconds; doubled each retry.")

    @field_validator("remote")
    @classmethod
    def _s3_prefix(cls, v: str) -> str:
        v = v.strip()
        scheme, sep, rest = v.partition("://")
        if v and (not sep or scheme.lower() not in ("s3", "s3a") or not rest.strip("/")):
            raise ValueError("expected s3://bucket/prefix (or empty for local disk only)")
        if "@" in rest.split("/", 1)[0]:
            raise ValueError("credentials do not belong in the URL; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return v.rstrip("/")

    def retry_delays(self) -> list[float]:
        """Backoff before each retry: retry_delay_s, doubled each time."""
        return [self.retry_delay_s * 2**i for i in range(self.retries)]


class OrchestrationParams(_Section):
    """``lesionflow serve``: the Prefect deployments of infra/prefect.yaml on a local process work pool."""

    timezone: str = Field(
        "UTC", description="IANA time zone of the nightly-retrain schedule (e.g. Europe/Berlin); DST aware."
    )
    nightly_cron: str = Field("0 2 * * *", description="Cron line of the nightly-retrain deployment (5 fields).")
    work_pool: str = Field(
        "lesionflow-local", min_length=1, description="Process work pool the deployments run on (serve --pool wins)."
    )
    server_startup_timeout_s: int = Field(
        300,
        ge=10,
        le=3600,
        description="Seconds `lesionflow run` / `study` wait for the embedded Prefect server to start (Prefect: 20; "
        "a loaded machine needs more); env PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS wins.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        # Prefect accepts exactly the names in the IANA database shipped with Python (zoneinfo); checking here
        # turns a typo into a params error at load time instead of a failed deploy.
        if v not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {v!r}; expected an IANA name such as 'UTC' or 'Europe/Berlin'")
        return v

    @field_validator("nightly_cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        # Only the shape is checked here (params never import Prefect); Prefect's own cron parser checks the
        # fields at deploy time and `lesionflow serve` reports its message.
        if len(v.split()) != 5:
            raise ValueError(f"expected a cron line with 5 fields (minute hour day month weekday), got {v!r}")
        return v


StudyArm = Literal["real", "copies", "copy-paste", "repaint", "lefusion", "lefusion+diffmask"]
DEFAULT_STUDY_ARMS: tuple[StudyArm, ...] = ("real", "copies", "copy-paste", "repaint", "lefusion", "lefusion+diffmask")


class StudyParams(_Section):
    """`lesionflow study`: does synthetic data help? Arms x nested real fractions x segmenter seeds."""

    arms: list[StudyArm] = Field(
        default_factory=lambda: list(DEFAULT_STUDY_ARMS),
        description="What fills the synthetic share of the patches; 'real' (real only) is the paired baseline.",
    )
    fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        description="Nested shares of the training split (smaller subsets inside larger ones), each in (0, 1].",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Segmenter seeds per cell (>= 3).")
    synthetic_ratio: float = Field(
        0.25, gt=0, lt=1, description="Share of training patches the synthetic arms draw from synthetic data."
    )
    dose_ratios: list[float] = Field(
        default_factory=list,
        description="Dose series: more synthetic ratios each synthetic arm trains at, at the smallest fraction.",
    )
    min_lesion_cases: int = Field(2, ge=1, description="Fewest training cases with lesions a fraction may keep.")
    workers: int = Field(
        2, ge=1, description="Cells trained side by side (local Dask worker processes, one cell each; 1 = in-process)."
    )
    scheduler_address: str = Field(
        "", description="tcp://host:8786 of a running Dask scheduler for the cells; empty = local cluster."
    )
    cell_threads: int = Field(
        1, ge=1, description="torch threads per cell (fixed, so results do not depend on workers or the machine)."
    )
    mlflow: bool = Field(True, description="Log a parent run with one child run per cell to the MLflow tracking store.")
    saved_tolerance: float = Field(
        0.01, ge=0, description="'Real cases saved': within this much mean Dice of real at fraction 1.0."
    )
    bootstrap_resamples: int = Field(9999, ge=100, description="Resamples of the 95% bootstrap CI.")
    acceptance_filter: bool = Field(
        False,
        description="FreeTumor's acceptance filter per fraction: the synthetic gate scores each sample with the "
        "fraction's real-only segmenter (its first-seed 'real' cell) and the arms train on the samples it accepts.",
    )

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[StudyArm]) -> list[StudyArm]:
        if "real" not in v:
            raise ValueError("must include 'real': every arm is compared with it at the same fraction")
        if len(set(v)) != len(v):
            raise ValueError(f"lists an arm twice: {v}")
        return v

    @field_validator("dose_ratios")
    @classmethod
    def _doses(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 < r < 1]
        if bad:
            raise ValueError(f"each dose ratio must lie in (0, 1), got {bad}; use e.g. [0.1, 0.5]")
        return sorted(set(v))

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0 < f <= 1]
        if bad or not v:
            raise ValueError(f"each fraction must lie in (0, 1], got {v}; use e.g. [0.25, 0.5, 1.0]")
        return sorted(set(v))


class Params(_Section):
    """The whole params.yaml."""

    project: ProjectParams = Field(default_factory=ProjectParams)
    demo: DemoParams = Field(default_factory=DemoParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    quality: QualityParams = Field(default_factory=QualityParams)
    plan: PlanParams = Field(default_factory=PlanParams)
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    synth: SynthParams = Field(default_factory=SynthParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)
    storage: StorageParams = Field(default_factory=StorageParams)
    study: StudyParams = Field(default_factory=StudyParams)

    @model_validator(mode="after")
    def _check(self) -> Params:
        return self

    def redacted_dump(self) -> dict[str, Any]:
        """The params as JSON-ready sections with URL credentials removed (``redact_uri``): what every sink gets.

        MLflow params, ``params check``, reports and anything else that shows or stores params use this, never
        ``model_dump``; the stages themselves read the typed model (an ``s3://`` source's user info is ignored
        there anyway: S3 credentials come from the environment).
        """
        from lesionflow.io.remote import redact_tree

        dumped: dict[str, Any] = redact_tree(self.model_dump(mode="json"))
        dumped["ingest"]["deid"]["salt"] = REDACTED  # a secret that is not a URL: never its value in any sink
        return dumped


def _format_error(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    value: Any = raw
    for part in first["loc"]:
        if isinstance(value, dict):
            value = value.get(str(part), value.get(part))
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]  # a list item (e.g. study.arms.1)
        else:
            value = None
    if first["type"] == "extra_forbidden":
        return f"params: unknown key '{key}'; remove it or check its spelling (see params.yaml)"
    expected = first["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a check across keys of a section: the message names them, the dict is noise
        return f"params: '{key}' is invalid: {expected}"
    from lesionflow.io.remote import redact_tree

    value = redact_tree(value)  # a URL may carry credentials: never echo them
    return f"params: '{key}' = {value!r} is invalid: {expected}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML, so 3 is int and [1,2] a list)."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected section.key=value, e.g. --set ingest.source=data/my_dataset")
    key, _, value_text = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ParamsError(
            f"--set {text!r}: the key must name a section and a key, e.g. quality.max_reject_fraction=0.1"
        )
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return parts, value


# The overrides that carry URL credentials, as JSON, from the CLI to a flow it calls in the same process: Prefect
# stores a flow's parameters in its database, so the flow gets them redacted and restores them from here.
SECRET_OVERRIDES_ENV = "LESIONFLOW_SECRET_OVERRIDES"


def split_secret_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(every override with URL credentials redacted, the original text of those that had some)."""
    from lesionflow.io.remote import redact_text

    shown = [redact_text(text) for text in overrides]
    return shown, [text for text, safe in zip(overrides, shown, strict=True) if text != safe]


def restore_secret_overrides(overrides: Sequence[str], secrets_json: str | None) -> list[str]:
    """``overrides`` with each redacted one replaced by its original from :data:`SECRET_OVERRIDES_ENV`'s value."""
    from lesionflow.io.remote import redact_text

    if not secrets_json:
        return list(overrides)
    try:
        secrets = [str(text) for text in json.loads(secrets_json)]
    except (ValueError, TypeError):
        raise ParamsError(f"{SECRET_OVERRIDES_ENV} is not a JSON list of overrides; unset it") from None
    originals = {redact_text(text): text for text in secrets}
    return [originals.get(text, text) for text in overrides]


def deep_merge(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``given`` merged in, nested mappings key by key (``given`` wins); neither input changes."""
    out = copy.deepcopy(base)
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``section.key=value`` override applied."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"--set {text!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_params_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist; run from the workspace root or pass --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"params file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def validate_params(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, raw)) from None


def preset_overrides(preset: str, search: list[Path]) -> list[str]:
    """A preset (``presets/<name>.yaml``: a partial params.yaml) as ``section.key=value`` overrides.

    ``preset`` is a name looked up as ``<dir>/presets/<name>.yaml`` in each of ``search``, or a file path.
    Applied before ``--set`` overrides, so an explicit ``--set`` always wins.
    """
    import json

    candidates = [Path(preset)] + [d / "presets" / f"{preset}.yaml" for d in search]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        names = sorted({f.stem for d in search for f in (d / "presets").glob("*.yaml")})
        raise ParamsError(f"--preset {preset!r} not found; available: {', '.join(names) or 'none'}")
    data = read_params_file(path)

    def flatten(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [item for k, v in node.items() for item in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
        return [f"{prefix}={json.dumps(node)}"]

    return flatten(data, "")


def check_params_paths(root: Path, params: Params) -> None:
    """Refuse (one line) a path param that points at something other than what it names, before a stage reads it.

    ``train.synthetic_store`` names a Zarr store: an existing folder without ``zarr.json`` (``/etc``) would be
    walked file by file for its digest. A store that does not exist yet is fine (synthesize writes it).
    """
    store = params.train.synthetic_store
    if not store:
        return
    path = Path(root) / store  # an absolute value replaces root
    if path.exists() and not (path / "zarr.json").is_file():
        raise ParamsError(
            f"params: 'train.synthetic_store' = {store!r} is not a Zarr store ({path} has no zarr.json); "
            "point it at the synthetic store (data/synthetic/store.zarr) or set it empty with train.synthetic_ratio=0"
        )


def load_params(path: Path, overrides: list[str] | None = None) -> Params:
    """Read, override and validate params.yaml."""
    return validate_params(apply_overrides(read_params_file(path), overrides or []))


def section_dict(params: Params, section: str) -> dict[str, Any]:
    """JSON-ready dict of one section (used in cache keys and manifests)."""
    return getattr(params, section).model_dump(mode="json")
