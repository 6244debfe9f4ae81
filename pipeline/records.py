"""Stage 2: read WFDB records from the local cache with ``wfdb``.

Only parsing lives here; files arrive through ``pipeline.download``. Every function
raises ``RecordError`` naming the record and the stage, so a job can report it.

Headers are parsed with wfdb's own header functions, from their text: the record
line's base time and date are not used by the pipeline and are dropped before
parsing, so dates written as some databases write them (``2014-05-08 05:05:15``)
do not refuse a record. Every header fact the job relies on is checked against the
files before any work (``read_header``): the signal formats, the number of signals,
and, for the fixed-size formats, that each signal file holds the declared length
(a header without a length takes it from the file size, as wfdb does). So a header
cannot make a job plan work for samples that do not exist.

Also read as wfdb reads them: signals with several samples per frame (at their own
rate, ``fs * spf``: ``Header.for_lead``), multi-segment records (one record, the
segments joined; gaps and signals a segment lacks are NaN), and signals without a
name (``signal <i>``).

A record's files may be held in memory (``contents``: an archive's members, read without
writing them out); names it lacks are read from the folder on disk.
"""

from __future__ import annotations

import contextlib
import functools
import re
import tempfile
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Literal, Mapping

import numpy as np
import wfdb
from wfdb.io import _header, _signal
from wfdb.io import header as _wfdb_header

from .errors import RecordError

#: More signals than this in one header is not a recording (a 12-lead ECG has 12; MIMIC waveforms ~ 10).
MAX_SIGNALS = 1024
#: A header file larger than this is not a header (a multi-segment master of 100,000 segments is ~2 MB).
MAX_HEADER_BYTES = 16 * 2**20

#: Bytes per sample of the WFDB signal formats with a fixed size (exact fractions: 212 packs 2 samples in 3 bytes).
_BYTES_PER_SAMPLE = {"8": Fraction(1), "80": Fraction(1), "16": Fraction(2), "61": Fraction(2), "160": Fraction(2),
                     "212": Fraction(3, 2), "310": Fraction(4, 3), "311": Fraction(4, 3), "24": Fraction(3),
                     "32": Fraction(4)}
#: Every format wfdb reads (the FLAC formats 508/516/524 have no fixed size).
_FORMATS = tuple(_signal.DAT_FMTS)


@dataclass(frozen=True)
class Header:
    """What the job needs from a ``.hea`` file (checked against the record's files)."""

    record: str
    fs: float  #: frames per second (for a lead with several samples per frame: ``for_lead``)
    sig_len: int  #: frames
    sig_names: tuple[str, ...]
    units: tuple[str, ...]
    files: tuple[str, ...]  #: distinct files the signals need (segment headers too), relative to the header's folder
    spf: tuple[int, ...] = ()  #: samples per frame of each signal; () when one each
    n_segments: int = 0  #: a multi-segment record: its number of segments (0: a single-segment record)

    def for_lead(self, lead: "Lead") -> "Header":
        """The header as ``lead`` sees it: ``fs`` and ``sig_len`` at the lead's own rate (``fs * spf``).

        ``read_signal`` counts samples at that rate, so a job that scores one lead takes this
        header for its sampling rate, length and the sample numbers it reads.
        """
        k = self.spf[lead.index] if self.spf else 1
        if k == 1:
            return self
        return replace(self, fs=self.fs * k, sig_len=self.sig_len * k, spf=())

    def units_of(self, lead: "Lead") -> str:
        """The physical units of ``lead`` (``mV`` where the header gives none)."""
        return self.units[lead.index] if lead.index < len(self.units) else "mV"


@dataclass(frozen=True)
class Lead:
    """The signal chosen for a record."""

    index: int
    name: str
    fallback: bool  #: True when none of the preferred leads was present


# ---------------------------------------------------------------------------------------------------------------------
# headers: parsed with wfdb's functions, checked against the files


