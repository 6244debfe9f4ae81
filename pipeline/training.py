"""Stage 8c: fitting, refitting and evaluating a model on a store's split, into a run folder.

The stages of ``ecg-pipeline train`` after the split is made, each one call from ``jobs.train``:

* ``TrainingData``: the train and validation loaders of a split (augmentation, RR statistics);
* ``fit``: Keras ``fit`` with the ``RunState`` callback (validation score each epoch, early stopping,
  the best epoch into ``model.keras`` and a checkpoint after every epoch, for ``--resume``);
* ``keep_model``: the model kept, the best epoch or its ``refit`` on train + val (weights averaged over
  its last epochs, ``members`` models averaged);
* ``evaluate``: the metrics of a model on a part, scored per unit of the store's task (``Scorer``), and
  their files (``write_evaluation``);
* ``TrainResult``: what a run reports (``text()``: the end-of-run summary).

Keras and TensorFlow are imported inside the functions that need them: importing this module
starts neither.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .augment import TimeStretch, chain, premature_beats
from .config import TrainConfig
from .evaluate import classification_metrics, format_report
from .loader import LoaderOptions, ZarrSegmentLoader
from .model_card import ModelCard
from .models import average_members, build_model, recalibrate_batch_norm
from .run_folder import (CHECKPOINT_FILE, CONFUSION_COUNTS_FILE, CONFUSION_RATIOS_FILE, CURVES_FILE,
                         HISTORY_CSV_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, REPORT_FILE,
                         RunFolder, TrainState)
from .splits import Split, by_records, make_split
from .tasks import Task, get_task

__all__ = ["Scorer", "TrainResult", "TrainingData", "describe_device", "evaluate", "evaluation_split", "fit",
           "fit_verbose", "format_epoch_line", "keep_model", "precision", "predict_classes", "refit", "refit_length",
           "write_evaluation", "write_history"]

log = logging.getLogger(__name__)

#: Seed distance between refit members (``TrainConfig.members``): a prime, so member seeds of nearby runs
#: (``--seed 0``, ``--seed 1``...) do not coincide.
MEMBER_SEED_STEP = 7919
#: Training batches over which the refit's averaged weights get their batch-norm statistics (when the
#: configuration asks for no precise BN of its own).
SWA_BN_BATCHES = 100


# -- what a run reports ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a training run did and how its kept model scored on the test part (``run.json``)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The end-of-run summary: where, how long, which epoch, and the test part's report."""
        t = self.test
        refit = (f"; refit on train + val for {self.refit_epochs} epochs"
                 + (f", {self.members} members averaged" if self.members > 1 else "") + " (the model kept)"
                 if self.refit_epochs else "")
        lines = [
            "",
            f"run        {self.out}",
            f"model      {self.model}",
            f"device     {self.device}",
            f"epochs     {self.epochs_run} run, best {self.best_epoch} ({self.selection} {self.best_val_score:.4f})"
            + (", stopped early" if self.stopped_early else "") + refit,
            f"segments   train {self.n_samples['train']:,}  val {self.n_samples['val']:,}  "
            f"test {self.n_samples['test']:,}",
            f"time       {self.train_s / 60:.1f} min training ({self.train_samples_per_s:,.0f} samples/s), "
            + (f"{self.refit_s / 60:.1f} min refit, " if self.refit_epochs else "")
            + f"{self.wall_s / 60:.1f} min in all",
            f"cost       {self.flops_per_segment / 1e6:.2f} MFLOP per segment (conv and dense layers)",
            "",
            format_report(t, f"{t['split']} split, {t['part']} part"),
        ]
        return "\n".join(lines)


# -- where and how it runs ---------------------------------------------------------------------------------------

