"""The Dask cluster a stage fans out on: a local process cluster by default, or a running scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
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
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
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
            cluster.close()


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
            cluster.close()
