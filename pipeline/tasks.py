"""Stage 0: tasks, the extension point that holds what differs between beat and rhythm models.

A task is one registered object (``register_task``) that says, for the models and stores of its
kind: what one segment is called, the split a training run takes by default, the unit its metrics
are counted in (a beat; a recording, whose windows' probabilities are averaged), and for scoring
(``pipeline.scoring``): where the segments of a record come from, what the reference is, how pieces
of a long record merge, the metrics over a scores store and the lines of the report. The jobs ask
``get_task(name)`` and never compare task names. A third task (multi-lead records with several
labels each, say) is one module with a ``Task`` subclass plus one ``register_task`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import numpy as np

__all__ = ["TASKS", "Task", "get_task", "register_task"]


@dataclass(frozen=True)
class Task:
    """The contract of a task. Subclasses set the class variables and override the methods that differ.

    Scoring members (``pipeline.scoring`` calls them; ``card`` is a ``model_card.ModelCard``, ``ctx`` a
    ``scoring.ScoringContext``): ``min_seconds``, ``check_record``, ``default_annotator``,
    ``scores_attrs``, ``score_piece``, ``merge``, ``store_metrics``, ``side_tables``, ``report_lines``,
    ``record_text``, ``wfdb_annotations``.
    """

    name: ClassVar[str]
    unit: ClassVar[str]  #: what the store's segments are called in reports: "beats", "windows"
    anchor_kind: ClassVar[str]  #: "r-peak", "window-start"
    default_split: ClassVar[str]  #: the split ``train`` takes without ``--split`` (``pipeline.splits.SPLITS``)
    writes_predictions: ClassVar[bool] = False  #: evaluation writes per-unit predictions (``predictions.csv``)
    beats: ClassVar[bool] = False  #: segments are beats: RR features and neighbour templates apply
    #: a record's class is the mean of its segments' probabilities (the scores table's record_probability,
    #: record_predicted, record_reference_class)
    record_prediction: ClassVar[bool] = False
    detector_columns: ClassVar[bool] = False  #: the scores table's detector counts against a reference apply
    ectopic: ClassVar[tuple[str, ...]] = ()  #: classes whose share of a record's segments the table gives
    reads_label_table: ClassVar[bool] = False  #: scoring reads reference classes from a label table
    trace_sizes: ClassVar[tuple[int, ...]] = (64, 63)  #: batch sizes the workers trace the network with
    #: the class a segment judged unreadable (``pipeline.signal_quality``) is predicted as, where the model has it
    unreadable_class: ClassVar[str | None] = None

    def evaluation_units(self, prob: np.ndarray, y: np.ndarray, names: np.ndarray, segment_record: np.ndarray,
                         aggregation: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """``(names, prob, y, notes)`` of the units a model of this task is judged on, from per-segment ones.

        ``names`` name the segments (their store indices), ``segment_record`` their records; ``notes`` are
        added to the metrics (how units were formed).
        """
        return names, prob, y, {}

    def min_seconds(self, card) -> float:
        """The shortest record a model of this task can say anything of (``quality.record_quality``)."""
        return 0.0

    def check_record(self, card, header) -> None:
        """Refuse a record (``RecordError``) the task cannot score at all, before its lead is read."""

    def quality_windows(self, card, config, anchor: np.ndarray, fs: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``: the samples each segment at ``anchor`` (samples of a lead piece of ``n`` samples at
        ``fs``) is judged on by ``signal_quality``; ``config`` is the score configuration's ``quality``."""
        from .signal_quality import centred

        return centred(anchor, fs, config.neighbourhood_s, n)

    def judge_segments(self, card, config, x: np.ndarray, first: int, anchor: np.ndarray, fs: float,
                       mv_per_unit: float | None, beats: np.ndarray | None = None) -> np.ndarray:
        """The quality flags (``signal_quality.FLAGS``, uint8) of the segments at ``anchor`` (record samples) of
        a piece ``x`` of a lead that starts at record sample ``first``; all 0 when segments are not judged.
        ``beats``: every beat detected in ``x`` (record samples), for the local SNR."""
        from .signal_quality import enabled, quality_indices

        q = config.quality
        if not q.segments or not len(anchor):
            return np.zeros(len(anchor), np.uint8)
        lo, hi = self.quality_windows(card, q, np.asarray(anchor, np.int64) - first, fs, len(x))
        return quality_indices(x, fs, lo, hi, mv_per_unit or 1.0, enabled(q),
                               None if beats is None else np.asarray(beats, np.int64) - first).flags(q)

    def unreadable_index(self, classes) -> int | None:
        """The index of ``unreadable_class`` among a model's ``classes``, None where it has no such class."""
        return list(classes).index(self.unreadable_class) if self.unreadable_class in classes else None

    def default_annotator(self, card) -> str:
        """The annotation files ``score --annotations auto`` compares with."""
        return card.annotator

    def scores_attrs(self, card, config) -> dict[str, Any]:
        """The task's attributes of a scores store (``anchor_kind``, its windows, the detector)."""
        return {"anchor_kind": self.anchor_kind}

    def score_piece(self, ctx, base, plan, start: int, stop: int, predict, result, timer) -> None:
        """Score the segments of ``[start, stop)`` of a planned record into ``result`` (``scores.RecordScores``)."""
        raise NotImplementedError

    def merge(self, parts, config):
        """One record's ``RecordScores`` from its pieces' (in order, all ok)."""
        raise NotImplementedError

    def store_metrics(self, writer, rows, card, config) -> dict[str, Any] | None:
        """Metrics against the references over the whole scores store (None without references)."""
        return None

    def side_tables(self, writer, rows) -> dict[str, Any]:
        """Tables written beside the store: ``{suffix: DataFrame}`` (``.episodes.csv``)."""
        return {}

    def report_lines(self, reference: Mapping[str, Any] | None) -> list[str]:
        """The report's lines on ``store_metrics``' figures."""
        return []

    def record_text(self, row: Mapping[str, Any], classes) -> str:
        """One record's verdict, for ``score`` of a single record."""
        return f"{row['record']}: {int(row['n_segments']):,} {self.unit}"

    def wfdb_annotations(self, view) -> tuple[np.ndarray, list[str], list[str]]:
        """``(sample, symbol, aux_note)`` of one scored record (``scores.RecordView``) as WFDB annotations
        (``pipeline.wfdb_out``): beats with their class's symbol, rhythm runs as ``(AFIB``-style notes."""
        raise NotImplementedError(f"{self.name} scores have no WFDB annotation form")


_TASKS: dict[str, Task] = {}
TASKS: Mapping[str, Task] = MappingProxyType(_TASKS)  #: name -> task


def register_task(task: Task) -> None:
    """Make ``task`` known under ``task.name`` (the ``task`` attribute of stores and model cards)."""
    missing = [m for m in ("name", "unit", "anchor_kind", "default_split") if not hasattr(task, m)]
    if missing:
        raise TypeError(f"{type(task).__name__} is not a Task: it lacks {', '.join(missing)}")
    if task.name in _TASKS and type(_TASKS[task.name]) is not type(task):
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task


def get_task(name: str | None) -> Task:
    """The registered task ``name`` (stores of versions before tasks say nothing: beat).

    Raises
    ------
    ValueError
        An unknown task, naming the known ones.
    """
    try:
        return _TASKS[name or "beat"]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(_TASKS)})") from None


# The built-in tasks register themselves on import (last: they subclass Task; a plain module import, so that
# importing one of them first works too).
from . import beat_task, rhythm_task  # noqa: E402, F401
