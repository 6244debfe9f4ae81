"""What the jobs share: the download cache location, stage timers, progress bars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ..pipeline.timing import Timer  # noqa: F401 - the jobs' stage timer


def default_cache_dir() -> Path:
    """``$ECG_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/ecg-pipeline``, else ``~/.cache/ecg-pipeline``."""
    if os.environ.get("ECG_PIPELINE_CACHE"):
        return Path(os.environ["ECG_PIPELINE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "ecg-pipeline"


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir`` (``~`` expanded), or ``default_cache_dir()`` when None."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def prepare_source(source, cache_dir: str | None, policy):
    """Task: ``source.prepare`` on a worker, with that worker's cache folder."""
    return source.prepare(cache_root(cache_dir), policy)
