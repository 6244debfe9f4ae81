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


_NEG, _POS = -1, -2  # the wires of the constants -inf and +inf while a program is built


class _Builder:
    """Records elementwise min/max over ``n_inputs`` lanes as a straight-line program, folding the
    +/-inf padding away (``min(x, +inf)`` is ``x``, bit for bit) so that padded lanes cost nothing."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.steps: list[tuple[np.ufunc, int, int, int]] = []

    def _emit(self, f: np.ufunc, a: int, b: int) -> int:
        self.steps.append((f, a, b, self.n_inputs + len(self.steps)))
        return self.steps[-1][3]

    def min(self, a: int, b: int) -> int:
        if _NEG in (a, b):
            return _NEG
        return b if a == _POS else a if b == _POS else self._emit(np.minimum, a, b)

    def max(self, a: int, b: int) -> int:
        if _POS in (a, b):
            return _POS
        return b if a == _NEG else a if b == _NEG else self._emit(np.maximum, a, b)

    def sort(self, lanes: list[int]) -> list[int]:
        """``lanes`` through Batcher's network, each compare-exchange ``min(i, j)`` into ``i`` and
        ``max(i, j)`` into ``j``: the full network's argument order, so what is kept is its values bit for bit."""
        lanes = list(lanes)
        for i, j in _sorting_network(len(lanes)):
            lanes[i], lanes[j] = self.min(lanes[i], lanes[j]), self.max(lanes[i], lanes[j])
        return lanes

    def compile(self, outputs: tuple[tuple[int, int], ...]) -> "_Program":
        """Keep only the steps the outputs depend on (a compare-exchange whose max is never read becomes
        one minimum) and give each value a scratch slot, reusing a slot from the step that reads it last."""
        live = {w for pair in outputs for w in pair}
        kept = []
        for step in reversed(self.steps):
            if step[3] in live:
                live.update(step[1:3])
                kept.append(step)
        kept.reverse()
        last = {w: t for t, (_, a, b, _) in enumerate(kept) for w in (a, b)}
        last.update({w: len(kept) for pair in outputs for w in pair})
        slot: dict[int, int] = {}
        free: list[int] = []
        n_slots = 0
        operand = {w: w for w in range(self.n_inputs)}
        steps = []
        for t, (f, a, b, d) in enumerate(kept):
            # A value read for the last time frees its slot for this step's result: in place, cache-warm.
            free.extend(slot[w] for w in {a, b} if w in slot and last[w] == t)
            if free:
                slot[d] = free.pop()
            else:
                slot[d], n_slots = n_slots, n_slots + 1
            operand[d] = self.n_inputs + slot[d]
            steps.append((f, operand[a], operand[b], operand[d]))
        return _Program(self.n_inputs, tuple(steps), n_slots,
                        tuple((operand[a], operand[b]) for a, b in outputs))


@dataclass(frozen=True)
class _Program:
    """Straight-line elementwise min/max: operand ``k < n_inputs`` is input lane ``k``, else scratch slot
    ``k - n_inputs``; ``outputs`` are, per result, the operands of its two middle order statistics."""

    n_inputs: int
    steps: tuple[tuple[np.ufunc, int, int, int], ...]
    n_slots: int
    outputs: tuple[tuple[int, int], ...]

    def run(self, lanes: list[np.ndarray], scratch: np.ndarray, results: list[np.ndarray]) -> None:
        """Write into each of ``results`` (equal-shaped ``(rows, cols)``) the float32 mean of its two
        middle order statistics over ``lanes``; ``scratch`` is ``(>= n_slots, >= rows, cols)``."""
        rows = len(results[0])
        vals = list(lanes) + [s[:rows] for s in scratch[:self.n_slots]]
        for f, a, b, d in self.steps:
            f(vals[a], vals[b], out=vals[d])
        for (a, b), res in zip(self.outputs, results):
            np.add(vals[a], vals[b], out=res)
            res *= np.float32(0.5)


