"""Stage 3d: RR-interval features of beats, the rhythm context a spectrogram of one beat cannot show.

What marks a supraventricular beat in a new patient is prematurity against that patient's own
rhythm. ``rr_features`` gives each beat its previous and next RR interval, the local and the long
average RR around it, and the ratios between them, from *all* beats of a record (annotated beats
in ``preprocess``, detected R peaks in ``score``: one function, so training and scoring never
compute them differently). Everything is one pass of cumulative sums over the record's beats: no
per-beat Python loop.

Edges and gaps never give NaN: an interval that does not exist (the first beat has no previous
one) or cannot be a heartbeat (shorter than ``min_rr_s``, or longer than ``max_rr_s``: a gap in the
signal, a missed stretch of noise) is replaced by the local average and flagged.

Beside the intervals, a spec with ``atrial`` (preprocess config ``rr.atrial``, off by default) stores each beat's atrial
activity (``pipeline.atrial.atrial_features``: its P-wave window against its neighbours', and the
same of its neighbours): an early beat in a consistent atrial rhythm is an S beat, an early beat in
an inconsistent one (atrial fibrillation, flutter) is not. It needs the signal, which
``features_at`` then takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .atrial import FEATURES as ATRIAL_FEATURES
from .atrial import AtrialSpec, atrial_features

#: The features, in the order of the last axis of ``RRFeatures.values`` (seconds, or ratios).
RR_FEATURES = ("pre_rr", "post_rr", "local_rr", "long_rr", "pre_local", "post_local", "pre_long", "local_long")
#: What a store's ``rr`` variable holds per segment without atrial activity: the features, then ``flagged``
#: (1.0 where an interval was missing or no heartbeat and the local average stands in for it, else 0.0).
#: With it (``RRSpec.atrial``), ``p_consistency`` and ``p_context`` come before ``flagged``: ``RRSpec.features``.
STORED_FEATURES = (*RR_FEATURES, "flagged")

#: Bits of ``RRFeatures.flags``.
NO_PREVIOUS, NO_NEXT, BAD_PREVIOUS, BAD_NEXT = 1, 2, 4, 8


@dataclass(frozen=True)
class RRSpec:
    """Parameters of ``rr_features`` (stored with the features, and with a model that uses them)."""

    local_beats: int = 10  #: intervals on each side of a beat in its local average
    long_s: float = 300.0  #: the long average: valid intervals ending in the last ``long_s`` seconds (causal)
    min_rr_s: float = 0.15  #: shorter intervals are not heartbeats (a double detection)
    max_rr_s: float = 3.0  #: longer ones are gaps (missing signal, undetected noise)
    default_rr_s: float = 0.8  #: the value of every interval of a record without a single valid one
    atrial: AtrialSpec | None = None  #: also each beat's atrial activity (``pipeline.atrial``); None: intervals only

    @property
    def features(self) -> tuple[str, ...]:
        """The columns ``features_at`` gives (a store's ``rr_feature`` coordinate)."""
        return (*RR_FEATURES, *(ATRIAL_FEATURES if self.atrial is not None else ()), "flagged")

    def attrs(self) -> dict[str, Any]:
        """The parameters as a store's (and a model's) ``rr`` attribute."""
        return {"local_beats": self.local_beats, "long_s": self.long_s, "min_rr_s": self.min_rr_s,
                "max_rr_s": self.max_rr_s, "default_rr_s": self.default_rr_s, "features": list(self.features),
                "units": "s (pre_rr, post_rr, local_rr, long_rr), ratios (the others), "
                         + ("correlations (p_consistency, p_context), " if self.atrial is not None else "") + "0/1 (flagged)",
                **({"atrial": self.atrial.attrs()} if self.atrial is not None else {})}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "RRSpec":
        """The spec a store's or a model's ``rr`` attribute describes (stores and models made before atrial
        activity was stored give a spec without it)."""
        atrial = AtrialSpec.from_attrs(attrs["atrial"]) if attrs.get("atrial") else None
        spec = cls(int(attrs["local_beats"]), float(attrs["long_s"]), float(attrs["min_rr_s"]),
                   float(attrs["max_rr_s"]), float(attrs["default_rr_s"]), atrial)
        if list(attrs.get("features", [])) != list(spec.features):
            raise ValueError(f"RR features {attrs.get('features')} are not this version's {list(spec.features)}")
        return spec

    @property
    def reach_s(self) -> float:
        """How far from a beat its features may look: a span of a record scored alone needs this much signal
        (and its beats) on each side to give the features the whole record gives."""
        return self.long_s + self.local_beats * self.max_rr_s


@dataclass(frozen=True)
class RRFeatures:
    """RR features of a record's beats."""

    values: np.ndarray  #: (n_beats, len(RR_FEATURES)) float32
    flags: np.ndarray  #: (n_beats,) uint8, bits NO_PREVIOUS, NO_NEXT, BAD_PREVIOUS, BAD_NEXT


def _window_mean(values: np.ndarray, valid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values[lo:hi]`` over its ``valid`` entries, and their count, for each pair of bounds."""
    s = np.concatenate([[0.0], np.cumsum(np.where(valid, values, 0.0))])
    c = np.concatenate([[0], np.cumsum(valid.astype(np.int64))])
    total, count = s[hi] - s[lo], c[hi] - c[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def rr_features(sample: np.ndarray, fs: float, spec: RRSpec = RRSpec()) -> RRFeatures:
    """The RR features of every beat of one record.

    Parameters
    ----------
    sample
        All beat positions of the record (record samples, any order; every beat, not only the
        ones that will be classified: a beat's neighbours define its context).
    fs
        The record's sampling rate.

    Returns
    -------
    RRFeatures
        In the order of ``np.sort(sample)``.
    """
    t = np.sort(np.asarray(sample, dtype=np.float64)) / float(fs)
    n = t.size
    if n == 0:
        return RRFeatures(np.zeros((0, len(RR_FEATURES)), np.float32), np.zeros(0, np.uint8))
    rr = np.diff(t)  # rr[j]: from beat j to beat j + 1
    valid = (rr >= spec.min_rr_s) & (rr <= spec.max_rr_s)
    # Local average: valid intervals among the local_beats on each side of the beat (interval indices i-k..i+k-1).
    i = np.arange(n)
    k = spec.local_beats
    local, _ = _window_mean(rr, valid, np.clip(i - k, 0, rr.size), np.clip(i + k, 0, rr.size))
    fallback = float(np.mean(rr[valid])) if valid.any() else spec.default_rr_s
    local = np.where(np.isfinite(local), local, fallback)
    # Long average, causal: valid intervals that ended within the last long_s seconds of the beat.
    ends = t[1:]
    lo = np.searchsorted(ends, t - spec.long_s, side="right")
    hi = np.searchsorted(ends, t, side="right")
    long, _ = _window_mean(rr, valid, lo, hi)
    long = np.where(np.isfinite(long), long, local)
    pre = np.full(n, np.nan)
    post = np.full(n, np.nan)
    pre[1:], post[:-1] = rr, rr
    pre_ok = np.concatenate([[False], valid])
    post_ok = np.concatenate([valid, [False]])
    flags = np.zeros(n, np.uint8)
    flags[0] |= NO_PREVIOUS
    flags[-1] |= NO_NEXT
    flags[1:][~valid] |= BAD_PREVIOUS
    flags[:-1][~valid] |= BAD_NEXT
    pre = np.where(pre_ok, pre, local)
    post = np.where(post_ok, post, local)
    values = np.stack([pre, post, local, long, pre / local, post / local, pre / long, local / long], axis=1)
    return RRFeatures(values.astype(np.float32), flags)


def features_at(anchor: np.ndarray, beats: np.ndarray, fs: float, spec: RRSpec = RRSpec(),
                signal: np.ndarray | None = None, origin: int = 0) -> np.ndarray:
    """The stored RR features (``spec.features``) of the beats at ``anchor``, in the context of all ``beats``.

    ``beats`` are every beat of the record (or span); ``anchor`` the ones segmented, in any order (an
    anchor missing from ``beats`` is added to the context). With ``spec.atrial``, ``signal`` is the lead
    (record samples ``[origin, origin + len(signal))`` at ``fs``) whose P waves ``p_consistency`` compares;
    ``flagged`` then also marks a beat whose P-wave window is unreadable. Returns
    ``(len(anchor), len(spec.features))`` float32 in the order of ``anchor``: one call per record, no
    per-beat loop.
    """
    anchor = np.asarray(anchor, dtype=np.int64)
    context = np.union1d(np.asarray(beats, dtype=np.int64), anchor)
    f = rr_features(context, fs, spec)
    at = np.searchsorted(context, anchor)
    flagged = f.flags[at] != 0
    columns = [f.values[at]]
    if spec.atrial is not None:
        if signal is None:
            raise ValueError("RR features with atrial activity need the signal")
        value, ok = atrial_features(signal, fs, context, spec.atrial, origin)
        columns.append(value[at])
        flagged |= ~ok[at]
    return np.concatenate([*columns, flagged.astype(np.float32)[:, None]], axis=1)
