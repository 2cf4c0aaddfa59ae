"""The segmentation training loop: Dice+CE on Zarr patches, LR schedule, AMP, checkpoints, resume, DDP.

Everything the loop draws is a pure function of explicit inputs: step ``s`` reads the dataset items
``batch_items(s * world_size + rank, batch_size)``, and the dataset derives each item's patch and
augmentation from (seed, item index). A run resumed from the checkpoint of step ``s`` therefore sees
exactly the batches an uninterrupted run sees after step ``s``; on CPU the final weights are identical.

Tensor contract: batches hold ``image`` (B, C, x, y, z) float32 and ``label`` (B, 1, x, y, z) int64 label
*values*; ``label_lut`` maps values to class indices 0..K-1 (index 0 = background) for the loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lesionflow.params import TrainParams
from lesionflow.progress import step_progress
from lesionflow.seg.checkpoint import latest_valid, load_checkpoint, save_checkpoint
from lesionflow.seg.patches import batch_items

Validate = Callable[[torch.nn.Module], float]  # network -> mean foreground Dice on the validation cases


@dataclass(frozen=True)
class TrainOutcome:
    steps_done: int
    resumed_from: int | None  # checkpoint step the run continued from, None for a fresh run
    history: list[dict[str, float]]  # one row per step: step, loss, lr (+ val_dice on validation steps)
    validations: list[dict[str, float]]  # step, val_dice
    stopped_early: bool
    patches_per_s: float  # training throughput of this invocation (data + forward + backward + step)
    seconds: float


def learning_rate(step: int, params: TrainParams) -> float:
    """LR for 0-based ``step``: linear warm-up, then poly (exponent 0.9, nnU-Net), cosine, or constant."""
    peak = params.learning_rate
    if step < params.warmup_steps:
        return peak * (step + 1) / params.warmup_steps
    span = max(1, params.steps - params.warmup_steps)
    progress = min(1.0, (step - params.warmup_steps) / span)
    if params.schedule == "poly":
        return peak * (1.0 - progress) ** 0.9
    if params.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def make_optimizer(network: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            network.parameters(),
            lr=params.learning_rate,
            momentum=params.momentum,
            nesterov=True,
            weight_decay=params.weight_decay,
        )
    return torch.optim.AdamW(network.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None on CPU or when off; ``auto`` = bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "fp16" or (setting == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _autocast(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _batches(start: int, steps: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    return [list(batch_items(s * world + rank, batch_size)) for s in range(start, steps)]


def train_loop(
    network: torch.nn.Module,
    dataset: Dataset[dict[str, Any]],
    *,
    params: TrainParams,
    label_lut: torch.Tensor,
    checkpoint_root: Path,
    device: torch.device,
    validate: Validate | None,
    warn: Callable[[str], None],
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> TrainOutcome:
    """Train ``network`` (already on ``device``) for ``params.steps`` steps, resuming from the newest valid checkpoint.

    Only rank 0 validates and writes checkpoints; under DDP ``network`` is the DDP-wrapped module and every
    rank reads its own items. Returns the whole history (restored from the checkpoint plus this run's).
    """
    optimizer = make_optimizer(network, params)
    start, resumed_from = 0, None
    state: dict[str, Any] = {"history": [], "validations": [], "best": None, "since_best": 0, "stopped": False}
    checkpoint = latest_valid(checkpoint_root, warn)
    if checkpoint is not None:
        load_checkpoint(checkpoint, network, optimizer)
        start, resumed_from, state = checkpoint.step, checkpoint.step, checkpoint.loop_state
    history: list[dict[str, float]] = list(state["history"])
    validations: list[dict[str, float]] = list(state["validations"])
    if start >= params.steps or state["stopped"]:
        return TrainOutcome(start, resumed_from, history, validations, bool(state["stopped"]), 0.0, 0.0)

    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=params.dice_weight, lambda_ce=params.ce_weight).to(
        device
    )
    dtype = amp_dtype(params.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loader = DataLoader(
        dataset,
        batch_sampler=_batches(start, params.steps, params.batch_size, rank, world_size),
        num_workers=params.num_workers,
        pin_memory=device.type == "cuda",
        # Workers are spawned, not forked: the parent may run threads (Zarr's async I/O, Prefect, Dask) and a
        # forked copy of a threaded process can deadlock or die at exit.
        multiprocessing_context="spawn" if params.num_workers > 0 else None,
        persistent_workers=False,
    )
    lut = label_lut.to(device)
    network.train()
    patches, busy, began = 0, 0.0, time.perf_counter()
    step = start
    with step_progress("train", params.steps, start, enabled=show_progress and rank == 0) as progress:
        tick = time.perf_counter()
        batch: dict[str, Any]
        for step, batch in enumerate(loader, start=start + 1):  # the sampler holds exactly the remaining steps
            lr = learning_rate(step - 1, params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image = batch["image"].to(device, non_blocking=True)
            target = lut[batch["label"].to(device, non_blocking=True)]
            with _autocast(dtype, device):
                loss = loss_fn(network(image), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_value = float(loss.detach())
            patches += image.shape[0] * world_size
            row: dict[str, float] = {"step": step, "loss": loss_value, "lr": lr}
            stop = False
            busy += time.perf_counter() - tick
            if validate is not None and rank == 0 and (step % params.val_every == 0 or step == params.steps):
                stop = _validate(network, validate, step, row, state, validations, params)
                network.train()
            history.append(row)
            val = f", val dice {validations[-1]['val_dice']:.3f}" if validations else ""
            progress.update(step, loss_value, f"{patches / max(busy, 1e-9):.1f} patches/s{val}")
            stop = _agree(stop, device, world_size)
            if rank == 0 and (step % params.checkpoint_every == 0 or step == params.steps or stop):
                state.update(history=history, validations=validations, stopped=stop)
                save_checkpoint(checkpoint_root, step, network, optimizer, state, keep=params.keep_checkpoints)
            tick = time.perf_counter()
            if stop:
                break
    seconds = time.perf_counter() - began
    return TrainOutcome(
        steps_done=step,
        resumed_from=resumed_from,
        history=history,
        validations=validations,
        stopped_early=bool(state["stopped"]),
        patches_per_s=patches / max(busy, 1e-9),
        seconds=seconds,
    )


def _validate(
    network: torch.nn.Module,
    validate: Validate,
    step: int,
    row: dict[str, float],
    state: dict[str, Any],
    validations: list[dict[str, float]],
    params: TrainParams,
) -> bool:
    """Run validation, record it, and say whether early stopping triggers."""
    network.eval()
    with torch.inference_mode():
        dice = float(validate(getattr(network, "module", network)))
    row["val_dice"] = dice
    validations.append({"step": step, "val_dice": dice})
    if state["best"] is None or dice > state["best"]:
        state["best"], state["since_best"] = dice, 0
    else:
        state["since_best"] += 1
    patience = params.early_stopping_patience
    return bool(patience and state["since_best"] >= patience)


def _agree(stop: bool, device: torch.device, world_size: int) -> bool:
    """Under DDP every rank must stop at the same step: rank 0's decision is broadcast."""
    if world_size == 1:
        return stop
    flag = torch.tensor([1 if stop else 0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
