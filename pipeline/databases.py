"""The PhysioNet databases the pipeline knows, declared as data.

Adding a database is one ``register_database`` call: its default version (never
scraped from physionet.org), where its records are (loose files, or a member
archive of the version folder and the folder inside it), where its labels come
from (a label source of ``pipeline.labels.LABEL_SOURCES`` and its options), the
preferred leads, and the preprocess defaults that differ from the beat ones.
``svdb`` and ``incartdb`` use the same beat labels as ``mitdb``, and another
challenge-style database (recordings + a label table) the same entry shape as
``challenge-2017``, so each only needs its entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Database:
    """A PhysioNet database as the pipeline reads it.

    Attributes
    ----------
    name
        PhysioNet slug: the folder under ``https://physionet.org/files/``.
    version
        Default version folder.
    title
        Full name, for reports and store attributes.
    annotator
        Extension of the reference beat annotation file (``atr``); "" for none.
    label_map
        Key of ``pipeline.labels.LABEL_MAPS``.
    archive, archive_folder
        The records are members of this archive of the version folder
        (``training2017.zip``), under this folder inside it; "" for loose files.
    leads
        Preferred signal names, best first.
    citation
        What users of the data must cite (ODC-By / PhysioNet terms).
    labels, label_options
        The label source (a key of ``pipeline.labels.LABEL_SOURCES``) and its options
        (``record-table``: ``file``, ``classes``).
    challenge_classes
        Classes whose mean F1 is the database's headline score (Challenge 2017: N, A, O;
        the noisy class is left out); reported as ``challenge_f1``.
    preprocess_defaults
        Preprocess configuration keys whose defaults differ for this database (e.g. the
        STFT hop of rhythm windows); a configuration file overrides them.
    """

    name: str
    version: str
    title: str
    annotator: str
    label_map: str
    leads: tuple[str, ...]
    citation: str
    archive: str = ""
    archive_folder: str = ""
    labels: str = "beat-annotations"
    label_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    challenge_classes: tuple[str, ...] = ()
    preprocess_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)


_PHYSIONET = (
    "Goldberger AL et al. PhysioBank, PhysioToolkit, and PhysioNet. Circulation 101(23):e215-e220 (2000)."
)

_REGISTRY: dict[str, Database] = {}
DATABASES: Mapping[str, Database] = MappingProxyType(_REGISTRY)  #: read-only view of the registry


def register_database(db: Database) -> Database:
    """Add ``db`` to the registry (the CLI's choices and help come from it); a name is registered once."""
    if db.name in _REGISTRY and _REGISTRY[db.name] != db:
        raise ValueError(f"database {db.name!r} is already registered differently")
    _REGISTRY[db.name] = db
    return db


register_database(Database(
    name="mitdb",
    version="1.0.0",
    title="MIT-BIH Arrhythmia Database",
    annotator="atr",
    label_map="aami-ec57",
    # 102 and 104 have no MLII (V5 is the closest lateral lead); 114 has MLII second. MLII is lead II from
    # torso electrodes: in a 12-lead or Holter record a model trained on it scores lead II, not V5 or lead I.
    leads=("MLII", "II", "V5", "V1", "V2", "V4"),
    citation="Moody GB, Mark RG. The impact of the MIT-BIH Arrhythmia Database. "
    "IEEE Eng Med Biol 20(3):45-50 (2001). " + _PHYSIONET,
))


register_database(Database(
    name="challenge-2017",
    version="1.0.0",
    title="AF Classification from a Short Single Lead ECG Recording: "
          "the PhysioNet/Computing in Cardiology Challenge 2017",
    annotator="",
    label_map="",
    leads=("ECG",),
    citation="Clifford GD, Liu C, Moody B, Lehman LH, Silva I, Li Q, Johnson AE, Mark RG. AF classification from a "
    "short single lead ECG recording: the PhysioNet/Computing in Cardiology Challenge 2017. Computing in "
    "Cardiology 44 (2017). " + _PHYSIONET,
    archive="training2017.zip",
    archive_folder="training2017",
    labels="record-table",
    label_options={"file": "REFERENCE.csv", "classes": ("N", "A", "O", "~")},
    challenge_classes=("N", "A", "O"),
    # 30 s windows: a frame every 32 samples keeps the input at ~280 frames; 512 windows a chunk
    # gives ~19 write tasks for the 8,528 recordings. Rows up to 75 Hz (17 of 33): the ECG's energy, half
    # the network's cost, and a model that accepts recorders from 187.5 Hz up (250 Hz Holters among them).
    preprocess_defaults={"stft": {"hop": 32, "max_freq_hz": 75.0}, "store": {"chunk_size": 512}},
))


def get_database(name: str) -> Database:
    """Return the registry entry for ``name`` or raise ``KeyError`` listing the known ones."""
    try:
        return DATABASES[name]
    except KeyError:
        raise KeyError(f"unknown database {name!r}; known: {', '.join(sorted(DATABASES))}") from None
