"""Test helpers: a real HTTP server on 127.0.0.1 and synthetic WFDB databases."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "physionet"


@dataclass
class Faults:
    """Faults the test server injects (it is a real server; these are its settings)."""

    fail_first: dict[str, int] = field(default_factory=dict)  #: path suffix -> 503s before serving
    corrupt: set[str] = field(default_factory=set)  #: path suffixes served with one flipped byte
    requests: list[str] = field(default_factory=list)  #: GET paths, in order
    heads: list[str] = field(default_factory=list)  #: HEAD paths, in order


class _Handler(http.server.SimpleHTTPRequestHandler):
    faults: Faults

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self.faults.heads.append(self.path)
        super().do_HEAD()

    def do_GET(self):
        self.faults.requests.append(self.path)
        for suffix, n in list(self.faults.fail_first.items()):
            if self.path.endswith(suffix) and n > 0:
                self.faults.fail_first[suffix] = n - 1
                self.send_error(503, "injected transient failure")
                return
        if any(self.path.endswith(s) for s in self.faults.corrupt):
            path = Path(self.translate_path(self.path))
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(bytes(data))
            return
        super().do_GET()


class HTTPMirror:
    """Serve a folder on an ephemeral 127.0.0.1 port from a background thread."""

    def __init__(self, root: Path, faults: Faults | None = None):
        self.faults = faults or Faults()
        handler = type("Handler", (_Handler,), {"faults": self.faults})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HTTPMirror":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_record(
    folder: Path,
    name: str,
    *,
    fs: float = 360.0,
    seconds: float = 20.0,
    leads: tuple[str, ...] = ("MLII", "V1"),
    beats: np.ndarray | None = None,
    symbols: list[str] | None = None,
    seed: int = 0,
    custom_labels=None,
) -> dict:
    """Write a synthetic two-lead record with one R-like spike per annotated beat.

    Returns the beat samples and symbols that were annotated.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * fs)
    if beats is None:
        beats = np.arange(int(0.1 * fs), n - 10, int(0.8 * fs))
    if symbols is None:
        symbols = ["N"] * len(beats)
    t = np.arange(n)
    sig = 0.05 * rng.standard_normal((n, len(leads)))
    for b in beats:
        sig[:, :] += np.exp(-0.5 * ((t - b) / 4.0) ** 2)[:, None]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=sig,
                fmt=["212"] * len(leads), write_dir=str(folder))
    wfdb.wrann(name, "atr", np.asarray(beats), np.asarray(symbols), write_dir=str(folder),
               custom_labels=custom_labels)
    return {"sample": np.asarray(beats), "symbol": list(symbols), "sig_len": n}


def write_sums(folder: Path, exclude: tuple[str, ...] = ()) -> None:
    """Write SHA256SUMS.txt for every file in ``folder`` (as PhysioNet does)."""
    lines = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != "SHA256SUMS.txt" and p.name not in exclude:
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}")
    (folder / "SHA256SUMS.txt").write_text("\n".join(lines) + "\n")


def make_db(root: Path, records: dict[str, dict], version: str = "0.0.1", sums: bool = True) -> Path:
    """A synthetic ``mitdb/<version>`` folder under ``root``; returns the folder.

    ``records`` maps record names to ``write_record`` keyword arguments.
    """
    folder = root / "mitdb" / version
    folder.mkdir(parents=True, exist_ok=True)
    for name, kwargs in records.items():
        write_record(folder, name, **kwargs)
    (folder / "RECORDS").write_text("\n".join(records) + "\n")
    if sums:
        write_sums(folder)
    return folder


@contextlib.contextmanager
def dask_processes(tmp_path: Path, n_workers: int = 2, resources: str | None = None, own_homes: bool = False):
    """Run `dask scheduler` and `dask worker` as separate processes on 127.0.0.1; yield the scheduler file.

    The `dask` commands themselves are the child processes (not a shell chain), so
    terminating them stops the cluster. ``own_homes``: the workers run as on another machine, in their own
    working folder (``tmp_path/worker``) with their own HOME, XDG_CACHE_HOME and TMPDIR under it.
    """
    bin_dir = Path(sys.executable).parent
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    worker_env, worker_cwd = env, None
    if own_homes:
        worker_cwd = tmp_path / "worker"
        for sub in ("home", "cache", "tmp"):
            (worker_cwd / sub).mkdir(parents=True, exist_ok=True)
        worker_env = {**env, "HOME": str(worker_cwd / "home"), "XDG_CACHE_HOME": str(worker_cwd / "cache"),
                      "TMPDIR": str(worker_cwd / "tmp")}
        worker_env.pop("ECG_PIPELINE_CACHE", None)
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        extra = ["--resources", resources] if resources else []
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", "--scheduler-file", str(sched_file),
                                       "--nworkers", str(n_workers), "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1", "--local-directory", str(tmp_path / "dask-worker-space"),
                                       *extra],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=worker_env,
                                      cwd=worker_cwd))
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=60) as c:
            c.wait_for_workers(n_workers, timeout=120)
        yield sched_file
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def assert_same_spectrograms(a: np.ndarray, b: np.ndarray, max_share: float = 1e-3, atol: float = 2 ** -7) -> None:
    """``a`` equals ``b`` but for float32 rounding: a few values a float16 step or two apart, the rest equal.

    The STFT's matrix products round by batch: OpenBLAS picks its kernels by the shape of the product (how
    many windows a call holds, how many threads), so a window transformed among other windows can differ from
    itself transformed alone in the last float32 bits. Where a bin's magnitude is small beside its window's
    energy (cancellation), the log shows that: measured here, 32 of 360,768 stored float16 values of record
    114 one or two steps apart (up to 0.0039 at -7.6). A wrong window, STFT parameter or offset moves most
    values by far more.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    off = np.abs(a - b)
    assert off.max(initial=0.0) <= atol, f"values differ by up to {off.max():.4g}"
    assert (off > 0).mean() <= max_share, f"{(off > 0).mean():.2%} of the values differ"


def as_flat_store(src: Path, dst: Path, version: int, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the store ``src`` laid out as schema versions 2 to 4 wrote it: one flat group (the segment arrays
    at the root, the table as ``record_id`` and ``record_<name>``), attributes as plain JSON objects, ``drop``
    arrays and their attributes left out, ``schema_version`` set to ``version``."""
    import json
    import shutil

    from ecg_pipeline.pipeline import store

    shutil.copytree(src, dst)
    for group, rename in ((store.SEGMENTS, lambda n: n), (store.RECORDS, store.flat_name)):
        for child in sorted((dst / group).iterdir()):
            if not child.is_dir():
                continue
            if child.name in drop:
                shutil.rmtree(child)
                continue
            meta = json.loads((child / "zarr.json").read_text())
            meta["dimension_names"] = ["record_id" if d == "record" else d for d in meta["dimension_names"]]
            (child / "zarr.json").write_text(json.dumps(meta))
            child.rename(dst / rename(child.name))
        shutil.rmtree(dst / group)
    root = json.loads((dst / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    attrs = store.decode_attrs(root["attributes"])
    for name in drop:
        attrs.pop(name, None)
    root["attributes"] = {**attrs, "schema_version": version}
    (dst / "zarr.json").write_text(json.dumps(root))
    return dst
