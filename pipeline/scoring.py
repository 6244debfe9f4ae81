"""Stage 9b: scoring records with a model, in the two phases preprocess has.

1. ``plan_records`` (one task per batch of records): each record is fetched through its source,
   its header read, its lead chosen and checked by the task (``pipeline.tasks``), its pieces decided
   (``plan_pieces``: long records are scored in pieces, one task each) and its lead judged
   (``quality.record_quality``, from the lead read piece by piece). A record the model must not
   score fails here, before any scoring. A plan is small; it carries the header and lead, so no
   scoring task reads the header again.
2. ``score_piece`` (one task per piece): the record's files are checked again where the plan
   found them (``RecordSource.fetch_again``), and the task scores the piece (``Task.score_piece``:
   beats through ``labels.DetectedBeats``, windows on ``segment.window_grid``) with the model the
   worker's ``model_runtime.ModelPlugin`` loaded.
3. ``RecordAssembler`` (driver side) collects a record's pieces and merges them (``Task.merge``).

Record problems become a failed ``scores.RecordScores``, never an exception; nothing here knows
the store's layout or the driver's loop.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import quality, records, scores, sources
from .config import ScoreConfig
from .download import RetryPolicy, cache_root
from .errors import RecordError
from .model_card import ModelCard
from .reports import failure_lines
from .tasks import get_task
from .timing import Timer

log = logging.getLogger(__name__)

#: Fewest samples a piece holds, whatever ``piece_s`` and the sampling rate (a 1/60 Hz trend is one piece).
MIN_PIECE_SAMPLES = 1024
#: Most pieces one record is split into: beyond, pieces grow longer than ``piece_s`` instead.
MAX_PIECES = 1024


@dataclass(frozen=True)
class ScoringContext:
    """What every scoring task needs; small and picklable (scattered once: a label table can be large)."""

    card: ModelCard
    config: ScoreConfig
    annotator: str | None  #: annotation extension to compare with, None for no comparison
    require_reference: bool  #: --annotations given explicitly: a record without the file fails
    cache_dir: str | None
    plugin: str  #: the name of the worker plugin that holds the model (``model_runtime.ModelPlugin``)
    labels: Mapping[str, str] = field(default_factory=dict)  #: record -> reference class (a label table)

    @property
    def task(self):
        return self.card.task_impl()

    @property
    def policy(self) -> RetryPolicy:
        return self.config.download  # the download section is the retry policy

    def cache(self) -> Path:
        return cache_root(self.cache_dir)

    def leads(self) -> tuple[str, ...]:
        return self.config.leads or self.card.leads

    def annotators(self) -> tuple[str, ...]:
        return (self.annotator,) if self.annotator else ()


def plan_pieces(sig_len: int, fs: float, piece_s: float) -> list[tuple[int, int]]:
    """The pieces ``[start, stop)`` a record of ``sig_len`` samples is scored in, one task each; ``[]``: one task
    for the whole record.

    Bounded by design: equal pieces of about ``piece_s`` seconds (from 2/3 to 3/2 of it), but at least
    ``MIN_PIECE_SAMPLES``, and at most ``MAX_PIECES`` of them (then longer ones).
    """
    piece_len = max(int(piece_s * fs) if np.isfinite(piece_s * fs) else 0, MIN_PIECE_SAMPLES)
    # As many pieces as piece_len fits, rounded: a record a little over piece_s is one task, not one plus a
    # sliver that costs its margins (a 30 min 5 s MIT-BIH record was 30 min + 5 s + 2 margins of 5 min).
    n = min(int(round(sig_len / piece_len)), MAX_PIECES)
    if n <= 1:
        return []
    piece_len = -(-sig_len // n)
    n = -(-sig_len // piece_len)
    return [(i * piece_len, min((i + 1) * piece_len, sig_len)) for i in range(n)]


@dataclass
class ScoringPlan:
    """One record, ready to score: where its files are, its header and lead, its pieces; or why it fails."""

    record: str
    error: str = ""  #: "<stage>: <cause>": the record fails, unscored
    checksum: str = ""
    local: sources.LocalRecord | None = None
    header: records.Header | None = None  #: at the lead's own rate (``Header.for_lead``)
    lead: records.Lead | None = None
    mv_per_unit: float | None = 1.0  #: the lead's units in mV (``quality.mv_per_unit``)
    quality: str = ""  #: the verdict on the lead, "" when nothing is to be said
    pieces: tuple[tuple[int, int], ...] = ()  #: ``[start, stop)`` of each scoring task
    has_reference: bool = False  #: the record has the annotation file compared with
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    def scores(self, task: str) -> scores.RecordScores:
        """An empty ``RecordScores`` of this record: its table fields, and the error of a failed plan."""
        h, lead = self.header, self.lead
        return scores.RecordScores(
            self.record, "failed" if self.error else "ok", self.error, self.checksum,
            lead.name if lead else "", bool(lead and lead.fallback), h.fs if h and lead else 0.0,
            h.sig_len if h and lead else 0, seconds=self.seconds, task=task, quality=self.quality)


def plan_record(ctx: ScoringContext, source: sources.RecordSource, record: str) -> ScoringPlan:
    """Phase 1 for one record (see the module docstring); record problems become ``plan.error``."""
    t0 = time.perf_counter()
    plan = ScoringPlan(record)
    try:
        local = source.fetch(record, ctx.annotators(), ctx.cache(), ctx.policy)
        plan.local, plan.checksum = local, local.checksum
        header = records.read_header(local.base, record)  # checked against the files: no work for absent samples
        lead = records.choose_lead(header, ctx.leads(), ctx.config.lead_fallback)
        plan.header, plan.lead = header.for_lead(lead), lead  # the lead's own rate (several samples per frame)
        ctx.task.check_record(ctx.card, plan.header)
        plan.pieces = tuple(plan_pieces(plan.header.sig_len, plan.header.fs, ctx.config.piece_s)) or (
            (0, plan.header.sig_len),)
        _judge(ctx, plan)
        plan.has_reference = local.has(ctx.annotator)
        if plan.ok and ctx.require_reference and ctx.annotator and not plan.has_reference:
            raise RecordError(record, "annotations", f"no {record}.{ctx.annotator} (asked for by --annotations)")
    except RecordError as exc:
        plan.error = f"{exc.stage}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - one bad record must not sink the job
        plan.error = f"score: {type(exc).__name__}: {exc}"
        log.exception("record %s", record)
    plan.seconds = time.perf_counter() - t0
    return plan


def _judge(ctx: ScoringContext, plan: ScoringPlan) -> None:
    """The verdict on the lead against what the model knows; a refused record fails (``quality: refuse``).

    The lead is read piece by piece (a day-long Holter lead is never in memory whole); the pieces'
    statistics merge into the record's (``quality.LeadStats.merge``).
    """
    header, lead = plan.header, plan.lead
    stats = quality.LeadStats.merge([quality.LeadStats.of(records.read_signal(plan.local.base, header, lead, a, b))
                                     for a, b in plan.pieces])
    plan.mv_per_unit = quality.mv_per_unit(header.units_of(lead))
    v = quality.record_quality(stats, header.fs, min_seconds=ctx.task.min_seconds(ctx.card), min_fs=ctx.card.min_fs,
                               mv_per_unit=plan.mv_per_unit, lead=lead.name, lead_fallback=lead.fallback)
    plan.quality = v.text
    if v.refused and ctx.config.quality.records == "refuse":
        plan.error = f"quality: {v.text} (not scored; `quality: flag` scores it anyway)"


def plan_records(ctx: ScoringContext, source: sources.RecordSource, names: Sequence[str]) -> list[ScoringPlan]:
    """Task: ``plan_record`` for a batch of records (one task per record would cost more than the plans)."""
    return [plan_record(ctx, source, r) for r in names]


@dataclass
class PieceScores:
    """One scoring task's result: the scores of one piece of a record."""

    record: str
    index: int
    n_pieces: int
    scores: scores.RecordScores
    seconds: dict[str, float] = field(default_factory=dict)  #: worker seconds per stage
    model_load: str = ""  #: which load of the model scored it (worker, process, time)


