"""Wall seconds per stage, summed over a task: what the job reports share by share."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict


class Timer:
    """Accumulates wall seconds per stage: ``with timer("stft"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t

    def add(self, seconds: dict[str, float]) -> None:
        """Add another timer's seconds (a stage timed inside a function that keeps its own)."""
        for stage, s in seconds.items():
            self.seconds[stage] += s
