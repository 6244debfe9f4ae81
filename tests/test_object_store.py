"""Every job on an S3-compatible object store: moto's server on 127.0.0.1 (what s3fs's own tests use), real
`dask scheduler` / `dask worker` processes that run as on other machines (their own working folder, HOME, cache
and TMPDIR), the endpoint given with `--storage-option`, the credentials in the environment as a cluster's would
be. Also: exclusive create and the job lease on S3, two jobs started at one instant on one `--out`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed; CI installs it with the test extra")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed; CI installs it (test extra)")

from helpers import dask_processes  # noqa: E402
from ecg_pipeline.pipeline import lease  # noqa: E402
from ecg_pipeline.pipeline.locations import locate  # noqa: E402

# refit_epochs 0: the refit as long as the best epoch; a small network: the point is where files go
TRAIN_CONFIG = "batch_size: 256\npatience: 5\nrefit_epochs: 0\nmodel_options: {width: 8, dense: 32}\n"
SPLIT = "train: ['208']\nval: ['119']\ntest: ['100']\n"


@dataclass(frozen=True)
class S3:
    endpoint: str
    fs: object

    @property
    def options(self) -> dict:
        # Credentials in the options too: this process's reads may run on the workers of a Dask cluster another
        # test started before the fixture set them in the environment (the options travel with the tasks).
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def cli(self) -> list[str]:
        return ["--storage-option", f"endpoint_url={self.endpoint}"]

    def ls(self, path: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 with a bucket ``ecg``; fake credentials in the environment of this
    process and of every process it starts (the server takes any)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with mock.patch.dict(os.environ, creds):
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            fs.mkdir("ecg")
            yield S3(endpoint, fs)
        finally:
            server.stop()


def _cli(*args, timeout=900, cwd=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def _ok(r, code=0):
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _no_url_folders(root) -> list[str]:
    """Paths under ``root`` whose name says a URL became a local folder (``s3:``)."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith("s3:")]


def test_exclusive_create_on_s3_has_one_winner(s3):
    """Eight writers at one instant (a barrier): exactly one creates the object, the others see it taken."""
    for _ in range(3):
        url = f"s3://ecg/race/{uuid.uuid4().hex}.lock"
        barrier = threading.Barrier(8)

        def create(i: int) -> bool:
            where = locate(url, s3.options)
            barrier.wait()
            return where.create(f"writer {i}".encode())

        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(create, range(8)))
        assert sum(won) == 1, won
        assert s3.fs.cat(url[len("s3://"):]) == f"writer {won.index(True)}".encode()


def test_the_lease_on_s3_refuses_a_second_job_started_at_the_same_instant(s3):
    out = f"s3://ecg/leases/{uuid.uuid4().hex}.zarr"
    barrier = threading.Barrier(2)

    def take(job: str):
        barrier.wait()
        try:
            return lease.acquire(out, job, storage_options=s3.options, heartbeat_s=3600)
        except lease.StoreBusy as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(take, ["first", "second"]))
    held = [g for g in got if isinstance(g, lease.Lease)]
    refused = [g for g in got if isinstance(g, lease.StoreBusy)]
    assert len(held) == 1 and len(refused) == 1, got
    assert "is being written by pid" in str(refused[0]) and out in str(refused[0])
    held[0].release()
    assert not s3.fs.exists(lease.lock_path(out)[len("s3://"):])
    again = lease.acquire(out, "third", storage_options=s3.options, heartbeat_s=3600)  # released: free again
    again.release()


@pytest.mark.realdata
@pytest.mark.slow
def test_two_preprocess_jobs_at_once_on_one_s3_store(s3, mirror, tmp_path):
    """Two `preprocess` commands started together on one s3:// --out: exactly one runs, the other exits 2 with
    one line, and the store opens whole."""
    out = f"s3://ecg/{tmp_path.name}/race.zarr"
    args = ["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100", "--out", out, "--workers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", *s3.cli]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.returncode, o, e) for p in procs for o, e in [p.communicate(timeout=600)]]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(e for code, _, e in results if code == 2)
    errors = [line for line in refused.splitlines() if line.startswith("ecg-pipeline: error:")]
    assert len(errors) == 1 and "is being written by pid" in errors[0] and "Traceback" not in refused, refused
    from ecg_pipeline.pipeline.store import open_dataset

    ds = open_dataset(out, storage_options=s3.options)
    assert list(ds.record_id.values) == ["100"] and ds.sizes["segment"] > 2000


