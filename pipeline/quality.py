"""Stage 2d: is a record's lead something a model may score? A per-record verdict, in words.

``record_quality`` looks at the lead a job is about to score (after lead choice, before any
segment) and returns the reasons it is doubtful, or none: no signal, mostly missing, too
short, flat, a sampling rate below what the model knows, a lead taken by the fallback. The
scoring job writes the verdict into the per-record table (``record_quality``, and the
``quality`` column of ``records.csv``) and counts doubtful records in its summary; a record with
a refusing reason is not scored at all, so a model is never silently run on input it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Reasons that stop a record from being scored (the others flag it and let it be scored).
REFUSING = ("no signal", "too short", "flat", "sampling rate")


@dataclass(frozen=True)
class Verdict:
    """The reasons a record is doubtful (empty: nothing to say)."""

    reasons: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return "; ".join(self.reasons)

    @property
    def refused(self) -> bool:
        """Whether a model must not score the record (no signal, too short, flat, rate below the model's)."""
        return any(r.startswith(REFUSING) for r in self.reasons)

    def __bool__(self) -> bool:
        return bool(self.reasons)


def record_quality(signal: np.ndarray, fs: float, *, min_seconds: float = 0.0, min_fs: float | None = None,
                   flat_mv: float = 0.05, mv_per_unit: float = 1.0, lead: str = "",
                   lead_fallback: bool = False) -> Verdict:
    """The verdict on one lead of a record.

    Parameters
    ----------
    signal
        The lead in physical units (NaN where samples are missing).
    fs
        Its sampling rate in Hz.
    min_seconds
        The shortest record the model handles (a beat window, or a rhythm model's shortest recording).
    min_fs
        The lowest sampling rate the model accepts (the rate its training store carried: a record
        upsampled from less has no content in the upper rows of its spectrograms).
    flat_mv
        A lead whose robust peak-to-peak range (0.5th to 99.5th percentile) is below this many
        millivolts carries no ECG.
    mv_per_unit
        Converts ``signal`` to millivolts (1e-3 for a lead in uV).
    lead, lead_fallback
        The lead taken, and whether it was taken by the fallback (none of the wanted leads was there).
    """
    signal = np.asarray(signal)
    reasons: list[str] = []
    n = signal.shape[0]
    finite = np.isfinite(signal)
    n_finite = int(finite.sum())
    if n == 0 or n_finite == 0:
        reasons.append("no signal (no samples)" if n == 0 else f"no signal (all {n:,} samples missing)")
    else:
        duration = n / fs
        if min_seconds and duration < min_seconds:
            reasons.append(f"too short ({duration:.2f} s; the model needs {min_seconds:g} s)")
        missing = 1 - n_finite / n
        if missing > 0.5:
            reasons.append(f"mostly missing ({missing:.0%} of samples NaN)")
        lo, hi = np.percentile(signal[finite], [0.5, 99.5])
        p2p = float(hi - lo) * mv_per_unit
        if p2p < flat_mv:
            reasons.append(f"flat (peak-to-peak {p2p:.3g} mV, below {flat_mv:g} mV)")
    if min_fs is not None and fs < min_fs * (1 - 1e-6):
        reasons.append(f"sampling rate {fs:g} Hz below the {min_fs:g} Hz the model was trained on")
    if lead_fallback:
        reasons.append(f"lead {lead or '?'} taken by the fallback (none of the wanted leads)")
    return Verdict(tuple(reasons))
