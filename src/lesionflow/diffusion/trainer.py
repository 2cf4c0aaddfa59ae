"""The training loop shared by every diffusion generator, its default losses and the generator files on disk.

- :func:`train_generator`: AdamW, EMA weights, gradient accumulation, optional bf16 autocast (CUDA only),
  checkpoints every ``checkpoint_every`` steps (model + EMA + optimizer, via :mod:`lesionflow.seg.checkpoint`)
  and exact resume from the newest valid checkpoint (generative.md §2.5, §9.1).
- Determinism: micro-batch ``i`` (0-based, ``i = step * grad_accum + k``) is ``batches(i)``, a pure function of
  ``i``, and its random draws (timesteps, noise, CFG dropout) come from ``torch_generator(seed, "generator-train",
  i)``; so a resumed run repeats an uninterrupted one bit for bit on the same device.
- :func:`eps_loss`: uniform ``t``, ``q_sample``, loss on eps: MSE over all voxels, or with ``batch["mask"]`` the
  LeFusion masked L1 (:func:`masked_eps_loss`, §2.2).
- :func:`save_generator` / :func:`load_generator`: ``model.safetensors`` (the EMA weights the caller passes) +
  ``config.json`` (``{"unet": UNetConfig, "extra": ..., "sha256": weights digest}``); no pickle anywhere.

Batch keys understood by :func:`eps_loss`: ``"image"`` ``(B, C_img, X, Y, Z)`` clean x0 (intensities in [-1, 1]);
``"channels"`` ``(B, C_extra, X, Y, Z)`` condition channels concatenated to ``x_t`` (not noised); ``"cond"``
``(B, cond_dim)`` vector condition; ``"mask"`` ``(B, 1 or C_img, X, Y, Z)``, 1 = lesion (loss region).
"""

from __future__ import annotations

import copy
import json
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
from lesionflow.seeding import torch_generator
from lesionflow.seg.checkpoint import latest_valid, load_checkpoint, save_checkpoint
from lesionflow.seg.model_files import state_dict_cpu

__all__ = [
    "GeneratorTrainOutcome",
    "LossFn",
    "count_parameters",
    "eps_loss",
    "load_generator",
    "masked_eps_loss",
    "save_generator",
    "train_generator",
]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

LossFn = Callable[[nn.Module, dict[str, Tensor], torch.Generator], Tensor]


@dataclass
class GeneratorTrainOutcome:
    """``history``: mean loss of every step from 1 to ``steps_done`` (restored ones included);
    ``resumed_from``: the checkpoint step the run continued from (None = fresh). ``ema`` holds the EMA
    weights (use them for sampling), ``model`` the raw ones."""

    model: nn.Module
    ema: nn.Module
    history: list[float] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int | None = None


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
) -> GeneratorTrainOutcome:
    """Train ``model`` (moved to ``device``) for ``params.steps`` optimizer steps, resuming when possible.

    ``params`` is the method's params section (any :class:`~lesionflow.params_synth.GeneratorNetParams`): its
    ``steps`` count optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size`` samples; after every
    step ``ema = ema_decay * ema + (1 - ema_decay) * weights`` (0 = EMA equals the weights); ``amp`` "auto" = bf16
    autocast on CUDA when supported, "bf16" = bf16 on CUDA, "off"; never on CPU. ``weight_decay`` is AdamW's,
    ``max_grad_norm`` 0 = no clipping (no method sets either).

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
        history = [float(v) for v in state["history"]][: checkpoint.step]
        resumed_from = checkpoint.step
    start = resumed_from or 0
    model.train()
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
        _update_ema(ema, model, params.ema_decay)
        history.append(total / params.grad_accum)
        done = step + 1
        if done % params.checkpoint_every == 0 or done == params.steps:
            loop_state = {
                "history": history,
                "seed": seed,
                "timesteps": schedule.num_timesteps,
                "config": _loop_record(params, weight_decay, max_grad_norm),
            }
            save_checkpoint(checkpoint_root, done, both, optimizer, loop_state, keep=params.keep_checkpoints)
    model.eval()
    return GeneratorTrainOutcome(
        model=model, ema=ema, history=history, steps_done=max(start, params.steps), resumed_from=resumed_from
    )


# --------------------------------------------------------------------------- generator files


def save_generator(folder: Path, model: ConditionalUNet3D, config: UNetConfig, extra: dict[str, Any]) -> None:
    """Write ``model``'s weights (pass the EMA model) and ``config.json`` into ``folder``, each replaced atomically.

    ``extra`` (JSON-able: schedule, intensity window, condition meaning, seed...) is stored verbatim.
    """
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state_dict_cpu(model), str(tmp))
        digest = sha256_file(tmp)
    payload = {"unet": config.to_dict(), "extra": extra, "sha256": {WEIGHTS: digest}}
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
