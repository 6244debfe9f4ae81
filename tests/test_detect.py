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


def test_noise_on_a_flat_line_gives_no_beats_and_real_beats_clear_the_floor(mirror):
    from ecg_pipeline.pipeline.config import DetectorSpec

    rng = np.random.default_rng(1)
    noise = 0.01 * rng.standard_normal(360 * 60)  # 10 uV of noise on a flat line, one minute
    assert detect_r_peaks(noise, 360.0, DetectorSpec(min_amplitude_mv=0)).size > 30  # the local level adapts to it
    assert detect_r_peaks(noise, 360.0).size == 0
    assert detect_r_peaks(noise * 1000, 360.0, mv_per_unit=1e-3).size == 0  # the same noise in uV
    base = str(mirror / "mitdb" / "1.0.0" / "119")
    x = wfdb.rdrecord(base).p_signal[:, 0]
    floored, bare = detect_r_peaks(x, 360.0), detect_r_peaks(x, 360.0, DetectorSpec(min_amplitude_mv=0))
    ref = label_beats(*(lambda a: (a.sample, a.symbol))(wfdb.rdann(base, "atr")), AAMI_EC57).sample
    assert match_beats(ref, floored, 360.0).tp == match_beats(ref, bare, 360.0).tp  # no true beat is below it


@pytest.mark.realdata
def test_search_back_finds_small_beats_beside_large_ones(mirror):
    """MIT-BIH 228: narrow normal beats after wide 2.5 mV ventricular ones fall under a threshold the large
    beats set. Search back finds most of them (13 % of the record's beats missed without it, under 3 % with
    it) and adds almost no false detections."""
    from ecg_pipeline.pipeline.config import DetectorSpec

    base = str(mirror / "mitdb" / "1.0.0" / "228")
    rec, ann = wfdb.rdrecord(base), wfdb.rdann(base, "atr")
    x = rec.p_signal[:, rec.sig_name.index("MLII")]
    ref = label_beats(ann.sample, ann.symbol, AAMI_EC57).sample
    without = match_beats(ref, detect_r_peaks(x, rec.fs, DetectorSpec(searchback_threshold=0)), rec.fs)
    found = detect_r_peaks(x, rec.fs)
    m = match_beats(ref, found, rec.fs)
    assert without.sensitivity < 0.9 and m.sensitivity > 0.97, (without.sensitivity, m.sensitivity)
    assert m.n_det - m.tp <= (without.n_det - without.tp) + 5
    assert set(detect_r_peaks(x, rec.fs, DetectorSpec(searchback_threshold=0))) <= set(found)  # it only adds


def test_search_back_leaves_a_pause_empty():
    """A sinus pause (no beat for 3 s) in a regular synthetic rhythm with a T wave after every beat: search back
    looks there but finds nothing over its threshold, and never takes a T wave for a beat."""
    fs = 360.0
    t = np.arange(int(40 * fs)) / fs
    beats = np.concatenate([np.arange(1.0, 20.0, 0.8), np.arange(23.0, 39.0, 0.8)])
    x = np.zeros_like(t)
    for b in beats:
        x += 1.5 * np.exp(-0.5 * ((t - b) / 0.012) ** 2) + 0.3 * np.exp(-0.5 * ((t - b - 0.3) / 0.05) ** 2)
    found = detect_r_peaks(x, fs)
    m = match_beats(np.round(beats * fs).astype(np.int64), found, fs, tolerance_s=0.02)
    assert m.tp == len(beats) == len(found)


@pytest.mark.parametrize("source", ["synthetic", "mitdb-208"])
def test_the_fast_kernels_equal_scipy_and_numpy_bit_for_bit(request, monkeypatch, source):
    """detect.py's in-place filters, percentile, gradient and peak selection are exact rewrites of
    sosfiltfilt, np.percentile, np.gradient and find_peaks (private SciPy kernel or its public fallback)."""
    from scipy import signal

    from ecg_pipeline.pipeline import detect
    from ecg_pipeline.pipeline.config import DetectorSpec

    if source == "synthetic":
        rng = np.random.default_rng(3)
        fs, x = 250.0, np.cumsum(rng.standard_normal(250 * 90))
        x[500:520] = np.nan
    else:
        mirror = request.getfixturevalue("mirror")
        rec = wfdb.rdrecord(str(mirror / "mitdb" / "1.0.0" / "208"))
        fs, x = rec.fs, rec.p_signal[:, 0]
    spec = DetectorSpec()
    clean = np.where(np.isfinite(x), x, 0.0)
    band, fiducial = detect._filtered(x, fs, spec)
    for got, hz in ((band, spec.band_hz), (fiducial, spec.fiducial_band_hz)):
        want = signal.sosfiltfilt(signal.butter(2, hz, btype="bandpass", fs=fs, output="sos"), clean)
        assert np.array_equal(got, want)
    assert np.array_equal(detect._gradient_squared(band), np.gradient(band) ** 2)
    rows = np.abs(band[: 400 * 37]).reshape(37, 400)
    assert np.array_equal(detect._percentile_rows(rows.copy(), 98), np.percentile(rows, 98, axis=1))

    mwi = np.abs(band)
    maxima = signal.find_peaks(mwi)[0]
    level = np.quantile(mwi[maxima], 0.7) * (1 + 0.1 * np.sin(maxima / 997))
    h = np.full(mwi.size, np.inf)
    h[maxima] = level
    want, props = signal.find_peaks(mwi, height=h, distance=int(0.2 * fs))
    peaks = detect.detect_r_peaks(x, fs)
    for kernel in (detect._select_by_peak_distance, None):
        monkeypatch.setattr(detect, "_select_by_peak_distance", kernel)
        got, heights = detect._peaks_over(mwi, maxima, level, int(0.2 * fs))
        assert np.array_equal(got, want) and np.array_equal(heights, props["peak_heights"])
        assert np.array_equal(detect.detect_r_peaks(x, fs), peaks)
    assert want.size > 10 and peaks.size > 10
