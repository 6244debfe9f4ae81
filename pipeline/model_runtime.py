"""Stage 9a: a model on the workers, loaded once per process and fed in batches.

``ModelPlugin`` is a Dask worker plugin (beside ``cluster``'s) that carries a model file's bytes
to every worker, checks them by SHA-256, loads them in Keras safe mode and traces the network
once; a worker that loaded the same bytes for an earlier job takes them from ``LOADED``. The
scoring tasks (``pipeline.scoring``) find the plugin by name and call ``predict``. Nothing in
the driver imports TensorFlow: the model is checked statically there (``model_card``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from distributed import WorkerPlugin

from . import models
from .locations import locate
from .model_card import ModelCard

__all__ = ["LOADED", "LoadedModels", "ModelFile", "ModelPlugin", "dummy_inputs", "limit_tf_threads", "network_inputs",
           "predict"]


@dataclass(frozen=True)
class ModelFile:
    """A model archive: where it is, its bytes' SHA-256 (its identity), its card and its bytes (read once: a model
    on an object store is downloaded once per job, not once per check)."""

    path: str
    sha256: str
    card: ModelCard
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    payload: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def read(cls, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> "ModelFile":
        """Check and read the archive at ``path``, a local path or fsspec URL (``ModelCard.read``: no TensorFlow).

        Raises
        ------
        models.ModelError
            Not a safe ``.keras`` archive, or no card of a known task.
        """
        location = locate(path, storage_options)
        if not location.isfile():
            raise models.ModelError(f"no model file at {location.url}")
        data = location.read_bytes()
        card = ModelCard.from_dict(models.check_archive_bytes(data, location.url), str(path))
        return cls(str(path), hashlib.sha256(data).hexdigest(), card, storage_options, data)

    def load(self, *, compile: bool = False, folder: str | None = None) -> Any:
        """The network (Keras safe mode, checked against the card's metadata), from the bytes read."""
        network, _ = models.load_model_bytes(self.payload, self.path, compile=compile, folder=folder)
        return network


def network_inputs(card: ModelCard, spectrogram: np.ndarray, rr: np.ndarray | None = None,
                   template: np.ndarray | None = None) -> Any:
    """The network's input from segments: the spectrograms alone for a one-input model, else arrays by input
    name (``card.inputs``), cast to the card's input dtype."""
    x = spectrogram.astype(card.input_dtype)
    if len(card.inputs) == 1:
        return x
    out = {"spectrogram": x, "rr": rr}
    if "template" in card.inputs:
        out["template"] = template.astype(card.input_dtype)
    return {k: out[k] for k in card.inputs}


def dummy_inputs(card: ModelCard, n: int) -> Any:
    """A batch of ``n`` zero segments (to trace the network)."""
    spec = card.spec
    x = np.zeros((n, spec.n_freq, spec.n_time), dtype=np.float32)
    n_rr = len(card.rr_spec.features) if card.rr_spec is not None else 0
    return network_inputs(card, x, np.zeros((n, n_rr), np.float32), x)


class LoadedModels:
    """Models this worker process loaded, by (sha256, threads), the most recent last.

    Loading and tracing cost ~0.3 s a worker, 10-15 % of a warm run over MIT-BIH; the bytes are
    checked by their sha256, so a hit is the very model. Only the last ``keep`` are kept: a
    long-lived cluster that scores with many models holds two in memory, not all of them.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._models: OrderedDict[tuple[str, int], tuple[Any, str]] = OrderedDict()

    def get(self, key: tuple[str, int]) -> tuple[Any, str] | None:
        if key not in self._models:
            return None
        self._models.move_to_end(key)
        return self._models[key]

    def put(self, key: tuple[str, int], model: Any, load_id: str) -> None:
        self._models[key] = (model, load_id)
        while len(self._models) > self.keep:
            self._models.popitem(last=False)


#: This process's loaded models (a worker process scores for many jobs).
LOADED = LoadedModels()


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker (Keras safe mode), for every task of the job.

    The plugin carries the model file's bytes, so workers need no access to the driver's disk; a
    worker that joins (or restarts) later gets it too. A worker that loaded the same model (same
    sha256) for an earlier job reuses it (``LOADED``).
    """

    def __init__(self, model: ModelFile):
        self.name = f"ecg-pipeline-model-{model.sha256[:16]}"
        # workers get the bytes read from the user's path or URL, not the path (nor its credentials)
        self.file = replace(model, storage_options=None, payload=None)
        self.payload = model.payload if model.payload is not None else locate(model.path, model.storage_options).read_bytes()
        self.model = None
        self.load_id = ""

    async def setup(self, worker) -> None:
        # Importing TensorFlow and loading take seconds: off the worker's event loop, so heartbeats go on.
        await asyncio.get_running_loop().run_in_executor(None, self._load, worker)

    def _load(self, worker) -> None:
        limit_tf_threads(worker.state.nthreads)
        key = (self.file.sha256, worker.state.nthreads)
        hit = LOADED.get(key)
        if hit is not None:  # a warm worker scoring again with the same model: no new load and trace
            self.model, self.load_id = hit
            return
        if hashlib.sha256(self.payload).hexdigest() != self.file.sha256:
            raise models.ModelError(f"{self.file.path}: bytes changed in transit")
        self.model = replace(self.file, payload=self.payload).load(
            folder=getattr(worker, "local_directory", None) or tempfile.gettempdir())
        self.load_id = f"{worker.address}/{os.getpid()}/{time.time_ns()}"  # one per load, for the report
        # Trace the model for a full and a smaller batch now: TensorFlow then generalises the batch
        # dimension, so records of any length do not retrace it (about 1 s each) during the job.
        for n in self.file.card.task_impl().trace_sizes:
            self.model.predict_on_batch(dummy_inputs(self.file.card, n))
        LOADED.put(key, self.model, self.load_id)

    def teardown(self, worker) -> None:
        self.model = None

    def predict(self, x: Any, batch_size: int) -> np.ndarray:
        return predict(self.model, x, batch_size)


def limit_tf_threads(n: int) -> None:
    """One TensorFlow thread pool per worker thread: two workers on two cores must not each take both."""
    with models.quiet_native_stderr():
        import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(int(n), 1))
        tf.config.threading.set_inter_op_parallelism_threads(max(int(n), 1))
    except RuntimeError:
        pass  # TensorFlow already ran in this process: its pools are fixed


predict = models.predict_in_batches  #: the name the scoring tasks and tests know it by


def register_model(client, plugin: ModelPlugin, attempts: int = 5) -> None:
    """Send the model to every worker of ``client`` (``register_plugin``), surviving workers lost meanwhile.

    The scheduler keeps the plugin from the first attempt on, so workers that join later (a lost worker's
    replacement) load it too; a worker lost while the plugin was being sent makes the broadcast fail
    (``CommClosedError``: "Stream is closed"), and the registration is repeated for the workers still there
    (cheap: a worker that loaded these bytes takes them from ``LOADED``). A model that fails to load is not
    retried: its ``ModelError`` is raised.

    Raises
    ------
    models.ModelError
        A worker refused the model.
    OSError
        Workers kept being lost ``attempts`` times in a row.
    """
    import logging

    for attempt in range(1, attempts + 1):
        try:
            client.register_plugin(plugin)
            return
        except OSError as exc:  # distributed's CommClosedError and StreamClosedError are OSErrors
            if attempt == attempts:
                raise
            logging.getLogger(__name__).warning(
                "a worker was lost while the model was being sent to the workers (%s: %s); sending it again",
                type(exc).__name__, exc)
