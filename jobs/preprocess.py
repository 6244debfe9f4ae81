"""The preprocess job: a PhysioNet database -> labelled spectrograms in a Zarr store.

Wiring only: two phases of Dask tasks whose bodies are in ``pipeline.preprocessing``:

0. the database's record source (``sources``) is listed on a worker (``prepare_listing``);
1. ``plan_records`` (one task per batch of records, one record a task for a few long
   ones: ``plan_batch_size``): ``extract.plan_record`` fetches each record
   through the source, reads its header and chosen lead, asks the label source for
   anchors and labels, and keeps the usable windows. It returns a small
   ``RecordPlan``; nothing is written yet.
2. ``write_chunk`` (one task per Zarr chunk of segments): ``extract.chunk_contents``
   computes the rows of the chunk (``segment.spectrograms`` per record piece), and
   ``store.write_chunk`` writes it whole. Tasks own whole chunks, so no two ever write
   the same one.

The driver (``run_preprocess``) lays the records out from the plans
(``preprocessing.lay_out``), compares each chunk's fingerprint with what the store
holds, and only submits the chunks that differ: a killed or partly failed job resumes
where it stopped. The report and the per-record table come from ``pipeline.reports``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from distributed import Client, as_completed

from .common import NoProgress, ProgressBar
from ..pipeline import download, labels, lease, preprocessing, sources, store
from ..pipeline.cluster import on_worker
from ..pipeline.config import PreprocessConfig, load_config
from ..pipeline.databases import Database, get_database
from ..pipeline.errors import DownloadError, PipelineError
from ..pipeline.extract import RecordPlan
from ..pipeline.labels import LabelSource
from ..pipeline.preprocessing import TaskContext
# RecordOutcome: still importable from here, its home before pipeline/reports.py
from ..pipeline.reports import PreprocessReport, RecordOutcome, record_outcomes, record_table  # noqa: F401

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
        Local download cache on the workers; None takes ``download.default_cache_dir()`` there.
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
    if not all(label_source.annotators):  # a source that reads annotation files, of no named kind
        raise PipelineError(f"{db.name}: its entry names {db.labels} labels but no annotation file")
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

    laid = preprocessing.lay_out(ctx, names, plans)
    layout, spec = laid.layout, laid.spec
    attrs = preprocessing.store_attrs(ctx, version, request.source, spec, listing.missing)
    held = store.prepare(request.out, layout, attrs, config.store.dtype, coords=laid.coords,
                         compressor=config.store.compressor, overwrite=request.overwrite,
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
    per_class = preprocessing.segments_per_class(plans, outcomes, label_source.classes)
    store.finish(request.out, {"complete": written + skipped == layout.n_chunks,
                               "segments_per_class": per_class,
                               "n_failed_records": sum(o.status != "ok" for o in outcomes)}, request.storage_options)
    return PreprocessReport(
        out=request.out, database=db.name, version=version, records=outcomes, segments_per_class=per_class,
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
    listing, label_source = client.submit(on_worker, preprocessing.prepare_listing, source, label_source,
                                          request.cache_dir, policy, pure=False).result()
    if listing.missing:
        log.warning("source lacks %d file(s) that SHA256SUMS.txt lists: %s", len(listing.missing),
                    ", ".join(listing.missing))
    if not listing.has_checksums:
        log.warning("%s has no SHA256SUMS.txt at the source: files cannot be verified", source.description)
    return listing, label_source


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
    futures = {client.submit(preprocessing.plan_records, ctx, src, b, key=f"plan-{b[0]}-{len(b)}-{os.urandom(4).hex()}",
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


def _write_chunks(client: Client, ctx: TaskContext, ctx_f, src, layout: store.Layout,
                  plans: Mapping[str, RecordPlan], plan_futures: Mapping[str, Any], held: list[str], spec, progress):
    """Phase 2: a ``write_chunk`` task for each chunk whose fingerprint differs from what the store holds."""
    names = layout.records
    # The arrays are opened once here and shipped to the tasks with their metadata.
    [arrays] = client.scatter([store.chunk_writer(ctx.out, ctx.storage_options)], broadcast=True)
    chunk_futures = {}
    skipped = 0
    for k in range(layout.n_chunks):
        pieces = layout.chunk_parts(k)
        fp = preprocessing.chunk_fingerprint(ctx, layout, plans, k)
        if held[k] == fp:
            skipped += 1
            continue
        parts = [(*plan_futures[names[i]], lo, hi) for i, lo, hi in pieces]
        fut = client.submit(preprocessing.write_chunk, ctx_f, src, arrays, k, parts, layout.chunk_slice(k), fp, spec,
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
            res: preprocessing.ChunkResult = fut.result()
            written += res.written
            failures.update(res.failures)
            stage_s.update(res.seconds)
        except Exception as exc:  # noqa: BLE001
            for r in recs:
                failures.setdefault(r, f"write: chunk {k}: {type(exc).__name__}: {exc}")
        bar.update(1)
    bar.close()
    return written, skipped, failures, stage_s
