import numpy as np
import pytest
import scipy.signal

from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec, spectrogram


@pytest.fixture
def spec():
    return SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64)


def test_shape_and_coordinates(spec):
    out = spectrogram(np.zeros((5, 252), np.float32), spec)
    assert out.shape == (5, 33, 24) == (5, spec.n_freq, spec.n_time)
    assert out.dtype == np.float32
    assert spec.freqs()[1] == pytest.approx(360 / 64) and spec.freqs()[-1] == pytest.approx(180)
    # first frame is centred 32 samples into the window, i.e. 58 samples before the R peak
    assert spec.times()[0] == pytest.approx((32 - 90) / 360)
    assert np.allclose(np.diff(spec.times()), 8 / 360)


def test_matches_a_per_beat_scipy_stft(spec):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 252)).astype(np.float32)
    out = spectrogram(x, spec)
    sft = scipy.signal.ShortTimeFFT(scipy.signal.get_window("hann", 64), hop=8, fs=360, mfft=64, scale_to=None)
    for i in range(7):
        xi = x[i] - x[i].mean()
        # ShortTimeFFT frames are centred on k*hop; ours start at 0, i.e. centred at 32 + k*hop
        S = sft.stft(xi, p0=4, p1=4 + spec.n_time)  # p=4 -> centre 32
        ref = np.log(np.abs(S) + spec.log_eps)
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-4)


def test_a_sine_peaks_in_its_frequency_bin(spec):
    t = np.arange(252) / 360
    x = np.sin(2 * np.pi * 45.0 * t)[None, :].astype(np.float32)  # 45 Hz = bin 8
    out = spectrogram(x, spec)
    assert np.argmax(out[0].mean(axis=1)) == 8


def test_rejects_wrong_window_length(spec):
    with pytest.raises(ValueError, match="expected windows of shape"):
        spectrogram(np.zeros((2, 100)), spec)


def test_rejects_nperseg_longer_than_the_window():
    with pytest.raises(ValueError, match="longer than the window"):
        SpectrogramSpec(fs=360, n_before=10, n_after=10, nperseg=64, hop=8, nfft=64)