def score_piece(ctx: ScoringContext, source: sources.RecordSource, plan: ScoringPlan, index: int = 0,
                predict: Callable[[Any], np.ndarray] | None = None) -> PieceScores:
    """Task: score piece ``index`` of a planned record with the worker's model (``predict``: a model of this
    process instead, for one record scored without a cluster). Problems become ``scores.status``."""
    t0 = time.perf_counter()
    result = plan.scores(ctx.card.task)
    result.seconds = 0.0
    out = PieceScores(plan.record, index, len(plan.pieces), result)
    timer = Timer()
    try:
        with timer("read"):
            base = source.fetch_again(plan.local, ctx.cache(), ctx.policy)
        if predict is None:
            from distributed import get_worker

            model = get_worker().plugins[ctx.plugin]
            out.model_load = model.load_id
            predict = functools.partial(model.predict, batch_size=ctx.config.batch_size)
        start, stop = plan.pieces[index]
        ctx.task.score_piece(ctx, base, plan, start, stop, predict, result, timer)
    except RecordError as exc:
        result.status, result.error = "failed", f"{exc.stage}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - one bad record must not sink the job
        result.status, result.error = "failed", f"score: {type(exc).__name__}: {exc}"
        log.exception("record %s", plan.record)
    result.seconds = time.perf_counter() - t0 + (plan.seconds if index == 0 else 0.0)
    out.seconds = dict(timer.seconds)
    return out


