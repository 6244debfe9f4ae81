"""Benchmark: the preprocess job at scale, on a synthetic PhysioNet tree of short recordings (issue 37, item 3).

For each ``--records`` N, a PhysioNet-style tree ``<tree>/scale-sim/1.0.0/`` of N recordings is built: recording
``i`` is Challenge 2017 recording ``i % 8528`` under a new name (``S000001`` ...), its signal file a hard link to
one extracted original (a copy where links fail), its header rewritten to name the new record and signal file,
with ``RECORDS``, a label table ``REFERENCE.csv`` (the original's label) and ``SHA256SUMS.txt`` (every file).
Building it is not measured. The tree is served by ``python -m http.server`` on 127.0.0.1 and the database is
registered as ``scale-sim`` with Challenge 2017's labels and preprocess defaults (30 s windows).

The job runs in a child process (this script with ``--child``): a local Dask cluster of ``--workers``
processes, a cold download cache, every file fetched over HTTP and verified. Measured, per N:

* wall time (cluster start included, and the job's own), records/s, the job's phases (manifest, plan, write);
* peak RSS of the driver process alone (``ru_maxrss`` of the child: the driver and the local scheduler) and of
  each worker; target: the driver at most 1 GB and flat in N;
* the per-record table (the store's ``records`` group): its size on disk and the time to read it
  (``open_store(path)["records"].to_dataset().load()``);
* the summary the job prints: its number of lines stays small however many records fail;
* with ``--resume`` (default): a second job on a fresh store is killed (SIGKILL to its whole process group:
  driver, scheduler and workers) once at least half of the store's chunks are written, then run again on the
  same store and cache. Reported: chunks it wrote again of the total, records it read again
  (``report.records_planned``, or ``records_read``) of the total, how much of that was work done before the
  kill (target: at most 5 %), files it downloaded again (from the HTTP server's log), its wall time against
  the full run, and whether the resumed store equals the uninterrupted one. ``--kill-in plan`` kills it
  instead once half the records are fetched (half of the wall time: the plan phase takes most of it).

At the end, the ratios between the largest and smallest N of the wall time per record and of the driver's
peak RSS (flat: within 25 %), measured in the same run.

    python benchmarks/scale.py [--records 1000 ...] [--workers 2] [--mirror ../shared/physionet]
                               [--work DIR] [--resume | --no-resume] [--keep] [--chunk-size N]
                               [--kill-in write|plan]

Disk: about 100 KB per recording (tree headers, two download caches, two stores) plus 170 MB of extracted
originals; the script refuses to start where the work folder has less free.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
SOURCE_DB = "challenge-2017"
SIM_DB = "scale-sim"
SIM_VERSION = "1.0.0"
ARCHIVE_FOLDER = "training2017"  #: the folder of the Challenge 2017 archive that holds the recordings

DRIVER_LIMIT_MB = 1024.0  #: issue 37: the driver's peak memory at most 1 GB ...
FLAT_TOLERANCE = 1.25  #: ... and flat in N: largest-N / smallest-N within this factor (wall time per record too)
REDO_LIMIT = 0.05  #: a resume redoes at most 5 % of the work
EXTRAPOLATE_TO = 100_000  #: the driver's RSS slope is extrapolated to this N when the run stops short of it

# Disk use per recording, measured at 3,000 recordings and rounded up: tree (header block, link), download cache
# (header, signal, two markers), store; the killed-and-resumed case has its own cache and store.
TREE_BYTES_PER_RECORD = 8 * 1024
RUN_BYTES_PER_RECORD = 48 * 1024
ORIGINALS_BYTES = 200 * 2**20

log = logging.getLogger("benchmarks.scale")


class ScaleError(RuntimeError):
    """The benchmark cannot go on (no disk space, a child job that failed, a job that could not be killed)."""


# ---------------------------------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Original:
    """One extracted Challenge 2017 recording, the source of its copies."""

    name: str  #: ``A00001``
    header: str  #: the ``.hea`` text
    mat: Path  #: the extracted signal file
    mat_sha256: str
    label: str  #: its REFERENCE.csv class


@dataclass(frozen=True)
class Tree:
    """A synthetic tree: served from ``root``; the database folder is ``root / SIM_DB / SIM_VERSION``."""

    root: Path
    n: int
    build_s: float
    linked: bool  #: the signal files are hard links (else copies)

    @property
    def folder(self) -> Path:
        return self.root / SIM_DB / SIM_VERSION


def tree_bytes(n: int) -> int:
    """Disk the tree of ``n`` recordings needs (the extracted originals included)."""
    return n * TREE_BYTES_PER_RECORD + ORIGINALS_BYTES


def run_bytes(n: int, resume: bool) -> int:
    """Disk the jobs on ``n`` recordings need: download cache and store, twice with the resume case."""
    return n * RUN_BYTES_PER_RECORD * (2 if resume else 1)


def check_disk(path: Path, need: int, what: str) -> None:
    """Raise ``ScaleError`` unless the file system of ``path`` has ``need`` bytes free (with 10 % to spare)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * 1.1:
        raise ScaleError(f"not enough disk for {what}: {need / 2**30:.1f} GiB needed (+10 %), "
                         f"{free / 2**30:.1f} GiB free at {probe}; choose another --work or fewer --records")


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def extract_originals(archive: Path, dest: Path) -> list[Original]:
    """The 8,528 recordings of the Challenge 2017 ``archive``, extracted once into ``dest`` (reused after), in
    the order of its ``RECORDS`` file, each signal file's SHA-256 computed once."""
    folder = dest / ARCHIVE_FOLDER
    done = dest / ".extracted"
    if not done.is_file():
        check_disk(dest, ORIGINALS_BYTES, "the extracted Challenge 2017 recordings")
        t0 = time.perf_counter()
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, [m for m in z.namelist() if m.startswith(f"{ARCHIVE_FOLDER}/")])
        done.write_text(str(archive))
        log.info("extracted %s in %.1f s", archive.name, time.perf_counter() - t0)
    names = (folder / "RECORDS").read_text().split()
    labels = dict(line.split(",", 1) for line in (folder / "REFERENCE.csv").read_text().split())
    return [Original(r, (folder / f"{r}.hea").read_text(), folder / f"{r}.mat",
                     _sha256_file(folder / f"{r}.mat"), labels[r].strip()) for r in names]


