"""Tasks and label sources are extension points: registries that check what they register."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from helpers import REPO
from ecg_pipeline.pipeline import segment, tasks
from ecg_pipeline.pipeline.labels import (LABEL_SOURCE_MEMBERS, LABEL_SOURCES, RecordInput, RecordLabelTable,
                                          RhythmAnnotations, register_label_source)


def test_the_built_in_tasks_are_registered_and_an_unknown_one_is_named():
    assert {"beat", "rhythm"} <= set(tasks.TASKS)
    beat, rhythm = tasks.get_task("beat"), tasks.get_task("rhythm")
    assert (beat.unit, beat.default_split, beat.anchor_kind) == ("beats", "inter-patient", "r-peak")
    assert (rhythm.unit, rhythm.default_split, rhythm.anchor_kind) == ("windows", "stratified", "window-start")
    assert tasks.get_task(None) is beat  # stores of versions before tasks say nothing: beat
    with pytest.raises(ValueError, match="unknown task 'ecg-waves' .known: .*beat"):
        tasks.get_task("ecg-waves")


def test_a_third_task_is_one_class_and_one_registration():
    @dataclass(frozen=True)
    class Waves(tasks.Task):
        name: ClassVar[str] = "test-waves"
        unit: ClassVar[str] = "waves"
        anchor_kind: ClassVar[str] = "wave-onset"
        default_split: ClassVar[str] = "stratified"

    tasks.register_task(Waves())
    try:
        assert tasks.get_task("test-waves").unit == "waves"
        assert tasks.get_task("test-waves").record_text({"record": "r", "n_segments": 3}, ()) == "r: 3 waves"
        with pytest.raises(ValueError, match="already registered"):
            @dataclass(frozen=True)
            class Other(Waves):
                pass

            tasks.register_task(Other())
    finally:
        tasks._TASKS.pop("test-waves")

    class NotATask:
        name = "broken"

    with pytest.raises(TypeError, match="lacks unit, anchor_kind, default_split"):
        tasks.register_task(NotATask())


def test_every_registered_label_source_has_the_protocols_members_and_a_lacking_one_is_refused():
    for kind, cls in LABEL_SOURCES.items():
        assert all(hasattr(cls, m) for m in LABEL_SOURCE_MEMBERS), kind
        assert cls.task in tasks.TASKS and cls.anchor_kind == tasks.get_task(cls.task).anchor_kind, kind

    class HalfASource:
        task = "beat"

        def segments(self, rec):
            return None

    with pytest.raises(TypeError, match="'half' .HalfASource. lacks anchor_kind, pad, window"):
        register_label_source("half", HalfASource)
    assert "half" not in LABEL_SOURCES


def test_windowed_sources_and_scoring_share_one_grid(tmp_path):
    """RecordLabelTable (preprocess), RhythmAnnotations and rhythm scoring place windows on segment.window_grid."""
    import wfdb

    fs, n = 250.0, 250 * 95  # 95 s: the last window is end-aligned
    wfdb.wrsamp("r", fs=fs, units=["mV"], sig_name=["II"], p_signal=np.zeros((n, 1)), fmt=["16"],
                write_dir=str(tmp_path))
    wfdb.wrann("r", "atr", np.array([0, 250 * 40]), np.array(["+", "+"]), aux_note=["(N", "(AFIB"],
               write_dir=str(tmp_path))
    rec = RecordInput("r", Path(tmp_path) / "r", fs, n)
    table = RecordLabelTable(window_s=30.0, hop_s=30.0, min_s=5.0, table={"r": "A"}).segments(rec)
    notes = RhythmAnnotations("atr", 30.0, 30.0, ("N", "A", "O", "~")).segments(rec)
    grid = segment.window_grid(n, fs, 30.0, 30.0)
    np.testing.assert_array_equal(table.anchor, grid)
    np.testing.assert_array_equal(notes.anchor, grid)
    assert grid[-1] + 30 * 250 == n  # the last window ends with the record
    assert list(notes.symbol) == ["N", "AFIB", "AFIB", "AFIB"] and list(notes.label) == ["N", "A", "A", "A"]
    # A span keeps the windows that start in it (a piece of a long record).
    part = RhythmAnnotations("atr", 30.0, 30.0).segments(RecordInput("r", Path(tmp_path) / "r", fs, n, span=(0, 250 * 45)))
    np.testing.assert_array_equal(part.anchor, grid[grid < 250 * 45])


def test_jobs_never_compare_task_names():
    """What differs between tasks lives in their Task (pipeline/tasks.py); jobs ask it, never switch on names."""
    pattern = r"""[!=]=\s*["'](beat|rhythm)["']|["'](beat|rhythm)["']\s*[!=]=|\bin\s*\(\s*["'](beat|rhythm)["']"""
    import re

    found = [f"{p.name}:{i}" for p in sorted((REPO / "jobs").glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not found, f"task-name comparisons in jobs/: {', '.join(found)}"
