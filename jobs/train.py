"""The training and evaluation jobs: store + split -> trained ``.keras`` model + metrics.

``run_training`` composes the stages: ``store.open_dataset`` (labels, record
table) -> ``splits.make_split`` -> ``loader.ZarrSegmentLoader`` (train / val / test
streams) -> ``models.build_model`` -> Keras ``fit`` with the ``RunState``
callback (validation macro F1, early stopping, checkpoints for ``--resume``) ->
``evaluate`` on the test part. It runs in this process or, with
``submit_training``, as one task on a Dask worker that declares a GPU resource.

Files written to ``out`` (see README, "Training"):
``model.keras``, ``checkpoint.keras``, ``train_state.json``, ``history.json``,
``history.csv``, ``split.json``, ``config.yaml``, ``run.json``, ``metrics.json``,
``classification_report.txt``, ``curves.png``, ``confusion_counts.png``,
``confusion_ratios.png``. Both model files are written by ``models.save_model``
and so carry the pipeline metadata (``ecg_pipeline.json``): ``model.keras`` is
the best epoch so far (rewritten at each improvement, and once more at the end),
``checkpoint.keras`` the last epoch with its optimizer state, for ``--resume``.
There is no third copy (older versions left a metadata-less ``best.keras``; a
resumed run folds it into ``model.keras``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import yaml

from .. import pipeline
from ..pipeline.augment import TimeStretch, chain, premature_beats
from ..pipeline.config import TrainConfig
from ..pipeline.errors import ConfigError, PipelineError
from ..pipeline.evaluate import aggregate_by_record, classification_metrics, format_report, plot_history, write_evaluation
from ..pipeline.loader import LoaderOptions, ZarrSegmentLoader
from ..pipeline.models import (MODEL_INPUTS, ModelError, average_members, build_model, check_archive,
                               flops_per_segment, load_model, quiet_native_stderr, recalibrate_batch_norm, save_model)
from ..pipeline.spectrogram import SpectrogramSpec
from ..pipeline.splits import DEFAULT_SPLITS, Split, by_records, make_split
from ..pipeline.store import open_dataset, rebuild_hint

log = logging.getLogger(__name__)

MODEL_FILE, CHECKPOINT_FILE, BEST_FILE, STATE_FILE = "model.keras", "checkpoint.keras", "best.keras", "train_state.json"


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


@dataclass
class TrainResult:
    out: str
    model: str
    epochs_run: int
    best_epoch: int
    selection: str  #: the validation metric that picked the best epoch (val_macro_f1, val_challenge_f1)
    best_val_score: float
    stopped_early: bool
    n_samples: dict[str, int]
    train_s: float
    wall_s: float
    train_samples_per_s: float
    device: str
    host: str
    pid: int
    test: dict[str, Any]
    flops_per_segment: int = 0  #: the model's cost (``models.flops_per_segment``)
    refit_epochs: int = 0  #: epochs of the refit on train + val (0: no refit, the best epoch was kept)
    refit_s: float = 0.0  #: seconds the refit took (not in ``train_s``)
    members: int = 1  #: refit models the kept model averages (``TrainConfig.members``; 1 without a refit)


def _metadata(ds, split: Split, config: TrainConfig, input_shape, dtype, inputs: tuple[str, ...]) -> dict[str, Any]:
    a = ds.attrs
    spec = SpectrogramSpec.from_attrs(a["spectrogram"])
    top = float(spec.freqs()[-1])
    return {
        "package": "ecg-pipeline",
        "package_version": pipeline.__version__,
        "task": a["task"],
        "anchor_kind": a["anchor_kind"],
        "classes": list(a["classes"]),
        "challenge_classes": list(a.get("challenge_classes", [])),
        "input": {"shape": list(input_shape), "dtype": str(dtype), "variable": "spectrogram",
                  "variables": list(inputs), **({"rr": a["rr"]} if "rr" in inputs else {}),
                  **({"template": a["template"]} if "template" in inputs else {})},
        # What the network has seen: records at the store's rate (others are resampled to it), the rows up to
        # `top` Hz. A record sampled too low for them has empty rows there: `score` refuses or flags it.
        "accepted": {"min_fs_hz": spec.min_fs_hz, "band_hz": [0.0, top]},
        "store": {
            "database": a.get("database"), "database_version": a.get("database_version"),
            "config_fingerprint": a.get("config_fingerprint"), "spectrogram": a.get("spectrogram"),
            "preprocess_config": a.get("config"), "label_map": a.get("label_map"),
            "label_source": a.get("label_source"), "schema_version": a.get("schema_version"),
        },
        "split": split.to_dict(),
        "train_config": config.to_dict(),
    }


def _augmentation(cfg: TrainConfig, ds, inputs: tuple[str, ...]):
    """The training loader's augmentation: premature beats for a model that takes RR features, then the time
    stretch of the spectrograms where the configuration asks for it (None: neither)."""
    premature = (premature_beats(cfg.premature_beats, list(ds.attrs["classes"]),
                                 [str(f) for f in ds["rr_feature"].values]) if "rr" in inputs else None)
    return chain(premature, TimeStretch(cfg.time_stretch) if cfg.time_stretch else None)


def _rr_stats(ds, train: np.ndarray) -> dict[str, Any]:
    """Mean and variance of each RR feature over the training part: the model standardises with them."""
    values = np.asarray(ds["rr"].values)[np.asarray(train, dtype=np.int64)].astype(np.float64)
    return {"n": int(values.shape[1]), "features": [str(f) for f in ds["rr_feature"].values],
            "mean": values.mean(axis=0).tolist(), "variance": values.var(axis=0).tolist()}


def check_compatible(metadata: Mapping[str, Any], ds, model_path: str | Path) -> None:
    """Refuse to apply a model to a store whose spectrograms were made differently."""
    if not metadata:
        raise _no_metadata_error(model_path)
    want, have = metadata["store"]["spectrogram"], ds.attrs.get("spectrogram")
    if want != have:
        diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
        raise ModelError(f"{model_path} was trained on spectrograms made with other parameters than this store's "
                         f"(differ in: {', '.join(diff)}); re-run preprocess with the model's settings")
    if metadata.get("task", "beat") != ds.attrs.get("task"):
        raise ModelError(f"{model_path} is a {metadata.get('task', 'beat')} model; the store holds "
                         f"{ds.attrs.get('task')} segments")
    if list(metadata["classes"]) != list(ds.attrs["classes"]):
        raise ModelError(f"{model_path} predicts classes {metadata['classes']}, the store has {ds.attrs['classes']}")
    check_inputs(model_inputs(metadata), ds.attrs, ds.variables, str(model_path), metadata.get("input", {}).get("rr"),
                 ds.encoding.get("source", "STORE"), metadata.get("input", {}).get("template"))


def model_inputs(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """The store variables a saved model takes (spectrogram-only models of older versions: just that)."""
    return tuple((metadata.get("input") or {}).get("variables") or ("spectrogram",))


def check_inputs(inputs: tuple[str, ...], attrs: Mapping[str, Any], variables, what: str,
                 rr_attrs: Mapping[str, Any] | None = None, store: str = "STORE",
                 template_attrs: Mapping[str, Any] | None = None) -> None:
    """Refuse a store that lacks a variable the model takes, or whose RR features or templates were computed
    otherwise."""
    where = attrs.get("database", "the store")
    for name in inputs:
        if name not in variables:
            raise ModelError(f"{what} takes the store variable {name!r}, which this store (schema "
                             f"v{attrs.get('schema_version')}, {attrs.get('task')} segments) lacks; "
                             + (rebuild_hint(attrs, store) if attrs.get("task") == "beat" else
                                "choose a model of this task"))
    if "rr" in inputs and rr_attrs is not None and dict(attrs.get("rr") or {}) != dict(rr_attrs):
        raise ModelError(f"{what} was trained on RR features computed with other parameters than {where}'s "
                         f"(model {dict(rr_attrs)}, store {attrs.get('rr')}); re-run preprocess with the model's")
    if "template" in inputs and template_attrs is not None and dict(attrs.get("template") or {}) != dict(template_attrs):
        raise ModelError(f"{what} was trained on templates made with other parameters than {where}'s (model "
                         f"{dict(template_attrs)}, store {attrs.get('template')}); re-run preprocess with the model's")


def _no_metadata_error(model_path: str | Path) -> ModelError:
    return ModelError(f"{model_path} carries no ecg-pipeline metadata (ecg_pipeline.json): it was not saved by "
                      "`ecg-pipeline train` (use a run folder's model.keras), so the spectrogram parameters it "
                      "expects are unknown; refused")


def _train_metadata(metadata: Mapping[str, Any], state: Mapping[str, Any], weights_epoch: int,
                    complete: bool) -> dict[str, Any]:
    """``metadata`` with the ``train`` section of a model file saved now (weights of ``weights_epoch``)."""
    train = {k: state[k] for k in ("epoch", "best_epoch", "best_val_score", "stopped_early")}
    train["selection"] = state.get("selection", "val_macro_f1")
    train.update(weights_epoch=int(weights_epoch), complete=bool(complete))
    return {**metadata, "train": train}


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _fit_verbose(verbose: int) -> int:
    """The request's ``verbose`` as it applies here: Keras' bar (1) only on a terminal, else one line an epoch (2).

    Keras 3 draws its bar with carriage returns and ANSI colours whenever ``posix`` is imported, terminal or not,
    so a log file or pipe would fill with per-step escape codes.
    """
    return 2 if verbose == 1 and not _stdout_is_tty() else verbose


def format_epoch_line(epoch: int, epochs: int, logs: Mapping[str, Any], seconds: float, best: bool) -> str:
    """One plain line for an epoch (1-based ``epoch``): losses, accuracies, validation macro F1, lr, seconds."""
    parts = [f"epoch {epoch}/{epochs}"]
    selection = "val_challenge_f1" if logs.get("val_challenge_f1") is not None else "val_macro_f1"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "val_challenge_f1"):
        if logs.get(key) is not None:
            parts.append(f"{key} {float(logs[key]):.4f}" + (" (best)" if key == selection and best else ""))
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {float(logs['learning_rate']):.2e}")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU ({', '.join(g.name for g in gpus)})" if gpus else f"CPU ({os.cpu_count()} cores)"


@contextlib.contextmanager
def _precision(mode: str) -> Iterator[str]:
    """Keras' dtype policy for the models built inside: mixed_float16 on a GPU (``auto``) or when ``on``.

    The policy is Keras-global, so it is put back to float32 on the way out, error or not.
    """
    import keras
    import tensorflow as tf

    use = mode == "on" or (mode == "auto" and bool(tf.config.list_physical_devices("GPU")))
    policy = "mixed_float16" if use else "float32"
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


@dataclass
class Scorer:
    """Turns a part's per-segment probabilities into its metrics, as the store's task asks.

    Beat stores are scored per beat. Rhythm stores are scored per recording: the mean of
    its windows' probabilities (``evaluate.aggregate_by_record``), and, where the store
    names challenge classes, selected on the challenge F1.
    """

    task: str
    classes: tuple[str, ...]
    challenge_classes: tuple[str, ...]
    aggregation: str
    segment_record: np.ndarray  #: record name of every segment of the store

    @classmethod
    def of(cls, ds) -> "Scorer":
        a = ds.attrs
        task = a.get("task", "beat")
        records = np.asarray(ds["record"].values).astype(str) if task == "rhythm" else np.zeros(0, str)
        return cls(task, tuple(a["classes"]), tuple(a.get("challenge_classes", ())),
                   (a.get("label_source") or {}).get("aggregation", "mean of the window probabilities per record"),
                   records)

    @property
    def selection(self) -> str:
        """The validation metric that picks the best epoch."""
        return "val_challenge_f1" if self.challenge_classes else "val_macro_f1"

    def __call__(self, loader: ZarrSegmentLoader, prob: np.ndarray) -> tuple[dict[str, Any], np.ndarray,
                                                                            np.ndarray, np.ndarray]:
        """``(metrics, names, probabilities, reference)`` per scored unit (beat or recording)."""
        y = loader.labels
        names = np.asarray(loader.indices).astype(str)
        if self.task == "rhythm":
            names, prob, y = aggregate_by_record(prob, y, self.segment_record[loader.indices])
        m = classification_metrics(y, prob.argmax(axis=1), self.classes, self.challenge_classes)
        if self.task == "rhythm":
            m.update(unit="record", aggregation=self.aggregation, n_windows=int(len(loader)))
        return m, names, prob, y


def _evaluate(model, loader: ZarrSegmentLoader, scorer: Scorer, split: Split, part: str, store: str,
              model_path: str | Path, out: str | Path | None, title: str,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``loader`` (a part of ``split``), with ``extra``; written to ``out`` when given."""
    prob, _ = predict_classes(model, loader)
    metrics, names, prob, y = scorer(loader, prob)
    metrics.update(split=split.name, part=part, store=store, model=str(model_path), **dict(extra or {}))
    if out:
        write_evaluation(out, metrics, title=title)
        if scorer.task == "rhythm":
            _write_predictions(Path(out) / "predictions.csv", names, y, prob, scorer.classes)
    return metrics


