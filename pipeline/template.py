"""Stage 3e: the shape context of a beat, the median spectrogram of its neighbours.

What marks a ventricular beat in a new patient is a shape unlike that patient's other beats:
a bundle-branch block makes every QRS of a record wide, so a beat's spectrogram alone calls a
whole record ventricular. ``neighbour_template`` gives each segment the median spectrogram of
the ``beats`` segments on each side of it in its record (itself left out), so a model can see
the beat against the patient's own typical beat. The median, not the mean: an ectopic
neighbour or two (a couplet, a noisy beat) does not move it.

One function, two callers, as for the RR features: ``preprocess`` applies it to a record's stored
segments (annotated beats, in time order) and ``score`` to a record's detected beats, so the two
can never compute it differently. A piece of a record gives the whole record's templates when it
is given ``beats`` segments of context on each side (``with_context``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class TemplateSpec:
    """Parameters of ``neighbour_template`` (stored with the templates, and with a model that uses them)."""

    beats: int = 8  #: segments on each side of a segment whose median is its template

    def attrs(self) -> dict[str, Any]:
        """The parameters as a store's (and a model's) ``template`` attribute."""
        return {"beats": self.beats, "statistic": "median",
                "neighbours": "the `beats` usable segments before and after in the record, the segment itself "
                              "excluded; near a record end, the 2 x `beats` nearest"}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "TemplateSpec":
        """The spec a store's or a model's ``template`` attribute describes."""
        if attrs.get("statistic", "median") != "median":
            raise ValueError(f"template statistic {attrs.get('statistic')!r} is not this version's 'median'")
        return cls(int(attrs["beats"]))


def neighbour_indices(n: int, beats: int) -> np.ndarray:
    """``(n, 2 beats)`` indices of each segment's neighbours among ``n`` in time order.

    Segment ``i`` takes ``i - beats .. i + beats`` without itself; near an end the window slides
    inward so every segment has ``2 beats`` neighbours. A record of fewer than ``2 beats + 1``
    segments gives every segment all the others (repeated to fill the window); a lone segment is its
    own template.
    """
    w = 2 * beats
    if n <= 1 or w == 0:
        return np.zeros((n, w), np.int64)
    i = np.arange(n)[:, None]
    if n <= w:  # every other segment, cyclically
        j = np.arange(w)[None, :] % (n - 1)
        return j + (j >= i)
    start = np.clip(i - beats, 0, n - w - 1)
    j = start + np.arange(w)[None, :]
    return j + (j >= i)  # step over the segment itself


@lru_cache(maxsize=None)
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` (a power of two) inputs: the compare-exchange pairs, in order."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _median_of_lanes(lanes: list[np.ndarray]) -> np.ndarray:
    """Elementwise median of ``m`` (even) equal-shaped arrays: a sorting network of in-place min/max
    (for m = 16, 63 compare-exchanges), the same values as ``np.median`` over them. ``lanes`` are
    overwritten."""
    m = len(lanes)
    size = 1 << (m - 1).bit_length()
    pad = size - m  # even: half +inf, half -inf leave the two middle values where they were
    lanes = list(lanes) + [np.full_like(lanes[0], np.inf) for _ in range(pad // 2)] + \
        [np.full_like(lanes[0], -np.inf) for _ in range(pad // 2)]
    spare = np.empty_like(lanes[0])
    for i, j in _sorting_network(size):
        np.minimum(lanes[i], lanes[j], out=spare)
        np.maximum(lanes[i], lanes[j], out=lanes[j])
        lanes[i], spare = spare, lanes[i]
    return (lanes[size // 2 - 1] + lanes[size // 2]) * np.float32(0.5)


def neighbour_template(spectrograms: np.ndarray, beats: int) -> np.ndarray:
    """The template of every segment: the median of its neighbours' spectrograms.

    Parameters
    ----------
    spectrograms
        ``(n, freq, time)``: one record's (or span's) segments in time order.
    beats
        Neighbours on each side (``TemplateSpec.beats``).

    Returns
    -------
    np.ndarray
        ``(n, freq, time)`` float32 (equal to ``np.median`` over the neighbours). For blocks of
        segments, one contiguous gather per neighbour rank and one sorting network of in-place
        min/max over all bins at once: no per-beat loop.
    """
    x = np.asarray(spectrograms, dtype=np.float32)
    if len(x) == 0 or beats == 0:
        return x.copy()
    idx = neighbour_indices(len(x), beats)
    flat = x.reshape(len(x), -1)
    out = np.empty_like(flat)
    # Blocks small enough that the 16 lanes stay in cache: 4.6x faster than 4,096 rows at a time
    # with a fresh array per min/max (measured: 14 ms against 64 ms for 2,200 beats).
    step = 256
    for lo in range(0, len(x), step):
        block = idx[lo:lo + step]
        out[lo:lo + step] = _median_of_lanes([flat[block[:, k]] for k in range(block.shape[1])])
    return out.reshape(x.shape)


def with_context(n_record: int, lo: int, hi: int, beats: int) -> tuple[int, int]:
    """The rows ``[a, b)`` of a record's ``n_record`` segments whose spectrograms the templates of rows
    ``[lo, hi)`` need: the piece and ``2 beats`` segments on each side (the sliding window near an end)."""
    return max(0, lo - 2 * beats), min(n_record, hi + 2 * beats)
