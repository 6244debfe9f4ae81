"""Stage 4: log-magnitude STFT of all beats of a record in one vectorised call.

Two ways, equal in exact arithmetic, compute the same ``log(abs(rfft(...))[:n_freq] + log_eps)``:

* ``rfft``: the windows ``(n, L)`` are framed with a strided view ``(n, T, nperseg)``, tapered, and
  transformed by one ``scipy.fft.rfft`` over the last axis, which makes all ``nfft // 2 + 1`` rows.
* ``matmul``: only the kept rows, as real matrix products of the windows with cached banded (Toeplitz)
  matrices of ``taper * cos`` and ``-taper * sin``; a few frames per product, so the frames are never
  copied out of the windows and the results land in the final ``(n, n_freq, n_time)`` layout.

``method="auto"`` takes ``matmul`` while it keeps at most half of the rows: it was faster up to 65-100 %
of them (more with more frame overlap) for nperseg 32-128, hop nperseg / 8 or / 4, nfft 1-2 x nperseg.
For the default beat spec (nperseg 64, hop 8, nfft 64, 8 of 33 rows), 2,300 windows of 252 samples,
medians of interleaved repeats with one BLAS thread (as in Dask workers, whose nanny sets
``OPENBLAS_NUM_THREADS=1``) on a 2-core AVX-512 Xeon: ``rfft`` 8.8-10.8 ms, ``matmul`` 3.4-3.5 ms
(2.6x on random, 3.1x on MIT-BIH 100 windows; ~1.5 us per beat). A per-beat ``ShortTimeFFT`` loop
measured ~1.6k beats/s. A multi-threaded BLAS on an oversubscribed machine made ``matmul`` slower than
``rfft`` (threads waiting on each other).
The two methods agree to float32 rounding: magnitudes within 1e-6 of each window's largest (tests allow 1e-5).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.fft
import scipy.signal

from .errors import ConfigError
from .segment import WindowSpec

if TYPE_CHECKING:
    from .config import PreprocessConfig
    from .labels import LabelSource


class SpectrogramSpecError(ConfigError, ValueError):
    """STFT parameters that cannot work with the window (a job-level error: one line, exit status 2)."""


@dataclass(frozen=True)
class SpectrogramSpec:
    """Everything that fixes the spectrogram of a beat window.

    The output shape ``(n_freq, n_time)`` is the same for every record of a store.
    """

    fs: float
    n_before: int
    n_after: int
    nperseg: int
    hop: int
    nfft: int
    window: str = "hann"
    detrend: str = "constant"
    log_eps: float = 1e-4
    pad: str = "none"  #: ``segment.WindowSpec.pad`` of the windows (rhythm windows: ``wrap``)
    max_freq_hz: float | None = None  #: keep the rows up to this frequency only (None: up to fs / 2)

    def __post_init__(self) -> None:
        if self.nperseg > self.n_before + self.n_after:
            raise SpectrogramSpecError(
                f"stft.nperseg ({self.nperseg}) is longer than the window ({self.n_before + self.n_after} samples at "
                f"{self.fs:g} Hz): choose a shorter nperseg or a longer window")
        if self.nfft < self.nperseg:
            raise SpectrogramSpecError(f"stft.nfft ({self.nfft}) must be at least stft.nperseg ({self.nperseg})")

    @property
    def n_freq(self) -> int:
        """Frequency rows kept: all ``nfft // 2 + 1``, or those up to ``max_freq_hz``."""
        n = self.nfft // 2 + 1
        if self.max_freq_hz is None:
            return n
        return max(1, min(n, int(np.floor(self.max_freq_hz * self.nfft / self.fs + 1e-9)) + 1))

    @property
    def min_fs_hz(self) -> float:
        """The lowest recorder rate whose records fill every row: 2.5 x the top row's frequency (its Nyquist rate
        with room for the resampling filter's transition and the taper's leakage), or the store's own rate."""
        if self.max_freq_hz is None or self.n_freq == self.nfft // 2 + 1:
            return float(self.fs)
        return float(min(self.fs, 2.5 * float(self.freqs()[-1])))

    @property
    def n_time(self) -> int:
        return 1 + (self.n_before + self.n_after - self.nperseg) // self.hop

    def freqs(self) -> np.ndarray:
        """Bin frequencies in Hz."""
        return (np.arange(self.n_freq) * self.fs / self.nfft).astype(np.float32)

    def times(self) -> np.ndarray:
        """Frame centres in seconds relative to the R peak."""
        centre = np.arange(self.n_time) * self.hop + self.nperseg / 2
        return ((centre - self.n_before) / self.fs).astype(np.float32)

    @classmethod
    def from_attrs(cls, sp: Any) -> "SpectrogramSpec":
        """The spec a store's (or a model's) ``spectrogram`` attribute describes."""
        band = sp.get("max_freq_hz")
        return cls(fs=float(sp["fs"]), n_before=int(sp["n_before"]), n_after=int(sp["n_after"]),
                   nperseg=int(sp["nperseg"]), hop=int(sp["hop"]), nfft=int(sp["nfft"]), window=sp["window"],
                   detrend=sp.get("detrend", "constant"), log_eps=float(sp["log_eps"]), pad=sp.get("pad", "none"),
                   max_freq_hz=None if band is None else float(band))

    def attrs(self) -> dict[str, Any]:
        """Parameters as store attributes (``pad`` only where windows are padded, as beat stores never are)."""
        pad = {"pad": self.pad} if self.pad != "none" else {}
        band = {"max_freq_hz": self.max_freq_hz} if self.max_freq_hz is not None else {}
        return {
            "fs": self.fs,
            "n_before": self.n_before,
            "n_after": self.n_after,
            "nperseg": self.nperseg,
            "hop": self.hop,
            "nfft": self.nfft,
            "window": self.window,
            "detrend": self.detrend,
            "log_eps": self.log_eps,
            "transform": "log(abs(rfft(detrend(x)[frame] * window, nfft)) + log_eps)" + (
                ", rows up to max_freq_hz" if band else ""),
            **pad,
            **band,
        }