def _write_predictions(path: Path, names: np.ndarray, y: np.ndarray, prob: np.ndarray,
                       classes: tuple[str, ...]) -> None:
    """Per-record reference, prediction and probabilities of an evaluated part."""
    rows = ["record,reference,predicted," + ",".join(f"p_{c}" for c in classes)]
    pred = prob.argmax(axis=1)
    for r, t, p, pr in zip(names, y, pred, prob):
        rows.append(f"{r},{classes[t]},{classes[p]}," + ",".join(f"{v:.4f}" for v in pr))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def predict_classes(model, loader: ZarrSegmentLoader) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and predicted class of every segment of ``loader``, in segment order."""
    if not len(loader):
        return np.zeros((0, len(loader.classes)), np.float32), np.zeros(0, np.int64)
    prob = model.predict(loader.dataset().map(lambda x, *rest: x), verbose=0)
    return prob, prob.argmax(axis=1)


def _make_callback():
    import keras

    class RunState(keras.callbacks.Callback):
        """Validation macro F1 each epoch, early stopping on it, and checkpoints for ``--resume``.

        Keras' own ``EarlyStopping`` forgets its best score when training resumes; this
        keeps it in ``train_state.json`` next to the last checkpoint.
        """

        def __init__(self, out: Path, val: ZarrSegmentLoader, scorer: Scorer, patience: int, state: dict[str, Any],
                     metadata: Mapping[str, Any], calibration=None):
            super().__init__()
            self.out, self.val, self.scorer, self.patience = out, val, scorer, patience
            self.calibration = calibration  #: () -> training batches for recalibrate_batch_norm, or None
            self.state, self.metadata = state, metadata
            self._t0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            self._lr = float(np.asarray(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            if self.calibration is not None:
                recalibrate_batch_norm(self.model, self.calibration())
            train_s = time.perf_counter() - self._t0
            prob, _ = predict_classes(self.model, self.val)
            y = self.val.labels
            p = np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0)
            m = self.scorer(self.val, prob)[0]
            logs.update(val_loss=float(-np.log(p).mean()), val_accuracy=m["accuracy"], val_macro_f1=m["macro_f1"],
                        epoch_learning_rate=self._lr)  # the refit repeats the schedule
            if "challenge_f1" in m:
                logs["val_challenge_f1"] = m["challenge_f1"]
            for c, pc in m["per_class"].items():
                if pc["support"]:
                    logs[f"val_f1_{c}"] = pc["f1"]
            score = float(logs[self.scorer.selection])
            st = self.state
            st["epoch"] = epoch + 1
            st["train_s"] = st.get("train_s", 0.0) + train_s
            for k, v in logs.items():
                st["history"].setdefault(k, []).append(float(v))
            if score > st["best_val_score"]:
                st.update(best_val_score=score, best_epoch=epoch + 1, wait=0)
                # The best epoch so far, self-describing like the final model.keras (save_model: temp + rename).
                save_model(self.model, self.out / MODEL_FILE, _train_metadata(self.metadata, st, epoch + 1, False))
            else:
                st["wait"] += 1
                if st["wait"] >= self.patience:
                    st["stopped_early"] = True
                    self.model.stop_training = True
            # Checkpoint first, state last: a crash in between resumes from the previous epoch.
            save_model(self.model, self.out / CHECKPOINT_FILE, _train_metadata(self.metadata, st, epoch + 1, False))
            _write_json(self.out / STATE_FILE, st)
            log.info("epoch %d: %s %.4f (best %.4f at epoch %d), %.1f s", epoch + 1, self.scorer.selection, score,
                     st["best_val_score"], st["best_epoch"], train_s)

    class EpochLine(keras.callbacks.Callback):
        """One plain line an epoch on stdout (no carriage returns, no ANSI codes), for logs, pipes and Dask workers.

        Placed after ``RunState`` and ``ReduceLROnPlateau``, so that the epoch logs hold the validation
        metrics and the learning rate of the epoch.
        """

        def __init__(self, state: Mapping[str, Any]):
            super().__init__()
            self.state = state
            self._t0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            if logs.get("learning_rate") is None:
                with contextlib.suppress(Exception):
                    logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            line = format_epoch_line(epoch + 1, int(self.params.get("epochs") or 0), logs,
                                     time.perf_counter() - self._t0, self.state.get("best_epoch") == epoch + 1)
            print(line, file=sys.stdout, flush=True)

    return RunState, EpochLine


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _write_history(out: Path, history: Mapping[str, list[float]]) -> None:
    _write_json(out / "history.json", history)
    keys = list(history)
    n = max((len(v) for v in history.values()), default=0)
    rows = ["epoch," + ",".join(keys)]
    for i in range(n):
        rows.append(f"{i + 1}," + ",".join(f"{history[k][i]:.6g}" if i < len(history[k]) else "" for k in keys))
    (out / "history.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if n:
        plot_history(history, out / "curves.png")


def run_training(request: TrainRequest) -> TrainResult:
    """Train, checkpoint, keep the best epoch by validation macro F1, and evaluate it on the test part.

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
    out = Path(request.out)
    ds = open_dataset(request.store, storage_options=request.storage_options)
    split = make_split(request.split or DEFAULT_SPLITS.get(ds.attrs.get("task", "beat"), "inter-patient"), ds,
                       seed=cfg.seed)
    scorer = Scorer.of(ds)
    for part in ("train", "val"):
        if not len(split[part]):
            raise ConfigError(f"split {split.name} has no {part} segments in {request.store}")
    state_path = out / STATE_FILE
    if state_path.exists() and not (request.resume or request.overwrite):
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(cfg.seed)
    state: dict[str, Any] = {"epoch": 0, "best_val_score": -1.0, "selection": scorer.selection, "best_epoch": 0,
                             "wait": 0,
                             "stopped_early": False, "history": {}, "train_s": 0.0}
    resumed = request.resume and state_path.exists() and (out / CHECKPOINT_FILE).exists()
    if not resumed and state_path.exists():
        # --overwrite (or --resume without a checkpoint): no model file of the old run may outlive it
        for name in (STATE_FILE, CHECKPOINT_FILE, MODEL_FILE, BEST_FILE):
            (out / name).unlink(missing_ok=True)
    if resumed:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        state.setdefault("best_val_score", state.pop("best_val_macro_f1", -1.0))  # run folders of older versions
        state.setdefault("selection", "val_macro_f1")
        saved_split = json.loads((out / "split.json").read_text(encoding="utf-8"))
        if saved_split.get("n_segments") != split.to_dict()["n_segments"]:
            raise ConfigError(f"{out}: --resume with a different split or store than the saved run")
    _write_json(out / "split.json", split.to_dict())
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

    inputs = MODEL_INPUTS.get(cfg.model, ("spectrogram",))
    check_inputs(inputs, ds.attrs, ds.variables, f"model {cfg.model}", store=str(request.store))

    def loader(part: str, train: bool) -> ZarrSegmentLoader:
        opts = LoaderOptions(batch_size=cfg.batch_size, shuffle=train, shuffle_chunks=cfg.shuffle_chunks, inputs=inputs,
                             parallel_reads=cfg.parallel_reads,
                             # a resumed run continues the per-epoch sequence instead of repeating epoch 1's order
                             seed=cfg.seed + 1000 * state["epoch"] if train else cfg.seed,
                             class_weighting=cfg.class_weighting if train else "none",
                             balanced_sampling=cfg.balanced_sampling and train,
                             augment=_augmentation(cfg, ds, inputs) if train else None)
        return ZarrSegmentLoader(request.store, split[part], opts, storage_options=request.storage_options)

    train_l, val_l = loader("train", True), loader("val", False)
    test_part = "test" if len(split["test"]) else "val"
    metadata = _metadata(ds, split, cfg, train_l.sample_shape, train_l.dtype, inputs)

    device = _device()
    with _precision(cfg.mixed_precision) as policy:
        if resumed:
            model, _ = load_model(out / CHECKPOINT_FILE, compile=True)
            log.info("resuming %s after epoch %d", out, state["epoch"])
            if (out / BEST_FILE).exists():
                # A run folder of an older version: its best epoch was kept, without metadata, in best.keras.
                legacy, _ = load_model(out / BEST_FILE)
                save_model(legacy, out / MODEL_FILE, _train_metadata(metadata, state, state["best_epoch"], False))
                (out / BEST_FILE).unlink()
        else:
            model = build_model(cfg.model, train_l.sample_shape, len(train_l.classes),
                                input_dtype=str(train_l.dtype), options=cfg.model_options,
                                rr_stats=_rr_stats(ds, split["train"]) if "rr" in inputs else None)
            model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                          loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        run_state, epoch_line = _make_callback()
        # After RunState, so that it sees the validation score RunState adds to the epoch logs.
        plateau = keras.callbacks.ReduceLROnPlateau(monitor=scorer.selection, mode="max", factor=cfg.lr_factor,
                                                    patience=cfg.lr_patience, min_lr=cfg.learning_rate / 64)
        n_cal = cfg.bn_recalibration_batches

        def calibration():
            return (batch[0] for batch in train_l.dataset().take(n_cal))

        callbacks = [run_state(out, val_l, scorer, cfg.patience, state, metadata, calibration if n_cal else None),
                     plateau]
        verbose = _fit_verbose(request.verbose)
        if verbose == 2:  # our own line instead of Keras' two (which also list every per-class F1)
            callbacks.append(epoch_line(state))
        log.info("training %s on %s: %d train / %d val segments (%s), precision %s", cfg.model, device,
                 len(train_l), len(val_l), split.name, policy)
        more = state["epoch"] < cfg.epochs and not state.get("stopped_early")
        if more:
            model.fit(train_l.dataset(), epochs=cfg.epochs, initial_epoch=state["epoch"], callbacks=callbacks,
                      verbose=1 if verbose == 1 else 0, shuffle=False)  # the loader shuffles
        _write_history(out, state["history"])
        best, saved = load_model(out / MODEL_FILE)
        refitted = saved.get("train", {}).get("refit")
        metadata = _train_metadata(metadata, state, state["best_epoch"], True)
        if refitted and (not cfg.refit or (not more and refitted["epochs"] == _refit_length(cfg, state)
                                            and refitted.get("members", 1) == cfg.members)):
            # a resumed run whose model.keras is already the refit of this best epoch (the refit is deterministic)
            metadata["train"]["refit"] = refitted
            model_path = save_model(best, out / MODEL_FILE, metadata)
        else:
            # model.keras holds the best epoch; saved once more without the optimizer state, with the final metadata.
            model_path = save_model(best, out / MODEL_FILE, metadata)
            state["refit_epochs"] = state["refit_s"] = 0
            if cfg.refit:
                best, model_path = _refit(request, ds, split, inputs, state, metadata, train_l.sample_shape,
                                          str(train_l.dtype), len(train_l.classes))

    test_l = loader(test_part, False) if test_part != "val" else val_l
    metrics = _evaluate(best, test_l, scorer, split, test_part, request.store, model_path, out,
                        f"{cfg.model}, {split.name} split, {test_part} part",
                        {"flops_per_segment": flops_per_segment(best)})

    n_trained = len(train_l) * state["epoch"]
    result = TrainResult(
        out=str(out), model=str(model_path), epochs_run=state["epoch"], best_epoch=state["best_epoch"],
        selection=state["selection"], best_val_score=state["best_val_score"], stopped_early=bool(state.get("stopped_early")),
        n_samples={p: int(len(split[p])) for p in ("train", "val", "test")}, train_s=state["train_s"],
        wall_s=time.perf_counter() - t_start,
        train_samples_per_s=n_trained / state["train_s"] if state["train_s"] else 0.0,
        device=device, host=socket.gethostname(), pid=os.getpid(), test=metrics,
        flops_per_segment=metrics["flops_per_segment"], refit_epochs=int(state.get("refit_epochs", 0)),
        refit_s=float(state.get("refit_s", 0.0)), members=cfg.members if state.get("refit_epochs") else 1)
    _write_json(out / "run.json", asdict(result))
    return result