class RecordAssembler:
    """Driver side: collects the pieces of each record and gives back whole records as they complete.

    Parameters
    ----------
    ctx
        The job's context: its task merges pieces (``Task.merge``).
    """

    def __init__(self, ctx: ScoringContext):
        self.ctx = ctx
        self._parts: dict[str, list[PieceScores]] = {}

    def add(self, piece: PieceScores) -> scores.RecordScores | None:
        """Take one piece; the record's merged scores once its last piece is in, else None."""
        parts = self._parts.setdefault(piece.record, [])
        parts.append(piece)
        if len(parts) < piece.n_pieces:
            return None
        del self._parts[piece.record]
        ordered = [p.scores for p in sorted(parts, key=lambda p: p.index)]
        return ordered[0] if len(ordered) == 1 else merge_pieces(self.ctx, ordered)


def merge_pieces(ctx: ScoringContext, parts: Sequence[scores.RecordScores]) -> scores.RecordScores:
    """One record's scores from its pieces' (in order): the first failure fails the record, else the task merges."""
    base = parts[0]
    failed = [p for p in parts if p.status != "ok"]
    if failed:
        return scores.RecordScores(base.record, "failed", failed[0].error, base.checksum, base.lead, base.lead_fallback,
                                   base.fs, base.sig_len, seconds=sum(p.seconds for p in parts), task=base.task)
    return ctx.task.merge(parts, ctx.config)


def task_error(record: str, exc: BaseException) -> scores.RecordScores:
    """The row of a record whose task itself died (its worker lost too often, a bug)."""
    return scores.RecordScores(record, "failed", f"task: {type(exc).__name__}: {exc}")


