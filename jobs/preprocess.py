"""The preprocess job: a PhysioNet database -> labelled spectrograms in a Zarr store.

Wiring only: two phases of Dask tasks whose bodies are in ``pipeline.preprocessing``:

0. the database's record source (``sources``) is listed on a worker (``prepare_listing``);
1. ``plan_records`` (one task per batch of records, one record a task for a few long
   ones: ``plan_batch_size``): ``extract.plan_record`` fetches each record
   through the source, reads its header and chosen lead, asks the label source for
   anchors and labels, keeps the usable windows and transforms them from the same read
   (one pass). The driver gathers the plans' summaries (``summaries``: counts, no
   arrays); the segments stay on the worker. Nothing is written yet. On a resume, the
   plans the store keeps are reused for records whose files and chunks are unchanged.
2. ``write_chunk`` (one task per Zarr chunk of segments, given the plan batches it
   needs, so Dask runs it where they are): ``extract.chunk_contents`` takes the rows of
   the chunk from the plans (a long record beyond ``store.one_pass_max_mb`` is read
   again), and ``store.write_chunk`` writes it whole. Tasks own whole chunks, so no two
   ever write the same one.

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from distributed import Client, as_completed, wait

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
from ..pipeline.reports import PreprocessReport, RecordOutcome, RecordTable, record_columns  # noqa: F401

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
        # The driver keeps only the listing's notes: the prepared source may hold a digest for every file
        # (~0.5 kB a record), which only the workers need.
        missing, listing_error = listing.missing, listing.listing_error
        del listing
        reused = {} if request.overwrite else _reusable(client, ctx, ctx_f, src, names, progress)
        commits = _Commits(client, ctx, ctx_f, src, request, preprocessing.store_attrs, version, missing, names,
                           {**reused, **{r: RecordPlan(r, error=e) for r, e in unlabelled.items()}})
        commits.read([n for n in names if n not in unlabelled and n not in reused], progress, then=commits.step)
    with _phase(phase, "write"):
        laid = commits.commit(final=True)
        written, skipped, failures = commits.wait(progress)
    layout, plans = laid.layout, commits.plans

    # The per-record table and the final attributes (driver only: one writer).
    outcomes = RecordTable(record_columns(names, layout, plans, failures, final=True))
    store.write_record_table(request.out, outcomes.columns, request.storage_options)
    ok = outcomes.column("status") == "ok"
    per_class = preprocessing.segments_per_class(plans, outcomes.column("record")[ok], label_source.classes)
    store.finish(request.out, {"complete": written + skipped == layout.n_chunks,
                               "segments_per_class": per_class,
                               "n_failed_records": int((~ok).sum())}, request.storage_options)
    return PreprocessReport(
        out=request.out, database=db.name, version=version, records=outcomes, segments_per_class=per_class,
        chunks_total=layout.n_chunks, chunks_written=written, chunks_skipped=skipped,
        missing_source_files=missing, listing_error=listing_error, wall_s=time.perf_counter() - t0,
        phase_s=phase, stage_s=dict(commits.seconds), bytes_downloaded=sum(p.bytes_downloaded for p in plans.values()),
        records_read=commits.n_read, records_reused=sum(p.reused for p in plans.values()),
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


def _reusable(client: Client, ctx: TaskContext, ctx_f, src, names: Sequence[str], progress) -> dict[str, RecordPlan]:
    """On a resume: the stored plans of records whose chunks are written (``preprocessing.stored_plans``) and whose
    files are unchanged (asked on workers, which reach the source: ``preprocessing.unchanged``)."""
    stored = preprocessing.stored_plans(ctx, names)
    if not stored:
        return {}
    batch, size = list(stored.values()), 2000
    futures = {client.submit(preprocessing.unchanged, ctx_f, src, batch[i:i + size], pure=False): i
               for i in range(0, len(batch), size)}
    same: set[str] = set()
    bar = progress("resume: files unchanged?", len(batch))
    for fut in as_completed(futures):
        try:
            same.update(fut.result())
        except Exception as exc:  # noqa: BLE001 - then those records are read again: slower, never wrong
            log.warning("cannot tell whether %d records changed (%s: %s): reading them again", size,
                        type(exc).__name__, exc)
        bar.update(min(size, len(batch) - futures[fut]))
    bar.close()
    return {r: stored[r] for r in same}


def plan_batch_size(n_records: int, n_workers: int, commit_step: int | None = None) -> int:
    """Records per plan task: one for a few long records (MIT-BIH: 48), up to 64 when there are thousands,
    keeping at least 16 tasks per worker for balance; at most a quarter of ``commit_step``: the prefix a commit
    saves grows a batch at a time, and a kill loses the batches in flight (10,000 recordings: 50, not 64)."""
    size = min(64, max(1, n_records // (16 * max(n_workers, 1))))
    return int(size if commit_step is None else max(1, min(size, commit_step // 4)))


#: A default commit waits this many times the last commit's duration after it (``_Commits.step``).
COMMIT_SPACING = 4.0
#: An intermediate commit rewrites the per-record table one time in this many (``_Commits._save``).
TABLE_EVERY = 4


class _Commits:
    """The store written while the records are read: each time the records read from the start of the list (the
    prefix) grow by ``step_records``, they are laid out, their plan summaries and per-record table saved
    (``store.write_plans``, before any of their chunks) and their full chunks submitted for writing. A job
    killed at any point keeps what was committed, and a resume reads only the rest (``_reusable``); the
    segments wait on the workers only until their chunk is written.

    A resumed store is never made smaller before the end (its chunks beyond the prefix are the next ones'
    to reuse): intermediate commits wait until the prefix reaches its size.
    """

    def __init__(self, client: Client, ctx: TaskContext, ctx_f, src, request: PreprocessRequest, store_attrs,
                 version: str, missing: tuple[str, ...], names: tuple[str, ...], known: dict[str, RecordPlan]):
        self.client, self.ctx, self.ctx_f, self.src, self.request = client, ctx, ctx_f, src, request
        self.store_attrs, self.version, self.missing, self.names = store_attrs, version, missing, names
        self.plans: dict[str, RecordPlan] = dict(known)
        self.futures: dict[str, Any] = {}  # record -> (future of its plan batch, index in it)
        self.seconds: Counter[str] = Counter()  # task-seconds per stage, both phases
        self.n_read = 0
        self.step_records = ctx.config.store.commit_records or max(-(-len(names) // 50), 1)
        # The default also spaces commits by their cost (each rewrites the prefix's table and plans): a commit
        # waits COMMIT_SPACING times the last one's duration, so commits take at most ~1/5 of the driver's time.
        self.spacing = 0.0 if ctx.config.store.commit_records else COMMIT_SPACING
        self.next_commit = 0.0  # perf_counter() before which no commit starts
        self.done = self.committed = 0  # records of the prefix; the prefix at the last commit
        self.prepared = False
        self.existing = 0 if request.overwrite else store.n_segments(request.out, request.storage_options)
        self.writes: dict[int, tuple[Any, str, list[str]]] = {}  # chunk -> (future or None, fingerprint, records)
        # chunk -> (written, failures) of its last write, taken as it finished: the driver then lets the task go
        # (``_harvest``; the scheduler would keep every chunk task's spec, ~0.7 kB a record, to the end)
        self.results: dict[int, tuple[bool, dict[str, str]]] = {}
        self.final_chunks = 0
        self.n_saved = 0  # how many plans of the prefix this run has written to the store
        self.n_commits = 0
        self.unwritten: dict[int, list[str]] = {}  # chunk -> its records, held back (``_submit_chunks``)
        # Fingerprints of the chunks full at the last commit: their records and plans no longer change, so a
        # commit computes only the rest (emptied when a record is read again: ``_reread``)
        self.full_fps: list[str] = []
        self.writes_fps: list[str] = []  # every chunk's fingerprint at the last ``_submit_chunks``

    def read(self, names: Sequence[str], progress, then: Callable[[], None] = lambda: None) -> None:
        """``plan_records`` tasks over batches of ``names``; ``then`` after each batch. A task that dies fails its
        records alone. The driver gets the plans' summaries; each record's plan batch stays on its worker, and
        the chunk tasks that take it run there."""
        names = list(names)
        size = plan_batch_size(len(names), len(self.client.nthreads()), self.step_records)
        futures = {}
        for i in range(0, len(names), size):
            b = names[i:i + size]
            key = f"{b[0]}-{len(b)}-{os.urandom(4).hex()}"
            heavy = self.client.submit(preprocessing.plan_records, self.ctx_f, self.src, b, key=f"plan-{key}",
                                       retries=1)
            futures[self.client.submit(preprocessing.summaries, heavy, key=f"plan-light-{key}")] = (b, heavy)
        bar = progress("download + plan", len(names))
        for fut in as_completed(futures):
            # popped: the batch's plans (their segments) stay on the worker only while a record of it waits for
            # its chunk (``self.futures``), not until the last batch is read (2 GB a worker at 100,000 records)
            batch, heavy = futures.pop(fut)
            try:
                got: preprocessing.PlanSummaries = fut.result()
                self.seconds.update(got.seconds)
                for j, plan in enumerate(got.plans):
                    self.plans[plan.record], self.futures[plan.record] = plan, (heavy, j)
            except Exception as exc:  # noqa: BLE001 - a worker died twice or a bug: the batch's records fail
                self.plans.update({r: RecordPlan(r, error=f"task: {type(exc).__name__}: {exc}") for r in batch})
            self.n_read += len(batch)
            bar.update(len(batch))
            self._harvest()
            then()
        bar.close()

    def step(self) -> None:
        """Commit once the prefix has grown by ``step_records``."""
        while self.done < len(self.names) and self.names[self.done] in self.plans:
            self.done += 1
        if self.done - self.committed >= self.step_records and time.perf_counter() >= self.next_commit:
            t = time.perf_counter()
            self.commit(final=False)
            self.next_commit = time.perf_counter() + self.spacing * (time.perf_counter() - t)

    def commit(self, final: bool) -> preprocessing.StoreLayout | None:
        """Lay out the prefix (every record when ``final``), save its plans and table, submit its full chunks
        (all when ``final``) whose fingerprint differs from the store's and that were not submitted yet."""
        prefix = self.names if final else self.names[:self.done]
        t0 = time.perf_counter()
        laid = self._lay_out(prefix)
        if not final and (laid.spec is None or laid.layout.n_segments < self.existing):
            return None
        t1, layout = time.perf_counter(), laid.layout
        held = self._save(prefix, laid)
        n_full = layout.n_chunks if final else layout.n_segments // layout.chunk_size
        t2 = time.perf_counter()
        # The chunk being filled is written too (again at each commit until it is full): a kill then loses only
        # what was read since the last commit, and a resume copies its rows from the store (``stale_reused``)
        self._submit_chunks(laid, held, layout.n_chunks)
        t3 = time.perf_counter()
        log.debug("commit: %d records, %d of %d chunks full, %.2f s (lay out %.2f, save %.2f, submit %.2f)",
                  len(prefix), n_full, layout.n_chunks, t3 - t0, t1 - t0, t2 - t1, t3 - t2)
        # Records wholly in submitted chunks need their plans no more: their chunk tasks hold them, and Dask
        # frees each worker's segments once those are written (else the workers would keep every record's).
        for r, end in zip(layout.records, layout.ends):
            if end <= n_full * layout.chunk_size:
                self.futures.pop(r, None)
        self.full_fps = self.writes_fps[:n_full]
        self.committed = self.done
        if final:
            self.final_chunks = layout.n_chunks
        return laid

    def _save(self, prefix: Sequence[str], laid: preprocessing.StoreLayout) -> list[str]:
        """The store laid out for ``prefix``, its per-record table and its plans saved (before any of its chunks are
        written: a resume needs the plans of what is written); the chunk fingerprints the store holds."""
        req, layout = self.request, laid.layout
        attrs = self.store_attrs(self.ctx, self.version, req.source, laid.spec, self.missing)
        held = store.prepare(req.out, layout, attrs, self.ctx.config.store.dtype, coords=laid.coords,
                             compressor=self.ctx.config.store.compressor, overwrite=req.overwrite and not self.prepared,
                             storage_options=req.storage_options)
        self.prepared = True
        # The table is for a user who opens a store being written (``require_complete=False``: all "pending"); a
        # resume needs only the plans. Its 15 arrays are most of a commit's store writes (0.1 s of 0.2 s idle at
        # 5,000 records), and cheaper commits come closer together (a kill loses less): so one commit in
        # TABLE_EVERY writes it, and the end of the job the final one.
        if self.n_commits % TABLE_EVERY == 0 and len(prefix) < len(self.names):
            table = record_columns(prefix, layout, self.plans, {}, final=False)
            store.write_record_table(req.out, table, req.storage_options)
        self.n_commits += 1
        # A commit's prefix extends the last one's: only what it adds is saved (and nothing kept of it here)
        store.write_plans(req.out, [self.plans[r].to_json() for r in prefix[self.n_saved:]], req.storage_options,
                          start=self.n_saved)
        for r in prefix[self.n_saved:]:  # saved: the driver keeps less of each (``RecordPlan.held``)
            self.plans[r] = self.plans[r].held()
        self.n_saved = len(prefix)
        return held

    def _submit_chunks(self, laid: preprocessing.StoreLayout, held: Sequence[str], n_full: int) -> None:
        """One ``write_chunk`` task per chunk below ``n_full`` whose fingerprint differs from ``held`` and from what
        was submitted for it before, all in one graph (a submit each cost the driver ~50 ms: 20 chunks, 1.1 s)."""
        req, layout = self.request, laid.layout
        todo, fps = preprocessing.chunks_to_write(self.ctx, layout, self.plans, held, self.full_fps)
        self.writes_fps = fps
        todo = [k for k in todo if k < n_full and (k not in self.writes or self.writes[k][1] != fps[k])]
        if not todo:
            return
        changed = [self.writes[k][0] for k in todo if k in self.writes and self.writes[k][0] is not None]
        if changed:  # their content changed since (rare): never two tasks on one chunk
            wait(changed)
        pieces = {k: layout.chunk_parts(k) for k in todo}
        gone = list(dict.fromkeys(layout.records[i] for k in todo for i, _, _ in pieces[k]
                                  if self._plan_ref(layout.records[i]) is None))
        if gone:  # plans let go after an earlier write of their chunk: read those records again
            self._reread(gone)
            # One that could not be read again (its task failed twice) holds its chunk back: the chunk is left as
            # the store has it, its records are reported, and the next run writes it
            lost = {k for k in todo if any(self._plan_ref(layout.records[i]) is None for i, _, _ in pieces[k])}
            self.unwritten.update({k: [layout.records[i] for i, _, _ in pieces[k]] for k in lost})
            todo = [k for k in todo if k not in lost]
            if not todo:
                return
        [arrays] = self.client.scatter([store.chunk_writer(req.out, req.storage_options)], broadcast=True)
        n = len(todo)
        batches, parts = zip(*(preprocessing.chunk_parts([(self._plan_ref(layout.records[i]), lo, hi)
                                                          for i, lo, hi in pieces[k]]) for k in todo))
        futures = self.client.map(preprocessing.write_chunk, [self.ctx_f] * n, [self.src] * n, [arrays] * n, todo,
                                  batches, parts, [layout.chunk_slice(k) for k in todo], [fps[k] for k in todo],
                                  [laid.spec] * n, key=[f"chunk-{k}-{os.urandom(4).hex()}" for k in todo],
                                  retries=1, priority=1, pure=False)  # priority: before the plans queued ahead
        for k, fut in zip(todo, futures):
            self.writes[k] = (fut, fps[k], [layout.records[i] for i, _, _ in pieces[k]])
            self.unwritten.pop(k, None)
            self.results.pop(k, None)

    def _harvest(self, block: bool = False, each: Callable[[], None] = lambda: None) -> None:
        """Take the results of the chunk writes that have finished (all of them, waiting, with ``block``); ``each``
        after each one."""
        running = {fut: k for k, (fut, _, _) in self.writes.items() if fut is not None and (block or fut.done())}
        for fut in as_completed(running) if block else running:
            k = running[fut]
            _, fp, recs = self.writes[k]
            try:
                res: preprocessing.ChunkResult = fut.result()
                self.results[k] = (res.written, res.failures)
                self.seconds.update(res.seconds)
            except Exception as exc:  # noqa: BLE001 - its records fail, the other chunks go on
                self.results[k] = (False, {r: f"write: chunk {k}: {type(exc).__name__}: {exc}" for r in recs})
            self.writes[k] = (None, fp, recs)
            each()

    def _plan_ref(self, record: str) -> tuple[Any, Any] | None:
        """How a chunk task gets the record's plan: ``(its plan batch's future, index)``; ``(None, plan)`` for a reused
        record whose rows the store holds; None when its plan was let go (its chunk was written)."""
        if record in self.futures:
            return self.futures[record]
        plan = self.plans.get(record)
        return (None, plan) if plan is not None and plan.reused and plan.store_offset is not None else None

    def _lay_out(self, prefix: Sequence[str]) -> preprocessing.StoreLayout:
        """``preprocessing.lay_out`` of ``prefix``; a reused record that lands in a chunk to be written after all
        (another record of it changed) is read first."""
        held = store.read_fingerprints(self.request.out, self.request.storage_options) if self.existing else []
        while True:
            laid = preprocessing.lay_out(self.ctx, prefix, self.plans)
            todo = preprocessing.chunks_to_write(self.ctx, laid.layout, self.plans, held, self.full_fps)[0]
            stale = preprocessing.stale_reused(laid.layout, self.plans, todo)
            if not stale:
                return laid
            self._reread(stale)

    def _reread(self, names: Sequence[str]) -> None:
        """Read ``names`` again (their plans were let go, or their stored rows moved); the chunk fingerprints kept
        from the last commit are computed again (a record read again may change)."""
        self.full_fps = []
        self.read(names, lambda desc, total: NoProgress())

    def wait(self, progress) -> tuple[int, int, dict[str, str]]:
        """Wait for the chunk writes of the final layout: chunks written, chunks left as they were, failures."""
        failures = {r: f"write: chunk {k}: not written (a record of it could not be read again)"
                    for k, recs in self.unwritten.items() if k < self.final_chunks for r in recs}
        bar = progress("spectrograms -> zarr", len(self.writes))
        bar.update(sum(fut is None for fut, _, _ in self.writes.values()))
        self._harvest(block=True, each=lambda: bar.update(1))
        bar.close()
        for k in sorted(self.results):
            failures.update({r: e for r, e in self.results[k][1].items() if r not in failures})
        written = sum(w for w, _ in self.results.values())
        held_back = sum(k < self.final_chunks and k not in self.writes for k in self.unwritten)
        return written, self.final_chunks - len(self.writes) - held_back, failures
