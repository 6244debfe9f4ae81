"""RR features in a real store (schema v3 on): what preprocess writes, what the loader streams beside the
spectrograms, and how stores of schema v2 (no RR features) and v3 (no templates) are opened or refused."""

from __future__ import annotations

import numpy as np
import pytest
import wfdb
import zarr

from helpers import as_flat_store

from ecg_pipeline.pipeline import store
from ecg_pipeline.pipeline.detect import fiducial_points
from ecg_pipeline.pipeline.errors import StoreError
from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats
from ecg_pipeline.pipeline.config import PreprocessConfig
from ecg_pipeline.pipeline.rr import RRSpec, features_at

pytestmark = pytest.mark.realdata
SPEC = PreprocessConfig().rr.spec()  # the default: the intervals (rr.atrial off; tests/test_atrial.py has it on)
STORED_FEATURES = SPEC.features


def test_the_store_holds_the_rr_features_of_every_beat_from_all_beats_of_its_record(small_store, mirror):
    ds = store.open_dataset(str(small_store))
    assert ds.attrs["schema_version"] == store.store_schema()["schema_version"] and ds["rr"].dims == ("segment", "rr_feature")
    assert ds["rr"].dtype == np.float32 and list(ds["rr_feature"].values) == list(STORED_FEATURES)
    assert RRSpec.from_attrs(ds.attrs["rr"]) == SPEC == RRSpec()
    rr = ds["rr"].values
    assert np.isfinite(rr).all()
    for record in ("100", "209"):
        i = list(ds["record_id"].values).index(record)
        off, n = int(ds["record_offset"].values[i]), int(ds["record_n_segments"].values[i])
        ann = wfdb.rdann(str(mirror / "mitdb" / "1.0.0" / record), "atr")
        beats = label_beats(ann.sample, ann.symbol, AAMI_EC57)
        anchor = ds["anchor"].values[off:off + n]
        # Every beat moved to its fiducial point (window.align), as the anchors are.
        sig = wfdb.rdrecord(str(mirror / "mitdb" / "1.0.0" / record), channel_names=["MLII"]).p_signal[:, 0]
        every = fiducial_points(sig.astype(np.float32), 360.0, beats.all_sample)
        assert set(anchor) <= set(every)
        assert np.array_equal(rr[off:off + n], features_at(anchor, every, 360.0, SPEC, sig.astype(np.float32)))
    # S beats of 209 (supraventricular runs) come early against the record's long average.
    rec = np.asarray(ds["record"].values).astype(str)
    lab = np.asarray(ds["label"].values).astype(str)
    pre_long = rr[:, list(STORED_FEATURES).index("pre_long")]
    assert np.median(pre_long[(rec == "209") & (lab == "S")]) < 0.85 < np.median(pre_long[(rec == "209") & (lab == "N")])


def test_the_loader_streams_rr_beside_the_spectrograms_with_the_same_chunked_reads(small_store):
    tf = pytest.importorskip("tensorflow")
    from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader

    g = zarr.open_group(str(small_store), mode="r")["segments"]
    spec, rr = g["spectrogram"][:], g["rr"][:]
    idx = np.arange(300, 1400)  # a split selection over chunks 1-5 of 256
    opts = LoaderOptions(batch_size=128, seed=3, inputs=("spectrogram", "rr"), class_weighting="sqrt")
    loader = ZarrSegmentLoader(str(small_store), idx, opts)
    assert loader.input_shapes == {"spectrogram": spec.shape[1:], "rr": (len(STORED_FEATURES),)}
    epochs = []
    dataset = loader.dataset()
    for _ in range(2):  # Keras iterates one dataset once per epoch
        xs, rs, ys = [], [], []
        for x, y, w in dataset:
            assert set(x) == {"spectrogram", "rr"} and w.shape == y.shape
            xs.append(x["spectrogram"].numpy())
            rs.append(x["rr"].numpy())
            ys.append(y.numpy())
        epochs.append((np.concatenate(xs), np.concatenate(rs), np.concatenate(ys)))
    for x, r, _ in epochs:
        # Every selected segment once, each spectrogram with its own RR row (found back by its bytes).
        where = {row.tobytes(): i for i, row in zip(idx, spec[idx].reshape(len(idx), -1))}
        rows = np.array([where[row.tobytes()] for row in x.reshape(len(x), -1)])
        assert sorted(rows) == list(idx)
        assert np.array_equal(r, rr[rows])
    assert not np.array_equal(epochs[0][1], epochs[1][1])  # shuffled anew each epoch
    # Unshuffled, in segment order, as spectrogram-only loaders are.
    plain = ZarrSegmentLoader(str(small_store), idx, LoaderOptions(batch_size=500, shuffle=False,
                                                                    inputs=("spectrogram", "rr")))
    got = np.concatenate([x["rr"].numpy() for x, _ in plain.dataset()])
    assert np.array_equal(got, rr[idx])
    x, y = plain.read_chunks([0])
    assert set(x) == {"spectrogram", "rr"} and len(x["rr"]) == len(y)
    assert tf.is_tensor(next(iter(ZarrSegmentLoader(str(small_store), idx).dataset()))[0])  # one input: a tensor


