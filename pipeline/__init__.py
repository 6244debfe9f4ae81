"""ECG arrhythmia pipeline: PhysioNet records -> STFT spectrograms -> labelled Zarr stores.

Each module is one stage (``download``, ``records``, ``segment``, ``spectrogram``,
``store``); the jobs in the sibling ``jobs`` package compose them on a Dask cluster.
"""

__version__ = "0.1.0"
