"""Stage 3f: atrial activity before each beat, what tells an atrial premature beat from atrial fibrillation.

RR features mark a beat that comes early; in atrial fibrillation and flutter every beat comes at a
random time, so a model that learnt prematurity calls many of those beats S. Measured on MIT-BIH
DS2 (the default model of store v4, seed 0): 961 of its 1,249 false S calls lie in AF or flutter
(records 219, 222, 202, 221), and a rule on the irregularity of the RR intervals cannot remove them,
since runs of S beats are as irregular. What differs is the atrium: in sinus rhythm every beat is
preceded by the same P wave, an atrial premature beat by a P wave of another shape or timing, and a
beat in AF by fibrillatory waves unlike those before its neighbours.

``p_consistency`` gives each beat the correlation of the ECG in the P-wave window before its R peak
(``AtrialSpec.start_s`` to ``stop_s`` before it, band-passed) with the median of the same window of its
``beats`` neighbours on each side. A low value alone is ambiguous: an isolated atrial premature beat in
sinus rhythm is unlike its neighbours (median on MIT-BIH DS1's S beats: 0.47; 118, 220, 223 around 0),
and so is every beat in AF (201, 203: 0.06-0.3), while the S beats of a run are like theirs (207: 1.0).
``atrial_features`` therefore also gives ``p_context``, the median ``p_consistency`` of the same
neighbours: high in sinus rhythm and in S runs, low in AF and flutter. An S beat is premature (RR
features) and either unlike a consistent context or part of a consistent run; a beat in AF has an
inconsistent context.

One function, two callers, like the RR features it sits beside (``rr.features_at``): ``preprocess``
applies it to a record's annotated beats (moved to the detector's fiducial point), ``score`` to the
detected ones. Windows are in seconds and the band lies under every accepted rate's Nyquist
frequency, so the value does not depend on the recorder's rate. One band-pass of the signal and
one gather of every window: no per-beat loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

#: The names of ``atrial_features``' columns in a store's ``rr_feature`` coordinate.
FEATURES = ("p_consistency", "p_context")


@dataclass(frozen=True)
class AtrialSpec:
    """Parameters of ``p_consistency`` (stored with the RR features, and with a model that uses them)."""

    start_s: float = 0.25  #: the P-wave window starts this long before the R peak
    stop_s: float = 0.08  #: ... and ends this long before it (the QRS onset lies closer)
    low_hz: float = 0.5  #: band-pass: baseline wander out
    high_hz: float = 15.0  #: ... and the QRS's and the muscles' higher frequencies
    beats: int = 8  #: neighbours on each side whose median window the beat's is compared with
    fill: float = 1.0  #: the value where the window is not readable (outside the signal, NaN, flat); flagged

    def attrs(self) -> dict[str, Any]:
        """The parameters as the ``atrial`` entry of a store's (and a model's) ``rr`` attribute."""
        return {"features": list(FEATURES), "start_s": self.start_s, "stop_s": self.stop_s, "low_hz": self.low_hz,
                "high_hz": self.high_hz, "beats": self.beats, "fill": self.fill, "statistic": "pearson-vs-median"}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "AtrialSpec":
        """The spec an ``atrial`` attribute describes."""
        if attrs.get("statistic") != "pearson-vs-median" or list(attrs.get("features") or ()) != list(FEATURES):
            raise ValueError(f"atrial features {dict(attrs)} are not this version's {list(FEATURES)} (pearson-vs-median)")
        return cls(float(attrs["start_s"]), float(attrs["stop_s"]), float(attrs["low_hz"]), float(attrs["high_hz"]),
                   int(attrs["beats"]), float(attrs["fill"]))


def band_pass(signal: np.ndarray, fs: float, spec: AtrialSpec = AtrialSpec()) -> tuple[np.ndarray, np.ndarray]:
    """The zero-phase band-passed signal (NaN read as 0) and where the input was not finite."""
    from scipy import signal as sps

    x = np.asarray(signal, dtype=np.float64)
    bad = ~np.isfinite(x)
    if x.size < 16:
        return np.zeros_like(x), bad
    high = min(spec.high_hz, 0.45 * float(fs))  # below Nyquist at any rate the pipeline reads
    sos = sps.butter(2, [spec.low_hz, high], btype="bandpass", fs=float(fs), output="sos")
    y = sps.sosfiltfilt(sos, np.where(bad, 0.0, x))
    return y, bad


def p_consistency(signal: np.ndarray, fs: float, beats: np.ndarray, spec: AtrialSpec = AtrialSpec(),
                  origin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each beat's P-wave window against its neighbours' median window.

    Parameters
    ----------
    signal
        One lead (physical units, NaN where invalid): record samples ``[origin, origin + len(signal))``.
    fs
        Its sampling rate.
    beats
        Every beat of the record (or of the span ``signal`` covers), record samples, sorted ascending:
        a beat's neighbours are the ones next to it here.

    Returns
    -------
    values, ok
        ``(n,)`` float32 Pearson correlations in [-1, 1] (``spec.fill`` where not ``ok``) and ``(n,)`` bool:
        the window lies inside the signal, holds no invalid sample and is not flat.
    """
    from .template import neighbour_template

    pos = np.asarray(beats, dtype=np.int64) - int(origin)
    n = pos.size
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    y, bad = band_pass(signal, fs, spec)
    a, b = int(round(spec.start_s * fs)), int(round(spec.stop_s * fs))
    offsets = np.arange(-a, -b)
    if offsets.size < 2:
        raise ValueError(f"the P-wave window {spec.start_s}-{spec.stop_s} s holds under 2 samples at {fs} Hz")
    inside = (pos - a >= 0) & (pos - b <= y.size)
    idx = np.clip(pos[:, None] + offsets[None, :], 0, max(y.size - 1, 0))
    n_bad = np.concatenate([[0], np.cumsum(bad)])
    lo, hi = np.clip(pos - a, 0, y.size), np.clip(pos - b, 0, y.size)
    ok = inside & (n_bad[hi] - n_bad[lo] == 0)
    w = y[idx].astype(np.float32)
    w -= w.mean(axis=1, keepdims=True)
    w[~ok] = 0.0  # an unreadable window is no evidence in its neighbours' median
    # The neighbours' median window: the template stage's median, over one-row "spectrograms".
    med = neighbour_template(w[:, None, :], spec.beats)[:, 0, :]
    med -= med.mean(axis=1, keepdims=True)
    num = (w * med).sum(axis=1)
    den = np.sqrt((w * w).sum(axis=1) * (med * med).sum(axis=1))
    ok &= den > 1e-12
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, num / np.where(ok, den, 1.0), spec.fill)
    return np.clip(r, -1.0, 1.0).astype(np.float32), ok


def atrial_features(signal: np.ndarray, fs: float, beats: np.ndarray, spec: AtrialSpec = AtrialSpec(),
                    origin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``FEATURES`` of every beat: its ``p_consistency``, and ``p_context``, the median ``p_consistency`` of its
    ``spec.beats`` neighbours on each side (the atrial rhythm around it). Arguments as ``p_consistency``'s.

    Returns
    -------
    values, ok
        ``(n, 2)`` float32 and ``(n,)`` bool (the beat's own window readable).
    """
    from .template import neighbour_indices

    value, ok = p_consistency(signal, fs, beats, spec, origin)
    nb = neighbour_indices(value.size, spec.beats)
    context = np.median(value[nb], axis=1).astype(np.float32) if nb.shape[1] and value.size > 1 else value.copy()
    return np.stack([value, context], axis=1), ok
