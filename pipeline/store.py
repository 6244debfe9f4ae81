"""Stage 5: the labelled Zarr v3 store of spectrograms, one schema for beat and rhythm stores.

Layout (``schemas/store-v5.json`` is the contract, checked on write and on open):

* the root group's attributes: what the store holds, netCDF-safe (``encode_attrs``: objects and
  lists as JSON text, booleans as 0/1; ``decode_attrs`` reads them back);
* group ``segments``: ``spectrogram (segment, freq, time)`` with per-segment coordinates ``record``,
  ``anchor`` (the sample a segment is placed at), ``label`` (its class), ``symbol``
  (the label as its source wrote it) and ``lead``; records are contiguous runs of
  segments in the order of the source's record list. The group attributes say what
  the segments are: ``task`` (beat, rhythm), ``anchor_kind`` (r-peak, window-start),
  ``classes`` and ``label_source``; readers take the label variable and class list
  from the store, never from a constant;
* group ``records``: the per-record table on dimension ``record`` (``status``, ``offset``,
  ``n_segments``, ...), apart from the segments so that selections on segments never broadcast it;
* ``_state/chunk_fingerprint``: one entry (and one Zarr chunk) per segment chunk,
  hidden from xarray, saying which content each chunk holds. It makes re-runs
  resume: a chunk is rewritten only when its fingerprint differs from the plan;
* ``_state/record_plan``: per record, the summary of its plan (JSON text): a resumed job reuses it for a
  record whose files are unchanged and whose chunks are all written, without reading the record.

Writers never share a chunk: each write task owns whole ``segment`` chunks
(explicit, chunk-aligned slices; never ``region="auto"``), and only the job's
driver writes the group attributes and the per-record table. The job reads and writes
without consolidated metadata (a resized or half-written store is never read through stale
metadata); a finished job consolidates it for plain xarray readers.

Readers: ``open_tree`` gives the store as users see it (an ``xarray.DataTree``); ``open_dataset``
gives the pipeline's flat view (segments and the table in one Dataset, the table's variables named
``record_id`` and ``record_<name>`` as in stores of versions 2 to 4, which both read).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import zarr

from .. import schemas
from .errors import StoreError
from .locations import url_options

if TYPE_CHECKING:
    import xarray as xr

SCHEMA_FILE = "store-v5.json"
SEGMENTS = "segments"  #: the group of the per-segment arrays (schema v5)
RECORDS = "records"  #: the group of the per-record table (schema v5)
STATE_GROUP = "_state"
FINGERPRINT = "chunk_fingerprint"
PLAN = "record_plan"  #: ``_state/record_plan``: per record, the summary of its plan (JSON), for the next run
PLAN_CHUNK = 4096  #: plans a chunk of ``_state/record_plan`` (~1 MB of JSON): a commit rewrites only its last chunks
SEGMENT_COORDS = ("record", "anchor", "label", "symbol", "lead")
LABEL = "label"  #: the per-segment class variable
RR = "rr"  #: the per-segment RR features (beat stores, schema v3)
TEMPLATE = "template"  #: the per-segment median spectrogram of the neighbouring beats (beat stores, schema v4)
#: Schema versions this version reads: v2 stores are v4 stores without ``rr`` and ``template``, v3 stores without
#: ``template`` (models that do not take them use them); v2 to v4 are flat (no groups)
READABLE_VERSIONS = (2, 3, 4, 5)
GROUPED_VERSION = 5  #: the first schema version with ``segments`` and ``records`` groups


def store_schema() -> dict[str, Any]:
    """The store schema (``schemas/store-v5.json``)."""
    return schemas.load(SCHEMA_FILE)


def group_variables(group: str) -> dict[str, dict[str, Any]]:
    """The schema's variables of ``group`` (``SEGMENTS`` or ``RECORDS``), by their name there."""
    return store_schema()["groups"][group]


def flat_name(name: str) -> str:
    """The flat view's name of a ``records`` variable: ``record`` -> ``record_id``, ``status`` -> ``record_status``."""
    return "record_id" if name == "record" else f"record_{name}"


def flat_variables() -> dict[str, dict[str, Any]]:
    """The schema's variables as the flat view names them (``open_dataset``; stores of versions 2 to 4)."""
    out = dict(group_variables(SEGMENTS))
    for name, spec in group_variables(RECORDS).items():
        out[flat_name(name)] = {**spec, "dims": ["record_id"], "role": "coord" if name == "record" else "table"}
    return out


