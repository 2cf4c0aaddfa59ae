"""The training loop shared by every diffusion generator, its default losses and the generator files on disk.

- :func:`train_generator`: AdamW, EMA weights with warm-up (:func:`ema_decay_at`), gradient accumulation, optional
  bf16 autocast (CUDA only), checkpoints every ``checkpoint_every`` steps (model + EMA + optimizer, via
  :mod:`lesionflow.seg.checkpoint`) and exact resume from the newest valid checkpoint (generative.md §2.5, §9.1).
- Weight choice: after the last step the EMA and the raw weights are scored by the training loss on
  ``SELECTION_BATCHES`` held-out micro-batches (:func:`heldout_loss`: ``batches(HELDOUT_BASE + j)``, indices the
  loop never reads, i.e. fresh crop/flip draws, with timesteps and noise from ``torch_generator(seed,
  "generator-select", j)``: the same draws for both weight sets); ``outcome.best`` is the lower (the EMA on a
  tie), ``outcome.choice`` records which and both losses. Nothing of the choice is checkpointed: it is
  recomputed from the restored weights, so a resumed or finished run chooses the same.
- Determinism: micro-batch ``i`` (0-based, ``i = step * grad_accum + k``) is ``batches(i)``, a pure function of
  ``i``, and its random draws (timesteps, noise, CFG dropout) come from ``torch_generator(seed, "generator-train",
  i)``; so a resumed run repeats an uninterrupted one bit for bit on the same device.
- Progress: :func:`lesionflow.progress.step_progress` (a bar on stderr and a log line every ~10% of the steps,
  labelled by the caller's :func:`~lesionflow.progress.progress_label`, e.g. "train-generator lefusion").
- :func:`eps_loss`: uniform ``t``, ``q_sample``, loss on eps: MSE over all voxels, or with ``batch["mask"]`` the
  LeFusion masked L1 (:func:`masked_eps_loss`, §2.2).
- :func:`save_generator` / :func:`load_generator`: ``model.safetensors`` (the weights the caller passes:
  ``outcome.best``) + ``config.json`` (``{"unet": UNetConfig, "extra": ..., "sha256": weights digest}`` and
  ``"weights"``: the :class:`WeightChoice` record when given); no pickle anywhere.

Batch keys understood by :func:`eps_loss`: ``"image"`` ``(B, C_img, X, Y, Z)`` clean x0 (intensities in [-1, 1]);
``"channels"`` ``(B, C_extra, X, Y, Z)`` condition channels concatenated to ``x_t`` (not noised); ``"cond"``
``(B, cond_dim)`` vector condition; ``"mask"`` ``(B, 1 or C_img, X, Y, Z)``, 1 = lesion (loss region).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lesionflow.diffusion.schedules import NoiseSchedule, q_sample
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig
from lesionflow.files import atomic_path, write_json
from lesionflow.hashing import sha256_file
from lesionflow.params_synth import GeneratorNetParams
from lesionflow.progress import step_progress
from lesionflow.seeding import torch_generator
from lesionflow.seg.checkpoint import latest_valid, load_checkpoint, save_checkpoint
from lesionflow.seg.model_files import state_dict_cpu

__all__ = [
    "HELDOUT_BASE",
    "SELECTION_BATCHES",
    "GeneratorTrainOutcome",
    "LossFn",
    "WeightChoice",
    "count_parameters",
    "ema_decay_at",
    "eps_loss",
    "heldout_loss",
    "load_generator",
    "masked_eps_loss",
    "save_generator",
    "train_generator",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

LossFn = Callable[[nn.Module, dict[str, Tensor], torch.Generator], Tensor]

# Held-out micro-batch j is ``batches(HELDOUT_BASE + j)``: far past any step count, so never a training batch.
HELDOUT_BASE = 2**40
SELECTION_BATCHES = 8


@dataclass(frozen=True)
class WeightChoice:
    """Which weights a run keeps (``"ema"`` or ``"raw"``) and the mean held-out loss of each (the training loss,
    on the same ``batches`` micro-batches, timesteps and noise for both)."""

    weights: Literal["ema", "raw"]
    ema_loss: float
    raw_loss: float
    batches: int

    def to_dict(self) -> dict[str, Any]:
        return {"saved": self.weights, "ema_loss": self.ema_loss, "raw_loss": self.raw_loss, "batches": self.batches}


@dataclass
class GeneratorTrainOutcome:
    """``history``: mean loss of every step from 1 to ``steps_done`` (restored ones included);
    ``resumed_from``: the checkpoint step the run continued from (None = fresh). ``ema`` holds the EMA
    weights, ``model`` the raw ones, ``best`` the one of them ``choice`` says has the lower held-out loss
    (save and sample that one)."""

    model: nn.Module
    ema: nn.Module
    history: list[float] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int | None = None
    choice: WeightChoice | None = None

    @property
    def best(self) -> nn.Module:
        return self.model if self.choice is not None and self.choice.weights == "raw" else self.ema


# --------------------------------------------------------------------------- losses


def masked_eps_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    normalize: Literal["all", "mask"] = "all",
    kind: Literal["l1", "l2"] = "l1",
) -> Tensor:
    """Per-voxel |pred - target| (l1) or (pred - target)^2 (l2), kept only where ``mask`` is 1, summed and
    divided by the number of elements of ``pred`` ("all", LeFusion: small lesions get small weight) or by the
    number of mask elements broadcast to ``pred``'s shape ("mask", at least 1). ``pred``/``target``
    ``(B, C, X, Y, Z)``; ``mask`` ``(B, 1 or C, X, Y, Z)`` in {0, 1}. Returns a 0-d tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    weight = mask.to(pred.dtype).expand_as(pred)
    diff = pred - target
    err = diff.abs() if kind == "l1" else diff.square()
    total = (err * weight).sum()
    if normalize == "all":
        return total / pred.numel()
    if normalize == "mask":
        return total / weight.sum().clamp_min(1.0)
    raise ValueError(f"normalize must be 'all' or 'mask', got {normalize!r}")


