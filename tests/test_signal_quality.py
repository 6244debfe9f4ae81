"""Per-segment signal quality (pipeline.signal_quality): each index on hand-made signals, and on real records."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb
from scipy import stats

from ecg_pipeline.pipeline import signal_quality as sq
from ecg_pipeline.pipeline.config import QualityConfig, ScoreConfig, score_config_from_dict

FS = 360.0


def synthetic_ecg(seconds: float, fs: float = FS, rate_bpm: float = 72, seed: int = 0) -> np.ndarray:
    """Narrow QRS-like spikes (1 mV, ~25 ms) with small T waves: strongly super-Gaussian, energy at 5-15 Hz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    beats = np.arange(0.5, seconds, 60 / rate_bpm)
    d = t[:, None] - beats[None, :]
    x = np.exp(-0.5 * (d / 0.010) ** 2).sum(1) + 0.2 * np.exp(-0.5 * ((d - 0.25) / 0.04) ** 2).sum(1)
    return x + 0.01 * rng.standard_normal(t.size)


def indices(x: np.ndarray, seconds: float = 3.0, fs: float = FS) -> sq.QualityIndices:
    centres = np.arange(int(2 * fs), x.size - int(2 * fs), int(fs))
    lo, hi = sq.centred(centres, fs, seconds, x.size)
    return sq.quality_indices(x, fs, lo, hi)


def test_clean_synthetic_ecg_is_readable_and_each_kind_of_bad_signal_fails_its_index():
    spec = QualityConfig(min_bas_sqi=0.5, p_sqi=(0.3, 0.95), min_kurtosis=4)  # every index on
    clean = synthetic_ecg(30)
    assert not indices(clean).flags(spec).any()
    rng = np.random.default_rng(1)
    cases = {
        "missing": np.where(np.arange(clean.size) % 2 == 0, np.nan, clean),  # half the samples lost
        "flat": 0.002 * rng.standard_normal(clean.size),  # 2 uV of noise on a disconnected lead
        "saturated": np.clip(clean + 3 * np.sin(2 * np.pi * 0.2 * np.arange(clean.size) / FS), -1.5, 1.5),
        "baseline": clean + 4 * np.sin(2 * np.pi * 0.3 * np.arange(clean.size) / FS),  # wander 4x the QRS
        "kurtosis": 0.5 * rng.standard_normal(clean.size),  # Gaussian noise, no ECG
        "spectrum": clean + 0.5 * np.sin(2 * np.pi * 35 * np.arange(clean.size) / FS),  # high-frequency interference
    }
    for name, x in cases.items():
        flags = indices(x).flags(spec)
        share = np.mean(flags & sq.FLAGS[name] != 0)
        assert share > 0.8, (name, share, [sq.flag_names(f) for f in flags[:3]])


def test_the_local_snr_follows_the_noise_added_and_needs_the_beats():
    """nst's SNR (S = A^2 / 8 from the QRS amplitude, N the noise power): white noise at a known SNR lowers the
    estimate by as many dB (the estimate counts only the noise's 5-40 Hz share, 35/180 of white noise's power at
    360 Hz: 7.1 dB above the true SNR)."""
    clean = synthetic_ecg(60)
    beats = np.flatnonzero(np.diff(np.sign(np.diff(clean))) < 0) + 1
    beats = beats[clean[beats] > 0.5]
    amplitude = np.median([np.ptp(clean[b - 18:b + 19]) for b in beats])
    rng = np.random.default_rng(3)
    lo, hi = sq.centred(beats, FS, 3.0, clean.size)
    found = {}
    for snr in (12, 6, 0):
        noise = rng.standard_normal(clean.size) * amplitude / np.sqrt(8) / 10 ** (snr / 20)
        q = sq.quality_indices(clean + noise, FS, lo, hi, beats=beats)
        found[snr] = float(np.median(q.snr_db))
        # (at 0 dB the noise adds to the QRS amplitude measured too: 2 dB more)
        assert found[snr] == pytest.approx(snr + 10 * np.log10(180 / 35), abs=2.5), found
    assert found[12] > found[6] + 4 > found[0] + 8
    assert np.median(sq.quality_indices(clean, FS, lo, hi, beats=beats).snr_db) > 25
    assert np.isnan(sq.quality_indices(clean, FS, lo, hi).snr_db).all()  # without beats, no estimate


