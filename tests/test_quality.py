"""The per-record quality verdict on leads built to be doubtful, and on real records that are not."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb

from ecg_pipeline.pipeline.quality import record_quality


@pytest.mark.parametrize("signal, fs, kwargs, reason, refused", [
    (np.full(3600, np.nan), 360.0, {}, "no signal (all 3,600 samples missing)", True),
    (np.zeros(0), 360.0, {}, "no signal (no samples)", True),
    (np.zeros(3600), 360.0, {}, "flat (peak-to-peak 0 mV, below 0.05 mV)", True),
    (np.random.default_rng(0).normal(0, 0.003, 3600), 360.0, {}, "flat (peak-to-peak", True),
    (np.sin(np.arange(10) / 3.0), 360.0, {"min_seconds": 0.7}, "too short (0.03 s; the model needs 0.7 s)", True),
    (np.sin(np.arange(1280) / 3.0), 128.0, {"min_fs": 360.0}, "sampling rate 128 Hz below the 360 Hz", True),
    (np.where(np.arange(3600) < 2600, np.nan, np.sin(np.arange(3600) / 9.0)), 360.0, {}, "mostly missing (72%", False),
    (np.sin(np.arange(3600) / 9.0), 360.0, {"lead": "V1", "lead_fallback": True}, "lead V1 taken by the fallback",
     False),
])
def test_doubtful_leads_are_named(signal, fs, kwargs, reason, refused):
    verdict = record_quality(signal, fs, **kwargs)
    assert reason in verdict.text and verdict.refused is refused, verdict.text


def test_units_count_for_flatness():
    x = 20 * np.sin(np.arange(3600) / 9.0)  # 40 uV peak to peak
    assert not record_quality(x, 360.0)  # read as mV: 40 mV, not flat
    assert record_quality(x, 360.0, mv_per_unit=1e-3).text.startswith("flat (peak-to-peak 0.04 mV")
    assert not record_quality(2 * x, 360.0, mv_per_unit=1e-3)  # 0.08 mV: above the floor


@pytest.mark.realdata
def test_every_mitdb_record_is_clean_at_its_own_rate(mirror):
    root = mirror / "mitdb" / "1.0.0"
    for name in (root / "RECORDS").read_text().split():
        rec = wfdb.rdrecord(str(root / name), channels=[0])
        verdict = record_quality(rec.p_signal[:, 0], rec.fs, min_seconds=0.7, min_fs=360.0)
        assert not verdict, (name, verdict.text)


def test_percentiles_equal_numpy_bit_for_bit():
    # LeadStats.of runs once per recording (100,000 of them in a job): one partition instead of np.percentile
    from ecg_pipeline.pipeline.quality import percentiles

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 9000, 65537):
        for dtype in (np.float64, np.float32, np.int16):
            x = (rng.standard_normal(n) * 1000).astype(dtype)  # no int16 overflow: NumPy would differ there
            for q in ((0.5, 99.5), (0.0, 100.0), (50.0,), (99.5, 0.5)):
                got, want = percentiles(x, q), np.percentile(x, q)
                assert got.dtype == want.dtype and np.array_equal(got, want), (n, dtype, q, got, want)
