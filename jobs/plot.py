"""The plot job: figures of a spectrogram store or a scores store as PNG files (``ecg-pipeline plot``).

Wiring only: ``store.open_dataset`` / ``scores.open_scores`` read, ``extract.read_strip``
and ``extract.segment_waveforms`` fetch samples from the records' source (the store's
own, or ``--input``), ``pipeline.plots`` draws. Everything a user can get wrong (an
unknown record, a time outside the record, a folder that is no store) is checked
before any figure is drawn and raises ``PipelineError`` with one clear line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pipeline import extract, plots, scores, sources
from ..pipeline.errors import PipelineError, RecordError, StoreError
from .common import cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlotRequest:
    """One run of ``ecg-pipeline plot``.

    Attributes
    ----------
    store
        A store of ``preprocess`` (gallery; with ``record`` and ``start_s`` also a strip of its
        labelled segments) or of ``score`` (overview and strip of one record).
    out
        Folder the PNG files go to (created).
    record
        The record to draw; None: all records (gallery), or the first scored one (scores).
    start_s, seconds
        The strip: where it starts in the record and how long it is (None: 10 s of beats,
        90 s of rhythm windows).
    input
        Where the records' samples are read from; None: the store's own source.
    per_class
        Gallery: segments per class.
    waveforms
        Gallery: draw each segment's waveform beside its spectrogram (reads the records).
    """

    store: str
    out: str = "plots"
    record: str | None = None
    start_s: float | None = None
    seconds: float | None = None
    input: str | None = None
    per_class: int = 4
    seed: int = 0
    waveforms: bool = True
    cache_dir: str | None = None


def store_kind(path: str) -> str:
    """``"scores"`` or ``"spectrograms"``; raises ``StoreError`` for anything else."""
    import zarr

    try:
        attrs = dict(zarr.open_group(path, mode="r", use_consolidated=False).attrs)
    except Exception as exc:  # noqa: BLE001 - a missing path, a plain folder, a zarr v2 store
        raise StoreError(f"{path} is not a store of ecg-pipeline ({type(exc).__name__}: {exc})") from None
    if attrs.get("kind") in (scores.KIND, "beat-scores"):
        return "scores"
    if attrs.get("package") == "ecg-pipeline" and "spectrogram" in attrs:
        return "spectrograms"
    raise StoreError(f"{path} is a Zarr group but not a store written by `ecg-pipeline preprocess` or `score`")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "record"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    log.info("wrote %s", path)
    return path


def _check_span(request: PlotRequest, record: str, duration_s: float) -> None:
    if request.start_s is not None and not 0 <= request.start_s < duration_s:
        raise PipelineError(f"--start {request.start_s:g} s is outside record {record} (0 to {duration_s:.1f} s)")
    if request.seconds is not None and request.seconds <= 0:
        raise PipelineError(f"--seconds must be positive (got {request.seconds:g})")


def _source(description: str | None, what: str) -> sources.RecordSource:
    try:
        return sources.resolve_source(description)
    except PipelineError as exc:
        raise PipelineError(f"cannot read the records' samples from {what} ({exc}); pass --input") from None


def run_plot(request: PlotRequest) -> list[Path]:
    """Draw the figures of ``request`` into ``request.out``; return the files written."""
    if request.per_class < 1:
        raise PipelineError(f"--per-class must be at least 1 (got {request.per_class})")
    kind = store_kind(request.store)
    return (_plot_scores if kind == "scores" else _plot_spectrograms)(request)


def _plot_scores(request: PlotRequest) -> list[Path]:
    ds = scores.open_scores(request.store, require_complete=False)
    names = scores.record_names(ds)
    if request.record is None:
        ok = [r for r in names if str(ds["record_status"].values[names.index(r)]) == "ok"]
        if not ok:
            raise PipelineError(f"{request.store} holds no scored record")
        record = ok[0]
        log.info("no --record given: drawing %s (records: %s)", record, ", ".join(names[:8]))
    else:
        record = request.record
    view = scores.record_view(ds, record)  # KeyError -> one line naming the records
    if view.status != "ok":
        raise PipelineError(f"record {record} was not scored ({view.error})")
    _check_span(request, record, view.duration_s)
    rhythm = view.task == "rhythm"
    out, stem = Path(request.out), _safe(Path(request.store.rstrip("/")).stem)
    written = [_save(plots.scores_overview(view), out / f"{stem}-{_safe(record)}-overview.png")]

    a = ds.attrs
    seconds = request.seconds or (90.0 if rhythm else 10.0)
    start = request.start_s if request.start_s is not None else _first_interesting(view, seconds)
    source = _source(request.input or a.get("input"), f"the store's input {a.get('input')!r}"
                     if not request.input else request.input)
    reference_file = str(ds["record_reference"].values[names.index(record)]) if "record_reference" in ds else ""
    try:
        strip = extract.read_strip(source, record, start, seconds, lead=view.lead or None,
                                   annotator=reference_file or None, cache=cache_root(request.cache_dir))
    except (RecordError, ValueError) as exc:
        raise PipelineError(f"strip of record {record}: {exc}") from None
    missed = None
    if not rhythm and strip.ann_sample.size:
        missed = _missed_reference(strip, view, a.get("label_map") or None,
                                   float((a.get("config") or {}).get("match_tolerance_s", 0.15)))
    fig = plots.ecg_strip(strip, anchor=view.anchor, predicted=view.predicted, classes=view.classes, task=view.task,
                          reference=view.reference, window_s=float(a.get("window_s", 30)) if rhythm else None,
                          reference_beats=missed)
    written.append(_save(fig, out / f"{stem}-{_safe(record)}-strip-{start:g}s.png"))
    return written


def _first_interesting(view: scores.RecordView, seconds: float) -> float:
    """Where a strip starts when no --start is given: a few seconds before the first ectopic beat, or the
    first window not of class N; else the record's start."""
    interesting = np.flatnonzero(np.isin(view.predicted, list(scores.ECTOPIC if view.task == "beat" else ("A", "O"))))
    if not interesting.size:
        return 0.0
    t = float(view.anchor[interesting[0]]) / view.fs
    return float(max(0.0, min(t - seconds / 3, view.duration_s - seconds)))


