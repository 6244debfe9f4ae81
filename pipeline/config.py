"""Validated, immutable configuration of the jobs: one typed declaration per configuration.

Each configuration (``PreprocessConfig``, ``TrainConfig``, ``ScoreConfig`` and their
sections) is a frozen pydantic model: its fields carry the defaults, the constraints
and the descriptions. The JSON schemas users and editors read,
``schemas/{preprocess,train,score}-config.schema.json``, are generated from these
models (``json_schemas()``; ``python -m ecg_pipeline.pipeline.config --write-schemas``
rewrites the files, and a test fails while a committed file differs from what the
models generate). A YAML file becomes a config through ``load_config``
(``load_train_config``, ``load_score_config``); what is wrong is reported as one
``ConfigError`` that names the file and the key. The job passes the config object to
every stage, so no stage reads global state; the objects are hashable, picklable and
compare by value, so they travel to Dask workers as they are.

This module imports pydantic and yaml only (no NumPy, SciPy or Dask): the command line
reads and prints configurations without loading the numeric stack.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema

from .errors import ConfigError

__all__ = [
    "TASK_TRAIN_DEFAULTS", "ConfigError", "DetectorSpec", "DownloadConfig", "PreprocessConfig", "RhythmWindowConfig", "ScoreConfig", "StftConfig", "StoreConfig",
    "TrainConfig", "WindowConfig", "config_from_dict", "json_schemas", "load_config", "load_score_config",
    "load_train_config", "merged", "render_schema", "score_config_from_dict", "train_config_from_dict", "write_schemas",
]


def _as_written(raw: Any, value: Any) -> Any:
    """``value`` with the whole numbers of ``raw`` kept as ints where validation made floats of them.

    A YAML ``block_s: 3`` has always been stored, printed and fingerprinted as ``3``, not
    ``3.0``; keeping it so keeps the fingerprints that stores on disk carry.
    """
    if type(raw) is int and type(value) is float:
        return raw
    if isinstance(raw, (list, tuple)) and isinstance(value, tuple) and len(raw) == len(value):
        return tuple(_as_written(r, v) for r, v in zip(raw, value))
    return value


def _plain(value: Any) -> Any:
    """Plain data of a config value: models become dicts (in field order), tuples lists."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _frozen(value: Any) -> Any:
    """A hashable stand-in of plain data (for the dict of ``TrainConfig.model_options``)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class _Config(BaseModel):
    """Frozen, closed (unknown keys are errors), strictly typed (``"3"`` is not a number, ``1`` not a boolean)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _keep_whole_numbers(cls, value: Any, handler: Any) -> Any:
        return _as_written(value, handler(value))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists, not tuples), as YAML or JSON would hold it."""
        return json.loads(json.dumps(_plain(self)))

    def __dask_tokenize__(self) -> tuple[str, str]:
        return type(self).__qualname__, json.dumps(self.to_dict(), sort_keys=True)


_Name = Annotated[str, Field(min_length=1, strict=True)]
_Hz = Annotated[float, Field(gt=0, strict=True)]


def _leads_field(description: str) -> Any:
    return Field(None, min_length=1, strict=False, description=description)  # strict=False: a YAML list is a tuple


# ---------------------------------------------------------------------------------------------------------------------
# preprocess


class WindowConfig(_Config):
    """Beat window around the annotated R peak."""

    before_s: float = Field(0.25, gt=0, le=10, description="Seconds of signal before the R peak.")
    after_s: float = Field(0.45, gt=0, le=10, description="Seconds of signal after the R peak.")
    align: Literal["annotation", "fiducial"] = Field(
        "fiducial", description="Where a beat window is centred: `fiducial` moves each annotated beat to the point "
                                "the R-peak detector reports for it (detect.fiducial_points, the detector's default "
                                "bands), so training windows sit where scoring's detected beats do; `annotation` "
                                "keeps the annotated sample.")


class RhythmWindowConfig(_Config):
    """Fixed windows over whole recordings, for rhythm databases (a label per recording or per episode)."""

    length_s: float = Field(30.0, gt=0, le=3600, description="Window length in seconds (the model's input length).")
    hop_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds between window starts. The last window ends at the recording's "
                                         "end, so every sample is in a window.")
    min_s: float = Field(
        5.0, gt=0, le=3600, description="Shortest recording kept; shorter ones fail by name. A recording between "
                                        "min_s and length_s is one window, padded by repeating it.")

    @field_validator("min_s")
    @classmethod
    def _min_within_window(cls, min_s: float, info: ValidationInfo) -> float:
        length = info.data.get("length_s")
        if length is not None and min_s > length:
            raise ValueError(f"{min_s} must be <= rhythm.length_s ({length})")
        return min_s


class StftConfig(_Config):
    """Short-time Fourier transform of each beat window."""

    nperseg: int = Field(64, ge=4, le=65536, description="STFT window length in samples.")
    hop: int = Field(8, ge=1, description="Samples between STFT frames.")
    nfft: int | None = Field(None, ge=4, description="FFT length (>= nperseg); null means nperseg.")
    window: str = Field("hann", description="scipy.signal.get_window name.")
    detrend: Literal["constant", "none"] = Field("constant", description="Remove each beat's mean before the STFT.")
    log_eps: float = Field(1e-4, gt=0, description="Spectrogram = log(|STFT| + log_eps).")
    max_freq_hz: float | None = Field(
        40.0, gt=0, description="Keep the frequency rows up to this many Hz only (null: up to half the sampling "
                                "rate). A band every accepted recorder carries makes the model's input the same "
                                "for a record sampled at 128 Hz as at 360 Hz (rows above a record's own Nyquist "
                                "rate are empty after resampling); models accept records sampled at 2.5 x this "
                                "or more.")

    @field_validator("nfft")
    @classmethod
    def _nfft_covers_nperseg(cls, nfft: int | None, info: ValidationInfo) -> int | None:
        nperseg = info.data.get("nperseg")  # absent when nperseg itself is invalid: that error is reported
        if nfft is not None and nperseg is not None and nfft < nperseg:
            raise ValueError(f"{nfft} must be >= stft.nperseg ({nperseg})")
        return nfft


class RRConfig(_Config):
    """RR-interval features of each beat (pipeline.rr), from all beats of its record: beat stores only."""

    local_beats: int = Field(10, ge=1, le=1000, description="Intervals on each side of a beat in its local average RR.")
    long_s: float = Field(300.0, gt=0, le=86400, description="The long average RR: valid intervals that ended in "
                                                              "the last this many seconds (causal).")
    min_rr_s: float = Field(0.15, gt=0, le=10, description="Shorter intervals are not heartbeats (flagged).")
    max_rr_s: float = Field(3.0, gt=0, le=60, description="Longer intervals are gaps in the beats (flagged).")
    default_rr_s: float = Field(0.8, gt=0, le=60, description="Every interval of a record without one valid interval.")
    atrial: bool = Field(False, description="Also store each beat's atrial activity (pipeline.atrial: `p_consistency`, its "
                                            "P-wave window against its neighbours', and `p_context`, theirs) as two more "
                                            "columns of `rr`. Off: on MIT-BIH DS2 it moved S F1 0.645 -> 0.656 and V F1 "
                                            "0.913 -> 0.909 (3 seeds; V 0.893 on one), within the seeds' spread.")

    def spec(self):
        from .atrial import AtrialSpec
        from .rr import RRSpec

        return RRSpec(self.local_beats, self.long_s, self.min_rr_s, self.max_rr_s, self.default_rr_s,
                      AtrialSpec() if self.atrial else None)


class TemplateConfig(_Config):
    """The shape context of each beat (pipeline.template): its neighbours' median spectrogram, beat stores only."""

    beats: int = Field(8, ge=0, le=256, description="Segments on each side of a beat whose median spectrogram is its "
                                                    "`template` (0: the store has no template variable).")

    def spec(self):
        from .template import TemplateSpec

        return TemplateSpec(self.beats) if self.beats else None


