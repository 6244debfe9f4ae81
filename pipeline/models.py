"""Stage 8: Keras 3 models over stored spectrograms, and their safe saving and loading.

Every model takes the store's ``spectrogram`` exactly as stored (``(freq, time)``,
in the store's dtype): the channel axis and the per-sample standardisation are
layers of the model, so a saved model cannot be fed differently preprocessed
input at scoring time. Only built-in layers are used, so ``.keras`` files load
with ``safe_mode=True``.

The parameters of the store a model was trained on (STFT, window, classes,
config fingerprint) are written into the ``.keras`` archive as
``ecg_pipeline.json`` and come back with ``load_model``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import PipelineError

METADATA_NAME = "ecg_pipeline.json"


class ModelError(PipelineError):
    """A model file that cannot be loaded safely, or does not fit the store."""


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence file descriptor 2 while TensorFlow starts, if ``TF_CPP_MIN_LOG_LEVEL`` asks for quiet.

    TensorFlow 2.19+ logs its start-up notes (oneDNN, "Could not find cuda drivers")
    through absl before it reads ``TF_CPP_MIN_LOG_LEVEL`` (tensorflow/tensorflow#100442),
    so the variable alone does not silence them. Python exceptions are unaffected.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("2", "3"):
        yield
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _keras():
    if "keras" not in sys.modules:
        with quiet_native_stderr():
            import keras  # noqa: F401 - imports TensorFlow, the backend
    return sys.modules["keras"]


def spectrogram_cnn(input_shape: tuple[int, int], n_classes: int, *, input_dtype: str = "float16",
                    width: int = 16, dense: int = 64, dropout: float = 0.3, head: str = "flatten"):
    """Beat classifier: a Huang et al. (2019)-style 2D CNN over one beat's spectrogram.

    Per-sample standardisation, then three conv stages (two 3x3 conv+BN+ReLU, then
    2x2 max-pool; widths ``width``, ``2 width``, ``4 width``), then ``head``:
    ``flatten`` keeps where in the beat each feature is (as Huang et al.'s fully
    connected head does), ``gap`` averages it away; a dense layer with dropout and
    a softmax.
    """
    if head not in ("flatten", "gap"):
        raise ValueError(f"head must be flatten or gap, not {head!r}")
    keras = _keras()
    layers = keras.layers
    n_freq, n_time = input_shape
    x_in = keras.Input(shape=(n_freq, n_time), dtype=input_dtype, name="spectrogram")
    x = layers.Reshape((n_freq, n_time, 1), name="channel")(x_in)
    # Standardise each spectrogram over freq x time (LayerNormalization without its affine part).
    x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-3, name="standardize")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for j in range(2 if stage < 2 else 1):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}_{j}")(x)
            x = layers.BatchNormalization(name=f"bn{stage}_{j}")(x)
            x = layers.ReLU(name=f"relu{stage}_{j}")(x)
        if stage < 2:
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x) if head == "flatten" else layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="drop0")(x)
    x = layers.Dense(dense, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="drop1")(x)
    out = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probability")(x)
    return keras.Model(x_in, out, name="spectrogram_cnn")


#: RR features relative to the patient's own rhythm (``pipeline.rr``): a choice of ``beat-rr-cnn``'s ``rr_use``
RELATIVE_RR = ("pre_local", "post_local", "pre_long", "local_long", "flagged")


def beat_rr_cnn(input_shape: tuple[int, int], n_classes: int, *, input_dtype: str = "float16",
                rr_stats: Mapping[str, Any] | None = None, width: int = 16, dense: int = 32, rr_units: int = 16,
                dropout: float = 0.2, rr_use: tuple[str, ...] | list[str] | None = None):
    """Beat classifier with rhythm context: a light CNN over the beat's spectrogram, beside its RR features.

    Two inputs, named after the store variables that feed them: ``spectrogram`` (standardised per
    sample, then three 3x3 conv+BN+ReLU stages of ``width``, ``2 width``, ``4 width`` filters, the first
    two followed by a 2x2 max-pool, flattened) and ``rr`` (the ``pipeline.rr`` features, standardised
    inside the model with the training part's mean and variance from ``rr_stats``; of them, the model
    uses ``rr_use`` (a fixed, untrained selection: the input stays the whole store variable), then a
    dense layer of ``rr_units``). The two are concatenated, then a dense layer with dropout and a softmax.

    ``rr_use=None`` (the default) uses all. ``RELATIVE_RR`` (the ratios and the flag only) was meant to
    keep the model from learning DS1 patients' heart rates in place of prematurity, but scored lower
    on the validation records (macro F1 0.53 against 0.55) and on DS2 (S F1 0.19 against 0.29), one seed each.

    The shape branch is light on purpose (about 1 MFLOP a beat on a 40 Hz band: ``flops_per_segment``):
    what tells an S beat from an N beat in a new patient is prematurity against that patient's own
    rhythm, which the RR features carry; the spectrogram has to tell QRS shapes apart (V, F, Q).
    """
    return _beat_context_cnn(input_shape, n_classes, False, input_dtype=input_dtype, rr_stats=rr_stats, width=width,
                             dense=dense, rr_units=rr_units, dropout=dropout, rr_use=rr_use)


def _beat_context_cnn(input_shape: tuple[int, int], n_classes: int, template: bool, *, input_dtype: str,
                      rr_stats: Mapping[str, Any] | None, width: int, dense: int, rr_units: int, dropout: float,
                      rr_use: tuple[str, ...] | list[str] | None):
    """The network of ``beat_rr_cnn`` and, with ``template``, of ``beat_template_cnn``."""
    keras = _keras()
    layers = keras.layers
    n_freq, n_time = input_shape
    stats = dict(rr_stats or {})
    n_rr = int(stats.get("n", 0))
    if n_rr < 1:
        raise ValueError(f"{'beat-template-cnn' if template else 'beat-rr-cnn'} needs the store's RR features "
                         "(rr_stats from the training part)")
    x_in = keras.Input(shape=(n_freq, n_time), dtype=input_dtype, name="spectrogram")
    r_in = keras.Input(shape=(n_rr,), dtype="float32", name="rr")
    x = layers.Reshape((n_freq, n_time, 1), name="channel")(x_in)
    x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-3, name="standardize")(x)
    ins = {"spectrogram": x_in, "rr": r_in}
    if template:
        # Second channel: the beat minus its neighbours' median (a log ratio of magnitudes), on a scale learned
        # over the training beats (batch norm, recomputed after weight averaging), not per beat: a beat like its
        # neighbours must stay near zero, not be blown up to unit variance.
        t_in = keras.Input(shape=(n_freq, n_time), dtype=input_dtype, name="template")
        ins["template"] = t_in
        diff = layers.Subtract(name="unlike_neighbours")([layers.Activation("linear", dtype="float32", name="spec32")(x_in),
                                                          layers.Activation("linear", dtype="float32", name="tmpl32")(t_in)])
        diff = layers.Reshape((n_freq, n_time, 1), name="diff_channel")(diff)
        diff = layers.BatchNormalization(name="diff_standardize")(diff)
        x = layers.Concatenate(name="beat_and_difference")([x, diff])
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}")(x)
        x = layers.BatchNormalization(name=f"bn{stage}")(x)
        x = layers.ReLU(name=f"relu{stage}")(x)
        if stage < 2:
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="drop0")(x)
    x = layers.Dense(dense, activation="relu", name="shape")(x)
    mean = stats.get("mean", [0.0] * n_rr)
    variance = stats.get("variance", [1.0] * n_rr)
    r = layers.Normalization(mean=mean, variance=variance, name="rr_standardize")(r_in)
    names = list(stats.get("features") or [f"rr{i}" for i in range(n_rr)])
    select = None
    if rr_use is not None:
        missing = sorted(set(rr_use) - set(names))
        if missing or not rr_use:
            raise ValueError(f"rr_use names {missing or 'no'} features; the store has {names}")
        select = layers.Dense(len(rr_use), use_bias=False, trainable=False, name="rr_select")
        r = select(r)
    r = layers.Dense(rr_units, activation="relu", name="rhythm")(r)
    h = layers.Concatenate(name="shape_and_rhythm")([x, r])
    h = layers.Dropout(dropout, name="drop1")(h)
    h = layers.Dense(dense, activation="relu", name="dense")(h)
    out = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probability")(h)
    model = keras.Model(ins, out, name="beat_template_cnn" if template else "beat_rr_cnn")
    if select is not None:
        matrix = np.zeros((n_rr, len(rr_use)), np.float32)
        matrix[[names.index(f) for f in rr_use], np.arange(len(rr_use))] = 1.0
        select.set_weights([matrix])
    return model


def beat_template_cnn(input_shape: tuple[int, int], n_classes: int, *, input_dtype: str = "float16",
                      rr_stats: Mapping[str, Any] | None = None, width: int = 16, dense: int = 32, rr_units: int = 16,
                      dropout: float = 0.2, rr_use: tuple[str, ...] | list[str] | None = None):
    """``beat_rr_cnn`` that also sees the beat against its patient's typical beat: three inputs, named after the
    store variables ``spectrogram``, ``rr`` and ``template`` (``pipeline.template``: the median spectrogram of
    the neighbouring beats). The CNN takes two channels, the standardised spectrogram and the beat minus its
    template (standardised over the training beats); the rest is ``beat_rr_cnn``'s.

    Why: what makes a beat ventricular in a new patient is a QRS unlike that patient's others; a wide QRS
    alone is also every beat of a bundle-branch block. Measured on DS1 -> DS2 (in memory, weights averaged
    over the last 5 of 10 epochs, one seed): V F1 0.76 -> 0.90 and F F1 0.01 -> 0.31 with the template
    channel, S F1 0.52 -> 0.44 (S depends on the RR features; see ``TrainConfig.premature_beats``).
    """
    return _beat_context_cnn(input_shape, n_classes, True, input_dtype=input_dtype, rr_stats=rr_stats, width=width,
                             dense=dense, rr_units=rr_units, dropout=dropout, rr_use=rr_use)


def flops_per_segment(model) -> int:
    """Multiply-adds x 2 of one segment through the model's convolution and dense layers (the rest, batch
    norm, pooling and activations, adds a few percent): the model's cost as the report and docs/results.md give it."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if hasattr(layer, "layers"):  # a nested model: the members of ``average_members``
            total += flops_per_segment(layer)
        elif kind in ("Conv2D", "Conv1D"):
            out_shape = layer.output.shape
            kernel = layer.kernel.shape  # (*k, c_in, c_out)
            per_out = int(np.prod(kernel[:-1]))
            total += 2 * per_out * int(np.prod([d for d in out_shape[1:] if d is not None]))
        elif kind == "Dense":
            kernel = layer.kernel.shape
            out_shape = layer.output.shape
            rows = int(np.prod([d for d in out_shape[1:-1] if d is not None])) if len(out_shape) > 2 else 1
            total += 2 * int(kernel[0]) * int(kernel[1]) * rows
    return int(total)


