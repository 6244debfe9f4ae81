"""Stage 2: read WFDB records from the local cache with ``wfdb``.

Only parsing lives here; files arrive through ``pipeline.download``. Every function
raises ``RecordError`` naming the record and the stage, so a job can report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import wfdb

from .errors import RecordError


@dataclass(frozen=True)
class Header:
    """What the job needs from a ``.hea`` file."""

    record: str
    fs: float
    sig_len: int
    sig_names: tuple[str, ...]
    units: tuple[str, ...]
    files: tuple[str, ...]  #: distinct signal file names, relative to the header's folder


@dataclass(frozen=True)
class Lead:
    """The signal chosen for a record."""

    index: int
    name: str
    fallback: bool  #: True when none of the preferred leads was present


def read_header(base: Path, record: str) -> Header:
    """Parse ``<base>.hea`` (``base`` is the record path without extension)."""
    try:
        h = wfdb.rdheader(str(base))
    except Exception as exc:  # noqa: BLE001 - wfdb raises many types for bad headers
        raise RecordError(record, "header", f"cannot parse {Path(base).name}.hea: {type(exc).__name__}: {exc}") from exc
    if getattr(h, "n_seg", None) is not None:
        raise RecordError(record, "header", "multi-segment records are not supported yet")
    if not h.sig_name or not h.sig_len or not h.fs:
        raise RecordError(
            record, "header", f"header lacks signals, length or sampling frequency (sig_name={h.sig_name}, sig_len={h.sig_len}, fs={h.fs})"
        )
    if h.n_sig != len(h.sig_name):
        raise RecordError(record, "header", f"header declares {h.n_sig} signals but describes {len(h.sig_name)}")
    files = tuple(dict.fromkeys(h.file_name))
    return Header(
        record=record,
        fs=float(h.fs),
        sig_len=int(h.sig_len),
        sig_names=tuple(h.sig_name),
        units=tuple(h.units or ["mV"] * len(h.sig_name)),
        files=files,
    )


def choose_lead(header: Header, preferred: tuple[str, ...], fallback: Literal["fail", "first"] = "fail") -> Lead:
    """Take the first of ``preferred`` the record has (names compared case-insensitively).

    MIT-BIH: most records have MLII first; 114 has it second; 102 and 104 have none
    (they have V5 and V2), which the default preference list covers.
    """
    names = [n.strip().upper() for n in header.sig_names]
    for want in preferred:
        if want.strip().upper() in names:
            i = names.index(want.strip().upper())
            return Lead(i, header.sig_names[i], False)
    if fallback == "first":
        return Lead(0, header.sig_names[0], True)
    raise RecordError(
        header.record, "lead", f"none of the leads {list(preferred)} in signals {list(header.sig_names)}"
    )


@dataclass(frozen=True)
class Annotations:
    """Reference annotations of a record."""

    sample: np.ndarray  #: int64
    symbol: np.ndarray  #: object array of str
    aux_note: np.ndarray | None = None  #: object array of str: rhythm changes such as "(AFIB", "(N"


def read_annotations(base: Path, record: str, extension: str) -> Annotations:
    """Read ``<base>.<extension>`` with ``wfdb.rdann``."""
    try:
        ann = wfdb.rdann(str(base), extension)
    except Exception as exc:  # noqa: BLE001
        raise RecordError(
            record, "annotations", f"cannot read {Path(base).name}.{extension}: {type(exc).__name__}: {exc}"
        ) from exc
    aux = np.asarray([(a or "").rstrip("\x00") for a in (ann.aux_note or [""] * len(ann.sample))], dtype=object)
    return Annotations(np.asarray(ann.sample, dtype=np.int64), np.asarray(ann.symbol, dtype=object), aux)


def read_signal(base: Path, header: Header, lead: Lead, sampfrom: int = 0, sampto: int | None = None) -> np.ndarray:
    """One lead in physical units (float32), samples ``[sampfrom, sampto)``.

    Raises ``RecordError`` (stage ``signal``) for unreadable or truncated signal files.
    """
    sampto = header.sig_len if sampto is None else sampto
    try:
        rec = wfdb.rdrecord(str(base), sampfrom=sampfrom, sampto=sampto, channels=[lead.index])
        sig = rec.p_signal[:, 0].astype(np.float32)
    except Exception as exc:  # noqa: BLE001
        hint = _truncation(base)
        raise RecordError(
            header.record, "signal", hint or f"cannot read samples {sampfrom}-{sampto} of {', '.join(header.files)}: "
                                             f"{type(exc).__name__}: {exc}"
        ) from exc
    if sig.shape[0] != sampto - sampfrom:
        raise RecordError(header.record, "signal", f"expected {sampto - sampfrom} samples, read {sig.shape[0]} (truncated file?)")
    return sig


#: Bytes per sample of the WFDB signal formats with a fixed size.
_BYTES_PER_SAMPLE = {"8": 1, "80": 1, "16": 2, "61": 2, "160": 2, "212": 1.5, "310": 4 / 3, "311": 4 / 3,
                     "24": 3, "32": 4}


def _truncation(base: Path) -> str:
    """``"<file> is truncated (...)"`` when a signal file is shorter than its header says, else ``""``."""
    try:
        h = wfdb.rdheader(str(base))
        per_file: dict[str, list[tuple[str, int]]] = {}
        for name, fmt, offset in zip(h.file_name, h.fmt, h.byte_offset or [0] * len(h.file_name)):
            per_file.setdefault(name, []).append((str(fmt), int(offset or 0)))
        for name, sigs in per_file.items():
            if any(fmt not in _BYTES_PER_SAMPLE for fmt, _ in sigs):
                continue
            expected = int(np.ceil(sigs[0][1] + h.sig_len * sum(_BYTES_PER_SAMPLE[f] for f, _ in sigs)))
            actual = (Path(base).parent / name).stat().st_size
            if actual < expected:
                return f"{name} is truncated: {actual:,} bytes, the header implies {expected:,}"
    except Exception:  # noqa: BLE001 - only a hint; the caller reports the original error
        return ""
    return ""