def describe_device() -> str:
    """The devices TensorFlow trains on, in words."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU ({', '.join(g.name for g in gpus)})" if gpus else f"CPU ({os.cpu_count()} cores)"


@contextlib.contextmanager
def precision(mode: str) -> Iterator[str]:
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


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def fit_verbose(verbose: int) -> int:
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


# -- scoring -----------------------------------------------------------------------------------------------------

@dataclass
class Scorer:
    """Turns a part's per-segment probabilities into its metrics, in the units of the store's task.

    Beat stores are scored per beat. Rhythm stores are scored per recording (the task's
    ``evaluation_units``: the mean of its windows' probabilities), and, where the store
    names challenge classes, selected on the challenge F1.
    """

    task: Task
    classes: tuple[str, ...]
    challenge_classes: tuple[str, ...]
    aggregation: str  #: how the store says units are formed from segments ("": the task's own words)
    segment_record: np.ndarray  #: record name of every segment of the store

    @classmethod
    def of(cls, ds) -> "Scorer":
        a = ds.attrs
        return cls(get_task(a.get("task")), tuple(a["classes"]), tuple(a.get("challenge_classes", ())),
                   (a.get("label_source") or {}).get("aggregation", ""), np.asarray(ds["record"].values).astype(str))

    @property
    def selection(self) -> str:
        """The validation metric that picks the best epoch."""
        return "val_challenge_f1" if self.challenge_classes else "val_macro_f1"

    def __call__(self, loader: ZarrSegmentLoader, prob: np.ndarray) -> tuple[dict[str, Any], np.ndarray,
                                                                            np.ndarray, np.ndarray]:
        """``(metrics, names, probabilities, reference)`` per scored unit (beat or recording)."""
        names, prob, y, notes = self.task.evaluation_units(prob, loader.labels, np.asarray(loader.indices).astype(str),
                                                           self.segment_record[loader.indices], self.aggregation)
        m = classification_metrics(y, prob.argmax(axis=1), self.classes, self.challenge_classes)
        m.update(notes)
        return m, names, prob, y


def predict_classes(model, loader: ZarrSegmentLoader, verbose: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and predicted class of every segment of ``loader``, in segment order (``verbose`` 1:
    Keras' progress bar)."""
    if not len(loader):
        return np.zeros((0, len(loader.classes)), np.float32), np.zeros(0, np.int64)
    prob = model.predict(loader.dataset().map(lambda x, *rest: x), verbose=verbose)
    return prob, prob.argmax(axis=1)


def evaluate(model, loader: ZarrSegmentLoader, scorer: Scorer, split: Split, part: str, store: str,
             model_path: str, out: RunFolder | None, title: str,
             extra: Mapping[str, Any] | None = None, verbose: int = 0) -> dict[str, Any]:
    """Metrics of ``model`` on ``loader`` (a part of ``split``), with ``extra``; written to ``out`` when given."""
    prob, _ = predict_classes(model, loader, verbose)
    metrics, names, prob, y = scorer(loader, prob)
    metrics.update(split=split.name, part=part, store=store, model=str(model_path), **dict(extra or {}))
    if out is not None:
        write_evaluation(out, metrics, title)
        if scorer.task.writes_predictions:
            _write_predictions(out, names, y, prob, scorer.classes)
    return metrics


def _png(figure) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    return buf.getvalue()


def write_evaluation(out: RunFolder, metrics: Mapping[str, Any], title: str = "") -> None:
    """``metrics.json``, ``classification_report.txt`` and both confusion plots (as ``evaluate.write_evaluation``)."""
    from .plots import confusion_figure

    out.write_json(METRICS_FILE, metrics, default=None)  # metrics are plain JSON: anything else is a bug
    out.write_text(REPORT_FILE, format_report(metrics, title))
    plots = ((CONFUSION_COUNTS_FILE, False, "counts"), (CONFUSION_RATIOS_FILE, True, "row ratios"))
    for name, normalize, what in plots:
        figure = confusion_figure(metrics, normalize=normalize, title=f"{title} ({what})" if title else "")
        out.write_bytes(name, _png(figure))


def _write_predictions(out: RunFolder, names: np.ndarray, y: np.ndarray, prob: np.ndarray,
                       classes: tuple[str, ...]) -> None:
    """Per-unit reference, prediction and probabilities of an evaluated part."""
    rows = ["record,reference,predicted," + ",".join(f"p_{c}" for c in classes)]
    pred = prob.argmax(axis=1)
    for r, t, p, pr in zip(names, y, pred, prob):
        rows.append(f"{r},{classes[t]},{classes[p]}," + ",".join(f"{v:.4f}" for v in pr))
    out.write_text(PREDICTIONS_FILE, "\n".join(rows) + "\n")


def write_history(out: RunFolder, history: Mapping[str, list[float]]) -> None:
    """``history.json``, ``history.csv`` (one row an epoch) and the curves."""
    from .plots import history_figure

    out.write_json(HISTORY_FILE, history)
    keys = list(history)
    n = max((len(v) for v in history.values()), default=0)
    rows = ["epoch," + ",".join(keys)]
    for i in range(n):
        rows.append(f"{i + 1}," + ",".join(f"{history[k][i]:.6g}" if i < len(history[k]) else "" for k in keys))
    out.write_text(HISTORY_CSV_FILE, "\n".join(rows) + "\n")
    if n:
        out.write_bytes(CURVES_FILE, _png(history_figure(history)))


def evaluation_split(card: ModelCard, ds, spec: str | None, seed: int,
                     storage_options: Mapping[str, Any] | None = None) -> Split:
    """The split to evaluate a saved model on: ``spec`` if given, else the model's own.

    The model's own is the records of each part as its card lists them (record splits), else its split
    recreated by name with ``seed``; a card without a split gets the task's default.
    """
    saved = card.split or {}
    if spec is None and any(saved.get("records", {}).values()):
        return by_records(saved["name"], saved["records"], [str(r) for r in ds["record_id"].values],
                          np.asarray(ds["record_offset"].values), np.asarray(ds["record_n_segments"].values),
                          {"from": "the model's metadata"})
    return make_split(spec or saved.get("name") or get_task(ds.attrs.get("task")).default_split, ds, seed=seed,
                      storage_options=storage_options)


# -- the data ----------------------------------------------------------------------------------------------------

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


@dataclass
class TrainingData:
    """A split of a store as the model sees it: the store variables it takes, streamed by the train loader
    (shuffled from ``first_epoch``'s order on) and the validation loader."""

    store: str
    ds: Any  #: the store (``store.open_dataset``)
    split: Split
    config: TrainConfig
    inputs: tuple[str, ...]  #: the store variables the model takes
    storage_options: Mapping[str, Any] | None = None
    first_epoch: InitVar[int] = 0
    train: ZarrSegmentLoader = field(init=False)
    val: ZarrSegmentLoader = field(init=False)

    def __post_init__(self, first_epoch: int):
        self.inputs = tuple(self.inputs)
        # a resumed run continues the per-epoch sequence instead of repeating epoch 1's order
        self.train = self.loader(self.split["train"], train=True, seed=self.config.seed + 1000 * first_epoch)
        self.val = self.loader(self.split["val"], train=False, seed=self.config.seed)

    def loader(self, indices: np.ndarray, *, train: bool, seed: int) -> ZarrSegmentLoader:
        """Segments ``indices``: shuffled, weighted and augmented as the configuration says when ``train``."""
        cfg = self.config
        opts = LoaderOptions(batch_size=cfg.batch_size, shuffle=train, shuffle_chunks=cfg.shuffle_chunks,
                             inputs=self.inputs, parallel_reads=cfg.parallel_reads, seed=seed,
                             class_weighting=cfg.class_weighting if train else "none",
                             balanced_sampling=cfg.balanced_sampling and train,
                             augment=_augmentation(cfg, self.ds, self.inputs) if train else None)
        return ZarrSegmentLoader(self.store, indices, opts, storage_options=self.storage_options)

    def part(self, name: str) -> ZarrSegmentLoader:
        """The unshuffled loader of the part ``name`` (the validation one is reused)."""
        return self.val if name == "val" else self.loader(self.split[name], train=False, seed=self.config.seed)

    def rr_stats(self, indices: np.ndarray) -> dict[str, Any] | None:
        """The RR standardisation of a model trained on ``indices`` (None for a model that takes no RR)."""
        return _rr_stats(self.ds, indices) if "rr" in self.inputs else None

    def build(self, rr_indices: np.ndarray, learning_rate: float):
        """A fresh, compiled model for this data (RR features standardised over the segments ``rr_indices``)."""
        import keras

        cfg, train = self.config, self.train
        model = build_model(cfg.model, train.sample_shape, len(train.classes), input_dtype=str(train.dtype),
                            options=cfg.model_options, rr_stats=self.rr_stats(rr_indices))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"])
        return model


# -- the selection run -------------------------------------------------------------------------------------------

def _run_state(out: RunFolder, val: ZarrSegmentLoader, scorer: Scorer, patience: int, state: TrainState,
               card: ModelCard, calibration: Callable[[], Any] | None = None):
    """The selection run's ``RunState`` callback (its class made here: Keras is imported late)."""
    import keras

    class RunState(keras.callbacks.Callback):
        """Validation score each epoch, early stopping on it, the best epoch and checkpoints for ``--resume``.

        Keras' own ``EarlyStopping`` forgets its best score when training resumes; this keeps it in the
        run folder's state, written after the checkpoint.
        """

        def __init__(self, out: RunFolder, val: ZarrSegmentLoader, scorer: Scorer, patience: int,
                     state: TrainState, card: ModelCard, calibration: Callable[[], Any] | None = None):
            super().__init__()
            self.out, self.val, self.scorer, self.patience = out, val, scorer, patience
            self.calibration = calibration  #: () -> training batches for recalibrate_batch_norm, or None
            self.state, self.card = state, card
            self._t0 = self._lr = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            self._lr = float(np.asarray(self.model.optimizer.learning_rate))

        def _validate(self, logs: dict[str, Any]) -> float:
            """Adds the validation metrics to ``logs``; the selection score."""
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
            return float(logs[self.scorer.selection])

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            if self.calibration is not None:
                recalibrate_batch_norm(self.model, self.calibration())
            train_s = time.perf_counter() - self._t0
            score = self._validate(logs)
            st = self.state
            st.epoch, st.train_s = epoch + 1, st.train_s + train_s
            for k, v in logs.items():
                st.history.setdefault(k, []).append(float(v))
            if score > st.best_val_score:
                st.best_val_score, st.best_epoch, st.wait = score, epoch + 1, 0
                # The best epoch so far, self-describing like the final model.keras.
                self.out.save_model(self.model, MODEL_FILE, self.card.with_train(st.to_dict(), epoch + 1, False))
            else:
                st.wait += 1
                if st.wait >= self.patience:
                    st.stopped_early = True
                    self.model.stop_training = True
            # Checkpoint first, state last: a crash in between resumes from the previous epoch.
            self.out.save_model(self.model, CHECKPOINT_FILE, self.card.with_train(st.to_dict(), epoch + 1, False))
            self.out.write_state(st)
            log.info("epoch %d: %s %.4f (best %.4f at epoch %d), %.1f s", epoch + 1, self.scorer.selection, score,
                     st.best_val_score, st.best_epoch, train_s)

    return RunState(out, val, scorer, patience, state, card, calibration)


def _epoch_line(state: TrainState):
    """The ``EpochLine`` callback (its class made here: Keras is imported late)."""
    import keras

    class EpochLine(keras.callbacks.Callback):
        """One plain line an epoch on stdout (no carriage returns, no ANSI codes), for logs, pipes and Dask workers.

        Placed after ``RunState`` and ``ReduceLROnPlateau``, so that the epoch logs hold the validation
        metrics and the learning rate of the epoch.
        """

        def __init__(self, state: TrainState):
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
                                     time.perf_counter() - self._t0, self.state.best_epoch == epoch + 1)
            sys.stdout.write(line + "\n")  # the job's progress output, not a log record
            sys.stdout.flush()

    return EpochLine(state)