def rhythm_cnn(input_shape: tuple[int, int | None], n_classes: int, *, input_dtype: str = "float32",
               blocks: int = 4, convs_per_block: int = 4, width: int = 16, dropout: float = 0.05,
               frame_dropout: float = 0.1, norm: str = "batch", groups: int = 4, bn_momentum: float = 0.99):
    """Rhythm classifier of the PhysioNet/CinC 2017 reference: conv blocks, averaged over time.

    Input is a window's log spectrogram ``(freq, time)``; time may be ``None`` (any
    length). Standardised per window; in training, whole time frames are dropped with
    probability ``frame_dropout`` (the spectrogram form of Zihlmann et al.'s "dropout
    bursts" augmentation); then ``blocks`` blocks of ``convs_per_block`` x
    (conv+BN+ReLU+dropout) followed by a 2x2 max-pool, with ``width``, ``2 width`` and
    then ``4 width`` filters; a dense layer maps each remaining time step to class
    scores, which are averaged over time and passed through a softmax.

    ``norm="batch"`` is the reference's batch normalisation; train it with
    ``TrainConfig.bn_recalibration_batches`` (the rhythm default): measured on the
    Challenge 2017 windows, this small network's batch-norm moving statistics lag its
    weights so far that inference collapses to one class (validation accuracy 0.03-0.25
    after 4 epochs against 0.68 with batch statistics; 0.68 again once the statistics
    are recomputed with the final weights). ``norm="group"`` normalises each sample's
    channels in ``groups`` groups instead, the same in training and inference, but
    learned more slowly here.
    """
    if norm not in ("group", "batch"):
        raise ValueError(f"norm must be group or batch, not {norm!r}")
    keras = _keras()
    layers = keras.layers
    n_freq, n_time = input_shape
    x_in = keras.Input(shape=(n_freq, n_time), dtype=input_dtype, name="spectrogram")
    x = layers.Reshape((n_freq, -1, 1), name="channel")(x_in)
    x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-3, name="standardize")(x)
    if frame_dropout:
        # noise_shape (batch, 1, time, 1): one draw per frame, shared by all its frequencies.
        x = layers.Dropout(frame_dropout, noise_shape=(None, 1, None, 1), name="frame_dropout")(x)
    f = n_freq
    for b in range(blocks):
        for j in range(convs_per_block):
            x = layers.Conv2D(width * 2 ** min(b, 2), 3, padding="same", use_bias=False, name=f"conv{b}_{j}")(x)
            if norm == "batch":
                x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{b}_{j}")(x)
            else:
                x = layers.GroupNormalization(groups=groups, name=f"gn{b}_{j}")(x)
            x = layers.ReLU(name=f"relu{b}_{j}")(x)
            x = layers.Dropout(dropout, name=f"drop{b}_{j}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{b}")(x)
        f = -(-f // 2)
    x = layers.Permute((2, 1, 3), name="time_first")(x)  # (time, freq, channels)
    x = layers.Reshape((-1, f * x.shape[-1]), name="frames")(x)
    x = layers.Dense(n_classes, name="frame_scores")(x)
    x = layers.GlobalAveragePooling1D(name="time_average")(x)
    out = layers.Softmax(dtype="float32", name="probability")(x)
    return keras.Model(x_in, out, name="rhythm_cnn")


def recalibrate_batch_norm(model, batches) -> int:
    """Recompute every batch-norm layer's moving statistics with the model's current weights ("precise BN").

    The moving averages Keras keeps during training mix statistics of many past weight
    states; here each layer's mean and variance become the plain average of its batch
    statistics over ``batches`` (input arrays or tensors), with dropout off (its noise
    would inflate the variances inference never sees). Weights are not changed.
    Returns the number of batches used.
    """
    keras = _keras()
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    drops = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
    if not norms:
        return 0
    momenta, rates = [n.momentum for n in norms], [d.rate for d in drops]
    n = 0
    try:
        for d in drops:
            d.rate = 0.0
        for x in batches:
            for layer in norms:  # new = old * n/(n+1) + batch/(n+1): the running mean of the batch statistics
                layer.momentum = n / (n + 1)
            model(x, training=True)
            n += 1
    finally:
        for layer, m in zip(norms, momenta):
            layer.momentum = m
        for d, r in zip(drops, rates):
            d.rate = r
    return n


_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}
#: name -> (builder ``fn(input_shape, n_classes, *, input_dtype, **options)``, one-line help); see ``register_model``
MODELS: Mapping[str, tuple[Callable[..., Any], str]] = MappingProxyType(_REGISTRY)
_INPUTS: dict[str, tuple[str, ...]] = {}
#: name -> the store variables the model takes, in order (its input names); the first is ``spectrogram``
MODEL_INPUTS: Mapping[str, tuple[str, ...]] = MappingProxyType(_INPUTS)


