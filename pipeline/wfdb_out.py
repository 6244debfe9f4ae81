"""Stage 11c: scores as WFDB annotation files, for ``wfdb.rdann``, WFDB viewers and EC57's ``bxb`` / ``rxr``.

``write_wfdb_annotations(scores, out)`` writes one ``<record>.<extension>`` (default ``ecgp``) per scored
record of a scores store into the folder ``out`` (a local path or fsspec URL; a record in a sub-folder,
``batch1/100``, keeps it). What a record's annotations are is its task's (``Task.wfdb_annotations``):

* beats: one annotation per scored beat at its R peak, its predicted AAMI class as the WFDB beat code
  (``N``, ``S``, ``V``, ``F``, ``Q``; a beat judged unreadable is ``Q``), which ``bxb`` maps to the same
  classes;
* rhythm windows: a rhythm annotation (``+``) where each run of one predicted class starts, with the
  rhythm note ``(AFIB``, ``(N`` or ``(O``; noise runs are ``~``.

Each file records the record's sampling frequency. Failed records get no file.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import PipelineError
from .locations import Location, locate

__all__ = ["DEFAULT_EXTENSION", "write_record", "write_wfdb_annotations"]

DEFAULT_EXTENSION = "ecgp"  #: the annotator name of the files written (``100.ecgp``)


def write_record(view, folder: Location, extension: str = DEFAULT_EXTENSION) -> Location:
    """Write the annotations of one scored record (``scores.RecordView``) into ``folder``; return the file."""
    import wfdb

    from .tasks import get_task

    sample, symbol, aux = get_task(view.task).wfdb_annotations(view)
    parent, name = view.record.rsplit("/", 1) if "/" in view.record else ("", view.record)
    target = folder.join(*(parent.split("/") if parent else ()), f"{name}.{extension}")
    with tempfile.TemporaryDirectory(prefix="ecg-pipeline-wfdb-") as tmp:
        # wrann writes what it is given; an empty record gets a file with no annotations.
        wfdb.wrann(name, extension, np.asarray(sample, np.int64), symbol=list(symbol),
                   aux_note=list(aux) if any(aux) else None, fs=float(view.fs), write_dir=tmp)
        with open(os.path.join(tmp, f"{name}.{extension}"), "rb") as f:
            target.write_bytes(f.read())
    return target


def write_wfdb_annotations(scores_path: str, out: str, extension: str = DEFAULT_EXTENSION, *,
                           records: Sequence[str] | None = None,
                           storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Write every scored record's annotations (or those of ``records``) of the scores store ``scores_path``
    into ``out``; return the files written.

    Raises
    ------
    PipelineError
        ``extension`` is not a WFDB annotator name (letters and digits).
    StoreError
        ``scores_path`` is no scores store.
    """
    from .scores import open_scores, record_names, record_view

    if not re.fullmatch(r"[A-Za-z0-9_]+", extension or ""):
        raise PipelineError(f"WFDB annotator name {extension!r}: letters, digits and _ only (e.g. {DEFAULT_EXTENSION})")
    # Loaded once: per-record views of a lazily opened store would read whole variables once per record.
    ds = open_scores(scores_path, storage_options=storage_options, require_complete=False).load()
    folder = locate(out, storage_options)
    folder.makedirs()
    written = []
    for record in records if records is not None else record_names(ds):
        view = record_view(ds, record)
        if view.status == "ok":
            written.append(write_record(view, folder, extension).url)
    return written
