"""Figures on real stores: the spectrogram gallery of a real MIT-BIH store (waveforms read again from the mirror),
and the ECG strip and overview of records scored by a model trained here; the `plot` command's files, options and
errors. Each figure is checked for what it must show: axes in Hz and seconds, one mark per scored beat, one
highlight per mismatch, bars that add up to the record's beats."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

pytest.importorskip("tensorflow")

from ecg_pipeline.jobs import cli  # noqa: E402
from ecg_pipeline.pipeline import extract, plots, records, scores, sources  # noqa: E402
from ecg_pipeline.pipeline.databases import get_database  # noqa: E402
from ecg_pipeline.pipeline.store import open_dataset  # noqa: E402

# environ_restored: tests here run `cli.main` in this process, which sets os.environ defaults for its own process.
pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.usefixtures("environ_restored")]

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def scored(small_store, mirror, tmp_path_factory):
    """Records 208 and 100 scored from the mirror's folder by a model trained here for one epoch."""
    tmp = tmp_path_factory.mktemp("plots")
    (tmp / "train.yaml").write_text("epochs: 1\nbatch_size: 256\nmodel_options: {width: 8, dense: 32}\n")
    _ok(_cli("train", "--store", str(small_store), "--split", "intra-patient", "--config", str(tmp / "train.yaml"),
             "--out", str(tmp / "run"), "--no-progress"))
    out = tmp / "scores.zarr"
    _ok(_cli("score", "--model", str(tmp / "run" / "model.keras"), "--input", str(mirror / "mitdb" / "1.0.0"),
             "--records", "208,100", "--out", str(out), "--workers", "2", "--cache-dir", str(tmp / "cache"),
             "--no-progress"))
    return out


def test_gallery_shows_each_picked_segment_beside_its_waveform(small_store, mirror, tmp_path):
    ds = open_dataset(str(small_store))
    classes = list(ds.attrs["classes"])
    picks = plots.gallery_indices(ds["label"].values, classes, 3, seed=1)
    idx = np.sort(np.concatenate(list(picks.values())))
    assert {c: len(v) for c, v in picks.items()} == {c: min(3, int((ds.label.values == c).sum())) for c in classes}
    spec = ds.attrs["spectrogram"]
    source = sources.database_source(get_database("mitdb"), mirror.as_uri(), "1.0.0")
    record_of, anchor, lead = ds.record.values[idx], ds.anchor.values[idx], ds.lead.values[idx]
    waveform = extract.segment_waveforms(source, list(record_of), anchor, list(lead), spec["n_before"], spec["n_after"],
                                         cache=tmp_path)
    # The waveform is the record's own signal around the anchor: check one sample against wfdb directly.
    base = mirror / "mitdb" / "1.0.0" / str(record_of[0])
    header = records.read_header(base, str(record_of[0]))
    signal = records.read_signal(base, header, records.choose_lead(header, (str(lead[0]),)))
    assert waveform[0, spec["n_before"]] == pytest.approx(signal[anchor[0]])

    fig = plots.spectrogram_gallery(ds.spectrogram.values[idx], ds.label.values[idx], ds.freq.values, ds.time.values,
                                    classes=classes, waveform=waveform, fs=spec["fs"], n_before=spec["n_before"])
    meshes = [ax for ax in fig.axes if ax.collections and ax.get_ylabel() == "Hz"]
    assert len(meshes) == idx.size
    assert all(ax.get_xlabel() in ("", "s from R peak") for ax in meshes)
    assert meshes[0].get_ylim()[1] == pytest.approx(float(ds.freq.values[-1]), abs=float(ds.freq.values[1]))
    lines = [ax for ax in fig.axes if ax.lines and ax.get_ylabel() == "mV"]
    assert len(lines) == idx.size
    titles = {ax.get_title(loc="left") for ax in fig.axes} - {""}
    assert titles == {f"class {c}" for c in classes if picks[c].size}