def register_model(name: str, builder: Callable[..., Any], help: str,
                   inputs: tuple[str, ...] = ("spectrogram",)) -> None:
    """Make ``name`` a choice of ``train --model`` and the ``model`` key: one module plus this call.

    ``inputs``: the per-segment store variables the model takes, named as its Keras inputs. A builder
    of a model that takes ``rr`` gets ``rr_stats`` (``n``, and the training part's ``mean`` and
    ``variance`` of each feature) to standardise them inside the model.
    """
    if name in _REGISTRY and _REGISTRY[name][0] is not builder:
        raise ValueError(f"model {name!r} is already registered")
    if not inputs or inputs[0] != "spectrogram":
        raise ValueError(f"model {name!r}: its first input must be the spectrogram, not {inputs!r}")
    _REGISTRY[name] = (builder, help)
    _INPUTS[name] = tuple(inputs)


register_model("spectrogram-cnn", spectrogram_cnn, "beats: three conv stages (16/32/64), flatten, dense")
register_model("beat-rr-cnn", beat_rr_cnn,
               "beats with rhythm context: a light CNN (16/32/64, one conv a stage) beside the RR features",
               inputs=("spectrogram", "rr"))
register_model("beat-template-cnn", beat_template_cnn,
               "beats with rhythm and shape context: beat-rr-cnn whose CNN also sees the beat minus the median of its "
               "neighbours (the store's template)", inputs=("spectrogram", "rr", "template"))