#: Seed distance between refit members (``TrainConfig.members``): a prime, so member seeds of nearby runs
#: (``--seed 0``, ``--seed 1``...) do not coincide.
MEMBER_SEED_STEP = 7919
#: Training batches over which the refit's averaged weights get their batch-norm statistics (when the
#: configuration asks for no precise BN of its own).
SWA_BN_BATCHES = 100


def _weight_average(first: int):
    """A Keras callback (made here: Keras is imported late, as in ``_make_callback``) that averages the weights
    after each epoch from ``first`` (0-based) on: stochastic weight averaging (Izmailov et al. 2018); ``apply``
    puts the average into the model. Measured on DS1 -> DS2 (beat-rr-cnn, 8 epochs, 3 seeds): the V F1 of single
    epochs swung 0.71-0.86 within one run; the average of epochs 3-8 landed at 0.79-0.84, S F1 0.48-0.54."""
    import keras

    class WeightAverage(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.first, self.n, self.sums = max(0, first), 0, None

        def on_epoch_end(self, epoch, logs=None):
            if epoch < self.first:
                return
            values = [np.asarray(v.numpy(), dtype=np.float64) for v in self.model.weights]
            self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]
            self.n += 1

        def apply(self, model) -> None:
            if self.n:
                for v, total in zip(model.weights, self.sums):
                    v.assign((total / self.n).astype(v.dtype))

    return WeightAverage()


