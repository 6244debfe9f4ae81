"""Reports render themselves: the preprocess summary, its JSON, and the store summaries of `inspect`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zarr

from ecg_pipeline.pipeline import reports, scores, store
from ecg_pipeline.pipeline.errors import StoreError
from ecg_pipeline.pipeline.reports import PreprocessReport, RecordOutcome


def _row(record, status="ok", error="", quality="", n=10, offset=0):
    return RecordOutcome(record=record, status=status, error=error, quality=quality, checksum="verified",
                         lead="MLII", offset=offset, n_segments=n, n_dropped_edge=1, n_dropped_invalid=2,
                         n_dropped_unknown=3, n_unknown=4, n_nonbeat=0, fs=360.0, sig_len=3600)


def _report(rows, missing=()):
    return PreprocessReport(out="s.zarr", database="mitdb", version="1.0.0", records=rows,
                            segments_per_class={"N": 1234, "V": 5}, chunks_total=3, chunks_written=2, chunks_skipped=1,
                            missing_source_files=tuple(missing), listing_error=None, wall_s=12.34,
                            phase_s={"manifest": 0.5, "plan": 4.0}, stage_s={"stft": 1.0}, bytes_downloaded=2_500_000)


def test_preprocess_report_text_and_json():
    rows = [_row("100", quality="flat line", n=1000), _row("101", n=239, offset=1000),
            _row("104", status="failed", error="lead: none of the leads", n=0, offset=1239)]
    report = _report(rows, missing=("102-0.atr",))
    assert report.text() == (
        "\n"
        "mitdb 1.0.0 -> s.zarr\n"
        "  records     2 done, 1 failed, 3 total\n"
        "  segments    1,239   chunks written 2, already there 1, of 3\n"
        "  per class   N 1,234   V 5\n"
        "  dropped     2 at record edges, 4 over invalid samples, 6 unknown symbols (8 unknown in all)\n"
        "  downloaded  2.5 MB\n"
        "  wall time   12.3 s  (manifest 0.5 s, plan 4.0 s)\n"
        "  note: the source lacks 1 file(s) listed in SHA256SUMS.txt: 102-0.atr (no record that succeeded needed them)\n"
        "  quality     1 record(s) with a doubt (record_quality in the store):\n"
        "         100  flat line\n"
        "  failed records:\n"
        "         104  lead: none of the leads\n")
    d = report.to_dict()
    assert d["n_segments"] == 1239 and d["ok"] is False and list(d)[-2:] == ["n_segments", "ok"]
    assert d["records"][2] == {**d["records"][2], "record": "104", "status": "failed", "n_segments": 0}
    assert json.loads(json.dumps(d, default=str))["missing_source_files"] == ["102-0.atr"]


def test_many_doubtful_records_are_cut_to_twenty():
    report = _report([_row(f"r{i}", quality="noisy") for i in range(23)])
    lines = report.text().splitlines()
    assert "  quality     23 record(s) with a doubt (record_quality in the store):" in lines
    assert lines[-1] == "    ... and 3 more" and sum(line.endswith("noisy") for line in lines) == 20
    assert report.ok and "failed records" not in report.text()


def test_store_text_of_a_spectrogram_store_and_what_is_no_store(tmp_path):
    path = str(tmp_path / "s.zarr")
    layout = store.Layout(("100", "101"), (3, 2), 2, 3, 4)
    attrs = {"schema_version": store.store_schema()["schema_version"], "task": "beat", "anchor_kind": "r-peak", "label_source": {"kind": "beat-annotations"},
             "package": "ecg-pipeline", "package_version": "0", "database": "mitdb", "database_version": "1.0.0",
             "database_title": "MIT-BIH", "citation": "c", "source": "s", "label_map": {"N": "N"}, "classes": ["N"],
             "config": {}, "config_fingerprint": "0" * 64,
             "spectrogram": {k: 1 for k in ("fs", "n_before", "n_after", "nperseg", "hop", "nfft", "window",
                                            "log_eps", "transform")}}
    store.prepare(path, layout, attrs, "float16", coords={"freq": np.array([0.0, 5.0], np.float32),
                                                          "time": np.array([-0.1, 0.0, 0.1], np.float32)})
    for k in range(layout.n_chunks):
        sl = layout.chunk_slice(k)
        n = sl.stop - sl.start
        rec = np.array((["100"] * 3 + ["101"] * 2)[sl], object)
        coords = {"record": rec, "anchor": np.arange(sl.start, sl.stop), "symbol": np.array(["N"] * n, object),
                  "label": np.array(["N"] * n, object), "lead": np.array(["MLII"] * n, object)}
        store.write_chunk(path, k, sl, np.zeros((n, 2, 3), np.float32), coords, f"fp{k}")
    rows = [_row("100", n=3), _row("101", status="failed", error="signal: truncated", n=2, offset=3)]
    table = {"record_id": np.array([r.record for r in rows], object)}
    for name in ("status", "error", "quality", "checksum", "lead"):
        table[f"record_{name}"] = np.array([getattr(r, name) for r in rows], object)
    for name in ("offset", "n_segments", "n_dropped_edge", "n_dropped_invalid", "n_dropped_unknown", "n_unknown",
                 "n_nonbeat", "fs", "sig_len"):
        table[f"record_{name}"] = np.array([getattr(r, name) for r in rows])
    store.write_record_table(path, table)
    with pytest.raises(StoreError, match="has not finished"):
        reports.store_text(path)
    text = reports.store_text(path, require_complete=False)
    assert text == reports.spectrogram_store_text(path, require_complete=False)
    lines = text.splitlines()
    assert lines[0] == f"{path}: mitdb 1.0.0 (MIT-BIH), schema v{store.store_schema()['schema_version']}, complete=False"
    assert lines[2] == "  freq 0.0-5.0 Hz, time -0.100..+0.100 s"
    assert lines[4:] == ["    record  status  lead   beats   offset  checksum  error",
                         "       100      ok  MLII       3        0  verified  ",
                         "       101  failed  MLII       2        3  verified  signal: truncated"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="no Zarr v3 group"):
        reports.store_text(str(tmp_path / "plain"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["title"] = "mine"
    with pytest.raises(StoreError, match="not a store written by"):
        reports.store_text(str(tmp_path / "other.zarr"))


def test_store_text_of_a_scores_store(tmp_path):
    from ecg_pipeline.pipeline.scores import RecordScores, ScoresWriter

    path = str(tmp_path / "scores.zarr")
    classes = ("N", "S", "V", "F", "Q")
    attrs = {"schema_version": scores.scores_schema()["schema_version"], "kind": "scores", "task": "beat", "anchor_kind": "r-peak", "package": "ecg-pipeline",
             "package_version": "0", "model": "m.keras", "model_sha256": "ab" * 32, "model_database": "mitdb",
             "classes": list(classes), "detector": {}, "input": "in.zip", "config": {},
             "spectrogram": {"fs": 360.0, "n_before": 90, "n_after": 162, "nperseg": 64, "hop": 8, "nfft": 64,
                             "window": "hann", "log_eps": 1e-4},
             "config_fingerprint": "b" * 64}
    probability = np.eye(5, dtype=np.float32)[[0, 0, 2, 0]]  # N, N, V, N
    writer = ScoresWriter(path, attrs, classes, chunk_size=8)
    writer.commit([RecordScores("208", status="ok", error="", lead="MLII", fs=360.0, sig_len=4000,
                                anchor=np.arange(4) * 900 + 100, probability=probability,
                                reference=np.array([""] * 4, dtype=object), n_detected=4)])
    writer.finish({"complete": True})
    lines = reports.store_text(path).splitlines()
    assert lines[0] == f"{path}: beat scores of in.zip by m.keras (sha256 abababababab), schema v{scores.scores_schema()['schema_version']}, complete=True"
    assert lines[1] == "  4 beats, 1 records"
    assert lines[3].split() == ["record", "status", "beats", *classes, "ectopic", "error"]
    assert lines[4].split() == ["208", "ok", "4", "3", "0", "1", "0", "0", "25.0%"]


def test_many_failed_records_are_summarised_by_cause_not_listed_one_a_line():
    """A job over 100,000 records must not print a line a failure: up to 20 are listed, beyond that the counts by
    cause (the stage the error names), the first few records of each, and where to find every one."""
    few = [(f"r{i}", "signal: truncated") for i in range(3)]
    assert reports.failure_lines(few, "x") == ["  failed records:"] + [f"    {r:>8}  signal: truncated" for r, _ in few]
    many = ([(f"s{i}", f"signal: {i} bytes short") for i in range(30_000)]
            + [(f"h{i}", "header: no such file") for i in range(70_000)] + [("odd", "no stage given")])
    lines = reports.failure_lines(many, "every one: the error column of out.records.csv")
    assert len(lines) < 15 and "100,001" in lines[0] and "out.records.csv" in lines[0]
    assert lines[1].split() == ["header", "70,000"] and lines[6].split() == ["signal", "30,000"]
    assert lines[2].split() == ["h0", "header:", "no", "such", "file"] and "... and 69,997 more" in lines[5]
    assert any(line.split()[:2] == ["no", "stage"] for line in lines)  # an error without a stage is its own cause


@pytest.mark.parametrize("final", [False, True])
def test_record_columns_equal_the_table_of_the_outcomes(final):
    from ecg_pipeline.pipeline.extract import RecordPlan

    plans = {"a": RecordPlan("a", ok=True, fs=360.0, sig_len=3600, lead="MLII", checksum="verified",
                             anchor=np.arange(3), n_dropped_edge=2, quality="flat lead").held(),
             "b": RecordPlan("b", error="download: gone"),
             "c": RecordPlan("c", ok=True, fs=360.0, sig_len=7200, lead="V5", anchor=np.arange(5), n_unknown=1),
             "d": RecordPlan("d", ok=True, fs=360.0, anchor=np.arange(0))}
    names = list(plans)
    layout = store.Layout(tuple(names), tuple(p.n_segments for p in plans.values()), 2, 2, 4)
    failures = {"c": "write: chunk 1: disk full"}
    want = reports.record_table(reports.record_outcomes(names, layout, plans, failures, final=final))
    got = reports.record_columns(names, layout, plans, failures, final=final)
    assert list(got) == list(want)
    for column in want:
        assert got[column].dtype == want[column].dtype and got[column].tolist() == want[column].tolist(), column
    assert got["record_status"].tolist() == ["ok" if final else "pending", "failed", "failed",
                                            "ok" if final else "pending"]


def test_a_record_table_gives_back_the_rows_it_was_made_of():
    rows = [_row("100", quality="flat line", n=1000), _row("101", n=239, offset=1000),
            _row("104", status="failed", error="lead: none of the leads", n=0, offset=1239)]
    table = reports.RecordTable.from_rows(rows)
    assert len(table) == 3 and list(table) == rows and table[-1] == rows[2] and table[1:] == rows[1:]
    assert all(type(v) in (str, int, float) for v in dataclasses.asdict(table[0]).values())  # no numpy scalars
    assert table.rows(table.column("status") != "ok") == [rows[2]] and reports.RecordTable.from_rows(table) is table
    # a report keeps the table, never a list of rows; one made from rows says the same as one made from columns
    report, of_columns = _report(rows), _report(reports.RecordTable(reports.record_table(rows)))
    assert isinstance(report.records, reports.RecordTable) and report.text() == of_columns.text()
    assert report.failed == [rows[2]] and report.n_segments == 1239 and not report.ok
    assert _report([]).ok and _report([]).n_segments == 0 and "0 done, 0 failed, 0 total" in _report([]).text()
    with pytest.raises(ValueError, match="different lengths"):
        reports.RecordTable({"record_id": np.array(["a"], object), "record_status": np.array([], object)})