@pytest.mark.realdata
@pytest.mark.slow
def test_every_job_on_s3_with_workers_on_other_machines(s3, mirror, tmp_path):
    """preprocess -> train -> evaluate -> score -> plot -> inspect, every path an s3:// URL (the configuration
    and split files too), on `dask worker` processes in their own folders: the run folder, scores and plots land
    in the bucket, nothing named `s3:` appears on any local disk, and the scores equal a local run's."""
    pytest.importorskip("tensorflow")
    base = f"s3://ecg/{tmp_path.name}"
    s3.fs.pipe(f"{base}/train.yaml"[len("s3://"):], TRAIN_CONFIG.encode())
    s3.fs.pipe(f"{base}/split.yaml"[len("s3://"):], SPLIT.encode())
    driver = tmp_path / "driver"
    driver.mkdir()
    store, run, scores = f"{base}/mitdb.zarr", f"{base}/runs/r1", f"{base}/scores.zarr"
    records = mirror / "mitdb" / "1.0.0"
    with dask_processes(tmp_path, n_workers=2, own_homes=True) as sched:
        cluster = ["--scheduler-file", str(sched)]
        pre = ["preprocess", "mitdb", "--source", mirror.as_uri(), "--records", "100,119,208", "--no-progress",
               *cluster]
        _ok(_cli(*pre, "--out", store, *s3.cli, cwd=driver))
        _ok(_cli(*pre, "--out", store, "--report", f"{base}/resume.json", *s3.cli, cwd=driver))  # resumes: no chunk
        resumed = json.loads(s3.fs.cat(f"{base}/resume.json"[len("s3://"):]))
        assert resumed["chunks_written"] == 0 and resumed["chunks_skipped"] == resumed["chunks_total"] > 0
        _ok(_cli(*pre, "--out", str(tmp_path / "local.zarr"), cwd=driver))
        r = _ok(_cli("train", "--store", store, "--split", f"{base}/split.yaml", "--config", f"{base}/train.yaml",
                     "--epochs", "1", "--out", run, "--resources", "none", *cluster, *s3.cli, cwd=driver))
        assert run in r.stdout
        _ok(_cli("evaluate", "--model", f"{run}/model.keras", "--store", store, "--out", f"{base}/eval", *s3.cli,
                 cwd=driver))
        _ok(_cli("score", "--model", f"{run}/model.keras", "--input", str(records), "--records", "119",
                 "--out", scores, "--no-progress", *cluster, *s3.cli, cwd=driver))
        local = tmp_path / "local-scores.zarr"
        model = tmp_path / "model.keras"
        s3.fs.get(f"{run}/model.keras"[len("s3://"):], str(model))
        _ok(_cli("score", "--model", str(model), "--input", str(records), "--records", "119", "--out", str(local),
                 "--no-progress", *cluster, cwd=driver))
    r = _ok(_cli("plot", scores, "--record", "119", "--out", f"{base}/plots", *s3.cli, cwd=driver))
    assert f"{base}/plots/scores-119-overview.png" in r.stdout
    _ok(_cli("plot", store, "--no-waveforms", "--out", f"{base}/plots", *s3.cli, cwd=driver))
    r = _ok(_cli("inspect", scores, *s3.cli, cwd=driver))
    assert "119" in r.stdout
    r = _ok(_cli("inspect", str(local), *s3.cli, cwd=driver))  # a local store in a job with storage options
    assert "119" in r.stdout

    assert {"model.keras", "checkpoint.keras", "run.json", "metrics.json", "curves.png", "split.json",
            "config.yaml", "train_state.json"} <= set(s3.ls(run[len("s3://"):]))
    assert {"metrics.json", "classification_report.txt"} <= set(s3.ls(f"{base}/eval"[len("s3://"):]))
    assert {"scores.zarr", "scores.records.csv", "scores.metrics.json"} <= set(s3.ls(base[len("s3://"):]))
    assert {"scores-119-overview.png", "mitdb-gallery.png"} <= set(s3.ls(f"{base}/plots"[len("s3://"):]))
    assert _no_url_folders(tmp_path) == []

    import xarray as xr

    from ecg_pipeline.pipeline.scores import open_scores
    from ecg_pipeline.pipeline.store import open_dataset

    xr.testing.assert_identical(open_dataset(store, storage_options=s3.options).drop_attrs(),
                                open_dataset(str(tmp_path / "local.zarr")).drop_attrs())

    remote, here = open_scores(scores, storage_options=s3.options), open_scores(str(local))
    np.testing.assert_array_equal(remote.anchor.values, here.anchor.values)
    np.testing.assert_array_equal(remote.probability.values, here.probability.values)
    assert remote.attrs["model"] == f"{run}/model.keras" and remote.attrs["model_sha256"] == here.attrs["model_sha256"]


def test_a_missing_model_on_s3_is_named_by_its_url(s3, tmp_path):
    r = _cli("score", "--model", "s3://ecg/nowhere/model.keras", "--input", str(tmp_path), "--out",
             f"s3://ecg/{tmp_path.name}/s.zarr", *s3.cli, cwd=tmp_path)
    assert r.returncode == 2 and "no model file at s3://ecg/nowhere/model.keras" in r.stderr, r.stderr[-2000:]
    assert _no_url_folders(tmp_path) == []