class StoreConfig(_Config):
    """How spectrograms are laid out in Zarr."""

    dtype: Literal["float16", "float32"] = Field("float16", description="Storage dtype of `spectrogram`.")
    chunk_size: int = Field(2048, ge=16, le=1048576, description="Segments per Zarr chunk (and per write task).")
    compressor: Literal["blosc-lz4", "zstd", "none"] = Field("blosc-lz4", description="Codec of the numeric arrays.")
    one_pass_max_mb: float = Field(
        64.0, ge=0, description="A record whose segments take at most this many MB is read once: its spectrograms are "
        "computed when it is planned and kept in the worker's memory until its chunk is written. A larger one (a long "
        "Holter recording) is read again when its chunk is written. 0: every record is read twice (less worker "
        "memory). Does not change what the store holds.")
    commit_records: int | None = Field(
        None, ge=1, description="Records read between two commits of the store while a job runs (their plans "
        "and chunks saved, so a killed job resumes from there; the per-record table one commit in 4): null takes "
        "1/50 of the records (at least 1: a few long records get their chunks written while the next are read), "
        "and waits after a commit 4 times as long as it took (a kill loses a few % of the reading; commits take "
        "at most ~1/5 of the driver's time). Does not change what the store holds.")


class DownloadConfig(_Config):
    """Retries and verification of source files."""

    retries: int = Field(4, ge=0, le=20, description="Attempts after the first on a transient error.")
    backoff_s: float = Field(0.5, ge=0, description="First back-off delay; doubles each retry.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout for HTTP sources.")
    require_checksums: bool = Field(False, description="Fail records whose files SHA256SUMS.txt does not list.")


