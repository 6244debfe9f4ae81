"""The one record layer: a database whose records are an archive member of a PhysioNet tree (fetched over
loopback HTTP, checked against the tree's SHA256SUMS.txt, extracted once), its label table, and label sources;
the real Challenge 2017 archive read through the same layer."""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import HTTPMirror, write_record
from ecg_pipeline.pipeline import download, labels, records, sources
from ecg_pipeline.pipeline.databases import Database

ARCHIVE_DB = Database(name="toydb", version="1.0.0", title="toy", annotator="", label_map="aami-ec57", leads=("ECG",),
                      citation="-", archive="recs.zip", archive_folder="recs")
CLASSES = ("N", "A", "O", "~")


def _tree(tmp_path: Path, *, wrong_sum: bool = False) -> Path:
    """<root>/toydb/1.0.0/{recs.zip, SHA256SUMS.txt}; the zip holds recs/{R1,R2}.{hea,dat} + REFERENCE.csv."""
    work = tmp_path / "make" / "recs"
    work.mkdir(parents=True)
    write_record(work, "R1", fs=300, seconds=12, leads=("ECG",))
    write_record(work, "R2", fs=300, seconds=31, leads=("ECG",), seed=1)
    (work / "REFERENCE.csv").write_text("R1,N\nR2,A\n")
    folder = tmp_path / "root" / "toydb" / "1.0.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "recs.zip", "w") as z:
        for p in sorted(work.iterdir()):
            if p.suffix != ".atr":
                z.write(p, f"recs/{p.name}")
    digest = hashlib.sha256((folder / "recs.zip").read_bytes()).hexdigest()
    (folder / "SHA256SUMS.txt").write_text(f"{'0' * 64 if wrong_sum else digest}  recs.zip\n")
    return tmp_path / "root"


def test_archive_member_of_a_tree_is_fetched_verified_and_labelled(tmp_path):
    root = _tree(tmp_path)
    cache = tmp_path / "cache"
    with HTTPMirror(root) as http:
        source = sources.database_source(ARCHIVE_DB, http.url)
        assert isinstance(source, sources.ArchiveSource) and source.inner == "recs"
        listing = source.prepare(cache)
        n_requests = len(http.faults.requests)
        again = source.prepare(cache)  # cached: the archive is neither fetched nor extracted again
        assert [r for r in http.faults.requests[n_requests:] if r.endswith(".zip")] == []
    assert listing.records == again.records == ("R1", "R2") and listing.has_checksums
    ready = listing.source
    local = ready.fetch("R2", (), cache)
    assert local.checksum == "verified" and [n for n, _ in local.files] == ["R2.hea", "R2.dat"]
    header = records.read_header(local.base, "R2")
    assert (header.fs, header.sig_len) == (300.0, 300 * 31)

    table = labels.RecordLabelTable(classes_=CLASSES, window_s=10.0, hop_s=10.0).load(
        ready.fetch_file("REFERENCE.csv", cache).read_text())
    segs = table.segments(labels.RecordInput("R2", local.base, header.fs, header.sig_len))
    # 31 s in 10 s windows: three every 10 s, and a fourth ending at the end, so no second is left out
    assert segs.anchor.tolist() == [0, 3000, 6000, 6300] and set(segs.label) == {"A"}
    whole = labels.RecordLabelTable(classes_=CLASSES).load("R1,N\nR2,X\n")
    with pytest.raises(records.RecordError, match="unknown label 'X'"):
        whole.segments(labels.RecordInput("R2", local.base, header.fs, header.sig_len))
    with pytest.raises(records.RecordError, match="no label in REFERENCE.csv"):
        whole.segments(labels.RecordInput("R3", local.base, header.fs, header.sig_len))