register_model("rhythm-cnn", rhythm_cnn,
               "rhythm: blocks of 4 x (conv + BN + ReLU + dropout) then max-pool, averaged over time")


def build_model(name: str, input_shape: tuple[int, int], n_classes: int, *, input_dtype: str = "float16",
                options: Mapping[str, Any] | None = None, rr_stats: Mapping[str, Any] | None = None):
    """Build model ``name`` of ``MODELS`` for inputs of ``input_shape`` (the store's ``(freq, time)``);
    ``rr_stats`` for a model that takes RR features (``MODEL_INPUTS``)."""
    try:
        fn = MODELS[name][0]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    extra = {"rr_stats": rr_stats} if "rr" in MODEL_INPUTS[name] else {}
    try:
        return fn(input_shape, n_classes, input_dtype=input_dtype, **extra, **dict(options or {}))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {name}: bad model_options {dict(options or {})}: {exc}") from None


def average_members(members: Sequence[Any]):
    """One model whose class probabilities are the mean of ``members``' (same inputs by name, same classes).

    Each member stays a nested model of plain Keras layers (``member0``, ``member1``...), so the result
    saves as one ``.keras`` archive, loads in safe mode and is fed by input name like any of them; its
    cost per segment is the members' together (``flops_per_segment``). One member is returned as it is.
    """
    if len(members) == 1:
        return members[0]
    keras = _keras()
    names = [[t.name.split(":")[0] for t in m.inputs] for m in members]
    if any(sorted(n) != sorted(names[0]) for n in names):
        raise ModelError(f"members take different inputs: {names}")
    wrapped = [keras.Model(m.input, m.output, name=f"member{k}") for k, m in enumerate(members)]
    inputs = {n: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=n) for n, t in zip(names[0], members[0].inputs)}
    feed = inputs if len(inputs) > 1 else next(iter(inputs.values()))  # a one-input model takes the array itself
    mean = keras.layers.Average(name="probability_mean", dtype="float32")([m(feed) for m in wrapped])
    return keras.Model(feed, mean, name=f"mean_of_{len(members)}")