class PreprocessConfig(_Config):
    """Everything the preprocess job needs besides the database, source and output."""

    leads: tuple[_Name, ...] | None = _leads_field(
        "Signal names to use, best first; null takes the database's default list.")
    lead_fallback: Literal["fail", "first"] = Field(
        "fail", description="When a record has none of `leads`: `fail` marks it failed, `first` takes its first signal "
                            "with a recognised ECG lead name (records.is_ecg_lead; never PLETH, ABP, RESP...).")
    unknown_symbols: Literal["Q", "drop", "fail"] = Field(
        "Q", description="Annotation symbols that are neither beats of the label map nor known non-beats: keep as "
                         "class Q, drop, or fail the record. Always counted.")
    window: WindowConfig = Field(default_factory=WindowConfig)
    rhythm: RhythmWindowConfig = Field(default_factory=RhythmWindowConfig)
    stft: StftConfig = Field(default_factory=StftConfig)
    rr: RRConfig = Field(default_factory=RRConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    def content_dict(self, task: str = "beat") -> dict[str, Any]:
        """The part of the configuration that changes what a store of ``task`` holds.

        Beat stores ignore the rhythm windows, rhythm stores the beat window and symbol policy.
        """
        d = self.to_dict()
        d.pop("download")
        for key in ("one_pass_max_mb", "commit_records"):
            d["store"].pop(key)  # how the work is done, not what is written
        for key in (("rhythm",) if task == "beat" else ("window", "unknown_symbols", "rr", "template")):
            d.pop(key)
        if task == "beat" and d["window"].get("align") == "annotation":
            d["window"].pop("align")  # as before the key existed: those fingerprints hold
        if d["stft"].get("max_freq_hz") is None:
            d["stft"].pop("max_freq_hz", None)  # every row, as before the key existed: those fingerprints hold
        if task == "beat" and d["rr"].get("atrial") is False:
            d["rr"].pop("atrial")  # intervals only, as before the key existed: those fingerprints hold
        return d

    def fingerprint(self, task: str = "beat") -> str:
        """SHA-256 of ``content_dict(task)``: two configs with equal fingerprints write equal stores."""
        blob = json.dumps(self.content_dict(task), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# train


def _model_names() -> list[str]:
    from .models import MODELS  # light: Keras is imported only when a model is built

    return list(MODELS)


class TrainConfig(_Config):
    """Everything the training job needs besides the store, split and output.

    The defaults are the configuration whose figures docs/results.md reports.
    """

    @field_validator("model")
    @classmethod
    def _registered_model(cls, name: str) -> str:
        if name not in _model_names():
            raise ValueError(f"{name!r} is not a registered model (known: {', '.join(_model_names())})")
        return name

    model: str = Field(
        "beat-template-cnn", description="Model name: a key of the model registry (pipeline.models.MODELS). Rhythm "
                               "stores default to rhythm-cnn.",
        json_schema_extra=lambda schema: schema.update(enum=_model_names()))
    epochs: int = Field(30, ge=1, le=10000, description="Most epochs to train (early stopping may end sooner).")
    batch_size: int = Field(256, ge=1, le=65536, description="Global batch size.")
    learning_rate: float = Field(3e-4, gt=0, le=1, description="Initial Adam learning rate.")
    lr_factor: float = Field(
        0.5, gt=0, le=1, description="Multiply the learning rate by this after lr_patience epochs without a better "
                                     "validation macro F1 (down to learning_rate / 64).")
    lr_patience: int = Field(2, ge=1, description="Epochs without improvement before the learning rate drops.")
    class_weighting: Literal["none", "balanced", "sqrt"] = Field(
        "none", description="Per-sample loss weights by class: balanced n/(k n_c), its square root, or none. Beat "
                            "models take none: with the premature-beat augmentation, weighting S beats up made S "
                            "positive predictivity on DS2 0.39-0.44 against 0.51-0.55 unweighted. Rhythm stores "
                            "default to sqrt.")
    balanced_sampling: bool = Field(
        False, description="Resample each shuffle group so that classes are drawn equally often.")
    premature_beats: float = Field(
        0.03, ge=0, le=1, description="Premature-beat augmentation (pipeline.augment.PrematureBeats) for models that "
                                      "take RR features, on stores with classes N and S: in each epoch this share of "
                                      "the N training beats of a regular rhythm get the RR features of a premature "
                                      "beat and the label S; 0: off.")
    time_stretch: float = Field(
        0.0, ge=0, lt=1, description="Time-stretch augmentation (pipeline.augment.TimeStretch): each training "
                                     "window's spectrogram is read at a rate drawn in [1 - x, 1 + x], as if the "
                                     "recording ran that much faster or slower; 0: off (the default: at 0.15 it "
                                     "changed no Challenge 2017 hold-out figure). For rhythm windows; a beat "
                                     "window is centred on its R peak, which a stretch would move.")
    patience: int = Field(6, ge=1, description="Epochs without a better validation macro F1 before stopping.")
    refit: bool = Field(
        True, description="After the validation part has picked the best epoch, train a fresh model on the training "
                          "and validation parts together for that many epochs, with the same learning rates, and "
                          "keep it. With whole patients held out for validation (inter-patient, stratified "
                          "records) this gives the model the patients the validation part held.")
    refit_epochs: int = Field(
        10, ge=0, le=10000, description="Least epochs of the refit (weights averaged over the last half); it runs "
                                        "as many as the best epoch where that is more (0: exactly as many). A floor, "
                                        "because the best epoch of a few validation patients is noisy: on DS1 -> DS2 "
                                        "it ranged over 3-16 epochs between seeds, and a 3-epoch refit lost S F1 "
                                        "0.17.")
    members: int = Field(
        2, ge=1, le=8, description="Models the refit trains, each from its own initial weights and data order "
                                   "(seeds seed, seed + 7919, ...), whose class probabilities the saved model "
                                   "averages: the seed-to-seed spread shrinks, the cost per segment grows as many "
                                   "times. Two by default: on DS1 -> DS2 every intra-patient seed then reached "
                                   "macro F1 0.94 and S and V F1 rose (the README's figures). More than one needs "
                                   "refit; with refit: false the default is 1. Rhythm stores default to 1.")
    seed: int = Field(0, ge=0, description="Seed of weights, split (intra-patient) and loader order.")

    @model_validator(mode="before")
    @classmethod
    def _one_model_without_refit(cls, data: Any) -> Any:
        # Members are refit models: without a refit there is one model, unless members is asked for outright
        # (then the check below says why that cannot be).
        if isinstance(data, dict) and data.get("refit") is False and "members" not in data:
            return {**data, "members": 1}
        return data

    @field_validator("members")
    @classmethod
    def _members_need_refit(cls, members: int, info: ValidationInfo) -> int:
        if members > 1 and info.data.get("refit") is False:
            raise ValueError(f"{members} members need refit: true (the members are refit models)")
        return members
    shuffle_chunks: int = Field(16, ge=1, description="Zarr chunks per shuffle group (the shuffle buffer).")
    parallel_reads: int = Field(2, ge=1, description="Groups of chunks read concurrently.")
    bn_recalibration_batches: int = Field(
        0, ge=0, le=100000, description="Before each validation, recompute the batch-norm statistics over this many "
                                        "training batches with the epoch's final weights (precise BN); 0: off.")
    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="float16 compute: auto uses it when a GPU is visible.")
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the model function (e.g. width, dropout).")

    def __hash__(self) -> int:  # model_options is a dict: hash its frozen form
        return hash((type(self), _frozen(_plain(self))))


# ---------------------------------------------------------------------------------------------------------------------
# score


class DetectorSpec(_Config):
    """Parameters of ``pipeline.detect.detect_r_peaks``."""

    band_hz: tuple[_Hz, _Hz] = Field((5.0, 15.0), strict=False, description="Band-pass edges in Hz.")
    integration_s: float = Field(0.150, gt=0, le=1, description="Moving-window integration length.")
    refractory_s: float = Field(0.200, gt=0, le=2, description="Least time between two beats.")
    block_s: float = Field(3.0, gt=0, le=60, description="Block length of the local signal level.")
    threshold: float = Field(0.14, gt=0, le=1, description="Peak threshold as a fraction of the local level.")
    search_s: float = Field(
        0.075, gt=0, le=0.5, description="Half-width of the search for the R peak around an integrator peak.")
    fiducial_band_hz: tuple[_Hz, _Hz] = Field(
        (0.5, 40.0), strict=False, description="Band of the signal whose largest deflection near each detection is "
                                               "the reported R peak (the fiducial point).")
    searchback_threshold: float = Field(
        0.3, ge=0, le=1, description="Search back (Pan-Tompkins): in a gap longer than `searchback_gap` x the usual "
                                     "RR, the highest peak over this fraction of `threshold` is a beat; 0 turns it "
                                     "off. On MIT-BIH it finds 65 % of the beats missed without it (mostly small "
                                     "beats beside large ventricular ones) for 4 % more false detections.")
    searchback_gap: float = Field(
        1.5, gt=1, le=10, description="A gap this many times the usual RR (the smaller median of the 4 and of the "
                                      "64 intervals on each side) is searched again.")
    min_amplitude_mv: float = Field(
        0.1, ge=0, le=10, description="Least peak-to-peak deflection (mV) of the fiducial-band signal within "
                                      "`search_s` of a detection: noise on a flat line yields no beats. On the 48 "
                                      "MIT-BIH records no annotated beat is below 0.2 mV; 0 turns the floor off.")
    twave_s: float = Field(
        0.36, ge=0, le=1, description="T-wave rejection (Pan-Tompkins): a detection less than this many seconds "
                                      "after another whose largest slope (5-15 Hz signal, within `search_s`) is "
                                      "below `twave_slope` x the other's is a T wave, not a beat.")
    twave_slope: float = Field(
        0.5, ge=0, le=1, description="Slope ratio under which a detection within `twave_s` after another is a T "
                                     "wave; 0 turns it off. On MIT-BIH it removes 74 false detections for 10 "
                                     "missed beats; on Challenge 2017 normal recordings (300 Hz) detections within "
                                     "0.36 s of the one before go from 5.2 % to 2.8 %.")
    pwave_s: float = Field(
        0.30, ge=0, le=1, description="P-wave rejection: a detection less than this many seconds before another whose "
                                      "largest slope is below `pwave_slope` x the other's is a P wave, not a beat.")
    pwave_slope: float = Field(
        0.8, ge=0, le=1, description="Slope ratio under which a detection within `pwave_s` before another is a P "
                                     "wave; 0 turns it off. On MIT-BIH it removes 350 false detections (260 of "
                                     "them 108's P waves, 0.4-0.9 x as steep as their R, median 0.56: hence not "
                                     "half) for 12 missed beats.")

    @field_validator("band_hz", "fiducial_band_hz")
    @classmethod
    def _low_below_high(cls, band: tuple[float, float]) -> tuple[float, float]:
        if not band[0] < band[1]:
            raise ValueError(f"low edge {band[0]} must be below high edge {band[1]}")
        return band


class QualityConfig(_Config):
    """Parameters of the quality verdicts of ``score``: per record (``pipeline.quality``) and per segment
    (``pipeline.signal_quality``)."""

    records: Literal["refuse", "flag"] = Field(
        "refuse", description="Records a model must not score (no signal, too short, flat, sampled below the rate "
                              "the model needs, `accepted.min_fs_hz` in its metadata; pipeline.quality): `refuse` "
                              "fails them with stage `quality`, `flag` scores them anyway. Either way the verdict is "
                              "in the table.")
    segments: bool = Field(
        True, description="Judge every segment (a beat's neighbourhood, a rhythm window) with signal-quality indices "
                          "(pipeline.signal_quality): a segment that fails one keeps its probabilities, but its "
                          "predicted class is the unreadable one (`Q` for beats, `~` for rhythm models that have it) "
                          "and the store's `quality` variable says which index it failed. false: no segment is "
                          "judged.")
    neighbourhood_s: float = Field(
        3.0, gt=0, le=60, description="Seconds of signal centred on each beat that its indices are computed over "
                                      "(rhythm windows: the window itself).")
    max_missing: float = Field(0.2, ge=0, le=1, description="Largest share of missing (NaN) samples.")
    flat_mv: float = Field(0.02, ge=0, description="Least RMS (mV) of the 0.5-40 Hz signal: below it, a flat line.")
    max_saturated: float = Field(
        0.05, ge=0, le=1, description="Largest share of samples on the signal's extreme values (clipping).")
    min_bas_sqi: float = Field(
        -1.0, ge=-1, le=1, description="Least basSQI, 1 - (power below 1 Hz) / (power 0-40 Hz): baseline wander; "
                                       "-1 turns it off.")
    min_kurtosis: float = Field(
        2.5, ge=0, description="Least kurtosis of the 0.5-40 Hz signal (ECG: 5-35; Gaussian noise: 3); 0 turns it "
                               "off.")
    p_sqi: tuple[float, float] = Field(
        (0.0, 10.0), strict=False, description="Range of pSQI, (power 5-15 Hz) / (power 5-40 Hz); [0, 10] turns it off.")
    min_snr_db: float | None = Field(
        12.0, ge=-60, le=60, description="Beats: least local signal-to-noise ratio, dB (the MIT-BIH Noise Stress "
                                         "Test's definition: the median QRS amplitude against the 5-40 Hz power "
                                         "between QRS complexes of the neighbourhood); null turns it off.")


class ScoreConfig(_Config):
    """Everything the scoring job needs besides the model, input and output.

    The beat window and STFT are not here: they come from the model, so scoring
    cannot use other settings than the model was trained with.
    """

    leads: tuple[_Name, ...] | None = _leads_field(
        "Signal names to score, best first; null takes the preferred leads of the model's training database.")
    lead_fallback: Literal["fail", "first"] = Field(
        "first", description="When a record has none of `leads`: `first` scores its first signal with a recognised "
                             "ECG lead name (records.is_ecg_lead: MLII, II, V1-V6, aVF, ECG1...; the summary says "
                             "which) and fails a record without one (PLETH, ABP, RESP are never scored unless `leads` "
                             "names them), `fail` marks it failed.")
    detector: DetectorSpec = Field(
        default_factory=DetectorSpec, description="R-peak detector (pipeline.detect.DetectorSpec).")
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="Quality verdicts per record and per segment; the string "
                                                   "`refuse` or `flag` (earlier configurations) sets `records`.")
    piece_s: float = Field(
        1800.0, ge=60, description="Records of 1.5 x this many seconds or more are scored in equal pieces of "
                                   "about this length, one task each.")
    rhythm_hop_s: float | None = Field(
        None, gt=0, le=86400, description="Rhythm models: seconds between window starts (the last window ends at "
                                          "the record's end); null: the hop the model was trained with. The window "
                                          "length is the model's.")
    batch_size: int = Field(4096, ge=1, le=1048576, description="Segments (beats, windows) per model call.")
    match_tolerance_s: float = Field(
        0.150, gt=0, le=1, description="Largest distance between a detected and a reference beat that still counts "
                                       "as a match (EC57: 0.150 s).")
    chunk_size: int = Field(65536, ge=256, le=16777216, description="Beats per Zarr chunk of the scores store.")
    max_archive_bytes: int = Field(8 * 2**30, ge=1, description="Largest total size an input archive may expand to.")
    flush_s: float = Field(2.0, ge=0, description="Seconds between commits of finished records to the store.")
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    @model_validator(mode="before")
    @classmethod
    def _quality_shorthand(cls, data: Any) -> Any:
        # `quality: refuse` (the key's meaning before segments were judged) is the records' verdict.
        if isinstance(data, dict) and isinstance(data.get("quality"), str):
            data = {**data, "quality": {"records": data["quality"]}}
        return data

    def fingerprint(self) -> str:
        """SHA-256 of the keys that change which beats are found and how they are scored."""
        d = self.to_dict()
        content = {k: d[k] for k in ("leads", "lead_fallback", "detector", "match_tolerance_s", "quality")}
        if self.rhythm_hop_s is not None:  # only when set: stores scored before it existed keep their fingerprint
            content["rhythm_hop_s"] = self.rhythm_hop_s
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# reading configurations, and what is wrong with them


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys the mapping at ``loc`` may hold, or None when ``loc`` is not a section of ``model``."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return list(model.model_fields)


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
}


