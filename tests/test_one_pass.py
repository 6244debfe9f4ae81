"""One pass per record (preprocess): a record's segments are computed from the read that plans it, and a zip
archive is read member by member by the task that needs the member. Real records: MIT-BIH 208 (beats, RR
features, templates) and Challenge 2017 recordings read straight out of the real archive (rhythm windows)."""

from __future__ import annotations

import shutil
from dataclasses import replace
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ecg_pipeline.pipeline import archives, extract, records, sources
from ecg_pipeline.pipeline.config import load_config
from ecg_pipeline.pipeline.databases import get_database
from ecg_pipeline.pipeline.errors import RecordError
from ecg_pipeline.pipeline.labels import label_source_for
from ecg_pipeline.pipeline.preprocessing import TaskContext, plan_record, prepare_listing


def _ctx(db: str, tmp_path: Path, **store) -> TaskContext:
    d = get_database(db)
    config = load_config(None, {**dict(d.preprocess_defaults), "store": store})
    return TaskContext(d, label_source_for(d, config), str(tmp_path / "cache"), config, str(tmp_path / "s.zarr"), None)


def _two_passes(ctx: TaskContext, source, plan: extract.RecordPlan) -> extract.ChunkContents:
    """The rows of the plan's segments as a second read makes them, in pieces of 500 (chunks of a long record)."""
    bare = replace(plan, rows=None)
    n = bare.n_segments
    parts = [(bare, lo, min(lo + 500, n)) for lo in range(0, n, 500)]
    return extract.chunk_contents(source, parts, ctx.spec_at(plan.fs), ctx.cache(), ctx.policy, ctx.template_spec())


def _same_but_rounding(one: np.ndarray, two: np.ndarray) -> None:
    """Equal but for float32 rounding: the STFT's matrix product rounds a row by where it sits in its batch (a
    whole record, or a chunk's piece), by up to ~3e-3 in log-magnitude (measured on MIT-BIH 100, 105, 208,
    232); stored as float16, about 1 value in 10,000 moves by one float16 step."""
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-2)
    assert np.mean(one.astype(np.float16) != two.astype(np.float16)) < 1e-3


def test_a_record_is_read_once_and_its_rows_are_those_of_a_second_read(mirror, tmp_path):
    folder = tmp_path / "mitdb"
    folder.mkdir()
    for ext in ("hea", "dat", "atr"):
        shutil.copy(mirror / "mitdb" / "1.0.0" / f"208.{ext}", folder)
    source = sources.FolderSource(str(folder))
    ctx = _ctx("mitdb", tmp_path)
    plan = plan_record(ctx, source, "208")
    assert plan.ok and plan.rows is not None and plan.rows.template is not None
    assert plan.rows.spectrogram.shape == (plan.n_segments, plan.rows.spec.n_freq, plan.rows.spec.n_time)
    again = _two_passes(ctx, source, plan)
    assert not again.failures
    _same_but_rounding(plan.rows.spectrogram, again.spectrogram)
    _same_but_rounding(plan.rows.template, again.template)
    # The write needs nothing more from the source: with its signal file gone, the chunk is still whole.
    (folder / "208.dat").unlink()
    parts = [(plan, 0, 700), (plan, 700, plan.n_segments)]
    rows = extract.chunk_contents(source, parts, ctx.spec_at(plan.fs), ctx.cache(), ctx.policy, ctx.template_spec())
    assert not rows.failures
    np.testing.assert_array_equal(rows.spectrogram, plan.rows.spectrogram)
    np.testing.assert_array_equal(rows.template, plan.rows.template)
    # A second read (what a record above store.one_pass_max_mb gets) now fails the record, with its cause.
    assert "208.dat changed" in _two_passes(ctx, source, plan).failures["208"]


def test_a_record_above_the_limit_is_read_again(mirror, tmp_path):
    source = sources.FolderSource(str(mirror / "mitdb" / "1.0.0"))
    small = _ctx("mitdb", tmp_path, one_pass_max_mb=1.0)  # 208: 2,955 beats x 2 x 768 bytes = 4.3 MB
    plan = plan_record(small, source, "208")
    assert plan.ok and plan.rows is None and plan.n_segments > 2000
    assert plan_record(_ctx("mitdb", tmp_path, one_pass_max_mb=0), source, "100").rows is None
    # The setting says how the work is done, not what the store holds: the same fingerprint.
    assert small.config.fingerprint("beat") == _ctx("mitdb", tmp_path).config.fingerprint("beat")


