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


def open_store(path: str, *, float32: bool = False, **kwargs: Any):
    """A store written by ``ecg-pipeline preprocess`` as a validated ``xarray.Dataset``
    (``ecg_pipeline.pipeline.store.open_dataset``: ``storage_options``, ``require_complete``).

    Spectrograms are stored as float16 by default (half the disk and I/O; the models take them as stored).
    Sums over many float16 values overflow (``groupby("label").mean()`` of all N beats is not finite):
    ``float32=True`` gives a lazy float32 view of the floating-point segment variables.
    """
    from .pipeline.store import open_dataset

    ds = open_dataset(path, **kwargs)
    if float32:
        ds = ds.assign({name: var.astype("float32") for name, var in ds.data_vars.items()
                        if var.dtype.kind == "f" and var.dtype.itemsize < 4})
    return ds


def open_scores(path: str, **kwargs: Any):
    """A scores store written by ``ecg-pipeline score`` as a validated ``xarray.Dataset``
    (``ecg_pipeline.pipeline.scores.open_scores``: ``storage_options``, ``require_complete``)."""
    from .pipeline.scores import open_scores as _open_scores

    return _open_scores(path, **kwargs)
