"""Stage 7b: training augmentation, applied by the loader to each shuffle group (numpy, seeded).

``PrematureBeats`` teaches what a supraventricular premature beat *is*: a beat of normal shape that
comes early. Measured on MIT-BIH, the S beats of the inter-patient training records (DS1) mostly sit in
supraventricular runs (207, 209, 223), where the local average RR runs as fast as they do, so a model
learns S from them badly: a rule "previous RR below 0.8 x the local average" gives S F1 0.23 on DS1's
training records against 0.60 on DS2. The augmentation copies that definition into the training data:
in each epoch a share of the N beats of a regular rhythm (previous and next RR within ``regular`` of
the local average, no flagged interval) get RR features of a premature beat (previous RR shortened to
``pre`` x; the next one ``post`` x: a compensatory pause, or a short one where the beat opens a run of
early beats; the averages a single beat barely moves are kept) and the S label; their spectrograms (and templates) are left as they are, since an
atrial premature beat has a normal QRS.

``TimeStretch`` resamples rhythm windows in time: each window's spectrogram frames are read at a random
rate, as if the heart (and everything else) had run that much faster or slower, which is the spectrogram form
of the random resampling Zihlmann et al. (CinC 2017) found essential for the Challenge 2017 recordings.

Nothing here knows a database, a record or a sampling rate: classes and RR features are found by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

#: The RR features ``PrematureBeats`` reads or rewrites (``pipeline.rr.STORED_FEATURES`` names).
_NEEDS = ("pre_rr", "post_rr", "local_rr", "long_rr", "pre_local", "post_local", "pre_long", "flagged")


@dataclass(frozen=True)
class PrematureBeats:
    """N beats of a regular rhythm made premature, labelled S (see the module docstring).

    Attributes
    ----------
    rate
        Share of the eligible beats converted, drawn afresh in each shuffle group (so each epoch).
    normal, premature
        Class indices of the normal (N) and the supraventricular (S) class.
    features
        Names of the ``rr`` variable's columns (its ``rr_feature`` coordinate).
    pre, post
        Ranges of the factors on the previous and the next RR (uniform).
    regular
        Eligible: ``|pre_local - 1|`` and ``|post_local - 1|`` below this, nothing flagged.
    """

    rate: float
    normal: int
    premature: int
    features: tuple[str, ...]
    pre: tuple[float, float] = (0.45, 0.85)
    post: tuple[float, float] = (0.7, 1.4)
    regular: float = 0.1

    def __post_init__(self):
        missing = [f for f in _NEEDS if f not in self.features]
        if missing:
            raise ValueError(f"premature-beat augmentation needs the RR features {missing}; the store has "
                             f"{list(self.features)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], not {self.rate}")

    def _col(self, name: str) -> int:
        return self.features.index(name)

    def eligible(self, y: np.ndarray, rr: np.ndarray) -> np.ndarray:
        """Which samples may be converted: class N, a regular rhythm around them, no flagged interval."""
        c = self._col
        return ((np.asarray(y) == self.normal) & (np.abs(rr[:, c("pre_local")] - 1.0) < self.regular)
                & (np.abs(rr[:, c("post_local")] - 1.0) < self.regular) & (rr[:, c("flagged")] == 0))

    def count_shift(self, y: np.ndarray, rr: np.ndarray, n_classes: int) -> np.ndarray:
        """Expected change of the class counts per epoch (for class weights that count the converted beats)."""
        moved = self.rate * float(self.eligible(y, rr).sum())
        shift = np.zeros(n_classes)
        shift[self.normal] -= moved
        shift[self.premature] += moved
        return shift

    def __call__(self, xs: Mapping[str, np.ndarray], y: np.ndarray,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Convert a random ``rate`` of the eligible samples of one group; returns new ``xs`` and ``y``."""
        rr = np.array(xs["rr"], dtype=np.float32, copy=True)
        pick = np.flatnonzero(self.eligible(y, rr))
        pick = pick[rng.random(pick.size) < self.rate]
        out = dict(xs)
        if not pick.size:
            return out, y
        c = self._col
        f = rng.uniform(*self.pre, pick.size).astype(np.float32)
        g = rng.uniform(*self.post, pick.size).astype(np.float32)
        rows = rr[pick]
        rows[:, c("pre_rr")] *= f
        rows[:, c("post_rr")] *= g
        rows[:, c("pre_local")] = rows[:, c("pre_rr")] / rows[:, c("local_rr")]
        rows[:, c("post_local")] = rows[:, c("post_rr")] / rows[:, c("local_rr")]
        rows[:, c("pre_long")] = rows[:, c("pre_rr")] / rows[:, c("long_rr")]
        rr[pick] = rows
        out["rr"] = rr
        y = np.array(y, copy=True)
        y[pick] = self.premature
        return out, y