def segments_of(group, attrs: Mapping[str, Any]):
    """The Zarr group that holds a store's per-segment arrays: ``segments`` (schema v5), else the root."""
    return group[SEGMENTS] if int(attrs.get("schema_version") or 0) >= GROUPED_VERSION else group


def _attr_kinds() -> dict[str, str]:
    """The JSON type of each group attribute the schema declares (``object``, ``array``, ``boolean``, ...)."""
    return {k: v.get("type", "") for k, v in store_schema()["attrs"]["properties"].items()}


def encode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Group attributes as netCDF accepts them: objects and lists as JSON text, booleans as 0/1.

    Readers that know the schema get them back with ``decode_attrs``; netCDF, plain xarray and
    other Zarr readers see strings and numbers only.
    """
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value, default=str)
        else:
            out[key] = value
    return out


def decode_attrs(attrs: Mapping[str, Any], kinds: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``encode_attrs`` undone for the attributes ``kinds`` (default: the store schema's) declares as objects,
    arrays or booleans, and for undeclared ones whose text is a JSON object or array. Attributes already decoded
    (stores of versions 2 to 4) are left as they are."""
    kinds = _attr_kinds() if kinds is None else kinds
    out = dict(attrs)
    for key, value in attrs.items():
        kind = kinds.get(key)
        if kind is None and isinstance(value, str) and value[:1] in ("{", "["):
            kind = "object"  # an attribute the schema does not declare (a task's own, such as challenge_classes)
        if kind in ("object", "array") and isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass  # left as text: validation names it
        elif kind == "boolean" and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = bool(value)
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _zarr_dtype(name: str):
    return str if name == "str" else np.dtype(name)


def _fill(name: str):
    return "" if name == "str" else (np.nan if name.startswith("float") else 0)


