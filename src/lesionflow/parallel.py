"""The Dask cluster a stage fans out on: a local process cluster by default, or a running scheduler."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lesionflow.errors import LesionflowError

# How long the client keeps trying to reach a running scheduler (distributed retries with backoff inside it) before
# the stage stops with one line naming the address. Workers restarting after a node failure need tens of seconds.
CONNECT_TIMEOUT_S = 30.0


# A flow run's own local cluster (see :func:`run_cluster`): stages with no scheduler_address use it. Handed over
# through the environment because stages never import Prefect and the address is not a param (it must not change
# cache keys or what dvc.lock records: results do not depend on which cluster computed them).
RUN_SCHEDULER_ENV = "LESIONFLOW_RUN_SCHEDULER"

# Our tasks hold their arrays themselves (nothing in Dask's managed memory), so spilling cannot free anything and a
# paused worker only stalls: a worker left above the pause fraction after a big case would never run the next task.
# The only memory action kept is the nanny's kill at the terminate fraction, which the stages turn into a quarantine.
WORKER_MEMORY_CONFIG = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}

# A cluster whose workers are all gone leaves every pending future waiting for ever: seen when a nanny could not
# restart its worker after a memory kill on a loaded machine. While waiting, :func:`completed` counts the workers;
# a local cluster with none for HEAL_AFTER_S gets fresh ones, a remote scheduler with none for GIVE_UP_AFTER_S stops
# the stage with one line. POLL_S is how often it looks.
POLL_S = 2.0
HEAL_AFTER_S = 20.0
GIVE_UP_AFTER_S = 300.0
# With workers present but nothing finished for this long, :func:`completed` logs what the scheduler says the pending
# tasks are doing (queued, or processing on which worker) and the dashboard address, again after each such interval:
# a long case is legitimate, so this is a report, not a deadline.
STALL_REPORT_S = 300.0

# The local clusters of this process by scheduler address, so that a stage connected by address to its flow run's
# cluster (see :func:`run_cluster`) can still give it fresh workers.
_LOCAL_CLUSTERS: dict[str, Any] = {}


def _quiet_distributed() -> None:
    """Only warnings from distributed: a local cluster's scheduler lives in this process and its INFO lines would
    drown the progress bar. Its modules set levels of their own, so every ``distributed.*`` logger is lowered."""
    for name in [n for n in logging.root.manager.loggerDict if n == "distributed" or n.startswith("distributed.")]:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _restored_environ() -> Iterator[None]:
    # A Nanny writes its workers' environment (OMP_NUM_THREADS=1 ...) into this process's os.environ; put it
    # back afterwards, or a later torch stage in the same process would train with other thread settings.
    environ = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _local_cluster(workers: int, memory_limit: str, what: str, say: Callable[[str], None]) -> Any:
    """A local process cluster (one thread per worker), announced with its dashboard address."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(WORKER_MEMORY_CONFIG):  # each nanny copies the config it starts its worker with
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
    _LOCAL_CLUSTERS[cluster.scheduler_address] = cluster
    shape = f"{workers} worker process(es) x 1 thread, {memory_limit} each"
    say(f"dask: {what}, {shape}; dashboard {cluster.dashboard_link}")
    return cluster


@contextmanager
def run_cluster(workers: int, memory_limit: str, say: Callable[[str], None] = print) -> Iterator[str]:
    """One local cluster for a whole flow run (yields its address); closed on exit.

    While it runs, stages whose ``scheduler_address`` is empty submit to it instead of starting their own, so a
    run starts worker processes once (and their imports of torch, zarr... are paid once).
    """
    import distributed  # noqa: F401 - its loggers exist once it is imported

    _quiet_distributed()
    with _restored_environ():
        with _restored_environ():  # the stages of this run (torch training among them) see the environment as it was
            cluster = _local_cluster(workers, memory_limit, "this run's cluster", say)
        os.environ[RUN_SCHEDULER_ENV] = cluster.scheduler_address
        try:
            yield str(cluster.scheduler_address)
        finally:
            _close(cluster)