def _start_model(data: TrainingData, out: RunFolder, card: ModelCard, state: TrainState, resumed: bool):
    """The model the selection run goes on with: its checkpoint when resumed, else a fresh one."""
    if not resumed:
        return data.build(data.split["train"], data.config.learning_rate)
    model, _ = out.load_model(CHECKPOINT_FILE, compile=True)
    if out.fold_in_legacy_best(card.with_train(state.to_dict(), state.best_epoch, False)):
        log.info("%s: the best epoch of an older version's best.keras moved into %s", out.root, MODEL_FILE)
    return model


def fit(data: TrainingData, out: RunFolder, card: ModelCard, scorer: Scorer, state: TrainState, *,
        resumed: bool, verbose: int = 1) -> bool:
    """Train from ``state`` on (its checkpoint when ``resumed``) until the configuration's epochs or early
    stopping, keeping the best epoch in ``model.keras``; write the history. True when an epoch ran."""
    import keras

    cfg = data.config
    model = _start_model(data, out, card, state, resumed)
    # After RunState, so that it sees the validation score RunState adds to the epoch logs.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor=scorer.selection, mode="max", factor=cfg.lr_factor,
                                                patience=cfg.lr_patience, min_lr=cfg.learning_rate / 64)
    n_cal = cfg.bn_recalibration_batches

    def calibration():
        return (batch[0] for batch in data.train.dataset().take(n_cal))

    callbacks = [_run_state(out, data.val, scorer, cfg.patience, state, card, calibration if n_cal else None), plateau]
    verbose = fit_verbose(verbose)
    if verbose == 2:  # our own line instead of Keras' two (which also list every per-class F1)
        callbacks.append(_epoch_line(state))
    more = state.epoch < cfg.epochs and not state.stopped_early
    if more:
        model.fit(data.train.dataset(), epochs=cfg.epochs, initial_epoch=state.epoch, callbacks=callbacks,
                  verbose=1 if verbose == 1 else 0, shuffle=False)  # the loader shuffles
    write_history(out, state.history)
    return more


