"""Stage 10: the Zarr store of scores written by ``ecg-pipeline score``.

Layout (``schemas/scores-v4.json`` is the contract, checked on open; the scores side
of the schema family of ``store-v5.json``: ``task`` and ``anchor_kind`` in the root group's
attributes, netCDF-safe as there, ``store.encode_attrs``):

* group ``segments``, per segment (a beat, for beat models), on dimension ``segment``: ``probability
  (segment, class)``, ``predicted`` (the unreadable class where ``quality`` is set),
  ``reference`` (the matched reference class, when the record has annotations),
  ``quality`` (the signal-quality indices the segment failed, ``signal_quality.FLAGS``)
  and the coordinates ``record`` and ``anchor`` (the detected R peak, at the record's
  sampling rate);
* ``class``: the model's classes (N, S, V, F, Q; N, A, O, ~), in both groups;
* group ``records``, the per-record table on ``record``: status and error, lead, segments per
  predicted class, and for beats the ectopic share and the detector's counts against
  the reference (``record_tp/fn/fp``); for rhythm models (segments are windows) the
  record's probabilities (the mean over its windows), its predicted class and its
  reference class where a label table gives one.

Only the job's driver writes this store; workers return their results to it. Each
commit appends the beats of finished records after the committed ones, then
rewrites the small per-record table, then moves the commit point: one write of
``_state``'s attributes (hidden from xarray) holding ``n_segments`` and the committed
table rows, then the ``n_segments`` attribute that readers use. Rewriting the table
replaces its ~20 arrays one by one, so a crash in the middle can leave any mix of
old, new and missing ones; the next run therefore rebuilds the table from
``_state``, cuts the arrays back to its ``n_segments`` and scores the other records
again, so no beat is lost or written twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from .. import schemas
from . import store
from .errors import StoreError
from .locations import url_options

SCHEMA_FILE = "scores-v4.json"
KIND = "scores"  #: the ``kind`` attribute: tells a scores store from a spectrogram store
SEGMENT_VARS = ("probability", "predicted", "reference", "quality", "record", "anchor")
SEGMENT_COORDS = ("record", "anchor")
ECTOPIC = ("S", "V", "F")
RHYTHM_TABLE = ("record_probability", "record_predicted", "record_reference_class")  #: rhythm stores only
STATE_GROUP = "_state"  #: its attributes are the commit point: ``n_segments`` and the committed rows (JSON)


def scores_schema() -> dict[str, Any]:
    """The scores store schema (``schemas/scores-v4.json``)."""
    return schemas.load(SCHEMA_FILE)


def _variables(group: str) -> dict[str, dict[str, Any]]:
    """The schema's variables of ``group`` (``store.SEGMENTS`` or ``store.RECORDS``)."""
    return scores_schema()["groups"][group]


def _attr_kinds() -> dict[str, str]:
    return {k: v.get("type", "") for k, v in scores_schema()["attrs"]["properties"].items()}


