"""Fault injection, job layer (issue 15, classes 2 and 3): workers that must die with a killed driver, and one
writer per output store. Everything runs for real: `ecg-pipeline` commands as subprocesses, SIGKILL and SIGINT,
a loopback HTTP server whose gate holds a job at a known point. Every wait is on an observable state (a lease
file, a worker process, a mapped library, a committed record), bounded by a generous timeout."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from helpers import make_db
from ecg_pipeline.pipeline import lease

PY = sys.executable
TIMEOUT = 300  #: generous bound of every wait on a state


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start(args, log: Path) -> subprocess.Popen:
    """``ecg-pipeline ARGS`` in the background, output to ``<log>.out/.err`` (files: nobody reads a pipe)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        # SIGINT at its default: a shell without job control starts background commands (a test run with `&`)
        # with SIGINT ignored, children inherit that, and then Python installs no KeyboardInterrupt handler.
        return subprocess.Popen([PY, "-m", "ecg_pipeline.jobs.cli", *args], stdout=out, stderr=err, text=True,
                                env=_env(), preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _output(log: Path) -> str:
    return Path(f"{log}.out").read_text()[-3000:] + Path(f"{log}.err").read_text()[-3000:]


def _wait_for(what: str, condition, proc: subprocess.Popen | None = None, log: Path | None = None,
              timeout: float = TIMEOUT):
    """Poll ``condition()`` until it is truthy (and return it), while ``proc`` runs; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if proc is not None:
            assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{_output(log) if log else ''}"
        assert time.monotonic() < end, f"no {what} in {timeout} s:\n{_output(log) if log else ''}"
        time.sleep(0.05)


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids) -> list[str]:
    """The processes of ``pids`` still running (a zombie waiting for PID 1 to reap it has exited)."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} (ppid {p.ppid()}, {p.memory_info().rss >> 20} MB): {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_all_exit(pids, within: float = 60.0) -> None:
    end = time.monotonic() + within
    while _alive(pids):
        if time.monotonic() > end:
            left = _alive(pids)
            for pid in pids:  # do not leave them to the next test
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail(f"{len(left)} process(es) of the killed driver still alive after {within} s: {left}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------------
# workers die with their driver

DRIVER = '''
import os, pathlib, sys, time
from ecg_pipeline.pipeline.cluster import dask_client


def busy(path):
    pathlib.Path(path).write_text(str(os.getpid()))
    while True:  # a task that never ends, as a long model load or record does
        time.sleep(0.05)


if __name__ == "__main__":
    method, folder = sys.argv[1], pathlib.Path(sys.argv[2])
    with dask_client(n_workers=2, dashboard_address=None, start_method=method) as client:
        # A process holding every descriptor of the driver, as a worker forked after its siblings does: it keeps
        # the write ends of the workers' parent-alive pipes open, so distributed's own guard never fires.
        holder = os.fork()
        if holder == 0:
            time.sleep(3600)
            os._exit(0)
        (folder / "holder.pid").write_text(str(holder))
        futures = [client.submit(busy, str(folder / f"task-{i}"), pure=False) for i in range(2)]
        time.sleep(3600)
'''


def _heartbeat_filter_in_worker(dask_worker):
    """In a worker: its heartbeat filter, and what it does with a heartbeat failure now and once closing."""
    import logging

    from distributed.core import Status

    from ecg_pipeline.pipeline.cluster import DropClosingHeartbeatFailure

    found = [f for f in logging.getLogger("distributed.worker").filters if isinstance(f, DropClosingHeartbeatFailure)]
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0,
                               "Failed to communicate with scheduler during heartbeat.", None, None)
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, "Worker stream died", None, None)
    running = found[0].filter(record) if found else None
    closing = DropClosingHeartbeatFailure(type("W", (), {"status": Status.closing})())
    return {"n": len(found), "follows_this_worker": bool(found) and found[0].worker is dask_worker,
            "kept_while_running": running, "dropped_while_closing": not closing.filter(record),
            "other_kept_while_closing": closing.filter(other)}


