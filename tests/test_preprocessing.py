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