def test_the_windowed_moments_equal_scipy_on_each_window():
    rng = np.random.default_rng(2)
    x = synthetic_ecg(20) + 0.05 * rng.standard_normal(int(20 * FS))
    lo = np.array([0, 100, 1000, 5000, 7000])
    hi = lo + np.array([720, 1080, 360, 2000, 200])
    q = sq.quality_indices(x, FS, lo, hi)
    from scipy import signal as sps

    # At 360 Hz the indices are taken on the signal averaged over pairs of samples (180 Hz), windows on a 25 ms grid.
    k = int(FS // sq.DECIMATE_TO_HZ)
    half = x[: x.size // k * k].reshape(-1, k).mean(axis=1)
    ecg = sps.sosfiltfilt(sps.butter(2, (0.5, 40), btype="bandpass", fs=FS / k, output="sos"), half)
    a, b = sq._Grid.of(lo // k, hi // k, half.size, FS / k).bounds()
    assert k == 2 and np.abs(a * k - lo).max() <= 0.0125 * FS + k and np.abs(b * k - hi).max() <= 0.0125 * FS + k
    for i in range(lo.size):
        w = ecg[a[i]:b[i]]
        assert q.kurtosis[i] == pytest.approx(stats.kurtosis(w, fisher=True) + 3, rel=1e-6)
        assert q.rms_mv[i] == pytest.approx(w.std(), rel=1e-6)
    # Empty windows, and windows over the ends, are clipped; an empty one counts as missing.
    q = sq.quality_indices(x, FS, np.array([-50, x.size - 10, 30]), np.array([50, x.size + 10, 30]))
    assert np.isfinite(q.kurtosis[:2]).all() and np.isnan(q.kurtosis[2])
    assert q.flags(QualityConfig()).tolist()[2] == sq.FLAGS["missing"]


def test_only_the_enabled_indices_are_computed_and_the_configuration_turns_them_off():
    assert sq.enabled(QualityConfig()) == ("missing", "flat", "saturated", "kurtosis", "noise")
    assert "noise" not in sq.enabled(QualityConfig(min_snr_db=None))
    assert "baseline" in sq.enabled(QualityConfig(min_bas_sqi=0.5))
    q = sq.quality_indices(synthetic_ecg(10), FS, np.array([0]), np.array([3600]), which=("missing",))
    assert np.isnan(q.kurtosis).all() and q.missing[0] == 0
    # The earlier form `quality: flag` is the records' verdict; segments are judged unless turned off.
    c = score_config_from_dict({"quality": "flag"})
    assert c.quality.records == "flag" and c.quality.segments
    assert score_config_from_dict({"quality": {"segments": False}}).quality == QualityConfig(segments=False)
    assert ScoreConfig().fingerprint() != ScoreConfig(quality=QualityConfig(min_kurtosis=4)).fingerprint()


@pytest.mark.realdata
def test_clean_mitdb_beats_are_readable_and_flagged_beats_lie_in_the_annotated_noise(mirror):
    """MIT-BIH 100 is clean throughout: no beat is flagged. 105 has long stretches of noise, which its annotators
    marked (``~``, the subtype's bit 0: the upper signal is noisy): what the indices flag lies there."""
    from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats

    spec = QualityConfig()
    for record, most_flagged_in_noise in (("100", None), ("105", 0.8)):
        base = str(mirror / "mitdb" / "1.0.0" / record)
        rec, ann = wfdb.rdrecord(base), wfdb.rdann(base, "atr")
        x = rec.p_signal[:, 0]  # MLII
        beats = label_beats(ann.sample, ann.symbol, AAMI_EC57).sample
        lo, hi = sq.centred(beats, rec.fs, spec.neighbourhood_s, x.size)
        flags = sq.quality_indices(x, rec.fs, lo, hi, 1.0, sq.enabled(spec)).flags(spec)
        if most_flagged_in_noise is None:
            assert not flags.any(), np.flatnonzero(flags)[:10]
            continue
        # The noise state of the upper signal at each beat, from the annotators' `~` notes.
        noise = np.array([s == "~" for s in ann.symbol])
        state = np.zeros(len(ann.sample), bool)
        marks = np.flatnonzero(noise)
        noisy = (ann.subtype[marks] & 1 != 0) | (ann.subtype[marks] == -1)
        idx = np.searchsorted(ann.sample[marks], ann.sample, side="right") - 1
        state[idx >= 0] = noisy[idx[idx >= 0]]
        at_beat = state[np.searchsorted(ann.sample, beats)]
        assert flags.any() and np.mean(at_beat[flags != 0]) >= most_flagged_in_noise, (
            int(np.count_nonzero(flags)), float(np.mean(at_beat[flags != 0])))
