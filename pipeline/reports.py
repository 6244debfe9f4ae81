"""What a preprocess run and a store hold, as values and as the text the command line prints.

* ``RecordOutcome``: the final state of one record: the one declaration of a row of a
  spectrogram store's per-record table (the ``records`` group of ``schemas/store-v5.json``;
  ``tests/test_store.py`` checks that they are the same set).
  ``record_outcomes`` makes the rows from the records' plans, ``record_table`` the table's
  columns from the rows, ``record_columns`` the columns from the plans (no row objects);
  ``RecordTable`` holds the columns and gives the rows on access;
* ``PreprocessReport``: what a preprocess run did; ``text()`` is its end-of-job summary,
  ``to_dict()`` the ``--report`` JSON;
* ``store_text`` (``spectrogram_store_text``, ``scores_store_text``): the summary of a store
  that ``ecg-pipeline inspect`` prints, after the store's schema check.

Nothing here knows about Dask or the command line; the store readers are imported where
they are used, so that importing a report stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from .extract import RecordPlan
    from .store import Layout


@dataclass
class RecordOutcome:
    """Final state of one record: a row of the store's per-record table (``record_<field>``; ``record`` is
    ``record_id``)."""

    record: str
    status: str  #: "ok", "failed", or "pending" while the job runs
    error: str  #: "<stage>: <cause>" of a failed record
    quality: str  #: why the record is doubtful (``quality.record_quality``); "" when nothing is to be said
    checksum: str
    lead: str
    offset: int  #: the record's first segment
    n_segments: int
    n_dropped_edge: int
    n_dropped_invalid: int
    n_dropped_unknown: int
    n_unknown: int
    n_nonbeat: int
    fs: float
    sig_len: int


#: Fields a record's plan carries under the same name; the others are set by the job (``record_outcomes``).
_JOB_FIELDS = ("record", "status", "error", "offset", "n_segments")


def record_outcomes(names: Sequence[str], layout: Layout, plans: Mapping[str, RecordPlan],
                    failures: Mapping[str, str], final: bool) -> list[RecordOutcome]:
    """One row per record of ``layout``, from its plan and the failures of the write phase.

    Parameters
    ----------
    names
        The records in store order (``layout.records``).
    failures
        Record -> error of the chunks that failed to be written.
    final
        False while chunks are still being written: records that have not failed are "pending".
    """
    from_plan = [f.name for f in dataclasses.fields(RecordOutcome) if f.name not in _JOB_FIELDS]
    rows = []
    for r, off, n in zip(names, layout.offsets, layout.n_segments_per_record):
        p = plans[r]
        error = p.error or failures.get(r, "")
        rows.append(RecordOutcome(record=r, status="failed" if error else ("ok" if final else "pending"), error=error,
                                  offset=int(off), n_segments=int(n), **{k: getattr(p, k) for k in from_plan}))
    return rows


def record_columns(names: Sequence[str], layout: Layout, plans: Mapping[str, RecordPlan],
                   failures: Mapping[str, str], final: bool) -> dict[str, np.ndarray]:
    """``record_table(record_outcomes(...))`` a column at a time, with no object per record: what a commit writes
    while the job runs (0.2 s where the outcomes took 1.3 s for 100,000 recordings)."""
    held = [plans[r] for r in names]
    errors = [p.error or failures.get(r, "") for r, p in zip(names, held)]
    ok = "ok" if final else "pending"
    columns: dict[str, list] = {"status": ["failed" if e else ok for e in errors], "error": errors,
                                "offset": [int(x) for x in layout.offsets],
                                "n_segments": [int(x) for x in layout.n_segments_per_record]}
    table = {"record_id": np.array(list(names), dtype=object)}
    for f in dataclasses.fields(RecordOutcome):
        if f.name != "record":
            values = columns[f.name] if f.name in columns else [getattr(p, f.name) for p in held]
            table[f"record_{f.name}"] = np.array(values, dtype=object if f.type == "str" else None)
    return table


def record_table(rows: Sequence[RecordOutcome]) -> dict[str, np.ndarray]:
    """The columns ``record_id`` and ``record_<field>`` of the store's per-record table (``store.write_record_table``).

    String fields become object arrays (Zarr's variable-length strings); numbers keep numpy's type of
    their values (int64, float64), as the schema declares them.
    """
    table = {"record_id": np.array([r.record for r in rows], dtype=object)}
    for f in dataclasses.fields(RecordOutcome):
        if f.name != "record":
            # ``f.type`` is the annotation's text: this module postpones annotations.
            table[f"record_{f.name}"] = np.array([getattr(r, f.name) for r in rows],
                                                 dtype=object if f.type == "str" else None)
    return table


class RecordTable(Sequence[RecordOutcome]):
    """The per-record table held as its columns (``record_id``, ``record_<field>``, as ``record_table`` makes them):
    a sequence of ``RecordOutcome`` rows, each made when it is asked for. What a preprocess report keeps of each of
    100,000 recordings: a few numbers and shared strings (~0.1 kB), where a row object takes ~0.3 kB."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        self.columns = dict(columns)
        n = len(self.columns["record_id"])
        if any(len(c) != n for c in self.columns.values()):
            raise ValueError("record table columns of different lengths")

    @classmethod
    def from_rows(cls, rows: Sequence[RecordOutcome]) -> RecordTable:
        return rows if isinstance(rows, RecordTable) else cls(record_table(rows))

    def __len__(self) -> int:
        return len(self.columns["record_id"])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        values = {f: self.columns[f"record_{f}"][i] for f in _ROW_FIELDS}
        return RecordOutcome(record=self.columns["record_id"][i],
                             **{k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()})

    def column(self, name: str) -> np.ndarray:
        """A field of every row (``"record"`` or a ``RecordOutcome`` field)."""
        return self.columns["record_id" if name == "record" else f"record_{name}"]

    def rows(self, mask: np.ndarray) -> list[RecordOutcome]:
        """The rows where ``mask`` is true."""
        return [self[int(i)] for i in np.flatnonzero(mask)]


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(RecordOutcome) if f.name != "record")


