"""The Dask cluster a stage fans out on: a local process cluster by default, or a running scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lesionflow.errors import LesionflowError
from lesionflow.params import PreprocessParams


@contextmanager
def dask_client(params: PreprocessParams, say: Callable[[str], None] = print) -> Iterator[Any]:
    """A ``distributed.Client``; a local cluster (processes, 1 thread each, memory limit) is closed on exit.

    The dashboard address is printed when the cluster starts (bokeh is installed; port chosen free).
    """
    from distributed import Client, LocalCluster

    # The scheduler of a local cluster lives in this process; its INFO lines would drown the progress bar.
    logging.getLogger("distributed").setLevel(logging.WARNING)

    if params.scheduler_address:
        try:
            client = Client(params.scheduler_address, timeout="15s")
        except OSError as err:
            raise LesionflowError(
                f"cannot reach the Dask scheduler at preprocess.scheduler_address="
                f"{params.scheduler_address!r} ({type(err).__name__}); start it or clear the value"
            ) from None
        say(f"dask: connected to {params.scheduler_address}; dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return
    # A Nanny writes its workers' environment (OMP_NUM_THREADS=1 ...) into this process's os.environ; put it
    # back afterwards, or a later torch stage in the same process would train with other thread settings.
    environ = dict(os.environ)
    cluster = LocalCluster(
        n_workers=params.workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=params.memory_limit,
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    say(
        f"dask: local cluster, {params.workers} worker process(es) x 1 thread, {params.memory_limit} each; "
        f"dashboard {client.dashboard_link}"
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        os.environ.clear()
        os.environ.update(environ)
