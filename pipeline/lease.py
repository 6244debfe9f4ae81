"""One writer per output: a lease file beside the store a job writes (``<out>.lock``).

A job that writes a store (``preprocess``, ``score``) holds the lease for as long as it runs:

- **taken atomically**: the lease is written whole to a temporary file, then hard-linked to
  ``<out>.lock`` (``os.link`` fails if the name exists), so a competitor never reads half a lease and
  two jobs can never both succeed; on a file system without hard links, ``O_CREAT | O_EXCL``;
- **holding the job's identity**: pid, host, command line, start time, a random token, and a heartbeat
  time the holder rewrites every ``HEARTBEAT_S`` seconds (a daemon thread);
- **checked before any work**: a second writer gets ``StoreBusy`` (a ``PipelineError``: exit status 2 on
  the command line) naming the holder and since when;
- **taken over when stale**: the holder's process is gone (same host), or its heartbeat is older than
  ``STALE_S`` (any host): the old lease is moved aside (``os.rename``, one winner) and the take-over is
  logged as a warning;
- **released** when the job ends, however it ends (an exception or ``KeyboardInterrupt`` included);
  a job killed outright leaves its lease behind, which the next job takes over as above.

Beside the store, not inside it: ``--overwrite`` replaces the store's folder, never the lease. On
fsspec URLs (``s3://``, ...) the lease is taken by the file system's exclusive create (S3's
``If-None-Match: *``, which AWS and S3-compatible servers honour): of two jobs started at the same
instant exactly one takes it. A file system without exclusive create is refused. Taking over a stale
lease there is a copy and a delete, checked, then the same exclusive create.

Within one process the lease is re-entrant: the command line takes it before starting a cluster, the
job function takes it again (it also guards jobs started from Python), and the outer release frees it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import PipelineError
from .locations import Location, locate

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  #: how often the holder rewrites its heartbeat
STALE_S = 120.0  #: a lease whose heartbeat is older than this is taken over
SUFFIX = ".lock"


class StoreBusy(PipelineError):
    """Another live job holds the lease of the store."""


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease file holds (JSON)."""

    pid: int
    host: str
    command: str
    job: str
    out: str
    started: float  #: epoch seconds
    heartbeat: float  #: epoch seconds, rewritten every ``HEARTBEAT_S``
    token: str
    kind: str = "ecg-pipeline-lease"

    def to_json(self) -> str:
        d = asdict(self)
        d["started_utc"], d["heartbeat_utc"] = _utc(self.started), _utc(self.heartbeat)
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LeaseInfo":
        d = json.loads(text)
        return cls(pid=int(d["pid"]), host=str(d["host"]), command=str(d.get("command", "")),
                   job=str(d.get("job", "")), out=str(d.get("out", "")), started=float(d["started"]),
                   heartbeat=float(d["heartbeat"]), token=str(d["token"]))

    def describe(self) -> str:
        """``pid 1234 on host x (ecg-pipeline preprocess ..., since 06:41:02 UTC)``."""
        command = self.command if len(self.command) <= 160 else self.command[:157] + "..."
        return f"pid {self.pid} on host {self.host} ({command}, since {_since(self.started)})"


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _since(t: float) -> str:
    when = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    today = dt.datetime.now(dt.timezone.utc).date() == when.date()
    return when.strftime("%H:%M:%S UTC" if today else "%Y-%m-%d %H:%M:%S UTC")


def command_line(job: str) -> str:
    """This process's command line as a user typed it (``ecg-pipeline preprocess mitdb --out ...``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("ecg-pipeline", "cli.py"):
        return shlex.join(["ecg-pipeline", *argv[1:]])
    return f"{job} job in " + (shlex.join([Path(sys.executable).name, *argv]) if argv and argv[0] else "python")


def lock_path(out: str) -> str:
    """``<out>.lock`` (a path or URL beside the store)."""
    return str(out).rstrip("/") + SUFFIX


def _pid_alive(pid: int, started: float) -> bool:
    """Whether ``pid`` runs on this host and is the process that took the lease (not a reused pid)."""
    try:
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return p.create_time() <= started + 1.0
    except ImportError:  # pragma: no cover - psutil comes with distributed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied: not ours to judge further
        return False


class _Files:
    """The few file operations a lease needs, on a local path or an fsspec URL (``locations.Location``)."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None):
        self.location = locate(path, storage_options)
        self.local, self.path = self.location.local, self.location.path

    def _at(self, path: str | None) -> Location:
        return self.location if path is None or path == self.path else replace(self.location, url=path, path=path)

    def read(self, path: str | None = None) -> str | None:
        try:
            return self._at(path).read_text()
        except FileNotFoundError:
            return None

    def create(self, text: str) -> bool:
        """Write ``text`` at the lease path if nothing is there (exclusive create: one winner); False if taken."""
        return self.location.create(text.encode("utf-8"))

    def replace(self, text: str) -> None:
        """Rewrite the lease whole (the heartbeat)."""
        self.location.write_text(text)

    def move_aside(self, token: str) -> str | None:
        """Move the lease to a unique name (one mover wins locally); the new name, or None if it was gone.

        On object stores a move is a copy and a delete: two movers may both succeed, so ``acquire`` checks what it
        moved and the exclusive create that follows has one winner.
        """
        dest = f"{self.path}.stale-{token}"
        try:
            if self.local:
                os.rename(self.path, dest)
            else:
                self.location.fs.mv(self.path, dest)
        except FileNotFoundError:
            return None
        return dest

    def put_back(self, moved: str) -> None:
        """Undo ``move_aside`` of a lease that turned out to be live (unless another took its place)."""
        with contextlib.suppress(OSError):
            self.create(self._at(moved).read_text())
        self.remove(moved)

    def remove(self, path: str | None = None) -> None:
        with contextlib.suppress(OSError):
            self._at(path).remove()


