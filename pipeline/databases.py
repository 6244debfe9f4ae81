"""The PhysioNet databases the pipeline knows, declared as data.

Adding a database is one ``register_database`` call: its default version (never
scraped from physionet.org), where its records are (loose files, or a member
archive of the version folder and the folder inside it), the reference annotation
file and label map, and the preferred leads. ``svdb`` and ``incartdb`` use the same
beat labels as ``mitdb``, so they only need their entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


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
    # 102 and 104 have no MLII (V5 is the closest lateral lead); 114 has MLII second.
    leads=("MLII", "V5", "V1", "V2", "V4"),
    citation="Moody GB, Mark RG. The impact of the MIT-BIH Arrhythmia Database. "
    "IEEE Eng Med Biol 20(3):45-50 (2001). " + _PHYSIONET,
))


def get_database(name: str) -> Database:
    """Return the registry entry for ``name`` or raise ``KeyError`` listing the known ones."""
    try:
        return DATABASES[name]
    except KeyError:
        raise KeyError(f"unknown database {name!r}; known: {', '.join(sorted(DATABASES))}") from None
