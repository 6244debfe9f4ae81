"""Fault injection, record layer (issue 15): headers whose facts the files do not hold, and valid WFDB records the
pipeline used to refuse or misread. Every input is built here, small, as real files; the outcome is asserted through
``records``, ``sources`` and, end to end, the ``ecg-pipeline score`` command on a folder."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from helpers import HTTPMirror, write_record
from ecg_pipeline.pipeline.scoring import MAX_PIECES, plan_pieces
from ecg_pipeline.pipeline import records, sources
from ecg_pipeline.pipeline.errors import RecordError


def _huge(folder: Path, name: str = "huge") -> np.ndarray:
    """``<name> 1 360 1000000000000`` over a 43,200-byte format-16 signal file (21,600 samples)."""
    x = (200 * np.sin(np.arange(21600) / 20)).astype("<i2")
    (folder / f"{name}.dat").write_bytes(x.tobytes())
    (folder / f"{name}.hea").write_text(f"{name} 1 360 1000000000000\n{name}.dat 16 200 16 0 0 0 0 MLII\n")
    return x


def _lead(header: records.Header, i: int = 0) -> records.Lead:
    return records.Lead(i, header.sig_names[i], False)


# ---------------------------------------------------------------------------------------------------------------------
# 1. header facts checked against the files, before any work


def test_a_header_declaring_more_samples_than_its_file_holds_fails_before_any_work(tmp_path):
    _huge(tmp_path)
    with pytest.raises(RecordError) as err:
        records.read_header(tmp_path / "huge", "huge")
    assert err.value.record == "huge" and err.value.stage == "signal"
    assert err.value.message == ("huge.dat is truncated: 43,200 bytes, the header implies 2,000,000,000,000: huge.hea "
                                 "declares 1000000000000 samples, huge.dat holds 21600 (format 16)")


def test_the_size_check_counts_every_signal_of_a_file_and_its_byte_offset(tmp_path):
    # Two signals of format 212 in one file, after a 24-byte prologue: 3 bytes a frame.
    write_record(tmp_path, "two", seconds=2)  # 720 frames, two 212 signals: 2,160 bytes
    h = records.read_header(tmp_path / "two", "two")
    assert h.sig_len == 720
    (tmp_path / "off.dat").write_bytes(b"\0" * 24 + (tmp_path / "two.dat").read_bytes())
    (tmp_path / "off.hea").write_text("off 2 360 720\noff.dat 212+24 200 11 0 0 0 0 MLII\noff.dat 212+24 200 11 0 0 0 0 V1\n")
    assert records.read_header(tmp_path / "off", "off").sig_len == 720
    (tmp_path / "off.hea").write_text("off 2 360 721\noff.dat 212+24 200 11 0 0 0 0 MLII\noff.dat 212+24 200 11 0 0 0 0 V1\n")
    with pytest.raises(RecordError, match=r"signal: off.dat is truncated: 2,184 bytes, the header implies 2,187: "
                                          r"off.hea declares 721 samples, off.dat holds 720 \(format 212, 2 signals\)"):
        records.read_header(tmp_path / "off", "off")


@pytest.mark.parametrize("text, message", [
    ("u 1 360 100\nu.dat 99 200 16 0 0 0 0 MLII\n", "header: signal 0 (MLII) of u.hea has format 99, which is not a WFDB "
                                                     "signal format wfdb reads"),
    ("u 0 360 100\n", "header: u.hea describes no signals"),
    ("u 5000 360 100\nu.dat 16 200 16 0 0 0 0 MLII\n", "header: u.hea declares 5000 signals; more than 1024"),
    ("u 2 360 100\nu.dat 16 200 16 0 0 0 0 MLII\n", "header: header declares 2 signals but describes 1"),
    ("u 1 360 100\nv.dat 16 200 16 0 0 0 0 MLII\n", "signal: v.dat: not found"),
    ("u 1 360 0\nu.dat 16 200 16 0 0 0 0 MLII\n", "signal: u.hea: the record holds no samples"),
])
def test_header_facts_that_cannot_hold_are_refused_with_their_cause(tmp_path, text, message):
    (tmp_path / "u.dat").write_bytes(b"\0" * 200)
    (tmp_path / "u.hea").write_text(text)
    with pytest.raises(RecordError, match=re.escape(f"record u: {message}")):
        records.read_header(tmp_path / "u", "u")


def test_a_record_is_split_into_a_bounded_number_of_pieces():
    assert plan_pieces(648000, 360.0, 1800) == []  # 30 min: one task
    assert plan_pieces(650000, 360.0, 1800) == []  # 30 min 5 s: one task, not one and a 5 s sliver
    assert plan_pieces(1000000, 360.0, 1800) == [(0, 500000), (500000, 1000000)]
    assert len(plan_pieces(360 * 86400, 360.0, 1800)) == 48  # a day-long Holter record: 48 half-hours
    pieces = plan_pieces(10**12, 360.0, 1800)  # what a lying header once planned as 1.5 million tasks
    assert len(pieces) == MAX_PIECES
    assert pieces[0][0] == 0 and pieces[-1][1] == 10**12
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    # A very low rate (a 1/60 Hz trend) is not cut into pieces of 30 samples.
    assert len(plan_pieces(1440, 1 / 60, 1800)) <= 2
    assert len(plan_pieces(10**9, 1e-9, 1800)) <= MAX_PIECES


# ---------------------------------------------------------------------------------------------------------------------
# 2. what wfdb reads


def test_a_header_with_an_iso_base_date_is_read_and_left_as_it_is(tmp_path):
    x = (100 * np.cos(np.arange(9000) / 7)).astype("<i2")
    (tmp_path / "A00001.dat").write_bytes(x.tobytes())
    text = "A00001 1 300 9000 2014-05-08 05:05:15\nA00001.dat 16 1000/mV 16 0 -127 0 0 ECG\n"
    (tmp_path / "A00001.hea").write_text(text)
    with pytest.raises(ValueError, match="unconverted data remains"):  # what wfdb itself makes of it
        wfdb.rdheader(str(tmp_path / "A00001"))
    h = records.read_header(tmp_path / "A00001", "A00001")
    assert (h.fs, h.sig_len, h.sig_names) == (300.0, 9000, ("ECG",))
    sig = records.read_signal(tmp_path / "A00001", h, _lead(h))
    np.testing.assert_allclose(sig, x / 1000, rtol=1e-6)
    assert (tmp_path / "A00001.hea").read_text() == text  # the user's file is not rewritten


@pytest.mark.parametrize("fmt", ["16", "212"])
def test_a_header_without_a_signal_length_takes_it_from_the_file_size(tmp_path, fmt):
    wfdb.wrsamp("n", fs=250, units=["mV"], sig_name=["ECG"], p_signal=np.sin(np.arange(5001) / 9)[:, None],
                fmt=[fmt], write_dir=str(tmp_path))
    lines = (tmp_path / "n.hea").read_text().splitlines()
    (tmp_path / "n.hea").write_text("n 1 250\n" + "\n".join(lines[1:]) + "\n")
    h = records.read_header(tmp_path / "n", "n")
    assert h.sig_len == wfdb.rdrecord(str(tmp_path / "n")).sig_len == 5001
    np.testing.assert_array_equal(records.read_signal(tmp_path / "n", h, _lead(h)),
                                  wfdb.rdrecord(str(tmp_path / "n")).p_signal[:, 0].astype(np.float32))


def test_samples_per_frame_are_read_at_the_true_rate(tmp_path):
    rng = np.random.default_rng(0)
    fast, slow = rng.standard_normal(4000), rng.standard_normal(1000)
    wfdb.wrsamp("f", fs=250, units=["mV", "mmHg"], sig_name=["ECG", "ABP"], e_p_signal=[fast, slow],
                samps_per_frame=[4, 1], fmt=["16", "16"], write_dir=str(tmp_path))
    assert "16x4" in (tmp_path / "f.hea").read_text()
    h = records.read_header(tmp_path / "f", "f")
    assert (h.fs, h.sig_len, h.spf) == (250.0, 1000, (4, 1))
    ecg = records.choose_lead(h, ("ECG",))
    at = h.for_lead(ecg)
    assert (at.fs, at.sig_len) == (1000.0, 4000)  # the lead's own rate is the record's rate for that lead
    assert h.for_lead(records.choose_lead(h, ("ABP",))) == h
    x = records.read_signal(tmp_path / "f", at, ecg)
    expected = wfdb.rdrecord(str(tmp_path / "f"), smooth_frames=False).e_p_signal[0].astype(np.float32)
    assert x.shape == (4000,)
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(records.read_signal(tmp_path / "f", at, ecg, 1001, 2999), expected[1001:2999])
    # Annotation times count frames: on the lead's own rate they are four times larger, at the frame rate as written.
    wfdb.wrann("f", "atr", np.array([100, 400, 700]), symbol=["N", "V", "N"], write_dir=str(tmp_path))
    np.testing.assert_array_equal(records.read_annotations(tmp_path / "f", "f", "atr", at.fs).sample, [400, 1600, 2800])
    np.testing.assert_array_equal(records.read_annotations(tmp_path / "f", "f", "atr", h.fs).sample, [100, 400, 700])
    np.testing.assert_array_equal(records.read_annotations(tmp_path / "f", "f", "atr").sample, [100, 400, 700])
    # A file that states its own time resolution (WFDB high-resolution mode) is taken at its word.
    wfdb.wrann("f", "hr", np.array([400, 1600]), symbol=["N", "N"], fs=1000, write_dir=str(tmp_path))
    np.testing.assert_array_equal(records.read_annotations(tmp_path / "f", "f", "hr", at.fs).sample, [400, 1600])
    np.testing.assert_array_equal(records.read_annotations(tmp_path / "f", "f", "hr", h.fs).sample, [100, 400])


def _segments(folder: Path) -> np.ndarray:
    """Multi-segment record ``m``: ``m_1`` (1,000 samples), a 500-sample gap, ``m_2`` (1,500), MLII at 360 Hz."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(1000), rng.standard_normal(1500)
    for name, x in (("m_1", a), ("m_2", b)):
        wfdb.wrsamp(name, fs=360, units=["mV"], sig_name=["MLII"], p_signal=x[:, None], fmt=["16"],
                    write_dir=str(folder))
    (folder / "m.hea").write_text("m/3 1 360 3000\nm_1 1000\n~ 500\nm_2 1500\n")
    return np.concatenate([a, np.full(500, np.nan), b])