def premature_beats(rate: float, classes: Sequence[str], features: Sequence[str]) -> PrematureBeats | None:
    """The augmentation for a store with ``classes`` and RR ``features``: None where ``rate`` is 0 or the
    store has no N and S classes (AAMI names) to convert between."""
    if not rate or "N" not in classes or "S" not in classes:
        return None
    return PrematureBeats(float(rate), list(classes).index("N"), list(classes).index("S"), tuple(features))


@dataclass(frozen=True)
class TimeStretch:
    """Each training window's spectrogram read at a random rate along time (linear interpolation between frames).

    Frame ``t`` of the output is frame ``t * f`` of the input, ``f`` drawn per window uniformly in
    ``[1 - amount, 1 + amount]``; past the last frame the window wraps to its start, as a short recording's
    window is padded (``pad: wrap``), so every output frame is a real one and the shape is kept. Labels do not
    change: a rhythm is the same rhythm 15 % faster.

    Attributes
    ----------
    amount
        Largest relative change of the rate, in ``(0, 1)``.
    variable
        The per-segment variable of ``(segment, freq, time)`` spectrograms it stretches.
    """

    amount: float
    variable: str = "spectrogram"

    def __post_init__(self):
        if not 0.0 < self.amount < 1.0:
            raise ValueError(f"time-stretch amount must lie in (0, 1), not {self.amount}")

    def __call__(self, xs: Mapping[str, np.ndarray], y: np.ndarray,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stretch every window of one group; returns new ``xs`` (the others untouched) and ``y``."""
        x = np.asarray(xs[self.variable])
        n, n_time = x.shape[0], x.shape[-1]
        f = rng.uniform(1.0 - self.amount, 1.0 + self.amount, n)
        src = (np.arange(n_time)[None, :] * f[:, None]) % n_time  # (n, time): where each output frame is read
        i0 = np.floor(src).astype(np.int64)
        i1 = (i0 + 1) % n_time
        frac = (src - i0).astype(np.float32)[:, None, :]
        a = np.take_along_axis(x, i0[:, None, :], axis=-1).astype(np.float32)
        b = np.take_along_axis(x, i1[:, None, :], axis=-1).astype(np.float32)
        out = dict(xs)
        out[self.variable] = (a + (b - a) * frac).astype(x.dtype)
        return out, y


@dataclass(frozen=True)
class Chain:
    """Several augmentations, applied in order; class counts shift as the parts say."""

    parts: tuple[Callable[..., Any], ...]

    def count_shift(self, y: np.ndarray, rr: np.ndarray, n_classes: int) -> np.ndarray:
        return sum((p.count_shift(y, rr, n_classes) for p in self.parts if hasattr(p, "count_shift")),
                   np.zeros(n_classes))

    def __call__(self, xs: Mapping[str, np.ndarray], y: np.ndarray,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        out = dict(xs)
        for p in self.parts:
            out, y = p(out, y, rng)
        return out, y


def chain(*parts: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """The augmentations that are not None, in order: None, the one, or a ``Chain``."""
    kept = tuple(p for p in parts if p is not None)
    return None if not kept else kept[0] if len(kept) == 1 else Chain(kept)
