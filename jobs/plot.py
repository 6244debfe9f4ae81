"""The plot job: figures of a spectrogram store or a scores store as PNG files (``ecg-pipeline plot``).

Wiring only: ``store.store_kind`` says what the store holds, ``pipeline.figures`` reads it
and its records and draws (``gallery``, ``labelled_strip``, ``scored_record``), and this
job names the PNG files and writes them. Everything a user can get wrong (an unknown
record, a time outside the record, a folder that is no store) is checked before any
figure is drawn and raises ``PipelineError`` with one clear line.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..pipeline.errors import PipelineError
# The figures themselves: importable from here too, where they were made before pipeline/figures.py.
from ..pipeline.figures import RecordFigures, gallery, labelled_strip, scored_record  # noqa: F401
from ..pipeline.locations import Location, locate
from ..pipeline.store import store_kind

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
        Folder the PNG files go to (created): a local path or an fsspec URL.
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
    storage_options: Mapping[str, Any] | None = None  #: fsspec options of ``store`` and ``out``


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "record"


def _save(fig, file: Location) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    file.write_bytes(buf.getvalue())
    log.info("wrote %s", file.url)
    return file.url


def _out_and_stem(request: PlotRequest) -> tuple[Location, str]:
    """The output folder and the files' stem (the store's name without ``.zarr``)."""
    name = posixpath.basename(request.store.rstrip("/").replace("\\", "/"))
    return locate(request.out, request.storage_options), _safe(posixpath.splitext(name)[0])


def run_plot(request: PlotRequest) -> list[str]:
    """Draw the figures of ``request`` into ``request.out``; return the files written.

    Every figure is drawn before the first file is written: an error leaves nothing behind.
    """
    if request.per_class < 1:
        raise PipelineError(f"--per-class must be at least 1 (got {request.per_class})")
    kind = store_kind(request.store, request.storage_options)
    return (_plot_scores if kind == "scores" else _plot_spectrograms)(request)


def _plot_scores(request: PlotRequest) -> list[str]:
    figures = scored_record(request.store, request.record, start_s=request.start_s, seconds=request.seconds,
                            input=request.input, cache_dir=request.cache_dir, storage_options=request.storage_options)
    out, stem = _out_and_stem(request)
    record, start = figures.record, figures.start_s
    return [_save(figures.overview, out.join(f"{stem}-{_safe(record)}-overview.png")),
            _save(figures.strip, out.join(f"{stem}-{_safe(record)}-strip-{start:g}s.png"))]


def _plot_spectrograms(request: PlotRequest) -> list[str]:
    out, stem = _out_and_stem(request)
    suffix = f"-{_safe(request.record)}" if request.record else ""
    if request.start_s is not None and request.record is None:
        raise PipelineError("--start draws a strip of one record: give --record too")
    figure = gallery(request.store, record=request.record, per_class=request.per_class, seed=request.seed,
                     input=request.input, waveforms=request.waveforms, cache_dir=request.cache_dir,
                     storage_options=request.storage_options, _span=(request.start_s, request.seconds))
    strip = None
    if request.record is not None and request.start_s is not None:
        strip = labelled_strip(request.store, request.record, request.start_s, request.seconds, input=request.input,
                               cache_dir=request.cache_dir, storage_options=request.storage_options)
    written = [_save(figure, out.join(f"{stem}{suffix}-gallery.png"))]
    if strip is not None:
        written.append(_save(strip, out.join(f"{stem}-{_safe(request.record)}-strip-{request.start_s:g}s.png")))
    return written
