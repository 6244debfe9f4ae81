"""Stage 8b: the model card, everything a model archive says of itself, as one typed declaration.

A model trained by ``ecg-pipeline train`` carries ``ecg_pipeline.json`` inside its ``.keras``
archive. ``ModelCard`` is that file's one declaration (its JSON schema,
``schemas/model-card.schema.json``, is generated from it, as the configuration schemas are):

* made from a store at training time (``ModelCard.from_store``), with the training record added
  as the run goes (``with_train``, ``with_refit``);
* read from an archive without TensorFlow (``ModelCard.read``: the archive is checked first,
  ``models.check_archive``);
* checking a store (``check_store``) or a store's variables (``check_store_inputs``) against itself.

Models written before the card existed hold the same keys (the card declares what ``train`` has
written since store schema v2), so they are read as they are; a file whose metadata does not
match (a missing spectrogram, an unknown task, a key the card does not know) is refused with one
message naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .models import ModelError, check_archive
from .spectrogram import SpectrogramSpec

__all__ = ["CARD_SCHEMA_FILE", "ModelCard", "ModelError", "check_store_inputs", "json_schema", "write_schema"]

CARD_SCHEMA_FILE = "model-card.schema.json"
#: Packages whose versions a card records: what the network was trained and saved with.
RECORDED_PACKAGES = ("ecg-pipeline", "tensorflow", "keras", "numpy")


class _Section(BaseModel):
    """Frozen and closed: a key the card does not declare is an error, not silently carried along."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, without the optional keys that are unset (as ``train`` has always written them)."""
        return json.loads(self.model_dump_json(exclude_none=True))


class ModelInput(_Section):
    """What the network takes: the store variables it is fed, by input name."""

    shape: list[int | None] | None = Field(None, description="The spectrogram input's shape (freq, time), no batch.")
    dtype: str = Field("float32", description="dtype the inputs are cast to.")
    variable: str = Field("spectrogram", description="The store variable the first input is.")
    variables: list[str] = Field(["spectrogram"], min_length=1,
                                 description="Every store variable the network takes, by input name.")
    rr: dict[str, Any] | None = Field(None, description="How its RR features are computed (rr.RRSpec attributes).")
    template: dict[str, Any] | None = Field(None, description="How its templates are made (template.TemplateSpec).")


class Accepted(_Section):
    """The input the network has seen: records at or above ``min_fs_hz``, spectrogram rows up to ``band_hz``."""

    min_fs_hz: float | None = Field(None, gt=0, description="The lowest sampling rate whose records it scores.")
    band_hz: list[float] | None = Field(None, min_length=2, max_length=2, description="The rows' band.")


class TrainingStore(_Section):
    """The store the model was trained on: how its segments were made."""

    database: str | None = None
    database_version: str | None = None
    config_fingerprint: str | None = None
    spectrogram: dict[str, Any] = Field(description="spectrogram.SpectrogramSpec attributes: window and STFT.")
    preprocess_config: dict[str, Any] | None = None
    label_map: dict[str, str] | None = None
    label_source: dict[str, Any] | None = None
    schema_version: int | None = None


class TrainingRecord(_Section):
    """How far training got when the file was saved, and which epoch's weights it holds."""

    epoch: int
    best_epoch: int
    best_val_score: float
    stopped_early: bool
    selection: str = "val_macro_f1"
    weights_epoch: int
    complete: bool
    refit: dict[str, Any] | None = Field(None, description="The refit on train + val that gave the weights.")