# -- the model kept ----------------------------------------------------------------------------------------------

def refit_length(cfg: TrainConfig, best_epoch: int) -> int:
    """Epochs of the refit: ``refit_epochs``, or the best epoch's count where that is more (or ``refit_epochs`` is 0).

    At least ``refit_epochs``: the best epoch of a few validation patients is noisy, and a short refit never
    reaches the lower learning rates. No fewer than the best epoch: where validation kept improving that long
    (the intra-patient split: epoch 22), a refit cut at 10 epochs stops before the rates dropped (macro F1
    0.935 against 0.948 with 22).
    """
    return int(max(cfg.refit_epochs, best_epoch))


def keep_model(data: TrainingData, out: RunFolder, card: ModelCard, state: TrainState, trained: bool):
    """``(model, path)`` of the model the run keeps in ``model.keras``: the best epoch, or its refit when the
    configuration asks for one (``refit``), with the final card.

    A resumed run whose ``model.keras`` is already the refit of this best epoch keeps it (the refit is
    deterministic); ``trained``: whether this call's ``fit`` ran an epoch.
    """
    cfg = data.config
    best, _ = out.load_model(MODEL_FILE)
    saved = out.read_card(MODEL_FILE).train
    refitted = saved.refit if saved else None
    final = card.with_train(state.to_dict(), state.best_epoch, True)
    if refitted and (not cfg.refit or (not trained and refitted["epochs"] == refit_length(cfg, state.best_epoch)
                                       and refitted.get("members", 1) == cfg.members)):
        return best, out.save_model(best, MODEL_FILE, final.with_refit(refitted))
    # model.keras holds the best epoch; saved once more without the optimizer state, with the final card.
    path = out.save_model(best, MODEL_FILE, final)
    state.refit_epochs, state.refit_s = 0, 0.0
    if cfg.refit:
        return refit(data, out, final, state)
    return best, path