def test_archive_with_a_wrong_checksum_is_refused(tmp_path):
    root = _tree(tmp_path, wrong_sum=True)
    with HTTPMirror(root) as http:
        source = sources.database_source(ARCHIVE_DB, http.url)
        with pytest.raises(sources.SourceError, match="recs.zip: cannot fetch the archive: .*SHA-256 mismatch"):
            source.prepare(tmp_path / "cache", download.RetryPolicy(retries=1, backoff_s=0.01))
    assert not list((tmp_path / "cache").rglob("recs.zip-*"))  # nothing extracted


def test_rhythm_annotations_are_read_not_dropped(mirror):
    """MIT-BIH 201's rhythm notes ((AFIB, (N, (NOD, (T) become one label per 10 s window of the one grid (the last
    window ends with the record, as preprocess's and score's windows do)."""
    base = mirror / "mitdb" / "1.0.0" / "201"
    ann = records.read_annotations(base, "201", "atr")
    start, stop, rhythm = labels.rhythm_intervals(ann.sample, ann.aux_note, 650000)
    assert rhythm[0] == "AFIB" and start[0] == 60 and {"AFIB", "N", "NOD", "T"} <= set(rhythm)
    assert np.all(stop > start) and stop[-1] == 650000
    segs = labels.RhythmAnnotations().segments(labels.RecordInput("201", base, 360.0, 650000))
    assert len(segs.anchor) == 650000 // 3600 + 1 and segs.anchor[-1] == 650000 - 3600 and segs.label[0] == "AFIB"
    # The AF burden from the windows agrees with the episodes' own durations (within a window's share).
    af_episodes = float(np.sum((stop - start)[rhythm == "AFIB"])) / 650000
    af_windows = float(np.mean(segs.label == "AFIB"))
    assert abs(af_episodes - af_windows) < 0.05


def test_beat_annotations_keep_the_symbol(mirror):
    base = mirror / "mitdb" / "1.0.0" / "208"
    segs = labels.BeatAnnotations(align="annotation").segments(labels.RecordInput("208", base, 360.0, 650000))
    assert len(segs.anchor) == len(segs.label) == len(segs.symbol)
    assert set(segs.symbol[segs.label == "V"]) == {"V"} and "F" in set(segs.label)
    assert labels.BeatAnnotations().classes == ("N", "S", "V", "F", "Q")
    with pytest.raises(ValueError, match="signal"):  # aligning needs the samples
        labels.BeatAnnotations().segments(labels.RecordInput("208", base, 360.0, 650000))


@pytest.mark.parametrize("name", ["117", "208"])
def test_aligned_beats_sit_where_the_detector_puts_them(mirror, name):
    """117's annotations sit a few samples off the R peak (a third 5 or more off the detector's point), 208 has
    many V beats: moved to their fiducial point (``align="fiducial"``, the default), at least 99 % of the beats a
    detection matches fall on exactly its sample; the labels, symbols and beat count do not change."""
    from ecg_pipeline.pipeline import detect

    base = mirror / "mitdb" / "1.0.0" / name
    header = records.read_header(base, name)
    x = records.read_signal(base, header, records.choose_lead(header, ("MLII",)))
    rec = labels.RecordInput(name, base, header.fs, header.sig_len, x)
    raw = labels.BeatAnnotations(align="annotation").segments(rec)
    moved = labels.BeatAnnotations().segments(rec)
    assert moved.label.tolist() == raw.label.tolist() and moved.symbol.tolist() == raw.symbol.tolist()
    assert np.all(np.diff(moved.anchor) > 0) and len(moved.beats) == len(raw.beats)
    assert np.abs(moved.anchor - raw.anchor).max() <= int(0.075 * header.fs) * 2
    assert set(moved.anchor) <= set(moved.beats)  # the RR features count the same moved beats
    peaks = detect.detect_r_peaks(x, header.fs)
    exact = {}
    for kind, segs in (("annotation", raw), ("fiducial", moved)):
        m = detect.match_beats(segs.anchor, peaks, header.fs)
        exact[kind] = float(np.mean(peaks[m.det_index] == segs.anchor[m.ref_index]))
    assert exact["fiducial"] >= 0.99 and exact["annotation"] <= 0.9, exact


