"""The preprocess job on the real MIT-BIH Arrhythmia Database (../shared/physionet), downloaded over
real loopback HTTP: every beat accounted for, a real `dask scheduler` + `dask worker`, and a killed job
that resumes to the same content."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import wfdb
import xarray as xr

from helpers import HTTPMirror, assert_same_spectrograms, dask_processes
from ecg_pipeline.pipeline import detect, segment, spectrogram, store
from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def http(mirror):
    with HTTPMirror(mirror) as srv:
        yield srv


@pytest.fixture(scope="module")
def full_run(http, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    r = _cli("preprocess", "mitdb", "--source", http.url, "--out", str(tmp / "mitdb.zarr"), "--workers", "2",
             "--cache-dir", str(tmp / "cache"), "--report", str(tmp / "report.json"), "--no-progress", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp, r, json.loads((tmp / "report.json").read_text())


def _expected(mirror):
    """Beats per record and class, straight from the annotation files."""
    db = mirror / "mitdb" / "1.0.0"
    per_record, per_class, edge, total = {}, Counter(), 0, 0
    for rec in (db / "RECORDS").read_text().split():
        ann = wfdb.rdann(str(db / rec), "atr")
        n = wfdb.rdheader(str(db / rec)).sig_len
        beats = label_beats(ann.sample, ann.symbol, AAMI_EC57)
        total += len(beats.sample)
        inside = segment.in_bounds(beats.sample, n, segment.WindowSpec(90, 162))
        edge += int((~inside).sum())
        per_record[rec] = int(inside.sum())
        per_class.update(beats.label[inside].tolist())
    return per_record, per_class, edge, total


def test_every_mitdb_beat_is_accounted_for(full_run, mirror):
    tmp, r, report = full_run
    per_record, per_class, edge, total = _expected(mirror)
    assert total == 109_494  # the database's beat annotations (mirror README)
    ds = store.open_dataset(str(tmp / "mitdb.zarr"))
    assert ds.sizes["segment"] == sum(per_record.values()) == total - edge
    assert dict(Counter(ds.label.values.tolist())) == dict(per_class)
    assert ds.attrs["segments_per_class"] == {c: per_class[c] for c in "NSVFQ"}
    assert (ds.attrs["task"], ds.attrs["anchor_kind"], ds.attrs["classes"]) == ("beat", "r-peak", list("NSVFQ"))
    assert ds.attrs["label_source"] == {"kind": "beat-annotations", "annotator": "atr", "label_map": "aami-ec57",
                                        "unknown": "Q", "align": "fiducial"}
    table = ds[["record_n_segments", "record_n_dropped_edge", "record_status", "record_checksum", "record_lead"]]
    table = table.to_dataframe()
    assert table.record_n_segments.to_dict() == per_record
    assert int(table.record_n_dropped_edge.sum()) == edge
    assert (table.record_status == "ok").all() and (table.record_checksum == "verified").all()
    assert table.loc[["102", "104"], "record_lead"].tolist() == ["V5", "V5"]
    assert (table.drop(index=["102", "104"]).record_lead == "MLII").all()
    assert "102-0.atr" in r.stdout and report["missing_source_files"] == ["102-0.atr"]
    assert f"records     48 done, 0 failed, 48 total" in r.stdout


def test_store_rows_match_a_direct_computation(full_run, mirror):
    tmp, _, _ = full_run
    ds = store.open_dataset(str(tmp / "mitdb.zarr"))
    db = mirror / "mitdb" / "1.0.0"
    for rec in ("114", "208"):  # MLII second; many V and F beats
        rows = np.flatnonzero(ds.record.values == rec)
        sample = ds["anchor"].values[rows]
        sig = wfdb.rdrecord(str(db / rec), channel_names=["MLII"]).p_signal[:, 0].astype(np.float32)
        w = segment.WindowSpec(90, 162)
        spec = spectrogram.SpectrogramSpec(360.0, 90, 162, 64, 8, 64, max_freq_hz=40.0)  # the beat default band
        want = spectrogram.spectrogram(segment.extract_windows(sig, sample, w), spec).astype(np.float16)
        assert_same_spectrograms(ds.spectrogram.values[rows], want)  # one record here, chunks in the store
        # Each anchor is its annotated beat moved to the detector's fiducial point (window.align), a few samples
        # at most, and keeps that beat's symbol.
        ann = wfdb.rdann(str(db / rec), "atr")
        beats = label_beats(ann.sample, ann.symbol, AAMI_EC57)
        moved = detect.fiducial_points(sig, 360.0, beats.all_sample)[np.searchsorted(beats.all_sample, beats.sample)]
        sym = dict(zip(moved.tolist(), beats.symbol))
        assert [sym[s] for s in sample] == ds.symbol.values[rows].tolist()
        assert np.mean(np.isin(sample, ann.sample)) < 0.9  # moved, mostly: not the annotated samples


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and `dask worker` as separate processes on 127.0.0.1."""
    with dask_processes(tmp_path, n_workers=2) as sched_file:
        yield sched_file


def test_submit_to_a_dask_scheduler(dask_cluster, http, full_run, tmp_path):
    out = tmp_path / "sub.zarr"
    r = _cli("preprocess", "mitdb", "--source", http.url, "--out", str(out), "--records", "100,102,114,208",
             "--scheduler-file", str(dask_cluster), "--cache-dir", str(tmp_path / "worker-cache"), "--no-progress",
             timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from distributed import Client

    with Client(scheduler_file=str(dask_cluster)) as c:
        prefixes = c.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"plan", "chunk"} <= {p.split("-")[0] for p in prefixes}  # the job's tasks ran on that cluster
    assert (tmp_path / "worker-cache" / "physionet" / "mitdb" / "1.0.0" / "208.dat").exists()
    sub = store.open_dataset(str(out))
    full = store.open_dataset(str(full_run[0] / "mitdb.zarr"))
    for rec in ("100", "102", "114", "208"):
        a = sub.spectrogram.values[sub.record.values == rec]
        b = full.spectrogram.values[full.record.values == rec]
        assert_same_spectrograms(a, b)  # other chunks on the two clusters: the products round by batch


def test_killed_job_resumes_to_the_same_content(http, tmp_path):
    records = "100,101,102,103,104,105,106,107,108,109,111,112"
    cfg = tmp_path / "small-chunks.yaml"
    cfg.write_text("store: {chunk_size: 64}\n")
    out = tmp_path / "killed.zarr"
    common = ["--source", http.url, "--records", records, "--config", str(cfg), "--workers", "2", "--no-progress",
              "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "mitdb", "--out", str(out), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    fp_dir = out / "_state" / "chunk_fingerprint" / "c"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if fp_dir.is_dir() and len(os.listdir(fp_dir)) >= 40:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, mid-write
    proc.wait()
    held = store.read_fingerprints(str(out))
    done = sum(bool(h) for h in held)
    assert 0 < done < len(held)
    with pytest.raises(Exception, match="has not finished"):
        store.open_dataset(str(out))

    again = _cli("preprocess", "mitdb", "--out", str(out), "--report", str(tmp_path / "r.json"), *common, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["chunks_skipped"] == done and rep["chunks_written"] + rep["chunks_skipped"] == rep["chunks_total"]
    clean = _cli("preprocess", "mitdb", "--out", str(tmp_path / "clean.zarr"), *common, timeout=600)
    assert clean.returncode == 0
    xr.testing.assert_identical(store.open_dataset(str(out)).drop_attrs(),
                                store.open_dataset(str(tmp_path / "clean.zarr")).drop_attrs())