@contextmanager
def dask_client(
    workers: int, memory_limit: str, scheduler_address: str = "", say: Callable[[str], None] = print
) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler_address``, else on the flow run's cluster, else on a new local
    cluster (``workers`` processes, 1 thread each, ``memory_limit`` each) that is closed on exit.

    The dashboard address is printed when a cluster starts (bokeh is installed; port chosen free).
    """
    from distributed import Client

    _quiet_distributed()

    address = scheduler_address or os.environ.get(RUN_SCHEDULER_ENV, "")
    if address:
        try:
            client = Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
        except OSError as err:
            raise LesionflowError(
                f"cannot reach the Dask scheduler at {address} (tried for {CONNECT_TIMEOUT_S:g} s: "
                f"{type(err).__name__}); start it, or clear scheduler_address to use a local cluster"
            ) from None
        say(f"dask: connected to {address}; dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return
    with _restored_environ():
        cluster = _local_cluster(workers, memory_limit, "local cluster", say)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            _close(cluster)


def _close(cluster: Any) -> None:
    _LOCAL_CLUSTERS.pop(cluster.scheduler_address, None)
    cluster.close()


def completed(client: Any, futures: Iterable[Any], what: str) -> Iterator[Any]:
    """The futures in the order they finish (like ``distributed.as_completed``), watching that workers exist.

    Each yielded future is released when the caller asks for the next one, so read its result in the loop body.
    Dask keeps a finished task's result on its worker, and while the client holds the future a worker's death makes
    the scheduler compute it again: after a memory kill, cases already read were re-run behind the case that killed
    the worker, each run another chance to be killed (seen as a test that hung in CI).

    A local cluster left without workers for HEAL_AFTER_S is given fresh ones (their tasks are rescheduled; a task
    that killed its worker counts against ``allowed-failures`` as usual); a remote scheduler without workers for
    GIVE_UP_AFTER_S stops ``what`` with one line naming the address. Nothing finished for STALL_REPORT_S with
    workers present is logged with the pending tasks' state.
    """
    from distributed import wait

    pending = set(futures)
    no_workers_since: float | None = None
    last_finish = time.monotonic()
    while pending:
        try:
            done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        for future in done:
            yield future
            future.release()
        now = time.monotonic()
        if done or not pending:
            no_workers_since = None
            last_finish = now
            continue
        if client.nthreads():
            no_workers_since = None
            if now - last_finish >= STALL_REPORT_S:
                _report_stall(client, pending, what, now - last_finish)
                last_finish = now  # the next report after another interval
            continue
        no_workers_since = no_workers_since or now
        cluster = _LOCAL_CLUSTERS.get(client.scheduler.address)
        if cluster is not None and now - no_workers_since >= HEAL_AFTER_S:
            n = len(cluster.worker_spec) or 1
            logging.getLogger(__name__).warning("%s: no Dask worker left; starting %d fresh one(s)", what, n)
            cluster.scale(0)
            cluster.scale(n)
            no_workers_since = None
        elif cluster is None and now - no_workers_since >= GIVE_UP_AFTER_S:
            raise LesionflowError(
                f"{what}: the Dask scheduler at {client.scheduler.address} has had no worker for "
                f"{GIVE_UP_AFTER_S:g} s; start workers for it, or clear scheduler_address to use a local cluster"
            )


def _report_stall(client: Any, pending: set[Any], what: str, seconds: float) -> None:
    """One log line: which pending tasks the scheduler has on which worker, and how many wait in its queue."""
    keys = {future.key for future in pending}
    placed = {worker: sorted(k for k in running if k in keys) for worker, running in client.processing().items()}
    placed = {worker: running for worker, running in placed.items() if running}
    waiting = len(keys) - sum(len(running) for running in placed.values())
    logging.getLogger(__name__).warning(
        "%s: nothing finished for %.0f s; processing: %s; %d not on a worker yet; dashboard %s",
        what,
        seconds,
        placed or "none",
        waiting,
        client.dashboard_link,
    )
