import hashlib
import json

import numpy as np
import pytest
import xarray as xr
import zarr

from ecg_pipeline.pipeline import store
from ecg_pipeline.pipeline.errors import StoreError

FP = "0" * 64


def _attrs(**kw):
    a = {"schema_version": store.store_schema()["schema_version"], "task": "beat", "anchor_kind": "r-peak", "label_source": {"kind": "beat-annotations"},
         "package": "ecg-pipeline", "package_version": "0", "database": "mitdb",
         "database_version": "1.0.0", "database_title": "t", "citation": "c", "source": "s", "label_map": {"N": "N"},
         "classes": ["N"], "config": {}, "config_fingerprint": FP, "created": "now",
         "spectrogram": {k: 1 for k in ("fs", "n_before", "n_after", "nperseg", "hop", "nfft", "window", "log_eps",
                                        "transform")}}
    a.update(kw)
    return a


def _write(path, layout, attrs=None, fill=True):
    held = store.prepare(str(path), layout, attrs or _attrs(), "float16",
                         coords={"freq": np.arange(layout.n_freq, dtype=np.float32),
                                 "time": np.arange(layout.n_time, dtype=np.float32)})
    if fill:
        for k in range(layout.n_chunks):
            sl = layout.chunk_slice(k)
            n = sl.stop - sl.start
            labels = {"record": np.array(["r"] * n, object), "anchor": np.arange(sl.start, sl.stop),
                      "symbol": np.array(["N"] * n, object), "label": np.array(["N"] * n, object),
                      "lead": np.array(["MLII"] * n, object)}
            spec = np.full((n, layout.n_freq, layout.n_time), k, np.float32)
            store.write_chunk(str(path), k, sl, spec, labels, f"fp{k}")
        names = list(layout.records)
        table = {"record_id": np.array(names, object)}
        for name, spec in store.flat_variables().items():
            if spec["dims"] == ["record_id"] and name != "record_id":
                kind = spec["dtype"][0]
                table[name] = np.array([""] * len(names), object) if kind == "str" else np.zeros(len(names), kind)
        table["record_n_segments"] = np.array(layout.n_segments_per_record)
        table["record_offset"] = layout.offsets
        store.write_record_table(str(path), table)
        store.finish(str(path), {"complete": True})
    return held


def test_layout_chunk_parts():
    lay = store.Layout(("a", "b", "c"), (5, 0, 7), 3, 4, 4)
    assert lay.n_segments == 12 and lay.n_chunks == 3 and lay.offsets.tolist() == [0, 5, 5]
    assert lay.chunk_parts(0) == [(0, 0, 4)]
    assert lay.chunk_parts(1) == [(0, 4, 5), (2, 0, 3)]
    assert lay.chunk_parts(2) == [(2, 3, 7)]
    assert lay.chunk_slice(2) == slice(8, 12)


def test_roundtrip_through_xarray(tmp_path):
    lay = store.Layout(("a", "b"), (6, 5), 3, 4, 4)
    held = _write(tmp_path / "s.zarr", lay)
    assert held == ["", "", ""]
    ds = store.open_dataset(str(tmp_path / "s.zarr"))
    assert dict(ds.spectrogram.sizes) == {"segment": 11, "freq": 3, "time": 4}
    assert ds.spectrogram.dtype == np.float16 and ds.spectrogram.encoding["chunks"] == (4, 3, 4)
    assert set(store.SEGMENT_COORDS) <= set(ds.coords)
    assert ds.spectrogram[:, 0, 0].values.tolist() == [0] * 4 + [1] * 4 + [2] * 3
    assert ds["anchor"].values.tolist() == list(range(11))
    # plain xarray sees the segments in their group, and the bookkeeping group stays apart
    plain = xr.open_zarr(str(tmp_path / "s.zarr"), group="segments", consolidated=False)
    assert "chunk_fingerprint" not in plain.variables and plain.spectrogram.shape == (11, 3, 4)
    assert store.read_fingerprints(str(tmp_path / "s.zarr")) == ["fp0", "fp1", "fp2"]


def test_resume_keeps_fingerprints_and_resizes(tmp_path):
    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a",), (6,), 3, 4, 4))
    held = store.prepare(str(p), store.Layout(("a", "b"), (6, 5), 3, 4, 4), _attrs(), "float16",
                         coords={"freq": np.zeros(3, np.float32), "time": np.zeros(4, np.float32)})
    assert held == ["fp0", "fp1", ""]
    assert zarr.open_group(str(p), mode="r")["segments/spectrogram"].shape == (11, 3, 4)