def _missed_reference(strip: extract.Strip, view: scores.RecordView, label_map, tolerance_s: float
                      ) -> tuple[np.ndarray, list[str]]:
    """Reference beats in the strip that no scored beat matched (within the detector's tolerance)."""
    from ..pipeline.detect import match_beats
    from ..pipeline.labels import AAMI_EC57, label_beats

    beats = label_beats(strip.ann_sample, strip.ann_symbol, label_map or AAMI_EC57, "Q")
    m = match_beats(beats.sample, view.anchor, view.fs, tolerance_s)
    missed = np.setdiff1d(np.arange(beats.sample.size), m.ref_index)
    return beats.sample[missed], [str(c) for c in beats.label[missed]]


def _plot_spectrograms(request: PlotRequest) -> list[Path]:
    from ..pipeline.databases import get_database
    from ..pipeline.store import open_dataset

    ds = open_dataset(request.store, require_complete=False)
    a = ds.attrs
    task = str(a.get("task", "beat"))
    classes = [str(c) for c in a.get("classes", [])]
    record_of = ds["record"].values
    selected = np.arange(ds.sizes["segment"])
    if request.record is not None:
        ids = [str(r) for r in ds["record_id"].values]
        if request.record not in ids:
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} records)" if len(ids) > 10 else "")
            raise PipelineError(f"record {request.record!r} is not in {request.store} (records: {shown})")
        i = ids.index(request.record)
        _check_span(request, request.record, float(ds["record_sig_len"].values[i]) / float(ds["record_fs"].values[i]))
        selected = np.flatnonzero(record_of == request.record)
    elif request.start_s is not None:
        raise PipelineError("--start draws a strip of one record: give --record too")
    picks = plots.gallery_indices(ds["label"].values[selected], classes, request.per_class, request.seed)
    idx = np.sort(np.concatenate([selected[v] for v in picks.values()]).astype(np.int64))
    spec = a["spectrogram"]
    source = None
    waveform = None
    if request.waveforms and idx.size:
        try:
            source = (_source(request.input, request.input) if request.input else
                      sources.database_source(get_database(a["database"]), a.get("source") or None,
                                              a.get("database_version")))
            waveform = extract.segment_waveforms(source, [str(r) for r in record_of[idx]], ds["anchor"].values[idx],
                                                 [str(x) for x in ds["lead"].values[idx]], int(spec["n_before"]),
                                                 int(spec["n_after"]), cache=cache_root(request.cache_dir))
        except (PipelineError, KeyError) as exc:
            # The spectrograms are all in the store: draw them, and say why the waveforms are missing.
            log.warning("waveforms left out: %s (pass --input, or --no-waveforms)", exc)
            waveform, source = None, None
    values = ds["spectrogram"].isel(segment=idx).values if idx.size else np.zeros((0, ds.sizes["freq"], ds.sizes["time"]))
    fs = float(spec["fs"])
    caption = [f"{r} @ {float(s) / float(f):.1f} s" for r, s, f in
               zip(record_of[idx], ds["anchor"].values[idx], _record_fs(ds, record_of[idx]))]
    what = f"record {request.record}" if request.record else f"{ds.sizes['record_id']} records"
    fig = plots.spectrogram_gallery(values, ds["label"].values[idx], ds["freq"].values, ds["time"].values,
                                    classes=classes, task=task, waveform=waveform, fs=fs, n_before=int(spec["n_before"]),
                                    caption=caption, title=f"{a.get('database')}: stored spectrograms per class ({what})")
    out, stem = Path(request.out), _safe(Path(request.store.rstrip("/")).stem)
    suffix = f"-{_safe(request.record)}" if request.record else ""
    written = [_save(fig, out / f"{stem}{suffix}-gallery.png")]
    if request.record is not None and request.start_s is not None:
        written.append(_labelled_strip(request, ds, source, task, classes, out, stem))
    return written