@dataclass(frozen=True)
class _Folder:
    """The folder of a record's header: its files on disk, or held in memory by name (relative to the folder)."""

    path: Path
    contents: Mapping[str, bytes] | None = None

    def _held(self, name: str) -> bytes | None:
        return None if self.contents is None else self.contents.get(name)

    def size(self, name: str) -> int:
        """Bytes of file ``name``; ``FileNotFoundError`` where it is nowhere."""
        held = self._held(name)
        return len(held) if held is not None else (self.path / name).stat().st_size

    def read(self, name: str) -> bytes:
        held = self._held(name)
        return held if held is not None else (self.path / name).read_bytes()

    def is_file(self, name: str) -> bool:
        return self._held(name) is not None or (self.path / name).is_file()

    def array(self, name: str, dtype, count: int, offset: int) -> np.ndarray:
        """``np.fromfile(name, dtype, count, offset=offset)``: fewer items where the file ends first."""
        held = self._held(name)
        if held is None:
            return np.fromfile(self.path / name, dtype, count=count, offset=offset)
        size = np.dtype(dtype).itemsize
        part = memoryview(held)[offset:offset + count * size]
        return np.frombuffer(part[:len(part) // size * size], dtype)

    @contextlib.contextmanager
    def on_disk(self) -> Iterator[Path]:
        """A folder on disk with the files (for wfdb's own readers): a temporary copy of those in memory."""
        if not self.contents:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="ecg-record-") as tmp:
            for name, data in self.contents.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            yield Path(tmp)


@dataclass
class _Segment:
    """One single-segment header of a record and where its frames lie in the record."""

    start: int  #: first frame in the record
    length: int  #: frames
    rec: wfdb.Record | None  #: None: a gap (``~``)
    folder: _Folder = field(default_factory=lambda: _Folder(Path()))


@dataclass
class _Record:
    """A record's header(s), parsed and checked."""

    fs: float
    sig_len: int
    names: tuple[str, ...]
    units: tuple[str, ...]
    spf: tuple[int, ...]
    files: tuple[str, ...]
    segments: list[_Segment]
    layout: Literal["single", "fixed", "variable"] = "single"


def _read_text(folder: _Folder, hea: str, record: str) -> str:
    label = Path(hea).name
    try:
        size = folder.size(hea)
        if size > MAX_HEADER_BYTES:
            raise RecordError(record, "header", f"{label} is {size:,} bytes: not a WFDB header "
                                                f"(at most {MAX_HEADER_BYTES:,})")
        return folder.read(hea).decode("ascii", errors="ignore")  # as wfdb.rdheader reads it
    except FileNotFoundError:
        raise RecordError(record, "header", f"{label}: not found") from None
    except OSError as exc:
        raise RecordError(record, "header", f"cannot read {label}: {exc}") from exc


def _record_line(line: str) -> str:
    """The record line without its base time and date (``name[/n_seg] n_sig [fs[/counter[(base)]] [sig_len]]``).

    The pipeline uses neither, and databases write them in forms wfdb's parser refuses
    (an ISO date ``2014-05-08 05:05:15`` fails with "unconverted data remains").
    """
    tokens = line.split()
    keep = 4 if len(tokens) >= 4 and tokens[3].isdigit() else 3
    return " ".join(tokens[:keep])


#: Header texts longer than this are parsed without the memo (so it never holds more than ~256 x 64 KiB of text).
_MEMO_MAX_CHARS = 2**16

_Parsed = tuple[bool, tuple[tuple[str, object], ...], tuple[str, ...]]


@functools.lru_cache(maxsize=1)
def _field_specs() -> tuple[tuple[tuple[str, str, object], ...], tuple[tuple[str, str, object], ...]]:
    """wfdb's record-line and signal-line field tables as ``(field, kind, read default)`` rows (kind ``int``,
    ``float`` or ``""``), read once: wfdb looks each field up in these pandas tables on every header (~2 ms,
    more than reading a 30-second recording). Its own comparisons: ``==`` for the record line, ``is`` for signals."""
    def rows(table, same) -> tuple[tuple[str, str, object], ...]:
        out = []
        for name in table.index:
            types = table.loc[name, "allowed_types"]
            kind = "int" if same(types, _header.int_types) else "float" if same(types, _header.float_types) else ""
            out.append((name, kind, table.loc[name, "read_default"]))
        return tuple(out)

    return rows(_header.RECORD_SPECS, lambda a, b: a == b), rows(_header.SIGNAL_SPECS, lambda a, b: a is b)


def _parse_record_line(line: str) -> dict:
    """``wfdb.io._header._parse_record_line`` without its pandas lookups (same fields, same values)."""
    m = _header.rx_record.match(line)
    if m is None:
        raise _header.HeaderSyntaxError("invalid syntax in record line")
    fields = m.groupdict()
    if fields["base_time"] or fields["base_date"]:  # dates and times: wfdb's own parser (never on our lines)
        return _header._parse_record_line(line)
    for name, kind, default in _field_specs()[0]:
        value = fields[name]
        if value == "":
            fields[name] = default
        elif kind == "int":
            fields[name] = int(value)
        elif kind == "float":
            fs = float(value)
            fields[name] = int(fs) if name == "fs" and round(fs, 8) == float(int(fs)) else fs
    return fields


def _parse_signal_lines(lines: list[str]) -> dict:
    """``wfdb.io._header._parse_signal_lines`` without its pandas lookups (same fields, same values)."""
    specs = _field_specs()[1]
    out: dict[str, list] = {name: [None] * len(lines) for name, _, _ in specs}
    for ch, line in enumerate(lines):
        m = _header.rx_signal.match(line)
        if m is None:
            raise _header.HeaderSyntaxError("invalid syntax in signal line")
        raw = m.groupdict()
        for name, kind, default in specs:
            value = raw[name]
            if value == "":
                # A missing baseline is the ADC zero where one is given (wfdb's rule).
                out[name][ch] = int(raw["adc_zero"]) if name == "baseline" and raw["adc_zero"] != "" else default
            elif kind == "int":
                out[name][ch] = int(value)
            elif kind == "float":
                gain = float(value)
                out[name][ch] = 200.0 if name == "adc_gain" and gain == 0 else gain  # a gain of 0 means 200
            else:
                out[name][ch] = value
    return out


@functools.lru_cache(maxsize=256)
def _parse_text(text: str) -> _Parsed:
    """A header's text parsed by wfdb's header functions: ``(multi_segment, fields, comments)``.

    Memoised by the text: wfdb's parser looks every field up in pandas tables (~2 ms a
    header), and a record's header is parsed several times per job. Lists are returned as
    tuples so the cached value cannot be changed by a caller; failures raise (lru_cache
    keeps no exceptions), so a bad header fails each time with the same message.
    """
    lines, comments = _wfdb_header.parse_header_content(text)
    if not lines:
        raise _header.HeaderSyntaxError("no record line")
    fields = _parse_record_line(_record_line(lines[0]))
    multi = fields["n_seg"] is not None
    items: dict[str, object] = {}
    if not multi:
        if len(lines) > 1:
            items.update(_parse_signal_lines(lines[1:]))
        items.update((k, v) for k, v in fields.items() if k != "n_seg")
    else:
        items.update(_header._read_segment_lines(lines[1:]))
        items.update(fields)
    return (multi, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()),
            tuple(c.strip(" \t#") for c in comments))