def test_resume_refuses_another_configuration(tmp_path):
    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a",), (6,), 3, 4, 4))
    with pytest.raises(StoreError, match="different config_fingerprint.*--overwrite"):
        store.prepare(str(p), store.Layout(("a",), (6,), 3, 4, 4), _attrs(config_fingerprint="1" * 64), "float16",
                      coords={"freq": np.zeros(3, np.float32), "time": np.zeros(4, np.float32)})


def test_foreign_zarr_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=3).attrs["hello"] = 1
    with pytest.raises(StoreError, match="not an ecg-pipeline store"):
        _write(tmp_path / "x.zarr", store.Layout(("a",), (6,), 3, 4, 4), fill=False)


def test_open_refuses_unfinished_and_invalid_stores(tmp_path):
    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a",), (6,), 3, 4, 4), fill=False)
    with pytest.raises(StoreError, match="has not finished"):
        store.open_dataset(str(p))
    with pytest.raises(StoreError, match="no Zarr store"):
        store.open_dataset(str(tmp_path / "nothing.zarr"))


def test_validate_lists_problems(tmp_path):
    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a",), (6,), 3, 4, 4))
    ds = store.open_dataset(str(p))
    bad = ds.drop_vars(["label", "symbol"]).assign_attrs(schema_version=99)
    bad["anchor"] = bad["anchor"].astype("float32")
    with pytest.raises(StoreError) as e:
        store.validate(bad)
    msg = str(e.value)
    assert "missing variable 'label'" in msg and "anchor: dtype float32" in msg and "schema_version" in msg
    assert "'symbol'" not in msg  # optional: a label source without original symbols leaves it out


def test_misaligned_write_is_refused(tmp_path):
    p = tmp_path / "s.zarr"
    lay = store.Layout(("a",), (8,), 3, 4, 4)
    _write(p, lay, fill=False)
    with pytest.raises(StoreError, match="not chunk 0"):
        store.write_chunk(str(p), 0, slice(1, 5), np.zeros((4, 3, 4)), {}, "x")


def test_a_store_of_schema_v1_is_refused_with_what_to_do(tmp_path):
    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a",), (6,), 3, 4, 4))
    zarr.open_group(str(p), mode="r+", use_consolidated=False).attrs["schema_version"] = 1
    for opener in (lambda: store.open_dataset(str(p)),
                   lambda: store.prepare(str(p), store.Layout(("a",), (6,), 3, 4, 4), _attrs(), "float16",
                                         coords={"freq": np.arange(3, dtype=np.float32),
                                                 "time": np.arange(4, dtype=np.float32)})):
        with pytest.raises(StoreError) as e:
            opener()
        assert "store schema v1" in str(e.value) and "--overwrite" in str(e.value)
    from ecg_pipeline.pipeline.loader import ZarrSegmentLoader

    with pytest.raises(StoreError, match="store schema v1"):
        ZarrSegmentLoader(str(p))


def test_store_kind_and_task_of_real_stores(tmp_path):
    from ecg_pipeline.pipeline.scores import RecordScores, ScoresWriter, scores_schema

    spectrograms, rhythm = tmp_path / "s.zarr", tmp_path / "r.zarr"
    _write(spectrograms, store.Layout(("a",), (6,), 3, 4, 4))
    _write(rhythm, store.Layout(("a",), (6,), 3, 4, 4), _attrs(task="rhythm", anchor_kind="window-start"))
    scores = str(tmp_path / "scores.zarr")
    classes = ("N", "V")
    attrs = {"schema_version": scores_schema()["schema_version"], "kind": "scores", "task": "beat", "anchor_kind": "r-peak",
             "package": "ecg-pipeline", "package_version": "0", "model": "m.keras", "model_sha256": "a" * 64,
             "model_database": "mitdb", "classes": list(classes), "spectrogram": {}, "detector": {}, "input": "x",
             "config": {}, "config_fingerprint": "b" * 64}
    writer = ScoresWriter(scores, attrs, classes, chunk_size=8)
    writer.commit([RecordScores("a", status="ok", error="", lead="MLII", fs=360.0, sig_len=4000,
                                anchor=np.arange(4) * 1000, probability=np.full((4, 2), 0.5, np.float32),
                                reference=np.array([""] * 4, dtype=object), n_detected=4)])
    writer.finish({"complete": True})
    assert store.store_kind(str(spectrograms)) == "spectrograms" and store.store_task(str(spectrograms)) == "beat"
    assert store.store_kind(str(rhythm)) == "spectrograms" and store.store_task(str(rhythm)) == "rhythm"
    assert store.store_kind(scores) == "scores" and store.store_task(scores) == "beat"
    # A scores store written before rhythm models said kind "beat-scores" (and no task: beats).
    g = zarr.open_group(scores, mode="r+", use_consolidated=False)
    g.attrs["kind"] = "beat-scores"
    del g.attrs["task"]
    assert store.store_kind(scores) == "scores" and store.store_task(scores) == "beat"