@dataclass
class RecordScores:
    """The scores of one record (or the reason it has none), as a worker returns them."""

    record: str
    status: str = "ok"  #: ok or failed
    error: str = ""  #: "<stage>: <cause>" when failed
    checksum: str = ""
    lead: str = ""
    lead_fallback: bool = False
    fs: float = 0.0
    sig_len: int = 0
    anchor: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    probability: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0, object))  #: "" where unmatched
    #: per segment, the signal-quality indices it failed (``signal_quality.FLAGS``; 0: readable)
    flags: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    n_detected: int = 0
    n_dropped_edge: int = 0
    n_dropped_invalid: int = 0
    reference_file: str = ""  #: annotation extension compared with; "" without reference
    n_reference: int = 0  #: reference beats where a window fits (the detector figures' beats)
    n_reference_edge: int = 0  #: reference beats nearer a record end than a window's half-width (not counted)
    tp: int = 0
    fn: int = 0
    fp: int = 0
    seconds: float = 0.0
    task: str = "beat"  #: the model's task: rhythm records also get a record-level prediction
    reference_class: str = ""  #: rhythm: the record's class in a label table, "" when none
    quality: str = ""  #: why the record is doubtful (``pipeline.quality``), "" when nothing is to be said

    @property
    def n_segments(self) -> int:
        return int(self.anchor.shape[0]) if self.status == "ok" else 0

    @property
    def segment_flags(self) -> np.ndarray:
        """``flags``, or zeros (readable) where the segments were not judged."""
        n = int(self.anchor.shape[0])
        return self.flags.astype(np.uint8) if self.flags.shape == (n,) else np.zeros(n, np.uint8)

    def predicted_index(self, classes: Sequence[str]) -> np.ndarray:
        """Each segment's predicted class (an index into ``classes``): the most probable one, or the task's
        unreadable class (``Task.unreadable_class``) where the segment failed a quality index."""
        if not self.n_segments:
            return np.zeros(0, np.int64)
        idx = np.argmax(self.probability, axis=1)
        u = _task(self.task).unreadable_index(classes)
        if u is not None:
            idx = np.where(self.segment_flags != 0, u, idx)
        return idx

    @property
    def unreadable(self) -> float:
        """The share of segments judged unreadable (NaN without segments)."""
        return float(np.count_nonzero(self.segment_flags)) / self.n_segments if self.n_segments else float("nan")

    @property
    def record_probability(self) -> np.ndarray:
        """Rhythm: the mean of the windows' probabilities (NaN without windows)."""
        if not self.n_segments:
            return np.full(self.probability.shape[1] if self.probability.ndim == 2 else 0, np.nan, np.float32)
        return self.probability.mean(axis=0).astype(np.float32)


#: Per-record values the table computes from a record's segments, not copied from its ``RecordScores``.
_COMPUTED = ("offset", "n_segments", "segments", "ectopic_share", "probability", "predicted", "reference_class",
             "unreadable")
#: The table's ``record_reference`` is the annotation extension compared with (``RecordScores.reference_file``).
_ALIASES = {"reference": "reference_file"}


def _task(name: str | None):
    from .tasks import get_task  # late: the tasks' modules import this one

    return get_task(name)


def table_columns(task: str | None = None) -> tuple[str, ...]:
    """The per-record table's columns, in schema order: the ``records`` group of ``schemas/scores-v4.json`` is
    the one declaration of a row (``record`` and ``class`` are its coordinates, not columns); the record-level
    prediction's only for tasks that make one (``Task.record_prediction``)."""
    whole = _task(task).record_prediction
    return tuple(name for name in _variables(store.RECORDS)
                 if name not in ("record", "class") and (whole or store.flat_name(name) not in RHYTHM_TABLE))


def merged_counts(parts: Sequence["RecordScores"]) -> dict[str, Any]:
    """The counts of a record's pieces, summed (``Task.merge``)."""
    keys = ("n_detected", "n_dropped_edge", "n_dropped_invalid", "n_reference", "n_reference_edge", "tp", "fn", "fp",
            "seconds")
    return {k: sum(getattr(p, k) for p in parts) for k in keys}


def scores_attrs(card, model: str, model_sha256: str, config, input_description: str) -> dict[str, Any]:
    """The attributes of a scores store of ``card``'s model (at ``model``, with those bytes) over an input."""
    from .. import pipeline

    return {
        "schema_version": scores_schema()["schema_version"], "kind": KIND, "task": card.task, "package": "ecg-pipeline",
        "package_version": pipeline.__version__, "model": str(model), "model_sha256": model_sha256,
        "model_database": card.database, "classes": list(card.classes), "label_map": card.label_map,
        "spectrogram": card.spec.attrs(), "input": input_description, "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(), **card.task_impl().scores_attrs(card, config),
    }


def table_row(r: RecordScores, offset: int, classes: Sequence[str]) -> dict[str, Any]:
    """The per-record table row of ``r`` placed at segment ``offset``."""
    row = {c: getattr(r, _ALIASES.get(c, c)) for c in table_columns() if c not in _COMPUTED}
    n = r.n_segments
    predicted = r.predicted_index(classes)
    counts = np.bincount(predicted, minlength=len(classes))[: len(classes)] if n else np.zeros(len(classes), np.int64)
    task = _task(r.task)
    ectopic = sum(int(counts[i]) for i, c in enumerate(classes) if c in task.ectopic)
    row.update(record=r.record, offset=int(offset), n_segments=n, segments=counts.astype(np.int64),
               unreadable=r.unreadable,
               ectopic_share=ectopic / n if n and task.ectopic else float("nan"))
    if task.record_prediction:
        p = r.record_probability if n else np.full(len(classes), np.nan, np.float32)
        row.update(probability=[float(v) for v in p], predicted=classes[int(np.argmax(p))] if n else "",
                   reference_class=r.reference_class)
    return row