@dataclass
class ScoreReport:
    """What a scoring run did; it renders itself (``text``, ``records_text``, ``to_dict``)."""

    out: str
    summary: str
    input: str
    n_records: int
    n_scored: int  #: records scored by this run
    n_skipped: int  #: records already in the store
    failed: list[tuple[str, str]]
    beats_per_class: dict[str, int]
    n_beats: int
    n_beats_run: int  #: beats scored by this run
    reference: dict[str, Any] | None
    wall_s: float
    stage_s: dict[str, float]
    phase_s: dict[str, float] = field(default_factory=dict)  #: driver wall seconds: prepare, model_load, score, finish
    model_loads: int = 0  #: model loads that scored beats (one per worker process)
    task: str = "beat"
    records: list[dict[str, Any]] = field(default_factory=list)  #: the per-record table rows of this run's records
    classes: tuple[str, ...] = ()
    unreadable: dict[str, Any] = field(default_factory=dict)  #: ``scores.unreadable_counts`` of the store

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def beats_per_s(self) -> float:
        return self.n_beats_run / self.wall_s if self.wall_s else 0.0

    def text(self) -> str:
        """The end-of-job summary."""
        task = get_task(self.task)
        unit = task.unit
        lines = [
            "",
            f"{self.input} -> {self.out}",
            f"  records     {self.n_scored - len(self.failed)} scored now, {self.n_skipped} already in the store, "
            f"{len(self.failed)} failed, {self.n_records} listed",
            f"  {unit:<11} {self.n_beats:,} in the store, {self.n_beats_run:,} scored now "
            f"({self.beats_per_s:,.0f} {unit}/s, {self.n_scored / self.wall_s if self.wall_s else 0:,.1f} "
            f"records/s over {self.wall_s:.1f} s: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.phase_s.items()) + ")",
            "  predicted   " + "   ".join(f"{c} {n:,}" for c, n in self.beats_per_class.items()),
            f"  summary     {self.summary}",
            f"  model       loaded {self.model_loads} time(s): once per worker process that scored",
        ]
        total = sum(self.stage_s.values())
        if total:
            lines.append("  worker time " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in self.stage_s.items()))
        lines += task.report_lines(self.reference)
        lines += self._unreadable_lines(task)
        flagged = [(r["record"], r["quality"]) for r in self.records if r.get("quality") and r.get("status") == "ok"]
        if flagged:
            lines.append(f"  quality     {len(flagged)} record(s) scored with a doubt (see the quality column):")
            lines += [f"    {r:>8}  {q}" for r, q in flagged[:20]]
            if len(flagged) > 20:
                lines.append(f"    ... and {len(flagged) - 20} more")
        lines += failure_lines(self.failed, f"every one: the error column of {self.summary}")
        return "\n".join(lines) + "\n"

    def _unreadable_lines(self, task) -> list[str]:
        u = self.unreadable
        if not u or not u.get("segments"):
            return []
        cls = task.unreadable_index(self.classes)
        as_ = f", predicted {self.classes[cls]}" if cls is not None else ""
        lines = [f"  unreadable  {u['segments']:,} {task.unit} ({100 * u['share']:.2f}%) in {u['records']} record(s) "
                 f"failed a signal-quality index{as_} (the store's `quality`): "
                 + ", ".join(f"{k} {n:,}" for k, n in u["by_index"].items() if n)]
        worst = sorted((r for r in self.records if r.get("status") == "ok" and (r.get("unreadable") or 0) > 0),
                       key=lambda r: -r["unreadable"])
        lines += [f"    {r['record']:>8}  {100 * r['unreadable']:.1f}% of its {task.unit} unreadable" for r in worst[:10]]
        if len(worst) > 10:
            lines.append(f"    ... and {len(worst) - 10} more (the unreadable column of {self.summary})")
        return lines

    def records_text(self) -> str:
        """Each record's verdict (``score`` of a single record prints it): its class probabilities (rhythm models)
        or its beats per class."""
        task = get_task(self.task)
        return "\n".join(f"{r['record']}: failed: {r['error']}" if r["status"] != "ok" else
                         task.record_text(r, self.classes) for r in self.records) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        import json
        from dataclasses import asdict

        return json.loads(json.dumps({**asdict(self), "ok": self.ok}, default=_plain))


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)


def list_records(source: sources.RecordSource, cache_dir: str | None, policy: RetryPolicy,
                 label_table: bool) -> tuple[sources.Listing, dict[str, str]]:
    """Task: list the source where it is reachable (archives fetched and extracted there) and, with
    ``label_table``, read the ``REFERENCE.csv`` beside its records (``{}`` when there is none)."""
    from .errors import PipelineError
    from .labels import RecordLabelTable, load_table

    listing = source.prepare(cache_root(cache_dir), policy)
    if not label_table:
        return listing, {}
    try:
        table = load_table(RecordLabelTable(), listing.source, cache_root(cache_dir), policy)
    except PipelineError as exc:  # no table, or a malformed one: the records are scored without reference
        log.info("%s", exc)
        return listing, {}
    return listing, dict(table.table)


def read_label_table(path: str) -> dict[str, str]:
    """Reference classes from a ``record,label`` file (``score --labels``; a path or fsspec URL).

    Raises
    ------
    sources.SourceError
        The file cannot be read or is malformed.
    """
    import fsspec

    from .labels import RecordLabelTable

    try:
        with fsspec.open(path, "r", encoding="utf-8-sig") as f:
            return dict(RecordLabelTable(file=path).load(f.read()).table)
    except (OSError, ValueError) as exc:
        raise sources.SourceError(f"--labels {path}: {exc}") from None
