"""PIE in 3D: disease progression by progressive image editing.

References:

- [PIE] K. Liang, X. Cao, K.-D. Liao, T. Gao, W. Ye, Z. Chen, J. Cao, T. Nama, J. Sun, "PIE: Simulating Disease
  Progression via Progressive Image Editing", 2023, https://arxiv.org/abs/2309.11745 -- the progressive editing
  procedure (Algorithm 1); authors' code https://github.com/IrohXu/PIE (``run_pie.py``,
  ``pipeline_stable_diffusion_pie.py``).
- [CFG] J. Ho, T. Salimans, "Classifier-Free Diffusion Guidance", 2022, https://arxiv.org/abs/2207.12598 --
  Algorithm 1 (training with the condition dropped), Algorithm 2 and Eq. 6 (guided sampling).
- [DDIM] J. Song, C. Meng, S. Ermon, ICLR 2021, https://arxiv.org/abs/2010.02502 -- Eq. 12 with η = 0, the
  denoising step of each round.

The original (IrohXu/PIE) edits 2D Stable-Diffusion latents under a clinical-report prompt. Ours works in image
space on ROI crops of the store's normalised volumes, with our conditional 3D UNet whose vector condition is a
scalar **severity** in [0, 1] derived from the training data (0 = healthy tissue, a lesion-free candidate ROI):

- ``volume``: the empirical CDF of the lesion's voxel count among the training lesions (0.5 = a median lesion,
  1 = the largest one seen);
- ``class``: the rank of the lesion's highest label class among the plan's lesion classes (k / C).

The model is trained with classifier-free guidance ([CFG] Algorithm 1: the condition is dropped with probability
``cond_dropout`` and replaced by the learned null embedding), so sampling can push towards a severity with a
guidance scale w.

Conventions: images ``(c, x, y, z)`` float (normalised units); the ROI mask ``M`` is ``(x, y, z)`` bool with
**True = may change**; a trajectory is ``(N + 1, c, x, y, z)`` with frame 0 the starting volume bit for bit.

The progressive editing loop ([PIE] Algorithm 1 as the authors' ``run_pie.py`` runs it, here in image space
instead of latents), for n = 1..N, over ``K = int(S · γ)`` DDIM timesteps ``τ_K > ... > τ_1`` (S = ``ddim_steps``,
γ = ``strength``, the paper's "roll back ratio") evenly spread from the start step ``τ_K`` down to 0.

**Strength mapping** (:func:`edit_start`). The paper's γ keeps the last ``int(50 γ)`` of 50 DDIM steps on Stable
Diffusion's scaled-linear schedule (T = 1000, β from 0.00085 to 0.012 linear in sqrt β; "leading" timesteps
``20 i + 1``; diffusers ``StableDiffusionImg2ImgPipeline.get_timesteps``, which ``pipeline_stable_diffusion_pie.py``
copies), so γ = 0.5 starts at t = 481, ᾱ = 0.302. Keeping the same fraction of *our* cosine steps would start at a
much higher signal level (ᾱ ≈ 0.51), i.e. much weaker edits. So γ names a signal level: ``τ_K`` is our step whose
ᾱ is nearest the ᾱ the paper's γ reaches on its schedule; :func:`loop_settings` records both.

1. ``x ← sqrt(ᾱ_{τ_K}) x_{n-1} + sqrt(1 - ᾱ_{τ_K}) z``: noise the previous frame to the start level;
2. for each kept step ``τ_k`` (k = K..1): unless it is the first, re-inject the *initial* volume noised to the same
   level outside M, ``x ← M ⊙ x + (1 - M) ⊙ q(x_0, τ_k)``; then one deterministic DDIM step (η = 0, [DDIM]
   Eq. 12) with the guided noise ``ε = ε_∅ + w (ε_s - ε_∅)`` under the target severity s ([CFG] Eq. 6, whose
   ``(1 + w) ε_s - w ε_∅`` is this with its w = our w - 1; our w is Stable Diffusion's guidance scale, as in PIE);
3. blend toward the initial volume: ``x_n = x_0 + β ⊙ (x - x_0)``, β = β2 inside M and β1 outside;
4. with ``β1 = 0``: hard paste ``x_n ← M ⊙ x_n + (1 - M) ⊙ x_0``, so the background is the input bit for bit.

Because step 2's DDIM output is clamped to ``CLIP_RANGE`` (lo, hi), every voxel outside M obeys
``|x_n - x_0| <= β1 · max(hi - x_0, x_0 - lo)``: the bound the progression gate checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from lesionflow.diffusion.samplers import ddim_step, ddim_timesteps, noise_known
from lesionflow.diffusion.schedules import NoiseSchedule, cosine_schedule
from lesionflow.diffusion.trainer import GeneratorTrainOutcome, eps_loss, train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig, make_eps_fn
from lesionflow.params_synth import PieParams
from lesionflow.seeding import rng_for
from lesionflow.synth.rois import Roi

__all__ = [
    "CLIP_RANGE",
    "SeverityScale",
    "Trajectory",
    "edit_mask",
    "edit_start",
    "edit_timesteps",
    "fit_severity_scale",
    "lesion_intensity_split",
    "loop_settings",
    "make_pie_model",
    "noise_schedule",
    "paper_start",
    "progress",
    "severity_batches",
    "train_pie",
]

SeveritySource = Literal["volume", "class"]


CLIP_RANGE: tuple[float, float] = (-5.0, 5.0)  # x0_hat clamp of every DDIM step, in the data's z-scored units


def noise_schedule(params: PieParams) -> NoiseSchedule:
    """The cosine schedule of ``params.timesteps`` steps, for training and editing alike."""
    return cosine_schedule(params.timesteps)


# The paper's schedule: Stable Diffusion v1's scheduler config (num_train_timesteps 1000, beta_schedule
# "scaled_linear", beta_start 0.00085, beta_end 0.012, steps_offset 1) with the 50 inference steps of run_pie.py.
PAPER_T, PAPER_BETAS, PAPER_STEPS = 1000, (0.00085, 0.012), 50


def paper_start(strength: float) -> tuple[int, float]:
    """(timestep, ᾱ) where the paper's editing starts for strength γ: ``init = int(50 γ)`` kept steps of the 50
    "leading" DDIM timesteps ``20 i + 1`` ([PIE] ``get_timesteps``), so the start is ``20 (init - 1) + 1`` (γ = 0.5:
    481); ᾱ on SD's scaled-linear schedule (β_t = (sqrt β_0 + t/(T-1) (sqrt β_1 - sqrt β_0))², ᾱ_t = Π (1 - β_s)).
    γ below 1/50 (no paper step) maps to the paper's last step, t = 1."""
    init = max(min(int(PAPER_STEPS * strength), PAPER_STEPS), 1)
    t = (PAPER_T // PAPER_STEPS) * (init - 1) + 1
    lo, hi = (np.sqrt(b) for b in PAPER_BETAS)
    betas = np.linspace(lo, hi, PAPER_T, dtype=np.float64) ** 2
    return t, float(np.prod(1.0 - betas[: t + 1]))


def edit_start(params: PieParams) -> tuple[int, float]:
    """(τ_K, ᾱ_{τ_K}): our step whose ᾱ is nearest the ᾱ of :func:`paper_start` (``params.strength``), the lower
    step on a tie."""
    abar = noise_schedule(params).alphas_cumprod.double().cpu().numpy()
    t = int(np.argmin(np.abs(abar - paper_start(params.strength)[1])))
    return t, float(abar[t])


def edit_timesteps(params: PieParams) -> list[int]:
    """The DDIM indices of one iteration, highest noise first: K = ``params.kept_steps`` steps evenly spread from
    :func:`edit_start`'s τ_K down to 0 (fewer when τ_K + 1 < K: every step from τ_K)."""
    start, _ = edit_start(params)
    return ddim_timesteps(start + 1, min(params.kept_steps, start + 1))


def loop_settings(params: PieParams) -> dict[str, Any]:
    """What a trajectory records of the loop (its ``settings``, read back by the progression gate): the loop's
    fields of ``params`` and the clamp, under the names and in the order trajectories have always carried, plus the
    strength mapping: our start step and its ᾱ, and the paper's start step and ᾱ for the same γ."""
    start, start_abar = edit_start(params)
    paper_t, paper_abar = paper_start(params.strength)
    return {
        "timesteps": params.timesteps,
        "ddim_steps": params.ddim_steps,
        "iterations": params.iterations,
        "strength": params.strength,
        "start_timestep": start,
        "start_alpha_bar": start_abar,
        "paper_start_timestep": paper_t,
        "paper_alpha_bar": paper_abar,
        "guidance": params.guidance,
        "beta_outside": params.beta_outside,
        "beta_inside": params.beta_inside,
        "clip_range": list(CLIP_RANGE),
    }


# --------------------------------------------------------------------------- severity


@dataclass(frozen=True)
class SeverityScale:
    """How a training ROI maps to a severity in [0, 1]; ``trained_range`` is the (min, max) the model saw."""

    source: SeveritySource
    volumes: tuple[int, ...]  # sorted voxel counts of the training lesions (source "volume")
    class_values: tuple[int, ...]  # the plan's lesion classes, in severity order (source "class")
    trained_range: tuple[float, float]

    def of_lesion(self, voxels: int, classes: Sequence[int]) -> float:
        """Severity of a lesion of ``voxels`` voxels with label ``classes`` (0 for no lesion)."""
        if voxels <= 0:
            return 0.0
        if self.source == "volume":
            return float(np.searchsorted(np.asarray(self.volumes), voxels, side="right") / len(self.volumes))
        ranks = [self.class_values.index(c) + 1 for c in classes if c in self.class_values]
        return max(ranks, default=0) / len(self.class_values)

    def of_roi(self, roi: Roi) -> float:
        return self.of_lesion(int(roi.mask.sum()), roi.classes) if roi.kind == "lesion" else 0.0

    def check_target(self, target: float) -> None:
        """A clear error unless ``target`` lies in the trained range (the model never saw other severities)."""
        lo, hi = self.trained_range
        if not lo - 1e-9 <= target <= hi + 1e-9:
            raise ValueError(
                f"target severity {target:g} is outside the trained range [{lo:g}, {hi:g}]; pick a value in it "
                "(0 = healthy, 1 = the most severe training lesion)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "volumes": list(self.volumes),
            "class_values": list(self.class_values),
            "trained_range": list(self.trained_range),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeverityScale:
        lo, hi = d["trained_range"]
        return cls(d["source"], tuple(int(v) for v in d["volumes"]), tuple(int(v) for v in d["class_values"]), (lo, hi))


def fit_severity_scale(
    lesions: Sequence[Roi], candidates: Sequence[Roi], source: SeveritySource, class_values: Sequence[int]
) -> SeverityScale:
    """The scale of the training set: lesion voxel counts (volume) or the class order, and the range it covers."""
    if not lesions:
        raise ValueError("no lesion ROI to learn severities from; PIE needs training lesions")
    volumes = tuple(sorted(int(r.mask.sum()) for r in lesions))
    draft = SeverityScale(source, volumes, tuple(int(v) for v in class_values), (0.0, 1.0))
    values = [draft.of_roi(r) for r in [*lesions, *candidates]]
    return SeverityScale(source, volumes, draft.class_values, (float(min(values)), float(max(values))))


def lesion_intensity_split(lesions: Sequence[Roi]) -> tuple[float, float]:
    """(threshold, polarity) on channel 0 that best separates lesion from non-lesion voxels of the training lesion
    ROIs: the cut maximising balanced accuracy (TPR + TNR), with polarity +1 when lesions lie above it (-1 below).
    Used to estimate the lesion mask of every trajectory frame."""
    inside = np.concatenate([r.image[0][r.mask].astype(np.float64) for r in lesions])
    outside = np.concatenate([r.image[0][~(r.label > 0)].astype(np.float64) for r in lesions])
    if inside.size == 0 or outside.size == 0:
        raise ValueError("the training lesion ROIs hold no lesion or no background voxel")
    polarity = 1.0 if np.median(inside) >= np.median(outside) else -1.0
    a, b = np.sort(polarity * inside), np.sort(polarity * outside)
    cuts = np.unique(np.concatenate([a, b]))
    # voxel is lesion when polarity * value > cut: TPR = share of a above the cut, TNR = share of b at or below
    tpr = 1.0 - np.searchsorted(a, cuts, side="right") / a.size
    tnr = np.searchsorted(b, cuts, side="right") / b.size
    best = int(np.argmax(tpr + tnr))
    return float(polarity * cuts[best]), polarity


# --------------------------------------------------------------------------- training


def severity_batches(
    rois: Sequence[Roi], severities: np.ndarray, batch_size: int, seed: int
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(i)``: micro-batch ``i`` as a pure function of (seed, i). Each item is a lesion ROI (severity > 0)
    or a healthy one with probability 1/2 each (scarce lesion data: a few lesions among many lesion-free ROIs would
    otherwise teach mostly "healthy"), uniform within its group, flipped along x with probability 1/2.
    Keys: image (B, c, *size) float32, cond (B, 1) float32 severity."""
    if not rois or len(severities) != len(rois):
        raise ValueError(f"need one severity per ROI, got {len(severities)} for {len(rois)} ROIs")
    images = np.stack([r.image.astype(np.float32) for r in rois])
    conds = np.asarray(severities, dtype=np.float32).reshape(-1, 1)
    sick, healthy = np.flatnonzero(conds[:, 0] > 0), np.flatnonzero(conds[:, 0] <= 0)
    groups = [g for g in (sick, healthy) if g.size]

    def batches(i: int) -> dict[str, torch.Tensor]:
        rng = rng_for(seed, "pie-batch", i)
        group = rng.integers(len(groups), size=batch_size)
        pick = np.array([groups[g][rng.integers(groups[g].size)] for g in group])
        flip = rng.random(batch_size) < 0.5
        image = images[pick].copy()
        image[flip] = image[flip][:, :, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "cond": torch.from_numpy(conds[pick])}

    return batches


def make_pie_model(image_channels: int, params: PieParams) -> ConditionalUNet3D:
    """The severity-conditioned UNet: ``image_channels`` in and out, a 1-value condition with CFG dropout
    ``params.cond_dropout`` (Ho & Salimans, https://arxiv.org/abs/2207.12598, Algorithm 1), the architecture
    (width, levels, attention) of ``params``."""
    config = UNetConfig(
        in_channels=image_channels,
        out_channels=image_channels,
        base_channels=params.base_channels,
        channel_mults=tuple(params.channel_mults),
        attention_levels=tuple(params.attention_levels),
        cond_dim=1,
        cond_dropout=params.cond_dropout,
    )
    return ConditionalUNet3D(config)


def train_pie(
    rois: Sequence[Roi],
    scale: SeverityScale,
    params: PieParams,
    checkpoint_root: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    warn: Callable[[str], None] = print,
) -> GeneratorTrainOutcome:
    """Train the severity-conditioned DDPM (eps MSE over the whole ROI, condition dropped with
    ``params.cond_dropout``; network, schedule and optimisation from ``params``) on lesion and candidate ROIs
    scored by ``scale``; resumes from ``checkpoint_root`` like every generator."""
    severities = np.array([scale.of_roi(r) for r in rois], dtype=np.float32)
    batches = severity_batches(rois, severities, params.batch_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init only; every draw of the loop takes its own generator
        model = make_pie_model(rois[0].image.shape[0], params)
    schedule = noise_schedule(params)
    loss = partial(eps_loss, schedule=schedule, kind="l2")
    return train_generator(model, batches, loss, schedule, params, checkpoint_root, device, seed, warn)


# --------------------------------------------------------------------------- the editing loop


def edit_mask(lesion: np.ndarray, margin: int, organ: np.ndarray | None = None) -> np.ndarray:
    """The region a lesion may grow into: ``lesion`` grown by ``margin`` voxels (26-neighbourhood), kept inside
    ``organ`` where one is given (the lesion itself always stays in)."""
    lesion = np.asarray(lesion) > 0
    grown = lesion
    if margin > 0 and lesion.any():
        structure = ndimage.generate_binary_structure(3, 3)
        grown = np.asarray(ndimage.binary_dilation(lesion, structure=structure, iterations=margin))
    if organ is not None and np.any(organ):
        grown = (grown & (np.asarray(organ) > 0)) | lesion
    return grown


@dataclass(frozen=True)
class Trajectory:
    """``frames`` (N + 1, c, x, y, z): frame 0 is the start; ``roi_mask`` (x, y, z) bool, True = edited."""

    frames: np.ndarray
    roi_mask: np.ndarray
    target_severity: float
    exact_background: bool


def _check_inputs(
    model: ConditionalUNet3D, start: np.ndarray, roi_mask: np.ndarray | None, whole_volume: bool
) -> np.ndarray:
    cfg = model.config
    if cfg.cond_dim != 1 or start.ndim != 4 or cfg.in_channels != start.shape[0] or cfg.out_channels != start.shape[0]:
        raise ValueError(
            f"the model takes {cfg.in_channels} channels with a {cfg.cond_dim}-value condition; the start volume "
            f"has shape {start.shape} (need (c, x, y, z) with c = {cfg.in_channels}) and PIE needs a severity model"
        )
    m = cfg.size_multiple
    if any(s % m for s in start.shape[1:]):
        raise ValueError(f"start volume shape {start.shape[1:]} must be a multiple of {m} per axis for this model")
    if roi_mask is None:
        if not whole_volume:
            raise ValueError(
                "no ROI mask: PIE edits only inside a region of interest (without one it hallucinates changes "
                "everywhere); pass a mask, or whole_volume=True to edit the whole volume on purpose"
            )
        return np.ones(start.shape[1:], dtype=bool)
    mask = np.asarray(roi_mask) > 0
    if mask.shape != start.shape[1:]:
        raise ValueError(f"ROI mask shape {mask.shape} does not match the start volume {start.shape[1:]}")
    if not mask.any():
        raise ValueError("the ROI mask is empty: nothing may change; give a mask with at least one voxel")
    return mask


def progress(
    model: ConditionalUNet3D,
    params: PieParams,
    start: np.ndarray,
    roi_mask: np.ndarray | None,
    target_severity: float,
    generator: torch.Generator,
    *,
    whole_volume: bool = False,
    on_frame: Callable[[int], None] | None = None,
) -> Trajectory:
    """Run the N-iteration loop of the module docstring from ``start`` (c, x, y, z) toward ``target_severity``.

    Noise comes only from ``generator`` (on the model's device), so the same generator state gives the same
    frames. Frames are float32 (or the start's wider float dtype); outside M in β1 = 0 mode they are the start's
    values bit for bit.
    """
    start = np.asarray(start)
    mask = _check_inputs(model, start, roi_mask, whole_volume)
    dtype = np.result_type(np.float32, start.dtype)
    device = next(model.parameters()).device
    schedule = noise_schedule(params)
    taus = edit_timesteps(params)
    x0 = torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32))[None].to(device)
    inside = torch.from_numpy(mask)[None, None].to(device)
    cond = torch.full((1, 1), float(target_severity), dtype=torch.float32, device=device)
    eps_fn = make_eps_fn(model.eval(), cond, None, params.guidance)
    beta = torch.where(inside, params.beta_inside, params.beta_outside).to(torch.float32)
    t_batch = torch.zeros(1, dtype=torch.long, device=device)
    frames = [start.astype(dtype, copy=True)]
    previous = x0
    for n in range(1, params.iterations + 1):
        # 1. x = q(x_{n-1}, τ_K): roll the previous frame back to the start level ([PIE] Algorithm 1, strength γ)
        x = noise_known(schedule, previous, taus[0], generator)
        for k, (t, t_prev) in enumerate(zip(taus, [*taus[1:], -1], strict=True)):
            # 2a. background re-injection: outside M, the initial volume noised to the current level ([PIE] ROI mask;
            #     q(x_0, τ_k) is Ho et al. 2020 Eq. 4, https://arxiv.org/abs/2006.11239)
            if k > 0:
                x = torch.where(inside, x, noise_known(schedule, x0, t, generator))
            # 2b. one DDIM step (η = 0, [DDIM] Eq. 12) with classifier-free guidance ([CFG] Eq. 6 / Algorithm 2)
            #     toward the target severity
            eps = eps_fn(x, t_batch.fill_(t))
            x = ddim_step(schedule, eps, x, t, t_prev, 0.0, generator, clip_denoised=CLIP_RANGE)
        # 3. x_n = x_0 + β ⊙ (x - x_0), β2 inside M, β1 outside ([PIE] Algorithm 1, the β1/β2 blend)
        blended = (x0 + beta * (x - x0))[0].cpu().numpy().astype(dtype)
        # 4. β1 = 0: the background is the start array itself (no float round trip; ours, not a step of [PIE])
        frame = np.where(mask, blended, start) if params.exact_background else blended
        frames.append(frame.astype(dtype, copy=False))
        previous = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))[None].to(device)
        if on_frame is not None:
            on_frame(n)
    return Trajectory(np.stack(frames), mask, float(target_severity), params.exact_background)


# --------------------------------------------------------------------------- where a trajectory starts


@dataclass(frozen=True)
class ProgressionStart:
    """The crop a trajectory edits: ``origin`` (x, y, z) of its first voxel in the case volume, ``image``
    (c, *size), ``label`` (*size) uint8, ``roi_mask`` (*size) bool; ``kind`` says how M was chosen."""

    origin: tuple[int, int, int]
    image: np.ndarray
    label: np.ndarray
    roi_mask: np.ndarray
    lesion_voxels: int
    classes: tuple[int, ...]
    kind: Literal["lesion", "healthy", "given", "whole"]


def _ball(size: Sequence[int], centre: Sequence[float], radius: float) -> np.ndarray:
    grid = np.indices(tuple(size), dtype=np.float64)
    d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return np.asarray(d2 <= radius**2)


def progression_start(
    image: np.ndarray,
    label: np.ndarray,
    organ: np.ndarray | None,
    size: Sequence[int],
    *,
    min_voxels: int,
    margin: int,
    rng: np.random.Generator,
    whole: bool = False,
) -> ProgressionStart:
    """Where a case's trajectory starts: its smallest lesion that fits the ROI ("early disease"), with M = the lesion
    grown by ``margin`` voxels inside the organ; else a lesion-free ROI in the organ with M = a ball of radius
    ``margin + 2``. ``whole``: the same crop with M = the whole crop. Raises ValueError when neither exists."""
    from lesionflow.synth.rois import candidate_rois, lesion_roi_problem, lesion_rois

    roi_size = tuple(int(s) for s in size)
    usable = [
        r
        for r in lesion_rois(image, label, organ, roi_size, min_voxels=min_voxels)
        if lesion_roi_problem(r, image.shape[1:]) is None
    ]
    if usable:
        roi = min(usable, key=lambda r: (r.voxels, r.index))
        mask = edit_mask(roi.mask, margin, roi.organ)
        kind: Literal["lesion", "healthy", "given", "whole"] = "lesion"
        voxels, classes = int(roi.mask.sum()), roi.classes
    else:
        candidates = candidate_rois(image, label, organ, roi_size, 1, rng)
        if not candidates:
            raise ValueError(
                f"no lesion of at least {min_voxels} voxels fits synth.roi_size {list(roi_size)} and there is no "
                "organ mask to start a healthy ROI in, so there is no ROI mask; give one (roi_mask) or whole_volume"
            )
        roi = candidates[0]
        centre = [s // 2 for s in roi_size]
        mask = _ball(roi_size, centre, margin + 2) & (roi.organ > 0 if roi.organ is not None else True)
        kind, voxels, classes = "healthy", 0, ()
    if whole:
        mask, kind = np.ones(roi_size, dtype=bool), "whole"
    return ProgressionStart(roi.origin, roi.image, roi.label, mask, voxels, classes, kind)


def start_from_mask(
    image: np.ndarray, label: np.ndarray, roi_mask: np.ndarray, size: Sequence[int]
) -> ProgressionStart:
    """The crop of ``size`` centred on a user's ROI mask (x, y, z, the case's grid); it must fit in the crop."""
    from lesionflow.synth.rois import crop

    mask = np.asarray(roi_mask) > 0
    if mask.shape != image.shape[1:]:
        raise ValueError(f"ROI mask shape {mask.shape} does not match the case volume {image.shape[1:]}")
    if not mask.any():
        raise ValueError("the ROI mask is empty: nothing may change; give a mask with at least one voxel")
    coords = np.argwhere(mask)
    lo, hi = coords.min(0), coords.max(0)
    extent = hi - lo + 1
    roi_size = np.asarray([int(s) for s in size])
    if np.any(extent > roi_size):
        raise ValueError(
            f"the ROI mask spans {extent.tolist()} voxels, more than synth.roi_size {roi_size.tolist()}; "
            "give a smaller mask or raise synth.roi_size (and retrain pie)"
        )
    origin_arr = (lo + hi) // 2 - roi_size // 2
    origin = (int(origin_arr[0]), int(origin_arr[1]), int(origin_arr[2]))
    size3 = tuple(int(s) for s in roi_size)
    cropped_label = crop(label, origin, size3)
    lesion = (cropped_label > 0) & crop(mask.astype(np.uint8), origin, size3).astype(bool)
    classes = tuple(int(v) for v in np.unique(cropped_label[lesion]))
    return ProgressionStart(
        origin,
        crop(image, origin, size3),
        cropped_label,
        crop(mask.astype(np.uint8), origin, size3) > 0,
        int(lesion.sum()),
        classes,
        "given",
    )