def rename_header(text: str, old: str, new: str) -> str:
    """A WFDB header of record ``old`` rewritten for record ``new``: the record line names the record, each
    signal line its file (``A00001.mat 16+24 ...`` -> ``S000001.mat 16+24 ...``); the rest is kept."""
    lines = text.splitlines(keepends=True)
    record_line = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    n_signals = int(lines[record_line].split()[1])
    out = list(lines)
    if not lines[record_line].startswith(f"{old} "):
        raise ValueError(f"header of {old} does not start with its name: {lines[record_line]!r}")
    out[record_line] = new + lines[record_line][len(old):]
    signal_lines = [i for i in range(record_line + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("#")]
    for i in signal_lines[:n_signals]:
        file_name = lines[i].split()[0]
        if file_name.startswith(f"{old}."):
            out[i] = new + lines[i][len(old):]
    return "".join(out)


def record_name(i: int, n: int) -> str:
    """Name of synthetic recording ``i`` (0-based) of ``n``: ``S000001`` ... (wider beyond 999,999)."""
    return f"S{i + 1:0{max(6, len(str(n)))}d}"


def make_tree(root: Path, n: int, archive: Path, originals: Path | None = None) -> Tree:
    """Build a PhysioNet-style tree of ``n`` recordings at ``root / "scale-sim" / "1.0.0"``.

    Parameters
    ----------
    root
        Folder to serve; created if needed.
    n
        Number of recordings: recording ``i`` is Challenge 2017 recording ``i % 8528``.
    archive
        The Challenge 2017 ``training2017.zip``.
    originals
        Where its recordings are extracted (once; reused by later trees); default ``root / "_originals"``.

    Returns
    -------
    Tree
        The tree, with the time it took to build (not a measured figure).

    Raises
    ------
    ScaleError
        The file system has too little space for it.
    """
    if n < 1:
        raise ValueError("a tree needs at least one recording")
    originals = originals or root / "_originals"
    check_disk(root, tree_bytes(n) - (ORIGINALS_BYTES if (originals / ".extracted").exists() else 0),
               f"a tree of {n:,} recordings")
    t0 = time.perf_counter()
    source = extract_originals(archive, originals)
    folder = root / SIM_DB / SIM_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    names, labels, sums = [], [], []
    linked = True
    for i in range(n):
        o = source[i % len(source)]
        new = record_name(i, n)
        header = rename_header(o.header, o.name, new).encode()
        (folder / f"{new}.hea").write_bytes(header)
        mat = folder / f"{new}.mat"
        mat.unlink(missing_ok=True)
        if linked:
            try:
                os.link(o.mat, mat)
            except OSError:  # another file system, too many links, or no hard links at all
                linked = False
        if not linked:
            shutil.copyfile(o.mat, mat)
        names.append(new)
        labels.append(f"{new},{o.label}\n")
        sums += [f"{hashlib.sha256(header).hexdigest()}  {new}.hea\n", f"{o.mat_sha256}  {new}.mat\n"]
    records = "".join(f"{r}\n" for r in names).encode()
    table = "".join(labels).encode()
    (folder / "RECORDS").write_bytes(records)
    (folder / "REFERENCE.csv").write_bytes(table)
    sums += [f"{hashlib.sha256(records).hexdigest()}  RECORDS\n",
             f"{hashlib.sha256(table).hexdigest()}  REFERENCE.csv\n"]
    (folder / "SHA256SUMS.txt").write_text("".join(sorted(sums, key=lambda s: s.split("  ", 1)[1])))
    build_s = time.perf_counter() - t0
    log.info("tree of %d recordings built in %.1f s (%s)", n, build_s, "hard links" if linked else "copies")
    return Tree(root, n, build_s, linked)


# ------------------------------------------------------------------------------------------- the database entry


def sim_database():
    """The ``scale-sim`` entry: Challenge 2017's labels and preprocess defaults over loose files."""
    from ecg_pipeline.pipeline.databases import Database, get_database

    base = get_database(SOURCE_DB)
    return Database(
        name=SIM_DB, version=SIM_VERSION,
        title=f"Scale simulation: Challenge 2017 recordings copied under new names ({base.title})",
        annotator="", label_map="", leads=base.leads, citation=base.citation,
        labels="record-table", label_options={"file": "REFERENCE.csv", "classes": ("N", "A", "O", "~")},
        challenge_classes=("N", "A", "O"), preprocess_defaults=copy.deepcopy(dict(base.preprocess_defaults)),
    )


def register_sim_database():
    """Register ``scale-sim`` in this process (a no-op when it is there already) and return it."""
    from ecg_pipeline.pipeline.databases import register_database

    return register_database(sim_database())


def sim_config(chunk_size: int | None = None, commit_records: int | None = None):
    """The job's configuration: the database's defaults, with ``chunk_size`` segments a chunk and a commit every
    ``commit_records`` records read (``store.commit_records``) where given."""
    from ecg_pipeline.pipeline.config import load_config

    defaults = copy.deepcopy(dict(sim_database().preprocess_defaults))
    if chunk_size:
        defaults.setdefault("store", {})["chunk_size"] = chunk_size
    if commit_records:
        defaults.setdefault("store", {})["commit_records"] = commit_records
    return load_config(None, defaults)


# ------------------------------------------------------------------------------------------------- processes


def _peak_rss_mb() -> float:
    """Peak resident memory of the calling process in MB: ``VmHWM`` of ``/proc/self/status`` where there is one.

    Not ``ru_maxrss``: on Linux a child keeps its parent's figure across fork and exec, so a job started from a
    large process (a test session with TensorFlow loaded: 1.2 GB) reported that process's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; no /proc elsewhere


@contextlib.contextmanager
def serve(root: Path, request_log: Path) -> Iterator[str]:
    """``python -m http.server`` on an ephemeral loopback port, serving ``root``; yields its URL.

    Its request log (one line a request, on stderr) goes to ``request_log``, so files fetched can be counted.
    """
    with open(request_log, "w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )
    try:
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 43567 (http://127.0.0.1:43567/) ..."
        if " port " not in line:
            raise ScaleError(f"http.server did not start: {line!r}")
        port = int(line.split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def count_requests(request_log: Path, start: int = 0, suffix: str = "") -> tuple[int, int]:
    """GET requests in ``request_log`` from byte ``start`` (for paths ending in ``suffix``), and its size now."""
    with open(request_log, "rb") as f:
        f.seek(start)
        data = f.read()
    n = sum(1 for line in data.splitlines() if b'"GET ' in line and line.split(b'"GET ', 1)[1].split(b" ", 1)[0]
            .endswith(suffix.encode()))
    return n, start + len(data)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from ``/proc``; where there is no ``/proc``,
    ``[pgid]`` while a signal can still reach the group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def wait_group_gone(pgid: int, timeout_s: float = 60.0) -> None:
    """Wait until no process of group ``pgid`` is alive; SIGKILL stragglers; raise ``ScaleError`` if any stays."""
    deadline = time.monotonic() + timeout_s
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)
    if alive:
        raise ScaleError(f"processes {alive} of group {pgid} still run {timeout_s:.0f} s after SIGKILL")


@dataclass(frozen=True)
class ChildRun:
    """What the ``--child`` job needs: where to read, where to write, and where to put its figures."""

    url: str
    out: Path
    cache: Path
    result: Path
    log: Path
    workers: int
    chunk_size: int | None
    commit_records: int | None = None
    debug: bool = False  #: the job logs its commits (``ecg_pipeline.jobs.preprocess`` at DEBUG) to ``log``

    def command(self) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--url", self.url, "--out", str(self.out),
               "--cache", str(self.cache), "--result", str(self.result), "--workers", str(self.workers)]
        cmd += ["--chunk-size", str(self.chunk_size)] if self.chunk_size else []
        cmd += ["--debug"] if self.debug else []
        return cmd + (["--commit-records", str(self.commit_records)] if self.commit_records else [])

    def start(self) -> subprocess.Popen:
        """Start the child in a process group of its own (its workers join it), output to ``log``."""
        self.result.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            return subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def figures(self, proc: subprocess.Popen) -> dict[str, Any]:
        """The figures of a child that has exited; ``ScaleError`` with its log's tail if it failed."""
        if proc.returncode != 0 or not self.result.is_file():
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
            raise ScaleError(f"child job exited with status {proc.returncode}; end of {self.log}:\n{tail}")
        return json.loads(self.result.read_text())

    def run(self, timeout_s: float) -> dict[str, Any]:
        """Run the child to its end (its process group killed after ``timeout_s``) and return its figures."""
        proc = self.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ScaleError(f"child job ran past {timeout_s:.0f} s; killed (log: {self.log})") from None
        finally:
            wait_group_gone(proc.pid)
        return self.figures(proc)


def child_main(run: ChildRun) -> int:
    """``--child``: the preprocess job on the tree at ``run.url`` with a local cluster; its figures as JSON."""
    from ecg_pipeline.jobs.preprocess import PreprocessRequest, run_preprocess
    from ecg_pipeline.pipeline.cluster import dask_client

    db = register_sim_database()
    config = sim_config(run.chunk_size, run.commit_records)
    t0 = time.perf_counter()
    with dask_client(n_workers=run.workers, dashboard_address=None, quiet_task_errors=True) as client:
        cluster_s = time.perf_counter() - t0
        request = PreprocessRequest(db=db.name, out=str(run.out), source=run.url, cache_dir=str(run.cache),
                                    config=config)
        report = run_preprocess(request, client)
        workers_rss = sorted(client.run(_peak_rss_mb).values())
    total_s = time.perf_counter() - t0
    failed = report.failed
    causes: dict[str, int] = {}
    for r in failed:
        cause = r.error.split(":", 1)[0].strip() or "unknown"
        causes[cause] = causes.get(cause, 0) + 1
    figures = {
        "records": len(report.records), "failed": len(failed), "failure_causes": causes,
        "failure_examples": [[r.record, r.error] for r in failed[:5]],
        "n_segments": report.n_segments, "chunks_total": report.chunks_total,
        "chunks_written": report.chunks_written, "chunks_skipped": report.chunks_skipped,
        # records read this run: ``records_planned`` as issue 37 names it, ``records_read`` as the report may
        "records_planned": getattr(report, "records_planned", getattr(report, "records_read", None)),
        "records_reused": getattr(report, "records_reused", None),
        "phase_s": dict(report.phase_s), "stage_s": dict(report.stage_s),
        "job_s": report.wall_s, "cluster_s": cluster_s, "total_s": total_s,
        "bytes_downloaded": report.bytes_downloaded, "summary_lines": len(report.text().splitlines()),
        "chunk_size": config.store.chunk_size,
        "driver_rss_mb": _peak_rss_mb(), "workers_rss_mb": workers_rss,
    }
    tmp = run.result.with_name(run.result.name + ".part")
    tmp.write_text(json.dumps(figures, indent=1))
    os.replace(tmp, run.result)
    return 0


# --------------------------------------------------------------------------------------------------- the cases


@dataclass
class ResumeResult:
    """The killed-and-resumed job of one N."""

    killed: bool  #: False: the job finished before it could be killed half way (nothing to resume)
    pgid: int = 0  #: process group of the killed job (its driver's pid)
    kill_in: str = "write"  #: the phase the kill aimed at: "write" (chunks written) or "plan" (records fetched)
    kill_after_s: float = 0.0
    chunks_total: int = 0
    chunks_at_kill: int = 0  #: chunks whose fingerprint the store held after the kill
    chunks_written: int = 0  #: by the resume
    chunks_redone: int = 0  #: written by the resume although the store held them at the kill
    records: int = 0
    records_planned: int | None = None  #: read by the resume (None: the report has no such field yet)
    records_reused: int | None = None
    records_needed: int = 0  #: records with a segment in a chunk the kill left unwritten
    records_done: int = 0  #: records whose work was done at the kill: all their segments written ("write"), or
    #: their files fetched ("plan": the request log's signal files)
    hea_downloaded: int = 0  #: record headers the resume fetched from the server again
    wall_s: float = 0.0  #: the resume's job wall time (cluster start excluded)
    total_s: float = 0.0
    identical: bool | None = None  #: the resumed store equals the uninterrupted one (None: not compared)
    difference: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def records_redone(self) -> int | None:
        """Records read again although their work was done before the kill (at least this many: the resume
        reads ``records_planned`` records, and only ``records - records_done`` were left to do)."""
        if self.records_planned is None:
            return None
        return max(0, self.records_planned - (self.records - self.records_done))

    @property
    def redo_share(self) -> float | None:
        """The larger of the shares of chunks and of records done again (None: records read are not reported)."""
        if self.records_redone is None or not self.records or not self.chunks_total:
            return None
        return max(self.chunks_redone / self.chunks_total, self.records_redone / self.records)


@dataclass
class CaseResult:
    """The measured figures of one N."""

    n: int
    tree_build_s: float
    figures: dict[str, Any]  #: the child's (``child_main``)
    table_bytes: int  #: the per-record table on disk
    table_read_s: float  #: ``open_store(path)["records"].to_dataset().load()``
    group_read_s: float  #: the ``records`` group alone (``read_records_group``)
    status_ok: int  #: records with status "ok" in the store's table
    resume: ResumeResult | None = None

    @property
    def job_s(self) -> float:
        return float(self.figures["job_s"])

    @property
    def driver_rss_mb(self) -> float:
        return float(self.figures["driver_rss_mb"])


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_record_table(store_path: Path) -> tuple[Any, float]:
    """The store's per-record table, loaded, and the seconds it took: ``open_store`` (the store opened and
    validated, its segments' coordinates loaded) then the ``records`` group loaded."""
    import ecg_pipeline
    import ecg_pipeline.pipeline.store  # noqa: F401 - imports outside the clock
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    t0 = time.perf_counter()
    table = ecg_pipeline.open_store(str(store_path))["records"].to_dataset().load()
    return table, time.perf_counter() - t0


def read_records_group(store_path: Path) -> float:
    """Seconds to load the ``records`` group alone with plain xarray (no validation, no segments); the first
    read of a process is done before the clock starts (zarr's and dask's first-use costs)."""
    import xarray as xr

    xr.open_zarr(str(store_path), group="records").load()
    t0 = time.perf_counter()
    xr.open_zarr(str(store_path), group="records").load()
    return time.perf_counter() - t0


def held_chunks(store_path: Path, reference: list[str] | None = None) -> list[bool] | None:
    """Per chunk, whether the store holds it (a fingerprint is set; with ``reference``, the fingerprints of the
    uninterrupted store, the one that chunk has there: a commit also writes the chunk being filled, whose
    fingerprint changes as it fills); None while the store cannot be read yet."""
    from ecg_pipeline.pipeline import store

    try:
        held = store.read_fingerprints(str(store_path))
    except Exception:  # noqa: BLE001 - not created yet, or a fingerprint being written as it is read
        return None
    if reference is None:
        return [bool(h) for h in held]
    return [bool(h) and k < len(reference) and h == reference[k] for k, h in enumerate(held)]


def records_kept(store_path: Path) -> int | None:
    """Records a resume can take from a store as a kill left it (as ``preprocessing.stored_plans`` takes them): in
    the last commit's saved plans (``_state/record_plan``, store order), not failed, and all of whose chunks hold
    that commit's content (their fingerprint set: written whole, or the chunk being filled as it was at that
    commit, whose rows a resume copies). None where the store has no plans yet. (Not the per-record table: a
    commit rewrites it one time in four.)"""
    import zarr

    from ecg_pipeline.pipeline import store
    from ecg_pipeline.pipeline.extract import RecordPlan

    held = held_chunks(store_path)
    try:
        attrs = store.decode_attrs(zarr.open_group(str(store_path), mode="r").attrs)
        texts, _ = store.read_plans(str(store_path), config_fingerprint=attrs.get("config_fingerprint"))
        size = zarr.open_array(str(store_path / "segments" / "spectrogram"), mode="r").chunks[0]
    except Exception:  # noqa: BLE001 - killed before its first commit
        return None
    if not texts:
        return None
    if held is None:
        return 0
    plans = [RecordPlan.from_json(t) for t in texts]
    count = np.array([p.n_segments for p in plans], dtype=np.int64)
    offset = np.cumsum(count) - count
    first, end = offset // size, -(-(offset + count) // size)  # the record's chunks: first to end
    cum = np.concatenate([[0], np.cumsum(np.asarray(held, bool))])
    held_of_them = cum[np.minimum(end, len(held))] - cum[np.minimum(first, len(held))]
    failed = np.array([not p.ok for p in plans], dtype=bool)
    return int(np.count_nonzero(~failed & (held_of_them == end - first)))


def records_in_chunks(offsets: np.ndarray, counts: np.ndarray, chunk_size: int, chunks: np.ndarray) -> int:
    """How many records have at least one segment in one of ``chunks`` (a boolean mask over chunk indices)."""
    has = counts > 0
    first = offsets[has] // chunk_size
    last = (offsets[has] + counts[has] - 1) // chunk_size
    cum = np.concatenate([[0], np.cumsum(chunks.astype(np.int64))])
    return int(np.count_nonzero(cum[last + 1] - cum[first] > 0))


def compare_stores(a: Path, b: Path) -> str:
    """"" when the two stores hold the same segments and per-record tables (attributes aside), else how they
    differ (the comparison runs chunk by chunk, in bounded memory)."""
    import ecg_pipeline
    import xarray as xr

    ta, tb = ecg_pipeline.open_store(str(a)), ecg_pipeline.open_store(str(b))
    for group in ("segments", "records"):
        try:
            xr.testing.assert_identical(ta[group].to_dataset().drop_attrs(), tb[group].to_dataset().drop_attrs())
        except AssertionError as exc:
            return f"{group}: {str(exc)[:500]}"
    return ""


def committed_chunks(store_path: Path) -> tuple[int, int] | None:
    """``(chunks committed, chunks in all)``, read off the files of ``_state/chunk_fingerprint`` (one Zarr chunk per
    segment chunk; an entry cleared to "" has no file); None before the store is laid out.

    A directory listing, to poll without lagging the job: opening the store (``held_chunks``) takes tens of
    milliseconds, time enough for a small job to write its remaining chunks between the look and the kill.
    """
    fp = store_path / "_state" / "chunk_fingerprint"
    try:
        total = int(json.loads((fp / "zarr.json").read_text())["shape"][0])
    except (FileNotFoundError, ValueError, KeyError, IndexError):  # not laid out yet, or being rewritten (a resize)
        return None
    try:
        with os.scandir(fp / "c") as entries:
            return sum(1 for _ in entries), total
    except FileNotFoundError:
        return 0, total


def _poll(proc: subprocess.Popen, ready, timeout_s: float, what: str, interval_s: float) -> bool:
    """Poll ``ready()`` every ``interval_s`` until it is true (True) or the job ends first (False).

    Raises
    ------
    ScaleError
        Neither happened within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(interval_s)  # a poll interval, not a wait for something to happen
    raise ScaleError(f"the job did not {what} within {timeout_s:.0f} s")


def laid_out_for(store_path: Path) -> int | None:
    """The number of records the store is laid out for (its ``n_records`` attribute; a job committing while it
    reads lays out a growing prefix of its records); None before the store exists."""
    try:
        return int(json.loads((store_path / "zarr.json").read_text())["attributes"]["n_records"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # not there yet, or being rewritten as it is read
        return None


def wait_for_chunks(proc: subprocess.Popen, store_path: Path, share: float, timeout_s: float,
                    n_records: int | None = None, reference: list[str] | None = None) -> bool:
    """Wait until at least ``share`` of the store's chunks are committed, and leave the job's process group stopped
    (SIGSTOP) in that state; False if the job ended first. With ``n_records``, the chunks of the store laid out
    for all of them (the last commit's layout, not an earlier one's). ``reference``: as ``held_chunks``'.

    The directory listing (``committed_chunks``) is quick but counts the chunks being written too (their
    fingerprint cleared to "" is a file as well); once it says enough, the job is stopped where it stands and
    the store's fingerprints read exactly (``held_chunks``): enough, and it stays stopped for the kill; not yet,
    and it goes on (SIGCONT). So the kill lands at a state that was looked at, never after the job ran on.
    """
    deadline = time.monotonic() + timeout_s

    def final() -> bool:
        return n_records is None or laid_out_for(store_path) == n_records

    def listed() -> bool:
        c = committed_chunks(store_path)
        return c is not None and c[1] > 0 and c[0] >= share * c[1] and final()

    while _poll(proc, listed, max(deadline - time.monotonic(), 0.0), f"write {share:.0%} of its chunks", 0.002):
        try:
            os.killpg(proc.pid, signal.SIGSTOP)
        except ProcessLookupError:  # it ended as it was looked at
            return False
        if proc.poll() is not None:  # its leader exited (what is left of the group finishes): not a kill
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            return False
        held = held_chunks(store_path, reference)
        if held and sum(held) >= share * len(held) and final():
            return True
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.002)  # a poll interval: the chunks being written commit in a few milliseconds
    return False


def fetched_records(request_log: Path, start: int) -> set[str]:
    """Records whose signal file (``.mat``) was fetched since byte ``start`` of the server's request log."""
    with open(request_log, "rb") as f:
        f.seek(start)
        lines = f.read().splitlines()
    out = set()
    for line in lines:
        if b'"GET ' in line:
            path = line.split(b'"GET ', 1)[1].split(b" ", 1)[0].decode(errors="replace")
            if path.endswith(".mat"):
                out.add(path.rsplit("/", 1)[-1][:-4])
    return out


def wait_for_fetches(proc: subprocess.Popen, request_log: Path, start: int, n: int, timeout_s: float) -> bool:
    """Poll the server's request log until ``n`` records' signal files were fetched since byte ``start``;
    False if the job ended first."""
    return _poll(proc, lambda: len(fetched_records(request_log, start)) >= n, timeout_s, f"fetch {n:,} records", 0.01)


def run_resume(url: str, n_records: int, work: Path, workers: int, chunk_size: int | None, timeout_s: float,
               request_log: Path, reference: Path | None, kill_at: float = 0.5, kill_in: str = "write",
               commit_records: int | None = None, debug: bool = False) -> ResumeResult:
    """A job killed by SIGKILL (its whole process group) half way, then run again on the same store and cache.

    Parameters
    ----------
    url, n_records
        The served tree and its number of recordings.
    kill_at
        How far the job gets before the kill: the share of its chunks written (``kill_in="write"``, as issue 37
        asks), or of the records fetched from the server (``kill_in="plan"``: half of the wall time, since the
        plan phase (download, read, transform) takes most of it).
    reference
        An uninterrupted store of the same tree to compare the resumed store with.
    """
    if kill_in not in ("write", "plan"):
        raise ValueError(f"kill_in: 'write' or 'plan', not {kill_in!r}")
    run = ChildRun(url, work / "resumed.zarr", work / "cache-resume", work / "resume.json", work / "resume.log",
                   workers, chunk_size, commit_records, debug)
    _, mark0 = count_requests(request_log)
    from ecg_pipeline.pipeline import store

    ref_fps = store.read_fingerprints(str(reference)) if reference is not None else None
    t0 = time.perf_counter()
    proc = run.start()
    try:
        if kill_in == "write":
            killed = wait_for_chunks(proc, run.out, kill_at, timeout_s, n_records, ref_fps)
        else:
            # Half the records fetched, and a first chunk committed: the resume then has a commit to start from
            # (which one lands first is a race on a small tree; both are waited on, as states).
            killed = (wait_for_fetches(proc, request_log, mark0, int(np.ceil(kill_at * n_records)), timeout_s)
                      and wait_for_chunks(proc, run.out, 1e-9, timeout_s, reference=ref_fps))
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_after_s = time.perf_counter() - t0
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wait_group_gone(proc.pid)
    if not killed:
        run.figures(proc)  # raises if it failed
        log.warning("the job finished before it was %.0f %% through its %s phase: no resume to measure",
                    kill_at * 100, kill_in)
        return ResumeResult(killed=False, pgid=proc.pid, kill_in=kill_in)
    held = held_chunks(run.out, ref_fps) or []  # none: killed before the store was laid out
    kept_at_kill = records_kept(run.out)
    _, mark = count_requests(request_log)
    fetched = len(fetched_records(request_log, mark0))
    log.info("killed after %.1f s with %d of %d chunks written, %d records fetched", kill_after_s, sum(held),
             len(held), fetched)
    figures = run.run(timeout_s)
    hea, _ = count_requests(request_log, mark, ".hea")
    table, _ = read_record_table(run.out)
    total = int(figures["chunks_total"])
    missing = np.ones(total, dtype=bool)
    missing[:len(held)] = ~np.asarray(held[:total], dtype=bool)
    needed = records_in_chunks(table["offset"].values, table["n_segments"].values, figures["chunk_size"], missing)
    if kept_at_kill is not None:  # the rows of the chunk being filled are kept too: those records are done
        needed = min(needed, int(figures["records"]) - kept_at_kill)
    written = int(figures["chunks_written"])
    records = int(figures["records"])
    result = ResumeResult(
        killed=True, pgid=proc.pid, kill_in=kill_in, kill_after_s=kill_after_s, chunks_total=total,
        chunks_at_kill=sum(held), chunks_written=written, chunks_redone=max(0, written - int(missing.sum())),
        records=records, records_planned=figures.get("records_planned"), records_reused=figures.get("records_reused"),
        records_needed=needed, records_done=records - needed if kill_in == "write" else fetched,
        hea_downloaded=hea, wall_s=float(figures["job_s"]), total_s=float(figures["total_s"]), figures=figures,
    )
    if reference is not None:
        result.difference = compare_stores(run.out, reference)
        result.identical = not result.difference
    return result


def run_case(n: int, work: Path, archive: Path, workers: int = 2, resume: bool = True, chunk_size: int | None = None,
             timeout_s: float | None = None, originals: Path | None = None, kill_at: float = 0.5,
             kill_in: str = "write", commit_records: int | None = None, debug: bool = False) -> CaseResult:
    """Build a tree of ``n`` recordings under ``work``, serve it, preprocess it in a child process and measure.

    Parameters
    ----------
    n
        Recordings in the tree.
    work
        Folder for the tree, the caches, the stores and the logs (created).
    archive
        The Challenge 2017 ``training2017.zip``.
    workers
        Dask worker processes of the local cluster (one thread each).
    resume
        Also run the killed-and-resumed job (``run_resume``).
    chunk_size
        Segments per chunk; None: the database's default (512).
    timeout_s
        Limit of each child job; default 600 s plus 50 ms a recording.
    originals
        Where the Challenge 2017 recordings are (or will be) extracted; default ``work / "_originals"``.
    kill_at, kill_in
        When the resume case's first job is killed (``run_resume``).
    debug
        The jobs log each commit (its records, chunks and duration) to their logs (kept with ``--keep``).

    Returns
    -------
    CaseResult
    """
    work.mkdir(parents=True, exist_ok=True)
    check_disk(work, tree_bytes(n) + run_bytes(n, resume), f"{n:,} recordings")
    timeout_s = timeout_s or 600.0 + 0.05 * n
    tree = make_tree(work / "tree", n, archive, originals)
    request_log = work / "http.log"
    with serve(tree.root, request_log) as url:
        full = ChildRun(url, work / "full.zarr", work / "cache", work / "full.json", work / "full.log", workers,
                        chunk_size, commit_records, debug)
        figures = full.run(timeout_s)
        log.info("%d recordings: job %.1f s", n, figures["job_s"])
        group_s = read_records_group(full.out)
        table, read_s = read_record_table(full.out)
        status_ok = int(np.count_nonzero(table["status"].values == "ok"))
        result = CaseResult(n, tree.build_s, figures, dir_bytes(full.out / "records"), read_s, group_s, status_ok)
        if resume:
            result.resume = run_resume(url, n, work, workers, chunk_size, timeout_s, request_log, full.out, kill_at,
                                       kill_in, commit_records, debug)
    return result


# -------------------------------------------------------------------------------------------------- reporting


def _mb(values: Sequence[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def case_text(c: CaseResult, workers: int) -> str:
    """The table printed for one N."""
    f = c.figures
    ph = f["phase_s"]
    lines = [
        f"{SIM_DB}: {c.n:,} recordings (Challenge 2017 copies over HTTP), {workers} workers, "
        f"{f['chunk_size']} windows a chunk",
        f"  tree built in                 {c.tree_build_s:8.1f} s   (not measured)",
        f"  wall time                     {f['total_s']:8.1f} s   (cluster start {f['cluster_s']:.1f} s, "
        f"job {c.job_s:.1f} s)",
        f"  records/s (job)               {c.n / c.job_s:8.1f}     {1000 * c.job_s / c.n:.2f} ms a record",
        "  phases                        " + ", ".join(f"{k} {v:.1f} s" for k, v in ph.items())
        + f"   (time to plan {ph.get('plan', float('nan')):.1f} s)",
        "  task-seconds per stage        " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(f.get("stage_s", {}).items(), key=lambda kv: -kv[1])[:6]),
        f"  records                       {f['records']:,} in the report, {c.status_ok:,} ok in the store's table, "
        f"{f['failed']:,} failed" + (f" {f['failure_causes']}" if f["failed"] else ""),
        f"  segments                      {f['n_segments']:,} in {f['chunks_total']} chunks",
        f"  summary printed               {f['summary_lines']} lines",
        f"  driver peak RSS               {c.driver_rss_mb:8,.0f} MB  (target <= {DRIVER_LIMIT_MB:,.0f})",
        f"  workers' peak RSS             {_mb(f['workers_rss_mb'])} MB",
        f"  per-record table              {c.table_bytes:,} B on disk ({c.table_bytes / c.n:.0f} B a record), "
        f"read in {c.table_read_s:.2f} s (open_store; the records group alone {c.group_read_s:.2f} s)",
    ]
    r = c.resume
    if r is not None and not r.killed:
        lines.append(f"  resume after SIGKILL          not measured: the job finished before it was half way through "
                     f"its {r.kill_in} phase" + (" (use --chunk-size)" if r.kill_in == "write" else ""))
    elif r is not None:
        planned = (f"{r.records_planned:,} / {r.records:,} ({r.records_planned / r.records:.1%})"
                   if r.records_planned is not None else "n/a (the report has no records_planned / records_read)")
        redo = f"{r.redo_share:.1%}" if r.redo_share is not None else "n/a"
        verdict = "" if r.redo_share is None else ("  ok" if r.redo_share <= REDO_LIMIT else "  OVER TARGET")
        lines += [
            f"  resume after SIGKILL          killed in the {r.kill_in} phase after {r.kill_after_s:.1f} s, "
            f"{r.chunks_at_kill} of {r.chunks_total} chunks written"
            + (f", {r.records_done:,} records fetched" if r.kill_in == "plan" else ""),
            f"    chunks written by resume    {r.chunks_written} / {r.chunks_total} "
            f"({r.chunks_written / max(r.chunks_total, 1):.0%}), {r.chunks_redone} of them held before the kill",
            f"    records read again          {planned}; {r.records - r.records_done:,} were left to do"
            + (f"; plans reused {r.records_reused:,}" if r.records_reused is not None else ""),
            f"    headers downloaded again    {r.hea_downloaded:,}",
            f"    work redone                 {redo}   (target <= {REDO_LIMIT:.0%}){verdict}",
            f"    resume wall time            {r.wall_s:.1f} s job ({r.total_s:.1f} s with cluster start) = "
            f"{r.wall_s / c.job_s:.2f} x the full run's job",
        ]
        if r.identical is not None:
            lines.append(f"    resumed store == uninterrupted store: {'yes' if r.identical else 'NO: ' + r.difference}")
    return "\n".join(lines)


def flatness_text(results: Sequence[CaseResult]) -> str:
    """Ratios largest-N / smallest-N of the job's wall time per record and of the driver's peak RSS."""
    lo, hi = min(results, key=lambda c: c.n), max(results, key=lambda c: c.n)
    if lo.n == hi.n:
        return "flatness: one N only, nothing to compare"
    per_record = (hi.job_s / hi.n) / (lo.job_s / lo.n)
    rss = hi.driver_rss_mb / lo.driver_rss_mb
    slope = (hi.driver_rss_mb - lo.driver_rss_mb) / (hi.n - lo.n) * 1000

    def flat(x: float) -> str:
        return "flat" if 1 / FLAT_TOLERANCE <= x <= FLAT_TOLERANCE else "NOT flat"

    text = (f"{hi.n:,} vs {lo.n:,} recordings: wall time per record x{per_record:.2f} ({flat(per_record)}), "
            f"driver peak RSS x{rss:.2f} ({flat(rss)}; {slope:+.1f} MB per 1,000 recordings, "
            f"{hi.driver_rss_mb:,.0f} MB at {hi.n:,}: {'within' if hi.driver_rss_mb <= DRIVER_LIMIT_MB else 'OVER'} "
            f"the {DRIVER_LIMIT_MB:,.0f} MB target)")
    if hi.n < EXTRAPOLATE_TO:  # small N hide a slope under the driver's fixed ~200 MB: say where it leads
        at = hi.driver_rss_mb + slope * (EXTRAPOLATE_TO - hi.n) / 1000
        text += f"; driver RSS extrapolated linearly to {EXTRAPOLATE_TO:,} recordings: {at:,.0f} MB"
    return text


# ------------------------------------------------------------------------------------------------ command line


def _child_args(argv: Sequence[str]) -> ChildRun:
    p = argparse.ArgumentParser(prog="scale.py --child")
    p.add_argument("--child", action="store_true")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--commit-records", type=int)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    return ChildRun(a.url, a.out, a.cache, a.result, Path(os.devnull), a.workers, a.chunk_size, a.commit_records,
                    a.debug)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:  # hidden: the job itself, in its own process
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        run = _child_args(argv)
        if run.debug:
            logging.getLogger("ecg_pipeline.jobs.preprocess").setLevel(logging.DEBUG)
        return child_main(run)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[1000], metavar="N",
                    help="tree sizes to measure, in recordings (default: 1000)")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes (default: 2)")
    ap.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help=f"PhysioNet mirror (default: {DEFAULT_MIRROR})")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure a job killed half way and resumed (default: on)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (trees, stores, logs)")
    ap.add_argument("--chunk-size", type=int, help="segments a chunk (default: the database's, 512)")
    ap.add_argument("--commit-records", type=int,
                    help="records read between two commits of the job (default: the job's, 1/50 of the records, "
                         "each commit at least 4 times its own duration after the last)")
    ap.add_argument("--kill-in", choices=("write", "plan"), default="write",
                    help="the resume case kills its job half way through the chunks written (write, the default) "
                         "or through the records fetched, in the plan phase (plan)")
    ap.add_argument("--timeout", type=float, help="limit of each job in seconds (default: 600 + 0.05 a recording)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log progress; the jobs log each commit to their logs in the work folder (see --keep)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    archive = args.mirror / SOURCE_DB / "1.0.0" / "training2017.zip"
    if not archive.is_file():
        print(f"no Challenge 2017 archive at {archive}: pass --mirror", file=sys.stderr)
        return 2
    sizes = sorted(set(args.records))
    work = args.work or Path(tempfile.mkdtemp(prefix="ecg-scale-"))
    results: list[CaseResult] = []
    try:
        check_disk(work, max(tree_bytes(n) + run_bytes(n, args.resume) for n in sizes),
                   f"up to {sizes[-1]:,} recordings")
        for n in sizes:
            case = work / f"n{n}"
            results.append(run_case(n, case, archive, args.workers, args.resume, args.chunk_size, args.timeout,
                                    originals=work / "_originals", kill_in=args.kill_in,
                                    commit_records=args.commit_records, debug=args.verbose))
            print(case_text(results[-1], args.workers), "\n", flush=True)
            if not args.keep:  # the next tree needs the space; the extracted originals are kept for it
                shutil.rmtree(case, ignore_errors=True)
    except ScaleError as exc:
        print(f"scale benchmark: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        elif args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "_originals", ignore_errors=True)
    print(flatness_text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