def time_shares(anchor: np.ndarray, predicted: np.ndarray, sig_len: int, classes: Sequence[str]) -> np.ndarray:
    """Share of a record's time in each class: each window owns the samples from its start to the next one's.

    Windows cover the record end to end (the last one ends with it), so the shares sum to 1.
    """
    owned = np.diff(np.append(np.asarray(anchor, np.int64), sig_len)).clip(min=0)
    if anchor.size:
        owned[0] += int(anchor[0])  # nothing is before the first window but the record's start
    total = owned.sum()
    idx = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(classes))
    for c, n in zip(predicted, owned):
        out[idx[c]] += n
    return out / total if total else out


def episodes(anchor: np.ndarray, predicted: np.ndarray, sig_len: int, fs: float) -> list[tuple[float, float, str]]:
    """``(start_s, end_s, class)`` runs of consecutive windows of one class, each window owning its time until the
    next window's start (``time_shares``)."""
    out: list[tuple[float, float, str]] = []
    ends = np.append(np.asarray(anchor, np.int64)[1:], sig_len)
    for a, e, c in zip(anchor, ends, predicted):
        if out and out[-1][2] == c:
            out[-1] = (out[-1][0], float(e) / fs, c)
        else:
            out.append((float(a) / fs if not out else out[-1][1], float(e) / fs, str(c)))
    return out


