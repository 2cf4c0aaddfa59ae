"""Typed parameters of lesion synthesis: the ``synth`` section and the synthetic gate's ``quality.synthetic``.

Kept apart from :mod:`lesionflow.params` only for size; the same rules apply (frozen models, unknown keys
rejected, one-line errors). Each method's section is the one settings model of that method: its trainer and
sampler in :mod:`lesionflow.synth` (and the loop in :mod:`lesionflow.diffusion.trainer`) take it as is, so this
module imports nothing but pydantic (docs/decisions.md, "One settings model per synthesis method").

Defaults are the CPU ``toy`` preset (16³ ROIs, base width 8, T = 50, seconds per sample);
``presets/lefusion-lidc.yaml`` and ``presets/repaint.yaml`` hold the papers' sizes for a GPU.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

GeneratorMethod = Literal["lefusion", "diffmask", "ddpm", "pie"]


# Largest integer any setting may hold: past 2**53 a value no longer survives JSON readers (MLflow's UI, JavaScript)
# and every real count, size or seed is far below it. Fields with a meaningful bound say so with `le`.
MAX_INT = 2**53


def _scalar_mismatch(annotation: Any, value: Any) -> str | None:
    """Why ``value`` cannot be ``annotation`` without a silent conversion (None when it can, or pydantic decides).

    Pydantic's lax mode turns ``true`` into 1, ``"5"`` into 5 and ``1.0`` into 1, and YAML (params.yaml and every
    ``--set``) already gives real ints, floats and bools, so anything else is a typo (``train.steps=true``).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = [_scalar_mismatch(a, value) for a in args if a is not type(None)]
        return None if None in reasons else reasons[0]
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if (len(args) == 2 and args[1] is Ellipsis) or origin is list else args
        return next((r for a, v in zip(items, value, strict=False) if (r := _scalar_mismatch(a, v))), None)
    if annotation is bool and not isinstance(value, bool):
        return "expected true or false"
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return "expected an integer"
        if abs(value) > MAX_INT:
            return f"expected an integer of at most {MAX_INT} in magnitude"
    if annotation is float and isinstance(value, bool):
        return "expected a number"  # strings stay pydantic's: YAML 1.1 reads 1e-4 (no dot) as the text '1e-4'
    return None