def test_store_kind_refuses_what_is_no_store(tmp_path):
    (tmp_path / "plain").mkdir()
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2).attrs["package"] = "ecg-pipeline"
    for path in (tmp_path / "plain", tmp_path / "missing", tmp_path / "v2.zarr"):
        for ask in (store.store_kind, store.store_task):
            with pytest.raises(StoreError, match="is not a store of ecg-pipeline: no Zarr v3 group there"):
                ask(str(path))
    foreign = tmp_path / "other.zarr"
    zarr.open_group(str(foreign), mode="w").attrs.update({"kind": "something-else", "package": "ecg-pipeline"})
    with pytest.raises(StoreError, match="not a store written by `ecg-pipeline preprocess` or `score`"):
        store.store_kind(str(foreign))
    zarr.open_group(str(foreign), mode="w").attrs["task"] = "rhythm"  # a group, but not of this package
    with pytest.raises(StoreError, match="not a store written by"):
        store.store_kind(str(foreign))


def test_the_record_row_declares_the_schemas_record_table():
    """``reports.RecordOutcome`` is the one declaration of a per-record row: its fields and the schema's
    ``record_id`` variables are the same set, of the same types, so the two cannot drift apart."""
    import dataclasses

    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.reports import RecordOutcome, record_outcomes, record_table

    schema = {name: spec["dtype"][0] for name, spec in store.flat_variables().items()
              if spec["dims"] == ["record_id"]}
    fields = {"record_id" if f.name == "record" else f"record_{f.name}" for f in dataclasses.fields(RecordOutcome)}
    assert fields == set(schema)
    plans = {"a": RecordPlan("a", ok=True, checksum="verified", lead="MLII", fs=360.0, sig_len=3600, quality="noisy",
                             anchor=np.arange(3), n_dropped_edge=1, n_unknown=2),
             "b": RecordPlan("b", error="signal: truncated")}
    rows = record_outcomes(["a", "b"], store.Layout(("a", "b"), (3, 0), 2, 2, 4), plans, {}, final=True)
    assert [(r.status, r.offset, r.n_segments, r.quality, r.n_unknown) for r in rows] == \
        [("ok", 0, 3, "noisy", 2), ("failed", 3, 0, "", 0)]
    table = record_table(rows)
    assert set(table) == set(schema)
    for name, dtype in schema.items():
        assert table[name].dtype == (object if dtype == "str" else np.dtype(dtype)), name


@pytest.mark.realdata
def test_a_float32_view_of_a_float16_store_is_one_call_away(small_store):
    """float16 spectrograms (the default) overflow when summed over many beats; open_store(float32=True) gives
    the same values as float32, lazily, and a per-class mean that is finite."""
    import ecg_pipeline

    half, full = (ecg_pipeline.open_store(str(small_store), float32=f)["segments"].to_dataset() for f in (False, True))
    assert half.spectrogram.dtype == np.float16 and full.spectrogram.dtype == np.float32
    assert full.spectrogram.chunks is not None  # still lazy: nothing read yet
    np.testing.assert_array_equal(full.spectrogram[:100].values, half.spectrogram[:100].values.astype(np.float32))
    means = full.spectrogram.groupby("label").mean()
    assert np.isfinite(means.values).all() and set(means.label.values) >= {"N", "V"}
    assert full.label.dtype == half.label.dtype and full.anchor.dtype == half.anchor.dtype


