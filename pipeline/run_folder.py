"""Stage 8d: a training run's folder, the one place that knows its file names and how they are written.

``ecg-pipeline train --out FOLDER`` keeps everything of one run in one folder: the models
(``model.keras``: the best epoch, later its refit; ``checkpoint.keras``: the last epoch with its
optimizer state), the resume state (``train_state.json``), the split and configuration it was
started with, its history, metrics and plots. ``RunFolder`` owns that folder's lifecycle:

* ``RunFolder.open``: start a run (refusing a folder that holds one unless told to resume or
  overwrite), resume one (its state, checked against the split it was saved with), or overwrite
  one (no model file of the old run outlives it), folding in the metadata-less ``best.keras``
  that older versions left;
* reading and writing its files, each write atomic (temporary file + rename), so that a crash
  leaves the previous version of a file, never half of one.

Every file is named by the folder and reached through its methods (``locations.Location``), so the
folder may be a local path or any fsspec URL (``s3://bucket/runs/r1``): models are written to a local
temporary file and uploaded, and read from a local copy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .locations import Location, locate
from .model_card import ModelCard
from .models import load_model, save_model

__all__ = ["CHECKPOINT_FILE", "LEGACY_BEST_FILE", "MODEL_FILE", "RunFolder", "STATE_FILE", "TrainState"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"  #: the model kept: the best epoch so far, finally its refit
CHECKPOINT_FILE = "checkpoint.keras"  #: the last finished epoch with its optimizer state, for --resume
LEGACY_BEST_FILE = "best.keras"  #: older versions' metadata-less copy of the best epoch
STATE_FILE = "train_state.json"  #: ``TrainState``: where the run stands
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.json"
HISTORY_CSV_FILE = "history.csv"
CURVES_FILE = "curves.png"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "classification_report.txt"
CONFUSION_COUNTS_FILE = "confusion_counts.png"
CONFUSION_RATIOS_FILE = "confusion_ratios.png"
PREDICTIONS_FILE = "predictions.csv"
#: The files of a run that a new run in the folder must not leave behind (the rest are rewritten by it).
RUN_MODEL_FILES = (STATE_FILE, CHECKPOINT_FILE, MODEL_FILE, LEGACY_BEST_FILE)


@dataclass
class TrainState:
    """Where a training run stands: written after every epoch (``train_state.json``), read by ``--resume``.

    Keras' own ``EarlyStopping`` forgets its best score when training resumes; the state keeps it, with
    the history of every epoch the refit needs (its learning rates).
    """

    epoch: int = 0  #: epochs finished
    best_val_score: float = -1.0
    selection: str = "val_macro_f1"  #: the validation metric that picks the best epoch
    best_epoch: int = 0
    wait: int = 0  #: epochs since the best one (early stopping)
    stopped_early: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    train_s: float = 0.0
    refit_epochs: int = 0  #: epochs of the refit that gave model.keras (0: none)
    refit_s: float = 0.0

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TrainState":
        """The state saved as ``data`` (run folders of older versions included).

        Raises
        ------
        ConfigError
            ``data`` is not a training state (naming ``where``).
        """
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), int) \
                or not isinstance(data.get("history"), dict):
            raise ConfigError(f"{where} is not the state of an `ecg-pipeline train` run (no epoch and history); "
                              "refused: choose another --out or pass --overwrite")
        data = dict(data)
        # run folders of older versions: the score had another name, and only macro F1 selected
        data.setdefault("best_val_score", data.pop("best_val_macro_f1", -1.0))
        data.setdefault("selection", "val_macro_f1")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunFolder:
    """A folder of run outputs, every file reached through it (``root``: a local path or an fsspec URL).

    ``evaluate --out`` writes into one too; ``open`` adds a training run's lifecycle. ``storage_options`` go
    to fsspec with the URL.
    """

    root: str
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        location = locate(self.root, self.storage_options)
        object.__setattr__(self, "_location", location)
        object.__setattr__(self, "root", location.path if location.local else location.url.rstrip("/"))

    @property
    def location(self) -> Location:
        return self._location  # type: ignore[attr-defined]

    # -- the lifecycle of a training run -------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, split: Mapping[str, Any], config: Mapping[str, Any], *, resume: bool = False,
             overwrite: bool = False, storage_options: Mapping[str, Any] | None = None) -> tuple["RunFolder", TrainState | None]:
        """The folder of a run about to train on ``split`` with ``config``, and its saved state when it resumes.

        A folder that holds a run is refused unless ``resume`` (continue it from its checkpoint; without one
        it starts afresh) or ``overwrite`` (start afresh). Starting afresh removes the old run's model files
        and state first. The split and configuration are written before training starts.

        Raises
        ------
        ConfigError
            ``url`` holds a run and neither flag is given; ``url`` is a file; the saved state is no training
            state; or the run to resume was saved with another split or store.
        """
        folder = cls(url, storage_options)
        if folder.location.isfile():
            raise ConfigError(f"--out {url} is a file, not a folder")
        holds_run = folder.exists(STATE_FILE)
        if holds_run and not (resume or overwrite):
            raise ConfigError(f"{url} already holds a training run: pass --resume to continue it or --overwrite "
                              "to replace it")
        folder.location.makedirs()
        state = None
        if holds_run and resume and folder.exists(CHECKPOINT_FILE):
            state = folder._resume(split)
        elif holds_run:
            if resume:
                log.warning("%s holds no checkpoint to resume from: training starts afresh", url)
            folder.clear_run()
        folder.write_json(SPLIT_FILE, dict(split))
        folder.write_text(CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False))
        return folder, state

    def _resume(self, split: Mapping[str, Any]) -> TrainState:
        """The saved state, after checking that the run was saved with ``split``'s segments."""
        state = self.read_state()
        try:
            saved = self.read_json(SPLIT_FILE)
        except (OSError, ValueError):
            raise ConfigError(f"{self.root} holds no readable {SPLIT_FILE}: not a run folder to resume") from None
        if not isinstance(saved, dict) or saved.get("n_segments") != split.get("n_segments"):
            raise ConfigError(f"{self.root}: --resume with a different split or store than the saved run")
        log.info("resuming %s after epoch %d", self.root, state.epoch)
        return state

    def clear_run(self) -> None:
        """Remove the state and every model file of the run held here (outputs that a run rewrites stay)."""
        for name in RUN_MODEL_FILES:
            self.remove(name)

    def fold_in_legacy_best(self, card: ModelCard) -> bool:
        """Move an older version's metadata-less ``best.keras`` into ``model.keras`` with ``card``.

        Such folders kept the best epoch there; the model file of today is that epoch, self-describing.
        """
        if not self.exists(LEGACY_BEST_FILE):
            return False
        legacy, _ = self.load_model(LEGACY_BEST_FILE)
        self.save_model(legacy, MODEL_FILE, card)
        self.remove(LEGACY_BEST_FILE)
        return True

    def read_state(self) -> TrainState:
        try:
            data = self.read_json(STATE_FILE)
        except ValueError:
            data = None  # not JSON: refused below as not a state
        return TrainState.from_dict(data, self.path(STATE_FILE))

    def write_state(self, state: TrainState) -> None:
        self.write_json(STATE_FILE, state.to_dict())

    # -- files ---------------------------------------------------------------------------------------------------
    def file(self, name: str) -> Location:
        """The file ``name`` of this folder."""
        return self.location.join(name)

    def path(self, name: str) -> str:
        """Where the file ``name`` of this folder is (a local path or a URL, for messages and records)."""
        file = self.file(name)
        return file.path if file.local else file.url

    def exists(self, name: str) -> bool:
        return self.file(name).isfile()

    def remove(self, name: str) -> None:
        """Remove ``name`` if it is there."""
        self.file(name).remove()

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` whole or not at all (``Location.write_bytes``), so a crash leaves the old file whole."""
        self.file(name).write_bytes(data)
        return self.path(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, data: Any, **dumps: Any) -> str:
        """``data`` as indented JSON (values JSON lacks written as their ``str`` unless ``dumps`` says otherwise)."""
        return self.write_text(name, json.dumps(data, **{"indent": 2, "default": str, **dumps}) + "\n")

    def save_model(self, model, name: str, card: ModelCard) -> str:
        """Save ``model`` as ``name`` with ``card`` inside (written locally, then moved or uploaded whole)."""
        with self.file(name).writing(suffix=".keras") as tmp:
            save_model(model, tmp, card.to_dict())
        return self.path(name)

    def load_model(self, name: str, *, compile: bool = False):
        """``(model, metadata)`` of the model file ``name`` (``models.load_model``: safe mode)."""
        return load_model(self.path(name), compile=compile, storage_options=self.storage_options)

    def read_card(self, name: str) -> ModelCard:
        """The card of the model file ``name``, without TensorFlow."""
        return ModelCard.read(self.path(name), storage_options=self.storage_options)
