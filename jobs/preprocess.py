"""The preprocess job: a PhysioNet database -> labelled spectrograms in a Zarr store.

Two phases of Dask tasks, composed from the stages in ``pipeline``:

0. the database's record source (``sources``) is listed on a worker;
1. ``plan_records`` (one task per batch of records, one record a task for a few long
   ones: ``plan_batch_size``): ``extract.plan_record`` fetches each record
   through the source, reads its header and chosen lead, asks the label source for
   anchors and labels, and keeps the usable windows. It returns a small
   ``RecordPlan``; nothing is written yet.
2. ``write_chunk`` (one task per Zarr chunk of segments): ``extract.chunk_contents``
   computes the rows of the chunk (``segment.spectrograms`` per record piece), and
   ``store.write_chunk`` writes it whole. Tasks own whole chunks, so no two ever write
   the same one.

The driver (``run_preprocess``) lays the records out from the plans, compares each
chunk's fingerprint with what the store holds, and only submits the chunks that
differ: a killed or partly failed job resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from distributed import Client, as_completed

from .. import pipeline
from .common import NoProgress, ProgressBar, Timer, cache_root, prepare_source
from ..pipeline import download, extract, labels, lease, sources, spectrogram, store
from ..pipeline.extract import RecordPlan
from ..pipeline.config import PreprocessConfig, load_config
from ..pipeline.databases import Database, get_database
from ..pipeline.errors import DownloadError, PipelineError
from ..pipeline.labels import LABEL_MAPS, LabelSource
from ..pipeline.reports import PreprocessReport, RecordOutcome, record_outcomes, record_table  # noqa: F401 - RecordOutcome: still importable here

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessRequest:
    """One run of the preprocess job.

    Attributes
    ----------
    db
        Database slug (a key of ``pipeline.databases.DATABASES``).
    out
        Store path or fsspec URL.
    version
        Database version; None takes the registry's default.
    source
        Root of a PhysioNet-style file tree (fsspec URL or path).
    records
        Subset of records; None takes the database's ``RECORDS`` file.
    cache_dir
        Local download cache on the workers; None takes ``jobs.common.default_cache_dir()`` there.
    """

    db: str
    out: str
    version: str | None = None
    source: str = download.DEFAULT_SOURCE
    records: tuple[str, ...] | None = None
    cache_dir: str | None = None
    config: PreprocessConfig | None = None  #: None: the defaults, with the database's own (``preprocess_defaults``)
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None

    @property
    def database(self) -> Database:
        return get_database(self.db)

    @property
    def db_version(self) -> str:
        return self.version or self.database.version


@dataclass(frozen=True)
class TaskContext:
    """What every task needs; picklable, scattered once (a label table makes it large), like the record source."""

    db: Database
    labels: LabelSource
    cache_dir: str | None
    config: PreprocessConfig
    out: str
    storage_options: Mapping[str, Any] | None

    @property
    def policy(self) -> download.RetryPolicy:
        return self.config.download  # the download section is the retry policy

    def cache(self) -> Path:
        return cache_root(self.cache_dir)

    def leads(self) -> tuple[str, ...]:
        return self.config.leads or self.db.leads

    def rr_spec(self):
        """The RR features of beat segments (``config.rr``); None for stores whose segments are not beats."""
        return self.config.rr.spec() if self.labels.task == "beat" else None

    def template_spec(self):
        """The neighbour templates of beat segments (``config.template``); None for other stores or beats 0."""
        return self.config.template.spec() if self.labels.task == "beat" else None


def plan_record(ctx: TaskContext, source: sources.RecordSource, record: str) -> RecordPlan:
    """Phase 1 for one record: ``extract.plan_record`` with this job's settings."""
    return extract.plan_record(source, record, ctx.labels, ctx.leads(), ctx.config.lead_fallback, ctx.cache(),
                               ctx.policy, ctx.rr_spec())


def plan_records(ctx: TaskContext, source: sources.RecordSource, records: list[str]) -> list[RecordPlan]:
    """Phase 1 for a batch of records (a task): short recordings are planned many to a task, so that the
    scheduler's per-task cost does not dominate (8,528 Challenge 2017 recordings of ~1 ms each)."""
    return [plan_record(ctx, source, r) for r in records]


