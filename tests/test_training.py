"""The training stages (pipeline.training): a real tiny training run on MIT-BIH records whose model card
validates against the committed schema, a resume after a crash between checkpoint and state, and the
scorer, history and evaluation writers on their own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from ecg_pipeline.pipeline.config import TrainConfig, train_config_from_dict
from ecg_pipeline.pipeline.run_folder import CHECKPOINT_FILE, MODEL_FILE, STATE_FILE, RunFolder
from ecg_pipeline.pipeline.training import Scorer, format_epoch_line, write_evaluation, write_history

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "model-card.schema.json"
SPLIT = "train: ['208', '209', '220']\nval: ['119']\ntest: ['100']\n"
TINY = {"batch_size": 128, "patience": 5, "refit_epochs": 0, "members": 1, "model_options": {"width": 8, "dense": 32}}


def _train(store, split_file, out, resume=False, **config):
    from ecg_pipeline.jobs.train import TrainRequest, run_training

    cfg = train_config_from_dict({**TINY, **config})
    return run_training(TrainRequest(str(store), str(split_file), str(out), cfg, resume=resume, verbose=0))


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("training-split") / "split.yaml"
    path.write_text(SPLIT)
    return path


@pytest.fixture(scope="module")
def trained(small_store, split_file, tmp_path_factory):
    """Two epochs and a refit of a tiny beat-template-cnn on five real MIT-BIH records."""
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("training") / "run"
    return out, _train(small_store, split_file, out, epochs=2)


@pytest.mark.realdata
@pytest.mark.slow
def test_the_card_of_a_real_run_validates_against_the_schema_and_reads_back(trained, small_store):
    import jsonschema

    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import MODEL_INPUTS, read_metadata
    from ecg_pipeline.pipeline.store import open_dataset

    out, result = trained
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        errors = [e.message for e in validator.iter_errors(read_metadata(out / name))]
        assert not errors, (name, errors)
    ds = open_dataset(str(small_store))
    card = ModelCard.read(out / MODEL_FILE)
    assert card.task == ds.attrs["task"] == "beat"
    assert card.classes == list(ds.attrs["classes"])
    assert card.inputs == MODEL_INPUTS[TrainConfig().model] == ("spectrogram", "rr", "template")
    assert card.train.complete and card.train.refit["members"] == 1 and card.train.refit["epochs"] == result.best_epoch
    assert card.split["records"]["test"] == ["100"] and card.train_config["epochs"] == 2
    card.check_store(ds.attrs, list(ds.variables), str(out / MODEL_FILE))  # its own store passes


@pytest.mark.realdata
@pytest.mark.slow
def test_the_result_is_what_run_json_holds_and_its_text_the_summary(trained):
    from ecg_pipeline.jobs.train import format_result

    out, result = trained
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    assert result.model == str(out / MODEL_FILE) and result.epochs_run == 2 and result.refit_epochs >= 1
    text = result.text()
    assert format_result(result) == text
    assert f"run        {out}\n" in text and "refit on train + val for" in text
    assert f"{result.test['macro_f1']:.4f}" in text


@pytest.mark.realdata
@pytest.mark.slow
def test_the_model_card_picks_the_evaluation_split(trained, small_store):
    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.store import open_dataset
    from ecg_pipeline.pipeline.training import evaluation_split

    out, _ = trained
    ds = open_dataset(str(small_store))
    split = evaluation_split(ModelCard.read(out / MODEL_FILE), ds, None, 0)
    assert split.records["test"] == ("100",) and split.records["val"] == ("119",)
    assert len(split["test"]) == int(ds.record_n_segments.values[list(ds.record_id.values).index("100")])


@pytest.mark.realdata
@pytest.mark.slow
def test_a_run_killed_between_checkpoint_and_state_resumes_after_the_state_epoch(small_store, split_file, tmp_path):
    """Killed after the checkpoint of epoch 2 and before its state: --resume trains epoch 2 again from the
    checkpoint, and the run ends with one history entry an epoch."""
    pytest.importorskip("tensorflow")
    from ecg_pipeline.pipeline.model_card import ModelCard

    out = tmp_path / "run"
    _train(small_store, split_file, out, epochs=1, refit=False)
    after_one = (out / STATE_FILE).read_text()
    _train(small_store, split_file, out, resume=True, epochs=2, refit=False)
    assert ModelCard.read(out / CHECKPOINT_FILE).train.epoch == 2
    (out / STATE_FILE).write_text(after_one)  # the crash: the state of epoch 2 was never written

    result = _train(small_store, split_file, out, resume=True, epochs=2, refit=False)
    history = json.loads((out / "history.json").read_text())
    assert result.epochs_run == 2 and len(history["loss"]) == 2
    assert history["loss"][0] == json.loads(after_one)["history"]["loss"][0]
    assert ModelCard.read(out / CHECKPOINT_FILE).train.epoch == 2 and ModelCard.read(out / MODEL_FILE).train.complete


def _rhythm_ds():
    records = np.array(["A01", "A01", "A01", "A02", "A02", "A03"])
    return xr.Dataset(coords={"record": ("segment", records)},
                      attrs={"task": "rhythm", "classes": ["N", "A"], "challenge_classes": ["N", "A"],
                             "label_source": {}})


def test_a_rhythm_store_is_scored_per_recording():
    scorer = Scorer.of(_rhythm_ds())
    assert scorer.selection == "val_challenge_f1" and scorer.task.writes_predictions
    loader = SimpleNamespace(labels=np.array([0, 0, 0, 1, 1, 1]), indices=np.arange(6))
    prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.9, 0.1]])
    metrics, names, p, y = scorer(loader, prob)
    assert list(names) == ["A01", "A02", "A03"] and list(y) == [0, 1, 1]
    assert np.allclose(p[0], [0.6333333, 0.3666667]) and metrics["support"] == 3
    assert metrics["unit"] == "record" and metrics["n_windows"] == 6
    assert metrics["aggregation"] == "mean of the window probabilities per record"
    assert "challenge_f1" in metrics


def test_a_beat_store_is_scored_per_beat():
    ds = xr.Dataset(coords={"record": ("segment", np.array(["100"] * 4))},
                    attrs={"task": "beat", "classes": ["N", "S", "V", "F", "Q"]})
    scorer = Scorer.of(ds)
    assert scorer.selection == "val_macro_f1" and not scorer.task.writes_predictions
    loader = SimpleNamespace(labels=np.array([0, 2]), indices=np.array([1, 3]))
    metrics, names, _, _ = scorer(loader, np.eye(5)[[0, 1]])
    assert list(names) == ["1", "3"] and metrics["support"] == 2 and "unit" not in metrics
    assert metrics["accuracy"] == 0.5


def test_history_and_evaluation_files_are_written_through_the_folder(tmp_path):
    from ecg_pipeline.pipeline.evaluate import classification_metrics
    from ecg_pipeline.pipeline.evaluate import write_evaluation as write_evaluation_files

    out = RunFolder(str(tmp_path / "run"))
    write_history(out, {"loss": [1.0, 0.5], "val_macro_f1": [0.25, 0.5]})
    assert out.read_json("history.json") == {"loss": [1.0, 0.5], "val_macro_f1": [0.25, 0.5]}
    assert out.read_text("history.csv") == "epoch,loss,val_macro_f1\n1,1,0.25\n2,0.5,0.5\n"
    assert out.read_bytes("curves.png").startswith(b"\x89PNG")

    metrics = classification_metrics(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["N", "S", "V"])
    write_evaluation(out, metrics, "a title")
    write_evaluation_files(tmp_path / "old", metrics, title="a title")  # what evaluation wrote before the folder
    for name in ("metrics.json", "classification_report.txt"):
        assert out.read_text(name) == (tmp_path / "old" / name).read_text(), name
    for name in ("confusion_counts.png", "confusion_ratios.png"):
        assert out.read_bytes(name).startswith(b"\x89PNG"), name


def test_an_epoch_line_is_plain_and_marks_the_selection_metric():
    logs = {"loss": 0.5, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.91, "val_macro_f1": 0.7,
            "val_challenge_f1": 0.6, "learning_rate": 3e-4}
    line = format_epoch_line(2, 5, logs, 1.25, best=True)
    assert line.startswith("epoch 2/5  loss 0.5000") and line.endswith("lr 3.00e-04  1.2 s")
    assert "val_challenge_f1 0.6000 (best)" in line and "val_macro_f1 0.7000  " in line
    assert "(best)" not in format_epoch_line(2, 5, logs, 1.0, best=False)