class ScoresWriter:
    """The driver's handle on a scores store: create or resume it, commit finished records.

    Parameters
    ----------
    path
        Local path or fsspec URL of the store.
    attrs
        Group attributes; an existing store must hold the same ``model_sha256`` and
        ``config_fingerprint`` (scores of two models or detector settings never mix)
        unless ``overwrite``.
    classes
        The model's classes (the ``class`` coordinate).
    chunk_size
        Segments per Zarr chunk.
    """

    def __init__(self, path: str, attrs: Mapping[str, Any], classes: Sequence[str], chunk_size: int, *,
                 overwrite: bool = False, storage_options: Mapping[str, Any] | None = None):
        self.path, self.classes, self.storage_options = path, tuple(classes), storage_options
        self.task = str(attrs.get("task", "beat"))
        self.schema = scores_schema()
        attrs = dict(attrs)
        group = None
        if not overwrite:
            try:
                group = store.open_group(path, "r+", storage_options)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                group = None
            except Exception as exc:  # noqa: BLE001 - a plain folder, a zarr v2 store
                raise StoreError(f"{path} exists but is not a Zarr v3 group ({type(exc).__name__}: {exc}); "
                                 "choose another --out or pass --overwrite") from exc
        self.rows: dict[str, dict[str, Any]] = {}
        self.created = group is None  #: this writer made the store (nothing was there)
        if group is not None:
            old = store.decode_attrs(group.attrs, _attr_kinds())
            if old.get("kind") not in (KIND, "beat-scores"):
                raise StoreError(f"{path} is not a scores store written by `ecg-pipeline score`; choose another --out "
                                 "or pass --overwrite")
            if old.get("schema_version") != self.schema["schema_version"]:
                raise StoreError(f"{path} holds scores of schema v{old.get('schema_version')} (this ecg-pipeline "
                                 f"writes v{self.schema['schema_version']}); pass --overwrite to score again into it, "
                                 "or choose another --out")
            for key, what in (("model_sha256", "model"), ("config_fingerprint", "detector/lead configuration")):
                if old.get(key) != attrs.get(key):
                    raise StoreError(f"{path} holds scores from a different {what} ({key} {str(old.get(key))[:12]}, "
                                     f"now {str(attrs.get(key))[:12]}); pass --overwrite or choose another --out")
            attrs["created"] = old.get("created") or store.now()
            self.n = int(old.get("n_segments", 0))
            self._cut_back(group)
        else:
            local = Path(path)
            if not overwrite and "://" not in path and local.is_dir() and any(local.iterdir()):
                raise StoreError(f"{path} is a folder with other files in it, not a scores store; choose another --out")
            group = store.open_group(path, "w", storage_options)
            attrs.setdefault("created", store.now())
            self.n = 0
            self._create(group, chunk_size)
            self._write_table(group)
        self._save_state(group)
        attrs.update(complete=False, updated=store.now(), n_segments=self.n, n_records=len(self.rows),
                     chunk_size=chunk_size)
        group.update_attributes(store.encode_attrs(attrs))  # one metadata write, not one a key
        self.group = group
        self.seg = group[store.SEGMENTS]  #: the per-segment arrays

    def _create(self, group, chunk_size: int) -> None:
        seg = group.require_group(store.SEGMENTS)
        for name, spec in _variables(store.SEGMENTS).items():
            dims = spec["dims"]
            shape = tuple(0 if d == "segment" else len(self.classes) for d in dims)
            chunks = tuple(chunk_size if d == "segment" else max(len(self.classes), 1) for d in dims)
            store.create_array(seg, name, spec, shape, chunks, spec["dtype"][0],
                               coordinates=SEGMENT_COORDS if name in ("probability", "predicted", "reference", "quality")
                               else ())
        seg["class"][:] = np.asarray(self.classes, dtype=object)

    def _cut_back(self, group) -> None:
        """Drop what a crashed run wrote past the commit point; rebuild the table from it."""
        state = dict(group[STATE_GROUP].attrs) if STATE_GROUP in group else {}
        if "rows" in state:
            self.n = int(state["n_segments"])
            self.rows = {row["record"]: row for row in json.loads(state["rows"])}
        for name in SEGMENT_VARS:
            a = group[f"{store.SEGMENTS}/{name}"]
            if a.shape[0] != self.n:
                a.resize((self.n, *a.shape[1:]))
        self._write_table(group)  # the arrays may be any mix of two commits' tables

    @property
    def done(self) -> set[str]:
        """Records already scored (status ok); a re-run skips them. Failed records are tried again."""
        return {r for r, row in self.rows.items() if row["status"] == "ok"}

    def commit(self, results: Iterable[RecordScores]) -> None:
        """Append the segments of ``results``, then their table rows, then move the commit point."""
        results = list(results)
        if not results:
            return
        beats = [r for r in results if r.n_segments]
        n_new = self.n + sum(r.n_segments for r in beats)
        if beats:
            values = {
                "probability": np.concatenate([r.probability for r in beats]).astype(np.float32),
                "predicted": np.asarray(self.classes, dtype=object)[
                    np.concatenate([r.predicted_index(self.classes) for r in beats])],
                "reference": np.concatenate([np.asarray(r.reference, dtype=object) for r in beats]),
                "quality": np.concatenate([r.segment_flags for r in beats]),
                "record": np.concatenate([np.full(r.n_segments, r.record, dtype=object) for r in beats]),
                "anchor": np.concatenate([r.anchor for r in beats]).astype(np.int64),
            }
            for name, v in values.items():
                a = self.seg[name]
                a.resize((n_new, *a.shape[1:]))
                a[self.n:n_new] = v
        offset = self.n
        for r in results:
            self.rows[r.record] = table_row(r, offset, self.classes)
            offset += r.n_segments
        self._write_table(self.group)
        self.n = n_new
        self._save_state(self.group)  # the commit point
        self.group.update_attributes({"n_segments": self.n, "n_records": len(self.rows), "updated": store.now()})

    def _save_state(self, group) -> None:
        """Record ``n`` and the table rows in one (atomic) metadata write."""
        rows = [{k: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v) for k, v in row.items()}
                for row in self.rows.values()]
        state = group.require_group(STATE_GROUP)
        state.update_attributes({"n_segments": self.n, "rows": json.dumps(rows)})

    def _write_table(self, group) -> None:
        rows = list(self.rows.values())
        n = len(rows)
        table = group.require_group(store.RECORDS)
        for name, spec in _variables(store.RECORDS).items():
            if name == "class":
                store.create_array(table, name, spec, (len(self.classes),), (max(len(self.classes), 1),), "str")[:] = \
                    np.asarray(self.classes, dtype=object)
                continue
            if not _task(self.task).record_prediction and store.flat_name(name) in RHYTHM_TABLE:
                continue
            key = name  # table rows are keyed by the group's names
            dtype = spec["dtype"][0]
            if spec["dims"] == ["record", "class"]:
                values = np.asarray([r[key] for r in rows], dtype=dtype).reshape(n, len(self.classes))
                shape, chunks = (n, len(self.classes)), (max(n, 1), len(self.classes))
            else:
                # Rows committed before a column existed (an optional one, such as quality) give its empty value.
                empty = "" if dtype == "str" else 0
                values = np.asarray([r.get(key, empty) if spec.get("optional") else r[key] for r in rows],
                                    dtype=object if dtype == "str" else dtype)
                shape, chunks = (n,), (max(n, 1),)
            arr = store.create_array(table, name, spec, shape, chunks, dtype)
            if n:
                arr[:] = values

    def segments(self, *names: str) -> list[np.ndarray]:
        """Whole committed per-segment arrays, read once each (one read per record would cost seconds per
        thousand records); strings as object arrays."""
        return [np.asarray(self.seg[name][:self.n], dtype=np.int64 if name == "anchor" else object)
                for name in names]

    def discard_if_new_and_empty(self) -> None:
        """Remove the store if this writer created it and nothing was committed (the job could not start)."""
        if self.created and self.n == 0 and not self.rows:
            fs, root = fsspec.core.url_to_fs(self.path, **dict(self.storage_options or {}))
            fs.rm(root, recursive=True)

    def finish(self, attrs: Mapping[str, Any]) -> None:
        """Set the end-of-job attributes (``complete``, class counts, reference metrics), then consolidate the
        metadata (``store.consolidate``)."""
        self.group.update_attributes(store.encode_attrs({**attrs, "updated": store.now()}))
        store.consolidate(self.group)


