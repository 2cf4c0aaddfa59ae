"""Training checkpoints: weights and optimizer state in safetensors, the rest in JSON; never pickle.

A checkpoint is a folder ``step-<NNNNNNN>/`` holding ``model.safetensors``, ``optimizer.safetensors`` and
``trainer.json`` (step, optimizer hyper-parameters, loop state, and the sha256 of both tensor files). It is
built in a temp folder and renamed into place, so a crash leaves either the whole checkpoint or none.
:func:`latest_valid` walks checkpoints newest first and verifies them; a corrupted or truncated one is
renamed to ``corrupt-step-<N>`` (kept for inspection, never deleted) and the previous good one is used.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lesionflow.hashing import sha256_file
from lesionflow.seg.model_files import state_dict_cpu

_STEP_DIR = re.compile(r"^step-(\d{7})$")
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    folder: Path
    loop_state: dict[str, Any]  # history, validation bookkeeping: whatever the training loop stored


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``<param index>.<name>``) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    # JSON turned tuples (AdamW's betas) into lists; torch's own state_dict has tuples.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    step: int,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write ``root/step-<step>`` atomically, then drop all but the newest ``keep`` valid checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_file(state_dict_cpu(network), str(tmp / MODEL))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER))
        trainer = {
            "step": step,
            "optimizer": meta,
            "loop_state": loop_state,
            "sha256": {MODEL: sha256_file(tmp / MODEL), OPTIMIZER: sha256_file(tmp / OPTIMIZER)},
        }
        (tmp / TRAINER).write_text(json.dumps(trainer, indent=1, sort_keys=True))
        if final.exists():  # a rerun of the same step (after a crash right after this rename)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(_step_dirs(root))[:-keep]:
        shutil.rmtree(root / f"step-{old:07d}", ignore_errors=True)
    return final


def _step_dirs(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def verify(folder: Path) -> dict[str, Any]:
    """The checkpoint's trainer.json when every file is present and matches its recorded sha256."""
    try:
        trainer: dict[str, Any] = json.loads((folder / TRAINER).read_text())
        for name, digest in trainer["sha256"].items():
            if sha256_file(folder / name) != digest:
                raise ValueError(f"{name} does not match its recorded sha256 (truncated or modified)")
    except FileNotFoundError as err:
        raise ValueError(f"{Path(err.filename or '').name or 'a file'} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{TRAINER} is unreadable ({type(err).__name__})") from None
    return trainer


def latest_valid(root: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """Newest checkpoint under ``root`` that verifies; corrupted ones are set aside with a one-line warning."""
    for step in reversed(_step_dirs(root)):
        folder = root / f"step-{step:07d}"
        try:
            trainer = verify(folder)
        except ValueError as err:
            aside = root / f"corrupt-step-{step:07d}-{secrets.token_hex(3)}"
            os.rename(folder, aside)
            warn(f"checkpoint {folder.name} is corrupted: {err}; kept as {aside.name}, trying the previous one")
            continue
        return Checkpoint(step=step, folder=folder, loop_state=dict(trainer["loop_state"]))
    return None


def load_checkpoint(checkpoint: Checkpoint, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights and optimizer state in place (tensors via safetensors; nothing is unpickled)."""
    trainer = verify(checkpoint.folder)
    try:
        weights = load_file(str(checkpoint.folder / MODEL), device="cpu")
        optim_tensors = load_file(str(checkpoint.folder / OPTIMIZER), device="cpu")
    except SafetensorError as err:  # verified bytes that still do not parse: treat as corrupted
        raise ValueError(f"checkpoint {checkpoint.folder.name} does not load: {err}") from None
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    module.load_state_dict(weights)
    optimizer.load_state_dict(_optimizer_state(optim_tensors, trainer["optimizer"]))
