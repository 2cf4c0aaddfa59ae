"""Training progress: a log line every ~10% of the steps (and every LOG_EVERY_S seconds) for the generator and
segmenter loops, named by progress_label, quiet when there is nothing to do."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from lesionflow.diffusion.schedules import cosine_schedule
from lesionflow.diffusion.trainer import train_generator
from lesionflow.diffusion.unet import ConditionalUNet3D, UNetConfig
from lesionflow.params import TrainParams
from lesionflow.params_synth import GeneratorNetParams
from lesionflow.progress import LOG_EVERY_S, progress_label, step_progress
from lesionflow.seg.networks import NetworkConfig, build_network
from lesionflow.seg.training import train_loop
from tests.helpers.cube_patches import CubePatches

LINE = re.compile(r"^(?P<label>.+): step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) \((?P<s>\d+) s\)(?P<tail>.*)$")


def _lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = [LINE.match(r.getMessage()) for r in caplog.records if r.name == "lesionflow.progress"]
    assert all(found), [r.getMessage() for r in caplog.records]
    return [m for m in found if m]


def _generator_batches(index: int) -> dict[str, torch.Tensor]:
    return {"image": torch.full((2, 1, 8, 8, 8), 0.5 if index % 2 == 0 else -0.5)}


def test_generator_training_logs_every_tenth_of_its_steps_with_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = ConditionalUNet3D(UNetConfig(in_channels=1, out_channels=1, base_channels=8, channel_mults=(1, 2)))
    net = GeneratorNetParams(steps=20, batch_size=2, checkpoint_every=100, amp="off")
    caplog.set_level(logging.INFO, logger="lesionflow.progress")
    with progress_label("train-generator lefusion"):
        outcome = train_generator(model, _generator_batches, None, cosine_schedule(50), net, tmp_path, "cpu", 7, print)
    lines = _lines(caplog)
    steps = [int(m["step"]) for m in lines]
    assert set(range(2, 21, 2)) <= set(steps)  # every 2 steps; more only if a step took LOG_EVERY_S
    for m in lines:
        assert m["label"] == "train-generator lefusion"
        assert m["total"] == "20"
        assert float(m["loss"]) == pytest.approx(outcome.history[int(m["step"]) - 1], rel=1e-3)
        assert m["tail"] == ""
    caplog.clear()
    again = train_generator(model, _generator_batches, None, cosine_schedule(50), net, tmp_path, "cpu", 7, print)
    assert again.resumed_from == 20
    assert _lines(caplog) == []  # resumed at the end: nothing to show


def test_segmenter_training_logs_loss_throughput_and_validation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    net = build_network(NetworkConfig("unet", 1, 2, (8, 16), 1, (16, 16, 16)))
    params = TrainParams(steps=10, batch_size=2, num_workers=0, checkpoint_every=100, val_every=5)
    caplog.set_level(logging.INFO, logger="lesionflow.progress")
    outcome = train_loop(
        net,
        CubePatches(),
        params=params,
        label_lut=torch.arange(256) % 2,
        checkpoint_root=tmp_path,
        device=torch.device("cpu"),
        validate=lambda network: 0.25,
        warn=print,
    )
    lines = _lines(caplog)
    assert {int(m["step"]) for m in lines} >= set(range(1, 11))  # 10 steps: one line each
    losses = {row["step"]: row["loss"] for row in outcome.history}
    for m in lines:
        assert (m["label"], m["total"]) == ("train", "10")
        assert float(m["loss"]) == pytest.approx(losses[int(m["step"])], rel=1e-3)
        rate = re.fullmatch(r", (\S+) patches/s(?:, val dice (\S+))?", m["tail"])
        assert rate is not None
        assert float(rate[1]) > 0
        assert rate[2] == (None if int(m["step"]) < 5 else "0.250")


class _Clock:
    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_slow_steps_log_every_log_every_s_seconds_and_the_bar_is_on_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="lesionflow.progress")
    clock = _Clock(LOG_EVERY_S / 2)  # each update is half the interval after the last
    with step_progress("train", 1000, 0, clock=clock) as progress:
        for step in range(1, 7):
            progress.update(step, 0.5)
    assert [int(m["step"]) for m in _lines(caplog)] == [2, 4, 6]
    assert [int(m["s"]) for m in _lines(caplog)] == [30, 60, 90]
    out, err = capfd.readouterr()
    assert out == ""
    assert "train" in err
    assert "6/1000" in err


@pytest.mark.parametrize(("total", "start", "enabled"), [(0, 0, True), (10, 10, True), (10, 0, False)])
def test_quiet_when_nothing_to_do_or_disabled(
    total: int, start: int, enabled: bool, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="lesionflow.progress")
    with step_progress("train", total, start, enabled=enabled) as progress:
        for step in range(start + 1, total + 1):
            progress.update(step, 0.5)
    assert _lines(caplog) == []
    assert capfd.readouterr() == ("", "")  # no bar either


@pytest.mark.slow  # a temporary Prefect server: ~10 s to start on a quiet machine, 35 s on a busy one
def test_log_lines_reach_the_prefect_run_logs_and_no_warning_outside_a_run() -> None:
    import asyncio
    import warnings

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    @task
    def train() -> None:
        with progress_label("train-generator ddpm"), step_progress("train-generator", 4, 0) as progress:
            for step in range(1, 5):
                progress.update(step, 0.125)

    @flow
    def pipeline() -> str:
        from prefect.runtime import flow_run

        train()
        return str(flow_run.id)

    async def messages(run_id: str) -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return [log.message for log in logs]

    with prefect_test_harness(server_startup_timeout=120):
        run_id = pipeline()
        APILogHandler().flush()  # send the queued run logs before reading them
        got = [m for m in asyncio.run(messages(run_id)) if m.startswith("train-generator ddpm")]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Prefect warns when a handler of its own gets a record outside a run
            with step_progress("train", 2, 0) as progress:
                progress.update(1, 0.5)
                progress.update(2, 0.5)
    assert got == [f"train-generator ddpm: step {s}/4 loss 0.125 (0 s)" for s in (1, 2, 3, 4)]
