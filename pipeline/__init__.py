"""ECG arrhythmia pipeline: PhysioNet records -> STFT spectrograms -> labelled Zarr stores.

Each module is one stage (``download``, ``records``, ``segment``, ``spectrogram``,
``store``); the jobs in the sibling ``ecg_pipeline.jobs`` package compose them on a Dask cluster.
"""

if __name__ != "ecg_pipeline.pipeline":  # the folder imported under its generic name, e.g. from a checkout
    raise ImportError(f"this folder is the package 'ecg_pipeline.pipeline', not {__name__!r}: install the project "
                      "(pip install -e .) and import ecg_pipeline.pipeline")

__version__ = "0.1.0"
