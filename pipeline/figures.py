"""Figures of a store, read from it and from its records: what ``ecg-pipeline plot`` and the notebooks show.

``pipeline.plots`` draws arrays it is given; here they are read first: a spectrogram store
through ``store.open_dataset``, a scores store through ``scores.open_scores`` and
``scores.record_view``, the records' samples again through ``extract.read_strip`` and
``extract.segment_waveforms`` (from the store's own source or input, or from ``input``).

* ``gallery``: stored spectrograms per class, each beside its waveform;
* ``labelled_strip``: an ECG strip of a spectrogram store's record, its segments marked by label;
* ``scored_record``: a scores store's record: its overview and an ECG strip with the scorer's classes.

Everything a user can get wrong (an unknown record, a time outside it) raises
``PipelineError`` with one clear line before anything is drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import extract, plots, scores, sources
from .download import cache_root
from .errors import PipelineError, RecordError

log = logging.getLogger(__name__)


def _check_span(start_s: float | None, seconds: float | None, record: str, duration_s: float) -> None:
    """Refuse a strip that starts outside the record or has no length, in the words of ``plot``'s options."""
    if start_s is not None and not 0 <= start_s < duration_s:
        raise PipelineError(f"--start {start_s:g} s is outside record {record} (0 to {duration_s:.1f} s)")
    if seconds is not None and seconds <= 0:
        raise PipelineError(f"--seconds must be positive (got {seconds:g})")


def _source(description: str | None, what: str) -> sources.RecordSource:
    """The records' source a scores store names (``what``: how the error message names it)."""
    try:
        return sources.resolve_source(description)
    except PipelineError as exc:
        raise PipelineError(f"cannot read the records' samples from {what} ({exc}); pass --input") from None


@dataclass
class RecordFigures:
    """The figures of one scored record."""

    record: str
    start_s: float  #: where the strip starts
    overview: Any
    strip: Any


def scored_record(store: str, record: str | None = None, *, start_s: float | None = None,
                  seconds: float | None = None, input: str | None = None,
                  cache_dir: str | None = None, storage_options: Mapping[str, Any] | None = None) -> RecordFigures:
    """The overview and the ECG strip of one record of a scores store.

    Parameters
    ----------
    record
        None: the first record scored.
    start_s, seconds
        The strip (default: 10 s of beats, or 90 s of rhythm windows, starting shortly before the
        first ectopic beat or non-N window).
    input
        Where the record's samples are read from (default: the scoring job's ``--input``).
    """
    ds = scores.open_scores(store, require_complete=False, storage_options=storage_options)
    names = scores.record_names(ds)
    if record is None:
        ok = [r for r in names if str(ds["record_status"].values[names.index(r)]) == "ok"]
        if not ok:
            raise PipelineError(f"{store} holds no scored record")
        record = ok[0]
        log.info("no record given: drawing %s (records: %s)", record, ", ".join(names[:8]))
    view = scores.record_view(ds, record)  # KeyError -> one line naming the records
    if view.status != "ok":
        raise PipelineError(f"record {record} was not scored ({view.error})")
    _check_span(start_s, seconds, record, view.duration_s)
    rhythm = view.task == "rhythm"
    a = ds.attrs
    seconds = seconds or (90.0 if rhythm else 10.0)
    start = start_s if start_s is not None else _first_interesting(view, seconds)
    source = _source(input or a.get("input"), input or f"the store's input {a.get('input')!r}")
    reference_file = str(ds["record_reference"].values[names.index(record)]) if "record_reference" in ds else ""
    try:
        strip = extract.read_strip(source, record, start, seconds, lead=view.lead or None,
                                   annotator=reference_file or None, cache=cache_root(cache_dir))
    except (RecordError, ValueError) as exc:
        raise PipelineError(f"strip of record {record}: {exc}") from None
    missed = None
    if not rhythm and strip.ann_sample.size:
        missed = _missed_reference(strip, view, a.get("label_map") or None,
                                   float((a.get("config") or {}).get("match_tolerance_s", 0.15)))
    fig = plots.ecg_strip(strip, anchor=view.anchor, predicted=view.predicted, classes=view.classes, task=view.task,
                          reference=view.reference, window_s=float(a.get("window_s", 30)) if rhythm else None,
                          reference_beats=missed)
    return RecordFigures(record, float(start), plots.scores_overview(view), fig)


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
    from .detect import match_beats
    from .labels import AAMI_EC57, label_beats

    beats = label_beats(strip.ann_sample, strip.ann_symbol, label_map or AAMI_EC57, "Q")
    m = match_beats(beats.sample, view.anchor, view.fs, tolerance_s)
    missed = np.setdiff1d(np.arange(beats.sample.size), m.ref_index)
    return beats.sample[missed], [str(c) for c in beats.label[missed]]