def test_strip_marks_every_scored_beat_and_highlights_mismatches(scored, mirror):
    ds = scores.open_scores(str(scored))
    view = scores.record_view(ds, "208")
    assert view.anchor.size == int(ds.record_n_segments.values[list(ds.record_id.values).index("208")])
    source = sources.FolderSource(str(mirror / "mitdb" / "1.0.0"))
    strip = extract.read_strip(source, "208", 60.0, 8.0, lead=view.lead, annotator="atr")
    assert strip.signal.shape == (8 * 360,) and strip.start == 60 * 360
    fig = plots.ecg_strip(strip, anchor=view.anchor, predicted=view.predicted, classes=view.classes,
                          reference=view.reference)
    ax = fig.axes[0]
    inside = (view.anchor >= strip.start) & (view.anchor < strip.start + strip.signal.size)
    marks = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(marks) == inside.sum() > 5
    mismatches = (view.reference[inside] != "") & (view.reference[inside] != view.predicted[inside])
    highlighted = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((1.0, 217 / 255, 47 / 255))]
    assert len(highlighted) == int(mismatches.sum())
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    for c in set(view.predicted[inside]):
        assert f"{c} ({int((view.predicted[inside] == c).sum())})" in legend
    assert ax.get_ylabel() == "MLII (mV)" and fig.axes[0].get_xlabel() == "time (s)"


def test_overview_bars_add_up_to_the_records_beats(scored):
    view = scores.record_view(scores.open_scores(str(scored)), "100")
    fig = plots.scores_overview(view)
    ax, ax_e = fig.axes
    assert sum(p.get_height() for p in ax.patches) == view.anchor.size
    ectopic = np.isin(view.predicted, ["S", "V", "F"]).mean()
    assert f"{100 * ectopic:.1f} %" in ax.get_title()
    assert ax_e.get_xlabel() == "time (min)" and ax_e.get_ylabel() == "ectopic share (%)"


def test_plot_command_writes_pngs_for_both_kinds_of_store(scored, small_store, mirror, tmp_path, caplog):
    r = _ok(_cli("plot", str(scored), "--record", "208", "--start", "60", "--seconds", "5", "--out", str(tmp_path)))
    paths = r.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["scores-208-overview.png", "scores-208-strip-60s.png"]
    assert all(open(p, "rb").read(8) == PNG for p in paths)
    # A spectrogram store: the gallery of one record, and a strip of its labelled beats.
    # --input for a spectrogram store: a PhysioNet-style tree holding its database, as preprocess --source takes it.
    assert cli.main(["plot", str(small_store), "--record", "119", "--start", "10", "--per-class", "2",
                     "--input", str(mirror), "--out", str(tmp_path)]) == 0
    assert "waveforms left out" not in caplog.text
    assert (tmp_path / "small-119-gallery.png").read_bytes()[:8] == PNG
    assert (tmp_path / "small-119-strip-10s.png").read_bytes()[:8] == PNG


def test_gallery_without_a_reachable_source_keeps_the_spectrograms(small_store, tmp_path, caplog):
    assert cli.main(["plot", str(small_store), "--input", str(tmp_path / "gone"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "small-gallery.png").read_bytes()[:8] == PNG
    assert "waveforms left out" in caplog.text and "gone" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--record", "999"], "record '999' is not in"),
    (["--record", "208", "--start", "5000"], "--start 5000 s is outside record 208 (0 to 1805.6 s)"),
    (["--record", "208", "--seconds", "0"], "--seconds must be positive"),
    (["--per-class", "0"], "--per-class must be at least 1"),
])
def test_plot_errors_on_a_scores_store(scored, tmp_path, capsys, args, message):
    assert cli.main(["plot", str(scored), *args, "--out", str(tmp_path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing drawn


def test_plot_errors_on_other_stores(small_store, tmp_path, capsys):
    cases = [
        ([str(small_store), "--record", "999"], "record '999' is not in"),
        ([str(small_store), "--start", "3"], "--start draws a strip of one record: give --record too"),
        ([str(small_store), "--record", "100", "--start", "-1"], "--start -1 s is outside record 100"),
        ([str(tmp_path)], "is not a store of ecg-pipeline"),
    ]
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["kind"] = "something-else"
    cases.append(([str(tmp_path / "other.zarr")], "not a store written by `ecg-pipeline preprocess` or `score`"))
    for args, message in cases:
        assert cli.main(["plot", *args, "--out", str(tmp_path / "figures")]) == cli.EXIT_ERROR, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    assert not (tmp_path / "figures").exists()
