"""Compute resources a stage runs on: the torch device and the number of CPU threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lesionflow.errors import LesionflowError, ParamsError

if TYPE_CHECKING:
    import torch

# cgroup v2: the CPU quota of the cgroup this process sees as its root (a container with its own cgroup namespace,
# Docker's default on cgroup v2). Absent on cgroup v1 hosts and in the host's root cgroup: no quota then.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def read_cpu_max(path: Path = CPU_MAX) -> str | None:
    """The text of cgroup v2 ``cpu.max`` (e.g. ``"200000 100000"``), or None when the file does not exist."""
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def default_threads(affinity: int, cpu_max_text: str | None, omp_env: str | None) -> int:
    """The torch thread count a machine grants when ``train.cpu_threads`` is 0; at least 1.

    - ``omp_env`` (``OMP_NUM_THREADS``) set and not blank: its value (the first of an OpenMP nesting list such as
      ``"4,2"``), as OpenMP and torch themselves read it: an explicit choice beats an inferred one.
    - else the cores of the affinity mask, capped by the cgroup v2 quota ``cpu_max_text``: ``"<quota> <period>"``
      grants ``floor(quota / period)`` CPUs (at least 1; ``"150000 100000"`` -> 1, because torch's threads spin
      and a thread beyond the quota only waits for the next period), ``"max <period>"`` or None = no quota.

    Bad text is a :class:`LesionflowError` naming the value and the fix, never a silent guess.
    """
    if omp_env is not None and omp_env.strip():
        first = omp_env.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise LesionflowError(
                f"OMP_NUM_THREADS = {omp_env!r} is not a positive integer; unset it or set it to e.g. 2 "
                "(or fix the count with train.cpu_threads)"
            )
        return int(first)
    cpus = max(1, affinity)
    if cpu_max_text is None:
        return cpus
    fields = cpu_max_text.split()
    if (
        len(fields) != 2
        or not (fields[0] == "max" or fields[0].isdigit())
        or not fields[1].isdigit()
        or int(fields[1]) == 0
    ):
        raise LesionflowError(
            f"cgroup cpu.max holds {cpu_max_text.strip()!r}, not '<quota> <period>' or 'max <period>'; "
            "set OMP_NUM_THREADS or train.cpu_threads to choose the torch thread count"
        )
    if fields[0] == "max":
        return cpus
    return max(1, min(cpus, int(fields[0]) // int(fields[1])))


def machine_threads(cpu_max: Path = CPU_MAX) -> int:
    """:func:`default_threads` of this process: its affinity mask, ``cpu_max`` and ``OMP_NUM_THREADS``."""
    return default_threads(len(os.sched_getaffinity(0)), read_cpu_max(cpu_max), os.environ.get("OMP_NUM_THREADS"))


def machine_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity mask capped by the cgroup quota (``OMP_NUM_THREADS``, a
    setting for compute threads, is not read). For threads that mostly wait on I/O or run without the GIL."""
    return default_threads(len(os.sched_getaffinity(0)), read_cpu_max(cpu_max), None)


@contextmanager
def cpu_threads(n: int, cpu_max: Path = CPU_MAX) -> Iterator[int]:
    """Run with exactly ``n`` torch intra-op threads (0 = :func:`machine_threads`), restored afterwards; yields
    the count used, which the stage records in its summary.

    CPU float reductions (so trained weights) are bit-identical only for the same thread count: a run that must
    repeat bytes on other machines fixes ``n`` (``train.cpu_threads``); 0 follows the machine (OMP_NUM_THREADS,
    the CPU quota, the affinity mask), so that torch does not spin more threads than the machine grants.
    """
    import torch

    before = torch.get_num_threads()
    wanted = n or machine_threads(cpu_max)
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> cuda:<LOCAL_RANK or 0> when a GPU is present, else cpu; an unusable choice is a ParamsError."""
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