@dataclass
class ChunkResult:
    """Phase-2 result for one chunk."""

    k: int
    written: bool
    failures: dict[str, str]  #: record -> error
    seconds: dict[str, float]
    n_segments: int


def write_chunk(
    ctx: TaskContext,
    source: sources.RecordSource,
    writer: store.ChunkWriter,
    k: int,
    parts: list[tuple[list[RecordPlan], int, int, int]],
    segs: slice,
    fingerprint: str,
    spec: spectrogram.SpectrogramSpec,
) -> ChunkResult:
    """Phase 2 for one chunk (a task): its rows (``extract.chunk_contents``), written whole.

    ``parts``: ``(plan batch, index of the record's plan in it, first, end)`` per record piece.
    """
    pieces = [(batch[j], lo, hi) for batch, j, lo, hi in parts]
    rows = extract.chunk_contents(source, pieces, spec, ctx.cache(), ctx.policy, ctx.template_spec())
    timer = Timer()
    with timer("write"):
        # A chunk with a failed piece is written (so the store stays readable) but keeps no
        # fingerprint, so the next run computes it again.
        store.write_chunk(writer, k, segs, rows.spectrogram, rows.coords, "" if rows.failures else fingerprint,
                          rr=rows.rr, template=rows.template)
    return ChunkResult(k, not rows.failures, rows.failures, {**rows.seconds, **timer.seconds}, segs.stop - segs.start)


def run_preprocess(
    request: PreprocessRequest,
    client: Client,
    progress: Callable[[str, int], ProgressBar] | None = None,
) -> PreprocessReport:
    """Run the job on ``client``'s cluster and return its report.

    Record problems never raise: they are in the report and the store's per-record
    table. Raises only for problems with the job as a whole (unknown database, no
    record list, a store that cannot be resumed, a store another live job writes:
    ``lease.StoreBusy``). The store's lease (``pipeline.lease``) is held throughout.
    """
    with lease.hold(request.out, "preprocess", storage_options=request.storage_options):
        return _run_preprocess(request, client, progress)