def eps_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    generator: torch.Generator,
    *,
    schedule: NoiseSchedule,
    kind: Literal["l1", "l2"] | None = None,
    normalize: Literal["all", "mask"] = "all",
) -> Tensor:
    """Denoising loss on eps for one micro-batch (keys in the module docstring).

    Draws, in this order from ``generator``: ``t ~ U{0..T-1}`` ``(B,)``, ``eps ~ N(0, I)`` like the image, and
    (when the model has ``cond_dropout > 0`` and the batch a ``"cond"``) the CFG drop flags ``(B,)``. Without a
    mask: mean over all voxels (``kind`` default l2 = MSE); with ``"mask"``: :func:`masked_eps_loss` (``kind``
    default l1, as LeFusion). The prediction is cast to float32 before the loss.
    """
    x0 = batch["image"]
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    if "channels" in batch:
        x_t = torch.cat([x_t, batch["channels"].to(x_t.dtype)], dim=1)
    cond = batch.get("cond")
    drop = None
    p = float(getattr(getattr(model, "config", None), "cond_dropout", 0.0))
    if cond is not None and p > 0 and model.training:
        drop = torch.rand((b,), generator=generator, device=x0.device) < p
    pred = model(x_t, t, cond, drop_cond=drop).float()
    target = noise.float()
    mask = batch.get("mask")
    if mask is None:
        diff = pred - target
        return (diff.abs() if kind == "l1" else diff.square()).mean()
    return masked_eps_loss(pred, target, mask, normalize=normalize, kind=kind or "l1")


# --------------------------------------------------------------------------- training loop


def _autocast(setting: str, device: torch.device) -> AbstractContextManager[Any]:
    if device.type != "cuda" or setting == "off":
        return nullcontext()
    if setting == "auto" and not torch.cuda.is_bf16_supported():
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def ema_decay_at(step: int, ema_decay: float) -> float:
    """EMA decay for the update after optimizer step ``step`` (0-based): ``min(ema_decay, (1 + step) / (10 +
    step))``, the warm-up of TensorFlow's ExponentialMovingAverage with ``num_updates``
    (https://www.tensorflow.org/api_docs/python/tf/train/ExponentialMovingAverage) and of diffusers'
    ``EMAModel.get_decay`` (https://github.com/huggingface/diffusers/blob/main/src/diffusers/training_utils.py).
    Why: with a fixed decay d the EMA after n steps still holds d**n of the random initialisation (0.99**100 =
    37%); with the warm-up it holds prod (1 + s) / (10 + s) = 9! n! / (n + 9)! of it (< 1e-5 after 12 steps)."""
    return min(ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    batches: Callable[[int], dict[str, Tensor]],
    loss_fn: LossFn,
    device: torch.device,
    seed: int,
    amp: str = "off",
    n: int = SELECTION_BATCHES,
) -> float:
    """Mean of ``loss_fn`` over held-out micro-batches ``batches(HELDOUT_BASE + j)``, j < ``n``, with the draws of
    ``torch_generator(seed, "generator-select", j)``: the same for every model scored with the same arguments, so
    two weight sets are compared on identical timesteps and noise. ``model`` is scored in eval mode (no CFG
    dropout) and left in the mode it had."""
    was_training = model.training
    model.eval()
    total = 0.0
    for j in range(n):
        batch = {name: v.to(device) for name, v in batches(HELDOUT_BASE + j).items()}
        generator = torch_generator(seed, "generator-select", j, device=device)
        with _autocast(amp, device):
            total += float(loss_fn(model, batch, generator))
    model.train(was_training)
    return total / n