def records_frame(rows: Iterable[Mapping[str, Any]], classes: Sequence[str], task: str | None = None
                  ) -> pd.DataFrame:
    """Per-record summary rows -> a DataFrame for CSV/Parquet.

    Counts in the task's unit (``n_beats``, ``beats_<class>``; ``n_windows``, ``windows_<class>``); for tasks
    that predict whole records (rhythm), the record's ``predicted`` class, its probabilities ``p_<class>`` and
    its ``reference_class``; for beats the ectopic share and the detector's counts.
    """
    t = _task(task)
    unit, whole = t.unit, t.record_prediction
    out = []
    for r in rows:
        d = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()
             if k not in ("segments", "n_segments", "probability")}
        d[f"n_{unit}"] = int(r["n_segments"])
        d.update({f"{unit}_{c}": int(n) for c, n in zip(classes, r["segments"])})
        if whole:
            d.update({f"p_{c}": float(p) for c, p in zip(classes, r.get("probability") or [np.nan] * len(classes))})
        out.append(d)
    per_record = ["predicted", *[f"p_{c}" for c in classes], "reference_class"] if whole else []
    detector = ["ectopic_share"] if t.ectopic else []
    cols = ["record", "status", "error", "quality", "unreadable", *per_record, f"n_{unit}", *[f"{unit}_{c}" for c in classes], *detector,
            "lead", "lead_fallback", "fs", "sig_len", "n_detected", "n_dropped_edge", "n_dropped_invalid",
            "reference", "n_reference", "n_reference_edge", "tp", "fn", "fp", "checksum", "offset", "seconds"]
    if not t.detector_columns:
        cols = [c for c in cols if c not in ("n_detected", "n_reference", "n_reference_edge", "tp", "fn", "fp")]
    return pd.DataFrame(out, columns=cols)