def _refit_length(cfg: TrainConfig, state: Mapping[str, Any]) -> int:
    """Epochs of the refit: ``refit_epochs``, or the best epoch's count where that is more (or ``refit_epochs`` is 0).

    At least ``refit_epochs``: the best epoch of a few validation patients is noisy, and a short refit never
    reaches the lower learning rates. No fewer than the best epoch: where validation kept improving that long
    (the intra-patient split: epoch 22), a refit cut at 10 epochs stops before the rates dropped (macro F1
    0.935 against 0.948 with 22).
    """
    return int(max(cfg.refit_epochs, state["best_epoch"]))


def _refit(request: TrainRequest, ds, split: Split, inputs: tuple[str, ...], state: dict[str, Any],
           metadata: dict[str, Any], sample_shape, dtype: str, n_classes: int):
    """A fresh model trained on train + val for ``_refit_length`` epochs, at the learning rates the selection
    run used in them (its last one past its end), with the weights of its last half of epochs averaged
    (``_weight_average``); saved as ``model.keras`` (replacing the best epoch), with ``train.refit``.

    A run killed during the refit repeats it on ``--resume`` (nothing of it is checkpointed: it is as long as
    the selection run up to its best epoch).
    """
    import keras

    cfg, out = request.config, Path(request.out)
    epochs = _refit_length(cfg, state)
    rates = list(state["history"].get("epoch_learning_rate", []))[:epochs]
    rates += [rates[-1] if rates else cfg.learning_rate] * (epochs - len(rates))  # runs of older versions
    both = np.union1d(split["train"], split["val"])
    rr_stats = _rr_stats(ds, both) if "rr" in inputs else None
    t0 = time.perf_counter()
    members = []
    for k in range(cfg.members):
        seed = cfg.seed + MEMBER_SEED_STEP * k  # member 0 is the single model's refit, seeds and all
        opts = LoaderOptions(batch_size=cfg.batch_size, shuffle=True, shuffle_chunks=cfg.shuffle_chunks,
                             inputs=inputs, parallel_reads=cfg.parallel_reads, seed=seed + 500,
                             class_weighting=cfg.class_weighting, balanced_sampling=cfg.balanced_sampling,
                             augment=_augmentation(cfg, ds, inputs))
        data = ZarrSegmentLoader(request.store, both, opts, storage_options=request.storage_options)
        keras.utils.set_random_seed(seed)
        model = build_model(cfg.model, sample_shape, n_classes, input_dtype=dtype, options=cfg.model_options,
                            rr_stats=rr_stats)
        model.compile(optimizer=keras.optimizers.Adam(rates[0]), loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"])
        log.info("refit%s: %s on train + val (%d segments) for %d epochs",
                 f" member {k + 1}/{cfg.members}" if cfg.members > 1 else "", cfg.model, len(data), epochs)
        schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: rates[min(epoch, epochs - 1)])
        average = _weight_average(first=epochs - (epochs + 1) // 2)
        model.fit(data.dataset(), epochs=epochs, callbacks=[schedule, average], verbose=0, shuffle=False)
        average.apply(model)
        # The averaged weights never ran with the moving batch-norm statistics: recompute them on training batches.
        recalibrate_batch_norm(model, (batch[0] for batch in data.dataset().take(cfg.bn_recalibration_batches
                                                                                   or SWA_BN_BATCHES)))
        members.append(model)
    model = average_members(members)
    state["refit_s"] = time.perf_counter() - t0
    state["refit_epochs"] = epochs
    refit_meta = {**metadata, "train": {**metadata["train"], "refit": {
        "epochs": epochs, "parts": ["train", "val"], "n_segments": int(len(data)),
        "averaged_epochs": list(range(average.first + 1, epochs + 1)),
        "learning_rates": [float(r) for r in rates], "members": cfg.members}}}
    path = save_model(model, out / MODEL_FILE, refit_meta)
    _write_json(out / STATE_FILE, state)
    return model, path


def run_evaluation(model_path: str, store: str, split_spec: str | None = None, *, part: str = "test",
                   out: str | None = None, seed: int | None = None, batch_size: int = 512,
                   storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Recompute the metrics of a saved model on a part of a split; write them to ``out`` if given.

    Without ``split_spec`` the model's own split is used: the records of each part as its
    metadata lists them (record splits), else its split recreated by name with its seed.
    The intra-patient split is recreated from ``seed`` (default: the seed the model was trained with).
    """
    metadata = check_archive(model_path)  # refuse a foreign or metadata-less file before TensorFlow starts
    if not metadata:
        raise _no_metadata_error(model_path)
    ds = open_dataset(store, storage_options=storage_options)
    check_compatible(metadata, ds, model_path)
    model, metadata = load_model(model_path)
    if seed is None:
        seed = int(metadata.get("train_config", {}).get("seed", 0))
    saved = metadata.get("split") or {}
    if split_spec is None and any(saved.get("records", {}).values()):
        split = by_records(saved["name"], saved["records"], [str(r) for r in ds["record_id"].values],
                           np.asarray(ds["record_offset"].values), np.asarray(ds["record_n_segments"].values),
                           {"from": "the model's metadata"})
    else:
        task_default = DEFAULT_SPLITS.get(ds.attrs.get("task", "beat"), "inter-patient")
        split = make_split(split_spec or saved.get("name") or task_default, ds, seed=seed)
    if not len(split[part]):
        raise ConfigError(f"split {split.name} has no {part} segments in {store}")
    loader = ZarrSegmentLoader(store, split[part], LoaderOptions(batch_size=batch_size, shuffle=False,
                                                                 inputs=model_inputs(metadata)),
                               storage_options=storage_options)
    return _evaluate(model, loader, Scorer.of(ds), split, part, store, model_path, out,
                     f"{Path(model_path).name}, {split.name} split, {part} part",
                     {"flops_per_segment": flops_per_segment(model)})


def submit_training(request: TrainRequest, client, resources: Mapping[str, float] | None = None) -> TrainResult:
    """Run ``run_training`` as one task on a worker of ``client`` that has ``resources`` (e.g. ``{"GPU": 1}``).

    Raises
    ------
    PipelineError
        No worker of the cluster declares the resources (the task would wait forever).
    """
    if resources:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        fit = [w for w in workers if all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items())]
        if not fit:
            have = sorted({f"{k}={v}" for w in workers for k, v in w.get("resources", {}).items()}) or ["none"]
            raise PipelineError(f"no worker of the cluster declares resources {dict(resources)} (declared: "
                                f"{', '.join(have)}); start one with `dask worker ... --resources GPU=1` "
                                "or pass --resources none")
    future = client.submit(run_training, request, resources=dict(resources) if resources else None, pure=False,
                           key=f"train-{Path(request.out).name}-{time.time_ns()}")
    return future.result()


def format_result(result: TrainResult) -> str:
    """The end-of-run summary."""
    t = result.test
    lines = [
        "",
        f"run        {result.out}",
        f"model      {result.model}",
        f"device     {result.device}",
        f"epochs     {result.epochs_run} run, best {result.best_epoch} ({result.selection} {result.best_val_score:.4f})"
        + (", stopped early" if result.stopped_early else "")
        + (f"; refit on train + val for {result.refit_epochs} epochs"
           + (f", {result.members} members averaged" if result.members > 1 else "") + " (the model kept)"
           if result.refit_epochs else ""),
        f"segments   train {result.n_samples['train']:,}  val {result.n_samples['val']:,}  test {result.n_samples['test']:,}",
        f"time       {result.train_s / 60:.1f} min training ({result.train_samples_per_s:,.0f} samples/s), "
        + (f"{result.refit_s / 60:.1f} min refit, " if result.refit_epochs else "") +
        f"{result.wall_s / 60:.1f} min in all",
        f"cost       {result.flops_per_segment / 1e6:.2f} MFLOP per segment (conv and dense layers)",
        "",
        format_report(t, f"{t['split']} split, {t['part']} part"),
    ]
    return "\n".join(lines)