def _record_fs(ds, records) -> list[float]:
    fs = dict(zip((str(r) for r in ds["record_id"].values), ds["record_fs"].values))
    return [float(fs.get(str(r), 1.0)) for r in records]


def _labelled_strip(request: PlotRequest, ds, source, task: str, classes, out: Path, stem: str) -> Path:
    """A strip of a spectrogram store's record with its stored segments marked by their labels."""
    from ..pipeline.databases import get_database

    a = ds.attrs
    if source is None:
        source = (_source(request.input, request.input) if request.input else
                  sources.database_source(get_database(a["database"]), a.get("source") or None, a.get("database_version")))
    mine = ds["record"].values == request.record
    anchor, label = ds["anchor"].values[mine], ds["label"].values[mine]
    ids = [str(r) for r in ds["record_id"].values]
    lead = str(ds["record_lead"].values[ids.index(request.record)])
    seconds = request.seconds or (90.0 if task == "rhythm" else 10.0)
    try:
        strip = extract.read_strip(source, request.record, float(request.start_s), seconds, lead=lead or None,
                                   cache=cache_root(request.cache_dir))
    except (RecordError, ValueError) as exc:
        raise PipelineError(f"strip of record {request.record}: {exc}") from None
    window = float(a["spectrogram"]["n_before"] + a["spectrogram"]["n_after"]) / float(a["spectrogram"]["fs"])
    fig = plots.ecg_strip(strip, anchor=anchor, predicted=label, classes=classes, task=task,
                          window_s=window if task == "rhythm" else None,
                          title=f"record {request.record}: stored segments and their labels")
    return _save(fig, out / f"{stem}-{_safe(request.record)}-strip-{request.start_s:g}s.png")