def test_the_tree_keeps_segments_and_records_apart_and_a_slice_goes_to_netcdf(tmp_path):
    """Schema v5: segments and the per-record table in their own groups (a selection on segments never broadcasts
    the table), short names with units, attributes netCDF takes, consolidated metadata for plain xarray."""
    import warnings

    import ecg_pipeline

    p = tmp_path / "s.zarr"
    _write(p, store.Layout(("a", "b"), (6, 5), 3, 4, 4))
    raw_attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in raw_attrs.values()), raw_attrs
    assert raw_attrs["complete"] == 1 and store.decode_attrs(raw_attrs)["label_source"] == {"kind": "beat-annotations"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Failed to open Zarr store with consolidated metadata"
        raw = xr.open_datatree(str(p), engine="zarr")
    assert set(raw.children) >= {"segments", "records"}

    tree = ecg_pipeline.open_store(str(p), float32=True)
    seg, rec = tree["segments"].to_dataset(), tree["records"].to_dataset()
    assert tree.attrs["classes"] == ["N"] and tree.attrs["complete"] is True
    picked = seg.where(seg.label == "N", drop=True)
    assert set(picked.dims) == {"segment", "freq", "time"} and picked.spectrogram.dtype == np.float32
    assert rec.sel(record="b").n_segments.item() == 5 and rec.sel(record="b").offset.item() == 6
    for ds in (seg, rec):
        for name, var in ds.variables.items():
            if name in ds.dims and name not in ("record",) and "long_name" not in var.attrs:
                continue  # a dimension without its own coordinate variable
            assert len(var.attrs["long_name"]) <= 40, (name, var.attrs["long_name"])
            assert var.dtype.kind not in "iuf" or "units" in var.attrs, name
    # A slice with the store's own (raw) attributes writes to netCDF (scipy: netCDF-3, the strictest engine).
    part = seg.isel(segment=slice(0, 3)).compute().assign_attrs(raw.attrs)  # scipy's writer takes no dask arrays
    part.to_netcdf(tmp_path / "part.nc", engine="scipy")
    back = xr.open_dataset(tmp_path / "part.nc", engine="scipy")
    assert back.spectrogram.shape == (3, 3, 4) and back.attrs["config_fingerprint"] == raw_attrs["config_fingerprint"]
    assert store.decode_attrs(back.attrs)["label_source"] == {"kind": "beat-annotations"}


def test_plans_are_appended_and_a_gap_left_by_a_kill_ends_them(tmp_path):
    path = str(tmp_path / "s.zarr")
    group = store.open_group(path, "w", None)
    group.attrs.update(store.encode_attrs({"schema_version": store.store_schema()["schema_version"],
                                           "config_fingerprint": "fp"}))
    group.require_group(store.STATE_GROUP).create_array(store.FINGERPRINT, shape=(0,), chunks=(1,), dtype=str,
                                                          fill_value="")
    plans = [f'{{"record":"r{i}"}}' for i in range(store.PLAN_CHUNK + 10)]
    store.write_plans(path, plans[:5])
    store.write_plans(path, plans[5:], start=5)  # a later commit appends what it adds
    assert store.read_plans(path, None, "fp")[0] == plans
    assert store.read_plans(path, None, "another configuration") == ([], [])
    # Killed between the resize and the writing of the new entries: the plans before them are kept, whole.
    store.open_group(path, "r+", None)[f"{store.STATE_GROUP}/{store.PLAN}"].resize((len(plans) + 3,))
    assert store.read_plans(path, None, "fp")[0] == plans
    store.write_plans(path, plans[:3])  # a new run's first commit: resized to its prefix, nothing deleted first
    assert store.read_plans(path, None, "fp")[0] == plans[:3]


def test_prefix_fingerprints_are_the_fingerprints_of_each_prefix():
    # names with characters JSON escapes, an empty digest: the running hash must encode as chunk_fingerprint does
    parts = [("S1", "d1", 0, 5), ('S"2', "d2", 5, 9), ("S\u00e93", "", 9, 12), ("S4", "d4", 12, 512)]
    got = store.prefix_fingerprints("cfg-1", parts)
    assert got == [store.chunk_fingerprint("cfg-1", parts[:m]) for m in range(1, len(parts) + 1)]
    assert len(set(got)) == len(parts) and store.prefix_fingerprints("cfg-1", []) == []
    assert store.prefix_fingerprints("cfg-2", parts[:1]) != got[:1]
    # the text hashed before the pieces were hashed one at a time: stores written then must keep resuming
    for m in range(len(parts) + 1):
        blob = json.dumps(["cfg-1", [list(p) for p in parts[:m]]]).encode()
        assert store.chunk_fingerprint("cfg-1", parts[:m]) == hashlib.sha256(blob).hexdigest()
