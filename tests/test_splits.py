"""Splits: records never cross parts; the beat split is stratified and seeded."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_pipeline.pipeline.errors import ConfigError
from ecg_pipeline.pipeline.splits import DS1, DS1_VALIDATION, DS2, PACED, by_records, from_file, inter_patient, intra_patient

ALL = sorted(DS1 + DS2 + PACED)


def _table(n_per_record: int = 10):
    n = np.full(len(ALL), n_per_record)
    off = np.concatenate([[0], np.cumsum(n)[:-1]])
    return ALL, off, n


def test_inter_patient_parts_are_the_published_records():
    ids, off, n = _table()
    split = inter_patient(ids, off, n)
    assert set(split.records["test"]) == set(DS2)
    assert set(split.records["train"]) | set(split.records["val"]) == set(DS1)
    assert set(split.records["val"]) == set(DS1_VALIDATION)
    record_of = np.repeat(np.array(ids), n)
    for part in ("train", "val", "test"):
        assert set(record_of[split[part]]) == set(split.records[part])
    used = np.concatenate([split[p] for p in ("train", "val", "test")])
    assert len(used) == len(np.unique(used)) == 10 * (len(DS1) + len(DS2))
    assert not set(record_of[used]) & set(PACED)


def test_intra_patient_is_stratified_disjoint_and_seeded():
    rng = np.random.default_rng(1)
    labels = rng.choice(list("NSVFQ"), size=5000, p=[0.8, 0.05, 0.1, 0.02, 0.03])
    a, b, c = intra_patient(labels, seed=3), intra_patient(labels, seed=3), intra_patient(labels, seed=4)
    for p in ("train", "val", "test"):
        assert np.array_equal(a[p], b[p])
    assert not np.array_equal(a["test"], c["test"])
    parts = np.concatenate([a[p] for p in ("train", "val", "test")])
    assert np.array_equal(np.sort(parts), np.arange(5000))
    for cls in "NSVFQ":
        n = (labels == cls).sum()
        assert abs((labels[a["test"]] == cls).sum() - 0.1 * n) <= 1
        assert abs((labels[a["train"]] == cls).sum() - 0.8 * n) <= 1


def test_split_file_and_its_errors(tmp_path):
    ids, off, n = _table(5)
    f = tmp_path / "split.yaml"
    f.write_text("train: ['101', '106']\nval: ['108']\ntest: ['100']\n")
    split = from_file(f, ids, off, n)
    assert [len(split[p]) for p in ("train", "val", "test")] == [10, 5, 5]
    with pytest.raises(ConfigError, match="record 101 is in both"):
        by_records("x", {"train": ("101",), "test": ("101",)}, ids, off, n)
    with pytest.raises(ConfigError, match="record 999 is not in the store"):
        by_records("x", {"train": ("999",)}, ids, off, n)
    f.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_file(f, ids, off, n)