def test_local_workers_drop_only_the_heartbeat_race_of_their_own_close():
    """Every local worker drops the "Failed to communicate with scheduler during heartbeat" traceback that an
    orderly close can race into (dask/distributed#7105), and only while it is closing."""
    from ecg_pipeline.pipeline.cluster import dask_client

    with dask_client(n_workers=2, dashboard_address=None) as client:
        seen = client.run(_heartbeat_filter_in_worker)
    assert len(seen) == 2
    for worker, found in seen.items():
        assert found == {"n": 1, "follows_this_worker": True, "kept_while_running": True,
                         "dropped_while_closing": True, "other_kept_while_closing": True}, (worker, found)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_local_workers_exit_when_their_driver_is_killed(tmp_path, method):
    """Both workers busy in a task, their parent-alive pipes held open by another process: SIGKILL the driver and
    both exit (before the fix they stayed, re-parented to PID 1, for as long as the holder lived)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    log = tmp_path / "driver"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        driver = subprocess.Popen([PY, str(tmp_path / "driver.py"), method, str(tmp_path)], stdout=out, stderr=err)
    holder = None
    try:
        # A task's file exists from the moment its worker opens it, before its pid is written: wait for the pids.
        _wait_for("two busy tasks", lambda: all((tmp_path / f"task-{i}").exists() and
                                                (tmp_path / f"task-{i}").read_text().strip() for i in range(2)),
                  driver, log)
        holder = int(_wait_for("the holder", lambda: (tmp_path / "holder.pid").exists() and
                               (tmp_path / "holder.pid").read_text(), driver, log))
        workers = {int((tmp_path / f"task-{i}").read_text()) for i in range(2)}
        assert workers <= _descendants(driver.pid)
        processes = _descendants(driver.pid) - {holder}
        driver.kill()
        assert driver.wait(timeout=60) == -signal.SIGKILL
        _assert_all_exit(workers, within=30)
        assert "its driver (pid %d) is gone; exiting" % driver.pid in Path(f"{log}.err").read_text()
        # Whatever else the driver started (spawn: multiprocessing's resource tracker) ends once the holder does.
        os.kill(holder, signal.SIGKILL)
        _assert_all_exit(processes, within=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        if holder:
            try:
                os.kill(holder, signal.SIGKILL)
            except OSError:
                pass


def _records_committed(out: Path) -> int:
    try:
        return int(zarr.open_group(str(out), mode="r", use_consolidated=False).attrs.get("n_records", 0))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return 0


def _maps_tensorflow(pids) -> bool:
    """Some process of ``pids`` has begun loading the model: TensorFlow's native library is mapped in it."""
    for pid in pids:
        try:
            if "tensorflow" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            pass
    return False


SCORE_RECORDS = "100,101,103,105,106,108,109,111"


