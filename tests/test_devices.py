"""Default torch thread count: OMP_NUM_THREADS, else the cgroup v2 CPU quota, else the affinity mask."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from lesionflow.devices import cpu_threads, default_threads, machine_threads, read_cpu_max
from lesionflow.errors import LesionflowError


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "omp", "want"),
    [
        (8, None, None, 8),  # no cgroup v2 file: the affinity mask
        (8, "max 100000\n", None, 8),  # no quota
        (8, "200000 100000\n", None, 2),  # 2 CPUs
        (8, "150000 100000\n", None, 1),  # 1.5 CPUs: floor, a spinning thread past the quota only waits
        (8, "50000 100000\n", None, 1),  # half a CPU: still one thread
        (2, "800000 100000\n", None, 2),  # a quota above the mask: the mask
        (0, None, None, 1),  # never 0 threads
        (8, "200000 100000\n", "3", 3),  # OMP_NUM_THREADS wins over the quota
        (2, None, "6", 6),  # ... and over the mask: the user's explicit choice
        (8, None, "4,2", 4),  # an OpenMP nesting list: the outer level
        (8, "200000 100000\n", " ", 2),  # blank = unset
    ],
)
def test_default_threads_follows_omp_then_quota_then_affinity(
    affinity: int, cpu_max: str | None, omp: str | None, want: int
) -> None:
    assert default_threads(affinity, cpu_max, omp) == want


@pytest.mark.parametrize("omp", ["0", "two", "-1", "1.5"])
def test_bad_omp_num_threads_is_one_line_naming_the_value(omp: str) -> None:
    with pytest.raises(LesionflowError, match=f"OMP_NUM_THREADS = '{re.escape(omp)}' is not a positive integer"):
        default_threads(4, None, omp)


@pytest.mark.parametrize("text", ["", "200000", "max", "x 100000", "200000 0", "1 2 3"])
def test_unreadable_cpu_max_is_one_line_naming_the_text(text: str) -> None:
    with pytest.raises(LesionflowError, match=r"cgroup cpu\.max holds .* set OMP_NUM_THREADS or train\.cpu_threads"):
        default_threads(4, text, None)


def test_read_cpu_max_reads_the_file_and_none_when_absent(tmp_path: Path) -> None:
    path = tmp_path / "cpu.max"
    assert read_cpu_max(path) is None
    path.write_text("200000 100000\n")
    assert read_cpu_max(path) == "200000 100000\n"


def test_cpu_threads_0_applies_a_quota_from_a_real_cgroup_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")  # one CPU
    torch.set_num_threads(2)
    try:
        with cpu_threads(0, cpu_max) as used:
            assert used == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        cpu_max.write_text("max 100000\n")
        with cpu_threads(0, cpu_max) as used:
            assert used == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)


def test_cpu_threads_0_follows_omp_num_threads_and_a_fixed_count_ignores_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine_threads(cpu_max) == 3
    with cpu_threads(0, cpu_max) as used:
        assert used == 3 == torch.get_num_threads()
    with cpu_threads(2, cpu_max) as used:  # train.cpu_threads = 2: the machine is not asked
        assert used == 2 == torch.get_num_threads()