class Lease:
    """A held lease; ``release()`` (or leaving ``hold``) frees it."""

    def __init__(self, files: _Files, info: LeaseInfo, heartbeat_s: float):
        self.files, self.info = files, info
        self.path = files.path
        self.lost = False  #: another job took the lease over (this one looked stale to it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="ecg-pipeline lease heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not worth killing the job for
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def heartbeat(self) -> None:
        """Rewrite the heartbeat time (only while the lease is still this job's)."""
        text = self.files.read()
        current = _parse(text)
        if current is None or current.token != self.info.token:
            if not self.lost:
                self.lost = True
                who = current.describe() if current else "nobody (the lease file is gone)"
                log.warning("the lease %s is no longer this job's: held by %s", self.path, who)
            return
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
        self.files.replace(self.info.to_json())

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        current = _parse(self.files.read())
        if current is not None and current.token == self.info.token:
            self.files.remove()


def _parse(text: str | None) -> LeaseInfo | None:
    if text is None:
        return None
    try:
        return LeaseInfo.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None


def stale_reason(info: LeaseInfo, stale_s: float = STALE_S, now: float | None = None) -> str | None:
    """Why the lease ``info`` may be taken over (None: its holder is alive)."""
    now = time.time() if now is None else now
    if info.host == socket.gethostname() and not _pid_alive(info.pid, info.started):
        return "that process is no longer running"
    age = now - info.heartbeat
    if age > stale_s:
        return f"its heartbeat is {age / 60:.1f} min old (limit {stale_s / 60:g} min)"
    return None


_held: dict[str, list] = {}  #: lease path -> [Lease, depth], for re-entry within this process
_held_lock = threading.Lock()


def acquire(out: str, job: str, command: str | None = None, storage_options: Mapping[str, Any] | None = None,
            stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S) -> Lease:
    """Take the lease of ``out`` or raise ``StoreBusy``. Prefer ``hold``, which also releases it."""
    files = _Files(lock_path(out), storage_options)
    display = str(out).rstrip("/")
    for _ in range(20):  # each turn either ends or saw the lease change hands
        now = time.time()
        info = LeaseInfo(pid=os.getpid(), host=socket.gethostname(), command=command or command_line(job), job=job,
                         out=display, started=now, heartbeat=now, token=uuid.uuid4().hex)
        if files.create(info.to_json()):
            return Lease(files, info, heartbeat_s)
        text = files.read()
        if text is None:
            continue  # released between our two looks
        current = _parse(text)
        if current is None:
            # Unreadable: half-written by a non-atomic writer, or not ours. Old enough, it is taken over.
            age = now - _mtime(files)
            if age <= stale_s:
                raise StoreBusy(f"{display} has a lease file {files.path} that is not a valid lease (written "
                                f"{age:.0f} s ago); if no job is writing the store, delete it")
            reason, who = f"unreadable and {age / 60:.1f} min old", "an unknown job"
        else:
            reason = stale_reason(current, stale_s, now)
            if reason is None:
                raise StoreBusy(f"{display} is being written by {current.describe()}; wait for it or stop it "
                                f"(lease: {files.path})")
            who = current.describe()
        moved = files.move_aside(info.token)
        if moved is None:
            continue
        if _parse(files.read(moved)) != current:  # we moved a lease someone took a moment ago: not stale
            files.put_back(moved)
            continue
        files.remove(moved)
        log.warning("taking over the lease of %s from %s: %s", display, who, reason)
    raise StoreBusy(f"{display}: the lease {files.path} kept changing hands; try again")


def _mtime(files: _Files) -> float:
    try:
        return files.location.modified()
    except Exception:  # noqa: BLE001
        return time.time()


@contextlib.contextmanager
def hold(out: str, job: str, command: str | None = None, storage_options: Mapping[str, Any] | None = None,
         stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold the lease of the store ``out`` for the ``with`` block (re-entrant within a process).

    Raises
    ------
    StoreBusy
        Another live job holds it.
    """
    key = _Files(lock_path(out), storage_options).path
    with _held_lock:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _held_lock:
                entry[1] -= 1
        return
    lease = acquire(out, job, command, storage_options, stale_s, heartbeat_s)
    with _held_lock:
        _held[key] = [lease, 1]
    try:
        yield lease
    finally:
        with _held_lock:
            _held.pop(key, None)
        lease.release()
