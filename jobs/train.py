"""The training and evaluation jobs: store + split -> trained ``.keras`` model + metrics.

``run_training`` wires the stages, one call each: ``store.open_dataset`` -> ``splits.make_split``
(the store's task says which split by default) -> ``run_folder.RunFolder.open`` (start, resume or
overwrite the run in ``out``) -> ``training.TrainingData`` (the loaders) ->
``training.fit`` (the selection run, checkpointed for ``--resume``) -> ``training.keep_model``
(the best epoch or its refit on train + val) -> ``training.evaluate`` on the test part. It runs in
this process or, with ``submit_training``, as one task on a Dask worker that declares a GPU
resource. ``run_evaluation`` scores a saved model again; its model card says what it takes.

Files written to ``out`` (see docs/usage.md, "Training a beat classifier"; their names are ``pipeline.run_folder``'s):
``model.keras``, ``checkpoint.keras``, ``train_state.json``, ``history.json``, ``history.csv``,
``split.json``, ``config.yaml``, ``run.json``, ``metrics.json``, ``classification_report.txt``,
``curves.png``, ``confusion_counts.png``, ``confusion_ratios.png``. Both model files carry the
model card (``ecg_pipeline.json``): ``model.keras`` is the best epoch so far (rewritten at each
improvement, and once more at the end), ``checkpoint.keras`` the last epoch with its optimizer
state, for ``--resume``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..pipeline.config import TrainConfig
from ..pipeline.errors import ConfigError, PipelineError
from ..pipeline.loader import LoaderOptions, ZarrSegmentLoader
from ..pipeline.model_card import ModelCard, check_store_inputs
from ..pipeline.model_runtime import ModelFile
from ..pipeline.models import MODEL_INPUTS, flops_per_segment, quiet_native_stderr
from ..pipeline.run_folder import RUN_FILE, RunFolder, TrainState
from ..pipeline.splits import Split, make_split
from ..pipeline.store import open_dataset
from ..pipeline.tasks import get_task
from ..pipeline.training import (Scorer, TrainingData, TrainResult, describe_device, evaluate, evaluation_split, fit,
                                 keep_model, precision)

__all__ = ["TrainRequest", "TrainResult", "format_result", "run_evaluation", "run_training", "submit_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """One training run.

    Attributes
    ----------
    store
        Store written by ``ecg-pipeline preprocess`` (path or fsspec URL).
    split
        ``inter-patient``, ``intra-patient`` or a split file.
    out
        Run folder (on a shared file system when the job runs on a Dask worker).
    resume
        Continue the run saved in ``out`` from its last finished epoch.
    overwrite
        Start afresh even if ``out`` holds a run.
    verbose
        Progress on stdout: 1 Keras' progress bar when stdout is a terminal (otherwise as 2),
        2 one plain line an epoch, 0 silent.
    """

    store: str
    split: str
    out: str
    config: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None
    verbose: int = 1


def _split(request: TrainRequest, ds) -> Split:
    """The request's split (the store's task's default when none is named), refused without train or val."""
    split = make_split(request.split or get_task(ds.attrs.get("task")).default_split, ds, seed=request.config.seed,
                       storage_options=request.storage_options)
    for part in ("train", "val"):
        if not len(split[part]):
            raise ConfigError(f"split {split.name} has no {part} segments in {request.store}")
    return split


