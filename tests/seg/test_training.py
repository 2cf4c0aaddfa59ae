"""The training loop's schedule, early stopping and checkpoint cadence, on an in-memory dataset."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lesionflow.params import TrainParams
from lesionflow.seg.networks import NetworkConfig, build_network
from lesionflow.seg.training import amp_dtype, learning_rate, train_loop
from tests.helpers.cube_patches import CubePatches


def _params(**kw: Any) -> TrainParams:
    base = {"steps": 8, "batch_size": 2, "num_workers": 0, "checkpoint_every": 4, "val_every": 2}
    return TrainParams(**{**base, **kw})


def test_learning_rate_schedules() -> None:
    poly = _params(steps=100, learning_rate=0.01)
    assert learning_rate(0, poly) == pytest.approx(0.01)
    assert learning_rate(50, poly) == pytest.approx(0.01 * 0.5**0.9)
    cosine = _params(steps=100, learning_rate=0.01, schedule="cosine")
    assert learning_rate(50, cosine) == pytest.approx(0.005)
    assert learning_rate(100, cosine) == pytest.approx(0.0, abs=1e-12)
    warm = _params(steps=100, learning_rate=0.01, warmup_steps=10, schedule="constant")
    assert [learning_rate(s, warm) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.001, 0.005, 0.01, 0.01, 0.01])


def test_amp_is_off_on_cpu() -> None:
    assert amp_dtype("bf16", torch.device("cpu")) is None
    assert amp_dtype("auto", torch.device("cpu")) is None


def _run(tmp_path: Path, params: TrainParams, validate: Any) -> Any:
    torch.manual_seed(0)
    net = build_network(NetworkConfig("unet", 1, 2, (8, 16), 1, (16, 16, 16)))
    lut = torch.arange(256) % 2
    return train_loop(
        net,
        CubePatches(),
        params=params,
        label_lut=lut,
        checkpoint_root=tmp_path / "ckpt",
        device=torch.device("cpu"),
        validate=validate,
        warn=lambda line: None,
        show_progress=False,
    )


def test_early_stopping_after_patience_validations_without_gain(tmp_path: Path) -> None:
    scores = iter([0.5, 0.4, 0.4, 0.9])
    outcome = _run(tmp_path, _params(early_stopping_patience=2), lambda net: next(scores))
    assert outcome.stopped_early
    assert outcome.steps_done == 6  # validations at 2 (best), 4 (no gain), 6 (no gain): stop
    assert [v["step"] for v in outcome.validations] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000004", "step-0000006"]
    again = _run(tmp_path, _params(early_stopping_patience=2), lambda net: 1.0)  # a rerun does not train on
    assert again.resumed_from == 6
    assert again.stopped_early


def test_loss_goes_down_and_history_has_every_step(tmp_path: Path) -> None:
    outcome = _run(tmp_path, _params(steps=30, val_every=100, learning_rate=0.01), None)
    losses = [row["loss"] for row in outcome.history]
    assert len(losses) == 30
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert outcome.resumed_from is None
