"""The preprocess job's work on records and chunks: the bodies of its Dask tasks and the store its plans lay out.

``jobs/preprocess.py`` wires these together on a cluster; everything that decides what a
record or a chunk becomes is here:

* ``TaskContext``: the settings every task needs (scattered once);
* ``prepare_listing`` (task): the source's listing and the label source with its table read;
* ``plan_records`` (task): ``extract.plan_record`` for a batch of records, their segments computed
  in the same read (one pass); ``summaries`` (task): the batch's plans for the driver, without arrays;
* ``stored_plans``, ``unchanged`` (task), ``stale_reused``: on a resume, the plans of records whose files
  and chunks are unchanged are taken from the store instead of reading the records again;
* ``lay_out``: the store's layout from the plans (its sampling rate is the first good
  record's; a record at another rate fails), its spectrogram and coordinates;
* ``store_attrs``: the store's group attributes (``schemas/store-v5.json``);
* ``write_chunk`` (task): the rows of one chunk (``extract.chunk_contents``), written whole;
* ``segments_per_class``: the class counts of what was written.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import __version__, download, extract, labels, sources, spectrogram, store
from .config import PreprocessConfig
from .databases import Database
from .extract import RecordPlan
from .labels import LABEL_MAPS, LabelSource
from .tasks import get_task
from .timing import Timer


@dataclass(frozen=True)
class TaskContext:
    """What every task needs; picklable, scattered once (a label table makes it large), like the record source."""

    db: Database
    labels: LabelSource
    cache_dir: str | None  #: the download cache; None: each worker's default (``download.cache_root``)
    config: PreprocessConfig
    out: str
    storage_options: Mapping[str, Any] | None

    @property
    def policy(self) -> download.RetryPolicy:
        return self.config.download  # the download section is the retry policy

    def cache(self) -> Path:
        """The download cache folder, resolved where the task runs (a worker's environment names its own)."""
        return download.cache_root(self.cache_dir)

    @functools.cached_property
    def config_fingerprint(self) -> str:
        """``config.fingerprint`` of this job's task, computed once (every chunk's fingerprint starts with it)."""
        return self.config.fingerprint(self.labels.task)

    def leads(self) -> tuple[str, ...]:
        return self.config.leads or self.db.leads

    def rr_spec(self):
        """The RR features of beat segments (``config.rr``); None for stores whose segments are not beats."""
        return self.config.rr.spec() if get_task(self.labels.task).beats else None

    def spec_at(self, fs: float) -> spectrogram.SpectrogramSpec:
        """The spectrogram of a store at ``fs`` (``lay_out`` gives a store its first good record's rate)."""
        return spectrogram.spec_from_config(self.config, fs, self.labels)

    def template_spec(self):
        """The neighbour templates of beat segments (``config.template``); None for other stores or beats 0."""
        return self.config.template.spec() if get_task(self.labels.task).beats else None


def prepare_listing(source: sources.RecordSource, label_source: LabelSource, cache_dir: str | None,
                    policy: download.RetryPolicy) -> tuple[sources.Listing, LabelSource]:
    """Task: list the source and read the label table it holds, if the label source has one."""
    cache = download.cache_root(cache_dir)
    listing = source.prepare(cache, policy)
    return listing, labels.load_table(label_source, listing.source, cache, policy)


def plan_record(ctx: TaskContext, source: sources.RecordSource, record: str) -> RecordPlan:
    """Phase 1 for one record: ``extract.plan_record`` with this job's settings (its segments computed in the
    same pass up to ``store.one_pass_max_mb``)."""
    return extract.plan_record(source, record, ctx.labels, ctx.leads(), ctx.config.lead_fallback, ctx.cache(),
                               ctx.policy, ctx.rr_spec(), spec_of=ctx.spec_at, template_spec=ctx.template_spec(),
                               max_rows_bytes=ctx.config.store.one_pass_max_mb * 2**20)


def plan_records(ctx: TaskContext, source: sources.RecordSource, records: Sequence[str]) -> list[RecordPlan]:
    """Phase 1 for a batch of records (a task): short recordings are planned many to a task, so that the
    scheduler's per-task cost does not dominate (8,528 Challenge 2017 recordings of ~1 ms each)."""
    return [plan_record(ctx, source, r) for r in records]


@dataclass(frozen=True)
class PlanSummaries:
    """What the driver gets of a batch of plans: their summaries and the batch's task-seconds per stage."""

    plans: list[RecordPlan]
    seconds: dict[str, float]


def summaries(plans: Sequence[RecordPlan]) -> PlanSummaries:
    """Task: the plans of a batch without their arrays, for the driver (the segments stay on the worker)."""
    seconds: Counter[str] = Counter()
    for p in plans:
        seconds.update(p.seconds)
    return PlanSummaries([p.summary() for p in plans], dict(seconds))


def stored_plans(ctx: TaskContext, names: Sequence[str]) -> dict[str, RecordPlan]:
    """The plans a resumed store keeps (``_state/record_plan``) that this run may reuse without reading the
    record: records that were planned without error and all of whose chunks hold what those plans give
    (their fingerprints match). Whether each record's files are unchanged is asked next (``unchanged``).
    Empty when there is no store of this configuration at ``ctx.out``."""
    texts, held = store.read_plans(ctx.out, ctx.storage_options, ctx.config.fingerprint(ctx.labels.task))
    if not texts:
        return {}
    old = {p.record: p for p in map(RecordPlan.from_json, texts)}
    layout = store.Layout(tuple(old), tuple(p.n_segments for p in old.values()), 0, 0, ctx.config.store.chunk_size)
    complete = [k < len(held) and held[k] == chunk_fingerprint(ctx, layout, old, k) for k in range(layout.n_chunks)]
    # A job killed after a commit saved its plans but before it wrote the chunk being filled again leaves that
    # chunk as the commit before wrote it: the records that commit had put in it are held all the same.
    written = [k for k in range(min(len(held), layout.n_chunks)) if held[k]]
    covered = {k: held_records(ctx, layout, old, k, held[k]) for k in written[-3:] if not complete[k]}
    first, end = layout.offsets, layout.ends
    size = layout.chunk_size
    wanted = set(names)
    reusable = {}
    for i, (r, p, a, b) in enumerate(zip(old, old.values(), first, end)):
        if r in wanted and p.ok and p.local is not None and \
                all(complete[k] or i in covered.get(k, ()) for k in range(a // size, -(-b // size))):
            p.store_offset = int(a)  # where its rows are: a chunk of it written again takes them from there
            reusable[r] = p
    return reusable


def held_records(ctx: TaskContext, layout: store.Layout, plans: Mapping[str, RecordPlan], k: int,
                 fingerprint: str) -> set[int]:
    """The records (indices in ``layout``) of chunk ``k``'s first pieces whose fingerprint is ``fingerprint``: those
    an earlier commit put in the chunk and wrote, when it was being filled; empty when no run of them has it."""
    names, pieces = layout.records, layout.chunk_parts(k)
    parts = [(names[i], plans[names[i]].digest, lo, hi) for i, lo, hi in pieces]
    fps = store.prefix_fingerprints(ctx.config_fingerprint, parts)
    for m in range(len(parts) - 1, 0, -1):
        if fps[m - 1] == fingerprint:
            return {i for i, _, _ in pieces[:m]}
    return set()


def unchanged(ctx: TaskContext, source: sources.RecordSource, plans: Sequence[RecordPlan]) -> list[str]:
    """Task: the records of ``plans`` whose files the source still holds as they were (``source.unchanged``)."""
    cache = ctx.cache()
    return [p.record for p in plans if source.unchanged(p.local, cache, ctx.policy)]


def stale_reused(layout: store.Layout, plans: Mapping[str, RecordPlan], chunks: Sequence[int]) -> list[str]:
    """The reused records (``RecordPlan.reused``) with a piece in one of ``chunks`` whose rows are no longer where
    this layout puts them (a record before them changed its number of segments): they must be read after all.
    The others' rows are copied from the store when their chunk is written again (``write_chunk``)."""
    names, offsets = layout.records, layout.offsets
    return list(dict.fromkeys(names[i] for k in chunks for i, _, _ in layout.chunk_parts(k)
                              if plans[names[i]].reused and plans[names[i]].store_offset != offsets[i]))


def chunks_to_write(ctx: TaskContext, layout: store.Layout, plans: Mapping[str, RecordPlan],
                    held: Sequence[str], known: Sequence[str] = ()) -> tuple[list[int], list[str]]:
    """The chunks whose fingerprint differs from what the store holds, and the fingerprint of every chunk.

    ``known``: the fingerprints of the first chunks, where the caller knows they have not changed (a job's chunks
    that were full at its last commit): only the others are computed (0.7 s for 100,000 recordings)."""
    known = list(known[:layout.n_chunks])
    fps = known + [chunk_fingerprint(ctx, layout, plans, k) for k in range(len(known), layout.n_chunks)]
    return [k for k, fp in enumerate(fps) if k >= len(held) or held[k] != fp], fps


@dataclass(frozen=True)
class StoreLayout:
    """Where the planned records go, and the spectrogram they get."""

    layout: store.Layout
    spec: spectrogram.SpectrogramSpec | None  #: None when no record could be planned (no sampling rate)
    coords: dict[str, np.ndarray]  #: ``freq``, ``time`` and ``rr_feature`` values (``store.prepare``)


def lay_out(ctx: TaskContext, names: Sequence[str], plans: Mapping[str, RecordPlan]) -> StoreLayout:
    """The store's layout: records in the source's order, at the first good record's sampling rate.

    A planned record at another rate is marked failed in ``plans`` (its plan is updated in place), so it
    gets no segments: a store holds one rate, the one its spectrogram attributes name.
    """
    fs_store = next((plans[r].fs for r in names if plans[r].ok), 0.0)
    for r in names:
        p = plans[r]
        if p.ok and p.fs != fs_store:
            p.ok, p.error = False, f"header: sampling frequency {p.fs} Hz differs from the store's {fs_store} Hz"
    spec = ctx.spec_at(fs_store) if fs_store else None
    rr_spec = ctx.rr_spec()
    layout = store.Layout(tuple(names), tuple(plans[r].n_segments for r in names), spec.n_freq if spec else 0,
                          spec.n_time if spec else 0, ctx.config.store.chunk_size,
                          len(rr_spec.features) if rr_spec else 0, ctx.template_spec() is not None)
    coords = {"freq": spec.freqs() if spec else np.zeros(0, np.float32),
              "time": spec.times() if spec else np.zeros(0, np.float32),
              "rr_feature": np.array(rr_spec.features if rr_spec else (), dtype=object)}
    return StoreLayout(layout, spec, coords)


def store_attrs(ctx: TaskContext, db_version: str, source: str, spec: spectrogram.SpectrogramSpec | None,
                missing_source_files: Sequence[str]) -> dict[str, Any]:
    """The store's group attributes before its chunks are written (``store.prepare`` adds its own).

    ``source``: the root of the file tree the records came from (``preprocess --source``).
    """
    db, config, label_source = ctx.db, ctx.config, ctx.labels
    beat = get_task(label_source.task).beats
    extra: dict[str, Any] = {"label_map": dict(LABEL_MAPS[db.label_map])} if db.label_map else {}
    if db.challenge_classes:
        extra["challenge_classes"] = list(db.challenge_classes)
    # The key order is the order of the store's zarr.json: keep it.
    return {
        "schema_version": store.store_schema()["schema_version"],
        "package": "ecg-pipeline",
        "package_version": __version__,
        "database": db.name,
        "database_version": db_version,
        "database_title": db.title,
        "citation": db.citation,
        "source": source,
        "task": label_source.task,
        "anchor_kind": label_source.anchor_kind,
        "label_source": label_source.describe(),
        **extra,
        "classes": list(label_source.classes),
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(label_source.task),
        "spectrogram": spec.attrs() if spec else {},
        **({"rr": config.rr.spec().attrs()} if beat else {}),
        **({"template": config.template.spec().attrs()} if beat and config.template.beats else {}),
        "missing_source_files": list(missing_source_files),
    }


def chunk_fingerprint(ctx: TaskContext, layout: store.Layout, plans: Mapping[str, RecordPlan], k: int) -> str:
    """What chunk ``k`` holds once written: the configuration and its record pieces (each record's file digest)."""
    names = layout.records
    return store.chunk_fingerprint(ctx.config_fingerprint,
                                   [(names[i], plans[names[i]].digest, lo, hi) for i, lo, hi in layout.chunk_parts(k)])


@dataclass
class ChunkResult:
    """Phase-2 result for one chunk."""

    k: int
    written: bool
    failures: dict[str, str]  #: record -> error
    seconds: dict[str, float]
    n_segments: int


def chunk_parts(refs: Sequence[tuple[tuple[Any, Any], int, int]]) -> tuple[list[Any], list[tuple[int, Any, int, int]]]:
    """``write_chunk``'s ``batches`` and ``parts`` from each record piece's ``((plan batch, index in it), first,
    end)``, ``((None, reused plan), first, end)`` for a reused record: each batch named once, and the pieces
    giving its place in ``batches`` (-1 for a reused record).

    Dask makes task objects of every tuple that holds a future, and its scheduler keeps a task's arguments in its
    logs: a tuple a record piece, for each of the many writes of a chunk being filled, grew the driver by ~1 kB a
    record. The pieces hold no future, so Dask passes them as they are."""
    batches: list[Any] = []
    where: dict[int, int] = {}
    parts = []
    for (batch, j), lo, hi in refs:
        if batch is None:
            parts.append((-1, j, lo, hi))
            continue
        b = where.setdefault(id(batch), len(batches))
        if b == len(batches):
            batches.append(batch)
        parts.append((b, j, lo, hi))
    return batches, parts


def write_chunk(ctx: TaskContext, source: sources.RecordSource, writer: store.ChunkWriter, k: int,
                batches: Sequence[list[RecordPlan]], parts: Sequence[tuple[int, int | RecordPlan, int, int]],
                segs: slice, fingerprint: str, spec: spectrogram.SpectrogramSpec) -> ChunkResult:
    """Phase 2 for one chunk (a task): its rows (``extract.chunk_contents``), written whole.

    ``batches``: the plan batches its records come from (results of the ``plan_records`` tasks, so the chunk runs
    where they were fetched); ``parts``: ``(batch's place in batches, index of the record's plan in it, first,
    end)`` per record piece (``chunk_parts``); ``(-1, reused plan, first, end)`` for a record whose rows the store
    holds (``RecordPlan.store_offset``): they are read from it before the chunk is written again.
    """
    pieces = [(batches[b][j] if b >= 0 else j, lo, hi) for b, j, lo, hi in parts]
    rr = writer.arrays.get(store.RR)
    rows = extract.chunk_contents(source, pieces, spec, ctx.cache(), ctx.policy, ctx.template_spec(),
                                  stored=lambda rows: store.read_rows(writer, rows),
                                  rr_width=rr.shape[1] if rr is not None else None)
    timer = Timer()
    with timer("write"):
        # A chunk with a failed piece is written (so the store stays readable) but keeps no
        # fingerprint, so the next run computes it again.
        store.write_chunk(writer, k, segs, rows.spectrogram, rows.coords, "" if rows.failures else fingerprint,
                          rr=rows.rr, template=rows.template)
    return ChunkResult(k, not rows.failures, rows.failures, {**rows.seconds, **timer.seconds}, segs.stop - segs.start)


def segments_per_class(plans: Mapping[str, RecordPlan], written: Iterable[str],
                       classes: Sequence[str]) -> dict[str, int]:
    """Segments per class of the records ``written`` (status "ok"): a record whose chunk failed (a full disk) is
    not counted, whatever it planned."""
    per_class: Counter[str] = Counter()
    for r in written:
        per_class.update(plans[r].class_counts())
    return {c: int(per_class.get(c, 0)) for c in classes}