class StrictSection(BaseModel):
    """Base of every params section: frozen, unknown keys rejected, ints/floats/bools taken only as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        reason = None if field is None else _scalar_mismatch(field.annotation, value)
        if reason is not None:
            raise ValueError(reason)
        return value


class _Section(StrictSection):
    pass


class GeneratorNetParams(_Section):
    """Network, schedule and optimisation of one diffusion generator (shared by every method)."""

    base_channels: int = Field(8, ge=1, description="Width of the first UNet level (independent of the ROI size).")
    channel_mults: tuple[int, ...] = Field((1, 2), description="Width multipliers per level; levels-1 downsamplings.")
    attention_levels: tuple[bool, ...] = Field((False, False), description="Self-attention per level (coarse only).")
    timesteps: int = Field(50, ge=2, le=4000, description="Diffusion steps T (cosine schedule, s = 0.008).")
    steps: int = Field(150, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, le=512, description="ROIs per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=64, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW learning rate (authors: 1e-4; toy runs are short).")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay; the EMA weights are the ones sampled from.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps and at the end (resumable).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="bf16 autocast on CUDA (auto = when supported).")

    @model_validator(mode="after")
    def _levels(self) -> GeneratorNetParams:
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive ints, got {list(self.channel_mults)}")
        if len(self.attention_levels) != len(self.channel_mults):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries for {len(self.channel_mults)} levels"
            )
        return self


class LeFusionParams(GeneratorNetParams):
    """LeFusion: lesion-focused loss, histogram condition, RePaint sampling (generative.md §2, §9.2)."""

    steps: int = Field(300, ge=1, description="Optimizer steps.")

    bins: int = Field(16, ge=2, le=256, description="Histogram bins of the lesion texture condition.")
    value_range: tuple[float, float] | None = Field(
        None,
        description="Histogram support and x0 clamp in normalized units; null = derived from the training lesions "
        "(0.5-99.5th percentiles + 10% margin), recorded with the generator.",
    )
    loss_normalize: Literal["all", "mask"] = Field(
        "all", description="Masked L1 divided by all voxels (authors) or by lesion voxels."
    )
    jump_length: int = Field(2, ge=1, description="RePaint jump length j (authors 5; 2 = fast).")
    jump_n_sample: int = Field(2, ge=1, description="RePaint resamplings r (authors 5; 2 = fast).")
    sample_steps: int = Field(
        0, ge=0, description="Sampling steps N kept of T, DDIM-style stride (0 = all T, the authors'); j, r run on N."
    )
    bank_k: int = Field(3, ge=1, description="k-means clusters of the histogram bank.")
    histogram_mode: Literal["cluster", "empirical", "explicit"] = Field(
        "cluster", description="Condition at sampling: a bank cluster (±10% perturbed), a real lesion's, or explicit."
    )
    explicit_histogram: tuple[float, ...] = Field((), description="The histogram for mode explicit (bins per class).")
    multi_class: bool = Field(True, description="One channel per lesion class (§2.7); false = all classes as one.")

    @field_validator("value_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"expected min < max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _sample_steps(self) -> LeFusionParams:
        # DDIM-style respacing keeps range(0, T, s) for an integer stride s (improved-diffusion's "ddimN" rule, see
        # lesionflow.diffusion.schedules.space_timesteps): only the counts ceil(T / s) are reachable.
        n, t = self.sample_steps, self.timesteps
        reachable = sorted({-(-t // s) for s in range(1, t)} | {t})
        if n and n not in reachable:
            near = sorted(reachable, key=lambda c: (abs(c - n), c))[:2]
            raise ValueError(
                f"sample_steps {n} is not reachable with an integer stride over timesteps {t} "
                f"(ceil(T/s) steps are); use {' or '.join(map(str, sorted(near)))}, or 0 for all T"
            )
        return self


class DiffMaskParams(GeneratorNetParams):
    """DiffMask: a DDPM over lesion masks controlled by a bounding-sphere channel (generative.md §2.8)."""

    threshold: float = Field(0.5, gt=0, lt=1, description="Threshold of the sampled mask mapped to [0, 1].")
    zoom: float = Field(1.0, gt=0, le=4, description="Mask zoom about the sphere centre (authors 1.5; grid kept).")
    ddim_steps: int = Field(0, ge=0, description="0 = ancestral DDPM over all T steps; >0 = DDIM (eta 0).")
    batch_size: int = Field(8, ge=1, le=512, description="Masks per micro-batch.")
    # Size matching (issue 16): new masks must follow the training lesions' size distribution (the gate's KS test).
    size_tries: int = Field(
        4, ge=0, le=64, description="Chains drawn per new mask to find one of the target size; 0 = off (first mask)."
    )
    size_batch: int = Field(4, ge=1, le=64, description="Masks per chain of a size try (one batched reverse chain).")
    size_quantiles: tuple[float, float] = Field(
        (0.05, 0.95), description="Accepted voxel counts: these quantiles of the training lesion sizes."
    )
    size_tolerance: float = Field(
        1.5, gt=1, le=10, description="Accepted voxel counts: within this factor of the target drawn from them."
    )

    @model_validator(mode="after")
    def _ddim(self) -> DiffMaskParams:
        if self.ddim_steps > self.timesteps:
            raise ValueError(f"ddim_steps must lie in [0, timesteps={self.timesteps}], got {self.ddim_steps}")
        lo, hi = self.size_quantiles
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"size_quantiles must satisfy 0 <= low < high <= 1, got {list(self.size_quantiles)}")
        return self


class DdpmParams(GeneratorNetParams):
    """Unconditional DDPM for RePaint inpainting: lesion removal and the insertion baseline (§3, §9.3)."""

    schedule: Literal["cosine", "linear"] = Field("cosine", description="Noise schedule.")
    jump_length: int = Field(2, ge=1, description="RePaint jump length j (paper 10; 2 = fast).")
    jump_n_sample: int = Field(2, ge=1, description="RePaint resamplings r (paper 10; 2 = fast).")
    sample_steps: int = Field(
        0, ge=0, description="Sampling steps N kept of T, evenly spread (0 = all T; paper 250 of 1000); j, r run on N."
    )
    removal_dilation: int = Field(1, ge=0, le=16, description="Voxels a lesion grows by before removal.")

    @model_validator(mode="after")
    def _sample_steps(self) -> DdpmParams:
        if self.sample_steps > self.timesteps:
            raise ValueError(
                f"sample_steps {self.sample_steps} exceeds timesteps {self.timesteps}; use at most T, or 0 for all T"
            )
        return self


class PieParams(GeneratorNetParams):
    """PIE: a severity-conditioned DDPM edited progressively into a trajectory (generative.md §5, §9.5).

    Loop defaults are the paper's (N = 10, γ = 0.5, w = 7.5, β1 = 0.01, β2 = 0.75; https://github.com/IrohXu/PIE
    ``run_pie.py``); the paper runs 50 DDIM steps, i.e. 25 per iteration.
    """

    steps: int = Field(300, ge=1, description="Optimizer steps.")
    severity: Literal["volume", "class"] = Field(
        "volume", description="Severity condition: lesion-volume quantile in the training set, or the label class rank."
    )
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="Condition dropout for classifier-free guidance.")
    batch_size: int = Field(4, ge=1, le=512, description="ROIs per micro-batch.")
    ddim_steps: int = Field(10, ge=1, description="DDIM steps of a full denoising (paper 50); γ·steps run per frame.")
    # iterations >= 1 and strength in (0, 1] are checked by the validators below (their messages name N and γ)
    iterations: int = Field(10, le=1000, description="Editing iterations N: the trajectory has N + 1 frames.")
    strength: float = Field(
        0.5, description="Strength γ in (0, 1]: how far each frame is noised back (to the paper's ᾱ for that γ)."
    )
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale w toward the target severity.")
    beta_outside: float = Field(0.01, ge=0, le=1, description="Blend β1 outside the ROI; 0 = exact background (paste).")
    beta_inside: float = Field(0.75, ge=0, le=1, description="Blend β2 inside the ROI.")
    target_severity: float = Field(1.0, description="Severity the trajectories move toward (0 healthy .. 1 severe).")
    cases: int = Field(1, ge=0, le=10_000, description="Training cases that get a trajectory in `synthesize`.")
    margin: int = Field(3, ge=0, le=64, description="Voxels the editable ROI extends around the starting lesion.")

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"PIE needs at least one iteration, got N = {v}; set iterations >= 1")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"strength γ must lie in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _kept(self) -> PieParams:
        if self.kept_steps < 1:
            raise ValueError(
                f"strength γ = {self.strength} keeps int({self.ddim_steps} · {self.strength}) = 0 of the "
                f"{self.ddim_steps} DDIM steps; raise strength or ddim_steps"
            )
        if self.ddim_steps > self.timesteps:
            raise ValueError(f"ddim_steps {self.ddim_steps} exceeds timesteps {self.timesteps}")
        return self

    @property
    def kept_steps(self) -> int:
        """K = int(S · γ): the DDIM steps each iteration runs (the paper: int(50 · 0.5) = 25)."""
        return int(self.ddim_steps * self.strength)

    @property
    def exact_background(self) -> bool:
        """β1 = 0 mode: the final hard paste keeps every voxel outside M bit for bit."""
        return self.beta_outside == 0


class SynthParams(_Section):
    """Lesion synthesis: ROI extraction, generator training and the synthetic store (defaults: toy preset)."""

    roi_size: tuple[int, int, int] = Field((16, 16, 16), description="ROI (x, y, z) voxels; LIDC preset 64x64x32.")
    min_lesion_voxels: int = Field(4, ge=1, description="Smaller lesion components are not used for training.")
    candidates_per_case: int = Field(4, ge=0, description="Lesion-free ROIs drawn inside each case's organ mask.")
    # Which label values are lesions (extract-rois; lesionflow.synth.rois.LabelRoles / LesionCensus)
    lesion_labels: tuple[Annotated[int, Field(ge=1, le=255)], ...] = Field(
        (), description="Label values that are lesions; empty = every non-zero value not in organ_labels."
    )
    organ_labels: tuple[Annotated[int, Field(ge=1, le=255)], ...] = Field(
        (), description="Label values that mark the organ: never lesions; the organ mask where a case has none."
    )
    max_lesion_share: float = Field(
        0.25, gt=0, le=1, description="A lesion value covering a larger median share of the volume is organ-sized."
    )
    min_median_lesion_voxels: int = Field(
        10, ge=1, description="Lesion components with a smaller median voxel count are label noise (specks)."
    )
    generators: tuple[GeneratorMethod, ...] = Field(
        ("lefusion", "diffmask", "pie"),
        description="Generators `train-generator` trains: lefusion, diffmask, ddpm, pie (progression); "
        "empty only with method copy-paste.",
    )
    method: Literal["lefusion", "ddpm", "pie", "copy-paste"] = Field(
        "lefusion",
        description="Texture generator `synthesize` uses (ddpm = the RePaint insertion baseline); pie = "
        "progression trajectories only. Trajectories are also made when 'pie' is in generators. copy-paste = the "
        "non-learned baseline: new_per_case samples of real training lesions (data/rois) pasted exactly at new "
        "positions inside the organ; no generator (generators may be empty), relesion_per_case must be 0.",
    )
    relesion_per_case: int = Field(1, ge=0, le=64, description="Samples re-texturing the case's real lesions (P').")
    new_per_case: int = Field(1, ge=0, le=64, description="Samples with new lesions placed inside the organ (N').")
    remove_per_case: int = Field(0, ge=0, le=64, description="Samples with a lesion removed (needs the ddpm model).")
    lesions_per_sample: int = Field(1, ge=1, le=16, description="Lesions generated per new-lesion sample.")
    batch_lesions: int = Field(4, ge=1, le=64, description="Lesions sampled per forward pass.")
    workers: int = Field(2, ge=1, le=256, description="Local Dask worker processes for `synthesize`.")
    scheduler_address: str = Field("", description="tcp://host:8786 to use a running Dask cluster.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    lefusion: LeFusionParams = Field(default_factory=LeFusionParams)
    diffmask: DiffMaskParams = Field(default_factory=DiffMaskParams)
    ddpm: DdpmParams = Field(default_factory=DdpmParams)
    pie: PieParams = Field(default_factory=PieParams)

    @field_validator("roi_size")
    @classmethod
    def _roi(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 4:
            raise ValueError(f"expected three edges >= 4 voxels, got {list(v)}")
        return v

    @field_validator("generators")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"generators listed twice: {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SynthParams:
        if self.method == "copy-paste":
            if self.relesion_per_case:
                raise ValueError(
                    "method 'copy-paste' pastes real lesions at new positions (new_per_case) and has no texture "
                    "model to re-texture them with: set relesion_per_case to 0"
                )
        elif self.method not in self.generators:
            raise ValueError(
                f"method {self.method!r} is not among the trained generators {list(self.generators)}; add it"
            )
        if self.remove_per_case and "ddpm" not in self.generators:
            raise ValueError("remove_per_case > 0 needs the ddpm generator: add 'ddpm' to synth.generators")
        for name in ("lefusion", "diffmask", "ddpm", "pie"):
            net: GeneratorNetParams = getattr(self, name)
            multiple = 2 ** (len(net.channel_mults) - 1)
            if name in self.generators and any(s % multiple for s in self.roi_size):
                raise ValueError(
                    f"roi_size {list(self.roi_size)} must be a multiple of {multiple} per axis "
                    f"for synth.{name}.channel_mults {list(net.channel_mults)}"
                )
        return self


class SyntheticQualityParams(_Section):
    """Expectations of the synthetic gate (validate-synthetic); statistics are toy-tolerant by default."""

    max_histogram_w1: float = Field(
        1.5, ge=0, description="Wasserstein-1 (normalized units) between a lesion and its condition histogram."
    )
    min_volume_ks_pvalue: float = Field(
        0.001, ge=0, le=1, description="KS test of synthetic vs real lesion volumes: p-value at least this."
    )
    boundary_gradient_ratio: tuple[float, float] = Field(
        (0.2, 5.0), description="Boundary gradient / median real one must lie in this range (detects stickers)."
    )
    max_nn_similarity: float = Field(
        0.995, ge=0, le=1, description="Correlation with the nearest training lesion at most this (memorization)."
    )
    max_diversity: float = Field(
        0.995, ge=0, le=1, description="Mean pairwise correlation of samples sharing a condition at most this."
    )
    min_detected_fraction: float = Field(
        0.7, ge=0, le=1, description="Acceptance filter: the segmenter must find this share of a lesion."
    )
    acceptance_model: str = Field(
        "champion",
        description="Segmenter for the acceptance filter: champion (registry alias), a model folder, or empty = off.",
    )
    max_reject_fraction: float = Field(0.5, ge=0, le=1, description="The gate fails above this share of rejections.")
    # Distribution-level checks (quality/synthetic_distribution.py); defaults measured on the toy demo
    # (docs/decisions.md, "Distribution-level checks in the synthetic gate").
    max_mmd_ratio: float = Field(
        3.0,
        gt=0,
        description="Feature MMD of synthetic vs real training lesion ROIs over that of two real-train halves "
        "(~1 = as close as real data is to itself) at most this.",
    )
    copy_ncc: float = Field(
        0.95, ge=0, le=1, description="A lesion is a copy when its NCC with a training lesion (shift/flip) is >= this."
    )
    max_copy_rate: float = Field(
        0.1, ge=0, le=1, description="Share of new-texture lesions that are copies at most this (copy-paste: reported)."
    )
    min_seed_diversity: float = Field(
        0.01, ge=0, le=2, description="Mean pairwise 1 - NCC of one ROI and condition over seeds at least this."
    )
    study_evidence: str = Field(
        "",
        description="Utility in the loop: a study summary.json (reports/study/summary.json); admit synthetic data "
        "only when it shows these generators' arm at least min_study_effect. Empty = off.",
    )
    min_study_effect: float = Field(
        0.0, ge=-1, le=1, description="Lowest allowed 95% CI lower bound of the arm's Dice effect in that study."
    )
    # The toy defaults only report the two PIE statistics (-1 and 10 never fail in practice): a generator trained
    # for seconds on a handful of demo lesions has not learned progression (docs/decisions.md, PIE). The check is
    # proven on a model that has (tests/synth/test_pie.py); presets/pie.yaml sets the 0 and 1.
    min_progression_rho: float = Field(
        -1.0, ge=-1, le=1, description="PIE: mean Spearman rho of severity over the frames must exceed this."
    )
    max_step_change_ratio: float = Field(
        10.0, gt=0, description="PIE: mean severity step change, second half / first half, at most this."
    )

    @field_validator("boundary_gradient_ratio")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"expected 0 <= min < max, got {list(v)}")
        return v
