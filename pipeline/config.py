"""Validated, immutable configuration of the jobs.

A YAML file is checked against ``schemas/preprocess-config.schema.json`` (or
``schemas/train-config.schema.json``) and turned into a frozen ``PreprocessConfig``
(``TrainConfig``); the job passes that object to every stage, so no stage reads
global state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from .. import schemas
from .detect import DetectorSpec
from .errors import ConfigError


@dataclass(frozen=True)
class WindowConfig:
    """Beat window around the annotated R peak."""

    before_s: float = 0.25
    after_s: float = 0.45


@dataclass(frozen=True)
class StftConfig:
    """Short-time Fourier transform of each beat window."""

    nperseg: int = 64
    hop: int = 8
    nfft: int | None = None
    window: str = "hann"
    detrend: Literal["constant", "none"] = "constant"
    log_eps: float = 1e-4


@dataclass(frozen=True)
class StoreConfig:
    """How spectrograms are laid out in Zarr."""

    dtype: Literal["float16", "float32"] = "float16"
    chunk_size: int = 2048
    compressor: Literal["blosc-lz4", "zstd", "none"] = "blosc-lz4"


@dataclass(frozen=True)
class DownloadConfig:
    """Retries and verification of source files."""

    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 120.0
    require_checksums: bool = False


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything the preprocess job needs besides the database, source and output."""

    leads: tuple[str, ...] | None = None
    lead_fallback: Literal["fail", "first"] = "fail"
    unknown_symbols: Literal["Q", "drop", "fail"] = "Q"
    window: WindowConfig = field(default_factory=WindowConfig)
    stft: StftConfig = field(default_factory=StftConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, not tuples), as YAML or JSON would hold it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def content_dict(self) -> dict[str, Any]:
        """The part of the configuration that changes what is written to the store."""
        d = self.to_dict()
        d.pop("download")
        return d

    def fingerprint(self) -> str:
        """SHA-256 of ``content_dict()``: two configs with equal fingerprints write equal stores."""
        blob = json.dumps(self.content_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


_SECTIONS = {"window": WindowConfig, "stft": StftConfig, "store": StoreConfig, "download": DownloadConfig}


def _validated(data: Any, schema_name: str) -> dict[str, Any]:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"configuration must be a mapping, got {type(data).__name__}")
    validator = jsonschema.Draft202012Validator(schemas.load(schema_name))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    return data


def config_from_dict(data: dict[str, Any] | None) -> PreprocessConfig:
    """Validate ``data`` against the config schema and build a ``PreprocessConfig``.

    Raises
    ------
    ConfigError
        Naming the offending key and why it is wrong.
    """
    data = _validated(data, "preprocess-config.schema.json")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _SECTIONS[key](**value)
        elif key == "leads":
            kwargs[key] = None if value is None else tuple(value)
        else:
            kwargs[key] = value
    config = PreprocessConfig(**kwargs)
    nfft = config.stft.nfft or config.stft.nperseg
    if nfft < config.stft.nperseg:
        raise ConfigError(f"stft.nfft ({nfft}) must be >= stft.nperseg ({config.stft.nperseg})")
    return config


def load_config(path: str | Path | None) -> PreprocessConfig:
    """Read a preprocess YAML configuration file (``None`` gives the defaults)."""
    return _load_yaml(path, config_from_dict, PreprocessConfig)


def load_train_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Read a training YAML configuration file (``None`` gives the defaults); non-None ``overrides`` win."""
    config = _load_yaml(path, train_config_from_dict, TrainConfig)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return train_config_from_dict({**config.to_dict(), **changes}) if changes else config


def _load_yaml(path, from_dict, default):
    if path is None:
        return default()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training job needs besides the store, split and output.

    The defaults are the configuration whose figures the README reports.
    """

    model: str = "spectrogram-cnn"
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 3e-4
    lr_factor: float = 0.5
    lr_patience: int = 2
    class_weighting: Literal["none", "balanced", "sqrt"] = "sqrt"
    balanced_sampling: bool = False
    patience: int = 6
    seed: int = 0
    shuffle_chunks: int = 16
    parallel_reads: int = 2
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def train_config_from_dict(data: dict[str, Any] | None) -> TrainConfig:
    """Validate ``data`` against ``schemas/train-config.schema.json`` and build a ``TrainConfig``."""
    return TrainConfig(**_validated(data, "train-config.schema.json"))


@dataclass(frozen=True)
class ScoreConfig:
    """Everything the scoring job needs besides the model, input and output.

    The beat window and STFT are not here: they come from the model, so scoring
    cannot use other settings than the model was trained with.
    """

    leads: tuple[str, ...] | None = None
    lead_fallback: Literal["fail", "first"] = "first"
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    piece_s: float = 1800.0
    batch_size: int = 4096
    match_tolerance_s: float = 0.150
    chunk_size: int = 65536
    max_archive_bytes: int = 8 * 2**30
    flush_s: float = 2.0
    download: DownloadConfig = field(default_factory=DownloadConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """SHA-256 of the keys that change which beats are found and how they are scored."""
        d = self.to_dict()
        content = {k: d[k] for k in ("leads", "lead_fallback", "detector", "match_tolerance_s")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def score_config_from_dict(data: dict[str, Any] | None) -> ScoreConfig:
    """Validate ``data`` against ``schemas/score-config.schema.json`` and build a ``ScoreConfig``."""
    data = _validated(data, "score-config.schema.json")
    kwargs: dict[str, Any] = dict(data)
    if "detector" in data:
        det = dict(data["detector"])
        for key in ("band_hz", "fiducial_band_hz"):
            if key in det:
                det[key] = tuple(det[key])
                if not det[key][0] < det[key][1]:
                    raise ConfigError(f"detector.{key} {list(det[key])}: low edge must be below high edge")
        kwargs["detector"] = DetectorSpec(**det)
    if "download" in data:
        kwargs["download"] = DownloadConfig(**data["download"])
    if data.get("leads") is not None:
        kwargs["leads"] = tuple(data["leads"])
    return ScoreConfig(**kwargs)


def load_score_config(path: str | Path | None) -> ScoreConfig:
    """Read a scoring YAML configuration file (``None`` gives the defaults)."""
    return _load_yaml(path, score_config_from_dict, ScoreConfig)
