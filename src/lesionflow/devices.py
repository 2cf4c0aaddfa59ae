"""Compute resources a stage runs on: the torch device and the number of CPU threads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lesionflow.errors import ParamsError

if TYPE_CHECKING:
    import torch


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