def _reason(error: Any, model: type[BaseModel]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        allowed = _section_keys(model, error["loc"][:-1])
        return "unknown key" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_kind(value)}" + ("" if value is None else f" {_shown(value)}")
    if kind == "literal_error":
        return f"{_shown(value)} is not one of {ctx['expected']}"
    bounds = {"greater_than_equal": ("ge", "is less than the minimum of"),
              "greater_than": ("gt", "must be greater than"),
              "less_than_equal": ("le", "is greater than the maximum of"),
              "less_than": ("lt", "must be less than")}
    if kind in bounds:
        key, words = bounds[kind]
        return f"{_shown(value)} {words} {_number(ctx[key])}"
    if kind == "too_short":
        return f"expected at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    if kind == "too_long":
        return f"expected at most {ctx['max_length']} item(s), got {ctx['actual_length']}"
    if kind == "missing":
        return "missing item" if isinstance(error["loc"][-1], int) else "missing"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return f"{error['msg']} (got {_shown(value)})"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem, each naming the key path (``stft.nperseg``, ``leads[0]``)."""
    errors = exc.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    # A list with a bad item also fails its length check "after validation": report the item only.
    errors = [e for e in errors if not (e["type"] in ("too_short", "too_long") and any(
        len(other) > len(e["loc"]) and other[:len(e["loc"])] == tuple(e["loc"]) for other in locs))]
    lines = [f"{_path(tuple(e['loc']))}: {_reason(e, model)}" for e in errors]
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)


def _validated(model: type[_Config], data: Any) -> Any:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"configuration must be a mapping, got {_kind(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model)) from None


def config_from_dict(data: dict[str, Any] | None) -> PreprocessConfig:
    """Validate ``data`` (as read from YAML) and build a ``PreprocessConfig``.

    Raises
    ------
    ConfigError
        Naming the offending key and why it is wrong.
    """
    return _validated(PreprocessConfig, data)


def train_config_from_dict(data: dict[str, Any] | None) -> TrainConfig:
    """Validate ``data`` (as read from YAML) and build a ``TrainConfig``."""
    return _validated(TrainConfig, data)


def score_config_from_dict(data: dict[str, Any] | None) -> ScoreConfig:
    """Validate ``data`` (as read from YAML) and build a ``ScoreConfig``."""
    return _validated(ScoreConfig, data)


#: Training defaults of a rhythm store where they differ from TrainConfig's own (the beat ones):
#: the configuration of the Challenge 2017 figures in docs/results.md. A file or an option overrides them.
TASK_TRAIN_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "beat": MappingProxyType({}),
    "rhythm": MappingProxyType({"model": "rhythm-cnn", "epochs": 40, "batch_size": 32, "learning_rate": 1e-3,
                                "lr_patience": 3, "patience": 8, "shuffle_chunks": 64,
                                "bn_recalibration_batches": 64, "refit": False, "members": 1,
                                "class_weighting": "sqrt"}),
})


def merged(defaults: Any, data: Any) -> Any:
    """``data`` over ``defaults``: mappings merge key by key, anything else in ``data`` wins."""
    if isinstance(defaults, dict) and isinstance(data, dict):
        return {**defaults, **{k: merged(defaults.get(k), v) for k, v in data.items()}}
    return defaults if data is None else data


def load_config(path: str | Path | None, defaults: dict[str, Any] | None = None,
                storage_options: Mapping[str, Any] | None = None) -> PreprocessConfig:
    """Read a preprocess YAML configuration file (a path or fsspec URL) over ``defaults`` (a database's; ``None``
    file: the defaults)."""
    return _load_yaml(path, lambda data: config_from_dict(merged(dict(defaults or {}), data)), storage_options)


def load_train_config(path: str | Path | None, task: str | None = "beat", *,
                      storage_options: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Read a training YAML file over the defaults of a store of ``task`` (None: TrainConfig's own, the beat
    ones); non-None ``overrides`` win."""
    changes = {k: v for k, v in overrides.items() if v is not None}

    def build(data: Any) -> TrainConfig:
        data = merged(dict(TASK_TRAIN_DEFAULTS.get(task, {})), data)
        return train_config_from_dict({**data, **changes} if isinstance(data, dict) else data)

    return _load_yaml(path, build, storage_options)