def predict_in_batches(model, x: Any, batch_size: int) -> np.ndarray:
    """Class probabilities of ``x`` (an array, or arrays by input name) in batches (``predict_on_batch``: no
    per-call dataset set-up)."""
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if not n:
        return np.zeros((0, model.output_shape[-1]), np.float32)

    def part(i: int):
        return {k: v[i:i + batch_size] for k, v in x.items()} if isinstance(x, dict) else x[i:i + batch_size]

    return np.concatenate([np.asarray(model.predict_on_batch(part(i)), dtype=np.float32)
                           for i in range(0, n, batch_size)])


def save_model(model, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Save ``model`` in the native ``.keras`` format with ``metadata`` inside the archive."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: models are saved in the native .keras format only")
    tmp = path.with_name(path.name + ".tmp.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as z:
        z.writestr(METADATA_NAME, json.dumps(dict(metadata), indent=2, default=str))
    tmp.replace(path)  # atomic: a crash never leaves a half-written model under the real name
    return path


def read_metadata(path: str | Path | IO[bytes]) -> dict[str, Any]:
    """The ``ecg_pipeline.json`` metadata inside a ``.keras`` archive, a local path or a binary file (``{}`` if
    absent)."""
    try:
        with zipfile.ZipFile(path) as z:
            if METADATA_NAME not in z.namelist():
                return {}
            return json.loads(z.read(METADATA_NAME))
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{path}: not a .keras archive ({exc})") from None


def _class_names(config: Any) -> set[str]:
    """Every ``class_name`` in a Keras config tree."""
    names: set[str] = set()
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("class_name"), str):
                names.add(node["class_name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


def check_archive(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Refuse a model file that is not a plain ``.keras`` archive, without importing TensorFlow.

    A cheap first check for jobs that load the model elsewhere (on Dask workers):
    the suffix, the zip container, a parseable ``config.json`` and no ``Lambda``
    layer. ``load_model`` (Keras safe mode) stays the real gate. Returns the
    ``ecg_pipeline.json`` metadata. ``path`` is a local path or an fsspec URL.

    Raises
    ------
    ModelError
        Naming the file and the reason.
    """
    from .locations import locate

    location = locate(path, storage_options)
    if not location.isfile():
        raise ModelError(f"no model file at {location.url}")
    with location.local_file() as local:
        return _check_local_archive(local, location.url)


def check_archive_bytes(data: bytes, shown: str) -> dict[str, Any]:
    """``check_archive`` of an archive's bytes, read once (``shown``: the path or URL the user gave)."""
    return _check_local_archive(io.BytesIO(data), shown)


def _check_local_archive(path: str | IO[bytes], shown: str) -> dict[str, Any]:
    """``check_archive`` of the local file or binary file ``path`` (``shown``: the name the user gave)."""
    if not shown.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ModelError(f"{shown}: only native .keras model archives are loaded (pickles, .h5 and SavedModel "
                         "directories can run code on load and are refused)")
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{shown}: not a Keras model archive (no readable config.json: {exc})") from None
    if "Lambda" in _class_names(config):
        raise ModelError(f"{shown}: refused: the model holds a Lambda layer, whose code would run on load "
                         "(Keras safe mode)")
    metadata = read_metadata(path)
    inputs, n_out = _declared_io(config)
    check_network(shown, metadata, inputs, n_out)
    return metadata


def _declared_io(config: Any) -> tuple[dict[str, tuple], int | None]:
    """What a functional model's ``config.json`` declares: its inputs' shapes (no batch axis) by name,
    and the width of its output where the output layer states it (``units``, or a softmax's input)."""
    c = config.get("config") if isinstance(config, dict) else None
    if not isinstance(c, dict) or not isinstance(c.get("layers"), list):
        return {}, None
    by_name = {layer.get("name") or (layer.get("config") or {}).get("name"): layer
               for layer in c["layers"] if isinstance(layer, dict)}
    inputs = {}
    for name, layer in by_name.items():
        shape = (layer.get("config") or {}).get("batch_shape")
        if layer.get("class_name") == "InputLayer" and isinstance(shape, list):
            inputs[name] = tuple(shape[1:])
    n_out = None
    outs = c.get("output_layers")
    if isinstance(outs, list) and len(outs) == 3 and isinstance(outs[0], str):  # one output: [name, 0, 0]
        layer = by_name.get(outs[0]) or {}
        units = (layer.get("config") or {}).get("units")
        if isinstance(units, int):
            n_out = units
        elif layer.get("class_name") in ("Softmax", "Activation"):
            try:
                shape = layer["inbound_nodes"][0]["args"][0]["config"]["shape"]
                n_out = shape[-1] if isinstance(shape[-1], int) else None
            except (KeyError, IndexError, TypeError):
                pass
    return inputs, n_out


def check_network(path: str | Path, metadata: Mapping[str, Any], inputs: Mapping[str, tuple],
                  n_out: int | None) -> None:
    """Refuse a model whose network disagrees with its ``ecg_pipeline.json``: the input a store variable
    feeds, or the number of classes its output scores. ``inputs`` and ``n_out`` come from the archive's
    ``config.json`` (``check_archive``, no TensorFlow) or from the loaded network (``load_model``).

    Raises
    ------
    ModelError
        Naming the file, what the metadata says and what the network takes.
    """
    declared = metadata.get("input") or {}
    variable, shape = declared.get("variable", "spectrogram"), declared.get("shape")
    if shape is not None and inputs:
        got = inputs.get(variable) if variable in inputs else (next(iter(inputs.values())) if len(inputs) == 1
                                                               else None)
        if got is None:
            raise ModelError(f"{path}: its metadata feeds the store variable {variable!r}, the network has no such "
                             f"input ({', '.join(inputs)}); refused")
        if len(got) != len(shape) or any(g is not None and g != d for g, d in zip(got, shape)):  # None: any
            raise ModelError(f"{path}: its metadata gives {variable} windows of shape {tuple(shape)}, the network "
                             f"takes {tuple(got)}; metadata and network disagree, refused")
    for name in declared.get("variables", [])[1:]:  # the store variables beside the spectrogram
        if inputs and name not in inputs:
            raise ModelError(f"{path}: its metadata feeds the store variable {name!r}, the network has no such input "
                             f"({', '.join(inputs)}); refused")
    classes = metadata.get("classes")
    if classes is not None and n_out is not None and n_out != len(classes):
        raise ModelError(f"{path}: its metadata names {len(classes)} classes ({', '.join(map(str, classes))}), the "
                         f"network scores {n_out}; metadata and network disagree, refused")


def load_model(path: str | Path, *, compile: bool = False, storage_options: Mapping[str, Any] | None = None):
    """Load a ``.keras`` model safely; return ``(model, metadata)``.

    Only the native ``.keras`` format is accepted, with Keras safe mode on: formats
    and layers that run arbitrary code on load (pickles, HDF5/SavedModel with
    custom objects, ``Lambda`` layers) are refused. ``path`` is a local path or an
    fsspec URL (read from a local copy).

    Raises
    ------
    ModelError
        Naming the file and the reason it was refused.
    """
    from .locations import locate

    location = locate(path, storage_options)
    if not location.isfile():
        raise ModelError(f"no model file at {location.url}")
    with location.local_file() as local:
        return _load_local_model(local, location.url, compile)


def load_model_bytes(data: bytes, shown: str, *, compile: bool = False, folder: str | None = None):
    """``load_model`` of an archive's bytes already read (``shown``: the path or URL the user gave, for messages);
    Keras reads a temporary copy in ``folder`` (default: the system's temporary folder)."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        try:
            return _load_local_model(path, shown, compile)
        except ModelError as exc:  # name the user's file, never the temporary copy
            raise ModelError(str(exc).replace(path, shown)) from None


def _load_local_model(path: str, shown: str, compile: bool):
    metadata = _check_local_archive(path, shown)
    keras = _keras()
    try:
        model = keras.models.load_model(path, compile=compile, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelError(f"{shown}: refused by Keras safe mode, the model holds code that would run on load "
                             f"({str(exc).splitlines()[0]})") from None
        raise ModelError(f"{shown}: cannot load model: {exc}") from None
    except (TypeError, KeyError, OSError) as exc:
        raise ModelError(f"{shown}: cannot load model: {type(exc).__name__}: {exc}") from None
    # The loaded network is the truth: check it too (config.json may not state every output's width).
    inputs = {t.name.split(":")[0]: tuple(t.shape[1:]) for t in model.inputs}
    n_out = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
    check_network(shown, metadata, inputs, n_out)
    return model, metadata