@dataclass(frozen=True)
class Layout:
    """Shape of a store: where every record's segments go.

    Attributes
    ----------
    records
        Record names in store order (failed records included, with 0 segments).
    n_segments_per_record
        Segments per record.
    n_freq, n_time, chunk_size
        Spectrogram shape and segments per chunk.
    """

    records: tuple[str, ...]
    n_segments_per_record: tuple[int, ...]
    n_freq: int
    n_time: int
    chunk_size: int
    n_rr: int = 0  #: RR features per segment (beat stores); 0: no ``rr`` variable
    template: bool = False  #: a ``template`` variable (beat stores with ``template.beats`` > 0)

    @functools.cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # Computed once (read-only): a commit asks every chunk's parts, and each used to sum all 100,000 records
        ends = np.cumsum(np.asarray(self.n_segments_per_record, dtype=np.int64))
        starts = ends - np.asarray(self.n_segments_per_record, dtype=np.int64)
        starts.flags.writeable = ends.flags.writeable = False
        return starts, ends

    @property
    def offsets(self) -> np.ndarray:
        """Each record's first segment (read-only)."""
        return self._bounds[0]

    @property
    def ends(self) -> np.ndarray:
        """Each record's end segment (read-only)."""
        return self._bounds[1]

    @property
    def n_segments(self) -> int:
        ends = self._bounds[1]
        return int(ends[-1]) if ends.size else 0

    @property
    def n_chunks(self) -> int:
        return -(-self.n_segments // self.chunk_size)

    def chunk_parts(self, k: int) -> list[tuple[int, int, int]]:
        """Pieces of records in chunk ``k``: ``(record index, first segment, end segment)`` of the record."""
        lo = k * self.chunk_size
        hi = min(lo + self.chunk_size, self.n_segments)
        starts, ends = self._bounds
        parts = []
        for i in range(int(np.searchsorted(ends, lo, side="right")), len(starts)):
            if starts[i] >= hi:
                break
            a, b = max(lo, starts[i]), min(hi, ends[i])
            if a < b:
                parts.append((i, int(a - starts[i]), int(b - starts[i])))
        return parts

    def chunk_slice(self, k: int) -> slice:
        lo = k * self.chunk_size
        return slice(lo, min(lo + self.chunk_size, self.n_segments))


def chunk_fingerprint(config_fingerprint: str, parts: Sequence[tuple[str, str, int, int]]) -> str:
    """Identity of a chunk's content: the config plus ``(record, record digest, first, end)`` pieces."""
    h = _fingerprint_head(config_fingerprint)
    for j, p in enumerate(parts):
        h.update(_fingerprint_piece(j, p))
    h.update(b"]]")
    return h.hexdigest()


def prefix_fingerprints(config_fingerprint: str, parts: Sequence[tuple[str, str, int, int]]) -> list[str]:
    """``chunk_fingerprint`` of each prefix of ``parts`` (``parts[:1]``, ``parts[:2]``, ...) in one pass over them."""
    h = _fingerprint_head(config_fingerprint)
    out = []
    for j, p in enumerate(parts):
        h.update(_fingerprint_piece(j, p))
        closed = h.copy()
        closed.update(b"]]")
        out.append(closed.hexdigest())
    return out


# The hashed text is ``json.dumps([config_fingerprint, [list(p) for p in parts]])``, written a piece at a time so
# that every prefix can be closed on a copy of the hash; stores written before keep resuming.
def _fingerprint_head(config_fingerprint: str):
    return hashlib.sha256(f"[{json.dumps(config_fingerprint)}, [".encode())


def _fingerprint_piece(j: int, part: tuple[str, str, int, int]) -> bytes:
    return ((", " if j else "") + json.dumps(list(part))).encode()


def open_group(path: str, mode: str, storage_options: Mapping[str, Any] | None):
    return zarr.open_group(store=path, mode=mode, zarr_format=3, storage_options=url_options(path, storage_options),
                           use_consolidated=False)


#: The ``kind`` attribute of a scores store (``pipeline.scores.KIND``; "beat-scores" before rhythm models).
#: Spelled out here, not imported: ``scores`` imports this module.
SCORES_KINDS = ("scores", "beat-scores")


def _group_attrs(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        return decode_attrs(open_group(path, "r", storage_options).attrs)
    except Exception as exc:  # noqa: BLE001 - a missing path, a plain folder, a Zarr v2 store
        raise StoreError(f"{path} is not a store of ecg-pipeline: no Zarr v3 group there "
                         f"({type(exc).__name__}: {exc})") from None


def store_kind(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """What a path holds: ``"spectrograms"`` (a store of ``preprocess``) or ``"scores"`` (of ``score``).

    Only the group attributes are read: a scores store says ``kind`` ("scores", or "beat-scores" for
    stores written before rhythm models); a spectrogram store has no ``kind``. Neither store is validated.

    Raises
    ------
    StoreError
        The path is no Zarr v3 group, or a group that neither job wrote.
    """
    attrs = _group_attrs(path, storage_options)
    if attrs.get("kind") in SCORES_KINDS:
        return "scores"
    if attrs.get("package") == "ecg-pipeline" and "kind" not in attrs:
        return "spectrograms"
    raise StoreError(f"{path} is a Zarr group but not a store written by `ecg-pipeline preprocess` or `score`")


def store_task(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The ``task`` a store's attributes declare ("beat" or "rhythm"; "beat" when it says none).

    Raises
    ------
    StoreError
        The path is no Zarr v3 group.
    """
    return str(_group_attrs(path, storage_options).get("task", "beat"))


COMPRESSORS = {
    # Log spectrograms are noisy: every codec gains ~1.2x on float16. Blosc LZ4 with byte
    # shuffle writes a 3 MB chunk ~2x faster than zstd and reads it ~3x faster (loader).
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": lambda: zarr.codecs.ZstdCodec(level=1),
    "none": lambda: None,
}


def create_array(group, name: str, spec: Mapping[str, Any], shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                 compressor: str = "blosc-lz4", coordinates: Sequence[str] = ()):
    """Create (or replace) array ``name`` of ``group`` as a schema entry ``spec`` describes it.

    ``coordinates`` names variables xarray should read as this array's coordinates.
    """
    attrs = dict(spec.get("attrs", {}))
    if coordinates:
        attrs["coordinates"] = " ".join(coordinates)
    if dtype == "str":
        compressors: Any = "auto"
    else:
        codec = COMPRESSORS[compressor]()
        compressors = [codec] if codec is not None else None
    return group.create_array(name, shape=shape, compressors=compressors, chunks=chunks, dtype=_zarr_dtype(dtype),
                              fill_value=_fill(dtype), dimension_names=spec["dims"], attributes=attrs, overwrite=True)


def _dim_sizes(layout: Layout) -> dict[str, int]:
    return {"segment": layout.n_segments, "freq": layout.n_freq, "time": layout.n_time, "rr_feature": layout.n_rr}


def prepare(
    path: str,
    layout: Layout,
    attrs: Mapping[str, Any],
    dtype: str,
    *,
    coords: Mapping[str, np.ndarray],
    compressor: str = "blosc-lz4",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the store, or ready an existing one for resuming; return the chunk fingerprints held.

    Parameters
    ----------
    path
        Local path or fsspec URL of the store.
    layout
        Where the segments go; arrays are created or resized to it.
    attrs
        Group attributes (see the schema; ``created`` is set here when absent); ``config_fingerprint`` and ``database`` must match an
        existing store's unless ``overwrite``.
    dtype
        Storage dtype of ``spectrogram``.
    compressor
        Codec of the numeric arrays (a key of ``COMPRESSORS``).
    coords
        ``freq`` and ``time`` values.

    Returns
    -------
    list of str
        Per chunk, the fingerprint of the content it holds ("" for none).

    Raises
    ------
    StoreError
        The path holds something that is not a compatible store.
    """
    attrs = dict(attrs)
    group = None if overwrite else _open_to_resume(path, attrs, storage_options)
    if group is not None:
        attrs["created"] = group.attrs.get("created") or now()
    else:
        attrs.setdefault("created", now())
        group = open_group(path, "w", storage_options)
    segments = group.require_group(SEGMENTS)
    _lay_out_arrays(segments, layout, dtype, compressor, path, written=_written(group))
    segments["freq"][:] = coords["freq"]
    segments["time"][:] = coords["time"]
    if layout.n_rr:
        segments["rr_feature"][:] = np.asarray(coords["rr_feature"], dtype=object)
    held = _resize_fingerprints(group, layout.n_chunks)
    attrs.update(complete=False, updated=now(), n_segments=layout.n_segments, n_records=len(layout.records),
                 chunk_size=layout.chunk_size)
    group.update_attributes(encode_attrs(attrs))  # one metadata write, not one a key
    return held


def _written(group) -> bool:
    """Whether any segment chunk of the store was committed (a fingerprint is set)."""
    fp = group.get(f"{STATE_GROUP}/{FINGERPRINT}")
    return bool(fp is not None and fp.shape[0] and any(str(h) for h in fp[:]))


def _open_to_resume(path: str, attrs: Mapping[str, Any], storage_options: Mapping[str, Any] | None):
    """The existing store at ``path`` if a job with these ``attrs`` may resume it; None if there is none.

    Raises
    ------
    StoreError
        Something else is there, or a store of another schema, database or configuration.
    """
    try:
        group = open_group(path, "r+", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. a zarr v2 store or a plain folder
        raise StoreError(f"{path} exists but is not a Zarr v3 group ({type(exc).__name__}: {exc}); "
                         "choose another --out or pass --overwrite") from exc
    old = decode_attrs(group.attrs)
    if old.get("package") != "ecg-pipeline":
        raise StoreError(f"{path} is a Zarr group but not an ecg-pipeline store; choose another --out or pass --overwrite")
    check_version(old, path, write=True)
    for key in ("schema_version", "database", "database_version", "config_fingerprint"):
        if old.get(key) != attrs.get(key):
            raise StoreError(
                f"{path} was written with a different {key} ({old.get(key)!r}, now {attrs.get(key)!r}); "
                "re-running can only resume an identical job: pass --overwrite or choose another --out"
            )
    return group


def _lay_out_arrays(group, layout: Layout, dtype: str, compressor: str, path: str, written: bool) -> None:
    """Create the ``segments`` group's arrays for ``layout``, or resize those a resumed store has (``written``: it
    holds committed chunks)."""
    sizes = _dim_sizes(layout)
    for name, spec in group_variables(SEGMENTS).items():
        shape = tuple(sizes[d] for d in spec["dims"])
        if "rr_feature" in spec["dims"] and not layout.n_rr:
            continue  # segments that are not beats have no RR features
        if name == TEMPLATE and not layout.template:
            continue
        chunks = tuple(layout.chunk_size if d == "segment" else max(sizes[d], 1) for d in spec["dims"])
        want = dtype if name in ("spectrogram", TEMPLATE) else spec["dtype"][0]
        existing = group.get(name)
        if existing is not None and tuple(existing.chunks) != chunks:
            # A first run that wrote nothing (every record failed) may have laid out arrays for a shape it never
            # knew; arrays that hold committed chunks are never re-chunked under them.
            if written:
                raise StoreError(f"{path}: array {name} has chunks {tuple(existing.chunks)}, this job writes "
                                 f"{chunks}; pass --overwrite or choose another --out")
            del group[name]
            existing = None
        if existing is None:
            create_array(group, name, spec, shape, chunks, want, compressor,
                         coordinates=SEGMENT_COORDS if name == "spectrogram" else ())
        elif existing.shape != shape:  # dtype is fixed by the config fingerprint
            existing.resize(shape)


def _resize_fingerprints(group, n_chunks: int) -> list[str]:
    """Create ``_state/chunk_fingerprint`` for ``n_chunks``, or resize a resumed store's; return what it holds."""
    state = group.require_group(STATE_GROUP)
    fp = state.get(FINGERPRINT)
    if fp is None:
        state.create_array(FINGERPRINT, shape=(n_chunks,), chunks=(1,), dtype=str, fill_value="",
                           dimension_names=["segment_chunk"])
        return [""] * n_chunks
    n_old = fp.shape[0]
    held_old = list(fp[:]) if n_old else []
    fp.resize((n_chunks,))
    return [str(h) for h in held_old[:n_chunks]] + [""] * max(0, n_chunks - n_old)


@dataclass(frozen=True)
class ChunkWriter:
    """The segment arrays of a store, opened once (by the job's driver, after ``prepare``).

    Zarr arrays pickle with their metadata, so write tasks that receive this handle
    write their chunk without reading any metadata (7 reads a chunk otherwise, a third
    of the write time).
    """

    arrays: Mapping[str, Any]  #: spectrogram and the per-segment coordinates
    fingerprint: Any  #: ``_state/chunk_fingerprint``


def chunk_writer(path: str, storage_options: Mapping[str, Any] | None = None) -> ChunkWriter:
    group = open_group(path, "r+", storage_options)
    segments = group[SEGMENTS]
    # A chunk is never all fill value here: skip zarr's empty-chunk scan (2/3 of the write time).
    names = ("spectrogram", *SEGMENT_COORDS, *(n for n in (RR, TEMPLATE) if n in segments))
    arrays = {n: segments[n].with_config({"write_empty_chunks": True}) for n in names}
    return ChunkWriter(arrays, group[f"{STATE_GROUP}/{FINGERPRINT}"])


def read_rows(writer: ChunkWriter, rows: slice) -> dict[str, np.ndarray]:
    """Segments ``rows`` as the store holds them: ``spectrogram`` (float32), the coordinates, ``rr`` and
    ``template`` where the store has them. A chunk task reads the rows of records it reuses (written by an earlier
    commit, maybe of a killed run) before it writes their chunk again whole."""
    out = {name: np.asarray(arr[rows]) for name, arr in writer.arrays.items()}
    for name in ("spectrogram", TEMPLATE, RR):
        if name in out:
            out[name] = out[name].astype(np.float32)  # float16 -> float32 -> float16 gives the same bits back
    return out


def write_chunk(
    target: "ChunkWriter | str",
    k: int,
    segments: slice,
    spectrogram: np.ndarray,
    labels: Mapping[str, np.ndarray],
    fingerprint: str,
    storage_options: Mapping[str, Any] | None = None,
    rr: np.ndarray | None = None,
    template: np.ndarray | None = None,
) -> None:
    """Write segment chunk ``k`` whole, then record its fingerprint.

    ``target`` is a ``ChunkWriter`` (or the store's path). The fingerprint is cleared
    first and set last, so a task killed half-way leaves a chunk that the next run sees
    as missing. ``rr``, ``template``: the chunk's RR features and templates, for a store that has them.
    """
    writer = target if isinstance(target, ChunkWriter) else chunk_writer(target, storage_options)
    spec_arr = writer.arrays["spectrogram"]
    size = spec_arr.chunks[0]
    if segments.start != k * size or segments.stop != min((k + 1) * size, spec_arr.shape[0]):
        raise StoreError(f"write {segments} is not chunk {k} of {size} segments")
    writer.fingerprint[k] = ""
    writer.arrays["spectrogram"][segments] = spectrogram.astype(spec_arr.dtype, copy=False)
    for name in SEGMENT_COORDS:
        writer.arrays[name][segments] = labels[name]
    if RR in writer.arrays:
        if rr is None or rr.shape != (segments.stop - segments.start, writer.arrays[RR].shape[1]):
            raise StoreError(f"chunk {k}: the store holds RR features, this write gives "
                             f"{None if rr is None else rr.shape}")
        writer.arrays[RR][segments] = rr.astype(np.float32, copy=False)
    if TEMPLATE in writer.arrays:
        if template is None or template.shape != spectrogram.shape:
            raise StoreError(f"chunk {k}: the store holds templates, this write gives "
                             f"{None if template is None else template.shape}")
        writer.arrays[TEMPLATE][segments] = template.astype(writer.arrays[TEMPLATE].dtype, copy=False)
    writer.fingerprint[k] = fingerprint


def write_record_table(path: str, table: Mapping[str, np.ndarray], storage_options: Mapping[str, Any] | None = None) -> None:
    """(Re)write the per-record table (group ``records``) from its columns as the flat view names them:
    ``record_id`` and ``record_<name>`` for every variable of the group."""
    group = open_group(path, "r+", storage_options).require_group(RECORDS)
    n = len(table["record_id"])
    for name, spec in group_variables(RECORDS).items():
        column = flat_name(name)
        values = np.asarray(table[column], dtype=object if spec["dtype"][0] == "str" else spec["dtype"][0])
        if values.shape != (n,):
            raise StoreError(f"record table column {column} has shape {values.shape}, expected ({n},)")
        arr = create_array(group, name, spec, (n,), (max(n, 1),), spec["dtype"][0])
        if n:
            arr[:] = values


def finish(path: str, attrs: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    """Update the group attributes at the end of a job (``complete`` and the summary), then consolidate."""
    group = open_group(path, "r+", storage_options)
    group.update_attributes(encode_attrs({**attrs, "updated": now()}))
    consolidate(group)


def consolidate(group) -> None:
    """Write the store's consolidated metadata, so that plain ``xarray.open_zarr(path)`` opens it in one read.

    Written when a job completes. A job that writes the store again updates the group's attributes first,
    which drops it (zarr rewrites the root metadata without it), so it is never stale: a store being written
    has none, and gets it again when that job completes.
    """
    import warnings

    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": zarr-python and xarray read it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store, zarr_format=3)  # the group's store is rooted at the store's path


def write_plans(path: str, plans: Sequence[str], storage_options: Mapping[str, Any] | None = None, *,
                start: int = 0) -> None:
    """Save ``_state/record_plan``: one JSON summary of each record's plan, in store order (the driver writes
    it before any chunk of a run, so a chunk's fingerprint always matches the plans it was written from).

    ``plans`` are the entries from index ``start`` on: the array is resized to ``start + len(plans)`` and they are
    written (a commit appends what it adds to the last one's, and the driver keeps no copy of what is saved); it
    is never deleted, so a job killed while it writes keeps the plans saved before, and an entry is whole or ""
    (each chunk is written atomically; ``read_plans`` stops at the first "").
    """
    state = open_group(path, "r+", storage_options).require_group(STATE_GROUP)
    arr = state.get(PLAN)
    n = start + len(plans)
    if arr is None:
        arr = state.create_array(PLAN, shape=(n,), chunks=(PLAN_CHUNK,), dtype=str, fill_value="",
                                 dimension_names=["record"])
    elif start > arr.shape[0]:
        raise StoreError(f"{path}: plans from index {start} would leave a gap after the {arr.shape[0]} saved")
    elif arr.shape != (n,):
        arr.resize((n,))
    # A chunk of the array at a time: encoding the strings copies them, ~3 kB a plan (20 MB for 5,000 at once)
    for i in range(0, len(plans), PLAN_CHUNK):
        arr[start + i:start + i + PLAN_CHUNK] = np.asarray(plans[i:i + PLAN_CHUNK], dtype=object)


def read_plans(path: str, storage_options: Mapping[str, Any] | None = None,
               config_fingerprint: str | None = None) -> tuple[list[str], list[str]]:
    """The plan summaries a store keeps for the next run (``write_plans``) and its chunk fingerprints; empty lists
    where there is no store of this version (and ``config_fingerprint``) to resume, or it keeps none."""
    try:
        group = open_group(path, "r", storage_options)
        attrs = decode_attrs(group.attrs)
        if (attrs.get("schema_version") != store_schema()["schema_version"]
                or attrs.get("config_fingerprint") != config_fingerprint):
            return [], []
        plans = group.get(f"{STATE_GROUP}/{PLAN}")
        if plans is None:
            return [], []
        texts = [str(x) for x in plans[:]]
        if "" in texts:  # a job killed while it saved them: those before the gap are whole
            texts = texts[:texts.index("")]
        return texts, [str(x) for x in group[f"{STATE_GROUP}/{FINGERPRINT}"][:]]
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return [], []


def n_segments(path: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """The length of the segment dimension of the store at ``path``; 0 where there is none (or it cannot be read)."""
    try:
        return int(open_group(path, "r", storage_options)[f"{SEGMENTS}/spectrogram"].shape[0])
    except Exception:  # noqa: BLE001 - no store, another kind of folder: a job then creates or refuses it
        return 0


def read_fingerprints(path: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Per segment chunk, the fingerprint of what it holds ("" for nothing)."""
    group = open_group(path, "r", storage_options)
    return [str(x) for x in group[f"{STATE_GROUP}/{FINGERPRINT}"][:]]


def _dtype_ok(dtype: np.dtype, allowed: Sequence[str]) -> bool:
    for a in allowed:
        if a == "str" and dtype.kind in ("U", "O", "T"):
            return True
        if a != "str" and dtype == np.dtype(a):
            return True
    return False


def rebuild_hint(attrs: Mapping[str, Any], where: str) -> str:
    return (f"rebuild it with `ecg-pipeline preprocess {attrs.get('database', 'DB')} --out {where} --overwrite` (same "
            "--records and --config), or write a new --out")


def check_version(attrs: Mapping[str, Any], where: str, *, write: bool = False) -> None:
    """Refuse a store of a schema version this one cannot read (or, with ``write``, cannot resume) with what to do.

    A v2 store is read as a v4 store without RR features and templates, a v3 store as one without templates;
    resuming them, or training a model that takes what they lack, is refused with how to rebuild it."""
    version = attrs.get("schema_version")
    current = store_schema()["schema_version"]
    if attrs.get("package") != "ecg-pipeline":
        return
    if write and version in READABLE_VERSIONS and version != current:
        raise StoreError(f"{where} was written with store schema v{version} (this ecg-pipeline writes v{current}: "
                         f"groups segments and records, netCDF-safe attributes; it reads v{version} but does not "
                         f"resume it); {rebuild_hint(attrs, where)}")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{where} was written with store schema v{version} (this ecg-pipeline reads v2 to v{current}: "
            f"generic `label`/`anchor` variables and the task in the attributes); {rebuild_hint(attrs, where)}")


def _check_complete(attrs: Mapping[str, Any], where: str) -> None:
    if attrs.get("package") == "ecg-pipeline" and not attrs.get("complete"):
        raise StoreError(f"{where}: the job that writes this store has not finished (attrs complete=false): "
                         "re-run `ecg-pipeline preprocess` with the same --out to finish it")


def validate(ds: xr.Dataset, *, require_complete: bool = True, where: str = "dataset") -> xr.Dataset:
    """Check ``ds``, the flat view of a store (``open_dataset``), against the store schema; return it unchanged.

    Raises
    ------
    StoreError
        Listing every mismatch: missing or extra-dimensioned variables, wrong dtypes,
        invalid attributes, an unfinished job, or a per-record table that does not add up.
    """
    schema = {"variables": flat_variables(), "attrs": store_schema()["attrs"]}
    if require_complete:
        _check_complete(ds.attrs, where)
    problems = schema_problems(ds, schema)
    if not problems:
        if ds.attrs.get("n_segments") != ds.sizes.get("segment"):
            problems.append(f"attrs n_segments={ds.attrs.get('n_segments')} but dimension segment has {ds.sizes.get('segment')}")
        if require_complete:
            n = ds["record_n_segments"].values
            off = ds["record_offset"].values
            tiles = int(n.sum()) == ds.sizes["segment"] and np.array_equal(off, np.concatenate([[0], np.cumsum(n)[:-1]]))
            if len(n) and not tiles:
                problems.append("per-record table (record_offset, record_n_segments) does not tile the segment dimension")
    if problems:
        raise StoreError(f"{where} does not match {SCHEMA_FILE}:\n  " + "\n  ".join(problems))
    return ds


def schema_problems(ds: xr.Dataset, schema: Mapping[str, Any]) -> list[str]:
    """Mismatches between ``ds`` and a store schema: variables, dims, dtypes, coordinate roles, attributes."""
    problems: list[str] = []
    for name, spec in schema["variables"].items():
        if name not in ds.variables:
            if not spec.get("optional"):
                problems.append(f"missing variable {name!r}")
            continue
        var = ds.variables[name]
        if list(var.dims) != spec["dims"]:
            problems.append(f"{name}: dims {list(var.dims)}, expected {spec['dims']}")
        if not _dtype_ok(var.dtype, spec["dtype"]):
            problems.append(f"{name}: dtype {var.dtype}, expected one of {spec['dtype']}")
        if spec["role"] == "coord" and name not in ds.coords:
            problems.append(f"{name} should be a coordinate")
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema["attrs"])
    for err in validator.iter_errors(dict(ds.attrs)):
        problems.append(f"attribute {'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}")
    return problems


def _open_zarr(path: str, storage_options: Mapping[str, Any] | None, chunks: Any, group: str | None = None) -> xr.Dataset:
    import xarray as xr  # here, not at import: the loader imports this module into training processes

    try:
        return xr.open_zarr(path, group=group, consolidated=False, zarr_format=3, decode_timedelta=False,
                            storage_options=url_options(path, storage_options),
                            chunks=chunks if chunks is not None else {})
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"no Zarr store at {path}" + (f" (or no group {group} in it)" if group else "")) from exc
    except Exception as exc:  # noqa: BLE001
        raise StoreError(f"cannot open {path} as a Zarr v3 store: {type(exc).__name__}: {exc}") from exc


def _load_small(ds: xr.Dataset, keep_lazy: Sequence[str]) -> xr.Dataset:
    """Every variable but ``keep_lazy`` loaded: labels and the per-record table are small (a few MB for MIT-BIH),
    so selections such as ``ds.where(ds.label == "V")`` work directly; only the big arrays stay lazy.
    Zarr v3 variable-length strings arrive as numpy StringDType, which xarray's where/concat cannot promote
    yet: they are handed out as plain object arrays of str."""
    def _load(name):
        var = ds[name].compute()
        return var.astype(object) if var.dtype.kind == "T" else var

    small = [name for name in ds.variables if name not in keep_lazy]
    return ds.assign_coords({n: _load(n) for n in small if n in ds.coords}).assign(
        {n: _load(n) for n in small if n in ds.data_vars})


def _flat(path: str, storage_options: Mapping[str, Any] | None, chunks: Any, require_complete: bool) -> xr.Dataset:
    """The store as one Dataset with the table's flat names (``record_id``, ``record_<name>``), its attributes
    decoded, for any readable version (not yet validated)."""
    import xarray as xr

    root = _open_zarr(path, storage_options, chunks)
    attrs = decode_attrs(root.attrs)
    check_version(attrs, str(path))
    if require_complete:
        _check_complete(attrs, str(path))
    if attrs.get("schema_version", 0) < GROUPED_VERSION:
        return root.assign_attrs(attrs)
    segments = _open_zarr(path, storage_options, chunks, SEGMENTS)
    records = _open_zarr(path, storage_options, chunks, RECORDS)
    records = records.rename({name: flat_name(name) for name in records.variables})
    flat = xr.merge([segments, records], combine_attrs="override")  # "drop" would drop the variables' attrs too
    flat.attrs = attrs
    return flat


def open_dataset(
    path: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    require_complete: bool = True,
    chunks: Any = None,
) -> xr.Dataset:
    """Open a store written by ``ecg-pipeline preprocess`` as a validated ``xarray.Dataset``.

    Parameters
    ----------
    path
        Local path or fsspec URL.
    require_complete
        Refuse a store whose job has not finished (default).
    chunks
        Passed to ``xarray.open_zarr``; the default keeps the store's chunks.

    Raises
    ------
    StoreError
        The path is not a store, or it does not match the schema.
    """
    ds = validate(_flat(path, storage_options, chunks, require_complete), require_complete=require_complete, where=str(path))
    return _load_small(ds, [n for n in ds.data_vars if "segment" in ds[n].dims])


def open_tree(
    path: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    require_complete: bool = True,
    chunks: Any = None,
) -> xr.DataTree:
    """Open a store written by ``ecg-pipeline preprocess`` as a validated ``xarray.DataTree``.

    ``tree["segments"]`` holds the per-segment arrays (spectrograms lazy, their coordinates loaded),
    ``tree["records"]`` the per-record table on dimension ``record``; the root's attributes are decoded
    (``decode_attrs``). Stores of versions 2 to 4 (flat) are read into the same tree.

    Raises
    ------
    StoreError
        The path is not a store, or it does not match the schema.
    """
    import xarray as xr

    flat = open_dataset(path, storage_options=storage_options, require_complete=require_complete, chunks=chunks)
    table = [n for n in flat.variables if "record_id" in flat[n].dims]
    records = flat[table].rename({n: n.removeprefix("record_") if n != "record_id" else "record" for n in table})
    records = records.rename_dims({"record_id": "record"}) if "record_id" in records.dims else records
    segments = flat.drop_vars(table).drop_attrs(deep=False)
    for name, spec in group_variables(RECORDS).items():  # stores of versions 2 to 4 had prose names: the schema's
        if name in records.variables:
            records[name].attrs = dict(spec["attrs"])
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=flat.attrs), f"/{SEGMENTS}": segments,
                                  f"/{RECORDS}": records.drop_attrs(deep=False)})
