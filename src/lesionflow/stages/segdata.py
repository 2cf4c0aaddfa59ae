"""What the segmentation stages share: the case splits, label names, model folders and the device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.errors import ParamsError, SourceError
from lesionflow.params import Params
from lesionflow.seeding import rng_for
from lesionflow.stages.preprocess import read_metadata
from lesionflow.stages.validate_processed import accepted_cases, accepted_path
from lesionflow.workspace import Workspace

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Splits:
    """Accepted case ids by role (sorted). ``val`` is held out of ``train`` by a seeded draw."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def splits(ws: Workspace, params: Params) -> Splits:
    """Train/val/test from the processed gate's accepted list and each case's ingest split."""
    if not accepted_path(ws).exists():
        raise SourceError(
            "data/processed/accepted.json does not exist; run `lesionflow stage validate-processed` first"
        )
    accepted = set(accepted_cases(ws))
    rows = read_metadata(ws)
    train = sorted(c for c in accepted if rows.get(c, {}).get("split") != "test")
    test = sorted(c for c in accepted if rows.get(c, {}).get("split") == "test")
    if not train:
        raise SourceError("no accepted training cases; check data/quarantine and the processed gate report")
    n_val = min(len(train) - 1, int(len(train) * params.train.val_fraction))
    order = rng_for(params.project.seed, "val-split").permutation(len(train))
    val = sorted(train[i] for i in order[:n_val])
    return Splits(tuple(c for c in train if c not in set(val)), tuple(val), tuple(test))


def label_names(ws: Workspace, label_values: tuple[int, ...]) -> dict[str, str]:
    """Label value -> name from data/raw/dataset.json (``label_<v>`` where the source names none)."""
    declared: dict[str, str] = {}
    if ws.raw_dataset.exists():
        declared = {str(k): str(v) for k, v in json.loads(ws.raw_dataset.read_text()).get("labels", {}).items()}
    return {str(v): declared.get(str(v), "background" if v == 0 else f"label_{v}") for v in label_values}


def segmenter_dir(ws: Workspace) -> Path:
    """The trained model (model.safetensors, config.json, metadata.json): what evaluate and register use."""
    return ws.root / "models" / "segmenter"


def checkpoints_dir(ws: Workspace) -> Path:
    return ws.root / "models" / "checkpoints" / "segmenter"


@contextmanager
def cpu_threads(n: int) -> Iterator[int]:
    """Run with exactly ``n`` torch intra-op threads (0 = every usable core), restored afterwards.

    CPU float reductions (so trained weights) are bit-identical only for the same thread count; without this
    the count would follow whatever OMP_NUM_THREADS the process inherited (a Dask nanny sets it to 1).
    """
    import os

    import torch

    before = torch.get_num_threads()
    wanted = n or len(os.sched_getaffinity(0))
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> cuda:<LOCAL_RANK or 0> when a GPU is present, else cpu; an unusable choice is a ParamsError."""
    import os

    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ParamsError(f"device = {setting!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"device = {setting!r} but no CUDA GPU is visible; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParamsError(f"device = {setting!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device
