"""Stage 9c: one record scored in this process, without a cluster (``ecg-pipeline score --input RECORD``).

The same stages as the scoring job, in the same order (``scoring.plan_record``, ``scoring.score_piece``
per piece, ``RecordAssembler``), with the model loaded here (Keras safe mode) instead of on workers: no
Dask cluster, dashboard or scores store. ``OneRecord`` gives the result as text, a per-segment table
(``frame``: one row per beat or window, with its class probabilities) or JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import scoring, sources
from .config import ScoreConfig
from .download import cache_root
from .errors import PipelineError
from .scores import RecordScores, table_row
from .signal_quality import flag_names

__all__ = ["OneRecord", "score_one"]

log = logging.getLogger(__name__)


@dataclass
class OneRecord:
    """One record's scores and what they mean: the model's classes and task."""

    scores: RecordScores
    classes: tuple[str, ...]
    task: str

    @property
    def ok(self) -> bool:
        return self.scores.status == "ok"

    def frame(self):
        """One row per segment (beat or window): ``record, sample, time_s, predicted, p_<class>..., quality``."""
        import pandas as pd

        r = self.scores
        n = r.n_segments
        predicted = np.asarray(self.classes, dtype=object)[r.predicted_index(self.classes)] if n else []
        data: dict[str, Any] = {"record": [r.record] * n, "sample": r.anchor[:n],
                                "time_s": np.round(r.anchor[:n] / r.fs, 4) if r.fs else np.zeros(n),
                                "predicted": predicted}
        for i, c in enumerate(self.classes):
            data[f"p_{c}"] = np.round(r.probability[:n, i].astype(np.float64), 5) if n else []
        data["quality"] = ["+".join(flag_names(int(f))) for f in r.segment_flags[:n]]  # "": readable
        return pd.DataFrame(data)

    def row(self) -> dict[str, Any]:
        """The record's row of the scores table (``scores.table_row``)."""
        return table_row(self.scores, 0, self.classes)

    def text(self) -> str:
        """The record's verdict (``Task.record_text``); for beats, its table of beats first."""
        from .tasks import get_task

        r = self.scores
        if not self.ok:
            return f"{r.record}: failed: {r.error}\n"
        task = get_task(self.task)
        head = "" if task.record_prediction else self.frame().to_string(index=False) + "\n\n"
        return head + task.record_text(self.row(), self.classes) + "\n"

    def to_json(self) -> str:
        r = self.scores
        out: dict[str, Any] = {"record": r.record, "task": self.task, "status": r.status, "error": r.error,
                               "classes": list(self.classes), "fs": r.fs, "lead": r.lead}
        if self.ok:
            row = self.row()
            if "probability" in row:
                out.update(predicted=row["predicted"], probability=dict(zip(self.classes, row["probability"])))
            out["segments"] = json.loads(self.frame().to_json(orient="records"))
        return json.dumps(out, indent=2, default=str) + "\n"


def score_one(model: str, folder: str, record: str, config: ScoreConfig = ScoreConfig(), *,
              annotations: str | None = "auto", labels: str | None = None, cache_dir: str | None = None,
              storage_options: Mapping[str, Any] | None = None) -> OneRecord:
    """Score ``record`` of ``folder`` (a local folder or a URL: ``sources.single_record``) with the model file
    ``model`` (a path or fsspec URL) here, in this process.

    ``annotations``: as ``ScoreRequest``'s (``"auto"``: compare with the model's reference files where the
    record has one). ``labels``: a ``record,label`` file for rhythm models (default: a ``REFERENCE.csv`` in
    ``folder``, if any).

    Raises
    ------
    PipelineError
        The model cannot be used. Problems of the record itself are in the result (``OneRecord.ok``).
    """
    from .model_runtime import ModelFile
    from .models import predict_in_batches, quiet_native_stderr

    file = ModelFile.read(model, storage_options)  # read once; no Dask here, so no worker plugin
    card, task = file.card, file.card.task_impl()
    with quiet_native_stderr():
        network = file.load()
    source = sources.record_folder(folder, config.download)
    annotator = task.default_annotator(card) if annotations == "auto" else annotations
    table = _label_table(source, labels, config) if task.reads_label_table else {}
    ctx = scoring.ScoringContext(card, config, annotator, annotations not in (None, "auto"), cache_dir, "", table)
    plan = scoring.plan_record(ctx, source, record)
    if not plan.ok:
        return OneRecord(plan.scores(card.task), tuple(card.classes), card.task)
    assembler, merged = scoring.RecordAssembler(ctx), None
    for i in range(len(plan.pieces)):
        piece = scoring.score_piece(ctx, source, plan, i, lambda x: predict_in_batches(network, x, config.batch_size))
        merged = assembler.add(piece) or merged
    if merged is None:  # pragma: no cover - every piece was added: the assembler gave the record back
        raise PipelineError(f"{record}: its pieces did not make a whole record")
    return OneRecord(merged, tuple(card.classes), card.task)


def _label_table(source: sources.FolderSource, labels: str | None, config: ScoreConfig) -> dict[str, str]:
    """Reference classes: ``labels``, else the folder's ``REFERENCE.csv`` ({} when there is none)."""
    from .labels import RecordLabelTable, load_table

    if labels:
        return scoring.read_label_table(labels)
    try:
        return dict(load_table(RecordLabelTable(), source, cache_root(None), config.download).table)
    except PipelineError as exc:
        log.info("%s", exc)
        return {}