def test_a_multi_segment_record_is_one_record_with_its_full_length(tmp_path):
    _segments(tmp_path)
    write_record(tmp_path, "100", seconds=5)
    h = records.read_header(tmp_path / "m", "m")
    assert (h.sig_len, h.sig_names, h.n_segments) == (3000, ("MLII",), 3)
    assert h.files == ("m_1.hea", "m_1.dat", "m_2.hea", "m_2.dat")
    x = records.read_signal(tmp_path / "m", h, _lead(h))
    expected = np.concatenate([wfdb.rdrecord(str(tmp_path / "m_1")).p_signal[:, 0], np.full(500, np.nan),
                               wfdb.rdrecord(str(tmp_path / "m_2")).p_signal[:, 0]]).astype(np.float32)
    np.testing.assert_array_equal(x, expected)
    assert np.isnan(x[1000:1500]).all() and np.isfinite(x[:1000]).all() and np.isfinite(x[1500:]).all()
    np.testing.assert_array_equal(records.read_signal(tmp_path / "m", h, _lead(h), 900, 1600), expected[900:1600])
    # The folder lists it once; its segments are part of it, not records of their own.
    listing = sources.FolderSource(str(tmp_path)).prepare()
    assert listing.records == ("100", "m")
    local = sources.FolderSource(str(tmp_path)).fetch("m")
    assert [n for n, _ in local.files] == ["m.hea", "m_1.hea", "m_1.dat", "m_2.hea", "m_2.dat"]
    # A segment that does not hold what the master header gives it fails the record.
    (tmp_path / "m.hea").write_text("m/3 1 360 3100\nm_1 1000\n~ 500\nm_2 1600\n")
    with pytest.raises(RecordError, match="signal: m.hea gives segment m_2 1600 samples; m_2.hea declares or its "
                                          "files hold 1500"):
        records.read_header(tmp_path / "m", "m")


