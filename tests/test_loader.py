"""The tf.data loader over a real store of five MIT-BIH records (chunks of 256 segments)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

tf = pytest.importorskip("tensorflow")

from helpers import HTTPMirror  # noqa: E402
from ecg_pipeline.pipeline.errors import StoreError  # noqa: E402
from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader, class_weights  # noqa: E402

pytestmark = pytest.mark.realdata


def _stored(path, idx):
    return zarr.open_group(str(path), mode="r")["segments/spectrogram"].get_orthogonal_selection((idx, slice(None), slice(None)))


def _keys(x):
    """One hashable key per spectrogram (its bytes)."""
    x = np.ascontiguousarray(x)
    return [row.tobytes() for row in x.reshape(len(x), -1)]


def _epoch(ds):
    xs, ys = [], []
    for batch in ds:
        xs.append(batch[0].numpy())
        ys.append(batch[1].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_every_sample_once_per_epoch_in_a_new_order(small_store):
    rng = np.random.default_rng(0)
    n = zarr.open_group(str(small_store), mode="r")["segments/spectrogram"].shape[0]
    idx = np.sort(rng.choice(n, size=3000, replace=False))
    loader = ZarrSegmentLoader(str(small_store), idx, LoaderOptions(batch_size=100, seed=1, shuffle_chunks=3))
    assert len(loader) == 3000 and loader.steps_per_epoch() == 30
    ds = loader.dataset()
    want = sorted(zip(_keys(_stored(small_store, idx)), loader.labels))
    orders = []
    for _ in range(2):
        x, y = _epoch(ds)
        assert x.shape == (3000, *loader.sample_shape) and x.dtype == np.float16
        assert sorted(zip(_keys(x), y)) == want  # each selected sample exactly once, with its label
        orders.append(_keys(x))
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_seed_makes_epochs_reproducible(small_store):
    opts = LoaderOptions(batch_size=128, seed=7)
    a = ZarrSegmentLoader(str(small_store), None, opts).dataset()
    b = ZarrSegmentLoader(str(small_store), None, opts).dataset()
    c = ZarrSegmentLoader(str(small_store), None, LoaderOptions(batch_size=128, seed=8)).dataset()
    ea1, ea2 = _epoch(a), _epoch(a)
    eb1, eb2 = _epoch(b), _epoch(b)
    assert np.array_equal(ea1[0], eb1[0]) and np.array_equal(ea2[1], eb2[1])
    assert not np.array_equal(ea1[1], _epoch(c)[1])


def test_unshuffled_order_is_segment_order(small_store):
    idx = np.arange(100, 1400, 3)
    loader = ZarrSegmentLoader(str(small_store), idx, LoaderOptions(batch_size=64, shuffle=False))
    x, y = _epoch(loader.dataset())
    assert np.array_equal(x, _stored(small_store, idx)) and np.array_equal(y, loader.labels)


def test_split_reads_only_its_chunks(small_store, tmp_path):
    """Corrupt every chunk a selection does not need: the loader still reads it; touching one fails."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(small_store, copy)
    idx = np.arange(600, 900)  # chunks 2 and 3 of 256
    loader = ZarrSegmentLoader(str(copy), idx, LoaderOptions(batch_size=50, seed=0))
    assert loader.chunks.tolist() == [2, 3]
    chunks = copy / "segments" / "spectrogram" / "c"
    chunk_files = [p for p in chunks.rglob("*") if p.is_file()]
    assert len(chunk_files) > 4
    for p in chunk_files:
        if int(p.relative_to(chunks).parts[0]) not in (2, 3):
            p.write_bytes(b"garbage")
    x, _ = _epoch(loader.dataset())
    assert sorted(_keys(x)) == sorted(_keys(_stored(small_store, idx)))
    with pytest.raises(Exception):
        _epoch(ZarrSegmentLoader(str(copy), np.arange(0, 300), LoaderOptions(batch_size=50)).dataset())