@pytest.mark.realdata
@pytest.mark.parametrize("moment", ["worker-started", "model-loading", "first-commit"])
def test_score_workers_exit_when_the_driver_is_killed(untrained_model, mirror, tmp_path, moment):
    """SIGKILL `ecg-pipeline score` once its first worker process exists, once a worker has begun loading the model,
    or once a first record is committed: every process the driver started is gone within a bounded time."""
    (tmp_path / "score.yaml").write_text("piece_s: 60\nflush_s: 0\n")
    out = tmp_path / "s.zarr"
    log = tmp_path / "driver"
    driver = _start(["score", "--model", str(untrained_model), "--input", str(mirror / "mitdb" / "1.0.0"),
                     "--records", SCORE_RECORDS, "--out", str(out), "--config", str(tmp_path / "score.yaml"),
                     "--workers", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")], log)
    seen: set[int] = set()

    def reached() -> bool:
        seen.update(_descendants(driver.pid))
        if moment == "worker-started":
            return bool(seen)
        if moment == "model-loading":
            return _maps_tensorflow(seen)
        return _records_committed(out) >= 1

    try:
        _wait_for(moment, reached, driver, log)
        seen.update(_descendants(driver.pid))
        driver.kill()
        assert driver.wait(timeout=60) == -signal.SIGKILL, _output(log)
        assert seen
        _assert_all_exit(seen, within=60)
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.realdata
def test_preprocess_workers_exit_when_the_driver_is_killed(mirror, tmp_path):
    out = tmp_path / "p.zarr"
    log = tmp_path / "driver"
    driver = _start(["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100,101,103,105", "--out",
                     str(out), "--workers", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")], log)
    seen: set[int] = set()
    try:
        # Killed once the store exists: its workers have planned records and write chunks.
        _wait_for("a store", lambda: seen.update(_descendants(driver.pid)) or (out / "zarr.json").exists(), driver, log)
        seen.update(_descendants(driver.pid))
        driver.kill()
        assert driver.wait(timeout=60) == -signal.SIGKILL
        assert seen
        _assert_all_exit(seen, within=60)
    finally:
        if driver.poll() is None:
            driver.kill()


# ---------------------------------------------------------------------------------------------------------------------
# one writer per output


class GatedMirror:
    """A folder served on 127.0.0.1 whose every request waits until ``open()``: a job reading from it is held at its
    first request (the listing), with its lease taken, for as long as the test needs."""

    def __init__(self, root: Path):
        self.gate = threading.Event()
        self.requests: list[str] = []
        gate, requests = self.gate, self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requests.append(self.path)
                gate.wait(TIMEOUT)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def open(self) -> None:
        self.gate.set()

    def __enter__(self) -> "GatedMirror":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


BUSY = re.compile(r"^ecg-pipeline: error: (?P<out>\S+) is being written by pid (?P<pid>\d+) on host (?P<host>\S+) "
                  r"\((?P<command>ecg-pipeline (preprocess|score) .+), since \d\d:\d\d:\d\d UTC\); wait for it or stop "
                  r"it \(lease: (?P<lease>\S+)\)$")


def _refusal(r: subprocess.CompletedProcess) -> re.Match:
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, before any work (no cluster was started: no dashboard line)
    m = BUSY.match(lines[0])
    assert m, lines[0]
    return m


def _lease_of(out: Path) -> Path:
    return Path(lease.lock_path(str(out)))


@pytest.mark.realdata
def test_a_second_preprocess_of_the_same_store_is_refused_and_the_first_ends_clean(mirror, tmp_path):
    out = tmp_path / "same.zarr"
    common = ["--workers", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    with GatedMirror(mirror) as gated:
        log = tmp_path / "first"
        first = _start(["preprocess", "mitdb", "--source", gated.url, "--records", "100,101,103,105", "--out", str(out),
                        *common], log)
        _wait_for("the first job's lease", _lease_of(out).exists, first, log)
        held = json.loads(_lease_of(out).read_text())
        assert held["pid"] == first.pid and held["host"] == socket.gethostname() and held["job"] == "preprocess"
        assert held["command"].startswith("ecg-pipeline preprocess mitdb")
        second = _run(["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100,101,103", "--out",
                       str(out), *common, "--cache-dir", str(tmp_path / "cache2")])
        m = _refusal(second)
        assert int(m["pid"]) == first.pid and m["out"] == str(out) and m["lease"] == str(_lease_of(out))
        assert "--records 100,101,103,105" in m["command"]
        assert first.poll() is None  # held at the gate all along: the refusal came while it wrote
        gated.open()
        assert first.wait(timeout=TIMEOUT) == 0, _output(log)
    assert not _lease_of(out).exists()  # released at the end

    from ecg_pipeline.pipeline.store import open_dataset

    ds = open_dataset(str(out))  # the schema, the record table tiling the segments
    assert list(ds.record_id.values) == ["100", "101", "103", "105"] and set(ds.record_status.values) == {"ok"}
    # Equal to a clean run of the same records.
    clean = tmp_path / "clean.zarr"
    r = _run(["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100,101,103,105", "--out", str(clean),
              *common])
    assert r.returncode == 0, r.stderr[-3000:]
    ref = open_dataset(str(clean))
    assert ds.sizes == ref.sizes
    np.testing.assert_array_equal(ds.spectrogram.values, ref.spectrogram.values)
    np.testing.assert_array_equal(ds.label.values, ref.label.values)
    np.testing.assert_array_equal(ds.record_n_segments.values, ref.record_n_segments.values)


@pytest.mark.realdata
def test_a_second_identical_score_job_is_refused(untrained_model, mirror, tmp_path):
    out = tmp_path / "s.zarr"
    with GatedMirror(mirror) as gated:
        args = ["score", "--model", str(untrained_model), "--input", gated.url + "mitdb/1.0.0/", "--records", "100,101",
                "--out", str(out), "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
        log = tmp_path / "first"
        first = _start(args, log)
        _wait_for("the first job's lease", _lease_of(out).exists, first, log)
        m = _refusal(_run(args))
        assert int(m["pid"]) == first.pid and m["command"].startswith("ecg-pipeline score --model")
        assert first.poll() is None
        gated.open()
        assert first.wait(timeout=TIMEOUT) == 0, _output(log)
    assert not _lease_of(out).exists()
    from ecg_pipeline.pipeline.scores import open_scores

    ds = open_scores(str(out))
    assert sorted(ds.record_id.values) == ["100", "101"] and set(ds.record_status.values) == {"ok"}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _write_lease(out: Path, **fields) -> None:
    now = time.time()
    info = lease.LeaseInfo(**{"pid": _dead_pid(), "host": socket.gethostname(), "command": "ecg-pipeline preprocess "
                              "mitdb --out old", "job": "preprocess", "out": str(out), "started": now - 60,
                              "heartbeat": now - 30, "token": "0" * 32, **fields})
    _lease_of(out).write_text(info.to_json())


def test_a_lease_left_by_a_dead_job_is_taken_over_with_a_message(tmp_path):
    make_db(tmp_path / "src", {"100": {"seconds": 20}, "101": {"seconds": 20, "seed": 1}})
    out = tmp_path / "s.zarr"
    _write_lease(out)
    r = _run(["preprocess", "mitdb", "--source", str(tmp_path / "src"), "--version", "0.0.1", "--out", str(out),
              "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(rf"taking over the lease of {re.escape(str(out))} from pid \d+ on host \S+ \(ecg-pipeline "
                     r"preprocess mitdb --out old, since [\d:]+ UTC\): that process is no longer running", r.stderr), r.stderr
    assert not _lease_of(out).exists()
    assert not list(tmp_path.glob("s.zarr.lock*"))  # nothing of the old lease or of temporary files left


def test_leases_live_stale_by_heartbeat_and_renewed(tmp_path):
    out = tmp_path / "s.zarr"
    # Another host's job, heartbeat fresh: refused (its pid means nothing here).
    _write_lease(out, host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(lease.StoreBusy, match=r"s.zarr is being written by pid 1 on host elsewhere"):
        with lease.hold(str(out), "score"):
            pass
    # Its heartbeat older than the limit: taken over.
    _write_lease(out, host="elsewhere", pid=1, heartbeat=time.time() - 3 * lease.STALE_S)
    with lease.hold(str(out), "score", heartbeat_s=0.05) as held:
        assert json.loads(_lease_of(out).read_text())["token"] == held.info.token
        first = held.info.heartbeat
        _wait_for("a heartbeat", lambda: json.loads(_lease_of(out).read_text())["heartbeat"] > first)
        with lease.hold(str(out), "score") as again:  # re-entrant within a process
            assert again is held
        assert _lease_of(out).exists()
    assert not _lease_of(out).exists()
    # A live process of this host: refused whatever its heartbeat says... unless that is older than the limit.
    with lease.hold(str(out), "preprocess"):
        r = subprocess.run([PY, "-c", f"from ecg_pipeline.pipeline import lease\nwith lease.hold({str(out)!r}, 'score'): "
                            "pass"], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "StoreBusy" in r.stderr and f"pid {os.getpid()}" in r.stderr


def test_the_lease_is_released_when_a_job_fails(untrained_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    out = tmp_path / "s.zarr"
    r = _run(["score", "--model", str(untrained_model), "--input", str(folder), "--out", str(out), "--workers", "1",
              "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert r.returncode == 2 and "no WFDB records" in r.stderr, r.stderr[-3000:]
    assert not _lease_of(out).exists() and not out.exists()  # no lease, no store
    r = _run(["preprocess", "mitdb", "--source", str(folder), "--out", str(out), "--workers", "1", "--no-progress",
              "--cache-dir", str(tmp_path / "cache")])
    assert r.returncode == 2, r.stderr[-3000:]
    assert not _lease_of(out).exists()


@pytest.mark.realdata
def test_the_lease_is_released_on_ctrl_c(mirror, tmp_path):
    out = tmp_path / "s.zarr"
    with GatedMirror(mirror) as gated:
        log = tmp_path / "job"
        job = _start(["preprocess", "mitdb", "--source", gated.url, "--records", "100", "--out", str(out), "--workers",
                      "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")], log)
        _wait_for("the lease", _lease_of(out).exists, job, log)
        _wait_for("a request at the gate", lambda: gated.requests, job, log)
        job.send_signal(signal.SIGINT)
        assert job.wait(timeout=TIMEOUT) == 130, _output(log)
        assert "ecg-pipeline: interrupted" in Path(f"{log}.err").read_text()
    assert not _lease_of(out).exists()


# ---------------------------------------------------------------------------------------------------------------------
# a full disk: the summary counts what was written


@pytest.mark.realdata
def test_a_disk_that_refuses_writes_fails_the_records_counts_nothing_and_a_rerun_resumes(mirror, tmp_path):
    import resource

    config = tmp_path / "c.yaml"
    config.write_text("store:\n  chunk_size: 512\n")
    args = ["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100,101,103", "--config", str(config),
            "--workers", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    clean = _run([*args, "--out", str(tmp_path / "clean.zarr")])  # also fills the download cache
    assert clean.returncode == 0, clean.stdout + clean.stderr
    chunks = sorted(p.stat().st_size for p in (tmp_path / "clean.zarr" / "segments" / "spectrogram").rglob("c/*/0/0"))
    # A file size limit (RLIMIT_FSIZE, inherited by the workers) between the last, partial chunk and the full ones:
    # every full chunk write fails with EFBIG as on a full disk; the store's metadata and the table still fit.
    limit = (chunks[0] + chunks[1]) // 2
    assert chunks[0] < limit < chunks[1] and len(chunks) == 13, chunks

    def capped():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = tmp_path / "s.zarr"
    full = subprocess.run([PY, "-m", "ecg_pipeline.jobs.cli", *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env=_env(), preexec_fn=capped)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "records     0 done, 3 failed" in full.stdout and "segments    0 " in full.stdout, full.stdout
    assert "per class   N 0   S 0   V 0   F 0   Q 0" in full.stdout, full.stdout  # not the planned beats
    assert full.stdout.count("OSError: [Errno 27] File too large") == 3, full.stdout
    from ecg_pipeline.pipeline.store import open_dataset

    ds = open_dataset(str(out), require_complete=False)
    assert set(ds.record_status.values) == {"failed"} and not any(ds.attrs["segments_per_class"].values())
    # The same command with room to write finishes the store, equal to the clean run.
    again = _run([*args, "--out", str(out)])
    assert again.returncode == 0 and "already there 1" in again.stdout, again.stdout + again.stderr
    a, b = open_dataset(str(out)), open_dataset(str(tmp_path / "clean.zarr"))
    assert a.attrs["segments_per_class"] == b.attrs["segments_per_class"]
    np.testing.assert_array_equal(a.spectrogram.values, b.spectrogram.values)
    np.testing.assert_array_equal(a.label.values, b.label.values)


@pytest.mark.realdata
def test_a_worker_lost_while_the_model_is_sent_costs_only_redone_work(untrained_model, mirror, tmp_path):
    """`dask scheduler` + `dask worker` processes; SIGKILL a worker once it has begun loading the model (the
    broadcast of the model plugin is then still waiting for it): the job sends the model again, ends with 0, and
    its store equals a clean run's."""
    from distributed import Client

    from helpers import dask_processes
    from ecg_pipeline.pipeline.scores import open_scores

    args = ["score", "--model", str(untrained_model), "--input", str(mirror / "mitdb" / "1.0.0"), "--records",
            "100,101", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    with dask_processes(tmp_path, n_workers=2) as sched:
        with Client(scheduler_file=str(sched), timeout=60) as c:
            pids = list(c.run(os.getpid).values())
        log = tmp_path / "driver"
        driver = _start([*args, "--out", str(tmp_path / "a.zarr"), "--scheduler-file", str(sched)], log)
        try:
            victim = _wait_for("a worker loading the model",
                               lambda: next((p for p in pids if _maps_tensorflow([p])), None), driver, log)
            os.kill(victim, signal.SIGKILL)
            assert driver.wait(timeout=600) == 0, _output(log)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert "lost while the model was being sent" in _output(log)
        clean = _run([*args, "--out", str(tmp_path / "b.zarr"), "--scheduler-file", str(sched)])
        assert clean.returncode == 0, clean.stderr[-3000:]
    got, ref = open_scores(str(tmp_path / "a.zarr")), open_scores(str(tmp_path / "b.zarr"))
    assert set(got.record_status.values) == {"ok"} and sorted(got.record_id.values) == ["100", "101"]
    for rec in ("100", "101"):  # records are committed in the order they finish
        a, b = got.record.values == rec, ref.record.values == rec
        np.testing.assert_array_equal(got.anchor.values[a], ref.anchor.values[b])
        np.testing.assert_array_equal(got.probability.values[a], ref.probability.values[b])