def spec_from_config(config: PreprocessConfig, fs: float, label_source: LabelSource | None = None) -> SpectrogramSpec:
    """The spectrogram a preprocess configuration gives at sampling rate ``fs``.

    Parameters
    ----------
    config
        Its ``stft`` section; its ``window`` section too when ``label_source`` is None.
    label_source
        Whose window (``label_source.window``, seconds before and after the anchor) and padding
        (``label_source.pad``) the segments have; None: beat windows of ``config.window``, never padded.
    """
    before_after, pad = (((config.window.before_s, config.window.after_s), "none") if label_source is None
                         else (label_source.window, label_source.pad))
    w = WindowSpec.from_seconds(*before_after, fs)
    c = config.stft
    return SpectrogramSpec(fs=fs, n_before=w.n_before, n_after=w.n_after, nperseg=c.nperseg, hop=c.hop,
                           nfft=c.nfft or c.nperseg, window=c.window, detrend=c.detrend, log_eps=c.log_eps, pad=pad,
                           max_freq_hz=c.max_freq_hz)


#: ``method="auto"`` uses ``matmul`` while ``n_freq / (nfft // 2 + 1)`` is at most this (measured crossover:
#: 0.65-1, lower with less frame overlap; see the module docstring).
_MATMUL_MAX_ROW_SHARE = 0.5

Method = Literal["auto", "matmul", "rfft"]