def test_class_weights_and_balanced_sampling(small_store):
    w = class_weights(np.array([900, 90, 10, 0]), "balanced")
    assert w[3] == 0 and np.isclose((w * [900, 90, 10, 0]).sum(), 1000)
    assert np.allclose(w[:3] * [900, 90, 10], w[0] * 900)  # each class carries the same total weight
    assert class_weights(np.array([900, 100]), "sqrt")[1] < class_weights(np.array([900, 100]), "balanced")[1]

    loader = ZarrSegmentLoader(str(small_store), None, LoaderOptions(batch_size=256, seed=0, class_weighting="balanced"))
    x, y, sw = (np.concatenate(a) for a in zip(*[(b[0].numpy(), b[1].numpy(), b[2].numpy()) for b in loader.dataset()]))
    assert np.allclose(sw, loader.class_weights[y])
    balanced = ZarrSegmentLoader(str(small_store), None, LoaderOptions(batch_size=256, seed=0, balanced_sampling=True))
    _, yb = _epoch(balanced.dataset())
    present = np.flatnonzero(balanced.class_counts)
    share = np.bincount(yb, minlength=5) / len(yb)
    natural = balanced.class_counts / len(balanced)
    assert len(yb) == len(balanced)
    # Resampling is within each shuffle group: classes spread over many groups (F: 372 of 12k segments,
    # natural share 3%) get close to an equal share; a class of 2 beats in one group gets that group's share.
    spread = balanced.class_counts >= 100
    assert (share[spread] > 0.6 / len(present)).all(), (share, balanced.class_counts)
    major = int(np.argmax(balanced.class_counts))
    minor = [c for c in present if c != major]
    assert share[major] < 0.5 * natural[major] and (share[minor] > 1.5 * natural[minor]).all(), (share, natural)


def test_normalize_standardises_each_sample(small_store):
    loader = ZarrSegmentLoader(str(small_store), np.arange(512), LoaderOptions(batch_size=128, normalize=True))
    x, _ = _epoch(loader.dataset())
    assert x.dtype == np.float32
    assert np.allclose(x.mean(axis=(1, 2)), 0, atol=1e-4) and np.allclose(x.std(axis=(1, 2)), 1, atol=1e-2)


def test_shards_are_disjoint_and_complete(small_store):
    loader = ZarrSegmentLoader(str(small_store), None, LoaderOptions(batch_size=200, seed=3))
    parts = [_keys(_epoch(loader.dataset(shard=(i, 3)))[0]) for i in range(3)]
    assert sum(len(p) for p in parts) == len(loader)
    assert sorted(k for p in parts for k in p) == sorted(_keys(_stored(small_store, np.arange(len(loader)))))


def test_remote_store_over_http(small_store):
    idx = np.arange(0, 2000, 7)
    with HTTPMirror(small_store.parent) as srv:
        loader = ZarrSegmentLoader(srv.url + small_store.name, idx, LoaderOptions(batch_size=64, shuffle=False))
        x, y = _epoch(loader.dataset())
    assert np.array_equal(x, _stored(small_store, idx))


def test_bad_input(small_store, tmp_path):
    with pytest.raises(StoreError, match="no Zarr store"):
        ZarrSegmentLoader(str(tmp_path / "absent.zarr"))
    with pytest.raises(IndexError, match="segment indices"):
        ZarrSegmentLoader(str(small_store), np.array([10**7]))
    with pytest.raises(ValueError, match="class_weighting"):
        LoaderOptions(class_weighting="inverse")


DISTRIBUTED = """
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from ecg_pipeline.pipeline.loader import ZarrSegmentLoader, LoaderOptions
from ecg_pipeline.pipeline.models import build_model
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
loader = ZarrSegmentLoader(sys.argv[1], np.arange(1024), LoaderOptions(batch_size=128, seed=0))
with strategy.scope():
    m = build_model("spectrogram-cnn", loader.sample_shape, 5, options={"width": 4})
    m.compile("adam", "sparse_categorical_crossentropy")
a = m.fit(loader.dataset(), epochs=1, verbose=0, shuffle=False).history["loss"]
b = m.fit(loader.distribute(strategy), epochs=1, verbose=0, steps_per_epoch=loader.steps_per_epoch()).history["loss"]
print("RESULT", strategy.num_replicas_in_sync, np.isfinite(a + b).all())
"""


def test_fits_under_a_mirrored_strategy(small_store):
    """Two replicas (two logical CPUs, in a fresh process): Keras fit on the dataset and on loader.distribute()."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", DISTRIBUTED, str(small_store)], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "RESULT 2 True" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
