"""Stage 3: one fixed-length window per beat, centred on the annotated R peak.

Windows are cut with one fancy-index gather over the whole record (no per-beat
Python loop). Beats whose window leaves the record, or covers invalid (NaN)
samples, are dropped and counted by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSpec:
    """Samples kept before and after the R peak (the peak sits at index ``n_before``)."""

    n_before: int
    n_after: int

    @classmethod
    def from_seconds(cls, before_s: float, after_s: float, fs: float) -> "WindowSpec":
        return cls(int(round(before_s * fs)), int(round(after_s * fs)))

    @property
    def length(self) -> int:
        return self.n_before + self.n_after


def in_bounds(sample: np.ndarray, sig_len: int, spec: WindowSpec) -> np.ndarray:
    """Mask of beats whose whole window lies inside ``[0, sig_len)``."""
    sample = np.asarray(sample, dtype=np.int64)
    return (sample - spec.n_before >= 0) & (sample + spec.n_after <= sig_len)


def finite_windows(signal: np.ndarray, sample: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Mask of (in-bounds) beats whose window holds no NaN sample.

    Uses a cumulative count of invalid samples, so the cost is one pass over the
    signal whatever the number of beats.
    """
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(signal), dtype=np.int64)])
    start = np.asarray(sample, dtype=np.int64) - spec.n_before
    return bad[start + spec.length] - bad[start] == 0


def extract_windows(signal: np.ndarray, sample: np.ndarray, spec: WindowSpec, offset: int = 0) -> np.ndarray:
    """Gather the beat windows, shape ``(n_beats, spec.length)``.

    Parameters
    ----------
    signal
        1-D signal that starts at record sample ``offset``.
    sample
        R-peak sample indices in record coordinates; every window must lie in ``signal``.
    """
    start = np.asarray(sample, dtype=np.int64) - spec.n_before - offset
    if start.size and (start.min() < 0 or start.max() + spec.length > signal.shape[0]):
        raise IndexError("a beat window extends outside the signal given")
    return signal[start[:, None] + np.arange(spec.length)]