def _choose(model: nn.Module, ema: nn.Module, score: Callable[[nn.Module], float]) -> WeightChoice:
    ema_loss, raw_loss = score(ema), score(model)
    if not math.isfinite(ema_loss) and not math.isfinite(raw_loss):
        raise FloatingPointError(f"held-out loss is not finite for both the EMA ({ema_loss}) and the raw weights")
    # NaN compares False: a non-finite EMA loss keeps the raw weights.
    weights: Literal["ema", "raw"] = "ema" if ema_loss <= raw_loss or not math.isfinite(raw_loss) else "raw"
    return WeightChoice(weights, ema_loss, raw_loss, SELECTION_BATCHES)


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def _check_batch(batch: dict[str, Tensor], batch_size: int, index: int) -> None:
    for key, value in batch.items():
        if value.shape[0] != batch_size:
            raise ValueError(f"micro-batch {index}: {key!r} has batch dim {value.shape[0]}, expected {batch_size}")


def _loop_record(params: GeneratorNetParams, weight_decay: float, max_grad_norm: float) -> dict[str, Any]:
    """The optimisation settings a checkpoint records, under the names (and in the order) checkpoints have always
    used, so a checkpoint's ``trainer.json`` is the same bytes as before the params section drove the loop."""
    return {
        "steps": params.steps,
        "batch_size": params.batch_size,
        "lr": params.learning_rate,
        "weight_decay": weight_decay,
        "ema_decay": params.ema_decay,
        "grad_accum": params.grad_accum,
        "checkpoint_every": params.checkpoint_every,
        "keep_checkpoints": params.keep_checkpoints,
        "amp": params.amp,
        "max_grad_norm": max_grad_norm,
    }


