"""The Challenge 2017 rhythm system end to end: a challenge-style database (recordings in an archive of a
PhysioNet tree + a REFERENCE.csv) preprocessed over loopback HTTP with every failure of the label join, resumed;
the real Challenge 2017 archive preprocessed, trained on (real TensorFlow steps) and evaluated per recording;
and rhythm scoring of a zip of real recordings (another sampling rate, a broken and a too-short one), of one
record (probabilities printed) and of a 30-minute MIT-BIH record in windows."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
import xarray as xr

from helpers import HTTPMirror, write_record
from ecg_pipeline.jobs.preprocess import PreprocessRequest, run_preprocess
from ecg_pipeline.pipeline import store
from ecg_pipeline.pipeline.databases import Database, register_database
from ecg_pipeline.pipeline.segment import cover_windows

CLASSES = ["N", "A", "O", "~"]
TOY = register_database(Database(
    name="toy-challenge", version="1.0.0", title="a challenge-style toy database", annotator="", label_map="",
    leads=("ECG",), citation="-", archive="recs.zip", archive_folder="recs", labels="record-table",
    label_options={"file": "REFERENCE.csv", "classes": tuple(CLASSES)}, challenge_classes=("N", "A", "O"),
    preprocess_defaults={"stft": {"hop": 32}, "store": {"chunk_size": 16},
                         "rhythm": {"length_s": 10.0, "hop_s": 10.0, "min_s": 5.0},
                         "download": {"retries": 1, "backoff_s": 0.01}}))
N_TEST_RECORDS = 360  #: real Challenge 2017 recordings in the training test (every class is among them)


def _cli(*args, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(r, code=0):
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# --- a challenge-style database: the label join and its failures, resumed ------------------------------------


def _toy_tree(root: Path, *, broken: bool) -> Path:
    """<root>/toy-challenge/1.0.0/{recs.zip, SHA256SUMS.txt}, the zip holding recs/*.hea/.dat and REFERENCE.csv."""
    work = root / "make" / "recs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # R5 last: the chunks before it are the same whether it fails or not, so a re-run skips them.
    order = {"R1": 20, "R2": 61, "R3": 12, "R4": 12, "R6": 3, "R7": 7.5, "R8": 200, "R5": 25}
    for i, (name, seconds) in enumerate(order.items()):
        write_record(work, name, fs=300, seconds=seconds, leads=("ECG",), seed=i)
        (work / f"{name}.atr").unlink()
    if broken:
        with open(work / "R5.dat", "r+b") as f:  # truncated: the header promises more samples
            f.truncate(3000)
    # R3: a label outside the classes; R4: no label; R9: a label without a recording.
    (work / "REFERENCE.csv").write_text("R1,N\nR2,A\nR3,X\nR5,O\nR6,N\nR7,~\nR8,O\nR9,A\n")
    (work / "RECORDS").write_text("".join(f"{n}\n" for n in order))
    folder = root / "toy-challenge" / "1.0.0"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "recs.zip", "w") as z:
        for p in sorted(work.iterdir()):
            z.write(p, f"recs/{p.name}")
    digest = hashlib.sha256((folder / "recs.zip").read_bytes()).hexdigest()
    (folder / "SHA256SUMS.txt").write_text(f"{digest}  recs.zip\n")
    return root


def _preprocess(client, url, out):
    return run_preprocess(PreprocessRequest(db=TOY.name, source=url, out=str(out), cache_dir=str(out) + ".cache"),
                          client)


def test_label_join_failures_are_reported_by_record_and_a_rerun_equals_a_clean_run(client, tmp_path):
    root = _toy_tree(tmp_path / "src", broken=True)
    with HTTPMirror(root) as http:
        first = _preprocess(client, http.url, tmp_path / "s.zarr")
    errors = {r.record: r.error for r in first.records if r.status != "ok"}
    assert errors == {
        "R3": "labels: unknown label 'X' in REFERENCE.csv (known: N, A, O, ~)",
        "R4": "labels: no label in REFERENCE.csv",
        "R5": errors["R5"],
        "R6": "labels: 3.00 s long, shorter than the 5 s a recording needs (rhythm.min_s)",
        "R9": "labels: REFERENCE.csv labels R9 (A), but the source has no such recording",
    }
    assert errors["R5"].startswith("signal:") and "R5.dat" in errors["R5"]
    ds = store.open_dataset(str(tmp_path / "s.zarr"))
    a = ds.attrs
    assert (a["task"], a["anchor_kind"], a["classes"], a["challenge_classes"]) == (
        "rhythm", "window-start", CLASSES, ["N", "A", "O"])
    assert a["label_source"]["kind"] == "record-table" and a["spectrogram"]["pad"] == "wrap"
    assert (a["spectrogram"]["n_before"], a["spectrogram"]["n_after"]) == (0, 3000)
    # Every recording is covered by its windows (the last one ends with it) and each window has its label.
    table = ds[["record_n_segments", "record_sig_len", "record_offset"]].to_dataframe()
    for rec, label, seconds in (("R1", "N", 20), ("R2", "A", 61), ("R7", "~", 7.5)):
        w = ds.where(ds.record == rec, drop=True)
        assert w.anchor.values.tolist() == cover_windows(int(seconds * 300), 3000, 3000).tolist()
        assert set(w.label.values) == {label} and table.loc[rec, "record_n_segments"] == len(w.anchor)
    assert ds.where(ds.record == "R7", drop=True).anchor.values.tolist() == [0]  # 7.5 s: one padded window
    assert a["segments_per_class"] == {"N": 2, "A": 7, "O": 20, "~": 1}

    _toy_tree(tmp_path / "src", broken=False)  # the source publishes R5 whole
    with HTTPMirror(root) as http:
        second = _preprocess(client, http.url, tmp_path / "s.zarr")
        clean = _preprocess(client, http.url, tmp_path / "clean.zarr")
    assert {r.record for r in second.failed} == {"R3", "R4", "R6", "R9"} == {r.record for r in clean.failed}
    assert second.chunks_skipped > 0 and second.chunks_written < second.chunks_total
    a, b = store.open_dataset(str(tmp_path / "s.zarr")), store.open_dataset(str(tmp_path / "clean.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


# --- the real Challenge 2017 archive ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cinc(mirror, tmp_path_factory):
    """A store of the first recordings of the real archive, preprocessed over loopback HTTP, and a model trained
    on it with the default rhythm configuration (a few epochs)."""
    if not (mirror / "challenge-2017" / "1.0.0" / "training2017.zip").is_file():
        pytest.skip("the mirror has no challenge-2017/1.0.0/training2017.zip")
    work = tmp_path_factory.mktemp("cinc")
    names = [f"A{i:05d}" for i in range(1, N_TEST_RECORDS + 1)]
    with HTTPMirror(mirror) as http:
        pre = _ok(_cli("preprocess", "challenge-2017", "--source", http.url, "--records", ",".join(names),
                       "--out", str(work / "c.zarr"), "--workers", "2", "--cache-dir", str(work / "cache"),
                       "--no-progress"))
    train = _ok(_cli("train", "--store", str(work / "c.zarr"), "--out", str(work / "run"), "--epochs", "4",
                     "--no-progress"))
    return {"work": work, "store": work / "c.zarr", "run": work / "run", "names": names, "pre": pre,
            "train": train}


def _reference(mirror) -> dict[str, str]:
    with zipfile.ZipFile(mirror / "challenge-2017" / "1.0.0" / "training2017.zip") as z:
        text = z.read("training2017/REFERENCE.csv").decode()
    return dict(line.split(",") for line in text.split())


@pytest.mark.realdata
@pytest.mark.slow
def test_real_archive_becomes_a_rhythm_store(cinc, mirror):
    ds = store.open_dataset(str(cinc["store"]))
    ref = _reference(mirror)
    assert ds.attrs["database"] == "challenge-2017" and ds.attrs["task"] == "rhythm"
    assert dict(ds.sizes) == {"record_id": N_TEST_RECORDS, "segment": ds.sizes["segment"], "freq": 17, "time": 280}
    assert (ds.record_status.values == "ok").all() and (ds.record_checksum.values == "verified").all()
    assert all(label == ref[r] for r, label in zip(ds.record.values, ds.label.values))  # joined by name
    for r, n, sig_len in zip(ds.record_id.values, ds.record_n_segments.values, ds.record_sig_len.values):
        assert n == len(cover_windows(int(sig_len), 9000, 9000))  # 30 s windows cover every recording
    assert set(ds.label.values) == set(CLASSES)
    assert "records     360 done, 0 failed" in cinc["pre"].stdout
    out = _ok(_cli("inspect", str(cinc["store"]))).stdout
    assert "challenge-2017" in out and "windows" in out


@pytest.mark.realdata
@pytest.mark.slow
def test_training_on_real_recordings_learns_and_reports_per_recording(cinc):
    run = cinc["run"]
    history = json.loads((run / "history.json").read_text())
    assert history["loss"][-1] < history["loss"][0]  # real steps on real recordings
    assert len(history["val_challenge_f1"]) == 4
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    parts = {p: set(split["records"][p]) for p in ("train", "val", "test")}
    assert not (parts["train"] & parts["test"] or parts["train"] & parts["val"] or parts["val"] & parts["test"])
    assert sum(map(len, parts.values())) == N_TEST_RECORDS and split["name"] == "stratified"
    assert len(parts["test"]) == pytest.approx(0.2 * N_TEST_RECORDS, abs=3)
    assert metrics["unit"] == "record" and metrics["support"] == len(parts["test"])
    per = metrics["per_class"]
    assert metrics["challenge_f1"] == pytest.approx(np.mean([per[c]["f1"] for c in "NAO"]))
    pred = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert set(pred.record) == parts["test"] and list(pred.columns[-4:]) == ["p_N", "p_A", "p_O", "p_~"]
    np.testing.assert_allclose(pred[["p_N", "p_A", "p_O", "p_~"]].sum(axis=1), 1.0, atol=2e-3)
    assert "challenge F1" in (run / "classification_report.txt").read_text()
    meta = zipfile.ZipFile(run / "model.keras").read("ecg_pipeline.json")
    meta = json.loads(meta)
    assert meta["task"] == "rhythm" and meta["train_config"]["model"] == "rhythm-cnn"
    assert meta["store"]["spectrogram"]["pad"] == "wrap" and meta["challenge_classes"] == ["N", "A", "O"]
    # evaluate, without --split, re-scores the model's own hold-out and finds the same figures.
    again = _ok(_cli("evaluate", "--model", str(run / "model.keras"), "--store", str(cinc["store"]))).stdout
    assert f"{metrics['challenge_f1']:.4f}" in again


def _zip_of_recordings(mirror, names, dest: Path) -> Path:
    """A zip of real recordings, copies of the first resampled to 500, 250 and 150 Hz (format 16 .dat), one broken,
    one too short."""
    ref = _reference(mirror)
    folder = dest / "recs"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(mirror / "challenge-2017" / "1.0.0" / "training2017.zip") as z:
        for n in names:
            for ext in ("hea", "mat"):
                (folder / f"{n}.{ext}").write_bytes(z.read(f"training2017/{n}.{ext}"))
    rec = wfdb.rdrecord(str(folder / names[0]))
    from ecg_pipeline.pipeline.resample import resample

    for rate in (500, 250, 150):
        y = resample(rec.p_signal[:, 0].astype(np.float32), 300.0, float(rate))
        wfdb.wrsamp(f"R{rate}", fs=rate, units=["mV"], sig_name=["ECG"], p_signal=y[:, None].astype(np.float64),
                    fmt=["16"], write_dir=str(folder))
    x = resample(rec.p_signal[:, 0].astype(np.float32), 300.0, 250.0)
    shutil.copy(folder / f"{names[1]}.hea", folder / "BROKEN.hea")
    (folder / "BROKEN.hea").write_text((folder / f"{names[1]}.hea").read_text().replace(names[1], "BROKEN"))
    (folder / "BROKEN.mat").write_bytes((folder / f"{names[1]}.mat").read_bytes()[:500])
    wfdb.wrsamp("SHORT", fs=300, units=["mV"], sig_name=["ECG"], p_signal=x[:900, None].astype(np.float64),
                fmt=["16"], write_dir=str(folder))
    labelled = [*names, "R500", "R250", "R150", "BROKEN", "SHORT"]
    (folder / "REFERENCE.csv").write_text("".join(f"{n},{ref.get(n, ref[names[0]])}\n" for n in labelled))
    archive = dest / "recordings.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, p.name)
    return archive


@pytest.mark.realdata
@pytest.mark.slow
def test_scoring_a_zip_of_real_recordings_with_the_rhythm_model(cinc, mirror):
    work = cinc["work"]
    test = json.loads((cinc["run"] / "split.json").read_text())["records"]["test"][:10]
    archive = _zip_of_recordings(mirror, test, work / "zip")
    out = work / "rhythm.zarr"
    r = _ok(_cli("score", "--model", str(cinc["run"] / "model.keras"), "--input", str(archive), "--out", str(out),
                 "--workers", "2", "--no-progress"), code=1)
    table = pd.read_csv(work / "rhythm.records.csv", keep_default_na=False).set_index("record")
    assert table.loc["BROKEN", "status"] == "failed" and table.loc["BROKEN", "error"].startswith("signal:")
    assert table.loc["SHORT", "error"] == ("signal: 3.00 s long, shorter than the 5 s the model's recordings had "
                                           "at least")
    # The model's rows reach 75 Hz: a record sampled below 2.5 x that (187.5 Hz) would leave them empty: refused.
    assert table.loc["R150", "error"] == ("quality: sampling rate 150 Hz below the 187.5 Hz the model needs (not "
                                          "scored; `quality: flag` scores it anyway)")
    ok = table[table.status == "ok"]
    # Above it, at a lower or a higher rate than the model's 300 Hz: resampled to 300 Hz and scored.
    assert set(ok.index) == {*test, "R500", "R250"} and (ok.loc["R500", "fs"], ok.loc["R250", "fs"]) == (500, 250)
    same = ok.loc[["R500", "R250", test[0]], [f"p_{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(same[:2], same[[2, 2]], atol=0.1)  # the same recording at three rates
    probs = ok[[f"p_{c}" for c in CLASSES]].astype(float)  # failed records have none ("" in the CSV)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-3)
    assert (ok.predicted == probs.idxmax(axis=1).str[2:]).all()
    # The recordings' own predictions equal the model's evaluation of the same recordings in the store.
    pred = pd.read_csv(cinc["run"] / "predictions.csv", keep_default_na=False).set_index("record")
    np.testing.assert_allclose(probs.loc[test, "p_N"], pred.loc[test, "p_N"], atol=0.02)
    metrics = json.loads((work / "rhythm.metrics.json").read_text())
    assert metrics["records"] == len(ok) and "challenge_f1" in metrics["classification"]
    assert "challenge F1" in r.stdout
    from ecg_pipeline.pipeline.scores import open_scores

    ds = open_scores(str(out))
    assert ds.attrs["task"] == "rhythm" and ds.attrs["anchor_kind"] == "window-start"
    stored = dict(zip(ds.record_id.values.tolist(), ds.record_predicted.values.tolist()))
    assert {r: stored[r] for r in ok.index} == ok.predicted.to_dict()
    episodes = pd.read_csv(work / "rhythm.episodes.csv", keep_default_na=False)
    assert set(episodes.record) == set(ok.index)


@pytest.mark.realdata
@pytest.mark.slow
def test_one_record_prints_its_class_probabilities(cinc, mirror, tmp_path):
    test = json.loads((cinc["run"] / "split.json").read_text())["records"]["test"][:1]
    folder = tmp_path / "one"
    folder.mkdir()
    with zipfile.ZipFile(mirror / "challenge-2017" / "1.0.0" / "training2017.zip") as z:
        for ext in ("hea", "mat"):
            (folder / f"{test[0]}.{ext}").write_bytes(z.read(f"training2017/{test[0]}.{ext}"))
    r = _ok(_cli("score", "--model", str(cinc["run"] / "model.keras"), "--input", str(folder / test[0]),
                 "--workers", "1", "--no-progress"))
    line, probs = r.stdout.splitlines()[:2]
    assert line.startswith(f"{test[0]}: ") and line.split()[1] in CLASSES
    values = dict(zip(probs.split()[1::2], map(float, probs.split()[2::2])))
    assert list(values) == CLASSES and sum(values.values()) == pytest.approx(1.0, abs=5e-3)
    assert line.split()[1] == max(values, key=values.get)
    assert "Dask dashboard" not in r.stderr  # scored in this process: no cluster was started
    # As JSON, and the same figures as the scoring job gives the record in a store.
    got = json.loads(_ok(_cli("score", "--model", str(cinc["run"] / "model.keras"), "--input",
                              str(folder / test[0]), "--format", "json")).stdout)
    _ok(_cli("score", "--model", str(cinc["run"] / "model.keras"), "--input", str(folder), "--out",
             str(tmp_path / "s.zarr"), "--workers", "1", "--no-progress"))
    from ecg_pipeline.pipeline.scores import open_scores

    ds = open_scores(str(tmp_path / "s.zarr"))
    assert got["predicted"] == str(ds.record_predicted.values[0]) == line.split()[1]
    np.testing.assert_allclose([got["probability"][c] for c in CLASSES], ds.record_probability.values[0], atol=1e-5)
    assert [s["sample"] for s in got["segments"]] == ds.anchor.values.tolist()


@pytest.fixture(scope="module")
def r201(cinc, mirror):
    """MIT-BIH record 201 (30 min, AF episodes in its rhythm annotations) scored in windows by the rhythm model."""
    out = cinc["work"] / "r201.zarr"
    _ok(_cli("score", "--model", str(cinc["run"] / "model.keras"), "--db", "mitdb", "--source", mirror.as_uri(),
             "--records", "201", "--out", str(out), "--workers", "2", "--no-progress"))
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_a_long_record_is_scored_in_windows_with_episodes(cinc, r201):
    work = cinc["work"]
    out = r201
    from ecg_pipeline.pipeline.scores import open_scores

    ds = open_scores(str(out))
    assert ds.anchor.values.tolist() == cover_windows(650000, 10800, 10800).tolist()  # 30 s at 360 Hz
    episodes = pd.read_csv(work / "r201.episodes.csv", keep_default_na=False)
    assert episodes.start_s.iloc[0] == 0 and episodes.end_s.iloc[-1] == pytest.approx(650000 / 360, abs=1e-3)
    assert (episodes.start_s.values[1:] == episodes.end_s.values[:-1]).all()  # contiguous, no gap, no overlap
    assert (episodes["class"].values[1:] != episodes["class"].values[:-1]).all()  # runs are merged


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.usefixtures("environ_restored")  # runs `cli.main` in this process (it sets os.environ defaults)
def test_rhythm_figures_show_the_windows_episodes_and_af_burden(r201, tmp_path):
    from ecg_pipeline.jobs import cli
    from ecg_pipeline.pipeline.figures import scored_record
    from ecg_pipeline.pipeline.scores import open_scores, record_view, time_shares

    view = record_view(open_scores(str(r201)), "201")
    assert view.task == "rhythm" and view.has_reference  # the windows' majority rhythm from 201.atr
    figures = scored_record(str(r201), "201", start_s=600, seconds=120)
    strip, predicted_band, reference_band = figures.strip.axes
    assert strip.get_xlim() == pytest.approx((600, 720), abs=0.01)
    # 30 s windows starting every 30 s: the 120 s strip shows 4 windows in each band, coloured by class.
    assert len(predicted_band.patches) == 4 and len(reference_band.patches) == 4
    assert [b.get_ylabel() for b in (predicted_band, reference_band)] == ["predicted", "reference"]
    overview = figures.overview
    ax_prob, band, ref_band, ax_share = overview.axes
    shares = time_shares(view.anchor, view.predicted, view.sig_len, view.classes)
    assert [round(b.get_width(), 6) for b in ax_share.patches][::-1] == [round(100 * v, 6) for v in shares]
    assert f"AF burden {100 * shares[list(view.classes).index('A')]:.1f} %" in ax_prob.get_title()
    assert len(ax_prob.lines) == len(view.classes)
    assert cli.main(["plot", str(r201), "--record", "201", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "r201-201-overview.png"