def test_challenge_recordings_are_read_out_of_the_zip_by_the_task_that_needs_them(mirror, tmp_path):
    archive = mirror / "challenge-2017" / "1.0.0" / "training2017.zip"
    if not archive.is_file():
        pytest.skip(f"no Challenge 2017 archive at {archive}")
    ctx = _ctx("challenge-2017", tmp_path)
    archive_source = sources.ArchiveSource(str(archive), inner="training2017", work_dir=str(tmp_path / "work"))
    listing, label_source = prepare_listing(archive_source, ctx.labels, ctx.cache_dir, ctx.policy)
    assert len(listing.records) == 8528 and listing.records[0] == "A00001"
    # The listing and the label table read two members, and nothing else is extracted.
    assert sorted(p.name for p in (tmp_path / "work").rglob("*") if p.is_file()) == ["RECORDS", "REFERENCE.csv"]
    ctx, source = replace(ctx, labels=label_source), listing.source
    written = lambda: sorted(p.name for p in (tmp_path / "work").rglob("*") if p.is_file())  # noqa: E731
    for name in ("A00001", "A00004"):
        plan = plan_record(ctx, source, name)
        assert plan.ok and plan.rows is not None and plan.rows.template is None
        assert [d.split(":")[0] for _, d in plan.local.files] == ["crc32", "crc32"]
        # One pass reads the members from memory: nothing written out, and the plan keeps no bytes.
        assert not {f"{name}.hea", f"{name}.mat"} & set(written()) and plan.local.contents is None
        again = _two_passes(ctx, source, plan)  # a second pass (a record above the limit) writes them out
        assert not again.failures
        _same_but_rounding(plan.rows.spectrogram, again.spectrogram)
    assert written() == ["A00001.hea", "A00001.mat", "A00004.hea", "A00004.mat", "RECORDS", "REFERENCE.csv"]


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_damaged_member_fails_its_record_alone(mirror, tmp_path):
    src = mirror / "mitdb" / "1.0.0"
    members = {f"db/{r}.{e}": (src / f"{r}.{e}").read_bytes() for r in ("100", "101") for e in ("hea", "dat")}
    members["db/RECORDS"] = b"100\n101\n"
    path = tmp_path / "db.zip"
    _zip(path, members)
    with zipfile.ZipFile(path) as z:  # one byte of 101.dat flipped in place: its CRC-32 no longer matches
        info = z.getinfo("db/101.dat")
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 1000
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    source = sources.ArchiveSource(str(path), inner="db", work_dir=str(tmp_path / "work")).prepare().source
    assert source.fetch("100").record == "100" and source.fetch("100", in_memory=True).contents
    with pytest.raises(RecordError, match=r"db\.zip: cannot read 'db/101\.dat': Bad CRC-32") as err:
        source.fetch("101", in_memory=True)
    assert err.value.record == "101" and err.value.stage == "download"
    with pytest.raises(RecordError, match=r"db\.zip: cannot extract 'db/101\.dat': Bad CRC-32") as err:
        source.fetch("101")
    assert err.value.record == "101" and err.value.stage == "download"
    assert not list((tmp_path / "work").rglob("101.dat*"))  # nothing half-written is left


def test_a_hostile_zip_is_refused_before_any_member_is_read(tmp_path):
    path = tmp_path / "evil.zip"
    _zip(path, {"db/RECORDS": b"a\n", "db/../../escape.hea": b"x"})
    with pytest.raises(archives.ArchiveError, match="would be written outside"):
        sources.ArchiveSource(str(path), inner="db", work_dir=str(tmp_path / "work")).prepare()
    assert not (tmp_path / "escape.hea").exists()


def test_the_rows_of_a_plan_are_never_taken_for_a_store_of_another_spectrogram(mirror, tmp_path):
    ctx = _ctx("mitdb", tmp_path)
    source = sources.FolderSource(str(mirror / "mitdb" / "1.0.0"))
    plan = plan_record(ctx, source, "100")
    other = ctx.spec_at(250.0)  # another store's spectrogram: its rows come from a read, never from the plan
    assert (other.n_freq, other.n_time) != plan.rows.spectrogram.shape[1:]
    rows = extract.chunk_contents(source, [(plan, 0, 10)], other, ctx.cache(), ctx.policy, ctx.template_spec())
    assert not rows.failures and rows.spectrogram.shape == (10, other.n_freq, other.n_time)
    assert np.isfinite(rows.spectrogram).all()


def test_a_record_in_memory_keeps_its_header_beside_its_annotations_and_a_large_one_is_written_out(
        mirror, tmp_path, monkeypatch):
    src = mirror / "mitdb" / "1.0.0"
    members = {f"db/{r}.{e}": (src / f"{r}.{e}").read_bytes() for r in ("100", "101") for e in ("hea", "dat", "atr")}
    members["db/RECORDS"] = b"100\n101\n"
    _zip(tmp_path / "db.zip", members)
    source = sources.ArchiveSource(str(tmp_path / "db.zip"), inner="db", work_dir=str(tmp_path / "work")).prepare().source
    on_disk = lambda: sorted(p.name for p in (tmp_path / "work").rglob("10*") if p.is_file())  # noqa: E731
    plain = source.fetch("100", in_memory=True)
    assert set(plain.contents) == {"100.hea", "100.dat"} and on_disk() == []
    # With annotations: the header is written beside them too (wfdb.rdann reads the annotations' rate there).
    local = source.fetch("100", ("atr",), in_memory=True)
    assert set(local.contents) == {"100.hea", "100.dat"} and on_disk() == ["100.atr", "100.hea"]
    ann = records.read_annotations(local.base, "100", "atr", 360.0)
    assert ann.sample.size > 2000
    # Members that together take more than the limit are written out, those read before them included.
    monkeypatch.setattr(sources, "RECORD_IN_MEMORY_MAX", len(members["db/101.hea"]) + 1000)
    big = source.fetch("101", in_memory=True)
    assert big.contents is None and {"101.hea", "101.dat"} <= set(on_disk())
    header = records.read_header(big.base, "101")
    assert records.read_signal(big.base, header, records.choose_lead(header, ("MLII",))).size == header.sig_len