def _parse(folder: _Folder, hea: str, record: str) -> wfdb.Record | wfdb.MultiRecord:
    """Header ``hea`` of ``folder`` parsed as ``wfdb.rdheader`` parses it, from its text (the user's file is never
    changed).

    The file is read on every call (a header changed on disk gives its new content); only the
    parse of a text seen before is memoised (``_parse_text``). Each call returns a new record
    with its own lists: callers set fields on it.
    """
    text = _read_text(folder, hea, record)
    try:
        multi, items, comments = (_parse_text if len(text) <= _MEMO_MAX_CHARS else _parse_text.__wrapped__)(text)
        rec = wfdb.MultiRecord() if multi else wfdb.Record()
        for k, v in items:  # wfdb's parser gives lists, never tuples: the memo's tuples are its lists
            setattr(rec, k, list(v) if isinstance(v, tuple) else v)
        rec.comments = list(comments)
    except Exception as exc:  # noqa: BLE001 - wfdb raises many types for bad headers
        raise RecordError(record, "header", f"cannot parse {Path(hea).name}: {type(exc).__name__}: {exc}") from exc
    return rec


def _signal_count(rec: wfdb.Record, hea: str, record: str) -> int:
    n = int(rec.n_sig or 0)
    described = len(rec.file_name or [])
    if n > MAX_SIGNALS:
        raise RecordError(record, "header", f"{hea} declares {n} signals; more than {MAX_SIGNALS} is not a recording")
    if n != described:
        raise RecordError(record, "header", f"header declares {n} signals but describes {described}")
    return n


