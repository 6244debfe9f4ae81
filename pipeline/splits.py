"""Stage 6: train / validation / test splits of a store's segments.

A split is a set of sorted segment indices per part. Record-level splits
(inter-patient, split files) never put one record on two sides; the intra-patient
split is the reference's random beat split, stratified by class and seeded.

The loader reads only the Zarr chunks that hold a part's indices, so a split that
selects a few records reads a few chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from .errors import ConfigError
from .locations import locate

#: de Chazal, O'Dwyer & Reilly, IEEE TBME 51(7) 2004: the inter-patient split of MIT-BIH.
DS1 = ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201", "203", "205",
       "207", "208", "209", "215", "220", "223", "230")
DS2 = ("100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212", "213", "214", "219",
       "221", "222", "228", "231", "232", "233", "234")
#: Paced records, excluded from the inter-patient split (AAMI EC57 recommends it).
PACED = ("102", "104", "107", "217")
#: DS1 records held out for validation (early stopping, model selection) in the inter-patient split.
#: They hold S beats of three patients (318 of DS1's 944) and V beats of three (658 of 3,788),
#: and leave 209 (S) and 208 (F) to training. DS2 is never used for selection.
DS1_VALIDATION = ("118", "119", "201", "220")

PARTS = ("train", "val", "test")
SPLIT_NAMES = ("inter-patient", "intra-patient", "stratified")


@dataclass(frozen=True)
class Split:
    """Segment indices of each part of a split.

    Attributes
    ----------
    name
        ``inter-patient``, ``intra-patient`` or the split file's path.
    parts
        ``{"train": idx, "val": idx, "test": idx}``; sorted, disjoint int64 arrays.
    records
        For record-level splits, the records of each part (empty for a beat split).
    description
        Parameters that recreate the split (saved with a training run).
    """

    name: str
    parts: Mapping[str, np.ndarray]
    records: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: Mapping[str, object] = field(default_factory=dict)

    def __getitem__(self, part: str) -> np.ndarray:
        try:
            return self.parts[part]
        except KeyError:
            raise ConfigError(f"split {self.name} has no part {part!r} (parts: {', '.join(self.parts)})") from None

    def to_dict(self) -> dict:
        return {"name": self.name, **dict(self.description),
                "records": {k: list(v) for k, v in self.records.items()},
                "n_segments": {k: int(len(v)) for k, v in self.parts.items()}}


def _record_ranges(record_ids: Sequence[str], offsets: np.ndarray, n_beats: np.ndarray) -> dict[str, np.ndarray]:
    return {str(r): np.arange(o, o + n, dtype=np.int64) for r, o, n in zip(record_ids, offsets, n_beats)}


def by_records(name: str, records: Mapping[str, Sequence[str]], record_ids: Sequence[str], offsets: np.ndarray,
               n_beats: np.ndarray, description: Mapping[str, object] | None = None) -> Split:
    """A split that assigns whole records to parts.

    Raises
    ------
    ConfigError
        A record is in two parts, or is not in the store.
    """
    ranges = _record_ranges(record_ids, offsets, n_beats)
    seen: dict[str, str] = {}
    for part, recs in records.items():
        if part not in PARTS:
            raise ConfigError(f"split {name}: unknown part {part!r} (expected {', '.join(PARTS)})")
        for r in recs:
            if r in seen:
                raise ConfigError(f"split {name}: record {r} is in both {seen[r]!r} and {part!r}")
            if r not in ranges:
                raise ConfigError(f"split {name}: record {r} is not in the store")
            seen[r] = part
    parts = {p: (np.concatenate([ranges[r] for r in records.get(p, ())]) if records.get(p) else
                 np.zeros(0, np.int64)) for p in PARTS}
    return Split(name, {p: np.sort(v) for p, v in parts.items()},
                 {p: tuple(records.get(p, ())) for p in PARTS}, dict(description or {}))


def inter_patient(record_ids: Sequence[str], offsets: np.ndarray, n_beats: np.ndarray,
                  validation: Sequence[str] = DS1_VALIDATION) -> Split:
    """DS1 (less ``validation``) to train, ``validation`` to validate, DS2 to test; paced records out."""
    train = tuple(r for r in DS1 if r not in validation)
    return by_records("inter-patient", {"train": train, "val": tuple(validation), "test": DS2},
                      record_ids, offsets, n_beats,
                      {"reference": "de Chazal et al. 2004 (DS1/DS2), paced records excluded",
                       "excluded": list(PACED)})


def intra_patient(labels: np.ndarray, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Split:
    """The reference's random beat split, stratified by class and seeded.

    Beats of one patient land on both sides: this split measures the model on
    patients it has seen, and is not an estimate for new patients.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ConfigError(f"split fractions {fractions} must be >= 0 and sum to 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for p, piece in zip(PARTS, np.split(idx, cuts)):
            parts[p].append(piece)
    return Split("intra-patient", {p: np.sort(np.concatenate(v)).astype(np.int64) for p, v in parts.items()},
                 {}, {"seed": seed, "fractions": list(fractions), "stratified_by": "label"})


def stratified_records(record_ids: Sequence[str], record_labels: Sequence[str], offsets: np.ndarray,
                       n_segments: np.ndarray, seed: int = 0, test: float = 0.2, val: float = 0.1) -> Split:
    """A seeded hold-out of whole records, stratified by each record's label.

    ``test`` of the records of each class go to test; ``val`` of the rest to validation,
    the others to training. Every window of a recording stays on its recording's side.
    """
    if not (0 <= test < 1 and 0 <= val < 1):
        raise ConfigError(f"split fractions test={test}, val={val} must lie in [0, 1)")
    rng = np.random.default_rng(seed)
    ids, lab = np.asarray(record_ids, dtype=object), np.asarray(record_labels, dtype=object)
    keep = np.asarray(n_segments) > 0  # failed records hold no segments
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for c in sorted(set(lab[keep].tolist())):
        recs = ids[keep & (lab == c)][rng.permutation(int((keep & (lab == c)).sum()))]
        n_test = int(round(test * len(recs)))
        n_val = int(round(val * (len(recs) - n_test)))
        parts["test"] += recs[:n_test].tolist()
        parts["val"] += recs[n_test:n_test + n_val].tolist()
        parts["train"] += recs[n_test + n_val:].tolist()
    records = {p: tuple(sorted(v)) for p, v in parts.items()}
    return by_records("stratified", records, record_ids, offsets, n_segments,
                      {"seed": seed, "fractions": {"test": test, "val": val}, "stratified_by": "record label",
                       "unit": "record"})


def record_labels(ds) -> list[str]:
    """Each record's label: the most common label of its segments ("" for a record with none)."""
    from collections import Counter

    label = np.asarray(ds["label"].values).astype(str)
    out = []
    for o, n in zip(np.asarray(ds["record_offset"].values), np.asarray(ds["record_n_segments"].values)):
        out.append(Counter(label[o:o + n].tolist()).most_common(1)[0][0] if n else "")
    return out


def from_file(path: str | Path, record_ids: Sequence[str], offsets: np.ndarray, n_beats: np.ndarray,
              storage_options: Mapping[str, Any] | None = None) -> Split:
    """A record split from a YAML/JSON file ``{train: [...], val: [...], test: [...]}`` (a path or fsspec URL)."""
    text = locate(path, storage_options).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if isinstance(data, dict) and "records" in data and isinstance(data["records"], dict):
        data = data["records"]  # a split.json saved by a training run
    if not isinstance(data, dict) or not data.get("train"):
        raise ConfigError(f"split file {path}: expected a mapping with lists 'train', 'val', 'test' of record names")
    records = {p: tuple(str(r) for r in data.get(p) or ()) for p in PARTS}
    return by_records(str(path), records, record_ids, offsets, n_beats, {"file": str(path)})


def _inter_patient(ds, seed: int) -> Split:
    if ds.attrs.get("database") != "mitdb":
        raise ConfigError(f"--split inter-patient is defined for mitdb, not {ds.attrs.get('database')}")
    return inter_patient(*_table(ds))


def _intra_patient(ds, seed: int) -> Split:
    return intra_patient(np.asarray(ds["label"].values).astype(str), seed=seed)


def _stratified(ds, seed: int) -> Split:
    ids, offsets, n = _table(ds)
    return stratified_records(ids, record_labels(ds), offsets, n, seed=seed)


SplitFactory = Callable[[Any, int], Split]  #: (store dataset, seed) -> Split
_REGISTRY: dict[str, tuple[SplitFactory, str]] = {}
SPLITS: Mapping[str, tuple[SplitFactory, str]] = MappingProxyType(_REGISTRY)  #: name -> (factory, one-line help)


def register_split(name: str, factory: SplitFactory, help: str) -> None:
    """Make ``--split NAME`` (and ``make_split(NAME, ...)``) build a split with ``factory(ds, seed)``."""
    if name in _REGISTRY and _REGISTRY[name][0] is not factory:
        raise ValueError(f"split {name!r} is already registered")
    _REGISTRY[name] = (factory, help)


register_split("inter-patient", _inter_patient,
               "de Chazal et al. 2004: train DS1 (validation: DS1 records 118 119 201 220), test DS2; "
               "paced records 102 104 107 217 excluded (MIT-BIH only)")
register_split("intra-patient", _intra_patient,
               "random segment split 80/10/10, stratified by class, seeded (the reference's)")
register_split("stratified", _stratified,
               "whole records: 20% test, 10% of the rest validation, stratified by record label, seeded "
               "(the default for rhythm stores)")


def _table(ds) -> tuple[list[str], np.ndarray, np.ndarray]:
    return ([str(r) for r in ds["record_id"].values], np.asarray(ds["record_offset"].values),
            np.asarray(ds["record_n_segments"].values))


def make_split(spec: str, ds, seed: int = 0, storage_options: Mapping[str, Any] | None = None) -> Split:
    """The split named by ``spec`` (a key of ``SPLITS`` or a split file's path or URL) over store ``ds``."""
    if spec in SPLITS:
        return SPLITS[spec][0](ds, seed)
    if locate(spec, storage_options).isfile():
        return from_file(spec, *_table(ds), storage_options=storage_options)
    raise ConfigError(f"--split {spec!r}: expected {', '.join(SPLITS)} or an existing split file")
