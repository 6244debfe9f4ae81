"""The model card: one typed declaration of ecg_pipeline.json, its generated schema, reading and checking."""

from __future__ import annotations

from importlib import resources

import jsonschema
import numpy as np
import pytest

from ecg_pipeline import schemas
from ecg_pipeline.pipeline.config import TrainConfig, render_schema
from ecg_pipeline.pipeline.model_card import CARD_SCHEMA_FILE, ModelCard, json_schema
from ecg_pipeline.pipeline.models import ModelError
from ecg_pipeline.pipeline.rr import RRSpec
from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec

SPEC = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64, max_freq_hz=40.0)

#: ecg_pipeline.json as `train` wrote it before the card existed (store schema v4, a beat-rr-cnn run): keys with
#: null values, no package versions. Such models are read as they are.
TODAYS_METADATA = {
    "package": "ecg-pipeline", "package_version": "0.9.0", "task": "beat", "anchor_kind": "r-peak",
    "classes": ["N", "S", "V", "F", "Q"], "challenge_classes": [],
    "input": {"shape": [SPEC.n_freq, SPEC.n_time], "dtype": "float16", "variable": "spectrogram",
              "variables": ["spectrogram", "rr"], "rr": RRSpec().attrs()},
    "accepted": {"min_fs_hz": SPEC.min_fs_hz, "band_hz": [0.0, 39.375]},
    "store": {"database": "mitdb", "database_version": "1.0.0", "config_fingerprint": "ab" * 32,
              "spectrogram": SPEC.attrs(), "preprocess_config": {"leads": ["MLII"]}, "label_map": {"N": "N"},
              "label_source": {"kind": "beat-annotations"}, "schema_version": 4},
    "split": {"name": "inter-patient"}, "train_config": {"model": "beat-rr-cnn"},
    "train": {"epoch": 8, "best_epoch": 6, "best_val_score": 0.71, "stopped_early": False, "selection": "val_macro_f1",
              "weights_epoch": 6, "complete": True, "refit": {"epochs": 10, "members": 2}},
}


def test_the_committed_schema_is_the_generated_one():
    """schemas/model-card.schema.json comes from the card: `python -m ecg_pipeline.pipeline.model_card`."""
    committed = resources.files("ecg_pipeline.schemas").joinpath(CARD_SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == render_schema(json_schema()), "out of date: python -m ecg_pipeline.pipeline.model_card"
    assert schemas.load(CARD_SCHEMA_FILE) == json_schema()
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_a_model_written_by_todays_train_is_read_and_says_what_scoring_needs():
    card = ModelCard.from_dict(TODAYS_METADATA, "m.keras")
    jsonschema.validate(TODAYS_METADATA, json_schema())
    assert card.spec == SPEC and card.inputs == ("spectrogram", "rr") and card.input_dtype == "float16"
    assert card.leads == ("MLII",) and card.annotator == "atr" and card.min_fs == SPEC.min_fs_hz
    assert card.train.refit["members"] == 2 and card.task_impl().unit == "beats"
    assert card.window_s == pytest.approx((90 + 162) / 360)
    # Written back, the same keys and values (what was null is left out).
    again = card.to_dict()
    assert again["store"]["spectrogram"] == SPEC.attrs() and again["train"] == TODAYS_METADATA["train"]
    assert ModelCard.from_dict(again) == card


@pytest.mark.parametrize("change, message", [
    ({"task": "segmentation"}, "a 'segmentation' model; this ecg-pipeline knows"),
    ({"classes": []}, "classes: List should have at least 1 item"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"store": {"spectrogram": {"fs": 360}}}, "lacks the spectrogram parameters"),
    ({"input": {**TODAYS_METADATA["input"], "shape": [9, 9]}}, "metadata and network disagree"),
    ({"input": {**TODAYS_METADATA["input"], "rr": None}}, "takes RR features but its metadata does not say how"),
])
def test_metadata_that_is_no_card_is_refused_in_one_message_naming_the_file(change, message):
    with pytest.raises(ModelError, match=message) as err:
        ModelCard.from_dict({**TODAYS_METADATA, **change}, "runs/r1/model.keras")
    assert str(err.value).startswith("runs/r1/model.keras") and "\n" not in str(err.value)


def test_no_metadata_at_all_is_refused():
    with pytest.raises(ModelError, match="no ecg_pipeline.json metadata"):
        ModelCard.from_dict({}, "plain.keras")


def test_the_training_record_and_refit_are_added_without_touching_the_rest():
    card = ModelCard.from_dict({k: v for k, v in TODAYS_METADATA.items() if k != "train"})
    state = {"epoch": 3, "best_epoch": 2, "best_val_score": 0.5, "stopped_early": False, "selection": "val_macro_f1"}
    saved = card.with_train(state, 2, False)
    assert saved.train.weights_epoch == 2 and not saved.train.complete and card.train is None
    refit = saved.with_refit({"epochs": 4, "members": 1})
    assert refit.train.refit == {"epochs": 4, "members": 1} and refit.store == card.store
    with pytest.raises(ValueError, match="after the training record"):
        card.with_refit({"epochs": 1})


@pytest.mark.realdata
def test_a_card_made_from_a_real_store_checks_that_store_and_refuses_others(small_store):
    from ecg_pipeline.pipeline.store import open_dataset

    ds = open_dataset(str(small_store))
    inputs = ("spectrogram", "rr")
    card = ModelCard.from_store(ds.attrs, {"name": "inter-patient"}, TrainConfig().to_dict(),
                                (ds.sizes["freq"], ds.sizes["time"]), "float16", inputs)
    jsonschema.validate(card.to_dict(), json_schema())
    assert card.versions["ecg-pipeline"] and "numpy" in card.versions  # what it was trained with
    assert card.store.label_map == dict(ds.attrs["label_map"]) and card.inputs == inputs
    card.check_store(ds.attrs, list(ds.variables), "m.keras")  # its own store: fine
    other_stft = {**ds.attrs, "spectrogram": {**ds.attrs["spectrogram"], "hop": 16}}
    with pytest.raises(ModelError, match="differ in: hop"):
        card.check_store(other_stft, list(ds.variables), "m.keras")
    with pytest.raises(ModelError, match="is a beat model; the store holds rhythm segments"):
        card.check_store({**ds.attrs, "task": "rhythm"}, list(ds.variables), "m.keras")
    with pytest.raises(ModelError, match="predicts classes"):
        card.check_store({**ds.attrs, "classes": ["N", "V"]}, list(ds.variables), "m.keras")
    with pytest.raises(ModelError, match="takes the store variable 'rr'"):
        card.check_store(ds.attrs, [v for v in ds.variables if v != "rr"], "m.keras")
    with pytest.raises(ModelError, match="RR features computed with other parameters"):
        card.check_store({**ds.attrs, "rr": {**ds.attrs["rr"], "max_rr_s": 9.0}}, list(ds.variables), "m.keras")
    assert np.isclose(card.accepted.band_hz[1], float(SpectrogramSpec.from_attrs(ds.attrs["spectrogram"]).freqs()[-1]))
