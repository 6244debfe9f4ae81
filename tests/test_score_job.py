"""The scoring job end to end on real MIT-BIH records: a model trained here on DS1 scores the DS2 records fetched
over loopback HTTP (annotations hidden from the detector, used only for the comparison), and must agree with
`evaluate` on the annotated beats; archives (nested, corrupt members, hostile paths), unsafe model files, re-runs,
and a real `dask scheduler` + `dask worker` cluster that loses a worker, and a driver killed mid-run."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import wfdb
import xarray as xr
import zarr

pytest.importorskip("tensorflow")

from helpers import HTTPMirror, dask_processes  # noqa: E402
from ecg_pipeline.pipeline.labels import LABEL_MAPS, label_beats  # noqa: E402
from ecg_pipeline.pipeline.scores import open_scores  # noqa: E402
from ecg_pipeline.pipeline.splits import DS1, DS2, DS1_VALIDATION, PACED  # noqa: E402

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TRAIN_CONFIG = "batch_size: 256\npatience: 5\nmodel_options: {width: 8, dense: 32}\n"
CLASSES = ["N", "S", "V", "F", "Q"]


def _cli(*args, timeout=900, background=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "ecg_pipeline.jobs.cli", *args]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _ok(r, code=0):
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("score")


@pytest.fixture(scope="module")
def model(mirror, work):
    """A small CNN trained here on DS1 (validation: DS1 records 118 119 201 220): 3 epochs."""
    ds1 = [r for r in DS1 if r not in PACED]
    train = [r for r in ds1 if r not in DS1_VALIDATION and r != "101"]
    (work / "split.yaml").write_text(json.dumps({"train": train, "val": list(DS1_VALIDATION), "test": ["101"]}))
    (work / "train.yaml").write_text(TRAIN_CONFIG)
    (work / "pre.yaml").write_text("store:\n  chunk_size: 1024\n")
    _ok(_cli("preprocess", "mitdb", "--source", mirror.as_uri(), "--records", ",".join(ds1), "--out",
             str(work / "ds1.zarr"), "--config", str(work / "pre.yaml"), "--workers", "2", "--no-progress"))
    _ok(_cli("train", "--store", str(work / "ds1.zarr"), "--split", str(work / "split.yaml"), "--config",
             str(work / "train.yaml"), "--epochs", "3", "--out", str(work / "run"), "--no-progress"))
    return work / "run" / "model.keras"


@pytest.fixture(scope="module")
def ds2(mirror, model, work):
    """DS2 scored from the mirror served over HTTP on 127.0.0.1, as from physionet.org."""
    out = work / "ds2.zarr"
    with HTTPMirror(mirror) as http:
        r = _ok(_cli("score", "--model", str(model), "--db", "mitdb", "--source", http.url, "--records",
                     ",".join(DS2), "--out", str(out), "--workers", "2", "--no-progress"))
    return out, r


def test_ds2_scores_agree_with_the_reference(ds2, model, mirror, work):
    out, r = ds2
    ds = open_scores(str(out))
    assert sorted(ds.record_id.values) == sorted(DS2) and set(ds.record_status.values) == {"ok"}
    assert list(ds["class"].values) == CLASSES and ds.probability.dims == ("segment", "class")
    np.testing.assert_allclose(ds.probability.values.sum(axis=1), 1, atol=1e-4)
    # Plain xarray reads the store as well.
    plain = xr.open_zarr(out, consolidated=False)
    assert plain.sizes["segment"] == ds.sizes["segment"] == int(ds.record_n_beats.sum())

    # The reference beats the job counted are the annotation file's beats (counted here independently).
    for rec in ("100", "213", "232"):
        ann = wfdb.rdann(str(mirror / "mitdb" / "1.0.0" / rec), "atr")
        n_ref = len(label_beats(np.asarray(ann.sample), np.asarray(ann.symbol, dtype=object),
                                LABEL_MAPS["aami-ec57"], "Q").sample)
        assert int(ds.record_n_reference.sel(record_id=rec)) == n_ref
        beats = ds.sample.values[ds.record.values == rec]
        assert np.all(np.diff(beats) > 0)  # in order, no beat twice

    # Detector against the reference (EC57 matching within 150 ms), from the store and from the report.
    ref = ds.attrs["reference_metrics"]
    det = ref["detector"]
    assert det["sensitivity"] >= 0.985 and det["positive_predictivity"] >= 0.99, det
    assert det["tp"] == int(ds.record_tp.sum()) and det["fn"] == int(ds.record_fn.sum())
    assert json.loads((work / "ds2.metrics.json").read_text()) == ref
    assert "detector sensitivity" in r.stdout and "matched beats" in r.stdout

    # Per-record summary as CSV.
    table = pd.read_csv(work / "ds2.records.csv", keep_default_na=False)
    assert len(table) == len(DS2) and (table.status == "ok").all()
    counts = table[[f"beats_{c}" for c in CLASSES]].sum(axis=1)
    assert (counts == table.n_beats).all()
    np.testing.assert_allclose(table.ectopic_share, table[["beats_S", "beats_V", "beats_F"]].sum(axis=1) / table.n_beats)

    # The same model on the annotated beats (the preprocess store, `evaluate`): scoring with detected beats,
    # transformed with the STFT that travelled with the model, must give the same figures.
    (work / "pre.yaml").write_text("store:\n  chunk_size: 1024\n")
    _ok(_cli("preprocess", "mitdb", "--source", mirror.as_uri(), "--records", ",".join(DS2), "--out",
             str(work / "ds2-annotated.zarr"), "--config", str(work / "pre.yaml"), "--workers", "2", "--no-progress"))
    test = [x for x in DS2 if x not in ("100", "103")]
    (work / "ds2-split.yaml").write_text(json.dumps({"train": ["100"], "val": ["103"], "test": test}))
    _ok(_cli("evaluate", "--model", str(model), "--store", str(work / "ds2-annotated.zarr"), "--split",
             str(work / "ds2-split.yaml"), "--out", str(work / "eval")))
    evaluated = json.loads((work / "eval" / "metrics.json").read_text())
    sel = np.isin(ds.record.values, test) & (ds.reference.values != "")
    idx = {c: i for i, c in enumerate(CLASSES)}
    from ecg_pipeline.pipeline.evaluate import classification_metrics

    scored = classification_metrics(np.array([idx[c] for c in ds.reference.values[sel]]),
                                    np.array([idx[c] for c in ds.predicted.values[sel]]), CLASSES)
    assert abs(scored["accuracy"] - evaluated["accuracy"]) <= 0.01, (scored["accuracy"], evaluated["accuracy"])
    for c in ("N", "V"):
        assert abs(scored["per_class"][c]["f1"] - evaluated["per_class"][c]["f1"]) <= 0.03, c
    assert scored["per_class"]["N"]["f1"] >= 0.85


def test_rerun_skips_scored_records(ds2, model, mirror):
    out, _ = ds2
    before = zarr.open_group(str(out), mode="r", use_consolidated=False)["sample"][:]
    with HTTPMirror(mirror) as http:
        r = _ok(_cli("score", "--model", str(model), "--db", "mitdb", "--source", http.url, "--records",
                     ",".join(DS2), "--out", str(out), "--workers", "2", "--no-progress"))
    assert f"0 scored now, {len(DS2)} already in the store" in r.stdout
    after = zarr.open_group(str(out), mode="r", use_consolidated=False)["sample"][:]
    np.testing.assert_array_equal(before, after)
    shown = _ok(_cli("inspect", str(out))).stdout  # the inspect command knows scores stores too
    ds = open_scores(str(out))
    row = next(line for line in shown.splitlines() if line.split()[:2] == ["232", "ok"])
    assert int(row.split()[2]) == int(ds.record_n_beats.sel(record_id="232")) and "beat scores" in shown


def _copy_record(mirror, rec: str, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for ext in ("hea", "dat", "atr"):
        shutil.copy(mirror / "mitdb" / "1.0.0" / f"{rec}.{ext}", dest / f"{rec}.{ext}")


def test_zip_archive_with_nested_and_corrupt_records(ds2, model, mirror, tmp_path):
    folder = tmp_path / "recordings"
    for rec in ("105", "213"):
        _copy_record(mirror, rec, folder / "ward-a" / "monday")
    _copy_record(mirror, "232", folder / "ward-b")
    _copy_record(mirror, "111", folder / "broken")
    dat = folder / "broken" / "111.dat"
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])  # truncated in transit
    archive = shutil.make_archive(str(tmp_path / "recordings"), "zip", folder)
    out = tmp_path / "scores.zarr"
    r = _ok(_cli("score", "--model", str(model), "--input", archive, "--out", str(out), "--workers", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--summary", str(tmp_path / "summary.csv"), "--no-progress"),
            code=1)
    assert "broken/111" in r.stdout and "signal" in r.stdout
    loads = int(re.search(r"loaded (\d+) time", r.stdout).group(1))
    assert 1 <= loads <= 2  # once per worker of the 2-worker cluster, not once per record (3 were scored)
    table = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False).set_index("record")
    assert table.loc["broken/111", "status"] == "failed" and "truncated" in table.loc["broken/111", "error"]
    assert (table.drop("broken/111").status == "ok").all() and len(table) == 4
    # Beats and probabilities equal those of the same records fetched over HTTP.
    got = open_scores(str(out))
    ref = open_scores(str(ds2[0]))
    for name, rec in (("ward-a/monday/105", "105"), ("ward-a/monday/213", "213"), ("ward-b/232", "232")):
        a, b = got.record.values == name, ref.record.values == rec
        np.testing.assert_array_equal(got.sample.values[a], ref.sample.values[b])
        np.testing.assert_allclose(got.probability.values[a], ref.probability.values[b], atol=1e-4)
        assert (got.reference.values[a] == ref.reference.values[b]).all()


def test_hostile_archive_is_refused(model, mirror, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(mirror / "mitdb" / "1.0.0" / "100.hea", "ok/100.hea")
        z.writestr("../../escaped.hea", "100 1 360 650000\n")
    out = tmp_path / "scores.zarr"
    r = _ok(_cli("score", "--model", str(model), "--input", str(archive), "--out", str(out), "--workers", "1",
                 "--work-dir", str(tmp_path / "work"), "--no-progress"), code=2)
    assert "../../escaped.hea" in r.stderr and "refused" in r.stderr
    assert not out.exists() and not list(tmp_path.parent.rglob("escaped.hea"))
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_unsafe_model_files_are_refused(model, mirror, tmp_path):
    keras = pytest.importorskip("keras")
    from ecg_pipeline.pipeline.models import read_metadata, save_model

    inp = keras.Input((3,))
    lam = tmp_path / "lambda.keras"
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp)).save(lam)
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))

    # A custom layer the workers do not know: it passes the static check, and Keras refuses it on the worker.
    @keras.saving.register_keras_serializable(package="test_score_job")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2

    spec_in = keras.Input((33, 24), dtype="float16")
    head = keras.layers.Dense(5, activation="softmax")(keras.layers.Flatten()(Twice()(spec_in)))
    custom = save_model(keras.Model(spec_in, head), tmp_path / "custom.keras", read_metadata(model))
    for path, why in ((lam, "Lambda"), (pkl, "only native .keras"), (tmp_path / "absent.keras", "no model file"),
                      (custom, f"{custom}: cannot load model")):
        out = tmp_path / f"{path.stem}.zarr"
        r = _ok(_cli("score", "--model", str(path), "--input", str(mirror / "mitdb" / "1.0.0"), "--records", "100",
                     "--out", str(out), "--workers", "1", "--no-progress"), code=2)
        assert why in r.stderr and not out.exists(), r.stderr[-2000:]


def test_summary_format_is_checked_before_any_work(model, mirror, tmp_path):
    args = ["score", "--model", str(model), "--input", str(mirror / "mitdb" / "1.0.0"), "--records", "100"]
    r = _ok(_cli(*args, "--out", str(tmp_path / "a.zarr"), "--summary", str(tmp_path / "a.xlsx")), code=2)
    assert "name a .csv or .parquet file" in r.stderr and not (tmp_path / "a.zarr").exists()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        r = _ok(_cli(*args, "--out", str(tmp_path / "b.zarr"), "--summary", str(tmp_path / "b.parquet")), code=2)
        assert "Parquet needs pyarrow" in r.stderr and not (tmp_path / "b.zarr").exists()
    else:
        _ok(_cli(*args, "--out", str(tmp_path / "b.zarr"), "--summary", str(tmp_path / "b.parquet"), "--workers", "1",
                 "--no-progress"))
        assert pd.read_parquet(tmp_path / "b.parquet").loc[0, "record"] == "100"


def _wait_for(cond, timeout=240, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _committed(out) -> int:
    try:
        return int(zarr.open_group(str(out), mode="r", use_consolidated=False).attrs.get("n_segments", 0))
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _records_committed(out) -> int:
    return int(zarr.open_group(str(out), mode="r", use_consolidated=False).attrs.get("n_records", 0))


def test_real_cluster_loses_a_worker_and_the_driver(ds2, model, mirror, tmp_path):
    """`dask scheduler` + `dask worker` processes: one worker is killed mid-run, then the driver itself; the
    re-run finishes the store, and every beat is there exactly once, as in the reference run."""
    records = ["105", "113", "200", "210", "219", "228", "231", "233"]
    (tmp_path / "score.yaml").write_text("piece_s: 60\nflush_s: 0\n")  # many small tasks, a commit per record
    out = tmp_path / "scores.zarr"
    args = ["score", "--model", str(model), "--input", str(mirror / "mitdb" / "1.0.0"), "--records",
            ",".join(records), "--out", str(out), "--config", str(tmp_path / "score.yaml"), "--no-progress"]
    with dask_processes(tmp_path, n_workers=2) as sched:
        from distributed import Client

        with Client(scheduler_file=str(sched), timeout=60) as c:
            pids = c.run(os.getpid)
        driver = _cli(*args, "--scheduler-file", str(sched), background=True)
        _wait_for(lambda: _committed(out) > 0 or driver.poll() is not None, what="a first commit")
        killed_at = _records_committed(out)
        os.kill(next(iter(pids.values())), signal.SIGKILL)  # its nanny starts a new worker, which loads the model
        stdout, stderr = driver.communicate(timeout=600)
        assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
        first = open_scores(str(out))
        assert set(first.record_status.values) == {"ok"} and len(first.record_id) == len(records)

        # Now the driver dies (SIGKILL) after its first commit; the re-run completes the same store.
        out2 = tmp_path / "scores2.zarr"
        args2 = [a if a != str(out) else str(out2) for a in args]
        driver = _cli(*args2, "--scheduler-file", str(sched), background=True)
        _wait_for(lambda: _committed(out2) > 0 or driver.poll() is not None, what="a first commit")
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
        partial = _records_committed(out2)
        r = _ok(_cli(*args2, "--scheduler-file", str(sched)))
        assert "already in the store" in r.stdout
    reference = open_scores(str(ds2[0]))
    for got in (first, open_scores(str(out2))):
        pairs = list(zip(got.record.values, got.sample.values))
        assert len(pairs) == len(set(pairs)), "a beat was written twice"
        for rec in records:
            a, b = got.record.values == rec, reference.record.values == rec
            np.testing.assert_array_equal(got.sample.values[a], reference.sample.values[b])
            np.testing.assert_allclose(got.probability.values[a], reference.probability.values[b], atol=1e-4)
    # Both kills happened mid-run (the run had records left to score).
    assert 0 < killed_at < len(records) and 0 < partial < len(records), (killed_at, partial)
