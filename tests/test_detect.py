"""R-peak detection and EC57 beat matching: hand-made cases and the real MIT-BIH records."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb

from ecg_pipeline.pipeline.detect import detect_r_peaks, match_beats
from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats


def test_match_beats_by_hand():
    fs = 100.0  # tolerance 150 ms = 15 samples
    ref = np.array([100, 200, 300, 400])
    det = np.array([105, 190, 216, 330, 500])
    m = match_beats(ref, det, fs)
    # 100-105 (5), 200-190 (10); 216 is 16 away from 200: too far; 300-330: 30, too far; 400: nothing near.
    assert m.ref_index.tolist() == [0, 1] and m.det_index.tolist() == [0, 1]
    assert m.sensitivity == pytest.approx(2 / 4) and m.positive_predictivity == pytest.approx(2 / 5)
    # One detection between two beats goes to the nearer one, once.
    m = match_beats(np.array([100, 120]), np.array([112]), fs)
    assert m.ref_index.tolist() == [1] and m.tp == 1
    assert match_beats(np.array([], np.int64), det, fs).tp == 0


def test_detects_synthetic_beats_with_noise_and_drift():
    fs = 360.0
    rng = np.random.default_rng(0)
    beats = np.cumsum(rng.integers(250, 400, size=60)) + 400  # 0.7-1.1 s apart
    t = np.arange(int(beats[-1] + 500))
    qrs = np.exp(-0.5 * ((t[:, None] - beats[None, :]) / 5.0) ** 2).sum(axis=1)
    x = qrs + 0.3 * np.sin(2 * np.pi * 0.3 * t / fs) + 0.03 * rng.standard_normal(t.size)
    x[1000:1010] = np.nan  # a gap does not break it
    found = detect_r_peaks(x, fs)
    m = match_beats(beats, found, fs, tolerance_s=0.02)
    assert m.sensitivity >= 0.98 and m.positive_predictivity >= 0.98, (m.tp, m.n_ref, m.n_det)


@pytest.mark.realdata
@pytest.mark.parametrize("record", ["100", "119", "208", "232"])
def test_detector_on_mitdb_records(mirror, record):
    """Against the cardiologists' beat annotations (EC57 matching, 150 ms), lead MLII."""
    base = str(mirror / "mitdb" / "1.0.0" / record)
    rec, ann = wfdb.rdrecord(base), wfdb.rdann(base, "atr")
    x = rec.p_signal[:, rec.sig_name.index("MLII")]
    m = match_beats(label_beats(ann.sample, ann.symbol, AAMI_EC57).sample, detect_r_peaks(x, rec.fs), rec.fs)
    assert m.sensitivity > 0.98 and m.positive_predictivity > 0.98, (record, m.sensitivity, m.positive_predictivity)