def test_a_variable_layout_record_reads_its_lead_by_name(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((800, 2)), rng.standard_normal(700)
    wfdb.wrsamp("v_1", fs=125, units=["mV", "mmHg"], sig_name=["II", "ABP"], p_signal=a, fmt=["16", "16"],
                write_dir=str(tmp_path))
    wfdb.wrsamp("v_2", fs=125, units=["mmHg"], sig_name=["ABP"], p_signal=b[:, None], fmt=["16"],
                write_dir=str(tmp_path))
    (tmp_path / "v_layout.hea").write_text("v_layout 2 125 0\n~ 0 1/mV 16 0 0 0 0 II\n~ 0 1/mmHg 16 0 0 0 0 ABP\n")
    (tmp_path / "v.hea").write_text("v/3 2 125 1500\nv_layout 0\nv_1 800\nv_2 700\n")
    h = records.read_header(tmp_path / "v", "v")
    assert (h.sig_len, h.sig_names) == (1500, ("II", "ABP"))
    ii = records.read_signal(tmp_path / "v", h, records.choose_lead(h, ("II",)))
    abp = records.read_signal(tmp_path / "v", h, records.choose_lead(h, ("ABP",)))
    np.testing.assert_allclose(ii[:800], a[:, 0], atol=1e-3)
    assert np.isnan(ii[800:]).all()  # the second segment has no II
    np.testing.assert_allclose(abp, np.concatenate([a[:, 1], b]), atol=1e-3)
    assert sources.FolderSource(str(tmp_path)).prepare().records == ("v",)


def test_a_multi_segment_record_is_fetched_whole_from_a_remote_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    expected = _segments(src)
    (src / "RECORDS").write_text("m\n")
    with HTTPMirror(src) as http:
        ready = sources.RemoteSource(http.url.rstrip("/")).prepare(tmp_path / "cache").source
        local = ready.fetch("m", (), tmp_path / "cache")
    assert sorted(n for n, _ in local.files) == ["m.hea", "m_1.dat", "m_1.hea", "m_2.dat", "m_2.hea"]
    h = records.read_header(local.base, "m")
    np.testing.assert_allclose(records.read_signal(local.base, h, _lead(h)), expected, atol=1e-3)


def test_records_files_are_honoured_in_folders_subfolders_and_archives(tmp_path):
    db = tmp_path / "db"
    (db / "p00").mkdir(parents=True)
    for name in ("a", "b", "c"):
        write_record(db, name, seconds=2)
    write_record(db / "p00", "x", seconds=2)
    write_record(db / "p00", "y", seconds=2)
    (db / "RECORDS").write_text("b\na\np00/\n")  # c is not listed; p00/ is a folder with its own list
    (db / "p00" / "RECORDS").write_text("y\n")
    assert sources.FolderSource(str(db)).prepare().records == ("b", "a", "p00/y")
    # No RECORDS at the root: every header, except where a folder has its own list.
    (db / "RECORDS").unlink()
    assert sources.FolderSource(str(db)).prepare().records == ("a", "b", "c", "p00/y")
    # An archive holding the database folder (RECORDS inside it), as an --input of `score` gives it.
    (db / "RECORDS").write_text("b\np00/\n")
    archive = tmp_path / "db.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(db.rglob("*")):
            if p.is_file():
                z.write(p, f"db/{p.relative_to(db).as_posix()}")
    source = sources.resolve_source(str(archive), work_dir=tmp_path / "work")
    assert source.prepare(tmp_path / "cache").records == ("db/b", "db/p00/y")


def test_a_signal_without_a_name_gets_one(tmp_path):
    write_record(tmp_path, "s", seconds=2)
    lines = (tmp_path / "s.hea").read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-1])  # the first signal's description removed
    (tmp_path / "s.hea").write_text("\n".join(lines) + "\n")
    h = records.read_header(tmp_path / "s", "s")
    assert h.sig_names == ("signal 0", "V1")
    # An unnamed signal is not known to be ECG: the fallback takes the ECG lead; naming it takes it.
    assert records.choose_lead(h, ("MLII",), "first") == records.Lead(1, "V1", True)
    assert records.choose_lead(h, ("signal 0",)).index == 0
    assert records.read_signal(tmp_path / "s", h, _lead(h)).shape == (720,)