@lru_cache(maxsize=None)
def _median_program(m: int) -> _Program:
    """The two middle values of ``m`` (even) lanes: Batcher's network, padded to a power of two with
    half +inf and half -inf lanes (which leave the middle values in place), pruned to the comparators
    the two middle outputs depend on: 53 comparators, 92 min/max for 16 lanes against 63 and 126."""
    size = 1 << (m - 1).bit_length()
    pad = (size - m) // 2
    b = _Builder(m)
    lanes = b.sort(list(range(m)) + [_POS] * pad + [_NEG] * pad)
    return b.compile(((lanes[size // 2 - 1], lanes[size // 2]),))


@lru_cache(maxsize=None)
def _pair_program(beats: int) -> _Program:
    """The two middle values of each of two adjacent segments' ``2 beats`` neighbours, from the
    ``2 beats - 2`` lanes they share (inputs ``0 ..``, in any order) and each one's two others
    (the last four inputs: the first segment's, then the second's).

    The shared lanes are partly sorted once for both (only their order statistics ``beats - 2 ..
    beats + 1``, 1-based, can be the middle ones after two more values join); then with ``a1 <= a2``
    a segment's own two, the ``k``-th smallest of all is ``min(b_k, max(a1, b_{k-1}), max(a2,
    b_{k-2}))`` (``b_0 = -inf``, ``b_j = +inf`` past the shared ones). For 8 beats: 41 + 10
    min/max per segment instead of 92. Values equal those of a sorting network, though which of
    +0 / -0 a tie yields may differ.
    """
    n_shared = 2 * beats - 2
    b = _Builder(n_shared + 4)
    size = 1 << max(n_shared - 1, 0).bit_length()
    shared = b.sort(list(range(n_shared)) + [_POS] * (size - n_shared))  # +inf on top: b_j at j - 1

    def order(j: int) -> int:
        return _NEG if j < 1 else _POS if j > n_shared else shared[j - 1]

    outputs = []
    for x, y in ((n_shared, n_shared + 1), (n_shared + 2, n_shared + 3)):
        a1, a2 = b.min(x, y), b.max(x, y)
        outputs.append(tuple(b.min(b.min(order(k), b.max(a1, order(k - 1))), b.max(a2, order(k - 2)))
                             for k in (beats, beats + 1)))
    return b.compile(tuple(outputs))


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
        ``(n, freq, time)`` float32 (equal to ``np.median`` over the neighbours). No per-beat loop:
        straight-line elementwise min/max over blocks of segments and all bins at once. Away from the
        record ends the neighbours of a block are shifted views of the input (no gather), and two
        adjacent segments, which share all but two of their neighbours each, are done together
        (``_pair_program``); the segments near the ends gather theirs (``_median_program``).
    """
    x = np.asarray(spectrograms, dtype=np.float32)
    n = len(x)
    if n == 0 or beats == 0:
        return x.copy()
    flat = x.reshape(n, -1)
    out = np.empty_like(flat)
    # Pairs (i, i + 1) of segments whose windows are centred: beats <= i and i + 1 + beats < n.
    # (One beat a side shares nothing: a pair would only add a step.)
    n_pairs = max(n - 2 * beats, 0) // 2 if beats > 1 else 0
    if n_pairs:
        pair = _pair_program(beats)
        # Neighbour offsets from the pair's first segment: the shared ones, then each one's own two.
        offsets = [o for o in range(1 - beats, beats + 1) if o not in (0, 1)] + [-beats, 1, 0, beats + 1]
        # Blocks small enough that the scratch slots stay in L2 (1.5 MB for 128 pairs of 192 bins),
        # large enough to spread the per-call cost of the ufuncs (measured for 2,300 beats: 5.0 ms,
        # against 6.3 ms with 32 pairs and 6.6 ms with 512).
        step = 128
        scratch = np.empty((pair.n_slots, min(step, n_pairs), flat.shape[1]), np.float32)
        for p in range(0, n_pairs, step):
            lo, hi = beats + 2 * p, beats + 2 * min(p + step, n_pairs)
            pair.run([flat[lo + o:hi + o:2] for o in offsets], scratch, [out[lo:hi:2], out[lo + 1:hi:2]])
    rest = np.r_[0:beats, beats + 2 * n_pairs:n] if n_pairs else np.arange(n)
    idx = neighbour_indices(n, beats)[rest]
    median = _median_program(2 * beats)
    scratch = np.empty((median.n_slots, min(256, len(rest)), flat.shape[1]), np.float32)
    for lo in range(0, len(rest), 256):
        block = idx[lo:lo + 256]
        res = np.empty((len(block), flat.shape[1]), np.float32)
        median.run([flat[block[:, k]] for k in range(block.shape[1])], scratch, [res])
        out[rest[lo:lo + 256]] = res
    return out.reshape(x.shape)


def with_context(n_record: int, lo: int, hi: int, beats: int) -> tuple[int, int]:
    """The rows ``[a, b)`` of a record's ``n_record`` segments whose spectrograms the templates of rows
    ``[lo, hi)`` need: the piece and ``2 beats`` segments on each side (the sliding window near an end)."""
    return max(0, lo - 2 * beats), min(n_record, hi + 2 * beats)
