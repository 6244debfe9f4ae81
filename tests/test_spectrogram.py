import numpy as np
import pytest
import scipy.signal

from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec, _dft_bands, spectrogram


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


@pytest.mark.parametrize("method", ["rfft", "matmul"])
def test_matches_a_per_beat_scipy_stft(spec, method):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 252)).astype(np.float32)
    out = spectrogram(x, spec, method)
    sft = scipy.signal.ShortTimeFFT(scipy.signal.get_window("hann", 64), hop=8, fs=360, mfft=64, scale_to=None)
    for i in range(7):
        xi = x[i] - x[i].mean()
        # ShortTimeFFT frames are centred on k*hop; ours start at 0, i.e. centred at 32 + k*hop
        S = sft.stft(xi, p0=4, p1=4 + spec.n_time)  # p=4 -> centre 32
        ref = np.log(np.abs(S) + spec.log_eps)
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rfft", "matmul"])
def test_a_sine_peaks_in_its_frequency_bin(spec, method):
    t = np.arange(252) / 360
    x = np.sin(2 * np.pi * 45.0 * t)[None, :].astype(np.float32)  # 45 Hz = bin 8
    out = spectrogram(x, spec, method)
    assert np.argmax(out[0].mean(axis=1)) == 8


def test_rejects_wrong_window_length(spec):
    with pytest.raises(ValueError, match="expected windows of shape"):
        spectrogram(np.zeros((2, 100)), spec)


def test_rejects_nperseg_longer_than_the_window():
    with pytest.raises(ValueError, match="longer than the window"):
        SpectrogramSpec(fs=360, n_before=10, n_after=10, nperseg=64, hop=8, nfft=64)


# The matmul path against the rfft path. Both round in float32: a kept row is a sum of nperseg products, whose
# worst-case rounding error is ~nperseg * 2**-24 (4e-6 for 64 terms) of sum(|x * taper|), and the FFT's is smaller.
# So magnitudes are compared relative to the window's largest one, to MAG_TOL (observed: < 1e-6 on random
# and MIT-BIH windows), and log values where the magnitude is at least a tenth of that largest one, where the
# same error moves the log by at most 10 * MAG_TOL.
MAG_TOL = 1e-5
ACCURACY_SPECS = {
    "default": dict(nperseg=64, hop=8, nfft=64, max_freq_hz=40.0),  # 8 of 33 rows
    "all rows": dict(nperseg=64, hop=8, nfft=64),
    "nfft > nperseg": dict(nperseg=64, hop=8, nfft=128, max_freq_hz=40.0),
    "odd nperseg": dict(nperseg=63, hop=8, nfft=63, max_freq_hz=40.0),
    "odd, all rows, no detrend": dict(nperseg=63, hop=5, nfft=63, detrend="none"),
}


def assert_paths_agree(x: np.ndarray, spec: SpectrogramSpec) -> None:
    ref, new = spectrogram(x, spec, "rfft"), spectrogram(x, spec, "matmul")
    assert new.shape == ref.shape == (len(x), spec.n_freq, spec.n_time) and new.dtype == np.float32
    # exp(log(mag + eps)) in float64: mag + eps to float32 rounding of the log (1e-7 relative); eps cancels
    ref_mag, new_mag = np.exp(ref.astype(np.float64)), np.exp(new.astype(np.float64))
    scale = ref_mag.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(new_mag / scale, ref_mag / scale, rtol=0, atol=MAG_TOL)
    large = ref_mag >= 0.1 * scale
    assert large.any()
    np.testing.assert_allclose(new[large], ref[large], rtol=0, atol=10 * MAG_TOL)


@pytest.mark.parametrize("params", ACCURACY_SPECS.values(), ids=ACCURACY_SPECS.keys())
def test_matmul_agrees_with_rfft_on_random_windows(params):
    spec = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, **params)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 252)).astype(np.float32) + rng.uniform(-1, 1, (300, 1)).astype(np.float32)
    assert_paths_agree(x, spec)


@pytest.mark.realdata
@pytest.mark.parametrize("params", ACCURACY_SPECS.values(), ids=ACCURACY_SPECS.keys())
def test_matmul_agrees_with_rfft_on_mitdb_beats(mirror, params):
    import wfdb

    from ecg_pipeline.pipeline.segment import WindowSpec, extract_windows

    path = str(mirror / "mitdb" / "1.0.0" / "100")
    sig = wfdb.rdrecord(path, channels=[0]).p_signal[:, 0].astype(np.float32)  # raw: baseline up to -0.5 mV
    peak = wfdb.rdann(path, "atr").sample
    peak = peak[(peak >= 90) & (peak + 162 <= len(sig))]
    assert_paths_agree(extract_windows(sig, peak, WindowSpec(90, 162)), SpectrogramSpec(
        fs=360.0, n_before=90, n_after=162, **params))


@pytest.mark.parametrize("method", ["rfft", "matmul"])
@pytest.mark.parametrize("params", ACCURACY_SPECS.values(), ids=ACCURACY_SPECS.keys())
def test_flat_windows_give_log_eps_everywhere(params, method):
    spec = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, **params)
    flat = np.zeros((3, 252), np.float32)
    if spec.detrend == "constant":
        flat += np.array([[0.0], [1.5], [-0.25]], np.float32)  # means exact in float32, so detrended to 0
    out = spectrogram(flat, spec, method)
    assert np.array_equal(out, np.full(out.shape, np.log(np.float32(spec.log_eps))))


def test_auto_takes_matmul_for_few_rows_and_rfft_for_all():
    x = np.random.default_rng(3).standard_normal((4, 252)).astype(np.float32)
    few = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64, max_freq_hz=40.0)
    every = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64)
    assert np.array_equal(spectrogram(x, few), spectrogram(x, few, "matmul"))
    assert np.array_equal(spectrogram(x, every), spectrogram(x, every, "rfft"))
    assert spectrogram(x[:0], few).shape == (0, 8, 24)


def test_cached_bases_are_read_only_and_cover_every_frame():
    bands = _dft_bands("hann", 63, 8, 63, 5, 24)
    assert bands is _dft_bands("hann", 63, 8, 63, 5, 24)
    assert [(t0, t1) for _, t0, t1, _ in bands] == [(0, 7), (7, 14), (14, 21), (21, 24)]
    for start, t0, t1, basis in bands:
        assert start == 8 * t0 and basis.shape == (63 + 8 * (t1 - t0 - 1), 2 * 5 * (t1 - t0))
        assert basis.dtype == np.float32 and not basis.flags.writeable
        with pytest.raises(ValueError):
            basis[0, 0] = 1


def test_rejects_an_unknown_method(spec):
    with pytest.raises(ValueError, match="unknown spectrogram method"):
        spectrogram(np.zeros((2, 252), np.float32), spec, "dft")