def _open_group_ds(path: str, storage_options: Mapping[str, Any] | None, group: str | None = None) -> xr.Dataset:
    try:
        return xr.open_zarr(path, group=group, consolidated=False, zarr_format=3, chunks=None, decode_timedelta=False,
                            storage_options=url_options(path, storage_options))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"no Zarr store at {path}" + (f" (or no group {group} in it)" if group else "")) from exc
    except Exception as exc:  # noqa: BLE001
        raise StoreError(f"cannot open {path} as a Zarr v3 store: {type(exc).__name__}: {exc}") from exc


def _plain(ds: xr.Dataset) -> xr.Dataset:
    """Zarr v3 strings arrive as numpy StringDType, which xarray's where/concat cannot promote yet: object arrays."""
    return ds.map(lambda v: v.astype(object) if v.dtype.kind == "T" else v).assign_coords(
        {n: ds[n].astype(object) if ds[n].dtype.kind == "T" else ds[n] for n in ds.coords})


def open_scores_tree(path: str, *, storage_options: Mapping[str, Any] | None = None,
                     require_complete: bool = True) -> xr.DataTree:
    """Open a scores store as a validated ``xarray.DataTree``: ``segments`` (beats past the commit point left out)
    and ``records`` (the per-record table on ``record``), the root's attributes decoded.

    Raises
    ------
    StoreError
        The path is not a scores store, does not match ``schemas/scores-v4.json``, or
        its job has not finished (unless ``require_complete=False``).
    """
    root = _open_group_ds(path, storage_options)
    attrs = store.decode_attrs(root.attrs, _attr_kinds())
    if attrs.get("kind") in (KIND, "beat-scores") and attrs.get("schema_version") != scores_schema()["schema_version"]:
        raise StoreError(f"{path} holds scores of schema v{attrs.get('schema_version')}; this ecg-pipeline reads "
                         f"v{scores_schema()['schema_version']} (groups segments and records, netCDF-safe attributes): "
                         "score again with --overwrite, or into a new --out")
    if require_complete and attrs.get("kind") == KIND and not attrs.get("complete"):
        raise StoreError(f"{path}: the scoring job has not finished (attrs complete=false): re-run "
                         "`ecg-pipeline score` with the same --out to finish it")
    groups = {g: _open_group_ds(path, storage_options, g) for g in (store.SEGMENTS, store.RECORDS)}
    problems = store.schema_problems(xr.Dataset(attrs=attrs), {"variables": {}, "attrs": scores_schema()["attrs"]})
    for g, ds in groups.items():
        problems += [f"{g}/{p}" for p in store.schema_problems(ds.drop_attrs(deep=False),
                                                              {"variables": _variables(g), "attrs": {}})]
    if problems:
        raise StoreError(f"{path} does not match {SCHEMA_FILE}:\n  " + "\n  ".join(problems))
    segments = groups[store.SEGMENTS].isel(segment=slice(0, int(attrs["n_segments"])))
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=attrs), f"/{store.SEGMENTS}": _plain(segments),
                                  f"/{store.RECORDS}": _plain(groups[store.RECORDS])})


def open_scores(path: str, *, storage_options: Mapping[str, Any] | None = None,
                require_complete: bool = True) -> xr.Dataset:
    """A scores store as the pipeline reads it: one validated ``xarray.Dataset`` of the segments and the
    per-record table, the table's variables named ``record_id`` and ``record_<name>`` (``open_scores_tree``
    gives the two groups apart, as users see them).

    Raises
    ------
    StoreError
        As ``open_scores_tree``.
    """
    tree = open_scores_tree(path, storage_options=storage_options, require_complete=require_complete)
    records = tree[store.RECORDS].to_dataset()
    records = records.rename({n: store.flat_name(n) for n in records.variables if n != "class"})
    flat = xr.merge([tree[store.SEGMENTS].to_dataset(), records], combine_attrs="override")
    flat.attrs = dict(tree.attrs)
    return flat