def run_training(request: TrainRequest) -> TrainResult:
    """Train, checkpoint, keep the best epoch by validation macro F1 (or its refit), and evaluate it on the test part.

    Raises
    ------
    ConfigError
        The split has no training or validation segments, or ``out`` holds another run.
    StoreError, ModelError
        The store or a checkpoint cannot be used.
    """
    with quiet_native_stderr():  # TensorFlow's start-up notes, before TF_CPP_MIN_LOG_LEVEL is read
        import keras

    t_start = time.perf_counter()
    cfg = request.config
    ds = open_dataset(request.store, storage_options=request.storage_options)
    split = _split(request, ds)
    scorer = Scorer.of(ds)
    inputs = MODEL_INPUTS.get(cfg.model, ("spectrogram",))
    check_store_inputs(inputs, ds.attrs, list(ds.variables), f"model {cfg.model}", store=str(request.store))
    out, saved = RunFolder.open(request.out, split.to_dict(), cfg.to_dict(), resume=request.resume,
                                overwrite=request.overwrite, storage_options=request.storage_options)
    state = saved or TrainState(selection=scorer.selection)

    keras.utils.set_random_seed(cfg.seed)
    data = TrainingData(request.store, ds, split, cfg, inputs, request.storage_options, first_epoch=state.epoch)
    card = ModelCard.from_store(ds.attrs, split.to_dict(), cfg.to_dict(), data.train.sample_shape,
                                str(data.train.dtype), inputs)
    device = describe_device()
    with precision(cfg.mixed_precision) as policy:
        log.info("training %s on %s: %d train / %d val segments (%s), precision %s", cfg.model, device,
                 len(data.train), len(data.val), split.name, policy)
        trained = fit(data, out, card, scorer, state, resumed=saved is not None, verbose=request.verbose)
        model, model_path = keep_model(data, out, card, state, trained)

    test_part = "test" if len(split["test"]) else "val"
    metrics = evaluate(model, data.part(test_part), scorer, split, test_part, request.store, model_path, out,
                       f"{cfg.model}, {split.name} split, {test_part} part",
                       {"flops_per_segment": flops_per_segment(model)})
    result = TrainResult(
        out=out.root, model=model_path, epochs_run=state.epoch, best_epoch=state.best_epoch,
        selection=state.selection, best_val_score=state.best_val_score, stopped_early=bool(state.stopped_early),
        n_samples={p: int(len(split[p])) for p in ("train", "val", "test")}, train_s=state.train_s,
        wall_s=time.perf_counter() - t_start,
        train_samples_per_s=len(data.train) * state.epoch / state.train_s if state.train_s else 0.0,
        device=device, host=socket.gethostname(), pid=os.getpid(), test=metrics,
        flops_per_segment=metrics["flops_per_segment"], refit_epochs=int(state.refit_epochs),
        refit_s=float(state.refit_s), members=cfg.members if state.refit_epochs else 1)
    out.write_json(RUN_FILE, result.to_dict())
    return result


def run_evaluation(model_path: str, store: str, split_spec: str | None = None, *, part: str = "test",
                   out: str | None = None, seed: int | None = None, batch_size: int = 512,
                   storage_options: Mapping[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Recompute the metrics of a saved model on a part of a split; write them to ``out`` if given.

    Without ``split_spec`` the model's own split is used: the records of each part as its
    card lists them (record splits), else its split recreated by name with its seed.
    The intra-patient split is recreated from ``seed`` (default: the seed the model was trained with).
    """
    # refuse a foreign or metadata-less file before TensorFlow starts
    file = ModelFile.read(model_path, storage_options)  # read once
    card = file.card
    ds = open_dataset(store, storage_options=storage_options)
    card.check_store(ds.attrs, list(ds.variables), str(model_path), ds.encoding.get("source", "STORE"))
    model = file.load()
    if seed is None:
        seed = int((card.train_config or {}).get("seed", 0))
    split = evaluation_split(card, ds, split_spec, seed, storage_options)
    if not len(split[part]):
        raise ConfigError(f"split {split.name} has no {part} segments in {store}")
    loader = ZarrSegmentLoader(store, split[part], LoaderOptions(batch_size=batch_size, shuffle=False,
                                                                 inputs=card.inputs),
                               storage_options=storage_options)
    return evaluate(model, loader, Scorer.of(ds), split, part, store, str(model_path),
                    RunFolder(out, storage_options) if out else None,
                    f"{os.path.basename(str(model_path))}, {split.name} split, {part} part",
                    {"flops_per_segment": flops_per_segment(model)}, verbose=int(progress))


def submit_training(request: TrainRequest, client, resources: Mapping[str, float] | None = None) -> TrainResult:
    """Run ``run_training`` as one task on a worker of ``client`` that has ``resources`` (e.g. ``{"GPU": 1}``).

    Raises
    ------
    PipelineError
        No worker of the cluster declares the resources (the task would wait forever).
    """
    if resources:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        able = [w for w in workers if all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items())]
        if not able:
            have = sorted({f"{k}={v}" for w in workers for k, v in w.get("resources", {}).items()}) or ["none"]
            raise PipelineError(f"no worker of the cluster declares resources {dict(resources)} (declared: "
                                f"{', '.join(have)}); start one with `dask worker ... --resources GPU=1` "
                                "or pass --resources none")
    name = posixpath.basename(request.out.rstrip("/\\")) or "run"
    future = client.submit(run_training, request, resources=dict(resources) if resources else None, pure=False,
                           key=f"train-{name}-{time.time_ns()}")
    return future.result()


def format_result(result: TrainResult) -> str:
    """The end-of-run summary (``TrainResult.text``)."""
    return result.text()
