"""Stage 3a: label sources (beats, rhythm episodes, record tables, detected beats) and their registry.

Beat labels map WFDB annotation symbols to AAMI EC57 classes.

Symbols fall in three groups:

* beats: a key of the label map (``AAMI_EC57`` by default) -> their class;
* non-beats: the WFDB standard annotation codes that mark rhythm changes, noise,
  waves and comments (``+``, ``~``, ``|``, ``!``, ``x``, ...), never segmented;
* unknown: anything else (non-standard or custom symbols, and the standard beat codes
  the EC57 map leaves out: ``B``, ``n``, ``r``, ``?``), handled by the
  ``unknown_symbols`` policy: kept as ``Q``, dropped, or failing the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Mapping, Protocol, Sequence

import numpy as np

from .errors import RecordError

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
    n_not_text: int = 0  #: annotations whose symbol is no text (None, NaN): ignored, neither beat nor Q
    #: every beat annotation, kept or not (a known or unknown beat symbol; not the non-beats): the
    #: rhythm around each beat (``pipeline.rr``) counts beats the policy leaves out
    all_sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


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
    # A symbol that is no text (a NaN from a malformed annotation table) is no beat of any class: leave it out,
    # counted, rather than let str(nan) make it an unknown symbol and so class Q.
    text = np.frompyfunc(lambda v: isinstance(v, str) and v != "", 1, 1)(symbol).astype(bool) if symbol.size \
        else np.zeros(0, bool)
    n_not_text = int((~text).sum())
    if n_not_text:
        symbol, sample = symbol[text], sample[text]
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
    is_beat = ~is_nonbeat_d[inverse]
    return LabelledBeats(
        sample=sample[keep],
        symbol=symbol[keep],
        label=cls[inverse][keep],
        n_nonbeat=int(is_nonbeat_d[inverse].sum()),
        n_unknown=n_unknown,
        unknown_symbols=unknown_syms,
        n_not_text=n_not_text,
        all_sample=sample[is_beat],
    )


# --- Label sources: a record -> anchors + labels -------------------------------------------------
#
# A label source is a small frozen dataclass with one method, ``segments(record)``: the
# anchors (record samples a segment is placed at) and one label per anchor. The jobs hand the
# anchors to the segment seam (``pipeline.segment``), whatever the source was.


@dataclass(frozen=True)
class RecordInput:
    """What a label source may read of one record (or of a span of it): its files, header and chosen lead."""

    record: str
    base: Path  #: local path without suffix (``wfdb``'s ``record_name``)
    fs: float
    sig_len: int
    signal: np.ndarray | None = None  #: the chosen lead, float32, record samples ``[first, first + len)``
    first: int = 0  #: the record sample ``signal`` starts at (a piece of a long record is read with margins)
    span: tuple[int, int] | None = None  #: the record samples whose segments are wanted; None: the whole record
    mv_per_unit: float | None = 1.0  #: millivolts per unit of ``signal`` (None: not a voltage; taken as mV)
    #: ``signal`` already resampled to a detector's rate (``DetectedBeats.spec.fs``), where the caller has it
    resampled: np.ndarray | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        """``span``, or the whole record."""
        return self.span if self.span is not None else (0, self.sig_len)


@dataclass(frozen=True)
class Segments:
    """Anchors of one record's segments and their labels (all arrays share one length)."""

    anchor: np.ndarray  #: int64 record sample of each segment (R peak, or window start)
    label: np.ndarray  #: object array of class names ("" = no reference label)
    symbol: np.ndarray  #: object array: the original annotation symbol / table entry
    n_nonbeat: int = 0
    n_unknown: int = 0
    #: beat sources: every beat of the record (R peaks), segmented or not, the context of its RR features
    #: (``pipeline.rr.features_at``); None for sources whose segments are not beats
    beats: np.ndarray | None = None
    #: sources that resample (``DetectedBeats``): each anchor's sample in the resampled signal, where its window
    #: is cut; ``beats_position`` the same for ``beats``. None: the anchors are the positions.
    position: np.ndarray | None = None
    beats_position: np.ndarray | None = None
    agreement: "Agreement | None" = None  #: detected beats against reference ones, where a reference was given

    def select(self, mask: np.ndarray) -> "Segments":
        return replace(self, anchor=self.anchor[mask], label=self.label[mask], symbol=self.symbol[mask],
                       position=None if self.position is None else self.position[mask])


