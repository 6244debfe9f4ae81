"""Beat labels: WFDB annotation symbols -> AAMI EC57 classes.

Symbols fall in three groups:

* beats: a key of the label map (``AAMI_EC57`` by default) -> their class;
* non-beats: the WFDB standard annotation codes that mark rhythm changes, noise,
  waves and comments (``+``, ``~``, ``|``, ``!``, ``x``, ...), never segmented;
* unknown: anything else (non-standard or custom symbols, and the standard beat codes
  the EC57 map leaves out: ``B``, ``n``, ``r``, ``?``), handled by the
  ``unknown_symbols`` policy: kept as ``Q``, dropped, or failing the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

import numpy as np

AAMI_CLASSES: tuple[str, ...] = ("N", "S", "V", "F", "Q")

#: ANSI/AAMI EC57 grouping of MIT-BIH beat symbols.
AAMI_EC57: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(["N", "L", "R", "e", "j"], "N"),
        **dict.fromkeys(["A", "a", "J", "S"], "S"),
        **dict.fromkeys(["V", "E"], "V"),
        "F": "F",
        **dict.fromkeys(["/", "f", "Q"], "Q"),
    }
)

#: WFDB standard annotation codes that are not beats.
NON_BEAT_SYMBOLS: frozenset[str] = frozenset(
    ['~', '|', 's', 'T', '*', 'D', '"', '=', 'p', '^', 't', '+', 'u', '!', '[', ']', '@', 'x', '(', ')']
)

UnknownPolicy = Literal["Q", "drop", "fail"]

LABEL_MAPS: Mapping[str, Mapping[str, str]] = MappingProxyType({"aami-ec57": AAMI_EC57})


@dataclass(frozen=True)
class LabelledBeats:
    """Beat annotations of one record after labelling (all arrays share one length)."""

    sample: np.ndarray  #: int64 R-peak sample index
    symbol: np.ndarray  #: original annotation symbol (object array of str)
    label: np.ndarray  #: class (object array of str)
    n_nonbeat: int  #: annotations that are not beats (rhythm, noise, ...)
    n_unknown: int  #: annotations with a symbol outside the map and the non-beat set
    unknown_symbols: tuple[str, ...]  #: the distinct unknown symbols met


def label_beats(
    sample: np.ndarray,
    symbol: np.ndarray,
    label_map: Mapping[str, str] = AAMI_EC57,
    unknown: UnknownPolicy = "Q",
) -> LabelledBeats:
    """Keep the beat annotations and give each its class.

    Parameters
    ----------
    sample, symbol
        Annotation sample indices and symbols, as ``wfdb.rdann`` returns them.
    label_map
        Beat symbol -> class.
    unknown
        What to do with symbols neither in ``label_map`` nor in ``NON_BEAT_SYMBOLS``:
        ``"Q"`` keeps them as class Q, ``"drop"`` leaves them out (both count them),
        ``"fail"`` raises ``ValueError``.
    """
    symbol = np.asarray(symbol, dtype=object)
    sample = np.asarray(sample, dtype=np.int64)
    # Vectorise over the distinct symbols (a record has ~15 of them, ~2,000 beats).
    distinct, inverse = np.unique(symbol.astype(str), return_inverse=True)
    cls = np.array([label_map.get(s, "") for s in distinct], dtype=object)
    is_nonbeat_d = np.array([s in NON_BEAT_SYMBOLS and s not in label_map for s in distinct], dtype=bool)
    is_unknown_d = (cls == "") & ~is_nonbeat_d
    unknown_syms = tuple(str(s) for s in distinct[is_unknown_d])
    is_unknown = is_unknown_d[inverse]
    n_unknown = int(is_unknown.sum())
    if n_unknown and unknown == "fail":
        raise ValueError(f"unknown annotation symbols {list(unknown_syms)} ({n_unknown} annotations)")
    if unknown == "Q":
        cls = np.where(is_unknown_d, "Q", cls)
    keep = cls[inverse] != ""
    return LabelledBeats(
        sample=sample[keep],
        symbol=symbol[keep],
        label=cls[inverse][keep],
        n_nonbeat=int(is_nonbeat_d[inverse].sum()),
        n_unknown=n_unknown,
        unknown_symbols=unknown_syms,
    )
