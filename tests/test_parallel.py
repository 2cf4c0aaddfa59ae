"""The Dask clusters the stages fan out on: workers that never pause, and a wait that cannot hang for ever."""

from __future__ import annotations

import operator

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
        finished = list(completed(client, [future], "test"))
        assert [f.result() for f in finished] == [3]
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
    import time

    with dask_client(2, "1GB", say=lambda _: None) as client:
        slow = client.submit(time.sleep, 1.0, pure=False)
        fast = client.submit(operator.add, 1, 2, pure=False)
        order = list(completed(client, [slow, fast], "test"))
    assert order == [fast, slow]