@dataclass(frozen=True)
class Agreement:
    """Detected beats against reference beats, one to one within a tolerance (ANSI/AAMI EC57 gross figures)."""

    n_reference: int  #: reference beats where a window fits (the figures' beats)
    tp: int
    fn: int
    fp: int
    n_edge: int = 0  #: reference beats nearer a record end than a window's half-width: never scored, not counted


class LabelSource(Protocol):
    """The contract of a label source (see ``LABEL_SOURCES``; ``register_label_source`` checks it).

    Every source also has a classmethod ``from_database(db, config)`` that builds it from a
    database entry and the preprocess configuration (``Database.labels`` names it), and
    ``describe()``: its parameters as the store's ``label_source``.
    """

    task: ClassVar[str]  #: "beat" or "rhythm"
    anchor_kind: ClassVar[str]  #: "r-peak" or "window-start"
    pad: ClassVar[str]  #: "none", or "wrap" where windows may run past a short record's end

    @property
    def window(self) -> tuple[float, float]:
        """Seconds of signal before and after each anchor."""
        ...

    @property
    def annotators(self) -> tuple[str, ...]:
        """Annotation files (extensions) each record needs."""
        ...

    @property
    def classes(self) -> tuple[str, ...]: ...

    def segments(self, rec: RecordInput) -> Segments: ...


@dataclass(frozen=True)
class BeatAnnotations:
    """WFDB beat annotations (``.atr``) through a symbol map; the original symbol is kept."""

    annotator: str = "atr"
    label_map: str = "aami-ec57"
    unknown: UnknownPolicy = "Q"
    window: tuple[float, float] = (0.25, 0.45)  #: seconds before and after the R peak
    #: "fiducial": each beat (and the beats its RR features count) moved to the point the R-peak
    #: detector reports for it (``detect.fiducial_points``); "annotation": the annotated sample
    align: Literal["annotation", "fiducial"] = "fiducial"
    #: the symbol map itself, where it is not a named one (a model card's ``label_map``); overrides ``label_map``
    symbols: Mapping[str, str] | None = field(default=None, compare=False, hash=False)
    task: ClassVar[str] = "beat"
    anchor_kind: ClassVar[str] = "r-peak"
    pad: ClassVar[str] = "none"

    @classmethod
    def from_database(cls, db: Any, config: Any) -> "BeatAnnotations":
        return cls(db.annotator, db.label_map, config.unknown_symbols, (config.window.before_s, config.window.after_s),
                   config.window.align)

    @property
    def annotators(self) -> tuple[str, ...]:
        return (self.annotator,)

    @property
    def symbol_map(self) -> Mapping[str, str]:
        return self.symbols if self.symbols is not None else LABEL_MAPS[self.label_map]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.symbol_map.values()))

    def describe(self) -> dict[str, Any]:
        return {"kind": "beat-annotations", "annotator": self.annotator, "label_map": self.label_map,
                "unknown": self.unknown, "align": self.align}

    def segments(self, rec: RecordInput) -> Segments:
        from .records import read_annotations

        ann = read_annotations(rec.base, rec.record, self.annotator, rec.fs)
        try:
            beats = label_beats(ann.sample, ann.symbol, self.symbol_map, self.unknown)
        except ValueError as exc:
            raise RecordError(rec.record, "annotations", str(exc)) from exc
        sample, every = beats.sample, beats.all_sample
        if self.align == "fiducial" and every.size:
            if rec.signal is None:
                raise ValueError("align='fiducial' needs the record's signal (RecordInput.signal)")
            sample, every = _aligned(rec, sample, every)
        return Segments(sample, beats.label, beats.symbol, beats.n_nonbeat, beats.n_unknown, every)