def _as_v2(small_store, tmp_path):
    """The store as schema v2 wrote it: the same, flat, without RR features and templates."""
    return as_flat_store(small_store, tmp_path / "v2.zarr", 2, drop=("rr", "rr_feature", "template"))


def test_a_schema_v2_store_is_opened_for_reading_and_refused_for_rr_models_and_writing(small_store, tmp_path):
    from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader

    old = _as_v2(small_store, tmp_path)
    ds = store.open_dataset(str(old))  # read as a v4 store without rr and template
    assert "rr" not in ds and ds.sizes["segment"] == store.open_dataset(str(small_store)).sizes["segment"]
    tree, new = store.open_tree(str(old)), store.open_tree(str(small_store))  # the flat store in v5's two groups
    assert list(tree["records"].to_dataset().status.values) == list(new["records"].to_dataset().status.values)
    assert tree["segments"].sizes["segment"] == new["segments"].sizes["segment"] and "rr" not in tree["segments"]
    assert tree["records"]["n_segments"].attrs["units"] == "1" and tree.attrs["schema_version"] == 2
    assert len(ZarrSegmentLoader(str(old), np.arange(10))) == 10  # spectrogram-only models keep working
    with pytest.raises(StoreError, match=r"no variable 'rr' \(store schema v2.*--overwrite"):
        ZarrSegmentLoader(str(old), np.arange(10), LoaderOptions(inputs=("spectrogram", "rr")))
    layout = store.Layout(("100",), (10,), 8, 24, 256, len(STORED_FEATURES))
    with pytest.raises(StoreError, match=r"store schema v2 \(this ecg-pipeline writes v5.*--overwrite"):
        store.prepare(str(old), layout, {**dict(ds.attrs), "schema_version": 5}, "float16",
                      coords={"freq": np.zeros(8, np.float32), "time": np.zeros(24, np.float32)})


def test_training_an_rr_model_on_a_v2_store_says_how_to_rebuild_it(small_store, tmp_path):
    pytest.importorskip("tensorflow")
    from ecg_pipeline.jobs.train import TrainRequest, run_training
    from ecg_pipeline.pipeline.config import TrainConfig
    from ecg_pipeline.pipeline.models import ModelError

    old = _as_v2(small_store, tmp_path)
    with pytest.raises(ModelError, match=rf"model beat-template-cnn takes the store variable 'rr'.*preprocess mitdb --out {old}"):
        run_training(TrainRequest(str(old), "intra-patient", str(tmp_path / "run"), TrainConfig(epochs=1), verbose=0))


def test_a_schema_v3_store_trains_rr_models_and_refuses_template_models_with_how_to_rebuild(small_store, tmp_path):
    """Schema v4 added the neighbour templates: a v3 store (RR features, no templates) opens, streams RR
    features, and a model that takes templates is refused before any work with the rebuild command."""
    pytest.importorskip("tensorflow")
    from ecg_pipeline.jobs.train import TrainRequest, run_training
    from ecg_pipeline.pipeline.config import TrainConfig
    from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader
    from ecg_pipeline.pipeline.models import ModelError

    old = as_flat_store(small_store, tmp_path / "v3.zarr", 3, drop=("template",))
    ds = store.open_dataset(str(old))
    assert "template" not in ds and "rr" in ds
    assert len(ZarrSegmentLoader(str(old), np.arange(10), LoaderOptions(inputs=("spectrogram", "rr")))) == 10
    with pytest.raises(ModelError, match=rf"model beat-template-cnn takes the store variable 'template'.*"
                                         rf"preprocess mitdb --out {old}"):
        run_training(TrainRequest(str(old), "intra-patient", str(tmp_path / "run"), TrainConfig(epochs=1), verbose=0))
