"""ecg-pipeline: PhysioNet ECG databases -> STFT spectrogram stores on Dask -> 2D CNN arrhythmia classifiers.

The one import package over the project's folders: ``ecg_pipeline.pipeline`` (one module per stage),
``ecg_pipeline.jobs`` (the jobs and the ``ecg-pipeline`` command line, also ``python -m ecg_pipeline``)
and ``ecg_pipeline.schemas`` (the stores' and configurations' schemas). The two stores open with one call:

>>> import ecg_pipeline
>>> tree = ecg_pipeline.open_store("mitdb.zarr")      # doctest: +SKIP
>>> beats, records = tree["segments"].to_dataset(), tree["records"].to_dataset()  # doctest: +SKIP
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
    """A store written by ``ecg-pipeline preprocess`` as a validated ``xarray.DataTree``
    (``ecg_pipeline.pipeline.store.open_tree``: ``storage_options``, ``require_complete``).

    ``tree["segments"]`` holds one row per segment (spectrograms lazy), ``tree["records"]`` the per-record
    table; ``tree.attrs`` say what the store holds (decoded: dicts and lists, as the schema declares them).
    Spectrograms are stored as float16 by default (half the disk and I/O; the models take them as stored).
    Sums over many float16 values overflow (``groupby("label").mean()`` of all N beats is not finite), and
    netCDF has no float16: ``float32=True`` gives a lazy float32 view of the floating-point segment variables.
    """
    from .pipeline.store import SEGMENTS, open_tree

    tree = open_tree(path, **kwargs)
    if float32:
        seg = tree[SEGMENTS].to_dataset()
        tree[SEGMENTS] = seg.assign({name: var.astype("float32") for name, var in seg.data_vars.items()
                                     if var.dtype.kind == "f" and var.dtype.itemsize < 4})
    return tree


def open_scores(path: str, **kwargs: Any):
    """A scores store written by ``ecg-pipeline score`` as a validated ``xarray.DataTree``
    (``ecg_pipeline.pipeline.scores.open_scores_tree``: ``storage_options``, ``require_complete``):
    ``tree["segments"]`` one row per scored beat or window, ``tree["records"]`` the per-record table."""
    from .pipeline.scores import open_scores_tree

    return open_scores_tree(path, **kwargs)
