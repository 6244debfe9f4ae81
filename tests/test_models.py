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
