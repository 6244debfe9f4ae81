"""Models take the stored spectrogram as is, save as .keras with metadata, and load only safely."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ecg_pipeline.pipeline.models import ModelError, build_model, load_model, read_metadata, save_model  # noqa: E402


def test_beat_model_standardises_inside(tmp_path):
    model = build_model("spectrogram-cnn", (33, 24), 5, input_dtype="float16", options={"width": 8})
    assert model.input.shape == (None, 33, 24) and model.input.dtype == "float16"
    x = np.random.default_rng(0).normal(size=(4, 33, 24)).astype("float16")
    # Per-sample standardisation is a layer: shifting and scaling a spectrogram changes nothing.
    p1 = model.predict(x, verbose=0)
    p2 = model.predict((x * 3 + 5).astype("float16"), verbose=0)
    assert p1.shape == (4, 5) and np.allclose(p1.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(p1, p2, atol=2e-3)
    path = save_model(model, tmp_path / "m.keras", {"classes": list("NSVFQ"), "store": {"spectrogram": {"hop": 8}}})
    loaded, meta = load_model(path)
    assert meta["store"]["spectrogram"]["hop"] == 8 and read_metadata(path) == meta
    assert np.allclose(loaded.predict(x, verbose=0), p1, atol=1e-6)


def test_rhythm_model_takes_any_length():
    model = build_model("rhythm-cnn", (33, None), 4, input_dtype="float32", options={"width": 4, "blocks": 2})
    for n_time in (40, 97):
        p = model.predict(np.zeros((2, 33, n_time), "float32") + np.arange(n_time, dtype="float32"), verbose=0)
        assert p.shape == (2, 4) and np.allclose(p.sum(axis=1), 1, atol=1e-5)


def test_unknown_model_and_options():
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet-9000", (33, 24), 5)
    with pytest.raises(ModelError, match="bad model_options"):
        build_model("spectrogram-cnn", (33, 24), 5, options={"depth": 3})
    with pytest.raises(ModelError, match="bad model_options"):
        build_model("beat-rr-cnn", (8, 24), 5, options={"template": True}, rr_stats=_rr_stats())


def test_unsafe_formats_are_refused(tmp_path):
    inp = keras.Input((3,))
    out = keras.layers.Lambda(lambda t: t * 2)(inp)
    lam = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(lam)
    with pytest.raises(ModelError, match="safe mode"):
        load_model(lam)
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(ModelError, match="only native .keras"):
        load_model(pkl)
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="only native .keras"):
        load_model(fake)
    with pytest.raises(ModelError, match="no model file"):
        load_model(tmp_path / "absent.keras")


def test_batch_norm_statistics_are_recomputed_with_the_current_weights():
    """Precise BN: each moving mean becomes the plain average of the batch means, dropout off, nothing else moved."""
    import keras

    from ecg_pipeline.pipeline.models import recalibrate_batch_norm

    x_in = keras.Input((6,))
    bn = keras.layers.BatchNormalization(momentum=0.99)
    drop = keras.layers.Dropout(0.5)
    model = keras.Model(x_in, bn(drop(x_in)))
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=k, size=(8, 6)).astype("float32") for k in range(4)]
    kernel_before = [w.numpy().copy() for w in model.trainable_weights]
    assert recalibrate_batch_norm(model, iter(batches)) == 4
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([b.mean(axis=0) for b in batches], axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([b.var(axis=0) for b in batches], axis=0),
                               rtol=1e-4)
    assert (bn.momentum, drop.rate) == (0.99, 0.5)
    for a, b in zip(kernel_before, model.trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())


def _saved(tmp_path, name, model, shape, classes):
    return save_model(model, tmp_path / f"{name}.keras", {"classes": classes, "input": {
        "shape": list(shape), "dtype": "float32", "variable": "spectrogram"}})


@pytest.mark.parametrize("kind", ["spectrogram-cnn", "rhythm-cnn"])
def test_a_network_that_disagrees_with_its_metadata_is_refused_before_and_after_loading(kind, tmp_path):
    from ecg_pipeline.pipeline.models import check_archive

    n_time = 24 if kind == "spectrogram-cnn" else None
    opts = {"width": 4} if kind == "spectrogram-cnn" else {"width": 4, "blocks": 2}
    model = build_model(kind, (33, n_time), 5, input_dtype="float32", options=opts)
    good = _saved(tmp_path, "good", model, (33, 24), list("NSVFQ"))  # a rhythm network takes any length
    assert load_model(good)[1]["classes"] == list("NSVFQ") and check_archive(good)["input"]["shape"] == [33, 24]
    for name, shape, classes, message in [
            ("shape", (17, 24), list("NSVFQ"), r"windows of shape \(17, 24\), the network takes \(33, "),
            ("classes", (33, 24), list("NSV"), "names 3 classes .N, S, V., the network scores 5")]:
        path = _saved(tmp_path, name, model, shape, classes)
        # The archive's config.json (read without TensorFlow, on the driver) and the loaded network (on workers).
        with pytest.raises(ModelError, match=message):
            check_archive(path)
        with pytest.raises(ModelError, match=message):
            load_model(path)


def _rr_stats(n=9):
    from ecg_pipeline.pipeline.rr import STORED_FEATURES

    return {"n": n, "features": list(STORED_FEATURES), "mean": [0.8, 0.8, 0.8, 0.8, 1, 1, 1, 1, 0.01],
            "variance": [0.04] * 4 + [0.02] * 4 + [0.01]}


def test_a_two_input_model_is_fed_by_input_name_saved_and_loaded_safely(tmp_path):
    from ecg_pipeline.pipeline.models import MODEL_INPUTS, check_archive, flops_per_segment

    assert MODEL_INPUTS["beat-rr-cnn"] == ("spectrogram", "rr") and MODEL_INPUTS["spectrogram-cnn"] == ("spectrogram",)
    from ecg_pipeline.pipeline.models import RELATIVE_RR

    model = build_model("beat-rr-cnn", (8, 24), 5, input_dtype="float16", rr_stats=_rr_stats(),
                        options={"rr_use": list(RELATIVE_RR)})
    assert {t.name.split(":")[0] for t in model.inputs} == {"spectrogram", "rr"}
    rng = np.random.default_rng(0)
    x = {"rr": rng.normal(1, 0.2, size=(6, 9)).astype("float32"),
         "spectrogram": rng.normal(size=(6, 8, 24)).astype("float16")}  # by name: the order does not matter
    p = model.predict(x, verbose=0)
    assert p.shape == (6, 5) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    # With rr_use, only those features are used: changing the seconds (pre_rr, ...) changes nothing.
    y = {**x, "rr": x["rr"].copy()}
    y["rr"][:, :4] += 0.5
    assert np.allclose(model.predict(y, verbose=0), p, atol=1e-6)
    z = {**x, "rr": x["rr"].copy()}
    z["rr"][:, 4] *= 0.5  # pre_local: a premature beat
    assert not np.allclose(model.predict(z, verbose=0), p, atol=1e-6)
    meta = {"classes": list("NSVFQ"), "input": {"shape": [8, 24], "dtype": "float16", "variable": "spectrogram",
                                                "variables": ["spectrogram", "rr"]}}
    path = save_model(model, tmp_path / "m.keras", meta)
    assert check_archive(path)["input"]["variables"] == ["spectrogram", "rr"]
    loaded, _ = load_model(path)  # Keras safe mode: the selection and standardisation are plain layers
    assert np.allclose(loaded.predict(x, verbose=0), p, atol=1e-6)
    assert 0.5e6 < flops_per_segment(loaded) < 3e6  # the light model of docs/results.md (~1 MFLOP a beat)
    assert flops_per_segment(build_model("spectrogram-cnn", (33, 24), 5)) > 10e6
    # A spectrogram-only network whose metadata says it takes rr is refused.
    plain = save_model(build_model("spectrogram-cnn", (8, 24), 5, options={"width": 4}), tmp_path / "p.keras", meta)
    with pytest.raises(ModelError, match="feeds the store variable 'rr'"):
        check_archive(plain)
    with pytest.raises(ModelError, match="needs the store's RR features"):
        build_model("beat-rr-cnn", (8, 24), 5)
    with pytest.raises(ModelError, match="rr_use names"):
        build_model("beat-rr-cnn", (8, 24), 5, rr_stats=_rr_stats(), options={"rr_use": ["heart_rate"]})


def test_the_template_model_takes_three_inputs_by_name_and_sees_a_beat_unlike_its_neighbours(tmp_path):
    from ecg_pipeline.pipeline.models import MODEL_INPUTS, check_archive, flops_per_segment

    assert MODEL_INPUTS["beat-template-cnn"] == ("spectrogram", "rr", "template")
    model = build_model("beat-template-cnn", (8, 24), 5, input_dtype="float16", rr_stats=_rr_stats())
    assert {t.name.split(":")[0] for t in model.inputs} == {"spectrogram", "rr", "template"}
    rng = np.random.default_rng(0)
    x = {"template": rng.normal(size=(6, 8, 24)).astype("float16"), "rr": rng.normal(1, 0.2, size=(6, 9)).astype("float32"),
         "spectrogram": rng.normal(size=(6, 8, 24)).astype("float16")}
    p = model.predict(x, verbose=0)
    assert p.shape == (6, 5) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    # The same beat against another template is another input: the network sees the difference.
    other = {**x, "template": (x["template"] + 2).astype("float16")}
    assert not np.allclose(model.predict(other, verbose=0), p, atol=1e-4)
    meta = {"classes": list("NSVFQ"), "input": {"shape": [8, 24], "dtype": "float16", "variable": "spectrogram",
                                                "variables": ["spectrogram", "rr", "template"]}}
    path = save_model(model, tmp_path / "t.keras", meta)
    assert check_archive(path)["input"]["variables"] == ["spectrogram", "rr", "template"]
    loaded, _ = load_model(path)
    assert np.allclose(loaded.predict(x, verbose=0), p, atol=1e-6)
    assert 0.5e6 < flops_per_segment(loaded) < 3e6  # a second input channel adds 1 % to the first conv only


def test_members_average_into_one_model_saved_loaded_and_fed_by_name(tmp_path):
    """``TrainConfig.members``: refit models averaged into one archive that loads in safe mode."""
    import keras

    from ecg_pipeline.pipeline.models import average_members, check_archive, flops_per_segment

    members = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        members.append(build_model("beat-template-cnn", (8, 24), 5, input_dtype="float16", rr_stats=_rr_stats()))
    assert average_members(members[:1]) is members[0]
    rng = np.random.default_rng(0)
    x = {"template": rng.normal(size=(7, 8, 24)).astype("float16"), "rr": rng.normal(1, 0.2, size=(7, 9)).astype("float32"),
         "spectrogram": rng.normal(size=(7, 8, 24)).astype("float16")}
    each = [m.predict(x, verbose=0) for m in members]
    assert not np.allclose(each[0], each[1], atol=1e-3)  # two seeds, two models
    mean = average_members(members)
    meta = {"classes": list("NSVFQ"), "input": {"shape": [8, 24], "dtype": "float16", "variable": "spectrogram",
                                                "variables": ["spectrogram", "rr", "template"]}}
    path = save_model(mean, tmp_path / "mean.keras", meta)
    assert check_archive(path)["classes"] == list("NSVFQ")
    loaded, _ = load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), (each[0] + each[1]) / 2, atol=1e-6)
    assert flops_per_segment(loaded) == 2 * flops_per_segment(members[0])
    # A one-input model takes the array itself, as before.
    single = [build_model("spectrogram-cnn", (8, 24), 5) for _ in range(2)]
    spec = x["spectrogram"]
    np.testing.assert_allclose(average_members(single).predict(spec, verbose=0),
                               np.mean([m.predict(spec, verbose=0) for m in single], axis=0), atol=1e-6)
    with pytest.raises(ModelError, match="members take different inputs"):
        average_members([members[0], single[0]])