def _store_source(attrs, input: str | None) -> sources.RecordSource:
    """Where a spectrogram store's records are: its database in the PhysioNet-style tree ``input`` (as
    ``preprocess --source`` takes it), or in the tree the store was made from."""
    from .databases import get_database

    try:
        return sources.database_source(get_database(attrs["database"]), input or attrs.get("source") or None,
                                       attrs.get("database_version"))
    except (KeyError, PipelineError) as exc:
        raise PipelineError(f"cannot find the store's source ({exc}); pass --input") from None


def _record_index(ds, store: str, record: str) -> int:
    """Where ``record`` is in a spectrogram store's per-record table; an error naming the records if nowhere."""
    ids = [str(r) for r in ds["record_id"].values]
    if record not in ids:
        shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} records)" if len(ids) > 10 else "")
        raise PipelineError(f"record {record!r} is not in {store} (records: {shown})")
    return ids.index(record)


def gallery(store: str, *, record: str | None = None, per_class: int = 4, seed: int = 0, input: str | None = None,
            waveforms: bool = True, cache_dir: str | None = None, storage_options: Mapping[str, Any] | None = None,
            _span=(None, None)):
    """The spectrogram gallery of a store made by ``preprocess`` (of one ``record``, or of all).

    With ``waveforms``, each spectrogram's signal window is read again from ``input`` (default:
    the store's source); where that fails the gallery is drawn without them and a warning says why.
    """
    from .store import open_dataset

    if per_class < 1:
        raise PipelineError(f"--per-class must be at least 1 (got {per_class})")
    ds = open_dataset(store, require_complete=False, storage_options=storage_options)
    a = ds.attrs
    task = str(a.get("task", "beat"))
    classes = [str(c) for c in a.get("classes", [])]
    record_of = ds["record"].values
    selected = np.arange(ds.sizes["segment"])
    if record is not None:
        i = _record_index(ds, store, record)
        _check_span(*_span, record, float(ds["record_sig_len"].values[i]) / float(ds["record_fs"].values[i]))
        selected = np.flatnonzero(record_of == record)
    picks = plots.gallery_indices(ds["label"].values[selected], classes, per_class, seed)
    idx = np.sort(np.concatenate([selected[v] for v in picks.values()]).astype(np.int64))
    spec = a["spectrogram"]
    waveform = None
    if waveforms and idx.size:
        try:
            waveform = extract.segment_waveforms(_store_source(a, input), [str(r) for r in record_of[idx]],
                                                 ds["anchor"].values[idx], [str(x) for x in ds["lead"].values[idx]],
                                                 int(spec["n_before"]), int(spec["n_after"]), cache=cache_root(cache_dir))
        except PipelineError as exc:
            # The spectrograms are all in the store: draw them, and say why the waveforms are missing.
            log.warning("waveforms left out: %s (pass --input, or --no-waveforms)", exc)
    values = ds["spectrogram"].isel(segment=idx).values if idx.size else np.zeros((0, ds.sizes["freq"], ds.sizes["time"]))
    fs_of = dict(zip((str(r) for r in ds["record_id"].values), ds["record_fs"].values))
    caption = [f"{r} @ {float(s) / float(fs_of.get(str(r), 1.0)):.1f} s" for r, s in zip(record_of[idx], ds["anchor"].values[idx])]
    what = f"record {record}" if record else f"{ds.sizes['record_id']} records"
    return plots.spectrogram_gallery(values, ds["label"].values[idx], ds["freq"].values, ds["time"].values,
                                     classes=classes, task=task, waveform=waveform, fs=float(spec["fs"]),
                                     n_before=int(spec["n_before"]), caption=caption,
                                     title=f"{a.get('database')}: stored spectrograms per class ({what})")


def labelled_strip(store: str, record: str, start_s: float, seconds: float | None = None, *, input: str | None = None,
                   cache_dir: str | None = None, storage_options: Mapping[str, Any] | None = None):
    """An ECG strip of a spectrogram store's record with its stored segments marked by their labels."""
    from .store import open_dataset

    ds = open_dataset(store, require_complete=False, storage_options=storage_options)
    a = ds.attrs
    task = str(a.get("task", "beat"))
    i = _record_index(ds, store, record)
    _check_span(start_s, seconds, record, float(ds["record_sig_len"].values[i]) / float(ds["record_fs"].values[i]))
    mine = ds["record"].values == record
    lead = str(ds["record_lead"].values[i])
    seconds = seconds or (90.0 if task == "rhythm" else 10.0)
    try:
        strip = extract.read_strip(_store_source(a, input), record, float(start_s), seconds, lead=lead or None,
                                   cache=cache_root(cache_dir))
    except (RecordError, ValueError) as exc:
        raise PipelineError(f"strip of record {record}: {exc}") from None
    spec = a["spectrogram"]
    window = float(spec["n_before"] + spec["n_after"]) / float(spec["fs"])
    return plots.ecg_strip(strip, anchor=ds["anchor"].values[mine], predicted=ds["label"].values[mine],
                           classes=[str(c) for c in a.get("classes", [])], task=task,
                           window_s=window if task == "rhythm" else None,
                           title=f"record {record}: stored segments and their labels")

