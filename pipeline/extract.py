"""Stage 3c: a record -> its segments and their spectrograms, the per-record work of both jobs.

``plan_record`` fetches a record through its source, reads the header and the chosen
lead once, asks the label source for anchors and labels, and keeps the anchors whose
window is usable (``segment.check_windows``): a small ``RecordPlan``, or the reason the
record failed. Where the record is not too long it also transforms the segments from
that one read (``SegmentRows``). ``chunk_contents`` turns pieces of planned records into
the rows of one store chunk: the rows computed at planning, else ``segment.spectrograms``
of a second read. For scoring, ``detected_segments`` turns a span of a
lead into detected R peaks (``labels.DetectedBeats``, matched to reference beats where the record
has them) and their model inputs, ``window_segments`` does the same for rhythm windows;
``read_strip`` and ``segment_waveforms`` read signal back for figures. Jobs call these in
Dask tasks; nothing here knows about Dask or the store's layout.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from . import download, quality, records, rr, segment, sources, template
from .errors import RecordError
from .labels import LabelSource, RecordInput
from .spectrogram import SpectrogramSpec, SpectrogramSpecError
from .timing import Timer

if TYPE_CHECKING:
    from . import labels


@dataclass(frozen=True)
class SegmentRows:
    """A record's segments, transformed when it was planned (one read of the record): they stay on the worker
    that planned it until its chunks are written (``chunk_contents``), and never travel to the job's driver."""

    spec: SpectrogramSpec  #: the spectrogram they were made with (a store at another rate cannot take them)
    spectrogram: np.ndarray  #: (n_segments, n_freq, n_time) float32
    template: np.ndarray | None = None  #: (n_segments, n_freq, n_time) float32 with a ``template_spec``

    @property
    def nbytes(self) -> int:
        return self.spectrogram.nbytes + (self.template.nbytes if self.template is not None else 0)