def unreadable_counts(writer: "ScoresWriter", rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Segments judged unreadable over the whole store: how many, their share, the records holding any and the
    count failing each index (``signal_quality.FLAGS``; a segment may fail several)."""
    from .signal_quality import FLAGS

    q = np.asarray(writer.seg["quality"][: writer.n], dtype=np.uint8)
    n_bad = int(np.count_nonzero(q))
    return {"segments": n_bad, "share": n_bad / q.size if q.size else 0.0,
            "records": sum(1 for r in rows if r["status"] == "ok" and (r.get("unreadable") or 0) > 0),
            "by_index": {name: int(np.count_nonzero(q & bit)) for name, bit in FLAGS.items()}}


def segments_per_class(rows: Iterable[Mapping[str, Any]], classes: Sequence[str]) -> dict[str, int]:
    """Scored segments per predicted class over the table's ok records."""
    total = np.zeros(len(classes), np.int64)
    for r in rows:
        if r["status"] == "ok":
            total += np.asarray(r["segments"], dtype=np.int64)
    return {c: int(n) for c, n in zip(classes, total)}



@dataclass(frozen=True)
class RecordView:
    """One record of a scores store: its segments (beats or windows) and its table row, as arrays."""

    record: str
    task: str
    classes: tuple[str, ...]
    status: str
    error: str
    lead: str
    fs: float
    sig_len: int
    anchor: np.ndarray  #: int64, record samples at ``fs`` (R peaks, or window starts)
    predicted: np.ndarray  #: object array of class names
    reference: np.ndarray  #: object array: the matched reference class, "" where none
    probability: np.ndarray  #: (n, n_classes) float32
    reference_class: str = ""  #: rhythm: the record's class in a label table
    #: per segment, the signal-quality indices it failed (``signal_quality.FLAGS``; 0: readable)
    quality: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    @property
    def unreadable(self) -> float:
        """The share of the record's segments judged unreadable."""
        return float(np.count_nonzero(self.quality)) / self.quality.size if self.quality.size else 0.0

    @property
    def duration_s(self) -> float:
        return self.sig_len / self.fs if self.fs else 0.0

    @property
    def has_reference(self) -> bool:
        return bool(np.any(self.reference != "")) if self.reference.size else False


def record_names(ds: xr.Dataset) -> list[str]:
    """The records of a scores store's table, in table order."""
    return [str(r) for r in ds["record_id"].values]


def record_view(ds: xr.Dataset, record: str) -> RecordView:
    """The segments and table row of ``record`` in a scores store opened with ``open_scores``.

    Raises
    ------
    KeyError
        ``record`` is not in the store's table (the message lists what is).
    """
    names = record_names(ds)
    if record not in names:
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} records)" if len(names) > 10 else "")
        raise KeyError(f"record {record!r} is not in this scores store (records: {shown or 'none'})")
    i = names.index(record)
    row = {name: ds[name].values[i] for name in ds.data_vars if ds[name].dims[:1] == ("record_id",)}
    lo = int(row["record_offset"])
    hi = lo + int(row["record_n_segments"])
    seg = slice(lo, hi) if row["record_status"] == "ok" else slice(0, 0)

    def values(name, dtype=None):
        v = ds[name].values[seg] if name in ds.variables else np.zeros(0)
        return v.astype(dtype) if dtype is not None else v

    return RecordView(
        record=record, task=str(ds.attrs.get("task", "beat")), classes=tuple(str(c) for c in ds["class"].values),
        status=str(row["record_status"]), error=str(row["record_error"]), lead=str(row["record_lead"]),
        fs=float(row["record_fs"]), sig_len=int(row["record_sig_len"]),
        anchor=values("anchor", np.int64), predicted=values("predicted", object),
        reference=np.asarray(["" if not isinstance(r, str) else r for r in values("reference", object)], dtype=object),
        probability=values("probability", np.float32),
        reference_class=str(row.get("record_reference_class", "") or ""), quality=values("quality", np.uint8))


def sidecar(out: str, suffix: str) -> str:
    """A file beside the store: ``scores.zarr`` -> ``scores<suffix>`` (``.records.csv``, ``.metrics.json``)."""
    stem = out.rstrip("/")
    return (stem[: -len(".zarr")] if stem.endswith(".zarr") else stem) + suffix


def summary_path(out: str, summary: str | None) -> str:
    """The per-record table's file: ``summary``, else ``<out stem>.records.csv``."""
    return summary or sidecar(out, ".records.csv")
