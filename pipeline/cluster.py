"""Connect to a Dask cluster, or start the embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger(__name__)


class DropComputeFailed(logging.Filter):
    """Drops the record a distributed worker logs for a task that raised ("Compute Failed", with its traceback).

    The jobs receive the task's exception and report it themselves (a failed record, or a
    one-line job error), so on a command line that record only repeats it, at length.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def drop_compute_failed_logs() -> None:
    """Install ``DropComputeFailed`` on this process's ``distributed.worker`` logger (once)."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, DropComputeFailed) for f in logger.filters):
        logger.addFilter(DropComputeFailed())


class _QuietTaskErrors(WorkerPlugin):
    """``drop_compute_failed_logs()`` in every worker process: forked, spawned or restarted."""

    name = "ecg-pipeline-drop-compute-failed"

    def setup(self, worker) -> None:
        drop_compute_failed_logs()


class DropClosingHeartbeatFailure(logging.Filter):
    """Drops the record a worker logs, with a traceback, when its heartbeat to the scheduler fails while the
    worker itself is closing.

    Why: ``Worker.close`` stops the heartbeat callback but not a heartbeat already in flight, then closes its
    RPC pool under it, so an orderly close of a local cluster can log "Failed to communicate with scheduler
    during heartbeat." with a ``tcp.py`` traceback (dask/distributed#7105, #7891). It is a race on a busy
    machine (seen once in a notebook run under CI load). A heartbeat that fails while the worker runs is kept.
    """

    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat"):
            return True
        return getattr(self.worker.status, "name", "") not in ("closing", "closed", "closing_gracefully", "failed")


class _QuietClose(WorkerPlugin):
    """``DropClosingHeartbeatFailure`` in every worker process of the local cluster."""

    name = "ecg-pipeline-quiet-close"

    def setup(self, worker) -> None:
        logger = logging.getLogger("distributed.worker")
        for f in [f for f in logger.filters if isinstance(f, DropClosingHeartbeatFailure)]:
            logger.removeFilter(f)  # a worker restarted in the same process: the filter follows the new one
        logger.addFilter(DropClosingHeartbeatFailure(worker))


class LimitNativeThreads(WorkerPlugin):
    """Native thread pools (OpenBLAS, OpenMP, MKL) of each worker process sized to its Dask threads.

    Why: a forked local worker inherits the driver's OpenBLAS, already started with one thread per core, and
    the nanny's ``OPENBLAS_NUM_THREADS=1`` comes too late for it. Two such workers on two cores each ran
    their matrix products on two threads: measured on the MIT-BIH scoring job, every stage 1.4-3.4x slower
    and the warm run 6.2 s against 4.6 s with the pools limited.
    """

    name = "ecg-pipeline-limit-native-threads"

    def setup(self, worker) -> None:
        import threadpoolctl

        # Kept on the plugin: the limits hold for the process's life (the object restores them only if asked).
        self._limits = threadpoolctl.threadpool_limits(limits=max(int(worker.state.nthreads), 1))


class ExitWithParent(WorkerPlugin):
    """Each worker process of a local cluster exits as soon as the process that started it (the driver) is gone.

    Why: distributed's own guard (the child reads a pipe whose write end only the parent should hold, and exits
    at EOF) fails with forked workers. A worker forked after its siblings' pipes were made inherits their write
    ends, so two workers can hold each other's pipes open: SIGKILL the driver and neither ever sees EOF. Measured
    with ``ecg-pipeline score`` and 4 workers, driver killed 10-14 s after its start: in 2 of 16 tries 2-3
    workers of ~800 MB each were re-parented to PID 1 and stayed, with each other's pipe write ends open.

    Design: a daemon thread in each worker compares ``os.getppid()`` with the driver's pid (given here, in the
    driver, so a worker whose driver died while it was still starting also exits at once) every ``poll_s``,
    and ends the process with ``os._exit`` when they differ (re-parented to PID 1 or a sub-reaper). It works the
    same for forked and spawned workers and for workers a nanny restarts (the plugin is part of every worker's
    arguments, set up before the worker registers with the scheduler). ``PR_SET_PDEATHSIG`` is not used: the
    kernel sends it when the *thread* that forked the child ends, and distributed forks from helper threads.
    The nannies of a local cluster run inside the driver process and die with it.
    """

    name = "ecg-pipeline-exit-with-parent"

    def __init__(self, parent_pid: int | None = None, poll_s: float = 0.5):
        self.parent_pid = parent_pid or os.getpid()
        self.poll_s = poll_s

    def setup(self, worker) -> None:
        if os.getppid() != self.parent_pid:
            _exit_orphan(self.parent_pid)
        watch_parent(self.parent_pid, self.poll_s)


#: Dask's housekeeping on the embedded cluster, run less often than its defaults. Each is a periodic callback that
#: takes CPU from the tasks whatever the job: with the defaults (a worker profile sample every 10 ms, an event-loop
#: tick every 20 ms, a system-monitor sample every 500 ms) an idle 2-worker local cluster used 0.18 of a core; with
#: these, 0.06 (measured over 10 s idle on a 2-core machine): on a 2-core laptop ~6 % of the machine given back to
#: the records. The dashboard's profile page keeps working, at a coarser sampling. A remote cluster keeps its own
#: configuration.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.tick.interval": "100ms",
    "distributed.admin.system-monitor.interval": "1s",
}

_watching: set[int] = set()
_forked_from: set[int] = set()  #: processes that forked the workers of a local cluster (``dask_client``)


def watch_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Start (once per process) the thread that exits this process when its parent ``parent_pid`` is gone."""
    if parent_pid in _watching:
        return
    _watching.add(parent_pid)

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent_pid:
                _exit_orphan(parent_pid)

    threading.Thread(target=watch, name="ecg-pipeline exit-with-parent", daemon=True).start()


