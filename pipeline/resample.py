"""Stage 2c: a lead at another sampling rate (polyphase FIR), for models trained at one rate."""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """``x`` at ``fs_out`` (polyphase FIR; the identity when the rates are equal)."""
    if fs_in == fs_out:
        return x
    from scipy import signal as sps  # lazy: importing scipy.signal costs ~1 s

    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return sps.resample_poly(np.asarray(x, np.float64), ratio.numerator, ratio.denominator).astype(np.float32)