def test_fiducial_points_keep_beats_apart():
    """Two positions that would move onto one point keep their own places; order is kept; edges are fine."""
    from ecg_pipeline.pipeline import detect

    fs = 360.0
    x = np.zeros(3600)
    x[1000] = 5.0  # one sharp spike: every position within the search reaches for it
    pos = np.array([0, 990, 1010, 3599])
    moved = detect.fiducial_points(x, fs, pos)
    assert moved[1:3].tolist() == [990, 1010] and np.all(np.diff(moved) > 0)
    assert 0 <= moved.min() and moved.max() < x.size  # the search is clipped at the record's ends
    assert detect.fiducial_points(x, fs, np.array([980]))[0] == 1000
    assert detect.fiducial_points(x, fs, np.zeros(0, np.int64)).size == 0


def test_the_challenge_2017_archive_reads_through_the_record_layer(mirror, tmp_path):
    """The real training2017.zip from the mirror as a PhysioNet tree (file://): checksum, extraction, labels."""
    db = Database(name="challenge-2017", version="1.0.0", title="PhysioNet/CinC Challenge 2017", annotator="",
                  label_map="aami-ec57", leads=("ECG",), citation="-", archive="training2017.zip",
                  archive_folder="training2017")
    source = sources.database_source(db, mirror.as_uri())
    listing = source.prepare(tmp_path / "cache")
    assert len(listing.records) == 8528 and listing.records[0] == "A00001" and listing.has_checksums
    ready = listing.source
    table = labels.RecordLabelTable(classes_=CLASSES).load(ready.fetch_file("REFERENCE.csv", tmp_path / "cache").read_text())
    assert Counter(table.table.values()) == {"N": 5050, "A": 738, "O": 2456, "~": 284}
    for name in ("A00001", "A00004", "A08528"):
        local = ready.fetch(name, (), tmp_path / "cache")
        header = records.read_header(local.base, name)
        lead = records.choose_lead(header, ("ECG",))
        x = records.read_signal(local.base, header, lead)
        assert header.fs == 300 and 9 * 300 <= len(x) <= 61 * 300 and np.isfinite(x).all()
        segs = table.segments(labels.RecordInput(name, local.base, header.fs, header.sig_len))
        assert segs.anchor.tolist() == [0] and segs.label[0] == table.table[name]


def test_detected_beats_take_the_reference_class_they_match(mirror):
    """The detector as a label source on MIT-BIH 208 (many V beats): matched detections carry the
    annotation's class and symbol; the detector finds the reference's beats."""
    base = mirror / "mitdb" / "1.0.0" / "208"
    header = records.read_header(base, "208")
    x = records.read_signal(base, header, records.choose_lead(header, ("MLII",)))
    rec = labels.RecordInput("208", base, header.fs, header.sig_len, x)
    ref = labels.BeatAnnotations().segments(rec)
    found = labels.DetectedBeats(reference=labels.BeatAnnotations()).segments(rec)
    matched = found.label != ""
    assert matched.sum() >= 0.99 * len(ref.anchor) and matched.mean() >= 0.99
    assert Counter(found.label[matched]) == pytest.approx(Counter(ref.label), rel=0.02)
    # Each matched detection lies within 150 ms of a reference beat of the same class.
    j = np.searchsorted(ref.anchor, found.anchor[matched])
    near = np.where(j < len(ref.anchor), j, len(ref.anchor) - 1)
    prev = np.maximum(j - 1, 0)
    pick = np.where(np.abs(ref.anchor[near] - found.anchor[matched]) < np.abs(ref.anchor[prev] - found.anchor[matched]),
                    near, prev)
    assert np.abs(ref.anchor[pick] - found.anchor[matched]).max() <= 0.150 * 360
    assert np.mean(ref.label[pick] == found.label[matched]) > 0.99
    unlabelled = labels.DetectedBeats().segments(rec)
    assert np.array_equal(unlabelled.anchor, found.anchor) and set(unlabelled.label) == {""}