def test_reading_a_real_record_gives_what_wfdb_rdrecord_gives(mirror):
    base = mirror / "mitdb" / "1.0.0" / "114"  # MLII second
    h = records.read_header(base, "114")
    assert (h.fs, h.sig_len, h.sig_names, h.spf, h.n_segments) == (360.0, 650000, ("V5", "MLII"), (), 0)
    for i in range(2):
        np.testing.assert_array_equal(records.read_signal(base, h, _lead(h, i)),
                                      wfdb.rdrecord(str(base), channels=[i]).p_signal[:, 0].astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# end to end: `ecg-pipeline score` on a folder of such records


def test_score_reports_each_bad_record_and_scores_the_rest(untrained_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_record(folder, "100", seconds=30)
    _huge(folder)
    x = (np.asarray(wfdb.rdrecord(str(folder / "100")).p_signal[:, 0]) * 200).astype("<i2")
    (folder / "iso.dat").write_bytes(x.tobytes())
    (folder / "iso.hea").write_text("iso 1 360 10800 2014-05-08 05:05:15\niso.dat 16 200 16 0 0 0 0 MLII\n")
    (folder / "nolen.dat").write_bytes(x.tobytes())
    (folder / "nolen.hea").write_text("nolen 1 360\nnolen.dat 16 200 16 0 0 0 0 ECG\n")  # no length
    (folder / "noname.dat").write_bytes(x.tobytes())
    (folder / "noname.hea").write_text("noname 1 360 10800\nnoname.dat 16 200 16 0 0 0 0\n")  # no signal name
    _segments(folder)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "score", "--model", str(untrained_model),
                        "--input", str(folder), "--out", str(out), "--workers", "1", "--no-annotations",
                        "--no-progress", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # 1: some records failed, the job ran
    table = pd.read_csv(tmp_path / "s.records.csv", keep_default_na=False).set_index("record")
    assert sorted(table.index) == ["100", "huge", "iso", "m", "nolen", "noname"]  # m's segments are not records
    assert table.loc["noname", "status"] == "failed" and table.loc["noname", "error"].startswith(
        "lead: no ECG lead among its signals ['signal 0']")
    assert table.loc["huge", "status"] == "failed"
    assert table.loc["huge", "error"] == ("signal: huge.dat is truncated: 43,200 bytes, the header implies "
                                          "2,000,000,000,000: huge.hea declares 1000000000000 samples, huge.dat "
                                          "holds 21600 (format 16)")
    assert "huge" in r.stdout  # named in the job's report
    ok = table[table.status == "ok"]
    assert sorted(ok.index) == ["100", "iso", "m", "nolen"]
    assert ok.loc["iso", "sig_len"] == ok.loc["nolen", "sig_len"] == 10800 and ok.loc["m", "sig_len"] == 3000
    assert ok.loc["nolen", "lead"] == "ECG"
    # The same signal, whatever its header's date or length field: the same beats.
    assert ok.loc["iso", "n_beats"] == ok.loc["nolen", "n_beats"] > 0


@pytest.mark.realdata
def test_an_stft_longer_than_the_window_is_one_line_and_leaves_no_store(mirror, tmp_path):
    (tmp_path / "c.yaml").write_text("stft:\n  nperseg: 4096\n")
    out = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "mitdb", "--source",
                        mirror.as_uri(), "--records", "100", "--out", str(out), "--config", str(tmp_path / "c.yaml"),
                        "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ecg-pipeline: error: stft.nperseg (4096) is longer than the window (252 samples at 360 Hz)" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.realdata
def test_a_store_where_every_record_failed_is_laid_out_again_by_the_next_run(mirror, tmp_path):
    # A copy of record 100 whose signal file was cut short: its one record fails, so nothing tells the arrays
    # their shape on the first run.
    broken = tmp_path / "broken" / "mitdb" / "1.0.0"
    broken.mkdir(parents=True)
    real = mirror / "mitdb" / "1.0.0"
    for ext in ("hea", "atr"):
        (broken / f"100.{ext}").write_bytes((real / f"100.{ext}").read_bytes())
    (broken / "100.dat").write_bytes((real / "100.dat").read_bytes()[:5000])
    out = tmp_path / "s.zarr"

    def preprocess(source, cache):
        return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "mitdb", "--source",
                               source.as_uri(), "--records", "100", "--out", str(out), "--workers", "1",
                               "--no-progress", "--cache-dir", str(tmp_path / cache)], capture_output=True, text=True,
                              timeout=300)

    first = preprocess(tmp_path / "broken", "cache-a")
    assert first.returncode == 1 and "100" in first.stdout and "truncated" in first.stdout, first.stdout + first.stderr
    second = preprocess(mirror, "cache-b")
    assert second.returncode == 0, second.stdout + second.stderr
    from ecg_pipeline.pipeline.store import open_dataset

    ds = open_dataset(str(out))
    assert ds.spectrogram.encoding["chunks"][1:] == (ds.sizes["freq"], ds.sizes["time"]) == (8, 24)  # the 40 Hz band of beat stores
    assert (ds.record_status.values == "ok").all() and ds.sizes["segment"] > 2000


