"""The training run folder on real folders: start, refusal, resume (after a crash between checkpoint and state
too), overwrite, the legacy best.keras fold-in, and atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from ecg_pipeline.pipeline import locations, run_folder
from ecg_pipeline.pipeline.errors import ConfigError
from ecg_pipeline.pipeline.run_folder import (CHECKPOINT_FILE, LEGACY_BEST_FILE, MODEL_FILE, STATE_FILE, RunFolder,
                                              TrainState)

SPLIT = {"name": "intra-patient", "n_segments": {"train": 80, "val": 10, "test": 10}}
CONFIG = {"model": "beat-template-cnn", "epochs": 3, "seed": 0}


def _run_of(tmp_path, epochs_done: int = 2):
    """A run folder as training leaves it after ``epochs_done`` epochs (model files are placeholders: the
    folder only looks at which are there)."""
    out, state = RunFolder.open(str(tmp_path / "run"), SPLIT, CONFIG)
    assert state is None
    out.write_state(TrainState(epoch=epochs_done, best_epoch=1, best_val_score=0.5,
                               history={"loss": [1.0, 0.5][:epochs_done]}))
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        out.write_bytes(name, b"model")
    return out


def test_a_new_run_writes_its_split_and_configuration(tmp_path):
    out, state = RunFolder.open(str(tmp_path / "a" / "run"), SPLIT, CONFIG)
    assert state is None and os.path.isdir(out.root)
    assert out.read_json(run_folder.SPLIT_FILE) == SPLIT
    assert "model: beat-template-cnn" in out.read_text(run_folder.CONFIG_FILE)
    assert out.path(MODEL_FILE) == os.path.join(str(tmp_path / "a" / "run"), "model.keras")
    assert RunFolder("file://" + str(tmp_path / "x") + "/").root == str(tmp_path / "x")


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = _run_of(tmp_path)
    before = sorted(os.listdir(out.root))
    with pytest.raises(ConfigError, match="already holds a training run: pass --resume"):
        RunFolder.open(out.root, SPLIT, CONFIG)
    assert sorted(os.listdir(out.root)) == before and out.read_state().epoch == 2  # nothing touched


def test_resume_after_a_crash_between_checkpoint_and_state_goes_on_from_the_state(tmp_path):
    """The callback saves the checkpoint first and the state last: killed in between (checkpoint of epoch 3,
    state of epoch 2, perhaps a half-written temporary state), the run resumes after epoch 2."""
    out = _run_of(tmp_path, epochs_done=2)
    out.write_bytes(CHECKPOINT_FILE, b"model of epoch 3")
    with open(out.path(STATE_FILE) + ".tmp", "w") as f:
        f.write('{"epoch": 3, "hist')  # the write the crash cut short
    again, state = RunFolder.open(out.root, SPLIT, {**CONFIG, "epochs": 4}, resume=True)
    assert state == TrainState(epoch=2, best_epoch=1, best_val_score=0.5, history={"loss": [1.0, 0.5]})
    assert again.read_bytes(CHECKPOINT_FILE) == b"model of epoch 3"  # resumed from, not removed
    assert "epochs: 4" in again.read_text(run_folder.CONFIG_FILE)
    again.write_state(state)
    assert not os.path.exists(out.path(STATE_FILE) + ".tmp")  # the next write replaces the stale temporary


def test_resume_reads_the_state_of_older_versions(tmp_path):
    out = _run_of(tmp_path)
    out.write_json(STATE_FILE, {"epoch": 2, "best_val_macro_f1": 0.7, "best_epoch": 2, "wait": 0,
                                "stopped_early": False, "history": {"loss": [1.0, 0.9]}, "train_s": 3.0})
    _, state = RunFolder.open(out.root, SPLIT, CONFIG, resume=True)
    assert state.best_val_score == 0.7 and state.selection == "val_macro_f1" and state.train_s == 3.0


def test_overwrite_removes_every_model_file_of_the_old_run_and_nothing_else(tmp_path):
    out = _run_of(tmp_path)
    out.write_bytes(LEGACY_BEST_FILE, b"older version's best epoch")
    out.write_text("notes.txt", "mine")
    again, state = RunFolder.open(out.root, SPLIT, CONFIG, overwrite=True)
    assert state is None
    assert not any(again.exists(n) for n in (STATE_FILE, MODEL_FILE, CHECKPOINT_FILE, LEGACY_BEST_FILE))
    assert again.read_text("notes.txt") == "mine"
    RunFolder.open(out.root, SPLIT, CONFIG)  # no run left to refuse


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    out = _run_of(tmp_path)
    out.remove(CHECKPOINT_FILE)
    _, state = RunFolder.open(out.root, SPLIT, CONFIG, resume=True)
    assert state is None and not out.exists(MODEL_FILE) and not out.exists(STATE_FILE)


@pytest.mark.parametrize("how", ["other split", "foreign state", "state not json", "no split file"])
def test_resume_refuses_a_folder_that_is_not_this_run(tmp_path, how):
    out = _run_of(tmp_path)
    split = SPLIT
    if how == "other split":
        split = {**SPLIT, "n_segments": {"train": 81, "val": 10, "test": 10}}
    elif how == "foreign state":
        out.write_json(STATE_FILE, {"accuracy": 0.9})
    elif how == "state not json":
        out.write_text(STATE_FILE, "epoch 3\n")
    else:
        out.remove(run_folder.SPLIT_FILE)
    match = {"other split": "different split or store", "no split file": "not a run folder to resume"}.get(
        how, "is not the state of an `ecg-pipeline train` run")
    with pytest.raises(ConfigError, match=match):
        RunFolder.open(out.root, split, CONFIG, resume=True)
    assert out.exists(CHECKPOINT_FILE) and out.exists(MODEL_FILE)  # a refused folder keeps its run


def test_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        RunFolder.open(str(tmp_path / "file"), SPLIT, CONFIG)


def test_a_run_folder_on_an_fsspec_url_lives_there_and_nowhere_else(tmp_path, monkeypatch, untrained_model):
    """``memory://`` stands for any fsspec file system (the S3 test is in test_object_store.py): the whole
    lifecycle, model files included, goes through fsspec, and nothing named after the URL appears on disk."""
    import fsspec

    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import load_model

    monkeypatch.chdir(tmp_path)
    url = "memory://runs/r1"
    out, state = RunFolder.open(url, SPLIT, CONFIG)
    assert state is None and out.root == url
    out.write_state(TrainState(epoch=1, best_epoch=1, best_val_score=0.5, history={"loss": [1.0]}))
    model, _ = load_model(untrained_model)
    out.save_model(model, MODEL_FILE, ModelCard.read(untrained_model))
    with pytest.raises(ConfigError, match="already holds a training run"):
        RunFolder.open(url, SPLIT, CONFIG)
    again, state = RunFolder.open(url, SPLIT, CONFIG, resume=True)  # no checkpoint: starts afresh
    assert state is None and not again.exists(MODEL_FILE)
    out.save_model(model, MODEL_FILE, ModelCard.read(untrained_model))
    assert out.read_card(MODEL_FILE).classes == ModelCard.read(untrained_model).classes
    assert out.path(MODEL_FILE) == url + "/" + MODEL_FILE
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/runs/r1", detail=False)) == [
        "config.yaml", MODEL_FILE, "split.json"]
    assert os.listdir(tmp_path) == []
    fs.rm("/runs", recursive=True)


def test_a_write_that_fails_before_its_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    out = RunFolder(str(tmp_path))
    out.write_json("run.json", {"a": 1})

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(locations.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        out.write_json("run.json", {"a": 2})
    monkeypatch.undo()
    assert out.read_json("run.json") == {"a": 1} and sorted(os.listdir(tmp_path)) == ["run.json"]
    out.write_json("run.json", {"a": 2})
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 2}


def test_the_legacy_best_file_is_folded_into_a_self_describing_model_file(untrained_model, tmp_path):
    """Older versions kept the best epoch in a metadata-less best.keras: it becomes model.keras with the card."""
    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import load_model, read_metadata

    card = ModelCard.read(untrained_model)
    model, _ = load_model(untrained_model)
    out = _run_of(tmp_path)
    assert not out.fold_in_legacy_best(card)  # nothing to fold in
    model.save(out.path(LEGACY_BEST_FILE))  # a plain Keras save: no ecg_pipeline.json
    assert read_metadata(out.path(LEGACY_BEST_FILE)) == {}
    state = out.read_state()
    assert out.fold_in_legacy_best(card.with_train(state.to_dict(), state.best_epoch, False))
    assert not out.exists(LEGACY_BEST_FILE)
    kept = out.read_card(MODEL_FILE)
    assert kept.classes == card.classes and kept.train.weights_epoch == 1 and not kept.train.complete
    folded, _ = out.load_model(MODEL_FILE)
    assert all((a == b).all() for a, b in zip(folded.get_weights(), model.get_weights()))
