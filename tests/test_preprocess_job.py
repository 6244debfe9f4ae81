"""The preprocess job end to end on synthetic WFDB databases, served over real loopback HTTP,
on a real local Dask cluster: good records, every kind of bad input, and resuming."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr

from helpers import Faults, HTTPMirror, make_db, write_record, write_sums
from ecg_pipeline.jobs.preprocess import PreprocessRequest, plan_batch_size, run_preprocess
from ecg_pipeline.pipeline import store
from ecg_pipeline.pipeline.config import config_from_dict

FAST = {"download": {"retries": 1, "backoff_s": 0.01, "timeout_s": 10}, "store": {"chunk_size": 16}}
VERSION = "0.0.1"


def _good_records():
    return {
        "100": {"seconds": 10},
        "101": {"seconds": 12, "leads": ("V5", "MLII"), "seed": 1},  # MLII second, like 114
        "102": {"seconds": 10, "leads": ("V5", "V2"), "seed": 2},  # no MLII, like 102 and 104
        "103": {"seconds": 10, "beats": np.array([100, 400, 700, 1000, 1300]),
                "symbols": ["N", "B", "V", "r", "+"], "seed": 3},  # B, r: beats outside EC57
        "109": {"seconds": 10, "beats": np.array([5, 300, 600, 3595]), "symbols": ["N", "A", "N", "N"], "seed": 4},
    }


@pytest.fixture
def bad_db(tmp_path):
    """A database with five good records and one of each kind of bad input."""
    root = tmp_path / "src"
    records = {**_good_records(), "104": {"seconds": 10, "leads": ("ABP", "PLETH")}, "105": {"seconds": 10},
               "106": {"seconds": 10}, "107": {"seconds": 10}, "108": {"seconds": 10}}
    folder = make_db(root, records, VERSION, sums=False)
    with open(folder / "106.dat", "r+b") as f:  # truncated, and published that way (checksum matches)
        f.truncate(2000)
    (folder / "107.hea").write_text("107 two 360\n107.dat 212 200 11 1024 0 0 0 MLII\n")
    import wfdb

    # A lead that carries nothing (all zeros) under good annotations: stored, and flagged by its quality verdict.
    wfdb.wrsamp("110", fs=360, units=["mV"], sig_name=["MLII"], p_signal=np.zeros((3600, 1)), fmt=["16"],
                adc_gain=[200.0], baseline=[0], write_dir=str(folder))
    wfdb.wrann("110", "atr", np.arange(180, 3400, 288), symbol=["N"] * 12, write_dir=str(folder))
    records["110"] = {}
    write_sums(folder)
    (folder / "108.atr").unlink()  # listed in SHA256SUMS.txt, absent at the source
    (folder / "RECORDS").write_text("\n".join([*records, "../evil"]) + "\n")
    return root


def _run(client, url, out, **kw):
    config = config_from_dict({**FAST, **kw.pop("config", {})})
    req = PreprocessRequest(db="mitdb", version=VERSION, source=url, out=str(out), config=config,
                            cache_dir=str(out) + ".cache", **kw)
    return run_preprocess(req, client)


def _expected_beats(folder, record, before=90, after=162):
    import wfdb

    from ecg_pipeline.pipeline.labels import label_beats

    ann = wfdb.rdann(str(folder / record), "atr")
    n = wfdb.rdheader(str(folder / record)).sig_len
    b = label_beats(ann.sample, ann.symbol)
    return int(((b.sample >= before) & (b.sample + after <= n)).sum())


def test_bad_input_fails_alone_with_its_cause(client, bad_db, tmp_path):
    out = tmp_path / "s.zarr"
    with HTTPMirror(bad_db, Faults(corrupt={"105.dat"})) as srv:
        report = _run(client, srv.url, out)
    status = {r.record: (r.status, r.error) for r in report.records}
    assert {r for r, (s, _) in status.items() if s == "ok"} == {"100", "101", "102", "103", "109", "110"}
    quality = {r.record: r.quality for r in report.records if r.status == "ok"}
    assert quality.pop("110").startswith("flat (peak-to-peak 0 mV") and set(quality.values()) == {""}
    assert status["104"][1] == "lead: none of the leads ['MLII', 'II', 'V5', 'V1', 'V2', 'V4'] in signals ['ABP', 'PLETH']"
    assert status["105"][1].startswith("checksum: 105.dat: SHA-256 mismatch")
    assert status["106"][1].startswith("signal: 106.dat is truncated:")
    assert status["107"][1].startswith("header: cannot parse 107.hea")
    assert status["108"][1] == f"annotations: no 108.atr in {srv.url.rstrip('/')}/mitdb/{VERSION}"
    assert status["../evil"][1].startswith("download: unsafe file name '../evil'")
    assert report.missing_source_files == ("108.atr",)
    assert not report.ok and len(report.failed) == 6

    ds = store.open_dataset(str(out))
    folder = bad_db / "mitdb" / VERSION
    assert str(ds.record_quality.sel(record_id="110").values).startswith("flat (peak-to-peak 0 mV")
    table = ds[["record_status", "record_n_segments", "record_lead", "record_n_unknown", "record_n_dropped_edge"]]
    table = table.to_dataframe()
    for rec in ("100", "101", "102", "103", "109"):
        assert table.loc[rec, "record_n_segments"] == _expected_beats(folder, rec)
        assert (ds.record.values == rec).sum() == _expected_beats(folder, rec)
    assert table.loc["101", "record_lead"] == "MLII" and table.loc["102", "record_lead"] == "V5"
    assert table.loc["103", "record_n_unknown"] == 2 and table.loc["109", "record_n_dropped_edge"] == 2
    assert table.loc["105", "record_status"] == "failed" and table.loc["105", "record_n_segments"] == 0
    r103 = ds.where(ds.record == "103", drop=True)
    assert r103.symbol.values.tolist() == ["N", "B", "V", "r"] and r103.label.values.tolist() == ["N", "Q", "V", "Q"]
    assert np.isfinite(ds.spectrogram.values.astype(np.float32)).all()


def test_rerun_finishes_failed_records_and_matches_a_clean_run(client, bad_db, tmp_path):
    out = tmp_path / "s.zarr"
    with HTTPMirror(bad_db, Faults(corrupt={"105.dat"})) as srv:
        first = _run(client, srv.url, out)
    assert {r.record for r in first.failed} >= {"105", "108"}
    folder = bad_db / "mitdb" / VERSION
    write_record(folder, "108", seconds=10)  # the source gets its file back
    write_sums(folder)
    (folder / "RECORDS").write_text("100\n101\n102\n103\n105\n108\n109\n")
    with HTTPMirror(bad_db) as srv:  # and stops corrupting 105.dat
        second = _run(client, srv.url, out)
        clean = _run(client, srv.url, tmp_path / "clean.zarr")
    assert second.ok and clean.ok
    assert second.chunks_skipped > 0 and second.chunks_written < second.chunks_total
    a, b = store.open_dataset(str(out)), store.open_dataset(str(tmp_path / "clean.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    # Plain xarray opens the resumed store from its consolidated metadata, written again by the second run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_datatree(str(out), engine="zarr")
    assert dict(plain["segments"].sizes) == {d: n for d, n in a.sizes.items() if d != "record_id"}
    assert plain["records"].sizes["record"] == a.sizes["record_id"] and plain.attrs["complete"] == 1


@pytest.mark.parametrize("as_url", [False, True])
def test_a_local_source_is_read_in_place_checked_and_never_copied(client, tmp_path, as_url):
    """A source on a local (or network) file system: the same store as over HTTP, nothing of it in the cache, its
    files still checked against SHA256SUMS.txt (a changed file fails its record with the cause)."""
    root = tmp_path / "src"
    folder = make_db(root, _good_records(), VERSION)
    with open(folder / "101.dat", "r+b") as f:  # a bit flipped after SHA256SUMS.txt was written
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    local = _run(client, root.as_uri() if as_url else str(root), tmp_path / "local.zarr")
    cache = tmp_path / "local.zarr.cache"
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".dat", ".hea", ".atr")]
    status = {r.record: (r.status, r.error) for r in local.records}
    assert status["101"][0] == "failed" and status["101"][1].startswith("checksum: 101.dat: SHA-256 mismatch"), status
    with HTTPMirror(root) as srv:
        remote = _run(client, srv.url, tmp_path / "http.zarr")
    assert {r.record: r.status for r in remote.records} == {r: s for r, (s, _) in status.items()}
    a, b = store.open_dataset(str(tmp_path / "local.zarr")), store.open_dataset(str(tmp_path / "http.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def test_one_pass_writes_the_store_two_passes_write(client, tmp_path):
    """Segments computed as each record is planned (the default) against a second read of every record
    (``store.one_pass_max_mb: 0``): the same store but for float32 rounding, and the same fingerprints, so
    either resumes the other without writing a chunk."""
    root = tmp_path / "src"
    make_db(root, _good_records(), VERSION)
    with HTTPMirror(root) as srv:
        one = _run(client, srv.url, tmp_path / "one.zarr")
        two = _run(client, srv.url, tmp_path / "two.zarr", config={"store": {"chunk_size": 16, "one_pass_max_mb": 0}})
        again = _run(client, srv.url, tmp_path / "two.zarr")
    assert one.ok and two.ok and one.n_segments == two.n_segments > 30 and one.chunks_total > 2
    assert again.chunks_written == 0 and again.chunks_skipped == again.chunks_total
    a, b = store.open_dataset(str(tmp_path / "one.zarr")), store.open_dataset(str(tmp_path / "two.zarr"))
    assert a.attrs["config_fingerprint"] == b.attrs["config_fingerprint"]
    xr.testing.assert_allclose(a.drop_attrs(), b.drop_attrs(), rtol=0, atol=1e-2)
    for name in ("spectrogram", "template"):
        assert float((a[name] != b[name]).mean()) < 1e-3  # float16 steps moved by the STFT's rounding, at most
    for name in ("anchor", "label", "rr", "record_status", "record_n_segments"):
        xr.testing.assert_identical(a[name].drop_attrs(), b[name].drop_attrs())


@pytest.mark.parametrize("served", [True, False])
def test_a_resume_reads_only_the_records_that_changed(client, tmp_path, served):
    """A finished store run again reads no record (the plans it keeps are reused: files and chunks unchanged);
    after one record changes at the source, only it and the records that share its chunks are read, and the
    store equals one made from scratch. Over HTTP the files' identity is SHA256SUMS.txt; for a local folder,
    each file's size and modification time."""
    root = tmp_path / "src"
    folder = make_db(root, _good_records(), VERSION)
    names = list(_good_records())
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(HTTPMirror(root)).url if served else str(root)
        first = _run(client, url, tmp_path / "s.zarr")
        again = _run(client, url, tmp_path / "s.zarr")
        write_record(folder, "103", seconds=10, seed=30)  # new content: another signal and other beats
        write_sums(folder)
        third = _run(client, url, tmp_path / "s.zarr")
        clean = _run(client, url, tmp_path / "clean.zarr")
    assert first.ok and (first.records_read, first.records_reused) == (len(names), 0)
    assert (again.records_read, again.records_reused, again.chunks_written) == (0, len(names), 0)
    assert "unchanged since the last run, 0 read" in again.text()
    assert third.ok and 1 <= third.records_read < len(names) and third.records_reused == len(names) - third.records_read
    assert 1 <= third.chunks_written < third.chunks_total
    a, b = store.open_dataset(str(tmp_path / "s.zarr")), store.open_dataset(str(tmp_path / "clean.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert a.attrs["segments_per_class"] == b.attrs["segments_per_class"]


def test_rows_the_store_holds_are_copied_not_read_again(client, tmp_path):
    """A store of the first records, its last chunk partly filled (as a killed job's last commit leaves it),
    extended to the whole database: the chunk is written again whole, the first records' rows copied from the
    store instead of reading those records again, and the store equals one made in one go."""
    root = tmp_path / "src"
    make_db(root, _good_records(), VERSION)
    names = list(_good_records())
    with HTTPMirror(root) as mirror:
        part = _run(client, mirror.url, tmp_path / "s.zarr", records=tuple(names[:2]))
        full = _run(client, mirror.url, tmp_path / "s.zarr")
        clean = _run(client, mirror.url, tmp_path / "clean.zarr")
    n_part = sum(o.n_segments for o in part.records)
    assert part.ok and n_part % FAST["store"]["chunk_size"], "the first records must end inside a chunk"
    assert full.ok and (full.records_read, full.records_reused) == (len(names) - 2, 2)
    assert full.stage_s.get("reuse", 0) > 0  # the partly filled chunk took its first rows from the store
    a, b = store.open_dataset(str(tmp_path / "s.zarr")), store.open_dataset(str(tmp_path / "clean.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert clean.ok and a.attrs["segments_per_class"] == b.attrs["segments_per_class"]


def test_a_chunk_a_kill_left_as_the_commit_before_wrote_it_keeps_that_commits_records(client, tmp_path):
    """A job killed after a commit saved the plans of a longer prefix but before it wrote the chunk being filled
    again: the store holds that chunk as the commit before wrote it. A resume reuses the records that commit had
    put in it (they were read again, ~4 % of a 10,000-recording tree) and equals a store made in one go."""
    root = tmp_path / "src"
    make_db(root, _good_records(), VERSION)
    names = list(_good_records())
    with HTTPMirror(root) as mirror:
        part = _run(client, mirror.url, tmp_path / "s.zarr", records=tuple(names[:2]))
        longer = _run(client, mirror.url, tmp_path / "longer.zarr", records=tuple(names[:3]))
        assert part.ok and longer.ok
        n_part = sum(o.n_segments for o in part.records)
        assert n_part % FAST["store"]["chunk_size"], "the first records must end inside a chunk"
        # The killed commit: the third record's plan saved after the first two, its chunk not written again
        import zarr

        third = str(zarr.open_array(str(tmp_path / "longer.zarr" / "_state" / "record_plan"), mode="r")[2])
        store.write_plans(str(tmp_path / "s.zarr"), [third], start=2)
        full = _run(client, mirror.url, tmp_path / "s.zarr")
        clean = _run(client, mirror.url, tmp_path / "clean.zarr")
    assert full.ok and (full.records_read, full.records_reused) == (len(names) - 2, 2)
    a, b = store.open_dataset(str(tmp_path / "s.zarr")), store.open_dataset(str(tmp_path / "clean.zarr"))
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert clean.ok and a.attrs["segments_per_class"] == b.attrs["segments_per_class"]


def test_a_records_segments_leave_the_workers_once_its_chunks_are_written(client, tmp_path):
    """While records are still being read, the plan batches (their segments) the workers hold are only those of
    records whose chunks are not written yet: records of the committed prefix but its chunk being filled let theirs
    go. A batch was kept to the end of the reading phase (2 GB a worker at 100,000 recordings). Checked at each
    batch read, waiting (on the scheduler's state) for the chunk writes submitted so far and the releases."""
    import time

    names = [f"1{i:02d}" for i in range(12)]
    root = tmp_path / "src"
    make_db(root, {r: {"seconds": 20, "seed": i} for i, r in enumerate(names)}, VERSION)  # > 16 beats each
    out = tmp_path / "s.zarr"

    def held_plans(dask_scheduler) -> list[str]:
        """The records whose plan batch a worker holds (keys ``plan-<first record>-<n>-<random>``), or None while a
        chunk write runs."""
        tasks = {str(k): ts.state for k, ts in dask_scheduler.tasks.items()}
        if any(k.startswith("chunk-") and s not in ("memory", "erred", "released", "forgotten")
               for k, s in tasks.items()):
            return None
        return [k.split("-")[1] for k, s in tasks.items()
                if k.startswith("plan-") and not k.startswith("plan-light-") and s == "memory"]

    def committed() -> int:
        """Records of the last commit's prefix (rows of its per-record table)."""
        try:
            return xr.open_zarr(str(out), group="records", consolidated=False).sizes["record"]
        except (FileNotFoundError, KeyError, ValueError):
            return 0

    checks: list[tuple[int, list[str]]] = []

    class Bar:
        def __init__(self, desc: str, total: int):
            self.desc = desc

        def update(self, n: int = 1) -> None:
            if self.desc != "download + plan":
                return
            p = committed()  # the last commit's, before this batch's (``then`` runs after ``update``)
            allowed = set(names[max(p - 2, 0):])  # the chunk being filled holds parts of 2 records at most
            deadline = time.monotonic() + 20
            while ((held := client.run_on_scheduler(held_plans)) is None or not set(held) <= allowed) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            checks.append((p, held))
            assert held is not None and set(held) <= allowed, (p, sorted(held or []))

        def close(self) -> None:
            pass

    config = config_from_dict({**FAST, "store": {"chunk_size": 16, "commit_records": 1}})
    with HTTPMirror(root) as mirror:
        req = PreprocessRequest(db="mitdb", version=VERSION, source=mirror.url, out=str(out), config=config,
                                cache_dir=str(tmp_path / "cache"))
        report = run_preprocess(req, client, progress=Bar)
    assert report.ok and report.records_read == len(names) and len(checks) == len(names)


def test_unknown_symbols_policies(client, tmp_path):
    root = tmp_path / "src"
    make_db(root, {"103": _good_records()["103"]}, VERSION)
    with HTTPMirror(root) as srv:
        dropped = _run(client, srv.url, tmp_path / "d.zarr", config={"unknown_symbols": "drop"})
        failed = _run(client, srv.url, tmp_path / "f.zarr", config={"unknown_symbols": "fail"})
    assert dropped.records[0].n_segments == 2 and dropped.records[0].n_dropped_unknown == 2
    assert dropped.segments_per_class["Q"] == 0
    assert failed.records[0].error == "annotations: unknown annotation symbols ['B', 'r'] (2 annotations)"


def test_config_change_is_refused_on_resume(client, tmp_path):
    root = tmp_path / "src"
    make_db(root, {"100": {"seconds": 10}}, VERSION)
    with HTTPMirror(root) as srv:
        _run(client, srv.url, tmp_path / "s.zarr")
        with pytest.raises(Exception, match="different config_fingerprint"):
            _run(client, srv.url, tmp_path / "s.zarr", config={"window": {"before_s": 0.3}})
        r = _run(client, srv.url, tmp_path / "s.zarr", config={"window": {"before_s": 0.3}}, overwrite=True)
    assert r.ok and store.open_dataset(str(tmp_path / "s.zarr")).attrs["config"]["window"]["before_s"] == 0.3


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_exit_codes_and_summary(bad_db, tmp_path):
    with HTTPMirror(bad_db) as srv:
        ok = _cli("preprocess", "mitdb", "--version", VERSION, "--source", srv.url, "--out", str(tmp_path / "a.zarr"),
                  "--records", "100,102", "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "c"))
        bad = _cli("preprocess", "mitdb", "--version", VERSION, "--source", srv.url, "--out", str(tmp_path / "b.zarr"),
                   "--records", "100,104", "--workers", "1", "--no-progress", "--cache-dir", str(tmp_path / "c"))
    assert ok.returncode == 0, ok.stderr
    assert "records     2 done, 0 failed, 2 total" in ok.stdout and "Dask dashboard:" in ok.stderr
    assert bad.returncode == 1
    assert "1 failed" in bad.stdout and "104  lead: none of the leads" in bad.stdout
    ins = _cli("inspect", str(tmp_path / "a.zarr"))
    assert ins.returncode == 0 and "102      ok    V5" in ins.stdout


def test_cli_unreachable_source_and_bad_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("download: {retries: 0}\n")
    r = _cli("preprocess", "mitdb", "--source", "http://127.0.0.1:9/", "--out", str(tmp_path / "x.zarr"),
             "--workers", "1", "--no-progress", "--config", str(cfg))
    assert r.returncode == 2 and "ecg-pipeline: error:" in r.stderr and "127.0.0.1:9" in r.stderr
    # The listing ran on a worker, which may see another network than the driver: the message says so.
    assert re.search(r"seen on Dask worker tcp://127\.0\.0\.1:\d+", r.stderr), r.stderr
    # One clear line: neither distributed's "Compute Failed" record of the task nor a traceback (those need -v).
    assert "Traceback" not in r.stderr and "Compute Failed" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line.lower()] == \
        [line for line in r.stderr.splitlines() if line.startswith("ecg-pipeline: error:")], r.stderr
    assert not (tmp_path / "x.zarr").exists()
    cfg.write_text("stft: {nperseg: 1}\n")
    r = _cli("preprocess", "mitdb", "--out", str(tmp_path / "x.zarr"), "--config", str(cfg))
    assert r.returncode == 2 and "stft.nperseg: 1 is less than the minimum" in r.stderr and "c.yaml" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    cfg.write_text("window: {before_s: [1]}\n")  # a wrong type: one line too
    r = _cli("preprocess", "mitdb", "--print-config", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "window.before_s: expected a number" in r.stderr
    cfg.write_bytes(b"leads: [\xe9]\n")
    r = _cli("preprocess", "mitdb", "--print-config", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not UTF-8 text" in r.stderr


def test_the_source_comes_from_ecg_pipeline_source_and_the_default_source_says_how_to_change_it(tmp_path):
    """$ECG_PIPELINE_SOURCE stands in for --source; an unreachable physionet.org (the default) suggests --source
    (tested without reaching it: only 127.0.0.1 is contacted here)."""
    import argparse
    import os

    from ecg_pipeline.jobs.cli import _hint_source
    from ecg_pipeline.pipeline.sources import SourceUnreachable

    cfg = tmp_path / "c.yaml"
    cfg.write_text("download: {retries: 0}\n")
    env = {**os.environ, "ECG_PIPELINE_SOURCE": "http://127.0.0.1:9/"}
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "mitdb", "--out",
                        str(tmp_path / "x.zarr"), "--workers", "1", "--no-progress", "--config", str(cfg)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "http://127.0.0.1:9/mitdb/1.0.0: unreachable" in r.stderr, r.stderr
    assert "pass --source" not in r.stderr  # the user chose that source
    no_source = argparse.Namespace(source=None, input=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("ECG_PIPELINE_SOURCE", raising=False)
        with pytest.raises(SourceUnreachable, match=r"unreachable: timed out\. .*pass --source .*ECG_PIPELINE_SOURCE"):
            with _hint_source(no_source):
                raise SourceUnreachable("https://physionet.org/files/mitdb/1.0.0: unreachable: timed out")
        with pytest.raises(SourceUnreachable, match=r"timed out$"):
            with _hint_source(argparse.Namespace(source="http://127.0.0.1:9/", input=None)):
                raise SourceUnreachable("http://127.0.0.1:9/mitdb/1.0.0: unreachable: timed out")


def test_print_config_is_loadable(tmp_path):
    r = _cli("preprocess", "mitdb", "--print-config")
    assert r.returncode == 0
    (tmp_path / "c.yaml").write_text(r.stdout)
    from ecg_pipeline.pipeline.config import PreprocessConfig, load_config

    assert load_config(tmp_path / "c.yaml") == PreprocessConfig()


def test_plan_batches_are_at_most_a_quarter_of_the_commit_step():
    assert plan_batch_size(48, 2) == 1 and plan_batch_size(100_000, 2) == 64  # a few long records; thousands
    assert plan_batch_size(10_000, 2, commit_step=200) == 50  # a kill loses the batches in flight
    assert plan_batch_size(100_000, 2, commit_step=2_000) == 64
    assert plan_batch_size(300, 2, commit_step=1) == 1 and plan_batch_size(300, 2, commit_step=None) == 9