@dataclass
class PreprocessReport:
    """What a run did: per-record outcomes, class counts, timings."""

    out: str
    database: str
    version: str
    records: RecordTable  #: one row a record (a list of ``RecordOutcome`` is taken and turned into a table)
    segments_per_class: dict[str, int]
    chunks_total: int
    chunks_written: int
    chunks_skipped: int
    missing_source_files: tuple[str, ...]
    listing_error: str | None
    wall_s: float
    phase_s: dict[str, float]
    stage_s: dict[str, float]
    bytes_downloaded: int
    records_read: int = 0  #: records read this run (planned, and their segments computed)
    records_reused: int = 0  #: records of a resumed store whose plan was reused: files and chunks unchanged

    def __post_init__(self) -> None:
        self.records = RecordTable.from_rows(self.records)

    @property
    def _ok(self) -> np.ndarray:
        return self.records.column("status") == "ok"

    @property
    def failed(self) -> list[RecordOutcome]:
        return self.records.rows(~self._ok)

    @property
    def n_segments(self) -> int:
        return int(self.records.column("n_segments")[self._ok].sum())  # written, not planned

    @property
    def ok(self) -> bool:
        return bool(self._ok.all())

    def text(self) -> str:
        """The end-of-job summary that ``ecg-pipeline preprocess`` prints."""
        ok, col = self._ok, self.records.column  # every count below is of written records

        def total(name: str) -> int:
            return int(col(name)[ok].sum())

        failed = np.flatnonzero(~ok)
        lines = [
            "",
            f"{self.database} {self.version} -> {self.out}",
            f"  records     {int(ok.sum())} done, {len(failed)} failed, {len(self.records)} total"
            + (f" ({self.records_reused:,} unchanged since the last run, {self.records_read:,} read)"
               if self.records_reused else ""),
            f"  segments    {self.n_segments:,}   chunks written {self.chunks_written}, "
            f"already there {self.chunks_skipped}, of {self.chunks_total}",
            "  per class   " + "   ".join(f"{c} {n:,}" for c, n in self.segments_per_class.items()),
            f"  dropped     {total('n_dropped_edge'):,} at record edges, "
            f"{total('n_dropped_invalid'):,} over invalid samples, "
            f"{total('n_dropped_unknown'):,} unknown symbols "
            f"({total('n_unknown'):,} unknown in all)",
            f"  downloaded  {self.bytes_downloaded / 1e6:,.1f} MB",
            f"  wall time   {self.wall_s:.1f} s  ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_s.items()) + ")",
        ]
        if self.missing_source_files:
            lines.append(f"  note: the source lacks {len(self.missing_source_files)} file(s) listed in SHA256SUMS.txt: "
                         f"{', '.join(self.missing_source_files)} (no record that succeeded needed them)")
        flagged = np.flatnonzero(ok & (col("quality") != ""))
        if len(flagged):
            lines.append(f"  quality     {len(flagged)} record(s) with a doubt (record_quality in the store):")
            lines += [f"    {col('record')[i]:>8}  {col('quality')[i]}" for i in flagged[:20]]
            if len(flagged) > 20:
                lines.append(f"    ... and {len(flagged) - 20} more")
        lines += failure_lines(list(zip(col("record")[failed], col("error")[failed])),
                               f"every one: `ecg-pipeline inspect {self.out}` or --report")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (``--report``): every field (``records`` a list of rows), then
        ``n_segments`` and ``ok``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["records"] = [dataclasses.asdict(r) for r in self.records]
        d["n_segments"] = self.n_segments
        d["ok"] = self.ok
        return d


