"""Scores as WFDB annotation files (pipeline.wfdb_out): written with wfdb.wrann, read back with wfdb.rdann, on a
local folder and on an fsspec URL. (DS2 against the reference .atr with wfdb's EC57 comparison: test_score_job.)"""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import wfdb

from ecg_pipeline.pipeline.errors import PipelineError
from ecg_pipeline.pipeline.locations import locate
from ecg_pipeline.pipeline.scores import RecordView
from ecg_pipeline.pipeline.wfdb_out import write_record, write_wfdb_annotations


def _view(task, record, anchor, predicted, fs=360.0, sig_len=20_000):
    classes = ("N", "S", "V", "F", "Q") if task == "beat" else ("N", "A", "O", "~")
    n = len(anchor)
    return RecordView(record=record, task=task, classes=classes, status="ok", error="", lead="MLII", fs=fs,
                      sig_len=sig_len, anchor=np.asarray(anchor, np.int64), predicted=np.asarray(predicted, object),
                      reference=np.full(n, "", object), probability=np.zeros((n, len(classes)), np.float32))


def test_beats_become_beat_annotations_with_their_class_as_wfdb_code(tmp_path):
    view = _view("beat", "batch1/208", [100, 400, 700, 1000], ["N", "V", "S", "Q"])
    file = write_record(view, locate(str(tmp_path)))
    assert file.path == str(tmp_path / "batch1" / "208.ecgp")
    ann = wfdb.rdann(str(tmp_path / "batch1" / "208"), "ecgp")
    assert ann.sample.tolist() == [100, 400, 700, 1000] and ann.symbol == ["N", "V", "S", "Q"] and ann.fs == 360


def test_rhythm_windows_become_rhythm_notes_at_each_change(tmp_path):
    # 10 s windows at 300 Hz: N N A A ~ O -> (N at 0, (AFIB at 20 s, noise at 40 s, (O at 50 s
    view = _view("rhythm", "A00001", np.arange(6) * 3000, ["N", "N", "A", "A", "~", "O"], fs=300.0, sig_len=18_000)
    write_record(view, locate(f"file://{tmp_path}"), extension="rhy")
    ann = wfdb.rdann(str(tmp_path / "A00001"), "rhy")
    assert ann.sample.tolist() == [0, 6000, 12000, 15000]
    assert ann.symbol == ["+", "+", "~", "+"]
    assert [a.rstrip("\x00") for a in ann.aux_note] == ["(N", "(AFIB", "", "(O"]


def test_an_fsspec_folder_gets_the_files_and_bad_annotator_names_are_refused(tmp_path):
    view = _view("beat", "100", [50, 350], ["N", "N"])
    write_record(view, locate("memory://wfdb-out/run"))
    fs = fsspec.filesystem("memory")
    local = tmp_path / "100.ecgp"
    local.write_bytes(fs.cat("/wfdb-out/run/100.ecgp"))
    assert wfdb.rdann(str(tmp_path / "100"), "ecgp").sample.tolist() == [50, 350]
    fs.rm("/wfdb-out", recursive=True)
    with pytest.raises(PipelineError, match="letters, digits"):
        write_wfdb_annotations(str(tmp_path / "none.zarr"), str(tmp_path), extension="../x")
