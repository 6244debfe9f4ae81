"""The scores store (commit point, cut-back after a crash, refusal to mix models), record sources, piece merging
and the scoring stage on a real record."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from helpers import HTTPMirror, write_record
from ecg_pipeline.pipeline.extract import detected_segments
from ecg_pipeline.pipeline.model_card import ModelCard
from ecg_pipeline.pipeline.scoring import PieceScores, RecordAssembler, ScoringContext
from ecg_pipeline.pipeline.resample import resample
from ecg_pipeline.pipeline import records, scores, sources
from ecg_pipeline.pipeline.config import ConfigError, ScoreConfig, score_config_from_dict
from ecg_pipeline.pipeline.errors import StoreError
from ecg_pipeline.pipeline.models import ModelError
from ecg_pipeline.pipeline.scores import RecordScores, ScoresWriter, open_scores

CLASSES = ("N", "S", "V", "F", "Q")


def _attrs(sha="a" * 64, fp="b" * 64):
    return {"schema_version": scores.scores_schema()["schema_version"], "kind": "scores", "task": "beat", "anchor_kind": "r-peak", "package": "ecg-pipeline",
            "package_version": "0",
            "model": "m.keras", "model_sha256": sha, "model_database": "mitdb", "classes": list(CLASSES),
            "spectrogram": {"fs": 360.0, "n_before": 90, "n_after": 162, "nperseg": 64, "hop": 8, "nfft": 64,
                            "window": "hann", "log_eps": 1e-4},
            "detector": {}, "input": "x", "config": {}, "config_fingerprint": fp}


def _scores(record, n, seed=0, status="ok"):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    return RecordScores(record, status=status, error="" if status == "ok" else "signal: truncated",
                        lead="MLII", fs=360.0, sig_len=1000 * n, anchor=np.sort(rng.choice(1000 * n, n, replace=False)),
                        probability=p, reference=np.array(["N"] * n, dtype=object), n_detected=n)


def test_commit_resume_and_cut_back(tmp_path):
    path = str(tmp_path / "s.zarr")
    w = ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    w.commit([_scores("a", 300, 1), _scores("b", 0, 2, status="failed")])
    w.commit([_scores("c", 200, 3)])
    w.finish({"complete": True})
    ds = open_scores(path)
    assert ds.sizes["segment"] == 500 and list(ds["class"].values) == list(CLASSES)
    assert list(ds.record_id.values) == ["a", "b", "c"] and list(ds.record_offset.values) == [0, 300, 300]
    assert (ds.record.values[:300] == "a").all() and (ds.record.values[300:] == "c").all()
    np.testing.assert_allclose(ds.probability.values.sum(axis=1), 1, rtol=1e-5)
    assert (ds.predicted.values == np.array(CLASSES, dtype=object)[ds.probability.values.argmax(1)]).all()
    assert ds.record_segments.sel(record_id="a").sum() == 300 and ds.record_status.sel(record_id="b") == "failed"
    # Plain xarray opens it too (the store is the interface), from the consolidated metadata of a finished job.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Failed to open Zarr store with consolidated metadata"
        plain = xr.open_zarr(path, group="segments")
        table = xr.open_datatree(path, engine="zarr")["records"]
    assert plain.probability.dims == ("segment", "class") and "record" in plain.coords
    assert plain.sizes["segment"] == 500 and table.sizes["record"] == 3 and table["status"].attrs["long_name"]

    # A crash after the data and table writes of record "d" but before the commit point moved:
    w2 = ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    assert w2.done == {"a", "c"} and w2.n == 500  # failed "b" is tried again
    # A store being written again has no consolidated metadata (it would go stale): plain xarray falls back.
    assert json.loads((tmp_path / "s.zarr" / "zarr.json").read_text()).get("consolidated_metadata") is None
    d = _scores("d", 100, 4)
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name in ("probability", "anchor"):
        a = g[f"segments/{name}"]
        a.resize((600, *a.shape[1:]))
    g["segments/anchor"][500:600] = d.anchor
    w3 = ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    assert w3.n == 500 and g["segments/anchor"].shape == (500,) and w3.done == {"a", "c"}
    w3.commit([d, _scores("b", 50, 5)])
    w3.finish({"complete": True})
    ds = open_scores(path)
    assert ds.sizes["segment"] == 650 and list(ds.record_id.values) == ["a", "b", "c", "d"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(path, group="segments").sizes["segment"] == 650  # consolidated again, with the resumed job's arrays
    assert ds.record_status.sel(record_id="b") == "ok" and int(ds.record_offset.sel(record_id="b")) == 600
    np.testing.assert_array_equal(ds.anchor.values[500:600], d.anchor)


def test_a_scores_store_opens_as_two_groups_and_a_slice_goes_to_netcdf(tmp_path):
    """Schema v4: ecg_pipeline.open_scores gives the segments and the per-record table apart (a record's beats by
    `where` carry no table), short names with units, and attributes netCDF takes."""
    import ecg_pipeline

    path = str(tmp_path / "s.zarr")
    w = ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    w.commit([_scores("a", 300, 1), _scores("c", 200, 3)])
    w.finish({"complete": True, "reference_metrics": {"detector": {"tp": 1}}})
    tree = ecg_pipeline.open_scores(path)
    beats, table = tree["segments"].to_dataset(), tree["records"].to_dataset()
    picked = beats.where(beats.record == "c", drop=True)
    assert set(picked.dims) == {"segment", "class"} and picked.sizes["segment"] == 200
    assert int(table.segments.sel(record="c").sum()) == 200 and table.n_segments.attrs["units"] == "1"
    assert tree.attrs["reference_metrics"] == {"detector": {"tp": 1}} and tree.attrs["complete"] is True
    raw = xr.open_datatree(path, engine="zarr")
    assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in raw.attrs.values())
    picked.assign_attrs(raw.attrs).to_netcdf(tmp_path / "c.nc", engine="scipy")
    assert xr.open_dataset(tmp_path / "c.nc", engine="scipy").probability.shape == (200, 5)


def test_scores_of_another_model_are_not_mixed(tmp_path):
    path = str(tmp_path / "s.zarr")
    ScoresWriter(path, _attrs(), CLASSES, chunk_size=256).commit([_scores("a", 10)])
    with pytest.raises(StoreError, match="different model"):
        ScoresWriter(path, _attrs(sha="c" * 64), CLASSES, chunk_size=256)
    with pytest.raises(StoreError, match="detector/lead configuration"):
        ScoresWriter(path, _attrs(fp="d" * 64), CLASSES, chunk_size=256)
    w = ScoresWriter(path, _attrs(sha="c" * 64), CLASSES, chunk_size=256, overwrite=True)
    assert w.n == 0 and not w.done
    with pytest.raises(StoreError, match="has not finished"):
        open_scores(path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="other files"):
        ScoresWriter(str(tmp_path / "plain"), _attrs(), CLASSES, chunk_size=256)


def _context(task: str = "beat") -> ScoringContext:
    card = ModelCard(task=task, classes=list(CLASSES), store={"spectrogram": _spec().attrs()})
    return ScoringContext(card, ScoreConfig(), None, False, None, "plugin")


def test_pieces_of_a_record_merge_once_all_are_in_and_a_beat_at_a_cut_is_kept_once():
    a, b = _scores("r", 3), _scores("r", 3)
    a.anchor, b.anchor = np.array([100, 500, 995]), np.array([1001, 1500, 1900])
    a.n_detected = b.n_detected = 3
    assembler = RecordAssembler(_context())
    assert assembler.add(PieceScores("r", 1, 2, b)) is None  # not all pieces in yet
    merged = assembler.add(PieceScores("r", 0, 2, a))
    np.testing.assert_array_equal(merged.anchor, [100, 500, 995, 1500, 1900])
    assert merged.probability.shape == (5, 5) and merged.n_detected == 5  # the beat found twice counted once
    b.status, b.error = "failed", "signal: truncated"
    assembler.add(PieceScores("r", 0, 2, a))
    failed = assembler.add(PieceScores("r", 1, 2, b))
    assert failed.status == "failed" and failed.error == "signal: truncated" and failed.n_segments == 0
    # Rhythm windows are shared out by their start: concatenated, none dropped.
    c, d = _scores("w", 2), _scores("w", 2)
    c.anchor, d.anchor = np.array([0, 9000]), np.array([9001, 18000])
    rhythm = RecordAssembler(_context("rhythm"))
    rhythm.add(PieceScores("w", 0, 2, c))
    np.testing.assert_array_equal(rhythm.add(PieceScores("w", 1, 2, d)).anchor, [0, 9000, 9001, 18000])


def test_score_config_is_validated():
    assert score_config_from_dict(None) == ScoreConfig()
    assert score_config_from_dict({"detector": {"threshold": 0.2}}).detector.threshold == 0.2
    with pytest.raises(ConfigError, match="piece_s"):
        score_config_from_dict({"piece_s": 1})
    with pytest.raises(ConfigError, match="band_hz"):
        score_config_from_dict({"detector": {"band_hz": [15, 5]}})
    with pytest.raises(ConfigError, match="window"):
        score_config_from_dict({"window": {"before_s": 1}})  # the window comes from the model
    a, b = ScoreConfig(), score_config_from_dict({"batch_size": 64})
    assert a.fingerprint() == b.fingerprint() != score_config_from_dict({"leads": ["II"]}).fingerprint()


def _synthetic(folder, name, annotate=True):
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, name, seconds=30, leads=("MLII",))
    if not annotate:
        (folder / f"{name}.atr").unlink()


def test_folder_and_remote_sources_find_nested_records(tmp_path):
    root = tmp_path / "archive"
    _synthetic(root / "site1" / "day2", "r1")
    _synthetic(root, "r2", annotate=False)
    (root / "notes.txt").write_text("not a record")
    listing = sources.FolderSource(str(root)).prepare()
    src, names = listing.source, listing.records
    assert names == ("r2", "site1/day2/r1")
    local = src.fetch("site1/day2/r1", ("atr",), tmp_path / "cache")
    assert local.has("atr") and records.read_header(local.base, "r1").fs == 360
    assert [n for n, _ in local.files] == ["site1/day2/r1.hea", "site1/day2/r1.dat", "site1/day2/r1.atr"]
    assert not src.fetch("r2", ("atr",), tmp_path / "cache").has("atr")
    # A local file's identity is its size and modification time (no hashing): the same until it is rewritten.
    assert src.fetch("site1/day2/r1", ("atr",)).digest == local.digest
    dat = root / "site1" / "day2" / "r1.dat"
    st = dat.stat()
    os.utime(dat, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert src.fetch("site1/day2/r1", ("atr",)).digest != local.digest
    with pytest.raises(records.RecordError, match="r1.dat changed in .* during the job"):
        src.fetch_again(local)
    # The same folder served over HTTP: records from the listing, files fetched into the cache.
    with HTTPMirror(tmp_path) as m:
        listing = sources.RemoteSource(m.url + "archive").prepare()
        remote, names = listing.source, listing.records
        assert names == ("r2", "site1/day2/r1") and not listing.has_checksums
        remote_local = remote.fetch("site1/day2/r1", ("atr",), tmp_path / "cache")
        # Downloaded files are identified by the SHA-256 computed as they arrive.
        assert dict(remote_local.files)["site1/day2/r1.dat"] == hashlib.sha256(dat.read_bytes()).hexdigest()
        local = remote_local
        assert local.has("atr") and local.checksum == "unlisted"
        assert records.read_header(local.base, "site1/day2/r1").sig_len == 360 * 30
    with pytest.raises(sources.SourceError, match="no such"):
        sources.resolve_source(str(tmp_path / "absent"), work_dir=tmp_path / "w")
    with pytest.raises(sources.SourceError, match="not both"):
        sources.resolve_source("x", db="mitdb", work_dir=tmp_path / "w")
    s = sources.resolve_source(None, db="mitdb", source="http://127.0.0.1:1/", work_dir=tmp_path / "w")
    assert s == sources.RemoteSource("http://127.0.0.1:1/mitdb/1.0.0", cache_name="physionet/mitdb/1.0.0")


def test_archive_is_extracted_once(tmp_path):
    root = tmp_path / "in"
    _synthetic(root / "a", "r1")
    archive = shutil.make_archive(str(tmp_path / "recs"), "gztar", root)
    s1 = sources.resolve_source(archive, work_dir=tmp_path / "w")
    s2 = sources.resolve_source(archive, work_dir=tmp_path / "w")
    assert s1 == s2 and s1.prepare().records == ("a/r1",) and s1.description.startswith(archive)
    assert s2.prepare().records == ("a/r1",) and len(list((tmp_path / "w").iterdir())) == 1  # extracted once
    # The same archive by URL: fetched over HTTP into the work folder, then extracted.
    with HTTPMirror(tmp_path) as m:
        s3 = sources.resolve_source(m.url + "recs.tar.gz", work_dir=tmp_path / "w2")
        assert s3.prepare().records == ("a/r1",) and s3.description.startswith(m.url)
    assert list((tmp_path / "w2" / "downloads").rglob("recs.tar.gz"))
    local = s3.fetch("a/r1", ("atr",), tmp_path / "cache")
    assert local.has("atr") and records.read_header(local.base, "a/r1").fs == 360


def test_model_metadata_is_required(tmp_path):
    keras = pytest.importorskip("keras")
    from ecg_pipeline.pipeline.models import save_model

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(inp))
    bare = tmp_path / "bare.keras"
    model.save(bare)
    with pytest.raises(ModelError, match="no ecg_pipeline.json"):
        ModelCard.read(bare)
    other = save_model(model, tmp_path / "other.keras",
                       {"task": "segmentation", "classes": ["N", "A"], "store": {"spectrogram": _spec().attrs()}})
    with pytest.raises(ModelError, match="a 'segmentation' model; this ecg-pipeline knows"):
        ModelCard.read(other)
    rhythm = save_model(model, tmp_path / "rhythm.keras", {"task": "rhythm", "classes": ["N", "A"]})
    with pytest.raises(ModelError, match="does not match the model card .*store: Field required"):
        ModelCard.read(rhythm)
    rhythm = save_model(model, tmp_path / "rhythm.keras", {"task": "rhythm", "classes": ["N", "A"], "store": {
        "spectrogram": {"fs": 300}}})
    with pytest.raises(ModelError, match="lacks the spectrogram parameters"):
        ModelCard.read(rhythm)


def test_score_span_on_a_real_record_and_resampled(mirror):
    """The stage itself on MIT-BIH 100, and on the same signal resampled to 250 Hz: the same beats are found."""
    base = mirror / "mitdb" / "1.0.0" / "100"
    header = records.read_header(base, "100")
    lead = records.choose_lead(header, ("MLII",))
    x = records.read_signal(base, header, lead, 0, 360 * 120)
    detector = ScoreConfig().detector

    def beats(x, fs, first, start, stop, **kw):
        return detected_segments(x, fs, first, start, stop, _spec(), detector, **kw)

    full = beats(x, 360.0, 0, 0, len(x))
    assert full.spectrogram.dtype == np.float32 and full.spectrogram.shape == (len(full.anchor), 33, 24)
    ann = records.read_annotations(base, "100", "atr")
    ref = ann.sample[(ann.sample < len(x)) & np.isin(ann.symbol, ["N", "A", "V"])]
    assert abs(len(full.detected) - len(ref)) <= 2 and full.n_dropped_edge >= 0
    assert full.agreement is None and (full.label == "").all()  # no reference given
    # A piece with margin finds the piece's share of the same beats.
    piece = beats(x[3600:3600 * 8], 360.0, 3600, 7200, 25200)
    np.testing.assert_array_equal(piece.anchor, full.anchor[(full.anchor >= 7200) & (full.anchor < 25200)])
    # At 250 Hz the beats come back at the record's own sample positions, within a sample or two.
    x250 = resample(x, 360.0, 250.0)
    low = beats(x250, 250.0, 0, 0, len(x250))
    expected = full.anchor * 250 / 360
    assert len(low.anchor) == len(full.anchor) and np.abs(low.anchor - expected).max() <= 2
    # With the record's annotations as reference, each beat takes the class of the one it matches (EC57).
    from ecg_pipeline.pipeline.labels import AAMI_EC57, BeatAnnotations

    reference = BeatAnnotations(unknown="Q", align="annotation", symbols=dict(AAMI_EC57))
    matched = beats(x, 360.0, 0, 0, len(x), reference=reference, record="100", base=base, sig_len=header.sig_len)
    np.testing.assert_array_equal(matched.anchor, full.anchor)
    a = matched.agreement
    assert a.tp >= len(ref) - 3 and a.fp <= 2 and a.tp + a.fn == a.n_reference
    assert set(matched.label) <= {"N", "S", "V", ""} and (matched.label == "N").mean() > 0.95


def _spec():
    from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec

    return SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64)



def test_a_scores_store_of_schema_v1_is_refused_with_what_to_do(tmp_path):
    path = str(tmp_path / "s.zarr")
    w = ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    w.commit([_scores("a", 10)])
    w.finish({"complete": True})
    zarr.open_group(path, mode="r+", use_consolidated=False).attrs.update(schema_version=1, kind="beat-scores")
    with pytest.raises(StoreError, match="schema v1.*--overwrite"):
        open_scores(path)
    with pytest.raises(StoreError, match="schema v1.*--overwrite"):
        ScoresWriter(path, _attrs(), CLASSES, chunk_size=256)
    assert ScoresWriter(path, _attrs(), CLASSES, chunk_size=256, overwrite=True).n == 0


def test_time_shares_and_episodes_of_rhythm_windows():
    from ecg_pipeline.pipeline.scores import episodes, time_shares

    anchor = np.array([0, 3000, 6000, 6300])  # 10 s windows over a 31 s record at 300 Hz (last end-aligned)
    predicted = np.array(["N", "A", "A", "N"], dtype=object)
    shares = time_shares(anchor, predicted, 9300, ["N", "A", "O"])
    # Each window owns the time until the next one starts: N 0-10 s and 21-31 s, A 10-21 s.
    np.testing.assert_allclose(shares, [20 / 31, 11 / 31, 0.0])
    assert episodes(anchor, predicted, 9300, 300.0) == [(0.0, 10.0, "N"), (10.0, 21.0, "A"), (21.0, 31.0, "N")]