@dataclass(slots=True)
class RecordPlan:
    """Which segments a record contributes, or why it failed.

    A plan read from a record carries its segments' arrays (``anchor``, ``label``, ...); its ``summary``
    leaves them out and keeps their count and class counts: what the job's driver holds of each record (a
    few hundred bytes, for databases of 100,000 recordings), and what the store keeps for the next run
    (``to_json``), which reuses it for a record whose files and chunks are unchanged (``reused``).
    """

    record: str
    ok: bool = False
    error: str = ""  #: "<stage>: <cause>"
    checksum: str = ""
    digest: str = ""  #: SHA-256 over the record's file digests (content identity)
    local: sources.LocalRecord | None = None  #: where its files were, and their digests
    lead: str = ""
    lead_index: int = -1
    fs: float = 0.0
    sig_len: int = 0
    anchor: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    symbol: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    rr: np.ndarray | None = None  #: (n_segments, len(rr_spec.features)) float32 for beat segments, else None
    n_dropped_edge: int = 0
    n_dropped_invalid: int = 0
    n_dropped_unknown: int = 0
    n_unknown: int = 0
    n_nonbeat: int = 0
    quality: str = ""  #: why the record is doubtful (``quality.record_quality``), "" when nothing is to be said
    rows: SegmentRows | None = None  #: its segments when they were computed as it was planned (one pass)
    bytes_downloaded: int = 0
    signal_files: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    n_kept: int | None = None  #: a summary's segment count (its arrays are left out)
    counts: dict[str, int] | None = None  #: a summary's segments per class
    reused: bool = False  #: read back from the store (``from_json``): the record was not read this run
    store_offset: int | None = None  #: a reused plan's first segment in the store it was read from (its rows are there)

    @property
    def n_segments(self) -> int:
        if not self.ok:
            return 0
        return int(self.n_kept) if self.n_kept is not None else int(self.anchor.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Segments per class."""
        if self.counts is not None:
            return dict(self.counts)
        return {str(k): int(v) for k, v in zip(*np.unique(self.label.astype(str), return_counts=True))}

    def summary(self) -> "RecordPlan":
        """The plan without its arrays: counts instead (what the driver and the store keep)."""
        if self.n_kept is not None:
            return self
        local = None if self.local is None else replace(self.local, base=_NOWHERE)
        # The shared empty arrays and no timings: the driver holds one summary per record.
        return replace(self, anchor=_NO_ANCHORS, symbol=_NO_STRINGS, label=_NO_STRINGS, rr=None, rows=None,
                       local=local, seconds={}, n_kept=self.n_segments, counts=self.class_counts())

    def held(self) -> "RecordPlan":
        """The summary a job's driver keeps once it is saved to the store (``to_json``): without where its files
        were (``local``, ``signal_files``: only a record read again needs them, and it is read from its source),
        its repeated strings and class counts shared between records. ~0.4 kB where a summary takes ~2 kB: what
        the driver holds of each of 100,000 recordings."""
        s = self.summary()
        return replace(s, anchor=_NO_ANCHORS, symbol=_NO_STRINGS, label=_NO_STRINGS, local=None, signal_files=(),
                       seconds=_NO_SECONDS, lead=sys.intern(s.lead),
                       checksum=sys.intern(s.checksum), quality=sys.intern(s.quality), error=sys.intern(s.error),
                       counts=_shared_counts(tuple(sorted((s.counts or {}).items()))))

    def to_json(self) -> str:
        """The summary as one line of JSON (``_state/record_plan`` of the store)."""
        s = self.summary()
        d = {f.name: getattr(s, f.name) for f in fields(self) if f.name not in _NOT_STORED}
        if s.local is not None:
            d["files"] = [list(f) for f in s.local.files]
            d["annotators"] = sorted(s.local.annotators)
        d["signal_files"] = list(s.signal_files)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "RecordPlan":
        """A summary stored by ``to_json``, marked ``reused``."""
        d = json.loads(text)
        files = tuple(tuple(f) for f in d.pop("files", ()))
        annotators = frozenset(d.pop("annotators", ()))
        local = sources.LocalRecord(d["record"], Path(""), annotators, d["checksum"], files) if files else None
        return cls(**{**d, "signal_files": tuple(d["signal_files"]), "local": local, "reused": True,
                      "anchor": _NO_ANCHORS, "symbol": _NO_STRINGS, "label": _NO_STRINGS})


_NO_ANCHORS = np.zeros(0, np.int64)
_NO_STRINGS = np.zeros(0, object)
_NO_ANCHORS.flags.writeable = _NO_STRINGS.flags.writeable = False
_NO_SECONDS: dict[str, float] = {}  #: shared by held summaries (never updated: ``Counter.update`` reads it)
_NOWHERE = Path("")  #: a summary's files are not read where they were: only their digests are kept

@functools.lru_cache(maxsize=4096)
def _shared_counts(items: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """One dict for every held summary with these class counts (``class_counts`` returns a copy)."""
    return dict(items)


#: What a stored summary leaves out: arrays, where the files were on a worker, this run's figures.
_NOT_STORED = frozenset({"anchor", "symbol", "label", "rr", "rows", "local", "seconds", "bytes_downloaded", "reused",
                         "store_offset"})


def plan_record(source: sources.RecordSource, record: str, labels: LabelSource, leads: Sequence[str],
                lead_fallback: str, cache: Path, policy: download.RetryPolicy,
                rr_spec: rr.RRSpec | None = None, *,
                spec_of: Callable[[float], SpectrogramSpec] | None = None,
                template_spec: "template.TemplateSpec | None" = None, max_rows_bytes: float = 0) -> RecordPlan:
    """Fetch, read and label one record; record problems become ``plan.error``, never an exception.

    The window around each anchor is the label source's (``labels.window``, ``labels.pad``). Where the
    label source gives the record's beats and ``rr_spec`` is set, each kept segment gets its RR features
    (``rr.features_at``) from every beat of the record, the ones whose window does not fit included.

    With ``spec_of`` (the spectrogram at a sampling rate), a record whose segments take at most
    ``max_rows_bytes`` also gets them now, from the read that checked it (``plan.rows``, with the templates of
    ``template_spec``): ``chunk_contents`` then writes them without reading the record again.
    """
    plan = RecordPlan(record)
    timer = Timer()
    try:
        with timer("download"):
            # in memory: this read is the only one (an archive's members are not written out)
            local = sources.fetch_record(source, record, (), cache, policy, required=labels.annotators, in_memory=True)
        with timer("read_header"):
            header = records.read_header(local.base, record, contents=local.contents)
            lead = records.choose_lead(header, tuple(leads), lead_fallback)  # type: ignore[arg-type]
            header = header.for_lead(lead)  # the lead's own rate (several samples per frame)
        with timer("read_signal"):
            # A full read of the chosen lead finds truncated or undecodable files now, before
            # any segment is allotted to the record, and marks windows over invalid samples.
            signal = records.read_signal(local.base, header, lead, contents=local.contents)
        with timer("label"):
            segs = labels.segments(RecordInput(record, local.base, header.fs, header.sig_len, signal))
            window = segment.WindowSpec.from_seconds(*labels.window, header.fs, pad=labels.pad)  # type: ignore[arg-type]
            check = segment.check_windows(signal, segs.anchor, window)
        with timer("quality"):
            # Flagged, not refused: the annotations say what the record holds; the table says what is doubtful.
            plan.quality = quality.record_quality(
                signal, header.fs, min_seconds=sum(labels.window) if labels.pad == "none" else 0.0,
                mv_per_unit=quality.mv_per_unit(header.units_of(lead)), lead=lead.name,
                lead_fallback=lead.fallback).text
        # Unknown symbols dropped by policy are counted; kept ones are class Q already.
        plan.n_dropped_unknown = segs.n_unknown if getattr(labels, "unknown", "") == "drop" else 0
        plan.n_dropped_edge, plan.n_dropped_invalid = check.n_edge, check.n_invalid
        kept = segs.select(check.keep)
        plan.anchor, plan.symbol, plan.label = kept.anchor, kept.symbol, kept.label
        if rr_spec is not None and segs.beats is not None:
            with timer("rr"):
                plan.rr = rr.features_at(kept.anchor, segs.beats, header.fs, rr_spec, signal)
        if spec_of is not None and kept.anchor.size:
            try:
                spec = spec_of(header.fs)
            except SpectrogramSpecError:  # the configuration's fault, not the record's: the job says so once
                spec = None
            if spec is not None:
                plan.rows = _rows(signal, kept.anchor, spec, template_spec, max_rows_bytes, timer)
        plan.n_unknown, plan.n_nonbeat = segs.n_unknown, segs.n_nonbeat
        plan.lead, plan.lead_index, plan.fs, plan.sig_len = lead.name, lead.index, header.fs, header.sig_len
        plan.digest, plan.checksum, plan.bytes_downloaded = local.digest, local.checksum, local.bytes_downloaded
        plan.local = replace(local, contents=None)  # the bytes were read: the plan waits for its chunk without them
        plan.signal_files = header.files
        plan.ok = True
    except RecordError as exc:
        plan.error = f"{exc.stage}: {exc.message}"
    plan.seconds = dict(timer.seconds)
    return plan


def _rows(signal: np.ndarray, anchor: np.ndarray, spec: SpectrogramSpec,
          template_spec: "template.TemplateSpec | None", max_bytes: float, timer: Timer) -> SegmentRows | None:
    """The segments of a whole record, as ``chunk_contents`` makes them from its pieces; None above ``max_bytes``."""
    if anchor.size * spec.n_freq * spec.n_time * 4 * (1 if template_spec is None else 2) > max_bytes:
        return None
    with timer("stft"):
        s = segment.spectrograms(signal, anchor, spec)
    tmpl = None
    if template_spec is not None:
        with timer("template"):
            tmpl = template.neighbour_template(s, template_spec.beats)
    return SegmentRows(spec, s, tmpl)


@dataclass
class ChunkContents:
    """The rows of one store chunk: spectrograms, per-segment coordinates, failed records."""

    spectrogram: np.ndarray  #: (n, n_freq, n_time) float32; NaN rows for failed pieces
    coords: dict[str, np.ndarray]  #: record, anchor, label, symbol, lead
    failures: dict[str, str]  #: record -> "<stage>: <cause>"
    seconds: dict[str, float]
    rr: np.ndarray | None = None  #: (n, n_rr) float32 where the plans carry RR features
    template: np.ndarray | None = None  #: (n, n_freq, n_time) float32 with a ``template_spec``


def chunk_contents(source: sources.RecordSource, parts: Sequence[tuple[RecordPlan, int, int]],
                   spec: SpectrogramSpec, cache: Path,
                   policy: download.RetryPolicy,
                   template_spec: "template.TemplateSpec | None" = None,
                   stored: Callable[[slice], Mapping[str, np.ndarray]] | None = None,
                   rr_width: int | None = None) -> ChunkContents:
    """Spectrograms of record pieces ``(plan, first, end)`` in order; a failed piece fails its record alone.

    With ``template_spec``, also each segment's template (``template.neighbour_template``) over its
    record's segments: the piece's spectrograms are computed with the neighbours a template needs
    (``template.with_context``), so a record split over chunks gets the templates the whole record gives.

    ``stored`` (``store.read_rows`` of the store being written): the rows of a reused plan
    (``RecordPlan.store_offset``) are taken from there, as an earlier commit wrote them, not computed again.
    ``rr_width``: the store's RR features a segment (a chunk of reused pieces alone has no plan that says).
    """
    timer = Timer()
    n = sum(hi - lo for _, lo, hi in parts)
    out = np.full((n, spec.n_freq, spec.n_time), np.nan, dtype=np.float32)
    tmpl = np.full_like(out, np.nan) if template_spec is not None else None
    coords = {name: np.empty(n, dtype=object) for name in ("record", "label", "symbol", "lead")}
    coords["anchor"] = np.zeros(n, dtype=np.int64)
    n_rr = rr_width if rr_width is not None else next((p.rr.shape[1] for p, _, _ in parts if p.rr is not None), 0)
    rr_rows = np.full((n, n_rr), np.nan, np.float32) if n_rr else None
    failures: dict[str, str] = {}
    kept = [(p.store_offset + lo, p.store_offset + hi) for p, lo, hi in parts
            if p.reused and p.store_offset is not None] if stored is not None else []
    if kept:  # one read of the stored span they cover, not one per record (a chunk holds hundreds of recordings)
        with timer("reuse"):
            first = min(a for a, _ in kept)
            block = stored(slice(first, max(b for _, b in kept)))
    pos = 0
    for plan, lo, hi in parts:
        rows = slice(pos, pos + hi - lo)
        pos += hi - lo
        if kept and plan.reused and plan.store_offset is not None:
            held = slice(plan.store_offset + lo - first, plan.store_offset + hi - first)
            out[rows] = block["spectrogram"][held]
            for name in coords:
                coords[name][rows] = block[name][held]
            if tmpl is not None:
                tmpl[rows] = block["template"][held]
            if rr_rows is not None:
                rr_rows[rows] = block["rr"][held]
            continue
        anchor = plan.anchor[lo:hi]
        if rr_rows is not None and plan.rr is not None:
            rr_rows[rows] = plan.rr[lo:hi]
        coords["record"][rows] = plan.record
        coords["anchor"][rows] = anchor
        coords["symbol"][rows] = plan.symbol[lo:hi]
        coords["label"][rows] = plan.label[lo:hi]
        coords["lead"][rows] = plan.lead
        ready = plan.rows is not None and plan.rows.spec == spec and (plan.rows.template is None) == (tmpl is None)
        if ready:  # computed as the record was planned: no second read
            out[rows] = plan.rows.spectrogram[lo:hi]
            if tmpl is not None:
                tmpl[rows] = plan.rows.template[lo:hi]
            continue
        try:
            with timer("download"):
                # A marker check on the worker that planned the record; a verified fetch of the same
                # bytes on any other machine (or the record fails).
                base = source.fetch_again(plan.local, cache, policy)
            header = records.Header(plan.record, plan.fs, plan.sig_len, (), (), plan.signal_files)
            lead = records.Lead(plan.lead_index, plan.lead, False)
            a, b = (lo, hi) if tmpl is None else template.with_context(len(plan.anchor), lo, hi, template_spec.beats)
            wide = plan.anchor[a:b]
            first = int(wide[0]) - spec.n_before
            stop = int(wide[-1]) + spec.n_after
            with timer("read_signal"):
                # A padded window's real part ends with the record (segment.WindowSpec.pad).
                sig = records.read_signal(base, header, lead, first, min(stop, plan.sig_len) if spec.pad != "none"
                                          else stop)
            with timer("stft"):
                s = segment.spectrograms(sig, wide, spec, offset=first)
                out[rows] = s[lo - a:hi - a]
            if tmpl is not None:
                with timer("template"):
                    tmpl[rows] = template.neighbour_template(s, template_spec.beats)[lo - a:hi - a]
        except RecordError as exc:
            failures[plan.record] = f"{exc.stage}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - one bad record must not sink the chunk
            failures[plan.record] = f"spectrogram: {type(exc).__name__}: {exc}"
    return ChunkContents(out, coords, failures, dict(timer.seconds), rr_rows, tmpl)


@dataclass
class DetectedSegments:
    """Beats an R-peak detector found in a span of a record, cut and transformed like a store's."""

    anchor: np.ndarray  #: R peaks with a usable window (record samples at the record's rate)
    spectrogram: np.ndarray  #: (n, n_freq, n_time) float32, at the spec's rate
    detected: np.ndarray  #: every R peak the span owns, usable window or not
    n_dropped_edge: int
    n_dropped_invalid: int
    seconds: dict[str, float] = field(default_factory=dict)
    rr: np.ndarray | None = None  #: (n, len(rr_spec.features)) RR features of ``anchor``, with ``rr_spec``
    template: np.ndarray | None = None  #: (n, n_freq, n_time) templates of ``anchor``, with ``template_spec``
    #: per ``anchor``: the matched reference beat's class, "" where none (all "" without a reference)
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    agreement: "labels.Agreement | None" = None  #: the detector against the reference, where one was given
    beats: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  #: every detection in ``x``, margins too


def detected_segments(x: np.ndarray, fs: float, first: int, start: int, stop: int, spec: SpectrogramSpec,
                      detector, mv_per_unit: float | None = 1.0,
                      rr_spec: rr.RRSpec | None = None,
                      template_spec: "template.TemplateSpec | None" = None, *,
                      reference: "labels.BeatAnnotations | None" = None, tolerance_s: float = 0.150,
                      record: str = "", base: Path | None = None, sig_len: int | None = None) -> DetectedSegments:
    """Resample to ``spec.fs``, find the span's beats (``labels.DetectedBeats``), check windows, transform them.

    With ``rr_spec``, each kept beat also gets its RR features (``rr.features_at``, the function
    ``plan_record`` uses on annotated beats) in the context of every peak detected in ``x``: the span's
    margins included, so a piece of a record whose margin covers ``rr_spec.reach_s`` gets the features
    the whole record gives. With ``template_spec``, each also gets its template
    (``template.neighbour_template``, as ``chunk_contents`` makes it from annotated beats) over the
    usable detected beats, those of the margins included. With a ``reference`` (the record's beat
    annotations at ``base``), each kept beat gets the class of the reference beat it matches.

    Parameters
    ----------
    x
        The lead, record samples ``[first, first + len(x))`` at ``fs``, with margin
        around ``[start, stop)`` where the record has it (so pieces of a long record find
        the beats the whole record gives: the detector's blocks sit on the record's grid).
    detector
        ``config.DetectorSpec``.
    mv_per_unit
        Millivolts per unit of ``x`` (``quality.mv_per_unit`` of the lead's units), for the detector's
        amplitude floor; None (not a voltage) is taken as mV.
    sig_len
        The record's length (where a window fits, for the reference figures); default: ``first + len(x)``.
    """
    from . import resample
    from .labels import DetectedBeats

    timer = Timer()
    with timer("resample"):
        xm = resample.resample(x, fs, spec.fs)
    rec = RecordInput(record, base or Path("."), fs, first + len(x) if sig_len is None else sig_len, x, first=first,
                      span=(start, stop), mv_per_unit=mv_per_unit, resampled=xm)
    with timer("detect"):
        found = DetectedBeats(detector, reference, tolerance_s, spec).segments(rec)
    window = segment.WindowSpec(spec.n_before, spec.n_after)
    with timer("segment"):
        # Windows must lie inside the record; the span holds them wherever the record does.
        check = segment.check_windows(xm, found.position, window)
    kept = found.select(check.keep)
    tmpl = None
    if template_spec is None:
        with timer("stft"):
            out = segment.spectrograms(xm, kept.position, spec)
    else:
        with timer("segment"):
            own = (found.beats >= start) & (found.beats < stop)
            usable = np.flatnonzero(segment.check_windows(xm, found.beats_position, window).keep)
            pos = np.flatnonzero(own[usable])  # the span's usable beats among all usable ones (contiguous)
            a, b = (template.with_context(len(usable), int(pos[0]), int(pos[-1]) + 1, template_spec.beats)
                    if pos.size else (0, 0))
        with timer("stft"):
            wide = segment.spectrograms(xm, found.beats_position[usable[a:b]], spec)
            out = wide[pos - a]
        with timer("template"):
            tmpl = template.neighbour_template(wide, template_spec.beats)[pos - a]
    features = None
    if rr_spec is not None:
        with timer("rr"):
            features = rr.features_at(kept.anchor, found.beats, fs, rr_spec, x, first)
    return DetectedSegments(kept.anchor, out, found.anchor, check.n_edge, check.n_invalid, dict(timer.seconds),
                            features, tmpl, kept.label, found.agreement, found.beats)


@dataclass
class WindowedSegments:
    """Fixed windows of a span of a record, cut and transformed like a rhythm store's."""

    anchor: np.ndarray  #: window starts with a usable window (record samples at the record's rate)
    spectrogram: np.ndarray  #: (n, n_freq, n_time) float32, at the spec's rate
    n_dropped_invalid: int
    seconds: dict[str, float] = field(default_factory=dict)


def window_segments(x: np.ndarray, fs: float, first: int, anchor: np.ndarray, sig_len: int,
                    spec: SpectrogramSpec) -> WindowedSegments:
    """Resample to ``spec.fs`` and transform the windows starting at ``anchor``, as preprocess does for a store.

    Parameters
    ----------
    x
        The lead, record samples ``[first, first + len(x))`` at ``fs``: all of each window
        that lies in the record.
    anchor
        Window starts in record samples (``segment.window_grid``).
    sig_len
        Record length: a window longer than what is left of the record is padded (``spec.pad``).
    """
    from . import resample

    timer = Timer()
    scale = spec.fs / fs
    with timer("resample"):
        xm = resample.resample(x, fs, spec.fs)
    length = spec.n_before + spec.n_after
    # Window starts at the model's rate; rounding must not push an end-aligned window past the record.
    am = np.round((np.asarray(anchor, np.int64) - first) * scale).astype(np.int64)
    if sig_len * scale >= length:
        am = np.minimum(am, len(xm) - length)
    am = np.maximum(am, 0)
    with timer("segment"):
        check = segment.check_windows(xm, am, segment.WindowSpec(spec.n_before, spec.n_after, spec.pad))  # type: ignore[arg-type]
    with timer("stft"):
        out = segment.spectrograms(xm, am[check.keep], spec)
    return WindowedSegments(np.asarray(anchor, np.int64)[check.keep], out, check.n_invalid, dict(timer.seconds))


@dataclass(frozen=True)
class Strip:
    """A stretch of one lead of a record, with the reference annotations inside it (for figures)."""

    record: str
    lead: str
    fs: float
    start: int  #: first sample (record samples at ``fs``)
    signal: np.ndarray  #: float32, physical units
    units: str = "mV"
    sig_len: int = 0
    ann_sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  #: reference beats in the stretch
    ann_symbol: np.ndarray = field(default_factory=lambda: np.zeros(0, object))

    @property
    def times(self) -> np.ndarray:
        """Seconds from the record's start, one per sample."""
        return (self.start + np.arange(self.signal.shape[0])) / self.fs


def read_strip(source: sources.RecordSource, record: str, start_s: float, seconds: float, *,
               lead: str | None = None, leads: Sequence[str] = (), annotator: str | None = None,
               cache: Path = Path("."), policy: download.RetryPolicy = download.RetryPolicy()) -> Strip:
    """Samples ``[start_s, start_s + seconds)`` of one lead of ``record`` (cut at the record's end).

    Parameters
    ----------
    lead
        The signal to read, by name (a scores store's ``record_lead``); else the first of
        ``leads`` the record has, else its first signal.
    annotator
        Annotation file extension (``"atr"``) whose beats inside the stretch come with it,
        where the record has one.

    Raises
    ------
    RecordError
        The record cannot be fetched or read, or has no such lead.
    ValueError
        ``start_s`` lies outside the record, or ``seconds`` is not positive.
    """
    if seconds <= 0:
        raise ValueError(f"the strip length must be positive (got {seconds} s)")
    local = sources.fetch_record(source, record, (annotator,) if annotator else (), cache, policy)
    header = records.read_header(local.base, record, contents=local.contents)
    chosen = records.choose_lead(header, (lead,) if lead else tuple(leads), "fail" if lead else "first")
    header = header.for_lead(chosen)  # the lead's own rate (several samples per frame)
    duration = header.sig_len / header.fs
    if not 0 <= start_s < duration:
        raise ValueError(f"--start {start_s:g} s is outside record {record} (0 to {duration:.1f} s)")
    first = int(round(start_s * header.fs))
    stop = min(header.sig_len, first + max(int(round(seconds * header.fs)), 1))
    signal = records.read_signal(local.base, header, chosen, first, stop, contents=local.contents)
    ann_sample, ann_symbol = np.zeros(0, np.int64), np.zeros(0, object)
    if annotator and local.has(annotator):
        ann = records.read_annotations(local.base, record, annotator, header.fs)
        inside = (ann.sample >= first) & (ann.sample < stop)
        ann_sample, ann_symbol = ann.sample[inside], ann.symbol[inside]
    return Strip(record, chosen.name, header.fs, first, signal, header.units_of(chosen), header.sig_len,
                 ann_sample, ann_symbol)


def segment_waveforms(source: sources.RecordSource, record: Sequence[str], anchor: Sequence[int],
                      lead: Sequence[str], n_before: int, n_after: int, *, cache: Path = Path("."),
                      policy: download.RetryPolicy = download.RetryPolicy()) -> np.ndarray:
    """The signal windows ``[anchor - n_before, anchor + n_after)`` of store segments, each record read once.

    Returns an ``(n, n_before + n_after)`` float32 array at the records' own rate (a store's
    anchors are record samples); samples outside a record are NaN.

    Raises
    ------
    RecordError
        A record cannot be fetched or read.
    """
    out = np.full((len(record), n_before + n_after), np.nan, dtype=np.float32)
    for name in dict.fromkeys(record):
        rows = [i for i, r in enumerate(record) if r == name]
        local = sources.fetch_record(source, name, (), cache, policy)
        header = records.read_header(local.base, name, contents=local.contents)
        for want in dict.fromkeys(lead[i] for i in rows):
            signal = records.read_signal(local.base, header, records.choose_lead(header, (want,)),
                                         contents=local.contents)
            for i in (i for i in rows if lead[i] == want):
                lo = int(anchor[i]) - n_before
                a, b = max(lo, 0), min(lo + n_before + n_after, len(signal))
                if a < b:
                    out[i, a - lo:b - lo] = signal[a:b]
    return out