def _aligned(rec: RecordInput, sample: np.ndarray, every: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sample`` and ``every`` (all beats; ``sample`` is a subset) moved to the detector's fiducial points.

    A model scores detected beats, whose windows the detector centres on its fiducial point; annotators
    put theirs a few samples away, differently from record to record (on MIT-BIH's DS2 half of the beats
    are 1 or more samples off, on 117 a third 5 or more). Training windows centred by the same rule
    as scoring's leave the model nothing to learn about that offset.
    """
    from .detect import fiducial_points

    order = np.argsort(every, kind="stable")
    ordered = every[order]
    moved = fiducial_points(rec.signal, rec.fs, ordered)
    out = np.empty_like(every)
    out[order] = moved
    return moved[np.searchsorted(ordered, sample)], out


@dataclass(frozen=True)
class RhythmAnnotations:
    """WFDB rhythm annotations (``aux_note`` such as ``(AFIB``, ``(N``): one label per fixed window.

    Windows lie on the grid every windowed source and ``score`` share (``segment.window_grid``: every
    ``hop_s``, the last one ending with the record). A window gets the rhythm that covers most of it;
    windows before the first rhythm annotation get "". Rhythm names are the annotation text without
    the "("; with ``to_classes`` (a rhythm model's classes) they become those classes (``rhythm_classes``),
    the original names staying as the symbols.
    """

    annotator: str = "atr"
    window_s: float = 10.0
    hop_s: float = 10.0
    to_classes: tuple[str, ...] = ()
    task: ClassVar[str] = "rhythm"
    anchor_kind: ClassVar[str] = "window-start"
    pad: ClassVar[str] = "none"

    @classmethod
    def from_database(cls, db: Any, config: Any) -> "RhythmAnnotations":
        return cls(db.annotator, config.rhythm.length_s, config.rhythm.hop_s)

    @property
    def window(self) -> tuple[float, float]:
        """Seconds before and after the anchor (the window start)."""
        return 0.0, self.window_s

    @property
    def annotators(self) -> tuple[str, ...]:
        return (self.annotator,)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.to_classes  # without them an open set: whatever rhythms the records name

    def describe(self) -> dict[str, Any]:
        return {"kind": "rhythm-annotations", "annotator": self.annotator, "window_s": self.window_s,
                "hop_s": self.hop_s}

    def segments(self, rec: RecordInput) -> Segments:
        from .records import read_annotations
        from .segment import window_grid

        ann = read_annotations(rec.base, rec.record, self.annotator, rec.fs)
        start, stop, rhythm = rhythm_intervals(ann.sample, ann.aux_note, rec.sig_len)
        anchor = window_grid(rec.sig_len, rec.fs, self.window_s, self.hop_s)
        lo, hi = rec.bounds
        anchor = anchor[(anchor >= lo) & (anchor < hi)]
        majority = window_majority(anchor, int(round(self.window_s * rec.fs)), start, stop, rhythm)
        label = rhythm_classes(majority, self.to_classes) if self.to_classes else majority.copy()
        return Segments(anchor, label, majority)


#: WFDB rhythm notes (MIT-BIH ``aux_note`` without the "(") -> the Challenge 2017 classes: normal sinus
#: rhythm is N, atrial fibrillation A, every other rhythm O (Other); noise has no rhythm note.
CINC2017_RHYTHMS: Mapping[str, str] = MappingProxyType({
    "N": "N", "AFIB": "A", **dict.fromkeys(["AB", "AFL", "B", "BII", "IVR", "NOD", "P", "PREX", "SBR", "SVTA", "T",
                                            "VFL", "VT"], "O")})


def rhythm_classes(rhythm: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Rhythm names -> a rhythm model's classes (``CINC2017_RHYTHMS``; unknown rhythms O, "" stays "")."""
    if not {"N", "A", "O"} <= set(classes):
        return np.full(len(rhythm), "", dtype=object)
    return np.array([CINC2017_RHYTHMS.get(str(r), "O") if r else "" for r in rhythm], dtype=object)


def rhythm_intervals(sample: np.ndarray, aux_note: np.ndarray | None,
                     sig_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(start, stop, rhythm)`` of each rhythm episode: from one ``(XXX`` note to the next (or the end)."""
    aux = np.asarray(aux_note if aux_note is not None else np.zeros(0, object), dtype=object).astype(str)
    is_rhythm = np.char.startswith(aux, "(") if aux.size else np.zeros(0, bool)
    start = np.asarray(sample, dtype=np.int64)[is_rhythm]
    rhythm = np.array([a[1:].strip() for a in aux[is_rhythm]], dtype=object)
    stop = np.append(start[1:], sig_len).astype(np.int64)
    return start, stop, rhythm


def window_majority(anchor: np.ndarray, length: int, start: np.ndarray, stop: np.ndarray,
                    rhythm: np.ndarray) -> np.ndarray:
    """The rhythm covering most of each window ``[anchor, anchor + length)`` ("" where none does)."""
    if not len(anchor) or not len(start):
        return np.full(len(anchor), "", dtype=object)
    lo = np.maximum(anchor[:, None], start[None, :])
    hi = np.minimum(anchor[:, None] + length, stop[None, :])
    overlap = np.clip(hi - lo, 0, None)  # (windows, episodes): small, a record has few episodes
    best = overlap.argmax(axis=1)
    return np.where(overlap.max(axis=1) > 0, rhythm[best], "").astype(object)


@dataclass(frozen=True)
class RecordLabelTable:
    """One label per recording from a table such as Challenge 2017's ``REFERENCE.csv`` (``record,label``).

    Each recording becomes fixed windows of ``window_s`` every ``hop_s`` seconds that cover
    all of it (``segment.window_grid``: the last window ends at the recording's end), each
    with the recording's label; predictions are aggregated per recording. A recording
    shorter than ``window_s`` is one window, padded by repeating it (the store's
    ``spectrogram.pad``); one shorter than ``min_s`` is refused, never padded into a label
    it may not show.

    ``table`` is filled by ``load`` (the job reads the file from the source once).
    """

    file: str = "REFERENCE.csv"
    classes_: tuple[str, ...] = ()
    window_s: float = 30.0
    hop_s: float = 30.0
    min_s: float = 5.0
    table: Mapping[str, str] = field(default_factory=dict)
    task: ClassVar[str] = "rhythm"
    anchor_kind: ClassVar[str] = "window-start"
    pad: ClassVar[str] = "wrap"

    @classmethod
    def from_database(cls, db: Any, config: Any) -> "RecordLabelTable":
        opts = dict(db.label_options)
        w = config.rhythm
        return cls(file=opts.get("file", "REFERENCE.csv"), classes_=tuple(opts.get("classes", ())),
                   window_s=w.length_s, hop_s=w.hop_s, min_s=w.min_s)

    @property
    def annotators(self) -> tuple[str, ...]:
        return ()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classes_

    @property
    def window(self) -> tuple[float, float]:
        """Seconds before and after the anchor (the window start)."""
        return 0.0, self.window_s

    def describe(self) -> dict[str, Any]:
        return {"kind": "record-table", "file": self.file, "window_s": self.window_s, "hop_s": self.hop_s,
                "min_s": self.min_s, "pad": self.pad, "aggregation": "mean of the window probabilities per record"}

    @property
    def labelled_records(self) -> tuple[str, ...]:
        """Every record the table names (to report labels whose recording is missing)."""
        return tuple(self.table)

    def load(self, text: str) -> "RecordLabelTable":
        """This source with the table parsed from ``text`` (``record,label`` lines)."""
        table: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, label = line.partition(",")
            if not sep or not name.strip():
                raise ValueError(f"{self.file} line {lineno}: expected 'record,label', got {line[:60]!r}")
            if name.strip() in table and table[name.strip()] != label.strip():
                raise ValueError(f"{self.file} line {lineno}: {name.strip()} is labelled twice "
                                 f"({table[name.strip()]!r} and {label.strip()!r})")
            table[name.strip()] = label.strip()
        return replace(self, table=table)

    def segments(self, rec: RecordInput) -> Segments:
        name = rec.record.rsplit("/", 1)[-1]
        if name not in self.table:
            raise RecordError(rec.record, "labels", f"no label in {self.file}")
        label = self.table[name]
        if self.classes_ and label not in self.classes_:
            raise RecordError(rec.record, "labels", f"unknown label {label!r} in {self.file} "
                                                     f"(known: {', '.join(self.classes_)})")
        if rec.sig_len < self.min_s * rec.fs:
            raise RecordError(rec.record, "labels", f"{rec.sig_len / rec.fs:.2f} s long, shorter than the "
                                                     f"{self.min_s:g} s a recording needs (rhythm.min_s)")
        from .segment import window_grid

        anchor = window_grid(rec.sig_len, rec.fs, self.window_s, self.hop_s)
        n = len(anchor)
        return Segments(anchor, np.full(n, label, dtype=object), np.full(n, label, dtype=object))


@dataclass(frozen=True)
class DetectedBeats:
    """R peaks found by the detector (``pipeline.detect``): the scoring path's beat finder.

    With ``spec`` (a model's window and STFT), the lead is resampled to ``spec.fs`` and the detector runs
    there, as the model's windows are cut there; anchors come back at the record's own rate, each with its
    ``position`` in the resampled signal. Of a span (``RecordInput.span``, a piece of a long record read
    with margins), the span's own detections are the segments and every detection is the beats' context
    (RR features, templates). With a ``reference`` (beat annotations), each detection takes the class (and
    symbol) of the reference beat it matches one to one within ``tolerance_s`` (ANSI/AAMI EC57), ""
    where none; only beats whose window fits in the record count in the ``agreement`` figures.
    """

    detector: Any = None  #: ``config.DetectorSpec``; None for the defaults
    reference: BeatAnnotations | None = None
    tolerance_s: float = 0.150
    spec: Any = None  #: ``spectrogram.SpectrogramSpec`` of the model; None: detect at the record's rate
    task: ClassVar[str] = "beat"
    anchor_kind: ClassVar[str] = "r-peak"
    pad: ClassVar[str] = "none"

    @classmethod
    def from_database(cls, db: Any, config: Any) -> "DetectedBeats":
        return cls(config.detector if hasattr(config, "detector") else None,
                   BeatAnnotations.from_database(db, config))

    @property
    def window(self) -> tuple[float, float]:
        """Seconds before and after the R peak (the model's window; the beat window's default without one)."""
        if self.spec is None:
            return self.reference.window if self.reference else BeatAnnotations().window
        return self.spec.n_before / self.spec.fs, self.spec.n_after / self.spec.fs

    @property
    def annotators(self) -> tuple[str, ...]:
        return self.reference.annotators if self.reference else ()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.reference.classes if self.reference else ()

    def describe(self) -> dict[str, Any]:
        return {"kind": "detected-beats", "tolerance_s": self.tolerance_s,
                "reference": self.reference.describe() if self.reference else None}

    def segments(self, rec: RecordInput) -> Segments:
        from .detect import detect_r_peaks

        if rec.signal is None:
            raise RecordError(rec.record, "detect", "the detector needs the record's signal")
        rate = self.spec.fs if self.spec is not None else rec.fs
        scale = rate / rec.fs
        x = rec.resampled
        if x is None:
            from .resample import resample

            x = resample(rec.signal, rec.fs, rate)
        position = detect_r_peaks(x, rate, self.detector, origin=int(round(rec.first * scale)),
                                  mv_per_unit=1.0 if rec.mv_per_unit is None else rec.mv_per_unit)
        context = rec.first + np.round(position / scale).astype(np.int64)
        lo, hi = rec.bounds
        own = (context >= lo) & (context < hi)
        anchor = context[own]
        label = np.full(len(anchor), "", dtype=object)
        symbol = np.full(len(anchor), "", dtype=object)
        agreement = None
        if self.reference is not None:
            agreement = self._match(rec, anchor, label, symbol)
        return Segments(anchor, label, symbol, beats=context, position=position[own], beats_position=position,
                        agreement=agreement)

    def _match(self, rec: RecordInput, anchor: np.ndarray, label: np.ndarray, symbol: np.ndarray) -> Agreement:
        """Fill ``label``/``symbol`` of the detections ``anchor`` from the reference; the detector's figures.

        Only beats and detections inside the scoreable zone (where a model window fits in the record) count.
        """
        from .detect import match_beats

        # The whole record's reference beats; a reference aligned to the detector's fiducial points gets the
        # signal where it starts with the record (a piece's margins are not the whole lead: it then says so).
        whole = rec.signal if rec.first == 0 and rec.span is None else None
        ref = self.reference.segments(RecordInput(rec.record, rec.base, rec.fs, rec.sig_len, whole))
        lo, hi = rec.bounds
        zlo, zhi = self._zone(rec)
        span = (ref.anchor >= lo) & (ref.anchor < hi)
        sel = span & (ref.anchor >= zlo) & (ref.anchor < zhi)
        inside = np.flatnonzero((anchor >= zlo) & (anchor < zhi))
        m = match_beats(ref.anchor[sel], anchor[inside], rec.fs, self.tolerance_s)
        label[inside[m.det_index]] = ref.label[sel][m.ref_index]
        symbol[inside[m.det_index]] = ref.symbol[sel][m.ref_index]
        return Agreement(m.n_ref, m.tp, m.n_ref - m.tp, m.n_det - m.tp, int(span.sum() - sel.sum()))

    def _zone(self, rec: RecordInput) -> tuple[int, int]:
        """Record samples ``[lo, hi)`` where a beat's window always fits inside the record (at ``rec.fs``).

        A beat nearer an end than its window's half-width is never scored, whoever found it; one sample of
        slack on each side covers the rounding of the resampling to the model's rate.
        """
        if self.spec is None:
            before, after = self.window
            return int(np.ceil(before * rec.fs)) + 1, rec.sig_len - int(np.ceil(after * rec.fs)) - 1
        scale = rec.fs / self.spec.fs
        return (int(np.ceil(self.spec.n_before * scale)) + 1,
                rec.sig_len - int(np.ceil(self.spec.n_after * scale)) - 1)


_LABEL_SOURCES: dict[str, type] = {}
LABEL_SOURCES: Mapping[str, type] = MappingProxyType(_LABEL_SOURCES)  #: kind -> label source class


#: What every label source has (``LabelSource``): checked when one is registered, so a source that some
#: caller needs a member of cannot be registered without it.
LABEL_SOURCE_MEMBERS = ("task", "anchor_kind", "pad", "window", "annotators", "classes", "segments", "describe",
                        "from_database")


def register_label_source(kind: str, cls: type) -> None:
    """Make ``cls`` (a ``LabelSource``) known under ``kind``, the name stores record in ``label_source``.

    Raises
    ------
    TypeError
        ``cls`` lacks a member of the protocol (``LABEL_SOURCE_MEMBERS``).
    ValueError
        Another class is registered under ``kind``.
    """
    missing = [m for m in LABEL_SOURCE_MEMBERS if not hasattr(cls, m)]
    if missing:
        raise TypeError(f"label source {kind!r} ({cls.__name__}) lacks {', '.join(missing)} of the LabelSource "
                        "protocol")
    if kind in _LABEL_SOURCES and _LABEL_SOURCES[kind] is not cls:
        raise ValueError(f"label source {kind!r} is already registered")
    _LABEL_SOURCES[kind] = cls


def load_table(labels: Any, source: Any, cache: Path, policy: Any) -> Any:
    """``labels`` with its table read from ``source`` (a ``RecordSource``), for label sources that have one.

    Raises
    ------
    PipelineError
        The table is missing or malformed: a problem of the job, not of one record.
    """
    if not hasattr(labels, "load"):
        return labels
    from .errors import PipelineError

    try:
        text = source.fetch_file(labels.file, cache, policy).read_text(encoding="utf-8-sig")
    except (PipelineError, OSError, ValueError) as exc:
        raise PipelineError(f"{source.description}: cannot read the label table {labels.file}: {exc}") from None
    try:
        return labels.load(text)
    except ValueError as exc:
        raise PipelineError(f"{source.description}: {exc}") from None


def orphan_labels(labels: Any, records: Sequence[str]) -> dict[str, str]:
    """Records a label table names that are not among ``records``: ``{record: "<stage>: <cause>"}``."""
    have = {r.rsplit("/", 1)[-1] for r in records}
    named = getattr(labels, "labelled_records", ())
    return {r: f"labels: {labels.file} labels {r} ({labels.table[r]}), but the source has no such recording"
            for r in named if r not in have}


def label_source_for(db: Any, config: Any) -> Any:
    """The label source a database entry names (``db.labels``), built from it and a ``PreprocessConfig``."""
    try:
        cls = LABEL_SOURCES[db.labels]
    except KeyError:
        raise ValueError(f"{db.name}: unknown label source {db.labels!r} (known: {', '.join(LABEL_SOURCES)})") from None
    return cls.from_database(db, config)


for _kind, _cls in (("beat-annotations", BeatAnnotations), ("detected-beats", DetectedBeats),
                    ("rhythm-annotations", RhythmAnnotations), ("record-table", RecordLabelTable)):
    register_label_source(_kind, _cls)
