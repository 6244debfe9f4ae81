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

__all__ = ["TASKS", "BeatTask", "RhythmTask", "Task", "get_task", "register_task"]


@dataclass(frozen=True)
class Task:
    """The contract of a task. Subclasses set the class variables and override the methods that differ."""

    name: ClassVar[str]
    unit: ClassVar[str]  #: what the store's segments are called in reports: "beats", "windows"
    anchor_kind: ClassVar[str]  #: "r-peak", "window-start"
    default_split: ClassVar[str]  #: the split ``train`` takes without ``--split`` (``pipeline.splits.SPLITS``)
    writes_predictions: ClassVar[bool] = False  #: evaluation writes per-unit predictions (``predictions.csv``)

    def evaluation_units(self, prob: np.ndarray, y: np.ndarray, names: np.ndarray, segment_record: np.ndarray,
                         aggregation: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """``(names, prob, y, notes)`` of the units a model of this task is judged on, from per-segment ones.

        ``names`` name the segments (their store indices), ``segment_record`` their records; ``notes`` are
        added to the metrics (how units were formed).
        """
        return names, prob, y, {}


@dataclass(frozen=True)
class BeatTask(Task):
    """Beats found at R peaks, each scored alone (AAMI classes N, S, V, F, Q)."""

    name: ClassVar[str] = "beat"
    unit: ClassVar[str] = "beats"
    anchor_kind: ClassVar[str] = "r-peak"
    default_split: ClassVar[str] = "inter-patient"


@dataclass(frozen=True)
class RhythmTask(Task):
    """Fixed windows over a recording; a recording's class is the mean of its windows' probabilities."""

    name: ClassVar[str] = "rhythm"
    unit: ClassVar[str] = "windows"
    anchor_kind: ClassVar[str] = "window-start"
    default_split: ClassVar[str] = "stratified"
    writes_predictions: ClassVar[bool] = True

    def evaluation_units(self, prob, y, names, segment_record, aggregation=""):
        from .evaluate import aggregate_by_record

        names, prob, y = aggregate_by_record(prob, y, segment_record)
        return names, prob, y, {"unit": "record", "n_windows": int(len(segment_record)),
                                "aggregation": aggregation or "mean of the window probabilities per record"}


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


for _task in (BeatTask(), RhythmTask()):
    register_task(_task)
