"""The preprocess job's per-record side (pipeline/preprocessing.py) and the spectrogram its configuration gives."""

from __future__ import annotations

import pytest

from ecg_pipeline.pipeline.config import config_from_dict, load_config
from ecg_pipeline.pipeline.databases import get_database
from ecg_pipeline.pipeline.labels import label_source_for
from ecg_pipeline.pipeline.spectrogram import SpectrogramSpecError, spec_from_config


def test_spec_from_config_beat_windows_and_a_label_sources_windows():
    config = config_from_dict({"window": {"before_s": 0.25, "after_s": 0.45},
                               "stft": {"nperseg": 64, "hop": 8, "nfft": 128, "window": "hamming", "log_eps": 1e-3,
                                        "detrend": "none", "max_freq_hz": 40.0}})
    spec = spec_from_config(config, 360.0)
    assert (spec.fs, spec.n_before, spec.n_after, spec.pad) == (360.0, 90, 162, "none")
    assert (spec.nperseg, spec.hop, spec.nfft, spec.window, spec.detrend, spec.log_eps, spec.max_freq_hz) == \
        (64, 8, 128, "hamming", "none", 1e-3, 40.0)
    assert spec_from_config(config_from_dict({"stft": {"nperseg": 32}}), 250.0).nfft == 32  # nfft null: nperseg
    db = get_database("challenge-2017")
    rhythm = load_config(None, dict(db.preprocess_defaults))
    windows = spec_from_config(rhythm, 300.0, label_source_for(db, rhythm))
    assert (windows.n_before, windows.n_after, windows.pad) == (0, int(round(rhythm.rhythm.length_s * 300)), "wrap")
    with pytest.raises(SpectrogramSpecError, match="longer than the window"):
        spec_from_config(config_from_dict({"window": {"before_s": 0.05, "after_s": 0.05}}), 360.0)


def _ctx(db_name="mitdb"):
    from ecg_pipeline.pipeline.preprocessing import TaskContext

    db = get_database(db_name)
    config = load_config(None, dict(db.preprocess_defaults))
    return TaskContext(db, label_source_for(db, config), None, config, "s.zarr", None)


def test_lay_out_takes_the_first_good_records_rate_and_fails_the_others():
    import numpy as np

    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.preprocessing import lay_out

    ctx = _ctx()
    plans = {"a": RecordPlan("a", error="download: gone"),
             "b": RecordPlan("b", ok=True, fs=360.0, anchor=np.arange(5)),
             "c": RecordPlan("c", ok=True, fs=250.0, anchor=np.arange(7)),
             "d": RecordPlan("d", ok=True, fs=360.0, anchor=np.arange(3))}
    laid = lay_out(ctx, list(plans), plans)
    assert laid.spec == spec_from_config(ctx.config, 360.0, ctx.labels)
    assert laid.layout.records == ("a", "b", "c", "d") and laid.layout.n_segments_per_record == (0, 5, 0, 3)
    assert not plans["c"].ok and plans["c"].error == "header: sampling frequency 250.0 Hz differs from the store's 360.0 Hz"
    assert laid.layout.n_rr == len(ctx.rr_spec().features) and list(laid.coords["rr_feature"]) == list(ctx.rr_spec().features)
    np.testing.assert_array_equal(laid.coords["freq"], laid.spec.freqs())
    assert (laid.layout.n_freq, laid.layout.n_time) == (laid.spec.n_freq, laid.spec.n_time)
    nothing = lay_out(ctx, ["a"], {"a": RecordPlan("a", error="download: gone")})  # no rate: an empty store
    assert nothing.spec is None and nothing.layout.n_freq == 0 and nothing.coords["freq"].size == 0


def test_store_attrs_match_the_schema_and_segments_count_written_records_only():
    import jsonschema
    import numpy as np

    from ecg_pipeline.pipeline import store
    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.preprocessing import segments_per_class, store_attrs
    from ecg_pipeline.pipeline.reports import record_outcomes

    for name, fs in (("mitdb", 360.0), ("challenge-2017", 300.0)):
        ctx = _ctx(name)
        attrs = store_attrs(ctx, "1.0.0", "file:///data", spec_from_config(ctx.config, fs, ctx.labels), ("x.atr",))
        full = {**attrs, "created": "t", "updated": "t", "complete": True, "n_segments": 0, "n_records": 0,
                "chunk_size": 1}
        jsonschema.validate(full, store.store_schema()["attrs"])
        assert attrs["task"] == ctx.labels.task and ("rr" in attrs) == (ctx.labels.task == "beat")
        assert list(attrs)[:3] == ["schema_version", "package", "package_version"]
        assert list(attrs)[-1] == "missing_source_files" and attrs["missing_source_files"] == ["x.atr"]
    plans = {"a": RecordPlan("a", ok=True, fs=360.0, anchor=np.arange(3), label=np.array(["N", "V", "N"], object)),
             "b": RecordPlan("b", ok=True, fs=360.0, anchor=np.arange(2), label=np.array(["V", "V"], object))}
    layout = store.Layout(("a", "b"), (3, 2), 2, 2, 4)
    outcomes = record_outcomes(["a", "b"], layout, plans, {"b": "write: chunk 0: disk full"}, final=True)
    written = [o.record for o in outcomes if o.status == "ok"]
    assert written == ["a"] and segments_per_class(plans, written, ["N", "S", "V"]) == {"N": 2, "S": 0, "V": 1}


