"""The scoring job: a trained beat or rhythm model + an archive of ECG records -> per-beat (per-window) scores in Zarr.

Composed from the stages in ``pipeline``:

1. ``sources.resolve_source`` (driver) turns ``--input`` into a record source
   (a folder, an extracted archive, any fsspec folder, a PhysioNet database), and
   one task lists its records (``prepare``) where the source is reachable.
2. ``score_record`` (one task per record): fetch the record (``sources``), read
   its header and one lead (``records``), find R peaks (``detect``), cut windows
   (``segment``), compute spectrograms with the model's own STFT parameters
   (``spectrogram``) and score them with the model, which a ``ModelPlugin``
   loaded once on each worker. With reference annotations, detections are matched
   to reference beats within 150 ms (``detect.match_beats``). Records longer than
   1.5 x ``piece_s`` (``plan_pieces``) come back as a list of pieces, and one task scores each.
3. The driver commits finished records to the scores store (``scores``) every
   ``flush_s`` seconds; records already in the store are skipped by a re-run.

Nothing in the driver imports TensorFlow: the model is checked statically here and
loaded in Keras safe mode on the workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from distributed import Client, WorkerPlugin, as_completed, get_worker

from .. import pipeline
from .common import NoProgress, Timer, cache_root, prepare_source
from ..pipeline import extract, lease, models, quality, records, rr, scores, sources, spectrogram, tables, template
from ..pipeline.config import ScoreConfig
from ..pipeline.databases import DATABASES
from ..pipeline.download import RetryPolicy
from ..pipeline import labels as labels_mod
from ..pipeline.errors import PipelineError, RecordError
from ..pipeline.evaluate import classification_metrics

log = logging.getLogger(__name__)

#: Signal read on each side of a piece, so the detector (its search back looks 64 intervals each way) and
#: the windows see the context the whole record gives.
MARGIN_S = 60.0


def _input_spec(path, inp: Mapping[str, Any], inputs: tuple[str, ...], name: str, cls, what: str):
    """``cls.from_attrs`` of the metadata of model input ``name`` (None if the model does not take it)."""
    if name not in inputs:
        return None
    try:
        return cls.from_attrs(inp.get(name) or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise models.ModelError(f"{path}: {what} ({type(exc).__name__}: {exc}); refused") from None


@dataclass(frozen=True)
class ModelInfo:
    """What scoring needs to know of a model, read from its ``ecg_pipeline.json`` (no TensorFlow)."""

    path: str
    sha256: str
    spec: spectrogram.SpectrogramSpec
    classes: tuple[str, ...]
    input_dtype: str
    label_map: Mapping[str, str]
    database: str
    leads: tuple[str, ...]
    annotator: str
    task: str = "beat"
    window_s: float = 0.0  #: rhythm: window length (the model's input)
    hop_s: float = 0.0  #: rhythm: seconds between window starts the model was trained with
    min_s: float = 0.0  #: rhythm: shortest recording the model's store kept
    challenge_classes: tuple[str, ...] = ()
    min_fs: float = 0.0  #: the lowest sampling rate the model was trained for (metadata ``accepted``; else its store's)
    inputs: tuple[str, ...] = ("spectrogram",)  #: the store variables the network takes, by input name
    rr_spec: rr.RRSpec | None = None  #: how its RR features are computed (models that take ``rr``)
    template_spec: template.TemplateSpec | None = None  #: how its templates are made (models that take ``template``)

    @property
    def margin_s(self) -> float:
        """Signal read on each side of a piece: the detector's context, and the RR features' reach."""
        # A template's neighbours: 2 x beats on a side near an end, at most a 3 s interval each (rr.RRSpec.max_rr_s).
        reach = 2 * self.template_spec.beats * 3.0 if self.template_spec is not None else 0.0
        return MARGIN_S + max(self.rr_spec.reach_s if self.rr_spec is not None else 0.0, reach)

    def batch(self, seg: "extract.DetectedSegments") -> Any:
        """The network's input for detected beats: the spectrograms, with their RR features by name."""
        x = seg.spectrogram.astype(self.input_dtype)
        if len(self.inputs) == 1:
            return x
        out = {"spectrogram": x, "rr": seg.rr}
        if "template" in self.inputs:
            out["template"] = seg.template.astype(self.input_dtype)
        return {k: out[k] for k in self.inputs}

    def dummy(self, n: int) -> Any:
        """A batch of ``n`` zero segments (to trace the network)."""
        x = np.zeros((n, self.spec.n_freq, self.spec.n_time), dtype=self.input_dtype)
        if len(self.inputs) == 1:
            return x
        n_rr = len(self.rr_spec.features) if self.rr_spec is not None else 0
        out = {"spectrogram": x, "rr": np.zeros((n, n_rr), np.float32), "template": x}
        return {k: out[k] for k in self.inputs}

    @property
    def min_seconds(self) -> float:
        """The shortest record the model can say anything of: a rhythm model's shortest recording, a beat window."""
        return self.min_s if self.task == "rhythm" else (self.spec.n_before + self.spec.n_after) / self.spec.fs

    @classmethod
    def read(cls, path: str | Path) -> "ModelInfo":
        """Check ``path`` (``models.check_archive``) and read its metadata.

        Raises
        ------
        models.ModelError
            Not a safe ``.keras`` archive, not a beat model, or no pipeline metadata.
        """
        meta = models.check_archive(path)
        if not meta:
            raise models.ModelError(f"{path}: has no ecg_pipeline.json metadata (not saved by `ecg-pipeline train`), "
                                    "so the window and STFT it was trained with are unknown; refused")
        task = meta.get("task")
        if task not in ("beat", "rhythm"):
            raise models.ModelError(f"{path}: a {task!r} model; `score` scores beat and rhythm models")
        st = meta.get("store") or {}
        sp = st.get("spectrogram")
        if not sp:
            raise models.ModelError(f"{path}: its ecg_pipeline.json lacks the spectrogram parameters of the store "
                                    "it was trained on; refused")
        spec = spectrogram.SpectrogramSpec.from_attrs(sp)
        declared = (meta.get("input") or {}).get("shape")
        if declared is not None and tuple(declared) != (spec.n_freq, spec.n_time):
            raise models.ModelError(f"{path}: its metadata's STFT gives windows of {(spec.n_freq, spec.n_time)}, its "
                                    f"input shape says {tuple(declared)}; metadata and network disagree, refused")
        ls = st.get("label_source") or {}
        rhythm = {} if task == "beat" else {
            "window_s": (spec.n_before + spec.n_after) / spec.fs, "hop_s": float(ls.get("hop_s", 0) or 0),
            "min_s": float(ls.get("min_s", 0) or 0), "challenge_classes": tuple(meta.get("challenge_classes") or ())}
        if task == "rhythm" and not rhythm["hop_s"]:
            rhythm["hop_s"] = rhythm["window_s"]
        db = DATABASES.get(st.get("database", ""))
        pre = st.get("preprocess_config") or {}
        leads = tuple(pre.get("leads") or (db.leads if db else ()))
        inp = meta.get("input") or {}
        inputs = tuple(inp.get("variables") or ("spectrogram",))
        rr_spec = _input_spec(path, inp, inputs, "rr", rr.RRSpec, "takes RR features but its metadata does not say how "
                              "they are computed")
        template_spec = _input_spec(path, inp, inputs, "template", template.TemplateSpec, "takes neighbour templates but "
                                    "its metadata does not say how they are made")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return cls(path=str(path), sha256=digest, spec=spec, classes=tuple(meta["classes"]),
                   input_dtype=meta.get("input", {}).get("dtype", "float32"), label_map=dict(st.get("label_map") or {}),
                   database=st.get("database", ""), leads=leads, annotator=db.annotator if db else "atr",
                   task=task, min_fs=float((meta.get("accepted") or {}).get("min_fs_hz") or spec.fs),
                   inputs=inputs, rr_spec=rr_spec, template_spec=template_spec, **rhythm)


