"""Stage 2e: is each segment readable? Signal-quality indices over each beat's and each window's neighbourhood.

``record_quality`` (``pipeline.quality``) judges a whole lead before it is scored; a record that is half
artefact passes it. ``segment_quality`` judges every segment (a beat's neighbourhood, a rhythm window) with
established signal-quality indices (Li, McSharry and Clifford 2008; Behar et al. 2013; Clifford et al. 2012):

* **missing**: the share of samples that are NaN;
* **flat**: the RMS of the 0.5-40 Hz signal below ``flat_mv`` (a lead off, a disconnected electrode);
* **saturated**: the share of samples sitting on the piece's extreme values (clipping at the amplifier's or
  converter's rails), above ``max_saturated``;
* **baseline**: basSQI, 1 - (power below 1 Hz) / (power 0-40 Hz), DC left out, below ``min_bas_sqi`` (baseline
  wander and electrode motion);
* **kurtosis**: kSQI, the kurtosis of the 0.5-40 Hz signal, below ``min_kurtosis`` (an ECG's QRS complexes make it
  strongly super-Gaussian, around 10-30; muscle and motion noise are close to Gaussian, 3);
* **spectrum**: pSQI, (power 5-15 Hz) / (power 5-40 Hz), outside ``p_sqi`` (QRS energy sits at 5-15 Hz; muscle
  noise and mains interference push power above it);
* **noise** (beats): a local signal-to-noise ratio as the MIT-BIH Noise Stress Test defines one, the median QRS
  amplitude of the piece against the 5-40 Hz power between the QRS complexes of the neighbourhood, below
  ``min_snr_db``.

Each segment gets a bit mask of the indices it fails (``FLAGS``, 0: readable); the scoring tasks keep its
probabilities but predict the unreadable class for it (``Q`` for beats, the noise class ``~`` for rhythm
models). Every index is a mean over a window, taken from cumulative sums of the filtered signal (two
zero-phase filters over the piece, then one gather per segment): no per-sample or per-segment Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import signal as sps

#: The bit of each index a segment can fail, in the order of the store's ``flag_meanings``.
FLAGS: dict[str, int] = {"missing": 1, "flat": 2, "saturated": 4, "baseline": 8, "kurtosis": 16, "spectrum": 32,
                         "noise": 64}


def flag_names(mask: int) -> tuple[str, ...]:
    """The names of the indices set in ``mask``."""
    return tuple(name for name, bit in FLAGS.items() if int(mask) & bit)


@dataclass(frozen=True)
class QualityIndices:
    """The indices of each segment (one value per segment, NaN where the window holds no samples)."""

    missing: np.ndarray  #: share of NaN samples
    rms_mv: np.ndarray  #: RMS of the 0.5-40 Hz signal, mV
    saturated: np.ndarray  #: share of samples on the piece's extreme values
    bas_sqi: np.ndarray  #: 1 - P(<1 Hz) / P(0-40 Hz)
    kurtosis: np.ndarray  #: of the 0.5-40 Hz signal (3 for Gaussian noise)
    p_sqi: np.ndarray  #: P(5-15 Hz) / P(5-40 Hz)
    snr_db: np.ndarray  #: the QRS amplitude's power over the 5-40 Hz power between QRS complexes, dB (beats only)

    def flags(self, spec) -> np.ndarray:
        """uint8 bit masks (``FLAGS``) of the indices outside ``spec``'s thresholds (a ``QualityConfig``)."""
        with np.errstate(invalid="ignore"):
            bad = {
                "missing": self.missing > spec.max_missing,
                "flat": self.rms_mv < spec.flat_mv,
                "saturated": self.saturated > spec.max_saturated,
                "baseline": self.bas_sqi < spec.min_bas_sqi,
                "kurtosis": self.kurtosis < spec.min_kurtosis,
                "spectrum": (self.p_sqi < spec.p_sqi[0]) | (self.p_sqi > spec.p_sqi[1]),
                "noise": self.snr_db < (spec.min_snr_db if spec.min_snr_db is not None else -np.inf),
            }
        out = np.zeros(self.missing.shape, np.uint8)
        for name, b in bad.items():
            out |= np.where(b, FLAGS[name], 0).astype(np.uint8)
        # A window with no sample at all is missing, whatever the other indices say (they are NaN there).
        out[~np.isfinite(self.missing)] = FLAGS["missing"]
        return out


