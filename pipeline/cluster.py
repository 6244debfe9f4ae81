"""Connect to a Dask cluster, or start the embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import dask
from typing import Iterator

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = ":8787",
    timeout_s: float = 30.0,
    start_method: str | None = None,
) -> Iterator[Client]:
    """Yield a ``distributed.Client``.

    With ``scheduler`` (``tcp://host:8786``) or ``scheduler_file``, connect to that
    cluster; otherwise start a local cluster of ``n_workers`` worker processes
    (default: one per core) with ``threads_per_worker`` threads each. The stages are
    NumPy/wfdb code that holds the GIL part of the time, so processes beat threads.

    ``start_method`` is how the local workers start: ``fork`` (the default on Linux)
    starts them in ~0.1 s with the driver's modules already imported, against ~2 s for
    ``spawn`` (the default elsewhere: fork is unsafe on macOS). Jobs that import
    TensorFlow in the driver should pass ``spawn``.
    """
    if scheduler and scheduler_file:
        raise ValueError("give --scheduler or --scheduler-file, not both")
    if scheduler or scheduler_file:
        client = Client(address=scheduler, scheduler_file=scheduler_file, timeout=timeout_s)
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = n_workers or os.cpu_count() or 1
    start_method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
    with dask.config.set({"distributed.worker.multiprocessing-method": start_method}), LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=dashboard_address,
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        yield client