def failure_lines(failed: Sequence[tuple[str, str]], where: str, listed: int = 20, examples: int = 3) -> list[str]:
    """The failed records of a job summary: each with its error up to ``listed`` of them; beyond, the counts by
    cause (the stage an error names, ``"<stage>: <cause>"``) with the first ``examples`` records of each, and
    ``where`` every one is (a job over 100,000 records prints a dozen lines, not a line a record)."""
    if not failed:
        return []
    if len(failed) <= listed:
        return ["  failed records:", *(f"    {r:>8}  {e}" for r, e in failed)]
    by_cause: dict[str, list[tuple[str, str]]] = {}
    for record, error in failed:
        by_cause.setdefault(error.split(":", 1)[0].strip() or "unknown", []).append((record, error))
    lines = [f"  failed records by cause ({len(failed):,}; {where}):"]
    for cause, rows in sorted(by_cause.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"    {cause:<12} {len(rows):>8,}")
        lines += [f"      {r:>8}  {e}" for r, e in rows[:examples]]
        if len(rows) > examples:
            lines.append(f"      ... and {len(rows) - examples:,} more")
    return lines


def store_text(path: str, require_complete: bool = True, storage_options: Mapping[str, Any] | None = None) -> str:
    """The summary ``ecg-pipeline inspect`` prints: of a spectrogram store or a scores store (``store.store_kind``).

    Raises
    ------
    StoreError
        The path holds no store of ecg-pipeline, or one that does not match its schema.
    """
    from .store import store_kind

    render = scores_store_text if store_kind(path, storage_options) == "scores" else spectrogram_store_text
    return render(path, require_complete, storage_options)


def spectrogram_store_text(path: str, require_complete: bool = True,
                           storage_options: Mapping[str, Any] | None = None) -> str:
    """A spectrogram store (``store.open_dataset``, validated): its header, shapes, classes and per-record table."""
    from .store import open_dataset

    ds = open_dataset(path, require_complete=require_complete, storage_options=storage_options)
    a = ds.attrs
    out = [f"{path}: {a['database']} {a['database_version']} ({a['database_title']}), "
           f"schema v{a['schema_version']}, complete={a['complete']}",
           f"  spectrogram {dict(ds.spectrogram.sizes)} {ds.spectrogram.dtype}, chunks {ds.spectrogram.encoding.get('chunks')}",
           f"  freq {float(ds.freq[0]):.1f}-{float(ds.freq[-1]):.1f} Hz, time {float(ds.time[0]):+.3f}..{float(ds.time[-1]):+.3f} s",
           "  per class   " + "   ".join(f"{c} {n:,}" for c, n in a.get("segments_per_class", {}).items()),
           f"  {'record':>8} {'status':>7} {'lead':>5} {'windows' if a.get('task') == 'rhythm' else 'beats':>7} "
           f"{'offset':>8} {'checksum':>9}  error"]
    for i in range(ds.sizes["record_id"]):
        row = {k: ds[k].values[i] for k in ("record_id", "record_status", "record_lead", "record_n_segments",
                                           "record_offset", "record_checksum", "record_error")}
        out.append(f"  {row['record_id']:>8} {row['record_status']:>7} {row['record_lead']:>5} {row['record_n_segments']:>7} "
                   f"{row['record_offset']:>8} {row['record_checksum']:>9}  {row['record_error']}")
    return "\n".join(out) + "\n"


def scores_store_text(path: str, require_complete: bool = True, storage_options: Mapping[str, Any] | None = None) -> str:
    """A scores store (``scores.open_scores``, validated): its header, class counts and per-record table."""
    from .scores import open_scores

    ds = open_scores(path, require_complete=require_complete, storage_options=storage_options)
    a = ds.attrs
    classes = [str(c) for c in ds["class"].values]
    rhythm = a.get("task") == "rhythm"
    unit = "windows" if rhythm else "beats"
    out = [f"{path}: {a.get('task', 'beat')} scores of {a['input']} by {a['model']} (sha256 {a['model_sha256'][:12]}), "
           f"schema v{a['schema_version']}, complete={a['complete']}",
           f"  {ds.sizes['segment']:,} {unit}, {ds.sizes['record_id']} records",
           "  predicted   " + "   ".join(f"{c} {n:,}" for c, n in a.get("segments_per_class", {}).items()),
           f"  {'record':>16} {'status':>7} {unit:>7} " + " ".join(f"{c:>6}" for c in classes)
           + ("  record class  error" if rhythm else "  ectopic  error")]
    for i in range(ds.sizes["record_id"]):
        counts = " ".join(f"{int(n):>6}" for n in ds.record_segments.values[i])
        verdict = (f"{ds.record_predicted.values[i]:>12}" if rhythm
                   else f"{float(ds.record_ectopic_share.values[i]):>7.1%}")
        out.append(f"  {ds.record_id.values[i]:>16} {ds.record_status.values[i]:>7} {int(ds.record_n_segments.values[i]):>7} "
                   f"{counts}  {verdict}  {ds.record_error.values[i]}")
    return "\n".join(out) + "\n"