class ModelCard(_Section):
    """Everything a model archive says of itself (``ecg_pipeline.json``)."""

    package: Literal["ecg-pipeline"] = "ecg-pipeline"
    package_version: str | None = None
    versions: dict[str, str] | None = Field(None, description="Versions of the packages it was trained with.")
    task: str = Field(description="The registered task (pipeline.tasks): beat, rhythm.")
    anchor_kind: str | None = None
    classes: list[str] = Field(min_length=1, description="The classes its output scores, in order.")
    challenge_classes: list[str] = Field([], description="Classes whose mean F1 selects the best epoch.")
    input: ModelInput = ModelInput()
    accepted: Accepted | None = None
    store: TrainingStore
    split: dict[str, Any] | None = Field(None, description="The split it was trained on (splits.Split.to_dict).")
    train_config: dict[str, Any] | None = Field(None, description="Its TrainConfig.")
    train: TrainingRecord | None = None

    # -- made, read, written -----------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, attrs: Mapping[str, Any], split: Mapping[str, Any], train_config: Mapping[str, Any],
                   input_shape: Sequence[int], dtype: str, inputs: Sequence[str]) -> "ModelCard":
        """The card of a model about to be trained on a store with attributes ``attrs``."""
        spec = SpectrogramSpec.from_attrs(attrs["spectrogram"])
        return cls(
            package_version=_version("ecg-pipeline"), versions=package_versions(), task=attrs["task"],
            anchor_kind=attrs["anchor_kind"], classes=list(attrs["classes"]),
            challenge_classes=list(attrs.get("challenge_classes", [])),
            input=ModelInput(shape=list(input_shape), dtype=str(dtype), variables=list(inputs),
                             rr=attrs["rr"] if "rr" in inputs else None,
                             template=attrs["template"] if "template" in inputs else None),
            # What the network has seen: records at the store's rate (others are resampled to it), the rows up to
            # the top frequency. A record sampled too low for them has empty rows there: `score` refuses or flags it.
            accepted=Accepted(min_fs_hz=spec.min_fs_hz, band_hz=[0.0, float(spec.freqs()[-1])]),
            store=TrainingStore(
                database=attrs.get("database"), database_version=attrs.get("database_version"),
                config_fingerprint=attrs.get("config_fingerprint"), spectrogram=attrs.get("spectrogram"),
                preprocess_config=attrs.get("config"), label_map=attrs.get("label_map"),
                label_source=attrs.get("label_source"), schema_version=attrs.get("schema_version")),
            split=dict(split), train_config=dict(train_config))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> "ModelCard":
        """Validate plain data (an ``ecg_pipeline.json``) as a card.

        Raises
        ------
        ModelError
            Naming ``where`` and every mismatch.
        """
        if not data:
            raise ModelError(f"{where}: has no ecg_pipeline.json metadata (not saved by `ecg-pipeline train`: use a "
                             "run folder's model.keras), so the window and STFT it was trained with are unknown; refused")
        try:
            card = cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors())
            raise ModelError(f"{where}: its ecg_pipeline.json does not match the model card ({CARD_SCHEMA_FILE}): "
                             f"{problems}; refused") from None
        card._check(where)
        return card

    @classmethod
    def read(cls, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> "ModelCard":
        """The card of the ``.keras`` archive at ``path``, checked (``models.check_archive``), without TensorFlow.

        Raises
        ------
        ModelError
            Not a safe ``.keras`` archive, no metadata, or metadata that is not a card of a known task.
        """
        return cls.from_dict(check_archive(path, storage_options), str(path))

    def to_dict(self) -> dict[str, Any]:
        """The card as ``ecg_pipeline.json`` holds it."""
        return super().to_dict()

    def with_train(self, state: Mapping[str, Any], weights_epoch: int, complete: bool) -> "ModelCard":
        """This card with the training record of a file saved now (weights of ``weights_epoch``)."""
        train = TrainingRecord(epoch=state["epoch"], best_epoch=state["best_epoch"],
                               best_val_score=state["best_val_score"], stopped_early=bool(state["stopped_early"]),
                               selection=state.get("selection", "val_macro_f1"), weights_epoch=int(weights_epoch),
                               complete=bool(complete))
        return self.model_copy(update={"train": train})

    def with_refit(self, refit: Mapping[str, Any] | None) -> "ModelCard":
        """This card saying its weights come from a refit (``refit``: epochs, parts, members...)."""
        if self.train is None:
            raise ValueError("a refit is recorded after the training record (with_train)")
        return self.model_copy(update={"train": self.train.model_copy(update={"refit": dict(refit) if refit else None})})

    # -- what scoring and evaluation read ------------------------------------------------------------------------
    @property
    def spec(self) -> SpectrogramSpec:
        """The window and STFT of its training store (``score`` cuts and transforms beats with it)."""
        return SpectrogramSpec.from_attrs(self.store.spectrogram)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The store variables the network takes, by input name."""
        return tuple(self.input.variables)

    @property
    def input_dtype(self) -> str:
        return self.input.dtype

    @property
    def rr_spec(self):
        """How its RR features are computed (``rr.RRSpec``); None for a model that takes none."""
        from .rr import RRSpec

        return RRSpec.from_attrs(self.input.rr or {}) if "rr" in self.inputs else None

    @property
    def template_spec(self):
        """How its templates are made (``template.TemplateSpec``); None for a model that takes none."""
        from .template import TemplateSpec

        return TemplateSpec.from_attrs(self.input.template or {}) if "template" in self.inputs else None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.store.label_map or {})

    @property
    def database(self) -> str:
        return self.store.database or ""

    @property
    def leads(self) -> tuple[str, ...]:
        """The leads it was trained on, in preference order: its preprocess configuration's, else its database's."""
        from .databases import DATABASES

        db = DATABASES.get(self.database)
        return tuple((self.store.preprocess_config or {}).get("leads") or (db.leads if db else ()))

    @property
    def annotator(self) -> str:
        """The annotation files (extension) of its database: the reference ``score`` compares with."""
        from .databases import DATABASES

        db = DATABASES.get(self.database)
        return db.annotator if db else "atr"

    @property
    def min_fs(self) -> float:
        """The lowest sampling rate it was trained for (``accepted``; else its store's rate)."""
        return float((self.accepted.min_fs_hz if self.accepted else None) or self.spec.fs)

    @property
    def window_s(self) -> float:
        """Seconds of signal one segment spans."""
        spec = self.spec
        return (spec.n_before + spec.n_after) / spec.fs

    @property
    def hop_s(self) -> float:
        """Seconds between window starts in its store (windowed stores; the window length when none is said)."""
        return float((self.store.label_source or {}).get("hop_s", 0) or 0) or self.window_s

    @property
    def min_s(self) -> float:
        """The shortest recording its store kept (windowed stores; 0 when none is said)."""
        return float((self.store.label_source or {}).get("min_s", 0) or 0)

    def task_impl(self):
        """The registered task (``pipeline.tasks``) this model is for."""
        from .tasks import get_task

        return get_task(self.task)

    # -- checks ---------------------------------------------------------------------------------------------------
    def _check(self, where: str) -> None:
        """What the schema cannot say: a known task, a spectrogram that parses and fits the declared input."""
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ModelError(f"{where}: a {self.task!r} model; this ecg-pipeline knows {', '.join(TASKS)} models")
        try:
            spec = self.spec
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: its ecg_pipeline.json lacks the spectrogram parameters of the store it was "
                             f"trained on ({type(exc).__name__}: {exc}); refused") from None
        if self.input.shape is not None and tuple(self.input.shape) != (spec.n_freq, spec.n_time):
            raise ModelError(f"{where}: its metadata's STFT gives windows of {(spec.n_freq, spec.n_time)}, its input "
                             f"shape says {tuple(self.input.shape)}; metadata and network disagree, refused")
        for name, what in (("rr", "takes RR features but its metadata does not say how they are computed"),
                           ("template", "takes neighbour templates but its metadata does not say how they are made")):
            try:
                getattr(self, f"{name}_spec")
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{where}: {what} ({type(exc).__name__}: {exc}); refused") from None

    def check_store(self, attrs: Mapping[str, Any], variables: Sequence[str], where: str = "model",
                    store: str = "STORE") -> None:
        """Refuse a store (its attributes and variable names) whose segments were made otherwise than this
        model's: another STFT or window, another task, other classes, a missing input variable.

        Raises
        ------
        ModelError
            Naming ``where`` (the model file) and what differs.
        """
        want, have = self.store.spectrogram, attrs.get("spectrogram")
        if want != have:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise ModelError(f"{where} was trained on spectrograms made with other parameters than this store's "
                             f"(differ in: {', '.join(diff)}); re-run preprocess with the model's settings")
        if self.task != attrs.get("task"):
            raise ModelError(f"{where} is a {self.task} model; the store holds {attrs.get('task')} segments")
        if list(self.classes) != list(attrs["classes"]):
            raise ModelError(f"{where} predicts classes {self.classes}, the store has {list(attrs['classes'])}")
        check_store_inputs(self.inputs, attrs, variables, where, self.input.rr, store, self.input.template)


def check_store_inputs(inputs: Sequence[str], attrs: Mapping[str, Any], variables: Sequence[str], what: str,
                       rr_attrs: Mapping[str, Any] | None = None, store: str = "STORE",
                       template_attrs: Mapping[str, Any] | None = None) -> None:
    """Refuse a store that lacks a variable ``inputs`` names, or whose RR features or templates were computed
    otherwise than ``rr_attrs`` / ``template_attrs`` say (None: any).

    Raises
    ------
    ModelError
        Naming ``what`` (a model file or name), the store and how to rebuild it.
    """
    from .store import rebuild_hint

    where = attrs.get("database", "the store")
    for name in inputs:
        if name not in variables:
            raise ModelError(f"{what} takes the store variable {name!r}, which this store (schema "
                             f"v{attrs.get('schema_version')}, {attrs.get('task')} segments) lacks; "
                             + (rebuild_hint(attrs, store) if attrs.get("anchor_kind") == "r-peak" else
                                "choose a model of this task"))
    if "rr" in inputs and rr_attrs is not None and dict(attrs.get("rr") or {}) != dict(rr_attrs):
        raise ModelError(f"{what} was trained on RR features computed with other parameters than {where}'s "
                         f"(model {dict(rr_attrs)}, store {attrs.get('rr')}); re-run preprocess with the model's")
    if "template" in inputs and template_attrs is not None and dict(attrs.get("template") or {}) != dict(template_attrs):
        raise ModelError(f"{what} was trained on templates made with other parameters than {where}'s (model "
                         f"{dict(template_attrs)}, store {attrs.get('template')}); re-run preprocess with the model's")


def file_sha256(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of a model file: its identity in a scores store and the workers' model cache."""
    from .locations import locate

    with locate(path, storage_options).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """The installed versions of ``RECORDED_PACKAGES`` (from the installed metadata: TensorFlow is not imported)."""
    return {p: v for p in RECORDED_PACKAGES if (v := _version(p))}


# ---------------------------------------------------------------------------------------------------------------------
# the JSON schema, generated from the card as the configuration schemas are from the configs

def json_schema() -> dict[str, Any]:
    """The card's JSON schema, as committed in ``schemas/model-card.schema.json``."""
    from .config import _SCHEMA_ROOT, _inline, _NoFieldTitles, _ordered

    schema = ModelCard.model_json_schema(schema_generator=_NoFieldTitles)
    defs = schema.pop("$defs", {})
    schema = _inline(schema, defs)
    schema.update({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": _SCHEMA_ROOT + CARD_SCHEMA_FILE,
                   "title": "ecg-pipeline model card",
                   "description": "ecg_pipeline.json inside a .keras archive written by `ecg-pipeline train`: what "
                                  "the model is for, what it takes and how it was trained."})
    return _ordered(schema)


def write_schema(folder: str | Path | None = None, check: bool = False) -> bool:
    """Write ``json_schema()`` into ``folder`` (default: the package's ``schemas/``); True when the file changed."""
    from .config import render_schema

    if folder is None:
        from .. import schemas

        folder = Path(schemas.__file__).parent
    path, text = Path(folder) / CARD_SCHEMA_FILE, render_schema(json_schema())
    changed = not path.exists() or path.read_text(encoding="utf-8") != text
    if changed and not check:
        path.write_text(text, encoding="utf-8")
    return changed


if __name__ == "__main__":  # python -m ecg_pipeline.pipeline.model_card [--check]
    import sys

    if write_schema(check="--check" in sys.argv) and "--check" in sys.argv:
        raise SystemExit(f"schemas/{CARD_SCHEMA_FILE} is out of date: python -m ecg_pipeline.pipeline.model_card")