def _weight_average(first: int):
    """A Keras callback (made here: Keras is imported late, as in ``_run_state``) that averages the weights
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


def _refit_member(data: TrainingData, both: np.ndarray, seed: int, rates: list[float], label: str):
    """One refit model: trained on ``both`` at ``rates`` with seed ``seed``, its last half of epochs averaged.

    Returns the model, its loader and the averaging callback.
    """
    import keras

    cfg, epochs = data.config, len(rates)
    loader = data.loader(both, train=True, seed=seed + 500)
    keras.utils.set_random_seed(seed)
    model = data.build(both, rates[0])
    log.info("refit%s: %s on train + val (%d segments) for %d epochs", label, cfg.model, len(loader), epochs)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: rates[min(epoch, epochs - 1)])
    average = _weight_average(first=epochs - (epochs + 1) // 2)
    model.fit(loader.dataset(), epochs=epochs, callbacks=[schedule, average], verbose=0, shuffle=False)
    average.apply(model)
    # The averaged weights never ran with the moving batch-norm statistics: recompute them on training batches.
    recalibrate_batch_norm(model, (batch[0] for batch in loader.dataset().take(cfg.bn_recalibration_batches
                                                                                 or SWA_BN_BATCHES)))
    return model, loader, average


def refit(data: TrainingData, out: RunFolder, card: ModelCard, state: TrainState):
    """A fresh model trained on train + val for ``refit_length`` epochs, at the learning rates the selection
    run used in them (its last one past its end), with the weights of its last half of epochs averaged
    (``_weight_average``); ``members`` of them averaged into one; saved as ``model.keras`` (replacing the best
    epoch), its card saying how (``train.refit``). Returns ``(model, path)``.

    A run killed during the refit repeats it on ``--resume`` (nothing of it is checkpointed: it is as long as
    the selection run up to its best epoch).
    """
    cfg = data.config
    epochs = refit_length(cfg, state.best_epoch)
    rates = list(state.history.get("epoch_learning_rate", []))[:epochs]
    rates += [rates[-1] if rates else cfg.learning_rate] * (epochs - len(rates))  # runs of older versions
    both = np.union1d(data.split["train"], data.split["val"])
    t0 = time.perf_counter()
    members, loader, average = [], None, None
    for k in range(cfg.members):
        seed = cfg.seed + MEMBER_SEED_STEP * k  # member 0 is the single model's refit, seeds and all
        label = f" member {k + 1}/{cfg.members}" if cfg.members > 1 else ""
        model, loader, average = _refit_member(data, both, seed, rates, label)
        members.append(model)
    model = average_members(members)
    state.refit_s, state.refit_epochs = time.perf_counter() - t0, epochs
    card = card.with_refit({"epochs": epochs, "parts": ["train", "val"], "n_segments": int(len(loader)),
                            "averaged_epochs": list(range(average.first + 1, epochs + 1)),
                            "learning_rates": [float(r) for r in rates], "members": cfg.members})
    path = out.save_model(model, MODEL_FILE, card)
    out.write_state(state)
    return model, path