def load_score_config(path: str | Path | None, storage_options: Mapping[str, Any] | None = None) -> ScoreConfig:
    """Read a scoring YAML configuration file (``None`` gives the defaults)."""
    return _load_yaml(path, score_config_from_dict, storage_options)


def _load_yaml(path, from_dict, storage_options: Mapping[str, Any] | None = None):
    if path is None:
        return from_dict(None)
    from .locations import locate

    path = locate(path, storage_options)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else str(exc)
        raise ConfigError(f"config file {path} is not valid YAML: {where}") from None
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------
# the JSON schemas, generated from the models above

_SCHEMA_ROOT = "https://github.com/ecg-pipeline/ecg-pipeline/schemas/"
_SCHEMAS: dict[str, tuple[type[_Config], str, str]] = {  # file name: model, title, description
    "preprocess-config.schema.json": (
        PreprocessConfig, "ecg-pipeline preprocess configuration",
        "YAML given to `ecg-pipeline preprocess --config`. Every key is optional; "
        "`ecg-pipeline preprocess DB --print-config` prints the defaults."),
    "train-config.schema.json": (
        TrainConfig, "ecg-pipeline train configuration",
        "YAML given to `ecg-pipeline train --config`. Every key is optional; `ecg-pipeline train --print-config` "
        "prints the defaults (the configuration the README's figures come from)."),
    "score-config.schema.json": (
        ScoreConfig, "ecg-pipeline score configuration",
        "YAML given to `ecg-pipeline score --config`. Every key is optional; `ecg-pipeline score --print-config` "
        "prints the defaults. The beat window and STFT parameters are not configurable here: they travel with the "
        "model."),
}

