"""ecg-pipeline: PhysioNet ECG databases -> STFT spectrogram stores on Dask -> 2D CNN arrhythmia classifiers.

The one import package over the project's folders: ``ecg_pipeline.pipeline`` (one module per stage),
``ecg_pipeline.jobs`` (the jobs and the ``ecg-pipeline`` command line, also ``python -m ecg_pipeline``)
and ``ecg_pipeline.schemas`` (the stores' and configurations' schemas). The two stores open with one call:

>>> import ecg_pipeline
>>> ds = ecg_pipeline.open_store("mitdb.zarr")        # doctest: +SKIP
>>> scores = ecg_pipeline.open_scores("scores.zarr")  # doctest: +SKIP
"""

from __future__ import annotations

import pkgutil
from typing import Any

# A checkout's folder and an installed copy are one package: a checkout on the path (a working directory)
# must not hide the installed sub-packages.
__path__ = pkgutil.extend_path(__path__, __name__)

__all__ = ["__version__", "open_scores", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from the stages' package (pyproject's version), read when asked
        from .pipeline import __version__

        return __version__
    raise AttributeError(f"module 'ecg_pipeline' has no attribute {name!r}")


def open_store(path: str, **kwargs: Any):
    """A store written by ``ecg-pipeline preprocess`` as a validated ``xarray.Dataset``
    (``ecg_pipeline.pipeline.store.open_dataset``: ``storage_options``, ``require_complete``)."""
    from .pipeline.store import open_dataset

    return open_dataset(path, **kwargs)


def open_scores(path: str, **kwargs: Any):
    """A scores store written by ``ecg-pipeline score`` as a validated ``xarray.Dataset``
    (``ecg_pipeline.pipeline.scores.open_scores``: ``storage_options``, ``require_complete``)."""
    from .pipeline.scores import open_scores as _open_scores

    return _open_scores(path, **kwargs)