def train_generator(
    model: nn.Module,
    batches: Callable[[int], dict[str, Tensor]],
    loss_fn: LossFn | None,
    schedule: NoiseSchedule,
    params: GeneratorNetParams,
    checkpoint_root: Path,
    device: torch.device | str,
    seed: int,
    warn: Callable[[str], None],
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    ema_warmup: bool = True,
) -> GeneratorTrainOutcome:
    """Train ``model`` (moved to ``device``) for ``params.steps`` optimizer steps, resuming when possible.

    ``params`` is the method's params section (any :class:`~lesionflow.params_synth.GeneratorNetParams`): its
    ``steps`` count optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size`` samples; after every
    step ``ema = d * ema + (1 - d) * weights`` with ``d = ema_decay_at(step, ema_decay)`` (``ema_warmup`` False:
    ``d = ema_decay``, only for comparisons; 0 = EMA equals the weights); ``amp`` "auto" = bf16 autocast on CUDA
    when supported, "bf16" = bf16 on CUDA, "off"; never on CPU. ``weight_decay`` is AdamW's, ``max_grad_norm`` 0 =
    no clipping (no method sets either). At the end the EMA and raw weights are scored by :func:`heldout_loss`
    and ``outcome.choice`` / ``outcome.best`` name the better.

    ``batches(i)`` returns micro-batch ``i`` (tensors on any device; moved to ``device``); ``loss_fn(model,
    batch, generator)`` returns a 0-d loss (None = :func:`eps_loss` with ``schedule``). Checkpoints
    ``checkpoint_root/step-<N>`` hold the raw and EMA weights (keys ``model.*``, ``ema.*``), the AdamW state and
    the loss history; the final step is always checkpointed. A run whose newest valid checkpoint is at or past
    ``params.steps`` trains nothing and returns the restored state.
    """
    device = torch.device(device)
    loss_fn = loss_fn or partial(eps_loss, schedule=schedule)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    both = nn.ModuleDict({"model": model, "ema": ema})
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=weight_decay)
    history: list[float] = []
    resumed_from: int | None = None
    checkpoint = latest_valid(checkpoint_root, warn)
    if checkpoint is not None:
        load_checkpoint(checkpoint, both, optimizer)
        state = checkpoint.loop_state
        if state.get("seed") != seed or state.get("timesteps") != schedule.num_timesteps:
            warn(
                f"resuming {checkpoint.folder.name} written with seed {state.get('seed')}, "
                f"T {state.get('timesteps')}; now seed {seed}, T {schedule.num_timesteps}"
            )
        if state.get("ema_warmup", False) != ema_warmup:
            warn(f"resuming {checkpoint.folder.name} whose EMA warm-up was {state.get('ema_warmup', False)}")
        history = [float(v) for v in state["history"]][: checkpoint.step]
        resumed_from = checkpoint.step
    start = resumed_from or 0
    model.train()
    with step_progress("train-generator", params.steps, start) as progress:
        for step in range(start, params.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for k in range(params.grad_accum):
                index = step * params.grad_accum + k
                batch = {name: v.to(device) for name, v in batches(index).items()}
                _check_batch(batch, params.batch_size, index)
                generator = torch_generator(seed, "generator-train", index, device=device)
                with _autocast(params.amp, device):
                    loss = loss_fn(model, batch, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1} (micro-batch {index})")
                (loss / params.grad_accum).backward()
                total += float(loss.detach())
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            _update_ema(ema, model, ema_decay_at(step, params.ema_decay) if ema_warmup else params.ema_decay)
            history.append(total / params.grad_accum)
            done = step + 1
            progress.update(done, history[-1])
            if done % params.checkpoint_every == 0 or done == params.steps:
                loop_state = {
                    "history": history,
                    "seed": seed,
                    "timesteps": schedule.num_timesteps,
                    "config": _loop_record(params, weight_decay, max_grad_norm),
                    "ema_warmup": ema_warmup,
                }
                save_checkpoint(checkpoint_root, done, both, optimizer, loop_state, keep=params.keep_checkpoints)
    model.eval()
    choice = _choose(model, ema, lambda net: heldout_loss(net, batches, loss_fn, device, seed, params.amp))
    return GeneratorTrainOutcome(
        model=model,
        ema=ema,
        history=history,
        steps_done=max(start, params.steps),
        resumed_from=resumed_from,
        choice=choice,
    )


# --------------------------------------------------------------------------- generator files


def save_generator(
    folder: Path,
    model: ConditionalUNet3D,
    config: UNetConfig,
    extra: dict[str, Any],
    choice: WeightChoice | None = None,
) -> None:
    """Write ``model``'s weights (pass ``outcome.best``) and ``config.json`` into ``folder``, each replaced
    atomically.

    ``extra`` (JSON-able: schedule, intensity window, condition meaning, seed...) is stored verbatim; ``choice``
    (``outcome.choice``) as ``"weights"``: which weights these are and the held-out loss of both.
    """
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state_dict_cpu(model), str(tmp))
        digest = sha256_file(tmp)
    payload: dict[str, Any] = {"unet": config.to_dict(), "extra": extra, "sha256": {WEIGHTS: digest}}
    if choice is not None:
        payload["weights"] = choice.to_dict()
    write_json(folder / CONFIG, payload)


def load_generator(
    folder: Path, device: torch.device | str = "cpu"
) -> tuple[ConditionalUNet3D, UNetConfig, dict[str, Any]]:
    """Rebuild the network from ``config.json``, verify and load the weights; returns (model in eval, config, extra)."""
    try:
        payload = json.loads((folder / CONFIG).read_text())
        config = UNetConfig.from_dict(payload["unet"])
        if sha256_file(folder / WEIGHTS) != payload["sha256"][WEIGHTS]:
            raise ValueError(f"{folder / WEIGHTS} does not match the sha256 in {CONFIG}")
        weights = load_file(str(folder / WEIGHTS), device="cpu")
    except (FileNotFoundError, KeyError, json.JSONDecodeError, SafetensorError) as err:
        raise ValueError(
            f"generator folder {folder} is incomplete or unreadable: {type(err).__name__}: {err}"
        ) from None
    model = ConditionalUNet3D(config)
    model.load_state_dict(weights)
    return model.to(device).eval(), config, dict(payload.get("extra", {}))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
