"""The Dask clusters the stages fan out on: workers that never pause, and a wait that cannot hang for ever."""

from __future__ import annotations

import logging
import operator
import time
from pathlib import Path

import dask
import pytest

from lesionflow import parallel
from lesionflow.errors import LesionflowError
from lesionflow.parallel import completed, dask_client


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    # the real loop, with shorter waits
    monkeypatch.setattr(parallel, "POLL_S", 0.2)
    monkeypatch.setattr(parallel, "HEAL_AFTER_S", 0.5)
    monkeypatch.setattr(parallel, "GIVE_UP_AFTER_S", 1.5)


def test_local_workers_never_pause_or_spill() -> None:
    with dask_client(1, "1GB", say=lambda _: None) as client:
        seen = client.run(lambda: {k: dask.config.get(k) for k in parallel.WORKER_MEMORY_CONFIG})
    assert list(seen.values()) == [dict.fromkeys(parallel.WORKER_MEMORY_CONFIG, False)]


@pytest.mark.usefixtures("quick_watch")
def test_a_local_cluster_that_lost_every_worker_gets_fresh_ones() -> None:
    """A nanny that gave up (closed, its worker gone) used to leave the futures pending for ever."""
    with dask_client(1, "1GB", say=lambda _: None) as client:
        cluster = client.cluster
        for nanny in list(cluster.workers.values()):
            cluster.sync(nanny.close)
        assert not client.nthreads()
        future = client.submit(operator.add, 1, 2, pure=False)
        results = [f.result() for f in completed(client, [future], "test")]
        assert results == [3]
        assert len(client.nthreads()) == 1


@pytest.mark.usefixtures("quick_watch")
def test_a_remote_scheduler_without_workers_stops_with_one_line() -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=None) as bare,
        Client(bare.scheduler_address) as client,
    ):
        future = client.submit(operator.add, 1, 2, pure=False)
        with pytest.raises(LesionflowError) as err:
            list(completed(client, [future], "preprocess"))
    message = str(err.value)
    assert bare.scheduler_address in message
    assert "no worker for 1.5 s" in message
    assert message.startswith("preprocess: ")
    assert "\n" not in message


def test_futures_come_back_in_the_order_they_finish() -> None:
    with dask_client(2, "1GB", say=lambda _: None) as client:
        slow = client.submit(time.sleep, 1.0, pure=False)
        fast = client.submit(operator.add, 1, 2, pure=False)
        order = list(completed(client, [slow, fast], "test"))
    assert order == [fast, slow]


def _count_run(path: str) -> int:
    """A task with a visible side effect: one line per execution."""
    with open(path, "a") as fh:
        fh.write("ran\n")
    return 1


def test_a_result_already_read_is_not_computed_again_when_its_worker_dies(tmp_path: Path) -> None:
    """The CI hang's setting: a memory kill used to re-run every case already read, behind the culprit."""
    runs = tmp_path / "runs.txt"
    with dask_client(1, "1GB", say=lambda _: None) as client:
        first = client.submit(_count_run, str(runs), pure=False)
        assert [f.result() for f in completed(client, [first], "test")] == [1]
        (nanny,) = client.cluster.workers.values()
        old = set(client.nthreads())
        client.cluster.sync(nanny.kill)  # the worker dies; its nanny starts a fresh one
        deadline = time.monotonic() + 60
        while (not client.nthreads() or set(client.nthreads()) == old) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.nthreads()
        assert set(client.nthreads()) != old
        # one worker thread: a recompute of `first` (queued when its worker died) would run before this task
        later = client.submit(_count_run, str(runs), pure=False)
        assert [f.result() for f in completed(client, [later], "test")] == [1]
    assert runs.read_text().splitlines() == ["ran", "ran"]  # `first` once, `later` once


def test_nothing_finished_for_a_while_is_reported_with_where_the_tasks_are(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(parallel, "POLL_S", 0.2)
    monkeypatch.setattr(parallel, "STALL_REPORT_S", 1.0)
    with dask_client(1, "1GB", say=lambda _: None) as client:
        (worker,) = client.nthreads()
        slow = client.submit(time.sleep, 3.0, pure=False, key="slow-task")
        unplaceable = client.submit(time.sleep, 0.0, pure=False, key="needs-a-gpu", resources={"GPU": 1})
        with caplog.at_level(logging.WARNING, logger="lesionflow.parallel"):
            first = next(completed(client, [slow, unplaceable], "preprocess"))
        assert first is slow
        unplaceable.cancel()
    reports = [r.getMessage() for r in caplog.records if "nothing finished" in r.getMessage()]
    assert reports, caplog.text
    assert reports[0].startswith("preprocess: nothing finished for ")
    assert f"processing: {{'{worker}': ['slow-task']}}" in reports[0]
    assert "1 not on a worker yet" in reports[0]
    assert "dashboard http://127.0.0.1:" in reports[0]