@pytest.mark.realdata
@pytest.mark.parametrize("job", ["preprocess", "score"])
def test_a_cache_that_cannot_be_written_is_one_line_before_any_work(job, mirror, untrained_model, tmp_path):
    # A path under a regular file cannot be created, whoever runs the test (root ignores permission bits).
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "out.zarr"
    cache = tmp_path / "a-file" / "cache"
    with contextlib.ExitStack() as stack:
        if job == "preprocess":  # a remote source is fetched into the cache (a local one is read in place)
            http = stack.enter_context(HTTPMirror(mirror))
            args = ["preprocess", "mitdb", "--source", http.url, "--records", "100,101"]
        else:  # an archive input is extracted under the cache
            with zipfile.ZipFile(tmp_path / "in.zip", "w") as z:
                for ext in ("hea", "dat"):
                    z.write(mirror / "mitdb" / "1.0.0" / f"100.{ext}", f"100.{ext}")
            args = ["score", "--model", str(untrained_model), "--input", str(tmp_path / "in.zip")]
        r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args, "--out", str(out), "--workers",
                            "1", "--no-progress", "--cache-dir", str(cache)], capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(rf"error: download cache {re.escape(str(cache))}\S*: cannot write there \(NotADirectoryError",
                     r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and "100" not in r.stdout


def _wr(folder: Path, name: str, x: np.ndarray, fs: float, lead: str = "MLII", units: str = "mV") -> None:
    gain = 200.0 if units == "mV" else 0.2  # adu per unit: 5 uV steps either way
    wfdb.wrsamp(name, fs=fs, units=[units], sig_name=[lead], p_signal=np.asarray(x, float)[:, None], fmt=["16"],
                adc_gain=[gain], baseline=[0], write_dir=str(folder))


def test_records_outside_what_the_model_knows_are_refused_or_flagged_never_silently_scored(untrained_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_record(folder, "good", seconds=30)
    rng = np.random.default_rng(0)
    n = 360 * 30
    wfdb.wrsamp("nan", fs=360, units=["mV"], sig_name=["MLII"], p_signal=np.full((n, 1), np.nan), fmt=["16"],
                adc_gain=[200.0], baseline=[0], write_dir=str(folder))
    _wr(folder, "zero", np.zeros(n), 360)
    _wr(folder, "flat", 0.005 * rng.standard_normal(n), 360)  # a flat line with a little noise
    _wr(folder, "tiny", np.sin(np.arange(10) / 3.0), 360)
    t = np.arange(128 * 30)
    beats = (t % 102 == 0).astype(float)  # beats at 128 Hz, as a Holter at that rate records them
    _wr(folder, "slow", np.convolve(beats, np.hanning(9), "same"), 128)
    _wr(folder, "pleth", np.sin(t / 20.0), 128, lead="PLETH")
    # The same lead and the same noise in microvolts: the detector's floor is in mV whatever the units.
    good = wfdb.rdrecord(str(folder / "good")).p_signal[:, 0]
    _wr(folder, "good_uv", 1000 * good, 360, units="uV")
    _wr(folder, "flat_uv", 5 * rng.standard_normal(n), 360, units="uV")

    def score(out, config=None):
        args = [sys.executable, "-m", "ecg_pipeline.jobs.cli", "score", "--model", str(untrained_model), "--input",
                str(folder), "--out", str(out), "--workers", "1", "--no-annotations", "--no-progress",
                "--cache-dir", str(tmp_path / "cache")]
        if config:
            (tmp_path / "c.yaml").write_text(config)
            args += ["--config", str(tmp_path / "c.yaml")]
        r = subprocess.run(args, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
        return r, pd.read_csv(str(out).removesuffix(".zarr") + ".records.csv", keep_default_na=False).set_index("record")

    r, table = score(tmp_path / "s.zarr")
    assert table.loc["good", "status"] == "ok" and table.loc["good", "quality"] == ""
    expected = {"nan": "quality: no signal (all 10,800 samples missing)", "zero": "quality: flat (peak-to-peak 0 mV",
                "flat": "quality: flat (peak-to-peak", "tiny": "quality: too short (0.03 s; the model needs 0.7 s)",
                "slow": "quality: sampling rate 128 Hz below the 360 Hz the model needs",
                "flat_uv": "quality: flat (peak-to-peak",
                "pleth": "lead: no ECG lead among its signals ['PLETH']"}
    for record, error in expected.items():
        assert table.loc[record, "status"] == "failed" and table.loc[record, "error"].startswith(error), \
            (record, table.loc[record, "error"])
        assert record in r.stdout
    # `quality: flag`: the 128 Hz record is scored, and the table and the summary say why it is doubtful.
    r, table = score(tmp_path / "flagged.zarr", "quality: flag\n")
    assert table.loc["slow", "status"] == "ok" and table.loc["slow", "n_beats"] > 0
    assert table.loc["good_uv", "n_beats"] == table.loc["good", "n_beats"] > 0
    for record in ("flat", "flat_uv"):  # scored when asked to, and noise gives no beat, in mV or in uV
        assert table.loc[record, "status"] == "ok" and table.loc[record, "n_detected"] == 0, record
    assert table.loc["slow", "quality"] == "sampling rate 128 Hz below the 360 Hz the model needs"
    assert re.search(r"quality +\d+ record\(s\) scored with a doubt", r.stdout) and "slow  sampling rate" in r.stdout


@pytest.mark.realdata
def test_a_model_whose_metadata_disagrees_with_its_network_is_one_line_and_leaves_no_store(untrained_model, mirror,
                                                                                           tmp_path):
    from ecg_pipeline.pipeline import models

    network, meta = models.load_model(untrained_model)
    wrong = models.save_model(network, tmp_path / "wrong.keras", {**meta, "classes": ["N", "S", "V"]})
    out = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "score", "--model", str(wrong), "--input",
                        str(mirror / "mitdb" / "1.0.0"), "--records", "100", "--out", str(out), "--workers", "1",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "names 3 classes (N, S, V), the network scores 5; metadata and network disagree" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    # Unknown records are refused the same way: one line, no store.
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "score", "--model", str(untrained_model),
                        "--input", str(mirror / "mitdb" / "1.0.0"), "--records", "100,999", "--out", str(out),
                        "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no record(s) 999" in r.stderr and not out.exists(), r.stderr