def _exit_orphan(parent_pid: int) -> None:
    with contextlib.suppress(Exception):  # the driver's stderr may be gone with it
        os.write(2, f"ecg-pipeline: worker {os.getpid()}: its driver (pid {parent_pid}) is gone; exiting\n".encode())
    os._exit(70)


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = ":8787",
    timeout_s: float = 30.0,
    start_method: str | None = None,
    quiet_task_errors: bool = False,
) -> Iterator[Client]:
    """Yield a ``distributed.Client``.

    With ``scheduler`` (``tcp://host:8786``) or ``scheduler_file``, connect to that
    cluster; otherwise start a local cluster of ``n_workers`` worker processes
    (default: one per core) with ``threads_per_worker`` threads each. The stages are
    NumPy/wfdb code that holds the GIL part of the time, so processes beat threads.

    ``start_method`` is how the local workers start: ``fork`` (the default on Linux, for the
    first local cluster of a process) starts them in ~0.1 s with the driver's modules already
    imported, against ~2 s for ``spawn`` (the default elsewhere: fork is unsafe on macOS; for a
    second local cluster in one process; and wherever TensorFlow, JAX or PyTorch is already
    imported: their threads do not survive a fork).

    ``quiet_task_errors`` drops the local workers' "Compute Failed" log records (see
    ``DropComputeFailed``); a remote cluster's workers log to their own terminals and are left alone.

    The local workers exit when the driver dies, however it dies (``ExitWithParent``). A remote cluster
    outlives its driver: the scheduler drops the client's tasks once the client is gone, and the cluster
    goes on serving other clients.
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
    if start_method is None:
        # A forked child gets the parent's memory but not its threads: once TensorFlow (or JAX) has started its
        # thread pools in this process, forked workers deadlock in it (a notebook that trains, then scores).
        runtime = any(m in sys.modules for m in ("tensorflow", "jax", "torch"))
        # Only the first local cluster of a process forks: in a second one (a notebook running two jobs, a
        # benchmark's repeats), transfers of a few MB between forked workers hung for good once the first
        # cluster's workers had sized their BLAS pools (measured: 48 transfers of 3.5 MB, the second cluster
        # stalled in 3 runs of 3; spawned workers never).
        again = os.getpid() in _forked_from
        start_method = "fork" if sys.platform.startswith("linux") and not runtime and not again else "spawn"
    if start_method == "fork":
        _forked_from.add(os.getpid())
    settings = {**LOCAL_CLUSTER_CONFIG, "distributed.worker.multiprocessing-method": start_method}
    with dask.config.set(settings), LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=dashboard_address,
        silence_logs=logging.WARNING,
        plugins=(ExitWithParent(os.getpid()), _QuietClose(), LimitNativeThreads()),
    ) as cluster, Client(cluster) as client:
        if quiet_task_errors:
            client.register_plugin(_QuietTaskErrors())
        yield client


def on_worker(fn, *args):
    """``fn(*args)`` run as a task: a job-level error it raises names the worker it was raised on.

    A worker sees other files, credentials and networks than the driver (another machine, another HOME): an
    unreachable source or store is then that worker's view, and the message says which worker had it.
    """
    from .errors import PipelineError

    try:
        return fn(*args)
    except (PipelineError, OSError) as exc:
        from distributed import get_worker

        try:
            where = get_worker().address
        except ValueError:  # not on a worker (a synchronous scheduler): nothing to add
            raise exc from None
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (seen on Dask worker {where})", *exc.args[1:])
        raise