@functools.lru_cache(maxsize=32)
def _dft_bands(window: str, nperseg: int, hop: int, nfft: int, n_freq: int, n_time: int
               ) -> tuple[tuple[int, int, int, np.ndarray], ...]:
    """Banded DFT matrices that map window samples straight to the kept STFT rows of a run of frames.

    Returns
    -------
    tuple
        ``(first_sample, first_frame, stop_frame, basis)`` per run of frames: ``basis`` is read-only float32
        ``(span, 2 * n_freq * n_frames)`` with columns ordered (real/imaginary, frequency, frame), so
        ``windows[:, first_sample:first_sample + span] @ basis`` reshapes to ``(n, 2, n_freq, n_frames)``.
    """
    taper = scipy.signal.get_window(window, nperseg)
    phase = 2 * np.pi * np.outer(np.arange(nperseg), np.arange(n_freq)) / nfft  # zero padding to nfft: same bins
    dft = np.stack([taper[:, None] * np.cos(phase), -taper[:, None] * np.sin(phase)], axis=1)  # (nperseg, 2, F)
    # Runs of nperseg // hop frames span about 2 * nperseg samples: half the matrix is zeros, far less waste
    # than one product over the whole window, and each product is still large enough for BLAS (measured).
    run = max(1, nperseg // hop)
    bands = []
    for t0 in range(0, n_time, run):
        t1 = min(n_time, t0 + run)
        basis = np.zeros((nperseg + (t1 - t0 - 1) * hop, 2, n_freq, t1 - t0))
        for t in range(t1 - t0):
            basis[t * hop:t * hop + nperseg, :, :, t] = dft
        basis = basis.reshape(basis.shape[0], -1).astype(np.float32)  # rounded once, from float64
        basis.flags.writeable = False  # shared by every caller of the cache
        bands.append((t0 * hop, t0, t1, basis))
    return tuple(bands)


def spectrogram(windows: np.ndarray, spec: SpectrogramSpec, method: Method = "auto") -> np.ndarray:
    """Log-magnitude spectrograms of beat windows.

    Parameters
    ----------
    windows
        ``(n_beats, n_before + n_after)`` signal windows (physical units).
    spec
        The STFT.
    method
        ``rfft`` (all rows, then the kept ones), ``matmul`` (the kept rows only), or ``auto``: the faster one
        for ``spec``. Both agree to float32 rounding.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n_beats, spec.n_freq, spec.n_time)``.
    """
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != spec.n_before + spec.n_after:
        raise ValueError(f"expected windows of shape (n, {spec.n_before + spec.n_after}), got {x.shape}")
    if spec.detrend == "constant":
        # Subtracted here, not folded into the products as frames @ M - mean * colsum(M): the fold's pass over
        # the (larger) products costs more than this one, and its cancellation leaves ~1e-6 x the offset in
        # every row, which shows above log_eps for a flat window (measured).
        x = x - x.mean(axis=1, keepdims=True)
    if method == "auto":
        method = "matmul" if spec.n_freq <= _MATMUL_MAX_ROW_SHARE * (spec.nfft // 2 + 1) else "rfft"
    eps = np.float32(spec.log_eps)
    if method == "matmul":
        n = x.shape[0]
        out = np.empty((n, spec.n_freq, spec.n_time), np.float32)
        for start, t0, t1, basis in _dft_bands(spec.window, spec.nperseg, spec.hop, spec.nfft, spec.n_freq,
                                               spec.n_time):
            y = x[:, start:start + basis.shape[0]] @ basis  # (n, [real | imaginary] x n_freq x frames)
            half = y.shape[1] // 2
            # Elementwise work on the product's long contiguous rows; only the last step writes the short
            # frame runs of ``out``: numpy's per-run overhead made three strided steps cost 0.6 ms more.
            mag = np.square(y[:, :half])
            mag += np.square(y[:, half:])
            np.sqrt(mag, out=mag)
            mag += eps
            np.log(mag.reshape(n, spec.n_freq, t1 - t0), out=out[:, :, t0:t1])
        return out
    if method != "rfft":
        raise ValueError(f"unknown spectrogram method {method!r}")
    taper = scipy.signal.get_window(spec.window, spec.nperseg).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, spec.nperseg, axis=1)[:, :: spec.hop][:, : spec.n_time]
    mag = np.abs(scipy.fft.rfft(frames * taper, n=spec.nfft, axis=-1)[..., : spec.n_freq])  # (n, T, F)
    out = np.log(mag + eps)
    return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)
