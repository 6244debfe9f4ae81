"""benchmarks/scale.py, small: a synthetic tree of 300 Challenge 2017 copies over loopback HTTP, preprocessed in a
child process, then a second job SIGKILLed half way through its chunks and resumed on the same store."""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from helpers import REPO

sys.path.insert(0, str(REPO))  # the benchmarks/ folder is not part of the installed package

from benchmarks import scale  # noqa: E402

N = 300
CHUNK = 16  # the smallest chunk the configuration allows: ~22 chunks, so a kill can land half way


@pytest.fixture(scope="module")
def archive(mirror) -> Path:
    path = mirror / "challenge-2017" / "1.0.0" / "training2017.zip"
    if not path.is_file():
        pytest.skip(f"Challenge 2017 archive not found at {path}")
    return path


@pytest.fixture(scope="module")
def originals(archive, tmp_path_factory) -> Path:
    """The Challenge 2017 recordings, extracted once for the module's trees."""
    return tmp_path_factory.mktemp("originals")


@pytest.fixture(scope="module")
def case(archive, originals, tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    result = scale.run_case(N, work, archive, workers=2, resume=True, chunk_size=CHUNK, timeout_s=600,
                            originals=originals)
    return work, result


def _expected_windows(folder: Path, names: list[str]) -> int:
    """30 s windows every 30 s covering each recording, the last one ending at its end (one for a recording
    shorter than a window): counted from the headers' signal lengths, without the pipeline."""
    length = 30 * 300
    total = 0
    for r in names:
        sig_len = int((folder / f"{r}.hea").read_text().split()[3])
        total += max(1, math.ceil(sig_len / length))
    return total


def test_rename_header():
    text = "A00001 1 300 9000 05:05:15 1/05/2000 \nA00001.mat 16+24 1000/mV 16 0 -127 0 0 ECG \n"
    assert scale.rename_header(text, "A00001", "S000042") == (
        "S000042 1 300 9000 05:05:15 1/05/2000 \nS000042.mat 16+24 1000/mV 16 0 -127 0 0 ECG \n")
    with pytest.raises(ValueError):
        scale.rename_header(text, "A00002", "S000042")


def test_tree_is_a_physionet_tree_of_renamed_copies(archive, originals, tmp_path):
    n = 8528 + 5  # past one round of the originals: copies of A00001 ... A00005 again
    tree = scale.make_tree(tmp_path / "tree", n, archive, originals)
    folder = tree.folder
    names = (folder / "RECORDS").read_text().split()
    assert len(names) == n and names[0] == "S000001" and names[-1] == "S008533" and len(set(names)) == n
    labels = dict(line.split(",") for line in (folder / "REFERENCE.csv").read_text().split())
    assert list(labels) == names and set(labels.values()) == {"N", "A", "O", "~"}
    sums = {line.split("  ")[1]: line.split("  ")[0] for line in (folder / "SHA256SUMS.txt").read_text().splitlines()}
    assert len(sums) == 2 * n + 2
    for name in ("S000001.hea", "S008530.mat", "S008533.hea", "RECORDS", "REFERENCE.csv"):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sums[name], name
    originals = originals / "training2017"
    assert (folder / "S008530.mat").read_bytes() == (originals / "A00002.mat").read_bytes()
    assert labels["S008530"] == labels["S000002"]
    head = (folder / "S008530.hea").read_text().splitlines()
    assert head[0].split()[0] == "S008530" and head[1].split()[0] == "S008530.mat"
    assert head[0].split()[1:] == (originals / "A00002.hea").read_text().splitlines()[0].split()[1:]


def test_every_recording_is_preprocessed(case):
    work, result = case
    folder = work / "tree" / "scale-sim" / "1.0.0"
    names = (folder / "RECORDS").read_text().split()
    f = result.figures
    assert f["records"] == N and f["failed"] == 0 and result.status_ok == N
    table, _ = scale.read_record_table(work / "full.zarr")
    assert list(table["record"].values) == names
    assert set(table["status"].values) == {"ok"} and set(table["checksum"].values) == {"verified"}
    expected = _expected_windows(folder, names)
    assert f["n_segments"] == expected == int(table["n_segments"].values.sum())
    assert f["chunks_total"] == math.ceil(expected / CHUNK) and f["chunks_written"] == f["chunks_total"]
    # The kill's quick count of committed chunks (a directory listing) agrees with the store's fingerprints.
    held = scale.held_chunks(work / "full.zarr")
    assert scale.committed_chunks(work / "full.zarr") == (sum(held), len(held)) == (f["chunks_total"],) * 2
    assert scale.committed_chunks(work / "absent.zarr") is None
    assert result.table_bytes > 0 and result.table_read_s > 0 and result.group_read_s > 0
    assert f["summary_lines"] < 20


def test_memory_and_timings_are_measured(case):
    _, result = case
    f = result.figures
    assert 0 < result.driver_rss_mb < scale.DRIVER_LIMIT_MB
    assert len(f["workers_rss_mb"]) == 2 and all(v > 0 for v in f["workers_rss_mb"])
    assert 0 < f["phase_s"]["plan"] < f["job_s"] <= f["total_s"]
    text = scale.case_text(result, 2)
    assert f"{N:,} recordings" in text and "resume after SIGKILL" in text


def test_killed_job_resumes_to_the_uninterrupted_store(case):
    work, result = case
    r = result.resume
    assert r is not None and r.killed, "the job finished before half of its chunks were written"
    assert scale.group_members(r.pgid) == []  # driver, scheduler and workers all gone
    assert r.chunks_total > 2
    assert r.chunks_total / 2 <= r.chunks_at_kill < r.chunks_total
    assert r.chunks_written == r.chunks_total - r.chunks_at_kill < r.chunks_total
    assert r.chunks_redone == 0 and r.records == N
    assert 0 < r.records_needed <= N and r.records_done == N - r.records_needed
    if r.records_planned is not None:  # once the report says how many records a run read
        assert r.records_needed <= r.records_planned <= N
        assert r.redo_share <= scale.REDO_LIMIT, f"the resume read {r.records_planned} of {N} records again"
    assert r.identical, r.difference
    resumed, full = work / "resumed.zarr", work / "full.zarr"
    import ecg_pipeline

    a, b = ecg_pipeline.open_store(str(resumed)), ecg_pipeline.open_store(str(full))
    xr.testing.assert_identical(a["segments"].to_dataset().drop_attrs(), b["segments"].to_dataset().drop_attrs())
    assert np.array_equal(a["records"]["status"].values, b["records"]["status"].values)


COMMIT = 30  # records read between two commits: a tenth of the tree


@pytest.fixture(scope="module")
def plan_kill(archive, originals, tmp_path_factory):
    """The same tree, with a commit every ``COMMIT`` records read, and its job killed once half the records
    were fetched: in the middle of its plan phase, where a job spends most of its time."""
    work = tmp_path_factory.mktemp("scale-plan")
    return scale.run_case(N, work, archive, workers=2, resume=True, chunk_size=CHUNK, timeout_s=600,
                          originals=originals, kill_in="plan", commit_records=COMMIT)


def test_a_job_killed_while_reading_resumes_from_its_last_commit(plan_kill):
    r = plan_kill.resume
    assert r is not None and r.killed, "the job finished before half of its records were fetched"
    assert scale.group_members(r.pgid) == []
    assert r.records_done >= N // 2 and r.records_planned is not None
    # Commits made during the reading survive the kill: the resume reuses their records (a job that committed
    # only at the end would read every one again) and reads the rest; the store is the uninterrupted one.
    assert r.chunks_at_kill >= 1 and 0 < r.records_reused < N, (r.chunks_at_kill, r.records_reused)
    assert r.records_planned + r.records_reused == N and r.records_redone < r.records_done
    assert r.identical, r.difference


def test_mirror_absent_exits_2(tmp_path, capsys):
    assert scale.main(["--mirror", str(tmp_path), "--records", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Challenge 2017 archive" in err
