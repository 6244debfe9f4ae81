"""How a command runs in a terminal: its logging, its Dask client (and its store's lease), its progress bars,
the configuration it prints.

The command line (``jobs.cli``) parses arguments and calls these around a job; nothing
heavy is imported at the top (``--help`` must answer at once), each function imports
what it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys


def setup_logging(verbose: int) -> None:
    """Log at WARNING, or INFO / DEBUG with ``-v`` / ``-vv``, on stderr with the time and the logger's name."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # distributed sets its logger to INFO when imported (here or in a worker process); its start/stop
    # chatter is only wanted with -vv. Through dask's config, so that it holds whenever distributed is imported.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose >= 2 else "warning")
    if not verbose:
        # A busy default dashboard port: distributed takes another one, and the dashboard line says which.
        import warnings

        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


def dask_session(args: argparse.Namespace, **kwargs):
    """``cluster.dask_client`` for a command (``--scheduler``, ``--scheduler-file``), with distributed's
    logging at the verbosity of ``-v``.

    Without -v, a failed task is reported once, by the job, in one line: the local workers' "Compute
    Failed" record (with the task's traceback) is dropped.
    """
    from ..pipeline.cluster import dask_client

    verbose = getattr(args, "verbose", 0)
    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    return dask_client(args.scheduler, args.scheduler_file, quiet_task_errors=not verbose, **kwargs)


@contextlib.contextmanager
def job_cluster(args: argparse.Namespace, out: str, job: str, storage_options=None, **kwargs):
    """The lease of the store ``out`` for ``job``, then ``dask_session``; says where the dashboard is.

    The lease comes first: a second writer of the store is refused before a cluster starts (the job
    holds the lease again, for callers that do not come through here).
    """
    from ..pipeline.lease import hold

    with hold(out, job, storage_options=storage_options), dask_session(args, **kwargs) as client:
        link = client.dashboard_link
        sys.stderr.write(f"Dask dashboard: {link}\n" if link else "Dask dashboard: not available\n")
        yield client


def progress_bars(enabled: bool, unit: str = "task"):
    """A job's ``progress`` argument: ``(description, total) -> tqdm bar`` on stderr, or None without bars."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda desc, total: tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True)


def print_config(config) -> int:
    """Print a configuration (``pipeline.config``) as YAML on stdout; 0, the exit status of ``--print-config``."""
    import yaml

    sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return 0
