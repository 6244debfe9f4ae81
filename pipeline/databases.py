"""The PhysioNet databases the pipeline knows, declared as data.

Adding a database is one entry here: its default version (never scraped from
physionet.org), the annotation file extension, the label map, and the preferred
leads. ``svdb`` and ``incartdb`` use the same beat labels as ``mitdb``, so they
only need their entry; a rhythm database (``challenge-2017``) adds a label source
in the job that reads it.
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
        Extension of the reference beat annotation file (``atr``).
    label_map
        Key of ``pipeline.labels.LABEL_MAPS``.
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


_PHYSIONET = (
    "Goldberger AL et al. PhysioBank, PhysioToolkit, and PhysioNet. Circulation 101(23):e215-e220 (2000)."
)

DATABASES: Mapping[str, Database] = MappingProxyType(
    {
        "mitdb": Database(
            name="mitdb",
            version="1.0.0",
            title="MIT-BIH Arrhythmia Database",
            annotator="atr",
            label_map="aami-ec57",
            # 102 and 104 have no MLII (V5 is the closest lateral lead); 114 has MLII second.
            leads=("MLII", "V5", "V1", "V2", "V4"),
            citation="Moody GB, Mark RG. The impact of the MIT-BIH Arrhythmia Database. "
            "IEEE Eng Med Biol 20(3):45-50 (2001). " + _PHYSIONET,
        ),
    }
)


def get_database(name: str) -> Database:
    """Return the registry entry for ``name`` or raise ``KeyError`` listing the known ones."""
    try:
        return DATABASES[name]
    except KeyError:
        raise KeyError(f"unknown database {name!r}; known: {', '.join(sorted(DATABASES))}") from None