def test_a_held_summary_keeps_what_the_driver_needs_and_shares_the_rest():
    import pickle
    import sys
    import tracemalloc
    from pathlib import Path

    import numpy as np

    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.sources import LocalRecord

    def plan(i: int) -> RecordPlan:
        files = ((f"r{i}.hea", f"{i:064x}"), (f"r{i}.mat", f"{i + 1:064x}"))
        return RecordPlan(f"r{i}", ok=True, checksum="verified", digest=f"{i:064x}", lead="".join(["E", "CG"]),
                          fs=300.0, sig_len=9000, anchor=np.arange(i % 3 + 1) * 10,
                          label=np.array(["N"] * (i % 3 + 1), object), signal_files=(f"r{i}.mat",), store_offset=i,
                          local=LocalRecord(f"r{i}", Path("/cache/r"), frozenset(), "verified", files), reused=True)

    plans = [plan(i) for i in range(600)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    summaries = [pickle.loads(pickle.dumps(p.summary())) for p in plans]  # as a driver gets them from its workers
    as_got = tracemalloc.get_traced_memory()[0] - base
    held = [s.held() for s in summaries]
    del summaries
    as_held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert as_held < as_got / 2.5, (as_held, as_got)  # 0.84 kB against 2.6 kB a record (Python 3.11)
    for p, h in zip(plans, held):
        assert (h.record, h.ok, h.digest, h.fs, h.sig_len, h.n_segments, h.checksum, h.lead) == \
            (p.record, p.ok, p.digest, p.fs, p.sig_len, p.n_segments, p.checksum, p.lead)
        assert h.class_counts() == p.class_counts() and h.local is None and h.signal_files == ()
    assert held[0].counts is held[3].counts and held[0].lead is held[1].lead is sys.intern("ECG")
    counts = held[0].class_counts()
    counts["N"] += 5  # a copy: the dict the held summaries share stays as it was
    assert held[3].class_counts() == {"N": 1}
    assert held[1].store_offset == 1 and held[1].reused


def test_chunks_to_write_takes_the_fingerprints_it_is_given_for_the_first_chunks():
    import numpy as np

    from ecg_pipeline.pipeline import store
    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.preprocessing import chunks_to_write

    ctx = _ctx()
    plans = {r: RecordPlan(r, ok=True, fs=360.0, digest=r * 8, anchor=np.arange(n))
             for r, n in (("a", 10), ("b", 20), ("c", 7))}
    layout = store.Layout(tuple(plans), tuple(p.n_segments for p in plans.values()), 2, 2, 16)
    todo, fps = chunks_to_write(ctx, layout, plans, [])
    assert todo == [0, 1, 2] and len(set(fps)) == 3  # 37 segments
    assert chunks_to_write(ctx, layout, plans, fps) == ([], fps)  # the store holds them all
    known = ["kept"]  # taken as given, not computed again
    assert chunks_to_write(ctx, layout, plans, [], known) == ([0, 1, 2], ["kept", *fps[1:]])
    assert chunks_to_write(ctx, layout, plans, [], fps + ["extra"])[1] == fps  # never more than the layout has


def test_chunk_parts_name_each_plan_batch_once_and_keep_the_pieces_order():
    from ecg_pipeline.pipeline.extract import RecordPlan
    from ecg_pipeline.pipeline.preprocessing import chunk_parts

    a, b = ["plan a0", "plan a1"], ["plan b0"]  # stand-ins for two plan batches' futures
    reused = RecordPlan("r", ok=True, reused=True, store_offset=7)
    refs = [((a, 1), 0, 3), ((b, 0), 0, 5), ((None, reused), 2, 4), ((a, 0), 0, 1)]
    batches, parts = chunk_parts(refs)
    assert batches == [a, b] and batches[0] is a
    assert parts == [(0, 1, 0, 3), (1, 0, 0, 5), (-1, reused, 2, 4), (0, 0, 0, 1)]
    # what write_chunk makes of them: each piece's plan, first and end, in order
    assert [(batches[i][j] if i >= 0 else j, lo, hi) for i, j, lo, hi in parts] == \
        [("plan a1", 0, 3), ("plan b0", 0, 5), (reused, 2, 4), ("plan a0", 0, 1)]
    assert chunk_parts([]) == ([], [])