# Models this worker process loaded, by (sha256, threads), the most recent last. Loading and tracing cost
# ~0.3 s a worker, 10-15 % of a warm run over MIT-BIH; the bytes are checked by their sha256, so a hit
# is the very model. Only the last two are kept: a long-lived cluster that scores with many models
# holds two in memory, not all of them.
_LOADED: "OrderedDict[tuple[str, int], tuple[Any, str]]" = OrderedDict()
_KEEP_LOADED = 2


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker (Keras safe mode), for every task of the job.

    The plugin carries the model file's bytes, so workers need no access to the
    driver's disk; a worker that joins (or restarts) later gets it too. A worker that
    loaded the same model (same sha256) for an earlier job reuses it (``_LOADED``).
    """

    def __init__(self, info: ModelInfo):
        self.name = f"ecg-pipeline-model-{info.sha256[:16]}"
        self.info = info
        self.payload = Path(info.path).read_bytes()
        self.model = None
        self.load_id = ""

    async def setup(self, worker) -> None:
        # Importing TensorFlow and loading take seconds: off the worker's event loop, so heartbeats go on.
        await asyncio.get_running_loop().run_in_executor(None, self._load, worker)

    def _load(self, worker) -> None:
        _limit_tf_threads(worker.state.nthreads)
        key = (self.info.sha256, worker.state.nthreads)
        if key in _LOADED:  # a warm worker scoring again with the same model: no new load and trace
            _LOADED.move_to_end(key)
            self.model, self.load_id = _LOADED[key]
            return
        folder = Path(getattr(worker, "local_directory", None) or tempfile.gettempdir())
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / "model.keras"
            path.write_bytes(self.payload)
            if hashlib.sha256(self.payload).hexdigest() != self.info.sha256:
                raise models.ModelError(f"{self.info.path}: bytes changed in transit")
            try:
                self.model, _ = models.load_model(path)
            except models.ModelError as exc:  # name the user's file, not this worker's copy
                raise models.ModelError(str(exc).replace(str(path), self.info.path)) from None
        self.load_id = f"{worker.address}/{os.getpid()}/{time.time_ns()}"  # one per load, for the report
        # Trace the model for a full and a smaller batch now: TensorFlow then generalises the batch
        # dimension, so records of any length do not retrace it (about 1 s each) during the job.
        for n in ((256, 255) if self.info.task == "beat" else (16, 15)):  # rhythm windows are ~100x larger
            self.model.predict_on_batch(self.info.dummy(n))
        _LOADED[key] = (self.model, self.load_id)
        while len(_LOADED) > _KEEP_LOADED:
            _LOADED.popitem(last=False)

    def teardown(self, worker) -> None:
        self.model = None

    def predict(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return predict(self.model, x, batch_size)


def _limit_tf_threads(n: int) -> None:
    """One TensorFlow thread pool per worker thread: two workers on two cores must not each take both."""
    with models.quiet_native_stderr():
        import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(int(n), 1))
        tf.config.threading.set_inter_op_parallelism_threads(max(int(n), 1))
    except RuntimeError:
        pass  # TensorFlow already ran in this process: its pools are fixed


def predict(model, x: Any, batch_size: int) -> np.ndarray:
    """Class probabilities of ``x`` (an array, or arrays by input name) in batches (``predict_on_batch``: no
    per-call dataset set-up)."""
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if not n:
        return np.zeros((0, model.output_shape[-1]), np.float32)

    def part(i: int):
        return {k: v[i:i + batch_size] for k, v in x.items()} if isinstance(x, dict) else x[i:i + batch_size]

    return np.concatenate([np.asarray(model.predict_on_batch(part(i)), dtype=np.float32)
                           for i in range(0, n, batch_size)])


@dataclass(frozen=True)
class ScoreContext:
    """What every task needs; small and picklable (the source travels as a scattered future)."""

    info: ModelInfo
    config: ScoreConfig
    annotator: str | None  #: annotation extension to compare with, None for no comparison
    require_reference: bool  #: --annotations given explicitly
    cache_dir: str | None
    plugin: str
    labels: Mapping[str, str] = field(default_factory=dict)  #: rhythm: record -> reference class (a label table)

    @property
    def policy(self) -> RetryPolicy:
        return self.config.download  # the download section is the retry policy

    def cache(self) -> Path:
        return cache_root(self.cache_dir)

    def leads(self) -> tuple[str, ...]:
        return self.config.leads or self.info.leads


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of a record (native sampling rate): one task's share of a long record."""

    record: str
    index: int
    n_pieces: int
    start: int
    stop: int


