"""Premature-beat augmentation (pipeline.augment): which beats it takes, what it writes, how the loader uses it."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_pipeline.pipeline import store
from ecg_pipeline.pipeline.augment import PrematureBeats, TimeStretch, chain, premature_beats
from ecg_pipeline.pipeline.rr import STORED_FEATURES, features_at

F = {f: i for i, f in enumerate(STORED_FEATURES)}


def _regular_record(n=400, rr=0.8, premature_at=(100,)):
    t = np.arange(n) * rr
    for i in premature_at:
        t[i] -= 0.35 * rr  # an early beat
    sample = np.round(t * 360).astype(np.int64)
    return features_at(sample, sample, 360.0)


def test_only_normal_beats_of_a_regular_rhythm_are_converted_and_their_features_say_premature():
    rr = _regular_record()
    y = np.zeros(len(rr), np.int64)
    y[200] = 2  # a V beat: never converted
    aug = premature_beats(0.5, list("NSVFQ"), STORED_FEATURES)
    ok = aug.eligible(y, rr)
    assert not ok[[0, -1, 99, 100, 101, 200]].any()  # flagged edges, the premature beat and its neighbours, V
    assert ok.sum() > 0.9 * len(rr) - 10
    xs = {"rr": rr, "spectrogram": np.zeros((len(rr), 8, 24), np.float16)}
    out, y2 = aug(xs, y, np.random.default_rng(0))
    moved = np.flatnonzero(y2 != y)
    assert set(y2[moved]) == {1} and set(y[moved]) == {0} and 0.4 < len(moved) / ok.sum() < 0.6
    r = out["rr"][moved]
    assert (r[:, F["pre_local"]] < 0.86).all() and (r[:, F["pre_local"]] > 0.44).all()
    assert np.allclose(r[:, F["pre_local"]], r[:, F["pre_rr"]] / r[:, F["local_rr"]])
    assert np.allclose(r[:, F["pre_long"]], r[:, F["pre_rr"]] / r[:, F["long_rr"]])
    assert (r[:, F["post_local"]] > 0.65).all() and (r[:, F["post_local"]] < 1.45).all()  # a pause, or another early beat
    assert np.array_equal(out["rr"][y2 == y], rr[y2 == y])  # the rest untouched
    assert out["spectrogram"] is xs["spectrogram"] and np.array_equal(xs["rr"], rr)  # inputs not modified in place
    again, y3 = aug(xs, y, np.random.default_rng(0))
    assert np.array_equal(y3, y2) and np.array_equal(again["rr"], out["rr"])  # seeded
    shift = aug.count_shift(y, rr, 5)
    assert shift[0] == -shift[1] == pytest.approx(-0.5 * ok.sum()) and not shift[2:].any()


def test_no_augmentation_without_n_and_s_classes_or_rr_features():
    assert premature_beats(0.03, ["N", "A", "O", "~"], STORED_FEATURES) is None
    assert premature_beats(0.0, list("NSVFQ"), STORED_FEATURES) is None
    with pytest.raises(ValueError, match="needs the RR features"):
        PrematureBeats(0.1, 0, 1, ("pre_rr", "post_rr"))


@pytest.mark.realdata
def test_the_loader_converts_beats_in_each_group_and_weights_what_it_made(small_store):
    pytest.importorskip("tensorflow")
    import zarr

    from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader

    root = zarr.open_group(str(small_store), mode="r")
    g, classes = root["segments"], list(store.decode_attrs(root.attrs)["classes"])
    rr = g["rr"][:]
    aug = premature_beats(0.2, classes, list(g["rr_feature"][:]))
    idx = np.arange(len(rr))
    base = ZarrSegmentLoader(str(small_store), idx, LoaderOptions(inputs=("spectrogram", "rr"), seed=1,
                                                                  class_weighting="sqrt"))
    opts = LoaderOptions(inputs=("spectrogram", "rr"), seed=1, class_weighting="sqrt", augment=aug)
    loader = ZarrSegmentLoader(str(small_store), idx, opts)
    s = classes.index("S")
    assert loader.class_weights[s] < base.class_weights[s]  # more S beats per epoch: each weighs less
    n_s = 0
    for x, y, w in loader.dataset():
        y, r = y.numpy(), x["rr"].numpy()
        n_s += int((y == s).sum())
        made = (y == s) & (r[:, F["pre_local"]] < 0.86) & (np.abs(r[:, F["post_local"]] - 1) >= 0)
        assert np.allclose(w.numpy()[y == s], loader.class_weights[s])
        assert made.any() or not (y == s).any()
    real_s = int((base.labels == s).sum())
    expected = real_s + 0.2 * aug.eligible(base.labels, rr[idx]).sum()
    assert 0.8 * expected < n_s < 1.2 * expected


def _pulses(n_windows=6, n_freq=5, n_time=280, period=20):
    """Spectrogram windows with a bright frame every ``period`` frames (a beat), phase varying by window."""
    x = np.zeros((n_windows, n_freq, n_time), np.float16)
    for i in range(n_windows):
        x[i, :, i % period::period] = 1.0
    return x


def _period(row: np.ndarray) -> float:
    peaks = np.flatnonzero((row[1:-1] > row[:-2]) & (row[1:-1] >= row[2:]) & (row[1:-1] > 0.5)) + 1
    return float(np.median(np.diff(peaks)))


def test_time_stretch_changes_each_windows_rate_within_its_range_and_nothing_else():
    x = _pulses()
    xs = {"spectrogram": x, "other": np.arange(6)}
    y = np.arange(6)
    aug = TimeStretch(0.2)
    out, y2 = aug(xs, y, np.random.default_rng(3))
    s = out["spectrogram"]
    assert s.shape == x.shape and s.dtype == x.dtype
    assert y2 is y and out["other"] is xs["other"] and np.array_equal(xs["spectrogram"], _pulses())  # not in place
    periods = [_period(s[i, 0].astype(np.float32)) for i in range(len(s))]
    assert all(20 / 1.2 - 1 <= p <= 20 / 0.8 + 1 for p in periods), periods
    assert len({round(p) for p in periods}) > 1  # a rate drawn per window, not per group
    assert all(np.array_equal(s[i, 0], s[i, k]) for i in range(len(s)) for k in range(1, 5))  # frames move whole
    again, _ = aug(xs, y, np.random.default_rng(3))
    assert np.array_equal(again["spectrogram"], s)  # seeded
    with pytest.raises(ValueError, match="amount"):
        TimeStretch(1.0)


def test_chain_applies_its_parts_in_order_and_adds_their_count_shifts():
    rr = _regular_record()
    y = np.zeros(len(rr), np.int64)
    premature = premature_beats(0.5, list("NSVFQ"), STORED_FEATURES)
    assert chain(None, None) is None and chain(premature, None) is premature
    both = chain(premature, TimeStretch(0.1))
    xs = {"rr": rr, "spectrogram": _pulses(len(rr), 2, 40, 10)}
    out, y2 = both(xs, y, np.random.default_rng(0))
    ref, y_ref = premature(xs, y, np.random.default_rng(0))
    assert np.array_equal(y2, y_ref) and np.array_equal(out["rr"], ref["rr"])  # the first part drew first
    assert not np.array_equal(out["spectrogram"], xs["spectrogram"])
    assert np.array_equal(both.count_shift(y, rr, 5), premature.count_shift(y, rr, 5))


def test_the_training_job_stretches_time_only_when_its_configuration_asks():
    from ecg_pipeline.pipeline.training import _augmentation
    from ecg_pipeline.pipeline.config import TrainConfig, load_train_config

    assert _augmentation(TrainConfig(time_stretch=0.2), None, ("spectrogram",)) == TimeStretch(0.2)
    assert _augmentation(TrainConfig(), None, ("spectrogram",)) is None
    assert load_train_config(None, "beat").time_stretch == 0.0