# Keywords first in this order (the rest after them, alphabetically); the names under "properties" keep field order.
_KEY_ORDER = ["$schema", "$id", "title", "description", "type", "enum", "anyOf", "items", "prefixItems", "minItems",
              "maxItems", "minLength", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
              "additionalProperties", "default", "properties"]


class _NoFieldTitles(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace each ``$ref`` by the section it names (sections are used once: the files read top to bottom)."""
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        section = {k: v for k, v in defs[node["$ref"].rsplit("/", 1)[-1]].items() if k != "title"}
        # The field's own description wins over the section's docstring; the section's keys carry the defaults.
        node = {**section, **{k: v for k, v in node.items() if k not in ("$ref", "default")}}
    return {k: (v if k == "default" else _inline(v, defs)) for k, v in node.items()}


def _ordered(node: Any, properties: bool = False) -> Any:
    if isinstance(node, list):
        return [_ordered(v) for v in node]
    if not isinstance(node, dict):
        return node
    if properties:  # field names: declaration order
        return {k: _ordered(v) for k, v in node.items()}
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    keys = sorted(node, key=lambda k: (rank.get(k, len(rank) - 2), k))  # unknown keywords before default/properties
    return {k: (node[k] if k == "default" else _ordered(node[k], properties=k == "properties")) for k in keys}


def json_schemas() -> dict[str, dict[str, Any]]:
    """``{file name: JSON schema}`` of the three configurations, as committed in ``schemas/``."""
    out = {}
    for name, (model, title, description) in _SCHEMAS.items():
        schema = model.model_json_schema(schema_generator=_NoFieldTitles)
        defs = schema.pop("$defs", {})
        schema = _inline(schema, defs)
        schema.update({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": _SCHEMA_ROOT + name,
                       "title": title, "description": description})
        out[name] = _ordered(schema)
    return out


def render_schema(schema: dict[str, Any]) -> str:
    """The text of a schema file: two-space indents, and a schema that fits in 120 columns on one line."""

    def render(node: Any, indent: int, prefix: int = 0) -> str:  # prefix: columns the key took on this line
        flat = json.dumps(node, ensure_ascii=False)
        if not isinstance(node, (dict, list)) or not node or (
                indent + prefix + len(flat) <= 120 and not (isinstance(node, dict) and "properties" in node)):
            return flat
        pad = " " * (indent + 2)
        if isinstance(node, list):
            items = [pad + render(v, indent + 2) for v in node]
        else:
            items = [f"{pad}{json.dumps(k)}: {render(v, indent + 2, len(json.dumps(k)) + 2)}" for k, v in node.items()]
        return ("[" if isinstance(node, list) else "{") + "\n" + ",\n".join(items) + "\n" + " " * indent + (
            "]" if isinstance(node, list) else "}")

    return render(schema, 0) + "\n"


def write_schemas(folder: str | Path | None = None, check: bool = False) -> list[str]:
    """Write ``json_schemas()`` into ``folder`` (default: the package's ``schemas/``); return the files that changed.

    With ``check``, write nothing and return the files that are out of date.
    """
    if folder is None:
        from .. import schemas

        folder = Path(schemas.__file__).parent
    folder = Path(folder)
    changed = []
    for name, schema in json_schemas().items():
        path, text = folder / name, render_schema(schema)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            changed.append(name)
            if not check:
                path.write_text(text, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecg_pipeline.pipeline.config",
                                     description="Generate the configuration JSON schemas from the config models.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write-schemas", action="store_true", help="(re)write schemas/*-config.schema.json")
    what.add_argument("--check-schemas", action="store_true", help="exit 1 if a committed schema file is out of date")
    parser.add_argument("--folder", help="write into this folder instead of the package's schemas/")
    args = parser.parse_args(argv)
    changed = write_schemas(args.folder, check=args.check_schemas)
    verb = "out of date" if args.check_schemas else "written"
    print("\n".join(f"{name}: {verb}" for name in changed) or "schemas up to date")
    return 1 if args.check_schemas and changed else 0


if __name__ == "__main__":
    sys.exit(main())
