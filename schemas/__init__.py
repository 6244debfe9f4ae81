"""JSON schemas of the pipeline: the preprocess configuration and the Zarr store.

The files are package data so that installed copies validate against the same
schemas as the source tree; ``load(name)`` reads one.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

if __name__ != "ecg_pipeline.schemas":  # the folder imported under its generic name, e.g. from a checkout
    raise ImportError(f"this folder is the package 'ecg_pipeline.schemas', not {__name__!r}: install the project "
                      "(pip install -e .) and import ecg_pipeline.schemas")


@cache
def load(name: str) -> dict[str, Any]:
    """Return the parsed JSON schema ``schemas/<name>``."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