def _run_preprocess(request: PreprocessRequest, client: Client,
                    progress: Callable[[str, int], ProgressBar] | None) -> PreprocessReport:
    t0 = time.perf_counter()
    progress = progress or (lambda desc, total: NoProgress())
    db, version = request.database, request.db_version
    config = request.config or load_config(None, dict(db.preprocess_defaults))
    try:
        label_source = labels.label_source_for(db, config)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if not label_source.task == "rhythm" and not db.annotator:
        raise PipelineError(f"{db.name}: its entry names beat annotations but no annotation file")
    phase: dict[str, float] = {}

    with _phase(phase, "manifest"):  # what the source holds (on a worker: the driver may not reach the source)
        source = sources.database_source(db, request.source, version,
                                         require_checksums=config.download.require_checksums)
        listing, label_source = _list_source(client, source, label_source, request, config.download)
        names = request.records or listing.records
        if not names:
            raise DownloadError(f"{source.description}: no records (no RECORDS file, no .hea files); pass --records")
        # Labels whose recording the source lacks are reported as failed records (a full run only).
        unlabelled = {} if request.records else labels.orphan_labels(label_source, names)
        names = tuple(names) + tuple(unlabelled)
    ctx = TaskContext(db, label_source, request.cache_dir, config, request.out, request.storage_options)
    with _phase(phase, "plan"):
        [src, ctx_f] = client.scatter([listing.source, ctx], broadcast=True)
        plans, plan_futures = _plan_records(client, ctx_f, src, [n for n in names if n not in unlabelled], progress)
        plans.update({r: RecordPlan(r, error=e) for r, e in unlabelled.items()})

    # Lay out the store: records in the source's order; its sampling rate is the first good record's.
    fs_store = next((plans[r].fs for r in names if plans[r].ok), 0.0)
    for r in names:
        p = plans[r]
        if p.ok and p.fs != fs_store:
            p.ok, p.error = False, f"header: sampling frequency {p.fs} Hz differs from the store's {fs_store} Hz"
    spec = spectrogram.spec_from_config(config, fs_store, label_source) if fs_store else None
    rr_spec = ctx.rr_spec()
    layout = store.Layout(tuple(names), tuple(plans[r].n_segments for r in names), spec.n_freq if spec else 0,
                          spec.n_time if spec else 0, config.store.chunk_size,
                          len(rr_spec.features) if rr_spec else 0, ctx.template_spec() is not None)
    coords = {"freq": spec.freqs() if spec else np.zeros(0, np.float32),
              "time": spec.times() if spec else np.zeros(0, np.float32),
              "rr_feature": np.array(rr_spec.features if rr_spec else (), dtype=object)}
    held = store.prepare(request.out, layout, _store_attrs(request, config, label_source, spec, listing), config.store.dtype,
                         coords=coords, compressor=config.store.compressor, overwrite=request.overwrite,
                         storage_options=request.storage_options)
    # The table says "pending" until phase 2 is done, so an interrupted store still opens
    # (``open_dataset(..., require_complete=False)``) and shows where it stopped.
    store.write_record_table(request.out, record_table(record_outcomes(names, layout, plans, {}, final=False)),
                             request.storage_options)

    with _phase(phase, "write"):
        written, skipped, failures, stage_s = _write_chunks(client, ctx, ctx_f, src, layout, plans, plan_futures,
                                                            held, spec, progress)

    # The per-record table and the final attributes (driver only: one writer).
    outcomes = record_outcomes(names, layout, plans, failures, final=True)
    store.write_record_table(request.out, record_table(outcomes), request.storage_options)
    # Counts of what was written: a record whose chunk failed (a full disk) is not counted, whatever it planned.
    written_ok = {o.record for o in outcomes if o.status == "ok"}
    per_class = Counter(c for r in names if r in written_ok for c in plans[r].label.tolist())
    segments_per_class = {c: int(per_class.get(c, 0)) for c in label_source.classes}
    store.finish(request.out, {"complete": written + skipped == layout.n_chunks,
                               "segments_per_class": segments_per_class,
                               "n_failed_records": sum(o.status != "ok" for o in outcomes)}, request.storage_options)
    return PreprocessReport(
        out=request.out, database=db.name, version=version, records=outcomes, segments_per_class=segments_per_class,
        chunks_total=layout.n_chunks, chunks_written=written, chunks_skipped=skipped,
        missing_source_files=listing.missing, listing_error=listing.listing_error, wall_s=time.perf_counter() - t0,
        phase_s=phase, stage_s=dict(stage_s), bytes_downloaded=sum(p.bytes_downloaded for p in plans.values()),
    )


