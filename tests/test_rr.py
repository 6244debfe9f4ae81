"""RR-interval features on rhythms built by hand (a premature beat, a gap, the record's edges) and on real
MIT-BIH beats, where S beats must come early against the patient's own rhythm."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb

from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats
from ecg_pipeline.pipeline.rr import (BAD_NEXT, BAD_PREVIOUS, NO_NEXT, NO_PREVIOUS, RR_FEATURES, STORED_FEATURES, RRSpec,
                                      features_at, rr_features)

F = {name: i for i, name in enumerate(RR_FEATURES)}


def test_a_premature_beat_and_its_compensatory_pause():
    fs = 250.0
    t = np.arange(40, dtype=float)
    t[20] -= 0.4  # 0.6 s after its predecessor, 1.4 s before its successor
    out = rr_features(np.round(t * fs).astype(np.int64), fs)
    v = out.values
    assert v.shape == (40, len(RR_FEATURES)) and v.dtype == np.float32 and np.isfinite(v).all()
    assert v[20, F["pre_rr"]] == pytest.approx(0.6) and v[20, F["post_rr"]] == pytest.approx(1.4)
    assert v[20, F["pre_local"]] < 0.65 and v[20, F["post_local"]] > 1.35
    normal = np.r_[5:18, 23:35]
    assert np.allclose(v[normal, F["pre_local"]], 1.0, atol=0.05) and np.allclose(v[normal, F["local_long"]], 1, atol=0.05)
    assert (out.flags[1:-1] == 0).all()


def test_edges_and_gaps_get_values_and_flags_not_nan():
    fs = 360.0
    t = np.r_[np.arange(0, 20, 0.8), np.arange(40, 60, 0.8)]  # 20 s of missing signal between
    out = rr_features(np.round(t * fs).astype(np.int64), fs)
    assert np.isfinite(out.values).all()
    assert out.flags[0] == NO_PREVIOUS and out.flags[-1] == NO_NEXT
    gap = int(np.flatnonzero(np.diff(t) > 3)[0])
    assert out.flags[gap] == BAD_NEXT and out.flags[gap + 1] == BAD_PREVIOUS
    # The gap is in nobody's average: the beats beside it see their own rhythm.
    assert out.values[gap, F["local_rr"]] == pytest.approx(0.8) and out.values[gap, F["post_rr"]] == pytest.approx(0.8)
    assert out.values[0, F["pre_rr"]] == pytest.approx(0.8)  # the first beat: its local average stands in
    one = rr_features(np.array([100]), fs)
    assert one.values.shape == (1, len(RR_FEATURES)) and np.isfinite(one.values).all()
    assert one.values[0, F["pre_rr"]] == RRSpec().default_rr_s and one.flags[0] == NO_PREVIOUS | NO_NEXT
    assert rr_features(np.zeros(0, np.int64), fs).values.shape == (0, len(RR_FEATURES))


def test_the_long_average_looks_back_only_and_order_does_not_matter():
    fs = 100.0
    t = np.r_[np.arange(0, 600, 1.0), 600 + np.arange(0, 300, 0.5)]  # 60/min for 10 min, then 120/min
    s = np.round(t * fs).astype(np.int64)
    out = rr_features(s, fs, RRSpec(long_s=300.0))
    after = np.searchsorted(t, 610.0)
    assert out.values[after, F["local_rr"]] == pytest.approx(0.5)
    assert out.values[after, F["long_rr"]] > 0.9  # the last 5 minutes were mostly at 1 s
    assert out.values[-1, F["long_rr"]] == pytest.approx(0.5, abs=0.002)  # one 1 s interval still in its window
    shuffled = rr_features(np.random.default_rng(0).permutation(s), fs, RRSpec(long_s=300.0))
    assert np.array_equal(shuffled.values, out.values) and np.array_equal(shuffled.flags, out.flags)


@pytest.mark.realdata
@pytest.mark.parametrize("record", ["209", "220", "232"])
def test_s_beats_come_early_against_the_patients_own_rhythm(mirror, record):
    base = str(mirror / "mitdb" / "1.0.0" / record)
    ann = wfdb.rdann(base, "atr")
    beats = label_beats(ann.sample, ann.symbol, AAMI_EC57)
    order = np.argsort(beats.sample, kind="stable")
    out = rr_features(beats.sample, 360.0)
    label = beats.label[order]
    pre_local = out.values[:, F["pre_local"]]
    assert np.median(pre_local[label == "S"]) < 0.9 < np.median(pre_local[label == "N"]), record


def test_features_at_segmented_beats_see_every_beat_of_the_record():
    fs = 360.0
    t = np.arange(0, 60, 0.8)
    t[30] -= 0.3  # premature
    beats = np.round(t * fs).astype(np.int64)
    anchor = beats[[40, 30, 5]]  # a subset, out of order: features come back in the anchors' order
    out = features_at(anchor, beats, fs)
    assert out.shape == (3, len(STORED_FEATURES)) and out.dtype == np.float32
    whole = rr_features(beats, fs)
    assert np.array_equal(out[:, :len(RR_FEATURES)], whole.values[[40, 30, 5]])
    assert out[1, F["pre_local"]] < 0.7 and (out[:, -1] == 0).all()  # no flag inside a regular rhythm
    # Were the unsegmented neighbours left out, the premature beat would be a flagged gap like any other.
    alone = features_at(anchor, anchor, fs)
    assert alone[1, -1] == 1.0 and alone[1, F["pre_local"]] == pytest.approx(1.0)
    edge = features_at(beats[:1], beats, fs)
    assert edge[0, -1] == 1.0  # the first beat of a record: flagged


@pytest.mark.realdata
@pytest.mark.parametrize("record", ["100", "208", "232"])
def test_the_same_features_from_annotations_and_from_detected_beats(mirror, record):
    """Training takes RR features from the annotations, scoring from the detector: on a real record, the
    features of the beats both find agree: pre_rr and post_rr within 30 ms, the local and long averages
    within 50 ms, for 95 % of the beats (208, with 992 V beats whose detected fiducial point moves most,
    gives 25 ms, 32 ms and 8 ms at the 95th percentile)."""
    from ecg_pipeline.pipeline.detect import detect_r_peaks, match_beats

    base = str(mirror / "mitdb" / "1.0.0" / record)
    sig = wfdb.rdrecord(base, channels=[0]).p_signal[:, 0].astype(np.float32)
    ann = wfdb.rdann(base, "atr")
    beats = label_beats(ann.sample, ann.symbol, AAMI_EC57)
    peaks = detect_r_peaks(sig, 360.0)
    m = match_beats(beats.sample, peaks, 360.0, 0.150)
    assert m.tp > 0.98 * m.n_ref
    ref = features_at(beats.sample[m.ref_index], beats.all_sample, 360.0)
    det = features_at(peaks[m.det_index], peaks, 360.0)
    for name, tol in (("pre_rr", 0.030), ("post_rr", 0.030), ("local_rr", 0.050), ("long_rr", 0.050)):
        err = np.abs(ref[:, F[name]] - det[:, F[name]])
        assert np.percentile(err, 95) < tol, (record, name, np.percentile(err, [50, 95, 99]))
