"""Premature-beat augmentation (pipeline.augment): which beats it takes, what it writes, how the loader uses it."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_pipeline.pipeline.augment import PrematureBeats, premature_beats
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

    g = zarr.open_group(str(small_store), mode="r")
    rr, classes = g["rr"][:], list(g.attrs["classes"])
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