@contextlib.contextmanager
def _phase(phase: dict[str, float], name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        phase[name] = time.perf_counter() - t


def _list_source(client: Client, source: sources.RecordSource, label_source: LabelSource,
                 request: PreprocessRequest, policy: download.RetryPolicy) -> tuple[sources.Listing, LabelSource]:
    """The source's listing and the label source with its table read (``labels.load_table``), on a worker."""
    listing: sources.Listing
    listing, label_source = client.submit(_prepare, source, label_source, request.cache_dir, policy,
                                          pure=False).result()
    if listing.missing:
        log.warning("source lacks %d file(s) that SHA256SUMS.txt lists: %s", len(listing.missing),
                    ", ".join(listing.missing))
    if not listing.has_checksums:
        log.warning("%s has no SHA256SUMS.txt at the source: files cannot be verified", source.description)
    return listing, label_source


def _prepare(source: sources.RecordSource, label_source: LabelSource, cache_dir: str | None,
             policy: download.RetryPolicy) -> tuple[sources.Listing, LabelSource]:
    """Task: list the source and read the label table it holds, if the label source has one."""
    listing = prepare_source(source, cache_dir, policy)
    return listing, labels.load_table(label_source, listing.source, cache_root(cache_dir), policy)


def plan_batch_size(n_records: int, n_workers: int) -> int:
    """Records per plan task: one for a few long records (MIT-BIH: 48), up to 64 when there are thousands,
    keeping at least 16 tasks per worker for balance."""
    return int(min(64, max(1, n_records // (16 * max(n_workers, 1)))))


def _plan_records(client: Client, ctx: TaskContext, src, names, progress) -> tuple[dict[str, RecordPlan], dict]:
    """Phase 1: ``plan_records`` tasks over batches of records; a task that dies fails its records alone.

    Returns the plans and, per record, ``(future of its batch, index in it)``: phase-2 tasks take that
    future, so Dask runs them where the records' files were fetched.
    """
    names = list(names)
    size = plan_batch_size(len(names), len(client.nthreads()))
    batches = [names[i:i + size] for i in range(0, len(names), size)]
    futures = {client.submit(plan_records, ctx, src, b, key=f"plan-{b[0]}-{len(b)}-{os.urandom(4).hex()}",
                             retries=1): b for b in batches}
    plans: dict[str, RecordPlan] = {}
    plan_futures: dict[str, Any] = {}
    bar = progress("download + plan", len(names))
    for fut in as_completed(futures):
        batch = futures[fut]
        try:
            for j, plan in enumerate(fut.result()):
                plans[plan.record], plan_futures[plan.record] = plan, (fut, j)
        except Exception as exc:  # noqa: BLE001 - a worker died twice or a bug: the batch's records fail
            plans.update({r: RecordPlan(r, error=f"task: {type(exc).__name__}: {exc}") for r in batch})
        bar.update(len(batch))
    bar.close()
    return plans, plan_futures


def _store_attrs(request: PreprocessRequest, config: PreprocessConfig, labels: LabelSource,
                 spec: spectrogram.SpectrogramSpec | None, listing: sources.Listing) -> dict[str, Any]:
    db = request.database
    extra: dict[str, Any] = {"label_map": dict(LABEL_MAPS[db.label_map])} if db.label_map else {}
    if db.challenge_classes:
        extra["challenge_classes"] = list(db.challenge_classes)
    return {
        "schema_version": store.store_schema()["schema_version"],
        "package": "ecg-pipeline",
        "package_version": pipeline.__version__,
        "database": db.name,
        "database_version": request.db_version,
        "database_title": db.title,
        "citation": db.citation,
        "source": request.source,
        "task": labels.task,
        "anchor_kind": labels.anchor_kind,
        "label_source": labels.describe(),
        **extra,
        "classes": list(labels.classes),
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(labels.task),
        "spectrogram": spec.attrs() if spec else {},
        **({"rr": config.rr.spec().attrs()} if labels.task == "beat" else {}),
        **({"template": config.template.spec().attrs()} if labels.task == "beat" and config.template.beats else {}),
        "missing_source_files": list(listing.missing),
    }


def _write_chunks(client: Client, ctx: TaskContext, ctx_f, src, layout: store.Layout,
                  plans: Mapping[str, RecordPlan], plan_futures: Mapping[str, Any], held: list[str], spec, progress):
    """Phase 2: a ``write_chunk`` task for each chunk whose fingerprint differs from what the store holds."""
    names = layout.records
    config_fp = ctx.config.fingerprint(ctx.labels.task)
    # The arrays are opened once here and shipped to the tasks with their metadata.
    [arrays] = client.scatter([store.chunk_writer(ctx.out, ctx.storage_options)], broadcast=True)
    chunk_futures = {}
    skipped = 0
    for k in range(layout.n_chunks):
        pieces = layout.chunk_parts(k)
        fp = store.chunk_fingerprint(config_fp, [(names[i], plans[names[i]].digest, lo, hi) for i, lo, hi in pieces])
        if held[k] == fp:
            skipped += 1
            continue
        parts = [(*plan_futures[names[i]], lo, hi) for i, lo, hi in pieces]
        fut = client.submit(write_chunk, ctx_f, src, arrays, k, parts, layout.chunk_slice(k), fp, spec,
                            key=f"chunk-{k}-{os.urandom(4).hex()}", retries=1)
        chunk_futures[fut] = (k, [names[i] for i, _, _ in pieces])
    failures: dict[str, str] = {}
    stage_s: Counter[str] = Counter()
    for p in plans.values():
        stage_s.update(p.seconds)
    written = 0
    bar = progress("spectrograms -> zarr", len(chunk_futures))
    for fut in as_completed(chunk_futures):
        k, recs = chunk_futures[fut]
        try:
            res: ChunkResult = fut.result()
            written += res.written
            failures.update(res.failures)
            stage_s.update(res.seconds)
        except Exception as exc:  # noqa: BLE001
            for r in recs:
                failures.setdefault(r, f"write: chunk {k}: {type(exc).__name__}: {exc}")
        bar.update(1)
    bar.close()
    return written, skipped, failures, stage_s