def _file_problem(folder: _Folder, rec: wfdb.Record, hea: str, sig_len: int | None) -> tuple[str, int | None]:
    """What a single-segment header's signal files say about its length: ``(problem, frames)``.

    ``problem`` is ``""`` when every fixed-size signal file holds ``sig_len`` frames, else
    ``"<file> is truncated: ..."`` naming the file, its size, the length the header
    declares and the frames the file holds. ``frames`` is the length the files hold (the
    shortest fixed-size file; None when no file has a fixed size). Files are grouped as
    wfdb reads them: a file's signals share its frames (each ``spf`` samples of its format),
    from the byte offset of its first signal.
    """
    per_file: dict[str, list[tuple[str, int, int]]] = {}
    offsets = rec.byte_offset or [None] * len(rec.file_name)
    for name, fmt, spf, offset in zip(rec.file_name, rec.fmt, rec.samps_per_frame or [1] * len(rec.file_name), offsets):
        per_file.setdefault(name, []).append((str(fmt), int(spf or 1), int(offset or 0)))
    held: int | None = None
    for name, sigs in per_file.items():
        if any(fmt not in _BYTES_PER_SAMPLE for fmt, _, _ in sigs):
            continue  # compressed (FLAC): no size to check against
        try:
            actual = folder.size(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: not found (named by {hea})") from None
        offset = sigs[0][2]
        per_frame = sum(_BYTES_PER_SAMPLE[fmt] * spf for fmt, spf, _ in sigs)
        frames = int(max(actual - offset, 0) // per_frame)
        held = frames if held is None else min(held, frames)
        if sig_len is not None:
            expected = int(np.ceil(float(offset + sig_len * per_frame)))
            if actual < expected:
                fmts = "/".join(dict.fromkeys(fmt for fmt, _, _ in sigs))
                what = f"format {fmts}" + (f", {len(sigs)} signals" if len(sigs) > 1 else "")
                return (f"{name} is truncated: {actual:,} bytes, the header implies {expected:,}: {hea} declares "
                        f"{sig_len} samples, {name} holds {frames} ({what})"), held
    return "", held


def _single(folder: _Folder, rec: wfdb.Record, hea: str, record: str, *, layout_only: bool = False) -> int:
    """Check a single-segment header against its files; return its length in frames (set on ``rec`` too)."""
    n = _signal_count(rec, hea, record)
    if layout_only:  # a variable-layout record's layout header: signal names only, no files
        return 0
    if n == 0:
        raise RecordError(record, "header", f"{hea} describes no signals")
    rec.samps_per_frame = [int(s) if s is not None else 1 for s in (rec.samps_per_frame or [1] * n)]
    for i, (name, fmt, spf) in enumerate(zip(rec.file_name, rec.fmt, rec.samps_per_frame)):
        what = f"signal {i} ({rec.sig_name[i]})" if rec.sig_name and rec.sig_name[i] else f"signal {i}"
        if str(fmt) not in _FORMATS:
            raise RecordError(record, "header", f"{what} of {hea} has format {fmt}, which is not a WFDB signal "
                                                f"format wfdb reads ({', '.join(_FORMATS)})")
        if not name or name == "~":
            raise RecordError(record, "header", f"{what} of {hea} has no signal file")
        if spf < 1:
            raise RecordError(record, "header", f"{what} of {hea} has {spf} samples per frame")
    if not rec.fs or not np.isfinite(float(rec.fs)) or float(rec.fs) <= 0:
        raise RecordError(record, "header", f"{hea} gives no usable sampling frequency ({rec.fs})")
    declared = None if rec.sig_len is None else int(rec.sig_len)
    try:
        problem, held = _file_problem(folder, rec, hea, declared)
    except FileNotFoundError as exc:
        raise RecordError(record, "signal", str(exc)) from None
    if problem:
        raise RecordError(record, "signal", problem)
    if declared is None:
        if held is None:
            raise RecordError(record, "header", f"{hea} gives no signal length, and its format "
                                                f"{'/'.join(dict.fromkeys(rec.fmt))} has no fixed size to take it from")
        declared = held
    if declared <= 0:
        raise RecordError(record, "signal", f"{hea}: the record holds no samples")
    rec.sig_len = declared
    return declared


def _names(rec, n: int) -> tuple[str, ...]:
    names = list(rec.sig_name or [None] * n)
    return tuple(nm.strip() if isinstance(nm, str) and nm.strip() else f"signal {i}" for i, nm in enumerate(names))


def _load(base: Path, record: str, contents: Mapping[str, bytes] | None = None) -> _Record:
    """The record's header(s) parsed and checked against its files (``RecordError`` otherwise)."""
    base = Path(base)
    folder, hea = _Folder(base.parent, contents), f"{base.name}.hea"
    rec = _parse(folder, hea, record)
    if isinstance(rec, wfdb.Record):
        sig_len = _single(folder, rec, hea, record)
        n = rec.n_sig
        return _Record(float(rec.fs), sig_len, _names(rec, n), tuple(u or "mV" for u in (rec.units or ["mV"] * n)),
                       tuple(rec.samps_per_frame), tuple(dict.fromkeys(rec.file_name)),
                       [_Segment(0, sig_len, rec, folder)])
    return _load_segments(folder, hea, rec, record)


def _load_segments(folder: _Folder, hea: str, master: wfdb.MultiRecord, record: str) -> _Record:
    """A multi-segment record as one: its segments checked against their files, in order, gaps kept."""
    names_seg, lengths = list(master.seg_name or []), [int(x) for x in (master.seg_len or [])]
    if not names_seg or len(names_seg) != int(master.n_seg):
        raise RecordError(record, "header", f"{hea} declares {master.n_seg} segments but lists {len(names_seg)}")
    if not master.fs or not np.isfinite(float(master.fs)) or float(master.fs) <= 0:
        raise RecordError(record, "header", f"{hea} gives no usable sampling frequency ({master.fs})")
    variable = lengths[0] == 0
    files: list[str] = []
    segments: list[_Segment] = []
    layout_names: tuple[str, ...] | None = None
    spf: dict[str, int] = {}
    units: dict[str, str] = {}
    start = 0
    for i, (seg, length) in enumerate(zip(names_seg, lengths)):
        if seg == "~":
            segments.append(_Segment(start, length, None, folder))
            start += length
            continue
        seg_hea = f"{seg}.hea"
        rec = _parse(folder, seg_hea, record)
        files.append(seg_hea)
        if not isinstance(rec, wfdb.Record):
            raise RecordError(record, "header", f"segment {seg_hea} of {hea} is itself a multi-segment header")
        if variable and i == 0:  # the layout header: every signal of the record, no samples
            _single(folder, rec, seg_hea, record, layout_only=True)
            layout_names = _names(rec, rec.n_sig)
            continue
        got = _single(folder, rec, seg_hea, record)
        if got != length:
            raise RecordError(record, "signal", f"{hea} gives segment {seg} {length} samples; {seg_hea} declares or "
                                                f"its files hold {got}")
        if rec.fs and abs(float(rec.fs) - float(master.fs)) > 1e-9 * float(master.fs):
            raise RecordError(record, "header", f"segment {seg_hea} is sampled at {rec.fs} Hz, {hea} at {master.fs} Hz")
        seg_names = _names(rec, rec.n_sig)
        if not variable and layout_names is None:
            layout_names = seg_names
        elif not variable and seg_names != layout_names:
            raise RecordError(record, "header", f"segment {seg_hea} has signals {list(seg_names)}, the record's "
                                                f"fixed layout {list(layout_names)}")
        for j, name in enumerate(seg_names):
            if spf.setdefault(name, rec.samps_per_frame[j]) != rec.samps_per_frame[j]:
                raise RecordError(record, "header", f"signal {name} has {spf[name]} samples per frame in one segment "
                                                    f"and {rec.samps_per_frame[j]} in {seg_hea}")
            units.setdefault(name, rec.units[j] if rec.units and rec.units[j] else "mV")
        files += list(dict.fromkeys(rec.file_name))
        segments.append(_Segment(start, length, rec, folder))
        start += length
    if layout_names is None:
        raise RecordError(record, "header", f"{hea}: every segment is a gap")
    if master.sig_len is not None and int(master.sig_len) != start:
        raise RecordError(record, "header", f"{hea} declares {master.sig_len} samples; its segments hold {start}")
    if start <= 0:
        raise RecordError(record, "signal", f"{hea}: the record holds no samples")
    return _Record(float(master.fs), start, layout_names, tuple(units.get(n, "mV") for n in layout_names),
                   tuple(spf.get(n, 1) for n in layout_names), tuple(dict.fromkeys(files)), segments,
                   "variable" if variable else "fixed")


def read_header(base: Path, record: str, *, contents: Mapping[str, bytes] | None = None) -> Header:
    """Parse ``<base>.hea`` (``base`` is the record path without extension) and check it against the files.

    ``contents``: the record's files held in memory, by name relative to the header's folder (``LocalRecord.contents``);
    the names it lacks are read from disk.

    Raises
    ------
    RecordError
        Stage ``header``: the header cannot be parsed, declares an unknown format, no or too
        many signals, or no usable sampling rate. Stage ``signal``: a signal file is
        missing, or holds fewer samples than the header declares (``"<file> is truncated:
        ..."``, naming both counts): nothing is planned for samples that do not exist.
    """
    r = _load(base, record, contents)
    return Header(record=record, fs=r.fs, sig_len=r.sig_len, sig_names=r.names, units=r.units, files=r.files,
                  spf=r.spf if any(k != 1 for k in r.spf) else (),
                  n_segments=len(r.segments) if r.layout != "single" else 0)


def segment_names(hea: Path) -> tuple[str, ...]:
    """The segment (and layout) headers a multi-segment master header names, ``()`` for any other header.

    For listing a folder: the segments of a multi-segment record are part of it, not records
    of their own. Reads the record line only, unless it declares segments; an unreadable
    header names none (the record itself then fails with its cause).
    """
    try:
        with open(hea, "rb") as f:
            for raw in f:
                line = raw.decode("ascii", errors="ignore").strip()
                if line and not line.startswith("#"):
                    break
            else:
                return ()
        if "/" not in line.split()[0]:
            return ()
        rec = _parse(_Folder(Path(hea).parent), Path(hea).name, Path(hea).stem)
    except (OSError, IndexError, RecordError):
        return ()
    return tuple(n for n in (getattr(rec, "seg_name", None) or []) if n != "~")


def header_files(base: Path, record: str, *, contents: Mapping[str, bytes] | None = None) -> tuple[str, ...]:
    """The files ``<base>.hea`` names (signal files; segment headers and the signal files of those present),
    relative to its folder, without checking them: what a source must fetch beside the header.

    A source fetches until this stops growing (a segment header names more files).
    """
    base = Path(base)
    folder, hea = _Folder(base.parent, contents), f"{base.name}.hea"
    rec = _parse(folder, hea, record)
    if isinstance(rec, wfdb.Record):
        return tuple(dict.fromkeys(n for n in (rec.file_name or []) if n and n != "~"))
    out: list[str] = []
    for seg in rec.seg_name or []:
        if seg == "~":
            continue
        out.append(f"{seg}.hea")
        if folder.is_file(f"{seg}.hea"):
            sub = _parse(folder, f"{seg}.hea", record)
            if isinstance(sub, wfdb.Record):
                out += [n for n in (sub.file_name or []) if n and n != "~"]
    return tuple(dict.fromkeys(out))


#: Standard and modified lead names (after ``canonical_lead``'s clean-up): the limb and augmented leads,
#: V1-V6 (and ``V``), modified leads (MLII, ML5, MCL1-MCL6, CM5...).
_LEAD = r"(?:I|II|III|AVR|AVL|AVF|V[1-6]?|ML(?:I|II|III|[1-6])|MCL[1-6]|M?CM?[1-6])"
#: Signal names recognised as ECG leads (``canonical_lead`` of the name): a lead above, or ``ECG``/``EKG`` with
#: an optional number. A record's other signals (PLETH, ABP, RESP, unnamed ones) are never scored through the
#: fallback; a user who wants one names it in the configuration's ``leads``.
ECG_LEAD_PATTERN = re.compile(rf"^(?:{_LEAD}|(?:ECG|EKG)\d*)$")
#: European names of the limb leads (Einthoven's D1-D3, "Derivation").
_EINTHOVEN = {"D1": "I", "D2": "II", "D3": "III", "DI": "I", "DII": "II", "DIII": "III"}


def canonical_lead(name: str | None) -> str:
    """A signal name as the lead it is: upper case, without spaces, ``_``, ``-``, brackets, and without an ``ECG``,
    ``EKG`` or ``LEAD`` label around a lead name.

    ``ECG lead II``, ``ECG_II``, ``II (ECG)``, ``lead ii`` and ``D2`` are all ``II``; ``mcl 1`` is ``MCL1``; a
    name that is no lead once cleaned (``ECG``, ``ECG1``, ``PLETH``) keeps its cleaned form, so two names that
    differ only in spelling compare equal and no two leads do.
    """
    s = re.sub(r"[\s_\-()\[\]]+", "", (name or "").upper())
    core = re.sub(r"^(?:ECG|EKG)?(?:LEAD)?|(?:ECG|EKG)$", "", s)
    core = _EINTHOVEN.get(core, core)
    return core if core and re.fullmatch(_LEAD, core) else s


def is_ecg_lead(name: str | None) -> bool:
    """Whether ``name`` is a recognised ECG lead name (``ECG_LEAD_PATTERN`` of its ``canonical_lead``)."""
    return bool(ECG_LEAD_PATTERN.match(canonical_lead(name)))


def choose_lead(header: Header, preferred: tuple[str, ...], fallback: Literal["fail", "first"] = "fail") -> Lead:
    """Take the first of ``preferred`` the record has (names compared as ``canonical_lead``: ``ECG lead II``
    is ``II``).

    With ``fallback="first"``, a record with none of them gives its first signal that has a
    recognised ECG lead name (``is_ecg_lead``), flagged as a fallback; a record with no ECG
    signal at all fails, naming its signals, so a plethysmogram or blood pressure is never
    scored as ECG unless ``preferred`` names it.

    MIT-BIH: most records have MLII first; 114 has it second; 102 and 104 have none
    (they have V5 and V2), which the default preference list covers.
    """
    names = [canonical_lead(n) for n in header.sig_names]
    for want in preferred:
        if canonical_lead(want) in names:
            i = names.index(canonical_lead(want))
            return Lead(i, header.sig_names[i], False)
    if fallback == "first":
        for i, name in enumerate(header.sig_names):
            if is_ecg_lead(name):
                return Lead(i, name, True)
        raise RecordError(header.record, "lead", f"no ECG lead among its signals {list(header.sig_names)} (none is "
                                                 f"one of {list(preferred)} or a recognised ECG lead name); name the "
                                                 "signal in the configuration's `leads` to score it anyway")
    raise RecordError(
        header.record, "lead", f"none of the leads {list(preferred)} in signals {list(header.sig_names)}"
    )


@dataclass(frozen=True)
class Annotations:
    """Reference annotations of a record."""

    sample: np.ndarray  #: int64
    symbol: np.ndarray  #: object array of str
    aux_note: np.ndarray | None = None  #: object array of str: rhythm changes such as "(AFIB", "(N"


def read_annotations(base: Path, record: str, extension: str, fs: float | None = None) -> Annotations:
    """Read ``<base>.<extension>`` with ``wfdb.rdann``; with ``fs``, give its times as samples at that rate.

    WFDB annotation times count frames (or the file's own ``## time resolution``), so on a lead with
    several samples per frame, read at its true rate (``Header.for_lead``), they are scaled by
    ``fs`` over the annotations' rate; at the frame rate they are left as they are.
    """
    try:
        ann = wfdb.rdann(str(base), extension)
    except Exception as exc:  # noqa: BLE001
        raise RecordError(
            record, "annotations", f"cannot read {Path(base).name}.{extension}: {type(exc).__name__}: {exc}"
        ) from exc
    aux = np.asarray([(a or "").rstrip("\x00") for a in (ann.aux_note or [""] * len(ann.sample))], dtype=object)
    sample = np.asarray(ann.sample, dtype=np.int64)
    if fs and ann.fs and abs(float(ann.fs) - fs) > 1e-6 * fs:
        sample = np.round(sample * (fs / float(ann.fs))).astype(np.int64)
    return Annotations(sample, np.asarray(ann.symbol, dtype=object), aux)


#: Aligned formats the fast reader decodes: the file's sample dtype and the offset of offset-binary formats.
_ALIGNED_DTYPES = {"16": ("<i2", 0), "61": (">i2", 0), "80": ("u1", 128), "160": ("<u2", 32768), "32": ("<i4", 0)}
#: Samples the fast reader converts at a time: its temporaries stay in cache, not fresh memory for a whole record.
_CHUNK = 2**15


def _dac(digital: np.ndarray, fmt: str, baseline, adc_gain) -> np.ndarray:
    """``digital`` in physical units, float64, by the operations of ``wfdb.Record.dac(expanded=True,
    return_res=64)`` in its order (so bit for bit its result): the invalid-sample code becomes NaN."""
    physical = digital.astype(np.float64)
    np.subtract(physical, baseline, physical)
    np.divide(physical, adc_gain, physical)
    physical[digital == _signal.INVALID_SAMPLE_VALUE[fmt]] = np.nan
    return physical


def _decode_212(raw: np.ndarray, n: int, c: int, skip: int, count: int, table: np.ndarray) -> np.ndarray:
    """Signal ``c`` of ``n`` in format-212 bytes ``raw`` (starting on a byte triplet), samples ``[skip, skip +
    count)`` of the frames the bytes hold, each as ``table`` gives its unsigned 12-bit code.

    212 packs two samples (flat index even, odd) in three bytes: ``b0 + 256 * (b1 & 15)`` and
    ``b2 + 256 * (b1 >> 4)``. With ``n`` even a frame is whole triplets, so the signal sits at the
    same bytes of every frame; with ``n`` odd, at one of two places in each pair of frames (``raw``
    then starts on an even frame). Each sample is read as the little-endian 16-bit word of its two
    bytes, a unit apart, rather than byte by byte: several times faster.
    """
    per = 1 if n % 2 == 0 else 2  # frames in the repeating unit
    unit = 3 * n * per // 2
    units = -(-(skip + count) // per)
    if raw.size < units * unit:  # the last unit of an odd n may lie half past the file: its samples are not wanted
        raw = np.concatenate([raw, np.zeros(units * unit - raw.size, np.uint8)])
    # an odd sample's word b1 | b2 << 8, shifted right by 4, is b2 * 16 + (b1 >> 4): its code with the two parts
    # swapped, so it indexes the table with its rows and columns swapped (one operation a sample, not three)
    tables = (table, table.reshape(16, 256).T.ravel())
    out = np.empty((units, per), table.dtype)
    index = np.empty(min(units, _CHUNK), np.intp)  # intp: numpy's fast path for taking from the table
    for j in range(per):
        pair, odd = divmod(j * n + c, 2)
        words = np.ndarray((units,), "<u2", raw, 3 * pair + odd, (unit,))  # b0 | b1 << 8, or b1 | b2 << 8
        for lo in range(0, units, _CHUNK):
            w = words[lo:lo + _CHUNK]
            i = index[:w.size]
            if odd:
                np.right_shift(w, 4, out=i)
            else:
                np.bitwise_and(w, 0x0FFF, out=i)
            np.take(tables[odd], i, out=out[lo:lo + _CHUNK, j], mode="clip")  # clip: no bounds pass (all < 4096)
    return out.reshape(-1)[skip:skip + count]


def _fast_channel(seg: _Segment, channel: int, first: int, stop: int) -> np.ndarray | None:
    """``_read_channel`` for the common layouts, reading only the bytes of frames ``[first, stop)``; None for others.

    Covers formats 212 and the aligned ones (``_ALIGNED_DTYPES``) when the signal's file holds
    consecutive signals of one format, one sample per frame each and no skew. Gives wfdb's
    digital values and its digital-to-physical step (``_dac``), so the same samples bit for bit.
    A file shorter than the range (changed since it was checked) also gives None: wfdb's reader
    then fails or reads as it always has.
    """
    rec = seg.rec
    fmt = str(rec.fmt[channel])
    mine = [i for i, name in enumerate(rec.file_name) if name == rec.file_name[channel]]
    if ((fmt != "212" and fmt not in _ALIGNED_DTYPES) or stop <= first or mine != list(range(mine[0], mine[-1] + 1))
            or any(str(rec.fmt[i]) != fmt or rec.samps_per_frame[i] != 1 or (rec.skew and rec.skew[i])
                   for i in mine)):
        return None  # wfdb reads a file as its first signal's format, and misplaces signals not consecutive
    n, c = len(mine), channel - mine[0]
    offset = int((rec.byte_offset or [0] * rec.n_sig)[mine[0]] or 0)  # a file's signals start at its first's
    name = rec.file_name[channel]
    baseline, gain = rec.baseline[channel], rec.adc_gain[channel]
    if fmt == "212":
        start = first - first % 2 if n % 2 else first  # an odd n: frames start a triplet every second frame
        need = -(-(stop - start) * n * 3 // 2)
        raw = seg.folder.array(name, np.uint8, need, offset + start * n * 3 // 2)
        if raw.size < need:
            return None
        # every 12-bit code's sample by _dac (float64), rounded to float32 as read_signal gives it: looked up
        codes = np.arange(4096)
        table = _dac(np.where(codes < 2048, codes, codes - 4096), fmt, baseline, gain).astype(np.float32)
        return _decode_212(raw, n, c, first - start, stop - first, table)
    dtype, shift = _ALIGNED_DTYPES[fmt]
    raw = seg.folder.array(name, dtype, (stop - first) * n, offset + first * n * np.dtype(dtype).itemsize)
    if raw.size < (stop - first) * n:
        return None
    digital = raw[c::n]
    out = np.empty(stop - first, np.float32)
    for lo in range(0, out.size, _CHUNK):
        part = digital[lo:lo + _CHUNK]
        out[lo:lo + _CHUNK] = _dac(part.astype(np.int32) - shift if shift else part, fmt, baseline, gain)
    return out


def _read_channel(seg: _Segment, channel: int, first: int, stop: int) -> np.ndarray:
    """Samples ``[first, stop)`` (at the signal's own rate) of one signal of a single-segment header, physical
    units (float32), as ``wfdb.rdrecord(smooth_frames=False)`` reads them (wfdb's reader and digital-to-physical
    step, in float64), then rounded to float32.

    The common layouts are read directly (``_fast_channel``, the same values); the others by wfdb.
    """
    rec = seg.rec
    k = rec.samps_per_frame[channel]
    if k == 1:
        fast = _fast_channel(seg, channel, first, stop)
        if fast is not None:
            return fast
    f0, f1 = first // k, -(-stop // k)
    with seg.folder.on_disk() as folder:
        digital = _signal._rd_segment(
            file_name=rec.file_name, dir_name=str(folder), pn_dir=None, fmt=rec.fmt, n_sig=rec.n_sig,
            sig_len=rec.sig_len, byte_offset=rec.byte_offset, samps_per_frame=rec.samps_per_frame, skew=rec.skew,
            init_value=rec.init_value, sampfrom=f0, sampto=f1, channels=[channel], ignore_skew=False)
    one = wfdb.Record(e_d_signal=digital, fmt=[rec.fmt[channel]], adc_gain=[rec.adc_gain[channel]],
                      baseline=[rec.baseline[channel]], samps_per_frame=[k], n_sig=1)
    physical = one.dac(expanded=True, return_res=64)[0]
    return physical[first - f0 * k: stop - f0 * k].astype(np.float32)


def read_signal(base: Path, header: Header, lead: Lead, sampfrom: int = 0, sampto: int | None = None, *,
                contents: Mapping[str, bytes] | None = None) -> np.ndarray:
    """One lead in physical units (float32), samples ``[sampfrom, sampto)`` at the lead's own rate.

    A lead with several samples per frame is read at its true rate (``Header.for_lead``:
    ``fs * spf``), not one sample a frame. A multi-segment record reads as one: its
    segments joined, with NaN over gaps and where a segment lacks the lead. The header
    is read again from the files (``header`` names the record, its length is the default
    ``sampto``), so a file truncated since ``read_header`` fails here the same way.

    ``contents``: as ``read_header``'s. Raises ``RecordError`` (stage ``signal``) for unreadable or truncated signal
    files.
    """
    r = _load(base, header.record, contents)
    k = r.spf[lead.index] if lead.index < len(r.spf) else 1
    total = r.sig_len * k
    sampto = total if sampto is None else sampto
    if not 0 <= sampfrom <= sampto <= total:
        raise RecordError(header.record, "signal", f"samples {sampfrom}-{sampto} lie outside the record "
                                                   f"(0-{total})")
    parts = []
    try:
        for seg in r.segments:
            lo, hi = max(sampfrom, seg.start * k), min(sampto, (seg.start + seg.length) * k)
            if lo >= hi:
                continue
            channel = lead.index
            if seg.rec is not None and r.layout == "variable":
                names = _names(seg.rec, seg.rec.n_sig)
                channel = names.index(r.names[lead.index]) if r.names[lead.index] in names else -1
            if seg.rec is None or channel < 0:
                parts.append(np.full(hi - lo, np.nan, np.float32))
            else:
                parts.append(_read_channel(seg, channel, lo - seg.start * k, hi - seg.start * k))
    except Exception as exc:  # noqa: BLE001
        raise RecordError(header.record, "signal", f"cannot read samples {sampfrom}-{sampto} of "
                                                   f"{', '.join(r.files)}: {type(exc).__name__}: {exc}") from exc
    sig = (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else np.zeros(0, np.float32)
    if sig.shape[0] != sampto - sampfrom:
        raise RecordError(header.record, "signal", f"expected {sampto - sampfrom} samples, read {sig.shape[0]} "
                                                   "(truncated file?)")
    return sig
