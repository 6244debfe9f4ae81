"""Stage 3: the segment seam: anchors -> fixed-length windows -> spectrograms.

A label source (``pipeline.labels``) turns a record into anchors (the sample each
segment is placed at: an R peak, a crop start) and labels; this module checks
which windows around the anchors are usable (``check_windows``: inside the record,
no invalid sample) and turns them into spectrograms (``spectrograms``). Both jobs
call these two functions, so training stores and scoring cut and transform
segments the same way.

Windows are cut with one fancy-index gather over the whole record (no per-beat
Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from .spectrogram import SpectrogramSpec


Pad = Literal["none", "wrap"]


@dataclass(frozen=True)
class WindowSpec:
    """Samples kept before and after the anchor (the anchor sits at index ``n_before``).

    ``pad="wrap"`` lets a window that starts inside the record run past its end: the
    missing samples repeat the window's own signal from its start (``numpy.pad``'s
    ``wrap``), so a recording shorter than the window is seen whole, repeated, and keeps
    its label; the spectrogram never sees a synthetic flat line. Beat windows never pad.
    """

    n_before: int
    n_after: int
    pad: Pad = "none"

    @classmethod
    def from_seconds(cls, before_s: float, after_s: float, fs: float, pad: Pad = "none") -> "WindowSpec":
        return cls(int(round(before_s * fs)), int(round(after_s * fs)), pad)

    @property
    def length(self) -> int:
        return self.n_before + self.n_after


def cover_windows(sig_len: int, length: int, hop: int) -> np.ndarray:
    """Starts of windows of ``length`` every ``hop`` samples that together cover ``[0, sig_len)``.

    The last window is aligned to the record's end, so no sample is left out (it may
    overlap its neighbour by more than the others do); a record shorter than ``length``
    gets one window at 0, which the segment seam pads (``WindowSpec.pad``).
    """
    if sig_len <= length:
        return np.zeros(1 if sig_len > 0 else 0, dtype=np.int64)
    start = np.arange(0, sig_len - length + 1, hop, dtype=np.int64)
    if start[-1] + length < sig_len:
        start = np.append(start, sig_len - length)
    return start


def window_grid(sig_len: int, fs: float, window_s: float, hop_s: float) -> np.ndarray:
    """The one grid of fixed windows every windowed label source and ``score`` use: ``cover_windows`` of
    ``window_s`` every ``hop_s`` seconds at ``fs`` (record samples of the window starts)."""
    return cover_windows(sig_len, int(round(window_s * fs)), max(int(round(hop_s * fs)), 1))


def in_bounds(sample: np.ndarray, sig_len: int, spec: WindowSpec) -> np.ndarray:
    """Mask of beats whose whole window lies inside ``[0, sig_len)``."""
    sample = np.asarray(sample, dtype=np.int64)
    return (sample - spec.n_before >= 0) & (sample + spec.n_after <= sig_len)


def finite_windows(signal: np.ndarray, sample: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """Mask of (in-bounds) beats whose window holds no NaN sample.

    Uses a cumulative count of invalid samples, so the cost is one pass over the
    signal whatever the number of beats. A padded window is checked over its real part.
    """
    start = np.asarray(sample, dtype=np.int64) - spec.n_before
    invalid = ~np.isfinite(signal)
    if not invalid.any():  # the usual case: a bool pass, not a cumulative count (5x cheaper)
        return np.ones(start.shape, bool)
    bad = np.concatenate([[0], np.cumsum(invalid, dtype=np.int64)])
    return bad[np.minimum(start + spec.length, signal.shape[0])] - bad[start] == 0


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
    if start.size and start.min() < 0:
        raise IndexError("a window starts before the signal given")
    if spec.pad == "wrap":
        # Each window's real part is [start, end of signal); the rest repeats it (see WindowSpec).
        valid = np.minimum(spec.length, signal.shape[0] - start)
        if valid.size and valid.min() <= 0:
            raise IndexError("a window starts after the end of the signal given")
        return signal[start[:, None] + np.arange(spec.length)[None, :] % valid[:, None]]
    if start.size and start.max() + spec.length > signal.shape[0]:
        raise IndexError("a window extends outside the signal given")
    if not start.size:
        return np.empty((0, spec.length), signal.dtype)
    # Rows of a strided view are copied whole: ~4x faster than gathering an (n, length) index array (measured).
    return np.lib.stride_tricks.sliding_window_view(signal, spec.length)[start]


@dataclass(frozen=True)
class WindowCheck:
    """Which anchors have a usable window, and why the others do not."""

    keep: np.ndarray  #: bool mask over the anchors
    n_edge: int  #: windows that leave the record
    n_invalid: int  #: windows over invalid (NaN) samples


def check_windows(signal: np.ndarray, anchor: np.ndarray, spec: WindowSpec, offset: int = 0,
                  sig_len: int | None = None) -> WindowCheck:
    """Mask of anchors whose window lies inside the record and over finite samples only.

    Parameters
    ----------
    signal
        1-D signal that starts at record sample ``offset``.
    anchor
        Anchors in record samples.
    sig_len
        Record length; default: the end of ``signal``. Windows must also lie in ``signal``.
    """
    anchor = np.asarray(anchor, dtype=np.int64)
    end = offset + signal.shape[0] if sig_len is None else min(sig_len, offset + signal.shape[0])
    stop = anchor - spec.n_before + 1 if spec.pad == "wrap" else anchor + spec.n_after  # padded: needs 1 sample
    inside = (anchor - spec.n_before >= offset) & (stop <= end)
    finite = np.zeros_like(inside)
    finite[inside] = finite_windows(signal, anchor[inside] - offset, spec)
    keep = inside & finite
    return WindowCheck(keep, int((~inside).sum()), int((inside & ~finite).sum()))


def spectrograms(signal: np.ndarray, anchor: np.ndarray, spec: "SpectrogramSpec", offset: int = 0) -> np.ndarray:
    """Spectrograms ``(n, n_freq, n_time)`` float32 of the windows around ``anchor`` (all inside ``signal``)."""
    from .spectrogram import spectrogram

    windows = extract_windows(signal, anchor, WindowSpec(spec.n_before, spec.n_after, spec.pad), offset=offset)
    return spectrogram(windows, spec)
