"""The scoring job: a trained model + an archive of ECG records -> per-segment scores in Zarr.

Wires the stages of ``pipeline`` on a Dask cluster, in the two phases preprocess has:

0. ``sources.resolve_source`` (driver) turns ``--input`` into a record source; one task lists its
   records where the source is reachable (``scoring.list_records``, with a ``REFERENCE.csv`` for tasks
   that read label tables).
1. ``scoring.plan_records`` (one task per batch of records): header, lead, pieces and the quality
   verdict of each record (a refused record fails here, unscored).
2. ``scoring.score_piece`` (one task per piece): the model's task (``pipeline.tasks``) scores it with
   the model a ``model_runtime.ModelPlugin`` loaded once on each worker.
3. The driver merges pieces (``scoring.RecordAssembler``) and commits finished records to the scores
   store (``scores.ScoresWriter``) every ``flush_s`` seconds; records already there are skipped by a re-run.
   At the end the task's metrics over the whole store, the summary table and side tables are written.

Nothing in the driver imports TensorFlow: the model's card is read statically (``model_card``) and the
network loaded in Keras safe mode on the workers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from distributed import Client, as_completed

from ..pipeline import lease, scores, scoring, sources, tables
from ..pipeline.cluster import on_worker
from ..pipeline.config import ScoreConfig
from ..pipeline.locations import locate
from ..pipeline.model_runtime import ModelFile, ModelPlugin, register_model
from ..pipeline.scores import sidecar, summary_path  # noqa: F401 - part of this job's API
from ..pipeline.scoring import ScoreReport, ScoringContext
from ..pipeline.wfdb_out import DEFAULT_EXTENSION, write_wfdb_annotations
from .common import NoProgress
from .preprocess import plan_batch_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreRequest:
    """One run of the scoring job.

    Attributes
    ----------
    model
        ``model.keras`` written by ``ecg-pipeline train`` (path or fsspec URL), or that file already read
        (``ModelFile``: a model on an object store is then downloaded once).
    out
        Scores store (path or fsspec URL).
    input
        Folder, archive, or fsspec URL of records; or None with ``db``.
    source, db, version
        A PhysioNet-style database: ``<source>/<db>/<version>``.
    records
        Score only these records (names as the source lists them).
    annotations
        ``"auto"``: compare with the reference annotation files the model's task takes
        (``Task.default_annotator``) where a record has one; an extension (``"atr"``): compare,
        and fail records that lack it; None: no comparison.
    summary
        Per-record table file (``.csv`` or ``.parquet``); None: ``<out stem>.records.csv``.
    work_dir
        Where archives are fetched and extracted; None: ``<cache>/archives``.
    labels
        Tasks that read label tables (rhythm): a ``record,label`` file of reference classes; None: a
        ``REFERENCE.csv`` beside the records, if there is one.
    storage_options
        fsspec options of the job's URLs (``out``, ``model``, ``summary``, ``wfdb_out``).
    wfdb_out
        Folder (path or URL) for each scored record's WFDB annotation file ``<record>.ecgp``
        (``pipeline.wfdb_out``); None: none written.
    """

    model: str | ModelFile
    out: str
    input: str | None = None
    source: str | None = None
    db: str | None = None
    version: str | None = None
    records: tuple[str, ...] | None = None
    annotations: str | None = "auto"
    config: ScoreConfig = field(default_factory=ScoreConfig)
    cache_dir: str | None = None
    work_dir: str | None = None
    summary: str | None = None
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None
    labels: str | None = None
    wfdb_out: str | None = None


def check_summary(path: str) -> None:
    """Refuse a summary file the job could not write, before any work is done."""
    tables.table_format(path)


def run_scoring(request: ScoreRequest, client: Client,
                progress: Callable[[str, int], Any] | None = None) -> ScoreReport:
    """Run the job on ``client``'s cluster; return its report.

    Record problems never raise (they are in the store's per-record table and the
    summary). Raises ``PipelineError`` for problems with the job as a whole: an unsafe
    model, an unreadable input, a store from another model, a store another live job
    writes (``lease.StoreBusy``). The store's lease (``pipeline.lease``) is held throughout.
    """
    with lease.hold(request.out, "score", storage_options=request.storage_options):
        return _run_scoring(request, client, progress or (lambda desc, total: NoProgress()))


def _run_scoring(request: ScoreRequest, client: Client, progress: Callable[[str, int], Any]) -> ScoreReport:
    t0 = time.perf_counter()
    model = (request.model if isinstance(request.model, ModelFile)
             else ModelFile.read(request.model, request.storage_options))
    task, config = model.card.task_impl(), request.config
    summary = summary_path(request.out, request.summary)
    check_summary(summary)
    source = sources.resolve_source(request.input, source=request.source, db=request.db, version=request.version,
                                    work_dir=request.work_dir, max_archive_bytes=config.max_archive_bytes,
                                    require_checksums=config.download.require_checksums)
    annotator = (task.default_annotator(model.card) if request.annotations == "auto" else request.annotations)
    source, names, table = _listed_records(client, source, request, task.reads_label_table)
    phase = {"prepare": time.perf_counter() - t0}
    # The store is opened (or created) only now: a refused input leaves none behind.
    writer = scores.ScoresWriter(request.out, scores.scores_attrs(model.card, model.path, model.sha256, config,
                                                                  source.description),
                                 model.card.classes, config.chunk_size, overwrite=request.overwrite,
                                 storage_options=request.storage_options)
    todo = [r for r in names if r not in writer.done]
    plugin = ModelPlugin(model)
    ctx = ScoringContext(model.card, config, annotator, request.annotations not in (None, "auto"), request.cache_dir,
                         plugin.name, table)
    run = _Run(ctx, writer, t0)
    if todo:
        phase.update(_score(client, plugin, ctx, source, todo, run, progress("score records", len(todo))))
    t = time.perf_counter()
    report = _finish(request, model, source, names, todo, writer, summary, run)
    report.phase_s = {**phase, "finish": time.perf_counter() - t}
    report.wall_s = time.perf_counter() - t0
    return report


def _listed_records(client: Client, source: sources.RecordSource, request: ScoreRequest, label_table: bool
                    ) -> tuple[sources.RecordSource, tuple[str, ...], dict[str, str]]:
    """The prepared source, the records to score (``--records`` checked against the listing) and, for tasks that
    read label tables, the reference classes (``--labels``, or a ``REFERENCE.csv`` in the source)."""
    listing, table = client.submit(on_worker, scoring.list_records, source, request.cache_dir, request.config.download,
                                   label_table and not request.labels, pure=False).result()
    names = listing.records
    if request.labels and label_table:
        table = scoring.read_label_table(request.labels)
    if request.records:
        unknown = sorted(set(request.records) - set(names))
        if unknown:
            raise sources.SourceError(f"{listing.source.description}: no record(s) {', '.join(unknown)}")
        names = tuple(r for r in names if r in set(request.records))
    if not names:
        raise sources.SourceError(f"{listing.source.description}: no WFDB records (.hea files) found")
    return listing.source, names, table


@dataclass
class _Run:
    """What the driver keeps while records come back: merged records waiting for a commit, counts, timings."""

    ctx: ScoringContext
    writer: scores.ScoresWriter
    t0: float
    pending: list[scores.RecordScores] = field(default_factory=list)
    stage_s: Counter = field(default_factory=Counter)
    loads: set[str] = field(default_factory=set)
    n_segments: int = 0
    last_flush: float = field(default_factory=time.perf_counter)

    def done(self, record: scores.RecordScores, bar) -> None:
        """One finished record: counted, and committed with the others every ``flush_s``."""
        self.pending.append(record)
        self.n_segments += record.n_segments
        bar.update(1)
        if hasattr(bar, "set_postfix_str"):
            rate = self.n_segments / (time.perf_counter() - self.t0)
            bar.set_postfix_str(f"{rate:,.0f} {self.ctx.task.unit}/s", refresh=False)
        if time.perf_counter() - self.last_flush >= self.ctx.config.flush_s:
            self.flush()

    def flush(self) -> None:
        self.writer.commit(self.pending)
        self.pending, self.last_flush = [], time.perf_counter()


def _score(client: Client, plugin: ModelPlugin, ctx: ScoringContext, source, todo, run: _Run, bar) -> dict[str, float]:
    """Load the model on every worker, then plan and score ``todo``; the plugin is unregistered after."""
    t = time.perf_counter()
    try:
        try:  # every worker loads the model now: a refused model raises here, and leaves no empty store behind
            register_model(client, plugin)
        except Exception:
            run.writer.discard_if_new_and_empty()
            raise
        model_load = time.perf_counter() - t
        t = time.perf_counter()
        [src, ctx_f] = client.scatter([source, ctx], broadcast=True)  # ctx: once, a label table can be large
        _plan_and_score(client, ctx_f, src, todo, run, bar)
    finally:
        try:  # a long-lived cluster must not keep loading a finished job's model on new workers
            client.unregister_worker_plugin(plugin.name)
        except Exception:  # noqa: BLE001 - the cluster may be going away
            log.debug("could not unregister %s", plugin.name)
    return {"model_load": model_load, "score": time.perf_counter() - t}


def _plan_and_score(client: Client, ctx_f, src, todo, run: _Run, bar) -> None:
    """Plan tasks per batch of records; as each plan comes back, one scoring task per piece of its records."""
    step = plan_batch_size(len(todo), len(client.scheduler_info(n_workers=-1)["workers"]))
    batches = {client.submit(scoring.plan_records, ctx_f, src, todo[i:i + step], pure=False): todo[i:i + step]
               for i in range(0, len(todo), step)}
    pieces: dict[Any, str] = {}
    assembler = scoring.RecordAssembler(run.ctx)
    done_iter = as_completed(list(batches))
    for fut in done_iter:
        if fut in batches:
            names = batches.pop(fut)
            try:
                plans = fut.result()
            except Exception as exc:  # noqa: BLE001 - the task itself died (worker lost too often, a bug)
                plans = [scoring.ScoringPlan(r, error=f"task: {type(exc).__name__}: {exc}") for r in names]
            for plan in plans:
                if not plan.ok:
                    run.done(plan.scores(run.ctx.card.task), bar)
                    continue
                for i in range(len(plan.pieces)):
                    f = client.submit(scoring.score_piece, ctx_f, src, plan, i,
                                      key=f"score-{plan.record}-{i}-{os.urandom(4).hex()}")
                    pieces[f] = plan.record
                    done_iter.add(f)
            continue
        record = pieces.pop(fut)
        try:
            piece = fut.result()
        except Exception as exc:  # noqa: BLE001 - the task itself died (worker lost too often, a bug)
            piece = scoring.PieceScores(record, 0, 1, scoring.task_error(record, exc))
        run.stage_s.update(piece.seconds)
        if piece.model_load:
            run.loads.add(piece.model_load)
        merged = assembler.add(piece)
        if merged is not None:
            run.done(merged, bar)
        fut.release()
    run.flush()
    bar.close()


def _finish(request: ScoreRequest, model: ModelFile, source, names, todo, writer: scores.ScoresWriter, summary: str,
            run: _Run) -> ScoreReport:
    """End of job: class counts and the task's metrics over the whole store (earlier runs included), the summary
    table and the task's side tables."""
    task, card = model.card.task_impl(), model.card
    rows = list(writer.rows.values())
    failed = [(r["record"], r["error"]) for r in rows if r["status"] != "ok"]
    per_class = scores.segments_per_class(rows, card.classes)
    metrics = task.store_metrics(writer, rows, card, request.config)
    unreadable = scores.unreadable_counts(writer, rows)
    writer.finish({"complete": all(r in writer.rows for r in names), "segments_per_class": per_class,
                   "n_failed_records": len(failed), "unreadable": unreadable,
                   **({"reference_metrics": metrics} if metrics else {})})
    tables.write_table(scores.records_frame(rows, card.classes, card.task).sort_values("record", kind="stable"), summary,
                       request.storage_options)
    for suffix, frame in task.side_tables(writer, rows).items():
        tables.write_table(frame, sidecar(request.out, suffix), request.storage_options)
    if metrics:
        locate(sidecar(request.out, ".metrics.json"), request.storage_options).write_text(json.dumps(metrics, indent=2))
    if request.wfdb_out:
        n = len(write_wfdb_annotations(request.out, request.wfdb_out, storage_options=request.storage_options))
        log.info("wrote %d WFDB annotation files (.%s) to %s", n, DEFAULT_EXTENSION, request.wfdb_out)
    return ScoreReport(
        out=request.out, summary=summary, input=source.description, n_records=len(names), n_scored=len(todo),
        n_skipped=len(names) - len(todo), failed=failed, beats_per_class=per_class,
        n_beats=sum(int(r["n_segments"]) for r in rows), n_beats_run=run.n_segments, reference=metrics,
        wall_s=0.0, stage_s=dict(run.stage_s), model_loads=len(run.loads), task=card.task,
        records=[writer.rows[r] for r in names if r in writer.rows], classes=tuple(card.classes), unreadable=unreadable)