#: Fewest samples a piece holds, whatever ``piece_s`` and the sampling rate (a 1/60 Hz trend is one piece).
MIN_PIECE_SAMPLES = 1024
#: Most pieces one record is split into: beyond, pieces grow longer than ``piece_s`` instead.
MAX_PIECES = 1024


def plan_pieces(record: str, sig_len: int, fs: float, piece_s: float) -> list[Piece]:
    """The pieces a record of ``sig_len`` samples is scored in, one task each; ``[]``: one task for the whole record.

    Bounded by design: equal pieces of about ``piece_s`` seconds (from 2/3 to 3/2 of it), but at least
    ``MIN_PIECE_SAMPLES``, and at most ``MAX_PIECES`` of them (then longer ones);
    ``sig_len`` is the length ``records.read_header`` checked against the signal files.
    """
    piece_len = max(int(piece_s * fs) if np.isfinite(piece_s * fs) else 0, MIN_PIECE_SAMPLES)
    # As many pieces as piece_len fits, rounded: a record a little over piece_s is one task, not one plus a
    # sliver that costs its margins (a 30 min 5 s MIT-BIH record was 30 min + 5 s + 2 margins of 5 min).
    n = min(int(round(sig_len / piece_len)), MAX_PIECES)
    if n <= 1:
        return []
    piece_len = -(-sig_len // n)
    n = -(-sig_len // piece_len)
    return [Piece(record, i, n, i * piece_len, min((i + 1) * piece_len, sig_len)) for i in range(n)]


@dataclass
class SpanScores:
    """Beats found and scored in one piece."""

    sample: np.ndarray  #: scored R peaks (record samples)
    probability: np.ndarray
    detected: np.ndarray  #: every R peak the piece owns, scored or not
    n_dropped_edge: int
    n_dropped_invalid: int
    seconds: dict[str, float] = field(default_factory=dict)


def score_span(x: np.ndarray, fs: float, first: int, start: int, stop: int, info: ModelInfo, config: ScoreConfig,
               predict_fn: Callable[[np.ndarray], np.ndarray], mv_per_unit: float | None = 1.0) -> SpanScores:
    """Detect, window, transform and score the beats of ``[start, stop)``.

    Parameters
    ----------
    x
        The lead, record samples ``[first, first + len(x))`` at ``fs``, with margin
        around ``[start, stop)`` where the record has it.
    info
        The model: its sampling rate, window and STFT (``x`` is resampled to its rate).
    predict_fn
        Spectrograms (model input dtype) -> probabilities.
    mv_per_unit
        Millivolts per unit of ``x`` (the lead's units), for the detector's amplitude floor.
    """
    seg = extract.detected_segments(x, fs, first, start, stop, info.spec, config.detector, mv_per_unit, info.rr_spec,
                                    info.template_spec)
    timer = Timer()
    with timer("model"):
        prob = predict_fn(info.batch(seg))
    return SpanScores(seg.anchor, prob, seg.detected, seg.n_dropped_edge, seg.n_dropped_invalid,
                      {**seg.seconds, **timer.seconds})


@dataclass
class PieceResult:
    """One task's result: the scores of a piece, or the pieces a long record splits into."""

    record: str
    piece: int = 0
    split: list[Piece] = field(default_factory=list)  #: non-empty: score these pieces instead
    scores: scores.RecordScores | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    model_load: str = ""  #: which load of the model scored it (worker, process, time)
    lead_stats: quality.LeadStats | None = None  #: a piece's share of the lead, for the record's quality verdict
    mv_per_unit: float | None = 1.0  #: the lead's units in mV (``quality.mv_per_unit``)


def score_windows(x: np.ndarray, fs: float, first: int, anchor: np.ndarray, sig_len: int, info: ModelInfo,
                  predict_fn: Callable[[np.ndarray], np.ndarray]) -> SpanScores:
    """Transform and score the rhythm windows starting at ``anchor`` (``x``: record samples from ``first``)."""
    seg = extract.window_segments(x, fs, first, anchor, sig_len, info.spec)
    timer = Timer()
    with timer("model"):
        prob = predict_fn(seg.spectrogram.astype(info.input_dtype))
    return SpanScores(seg.anchor, prob, np.asarray(anchor, np.int64), 0, seg.n_dropped_invalid,
                      {**seg.seconds, **timer.seconds})


def _score_rhythm(ctx: ScoreContext, local: sources.LocalRecord, header: records.Header, lead: records.Lead,
                  piece: Piece | None, out: PieceResult, result: scores.RecordScores) -> None:
    """The rhythm side of ``score_record``: fixed windows over the record (or a piece's share of them)."""
    info, record = ctx.info, header.record
    if header.sig_len <= 0:
        raise RecordError(record, "signal", "the record holds no samples")
    if header.sig_len < info.min_s * header.fs:
        raise RecordError(record, "signal", f"{header.sig_len / header.fs:.2f} s long, shorter than the "
                                            f"{info.min_s:g} s the model's recordings had at least")
    hop_s = ctx.config.rhythm_hop_s or info.hop_s
    anchor = extract.record_windows(header.sig_len, header.fs, info.window_s, hop_s)
    if piece is None and (split := plan_pieces(record, header.sig_len, header.fs, ctx.config.piece_s)):
        out.split = split
        return
    if piece is not None:
        anchor = anchor[(anchor >= piece.start) & (anchor < piece.stop)]
    t0 = time.perf_counter()
    n_win = int(round(info.window_s * header.fs))
    first, last = (int(anchor[0]), min(int(anchor[-1]) + n_win, header.sig_len)) if len(anchor) else (0, 0)
    x = records.read_signal(local.base, header, lead, first, last) if len(anchor) else np.zeros(0, np.float32)
    read_s = time.perf_counter() - t0
    own = (piece.start, piece.stop) if piece is not None else (0, header.sig_len)
    _judge_now(ctx, header, lead, quality.LeadStats.of(x[max(own[0] - first, 0):max(min(own[1], last) - first, 0)]),
               piece, out, result)
    model = get_worker().plugins[ctx.plugin]
    out.model_load = model.load_id
    span = score_windows(x, header.fs, first, anchor, header.sig_len, info,
                         lambda s: model.predict(s, ctx.config.batch_size)) if len(anchor) else None
    result.probability = np.zeros((0, len(info.classes)), np.float32)  # a piece may own no window start
    if span is not None:
        result.anchor, result.probability = span.sample, span.probability
        result.n_detected, result.n_dropped_invalid = len(span.detected), span.n_dropped_invalid
        out.seconds = {"read": read_s, **span.seconds}
    result.reference_class = ctx.labels.get(record.rsplit("/", 1)[-1], "")
    result.reference = np.full(len(result.anchor), result.reference_class, dtype=object)
    if ctx.annotator and local.has(ctx.annotator):
        # Rhythm notes ((AFIB, (N, ...) of the record's annotations: each window's majority rhythm as a class.
        ann = records.read_annotations(local.base, record, ctx.annotator, header.fs)
        start, stop, rhythm = labels_mod.rhythm_intervals(ann.sample, ann.aux_note, header.sig_len)
        if len(rhythm):
            majority = labels_mod.window_majority(result.anchor, n_win, start, stop, rhythm)
            result.reference = labels_mod.rhythm_classes(majority, info.classes)
            result.reference_file = ctx.annotator
    elif ctx.require_reference and ctx.annotator:
        raise RecordError(record, "annotations", f"no {record}.{ctx.annotator} (asked for by --annotations)")


def judge(ctx: ScoreContext, result: scores.RecordScores, stats: quality.LeadStats,
          mv_per_unit: float | None) -> tuple[str, str]:
    """The quality verdict on a record's lead against what the model knows (``quality.record_quality``): its text,
    and the error that fails the record when it must not be scored (``""`` otherwise, or with ``quality: flag``)."""
    v = quality.record_quality(stats, result.fs, min_seconds=ctx.info.min_seconds, min_fs=ctx.info.min_fs,
                               mv_per_unit=mv_per_unit, lead=result.lead, lead_fallback=result.lead_fallback)
    refuse = v.refused and ctx.config.quality == "refuse"
    return v.text, f"quality: {v.text} (not scored; `quality: flag` scores it anyway)" if refuse else ""


def _judge_now(ctx: ScoreContext, header: records.Header, lead: records.Lead, stats: quality.LeadStats,
               piece: Piece | None, out: PieceResult, result: scores.RecordScores) -> None:
    """A whole record is judged before the model sees it; pieces carry their stats to ``merge_pieces``."""
    out.lead_stats = stats
    out.mv_per_unit = quality.mv_per_unit(header.units_of(lead))
    if piece is None:
        result.quality, refusal = judge(ctx, result, stats, out.mv_per_unit)
        if refusal:
            raise RecordError(header.record, "quality", refusal.removeprefix("quality: "))


def score_record(ctx: ScoreContext, source: sources.RecordSource, record: str, piece: Piece | None = None) -> PieceResult:
    """Task: score one record, or one piece of a long one. Record problems become ``scores.status``."""
    t0 = time.perf_counter()
    out = PieceResult(record, piece.index if piece else 0)
    result = scores.RecordScores(record, task=ctx.info.task)
    try:
        local = source.fetch(record, (ctx.annotator,) if ctx.annotator else (), ctx.cache(), ctx.policy)
        result.checksum = local.checksum
        header = records.read_header(local.base, record)  # checked against the files: no work for absent samples
        lead = records.choose_lead(header, ctx.leads(), ctx.config.lead_fallback)
        header = header.for_lead(lead)  # the lead's own rate (several samples per frame)
        result.lead, result.lead_fallback, result.fs, result.sig_len = lead.name, lead.fallback, header.fs, header.sig_len
        if ctx.info.task == "rhythm":
            _score_rhythm(ctx, local, header, lead, piece, out, result)
        else:
            _score_beats(ctx, local, header, lead, piece, out, result, t0)
    except RecordError as exc:
        result.status, result.error = "failed", f"{exc.stage}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - one bad record must not sink the job
        result.status, result.error = "failed", f"score: {type(exc).__name__}: {exc}"
        log.exception("record %s", record)
    if out.split:
        return out
    result.seconds = time.perf_counter() - t0
    out.scores = result
    return out


def _score_beats(ctx: ScoreContext, local: sources.LocalRecord, header: records.Header, lead: records.Lead,
                 piece: Piece | None, out: PieceResult, result: scores.RecordScores, t0: float) -> None:
    """The beat side of ``score_record``: detected R peaks of the record (or a piece of it)."""
    record = header.record
    if piece is None and (split := plan_pieces(record, header.sig_len, header.fs, ctx.config.piece_s)):
        out.split = split
        return
    start, stop = (piece.start, piece.stop) if piece else (0, header.sig_len)
    margin = int(ctx.info.margin_s * header.fs)
    first, last = max(start - margin, 0), min(stop + margin, header.sig_len)
    x = records.read_signal(local.base, header, lead, first, last)
    read_s = time.perf_counter() - t0  # fetch (a no-op for local and cached files), header, signal
    _judge_now(ctx, header, lead, quality.LeadStats.of(x[start - first:stop - first]), piece, out, result)
    model = get_worker().plugins[ctx.plugin]
    out.model_load = model.load_id
    span = score_span(x, header.fs, first, start, stop, ctx.info, ctx.config,
                      lambda s: model.predict(s, ctx.config.batch_size), out.mv_per_unit)
    result.anchor, result.probability = span.sample, span.probability
    result.n_detected, result.n_dropped_edge, result.n_dropped_invalid = (
        len(span.detected), span.n_dropped_edge, span.n_dropped_invalid)
    out.seconds = {"read": read_s, **span.seconds}
    result.reference = np.full(len(span.sample), "", dtype=object)
    if ctx.annotator and local.has(ctx.annotator):
        zone = extract.scoreable_zone(header.sig_len, header.fs, ctx.info.spec)
        m = extract.match_reference(local.base, record, ctx.annotator, ctx.info.label_map, start, stop,
                                    span.detected, span.sample, header.fs, ctx.config.match_tolerance_s, zone)
        result.reference, result.reference_file, result.n_reference = m.label, ctx.annotator, m.n_reference
        result.tp, result.fn, result.fp, result.n_reference_edge = m.tp, m.fn, m.fp, m.n_edge
    elif ctx.require_reference and ctx.annotator:
        raise RecordError(record, "annotations", f"no {record}.{ctx.annotator} (asked for by --annotations)")


def merge_pieces(parts: Sequence[PieceResult], refractory_s: float,
                 verdict: Callable[[scores.RecordScores, quality.LeadStats, float | None], tuple[str, str]] | None = None
                 ) -> scores.RecordScores:
    """One record's scores from its pieces (in order); a beat found on both sides of a cut is kept once.

    ``verdict`` turns the pieces' merged ``LeadStats`` into the record's quality text and, for a
    record that must not be scored, the error that fails it.
    """
    parts = sorted(parts, key=lambda p: p.piece)
    failed = [p.scores for p in parts if p.scores.status != "ok"]
    base = parts[0].scores
    text, refusal = ("", "")
    if verdict is not None and all(p.lead_stats is not None for p in parts):
        text, refusal = verdict(base, quality.LeadStats.merge([p.lead_stats for p in parts]), parts[0].mv_per_unit)
    if refusal and not failed:
        return scores.RecordScores(base.record, "failed", refusal, base.checksum, base.lead, base.lead_fallback,
                                   base.fs, base.sig_len, seconds=sum(p.scores.seconds for p in parts),
                                   task=base.task, quality=text)
    if failed:
        return scores.RecordScores(base.record, "failed", failed[0].error, base.checksum, base.lead, base.lead_fallback,
                                   base.fs, base.sig_len, seconds=sum(p.scores.seconds for p in parts),
                                   task=base.task)
    r = [p.scores for p in parts]
    sample = np.concatenate([s.anchor for s in r])
    # Only across cuts: within a piece the detector already keeps beats a refractory period apart.
    # Rhythm windows are shared out by their start, so no window is in two pieces.
    keep = np.ones(len(sample), bool)
    cuts = np.cumsum([len(s.anchor) for s in r])[:-1] if base.task == "beat" else []
    for c in cuts:
        if 0 < c < len(sample):
            j = c
            while j < len(sample) and sample[j] - sample[c - 1] < refractory_s * base.fs:
                keep[j] = False
                j += 1
    out = scores.RecordScores(
        base.record, "ok", "", base.checksum, base.lead, base.lead_fallback, base.fs, base.sig_len,
        anchor=sample[keep], probability=np.concatenate([s.probability for s in r])[keep],
        reference=np.concatenate([s.reference for s in r])[keep],
        n_detected=sum(s.n_detected for s in r) - int((~keep).sum()),
        n_dropped_edge=sum(s.n_dropped_edge for s in r), n_dropped_invalid=sum(s.n_dropped_invalid for s in r),
        reference_file=base.reference_file, n_reference=sum(s.n_reference for s in r),
        n_reference_edge=sum(s.n_reference_edge for s in r), tp=sum(s.tp for s in r),
        fn=sum(s.fn for s in r), fp=sum(s.fp for s in r), seconds=sum(s.seconds for s in r), task=base.task,
        reference_class=base.reference_class, quality=text)
    return out


@dataclass(frozen=True)
class ScoreRequest:
    """One run of the scoring job.

    Attributes
    ----------
    model
        ``model.keras`` written by ``ecg-pipeline train``.
    out
        Scores store (path or fsspec URL).
    input
        Folder, archive, or fsspec URL of records; or None with ``db``.
    source, db, version
        A PhysioNet-style database: ``<source>/<db>/<version>``.
    records
        Score only these records (names as the source lists them).
    annotations
        ``"auto"``: compare with the model database's annotation files where a
        record has one; an extension (``"atr"``): compare, and fail records that lack
        it; None: no comparison.
    summary
        Per-record table file (``.csv`` or ``.parquet``); None: ``<out stem>.records.csv``.
    work_dir
        Where archives are fetched and extracted; None: ``<cache>/archives``.
    """

    model: str
    out: str
    input: str | None = None
    source: str | None = None
    db: str | None = None
    version: str | None = None
    records: tuple[str, ...] | None = None
    annotations: str | None = "auto"
    config: ScoreConfig = field(default_factory=ScoreConfig)
    cache_dir: str | None = None
    work_dir: str | None = None
    summary: str | None = None
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None
    labels: str | None = None  #: rhythm: a ``record,label`` table of reference classes; None: REFERENCE.csv if present


@dataclass
class ScoreReport:
    """What a run did."""

    out: str
    summary: str
    input: str
    n_records: int
    n_scored: int  #: records scored by this run
    n_skipped: int  #: records already in the store
    failed: list[tuple[str, str]]
    beats_per_class: dict[str, int]
    n_beats: int
    n_beats_run: int  #: beats scored by this run
    reference: dict[str, Any] | None
    wall_s: float
    stage_s: dict[str, float]
    phase_s: dict[str, float] = field(default_factory=dict)  #: driver wall seconds: prepare, model_load, score, finish
    model_loads: int = 0  #: model loads that scored beats (one per worker process)
    task: str = "beat"
    records: list[dict[str, Any]] = field(default_factory=list)  #: the per-record table rows of this run's records
    classes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def beats_per_s(self) -> float:
        return self.n_beats_run / self.wall_s if self.wall_s else 0.0


def sidecar(out: str, suffix: str) -> str:
    """A file beside the store: ``scores.zarr`` -> ``scores<suffix>``."""
    stem = out.rstrip("/")
    return (stem[: -len(".zarr")] if stem.endswith(".zarr") else stem) + suffix


def summary_path(out: str, summary: str | None) -> str:
    """The per-record table's file: ``summary``, else ``<out stem>.records.csv``."""
    return summary or sidecar(out, ".records.csv")


def check_summary(path: str) -> None:
    """Refuse a summary file the job could not write, before any work is done."""
    tables.table_format(path)


def reference_metrics(ds_reference: np.ndarray, ds_predicted: np.ndarray, rows, classes: Sequence[str]) -> dict | None:
    """Detector sensitivity / positive predictivity (EC57 gross) and per-class metrics of matched beats."""
    with_ref = [r for r in rows if r["status"] == "ok" and r["reference"]]
    if not with_ref:
        return None
    tp = sum(int(r["tp"]) for r in with_ref)
    fn = sum(int(r["fn"]) for r in with_ref)
    fp = sum(int(r["fp"]) for r in with_ref)
    edge = sum(int(r.get("n_reference_edge", 0) or 0) for r in with_ref)  # rows of older stores lack it
    index = {c: i for i, c in enumerate(classes)}
    matched = ds_reference != ""
    y_true = np.array([index[c] for c in ds_reference[matched]], dtype=np.int64)
    y_pred = np.array([index[c] for c in ds_predicted[matched]], dtype=np.int64)
    cls = classification_metrics(y_true, y_pred, list(classes))
    return {
        "records": len(with_ref),
        "detector": {"tp": tp, "fn": fn, "fp": fp, "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
                     "positive_predictivity": tp / (tp + fp) if tp + fp else 0.0,
                     "tolerance_s": None, "edge_beats": edge},
        "classification": cls,
    }


def run_scoring(request: ScoreRequest, client: Client,
                progress: Callable[[str, int], Any] | None = None) -> ScoreReport:
    """Run the job on ``client``'s cluster; return its report.

    Record problems never raise (they are in the store's per-record table and the
    summary). Raises ``PipelineError`` for problems with the job as a whole: an unsafe
    model, an unreadable input, a store from another model, a store another live job
    writes (``lease.StoreBusy``). The store's lease (``pipeline.lease``) is held throughout.
    """
    with lease.hold(request.out, "score", storage_options=request.storage_options):
        return _run_scoring(request, client, progress)


def _run_scoring(request: ScoreRequest, client: Client, progress: Callable[[str, int], Any] | None) -> ScoreReport:
    t0 = time.perf_counter()
    progress = progress or (lambda desc, total: NoProgress())
    config = request.config
    info = ModelInfo.read(request.model)
    summary = summary_path(request.out, request.summary)
    check_summary(summary)
    policy = config.download
    source = sources.resolve_source(request.input, source=request.source, db=request.db, version=request.version,
                                    work_dir=request.work_dir, max_archive_bytes=config.max_archive_bytes,
                                    require_checksums=config.download.require_checksums)
    # "auto": the model database's beat annotations; for rhythm models the WFDB reference annotations (.atr),
    # whose rhythm notes are compared with the windows where a record has them.
    annotator = None if request.annotations is None else (
        (info.annotator if info.task == "beat" else "atr") if request.annotations == "auto" else request.annotations)
    plugin = ModelPlugin(info)

    attrs = _scores_attrs(request, info, source.description)
    # The source is listed where it is reachable (archives fetched and extracted there), then
    # shipped once to every worker.
    source, names, reference = _listed_records(client, source, request, policy, info)
    phase = {"prepare": time.perf_counter() - t0}
    # The store is opened (or created) only now: a refused input leaves none behind.
    writer = scores.ScoresWriter(request.out, attrs, info.classes, config.chunk_size, overwrite=request.overwrite,
                                 storage_options=request.storage_options)
    todo = [r for r in names if r not in writer.done]
    skipped = len(names) - len(todo)
    ctx = ScoreContext(info, config, annotator, request.annotations not in (None, "auto"), request.cache_dir,
                       plugin.name, reference)

    stage_s: Counter[str] = Counter()
    loads: set[str] = set()
    beats_run = 0
    if todo:
        try:
            t = time.perf_counter()
            # Every worker loads the model now; a refused model raises here (and is unregistered below,
            # so a long-lived cluster does not keep trying it on new workers).
            try:
                client.register_plugin(plugin)
            except Exception:
                writer.discard_if_new_and_empty()  # a refused model leaves no empty store behind
                raise
            phase["model_load"] = time.perf_counter() - t
            t = time.perf_counter()
            [src, ctx_f] = client.scatter([source, ctx], broadcast=True)  # ctx: once, a label table can be large
            beats_run = _score_records(client, ctx, ctx_f, src, todo, writer, progress("score records", len(todo)),
                                       stage_s, loads, t0)
        finally:
            try:
                client.unregister_worker_plugin(plugin.name)
            except Exception:  # noqa: BLE001 - the cluster may be going away
                log.debug("could not unregister %s", plugin.name)

        phase["score"] = time.perf_counter() - t
    # End of job: class counts, reference metrics over the whole store (earlier runs included).
    t = time.perf_counter()
    rows = list(writer.rows.values())  # the whole store: earlier runs over other records included
    failed = [(r["record"], r["error"]) for r in rows if r["status"] != "ok"]
    per_class = scores.segments_per_class(rows, info.classes)
    ref_metrics = None
    if info.task == "rhythm":
        ref_metrics = rhythm_reference_metrics(rows, info.classes, info.challenge_classes)
        annotated = rhythm_annotation_metrics(writer, rows, info.classes)
        if annotated:
            ref_metrics = {**(ref_metrics or {}), "rhythm_annotations": annotated}
    elif any(r["reference"] for r in rows):
        g = writer.group
        n = writer.n
        ref = np.asarray(g["reference"][:n], dtype=object)
        pred = np.asarray(g["predicted"][:n], dtype=object)
        ref_metrics = reference_metrics(ref, pred, rows, info.classes)
        ref_metrics["detector"]["tolerance_s"] = config.match_tolerance_s
    writer.finish({"complete": all(r in writer.rows for r in names), "segments_per_class": per_class,
                   "n_failed_records": len(failed), **({"reference_metrics": ref_metrics} if ref_metrics else {})})
    frame = scores.records_frame(rows, info.classes, info.task).sort_values("record", kind="stable")
    tables.write_table(frame, summary)
    if info.task == "rhythm":
        tables.write_table(_episodes_frame(writer, rows), sidecar(request.out, ".episodes.csv"))
    if ref_metrics:
        with _open_text(sidecar(request.out, ".metrics.json")) as f:
            json.dump(ref_metrics, f, indent=2)
    return ScoreReport(
        out=request.out, summary=summary, input=source.description, n_records=len(names), n_scored=len(todo),
        n_skipped=skipped, failed=failed, beats_per_class=per_class, n_beats=sum(int(r["n_segments"]) for r in rows),
        n_beats_run=beats_run, reference=ref_metrics, wall_s=time.perf_counter() - t0, stage_s=dict(stage_s),
        phase_s={**phase, "finish": time.perf_counter() - t}, model_loads=len(loads), task=info.task,
        records=[writer.rows[r] for r in names if r in writer.rows], classes=info.classes)


def rhythm_reference_metrics(rows, classes: Sequence[str], challenge_classes: Sequence[str]) -> dict | None:
    """Per-record metrics of a rhythm model against the records' reference classes, as ``evaluate`` gives them."""
    index = {c: i for i, c in enumerate(classes)}
    rated = [r for r in rows if r["status"] == "ok" and r.get("reference_class") in index and r.get("predicted")]
    if not rated:
        return None
    y_true = np.array([index[r["reference_class"]] for r in rated], dtype=np.int64)
    y_pred = np.array([index[r["predicted"]] for r in rated], dtype=np.int64)
    m = classification_metrics(y_true, y_pred, list(classes), list(challenge_classes))
    m.update(unit="record", aggregation="mean of the window probabilities per record")
    unknown = sorted({r["reference_class"] for r in rows if r.get("reference_class") and
                      r["reference_class"] not in index})
    return {"records": len(rated), "classification": m, "unknown_reference_classes": unknown}


def rhythm_annotation_metrics(writer: scores.ScoresWriter, rows, classes: Sequence[str],
                              rhythm: str = "A") -> dict | None:
    """Windows against the records' rhythm annotations (each window's majority rhythm, as a class).

    Per record: the share of time in ``rhythm`` (AF burden) from the model and from the reference, on the
    same window grid (``scores.time_shares``); over all records: ``rhythm`` episode sensitivity and positive
    predictivity (``evaluate.episode_agreement``) and per-window classification metrics.
    """
    from ..pipeline.evaluate import episode_agreement

    per_record, y_true, y_pred = {}, [], []
    counts = Counter()
    index = {c: i for i, c in enumerate(classes)}
    if not any(r["status"] == "ok" and r.get("reference") for r in rows):
        return None
    anchors, predictions, references = _segment_arrays(writer, "anchor", "predicted", "reference")
    for r in rows:
        if r["status"] != "ok" or not r.get("reference") or not int(r["n_segments"]):
            continue
        lo, hi = int(r["offset"]), int(r["offset"]) + int(r["n_segments"])
        anchor, pred, ref = anchors[lo:hi], predictions[lo:hi], references[lo:hi]
        sig_len, fs = int(r["sig_len"]), float(r["fs"])
        i = index[rhythm]
        have = ref != ""
        ref_filled = np.where(have, ref, "O")  # windows before the first rhythm note: not the rhythm
        per_record[r["record"]] = {
            "burden_model": float(scores.time_shares(anchor, pred, sig_len, classes)[i]),
            "burden_reference": float(scores.time_shares(anchor, ref_filled, sig_len, classes)[i])}
        ep = episode_agreement([(a, b) for a, b, c in scores.episodes(anchor, ref_filled, sig_len, fs) if c == rhythm],
                               [(a, b) for a, b, c in scores.episodes(anchor, pred, sig_len, fs) if c == rhythm])
        counts.update({k: ep[k] for k in ("n_reference", "n_predicted", "detected", "true")})
        y_true += [index[c] for c in ref[have]]
        y_pred += [index[c] for c in pred[have]]
    if not per_record:
        return None
    return {
        "rhythm": rhythm, "records": per_record,
        "episodes": {**dict(counts),
                     "sensitivity": counts["detected"] / counts["n_reference"] if counts["n_reference"] else None,
                     "positive_predictivity": counts["true"] / counts["n_predicted"] if counts["n_predicted"] else None},
        "windows": classification_metrics(np.array(y_true, np.int64), np.array(y_pred, np.int64), list(classes)),
        "grid": "per window: its majority rhythm note (N -> N, AFIB -> A, other rhythms -> O); "
                "each window owns the time until the next window starts",
    }


def _segment_arrays(writer: scores.ScoresWriter, *names: str) -> list[np.ndarray]:
    """Whole committed per-segment arrays, read once (one read per record would cost seconds per thousand)."""
    n = writer.n
    return [np.asarray(writer.group[name][:n], dtype=object if name != "anchor" else np.int64) for name in names]


def _episodes_frame(writer: scores.ScoresWriter, rows):
    """``record, start_s, end_s, class`` of every run of windows of one predicted class (``scores.episodes``)."""
    import pandas as pd

    out = []
    anchors, predictions = _segment_arrays(writer, "anchor", "predicted")
    for r in rows:
        if r["status"] != "ok" or not int(r["n_segments"]):
            continue
        lo, hi = int(r["offset"]), int(r["offset"]) + int(r["n_segments"])
        anchor, predicted = anchors[lo:hi], predictions[lo:hi]
        for start, end, c in scores.episodes(anchor, predicted, int(r["sig_len"]), float(r["fs"])):
            out.append({"record": r["record"], "start_s": round(start, 3), "end_s": round(end, 3), "class": c})
    return pd.DataFrame(out, columns=["record", "start_s", "end_s", "class"])


def _scores_attrs(request: ScoreRequest, info: ModelInfo, input_description: str) -> dict[str, Any]:
    config = request.config
    rhythm = info.task == "rhythm"
    return {
        "schema_version": scores.scores_schema()["schema_version"], "kind": scores.KIND, "task": info.task,
        "anchor_kind": "window-start" if rhythm else "r-peak", "package": "ecg-pipeline",
        **({"window_s": info.window_s, "hop_s": config.rhythm_hop_s or info.hop_s} if rhythm else {}),
        "package_version": pipeline.__version__, "model": str(request.model), "model_sha256": info.sha256,
        "model_database": info.database, "classes": list(info.classes), "label_map": dict(info.label_map),
        "spectrogram": info.spec.attrs(), "detector": {} if rhythm else config.to_dict()["detector"],
        "input": input_description,
        "config": config.to_dict(), "config_fingerprint": config.fingerprint(),
    }


def _listed_records(client: Client, source: sources.RecordSource, request: ScoreRequest, policy: RetryPolicy,
                    info: ModelInfo) -> tuple[sources.RecordSource, tuple[str, ...], dict[str, str]]:
    """The prepared source, the records to score (``--records`` checked against the listing) and, for rhythm
    models, the reference classes of a label table (``--labels``, or a ``REFERENCE.csv`` in the source)."""
    listing: sources.Listing
    listing, found = client.submit(_prepare_with_labels, source, request.cache_dir, policy,
                                   info.task == "rhythm" and not request.labels, pure=False).result()
    source, names = listing.source, listing.records
    reference = found
    if request.labels and info.task == "rhythm":
        try:
            reference = dict(labels_mod.RecordLabelTable(file=request.labels).load(
                Path(request.labels).read_text(encoding="utf-8-sig")).table)
        except (OSError, ValueError) as exc:
            raise sources.SourceError(f"--labels {request.labels}: {exc}") from None
    if request.records:
        unknown = sorted(set(request.records) - set(names))
        if unknown:
            raise sources.SourceError(f"{source.description}: no record(s) {', '.join(unknown)}")
        names = tuple(r for r in names if r in set(request.records))
    if not names:
        raise sources.SourceError(f"{source.description}: no WFDB records (.hea files) found")
    return source, names, reference


def _prepare_with_labels(source: sources.RecordSource, cache_dir: str | None, policy: RetryPolicy,
                         look: bool) -> tuple[sources.Listing, dict[str, str]]:
    """Task: list the source and, if ``look``, read the ``REFERENCE.csv`` beside its records (when there is one)."""
    listing = prepare_source(source, cache_dir, policy)
    if not look:
        return listing, {}
    try:
        table = labels_mod.load_table(labels_mod.RecordLabelTable(), listing.source, cache_root(cache_dir), policy)
    except PipelineError as exc:  # no table, or a malformed one: the records are scored without reference
        log.info("%s", exc)
        return listing, {}
    return listing, dict(table.table)


def _score_records(client: Client, ctx: ScoreContext, ctx_f, src, todo: Sequence[str], writer: scores.ScoresWriter,
                   bar, stage_s: Counter, loads: set[str], t0: float) -> int:
    """One ``score_record`` task per record (long records come back split, and their pieces are scored as
    tasks too); finished records are committed every ``flush_s``. Returns the segments scored."""
    futures = {client.submit(score_record, ctx_f, src, r, key=f"score-{r}-{os.urandom(4).hex()}"): r for r in todo}
    pieces: dict[str, list[PieceResult]] = {}
    expected: dict[str, int] = {}
    pending: list[scores.RecordScores] = []
    beats_run = 0
    last_flush = time.perf_counter()
    done_iter = as_completed(futures)
    for fut in done_iter:
        r = futures.pop(fut)
        try:
            res: PieceResult = fut.result()
        except Exception as exc:  # noqa: BLE001 - the task itself died (worker lost too often, a bug)
            res = PieceResult(r, scores=scores.RecordScores(r, "failed", f"task: {type(exc).__name__}: {exc}"))
        fut.release()
        if res.split:
            expected[r] = len(res.split)
            for p in res.split:
                f = client.submit(score_record, ctx_f, src, r, p, key=f"score-{r}-{p.index}-{os.urandom(4).hex()}")
                futures[f] = r
                done_iter.add(f)
            continue
        stage_s.update(res.seconds)
        if res.model_load:
            loads.add(res.model_load)
        parts = pieces.setdefault(r, [])
        parts.append(res)
        if len(parts) < expected.get(r, 1):
            continue
        rec = merge_pieces(parts, ctx.config.detector.refractory_s,
                           lambda base, stats, mv: judge(ctx, base, stats, mv)) if len(parts) > 1 else res.scores
        del pieces[r]
        pending.append(rec)
        beats_run += rec.n_segments
        bar.update(1)
        if hasattr(bar, "set_postfix_str"):
            unit = "beats" if ctx.info.task == "beat" else "windows"
            bar.set_postfix_str(f"{beats_run / (time.perf_counter() - t0):,.0f} {unit}/s", refresh=False)
        if time.perf_counter() - last_flush >= ctx.config.flush_s:
            writer.commit(pending)
            pending, last_flush = [], time.perf_counter()
    writer.commit(pending)
    bar.close()
    return beats_run


def _open_text(path: str):
    import fsspec

    return fsspec.open(path, "w")