@lru_cache(maxsize=8)
def _designs(fs: float) -> tuple[np.ndarray, ...]:
    """Band-pass 0.5-40 Hz (the ECG), 5-15 Hz (QRS), high-pass 5 Hz of the ECG band, low-pass 1 Hz (baseline)."""
    nyq = fs / 2
    top = min(40.0, 0.45 * fs)  # a 100 Hz recording has no 40 Hz
    ecg = sps.butter(2, (0.5, top), btype="bandpass", fs=fs, output="sos")
    qrs = sps.butter(2, (5.0, min(15.0, 0.9 * nyq)), btype="bandpass", fs=fs, output="sos")
    high = sps.butter(2, (5.0, top), btype="bandpass", fs=fs, output="sos")
    base = sps.butter(2, 1.0, btype="lowpass", fs=fs, output="sos")
    wide = sps.butter(2, top, btype="lowpass", fs=fs, output="sos")
    return ecg, qrs, high, base, wide


def _window_means(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The mean of ``values[lo[i]:hi[i]]`` for each i, from one cumulative sum (NaN for an empty window)."""
    c = np.empty(values.size + 1)
    c[0] = 0.0
    np.cumsum(values, out=c[1:])
    return (c[hi] - c[lo]) / n


def _variance(y: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> np.ndarray:
    mean = _window_means(y, lo, hi, n)
    return _window_means(y * y, lo, hi, n) - mean ** 2


#: The indices ``quality_indices`` computes by default, and each one's configuration key that turns it off.
INDICES = ("missing", "flat", "saturated", "baseline", "kurtosis", "spectrum", "noise")


def enabled(spec) -> tuple[str, ...]:
    """The indices a ``QualityConfig`` judges by (a threshold at its 'off' value leaves its index out)."""
    off = {"flat": spec.flat_mv <= 0, "saturated": spec.max_saturated >= 1, "baseline": spec.min_bas_sqi <= -1,
           "kurtosis": spec.min_kurtosis <= 0, "spectrum": spec.p_sqi[0] <= 0 and spec.p_sqi[1] >= 10,
           "noise": spec.min_snr_db is None}
    return tuple(name for name in INDICES if not off.get(name, False))


def quality_indices(x: np.ndarray, fs: float, lo: np.ndarray, hi: np.ndarray, mv_per_unit: float = 1.0,
                    which: tuple[str, ...] = INDICES, beats: np.ndarray | None = None) -> QualityIndices:
    """The quality indices of the windows ``[lo[i], hi[i])`` of one lead ``x`` (physical units, NaNs allowed).

    Parameters
    ----------
    x
        A piece of a lead: the filters see the whole of it, so give the windows' context (a few seconds
        beyond the first and last window) for the same values a whole record gives.
    fs
        Its sampling rate, Hz.
    lo, hi
        Window bounds in samples of ``x``, clipped to ``[0, len(x)]``.
    mv_per_unit
        Millivolts per unit of ``x``.
    which
        The indices to compute (``INDICES``; the others are NaN, and fail no threshold): each costs one or two
        zero-phase filters and a few cumulative sums over ``x``.
    beats
        Every beat detected in ``x`` (samples of ``x``), for the local SNR (``noise``; without them it is NaN).
    """
    x = np.asarray(x, np.float64)
    lo = np.clip(np.asarray(lo, np.int64), 0, x.size)
    hi = np.clip(np.asarray(hi, np.int64), lo, x.size)
    n = (hi - lo).astype(np.float64)
    nan = np.full(lo.shape, np.nan)
    out = dict.fromkeys(("rms_mv", "saturated", "bas_sqi", "kurtosis", "p_sqi", "snr_db"), nan)
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["missing"] = _window_means((~finite).astype(np.float64), lo, hi, n)
        if x.size < 64 or not finite.any():  # too short to filter, or nothing there: only the missing share
            return QualityIndices(**out)
        x0 = np.where(finite, x, 0.0) * mv_per_unit
        ecg_sos, qrs_sos, high_sos, base_sos, wide_sos = _designs(float(fs))
        if "saturated" in which:
            x_ok = x0[finite]
            rails = ((x0 >= x_ok.max()) | (x0 <= x_ok.min())) & finite
            out["saturated"] = _window_means(rails.astype(np.float64), lo, hi, n)
        if {"flat", "kurtosis"} & set(which):
            ecg = sps.sosfiltfilt(ecg_sos, x0)
            mean = _window_means(ecg, lo, hi, n)
            e2 = ecg * ecg
            m2 = _window_means(e2, lo, hi, n)
            var = m2 - mean ** 2
            out["rms_mv"] = np.sqrt(np.maximum(var, 0))
            if "kurtosis" in which:
                m3 = _window_means(e2 * ecg, lo, hi, n)
                m4 = _window_means(np.square(e2, out=e2), lo, hi, n)
                # The 4th central moment from the raw ones: E[(y - u)^4] = E y^4 - 4u E y^3 + 6u^2 E y^2 - 3u^4.
                out["kurtosis"] = (m4 - 4 * mean * m3 + 6 * mean ** 2 * m2 - 3 * mean ** 4) / var ** 2
        if "spectrum" in which:
            qrs, high = sps.sosfiltfilt(qrs_sos, x0), sps.sosfiltfilt(high_sos, x0)
            out["p_sqi"] = _window_means(qrs * qrs, lo, hi, n) / _window_means(high * high, lo, hi, n)
        if "noise" in which and beats is not None and len(beats) >= 3:
            ecg = ecg if {"flat", "kurtosis"} & set(which) else sps.sosfiltfilt(ecg_sos, x0)
            high = high if "spectrum" in which else sps.sosfiltfilt(high_sos, x0)
            out["snr_db"] = _local_snr_db(ecg, high, np.asarray(beats, np.int64), fs, lo, hi)
        if "baseline" in which:
            base, wide = sps.sosfiltfilt(base_sos, x0), sps.sosfiltfilt(wide_sos, x0)
            out["bas_sqi"] = 1 - _variance(base, lo, hi, n) / _variance(wide, lo, hi, n)
    return QualityIndices(**out)


#: Half-widths (s) of the QRS complex: where its peak-to-peak amplitude is measured, and what is left out of the
#: noise between complexes (a wide ventricular QRS lasts up to ~200 ms).
QRS_HALF_S, QRS_GAP_S = 0.05, 0.10


def _local_snr_db(ecg: np.ndarray, high: np.ndarray, beats: np.ndarray, fs: float, lo: np.ndarray,
                  hi: np.ndarray) -> np.ndarray:
    """nst's SNR (MIT-BIH Noise Stress Test), estimated in each window: S = A**2 / 8 with A the median QRS
    peak-to-peak amplitude of the piece's beats (``ecg``: 0.5-40 Hz, within ``QRS_HALF_S`` of each beat: most
    of a piece is readable, so the median is the clean amplitude), N the mean power of the 5-40 Hz signal
    (``high``) in the window outside the QRS complexes (``QRS_GAP_S`` around each beat): P and T waves carry
    little of it, noise most. 10 log10(S / N), dB."""
    n = ecg.size
    beats = beats[(beats >= 0) & (beats < n)]
    h = max(int(round(QRS_HALF_S * fs)), 1)
    block = ecg[np.clip(beats[:, None] + np.arange(-h, h + 1)[None, :], 0, n - 1)]
    amplitude = float(np.median(block.max(axis=1) - block.min(axis=1))) if beats.size else 0.0
    g = max(int(round(QRS_GAP_S * fs)), 1)
    edges = np.zeros(n + 1, np.int64)  # +1 where a QRS zone opens, -1 where it closes: its running sum covers them
    np.add.at(edges, np.clip(beats - g, 0, n), 1)
    np.add.at(edges, np.clip(beats + g + 1, 0, n), -1)
    between = (np.cumsum(edges[:-1]) == 0).astype(np.float64)
    count = _window_means(between, lo, hi, np.ones(lo.shape))
    power = _window_means(high * high * between, lo, hi, np.ones(lo.shape)) / count
    return 10 * np.log10(amplitude ** 2 / 8 / power)


def centred(centres: np.ndarray, fs: float, seconds: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``seconds`` centred on ``centres`` (samples), clipped to ``[0, n]``."""
    half = int(round(seconds * fs / 2))
    c = np.asarray(centres, np.int64)
    return np.clip(c - half, 0, n), np.clip(c + half, 0, n)
