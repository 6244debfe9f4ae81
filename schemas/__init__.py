"""JSON schemas of the pipeline: the preprocess configuration and the Zarr store.

The files are package data so that installed copies validate against the same
schemas as the source tree; ``load(name)`` reads one.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load(name: str) -> dict[str, Any]:
    """Return the parsed JSON schema ``schemas/<name>``."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
