"""bench/gpu.py (issue 18 item 5): the CPU smoke run at tiny sizes, its one-line refusal, and the real sizes on CUDA.

The script runs as users run it (a child process of the project venv): its table must carry the three measurements
with finite numbers and agree with the JSON it writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _run(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def _row(stdout: str, label: str, unit: str = "") -> float:
    """The number in the value column of the table row ``label`` (``unit`` = "%" for shares)."""
    match = re.search(rf"│ {re.escape(label)}\s*│ {NUMBER}{re.escape(unit)}\s*│", stdout)
    assert match is not None, f"no row {label!r} with a number in:\n{stdout}"
    return float(match.group(1))


def _check_report(out: subprocess.CompletedProcess[str], doc: dict[str, Any]) -> None:
    sampling, training = doc["sampling"], doc["training"]
    per_roi = _row(out.stdout, "sampling s/ROI")
    patches = _row(out.stdout, "train patches/s")
    wait = _row(out.stdout, "loader wait", "%")
    for value in (per_roi, patches, wait):
        assert math.isfinite(value)
    assert min(per_roi, patches) > 0
    assert 0 <= wait <= 100
    # the table prints the JSON's numbers, rounded
    assert per_roi == pytest.approx(sampling["seconds_per_roi"], abs=5e-4)
    assert patches == pytest.approx(training["patches_per_s"], abs=5e-3)
    assert wait == pytest.approx(100 * training["loader_wait_share"], abs=0.05)
    assert sampling["seconds_per_roi"] == pytest.approx(sampling["seconds"] / (sampling["batch"] * sampling["rounds"]))
    # network evaluations: RePaint's count on N steps, j = r = 5 as the lefusion-lidc preset (and the table's row)
    n, j, r = sampling["sample_steps"], sampling["jump_length"], sampling["jump_n_sample"]
    assert (j, r) == (5, 5)
    assert sampling["nfe_per_roi"] == n + (n // j - 1) * (r - 1) * j
    assert _row(out.stdout, "sampling NFE/ROI") == sampling["nfe_per_roi"]
    assert "random-init weights" in out.stdout
    assert doc["weights"].startswith("random init")


def test_tiny_cpu_run_prints_the_three_measurements(tmp_path: Path) -> None:
    out = _run(tmp_path, "--device", "cpu", "--tiny", "--seed", "3", "--out", "numbers.json", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "numbers.json").read_text())
    _check_report(out, doc)
    sampling, training = doc["sampling"], doc["training"]
    # tiny: 16³ ROI, T = 10 (no respacing): 10 + 1 * 4 * 5 = 30 evaluations per ROI; the GPU preset's network
    assert (sampling["roi_size"], sampling["nfe_per_roi"], sampling["amp"]) == ([16, 16, 16], 30, "off")
    assert (training["network"], training["patch_size"]) == ("dynunet", [32, 32, 32])
    assert (training["steps"], training["workers"]) == (6, 1)
    # no GPU: the utilisation rows say so instead of printing a number
    assert (training["gpu_util_mean"], training["cuda_busy_share"]) == (None, None)
    assert re.search(r"│ GPU busy \(util\)\s*│ n/a\s*│", out.stdout)
    assert (doc["seed"], doc["tiny"]) == (3, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    out = _run(tmp_path, "--device", "cuda", "--tiny", timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: device = 'cuda' but no CUDA GPU is visible; use auto or cpu"]
    assert not (tmp_path / "numbers.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_sizes_on_cuda_briefly(tmp_path: Path) -> None:
    # the lefusion-lidc generator (64x64x32, T = 300 respaced to 60, j = r = 5) and the GPU preset's segmenter at the
    # planned 128³ patch, a few steps each
    args = ["--device", "cuda", "--batch", "2", "--sample-steps", "60", "--steps", "10", "--warmup", "3"]
    out = _run(tmp_path, *args, "--cases", "2", "--no-compile", "--out", "numbers.json", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "numbers.json").read_text())
    _check_report(out, doc)
    sampling, training = doc["sampling"], doc["training"]
    assert (sampling["roi_size"], sampling["nfe_per_roi"]) == ([64, 64, 32], 280)
    assert (sampling["amp"], training["amp"]) == ("bf16", "bfloat16")
    assert training["patch_size"] == [128, 128, 128]
    assert 0 < training["cuda_busy_share"] <= 1.0 + 1e-6
