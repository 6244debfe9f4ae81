"""Stage 7: a ``tf.data`` loader that streams whole Zarr chunks of a store.

How an epoch flows::

    chunk ids of the split --shuffle (seeded, new order each epoch)--> groups of
    ``shuffle_chunks`` chunks --map(read, parallel)--> one array per group, its
    samples permuted (and resampled, for balanced sampling) in NumPy
    --rebatch(batch_size)--> [normalise] --> prefetch

* Only chunks holding at least one selected segment are read, each in one Zarr
  call (never one sample at a time); ``parallel_reads`` groups are read at once.
* The shuffle buffer is one group: memory is bounded by
  ``(parallel_reads + 1) x shuffle_chunks x chunk_size`` samples (the groups being
  read and the one being batched), not by the dataset.
* Every selected sample appears exactly once per epoch (unless balanced sampling
  is on); with a ``seed`` the order of every epoch is reproducible.
* Labels are small (one byte a segment) and are read once, whole, when the
  loader is made; only the inputs (``spectrogram``, and ``rr`` for a model that
  takes RR features: ``LoaderOptions.inputs``) stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import zarr

from .errors import StoreError
from .locations import url_options
from .store import LABEL, check_version, decode_attrs, rebuild_hint, segments_of

log = logging.getLogger(__name__)

Weighting = Literal["none", "balanced", "sqrt"]


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader batches, shuffles and weights samples.

    Attributes
    ----------
    batch_size
        Samples per batch (per replica for ``distribute``).
    shuffle
        Shuffle chunk order each epoch and samples within each group of chunks.
    shuffle_chunks
        Chunks per shuffle group (the shuffle buffer, in chunks). Records are
        contiguous in a store, so a group of few chunks holds few patients and
        makes batches of few patients (bad for batch normalisation): the default
        mixes 16 random chunks (32k segments, 26 MB of float16 33 x 24 spectrograms).
    parallel_reads
        Groups read concurrently.
    seed
        Makes the order of every epoch reproducible; ``None`` draws a fresh one.
    class_weighting
        Add a per-sample weight: ``balanced`` is ``n / (k n_c)``, ``sqrt`` its
        square root (milder); ``none`` yields ``(x, y)`` pairs only.
    balanced_sampling
        Resample each group with replacement so that every class is drawn equally
        often over an epoch (epoch length unchanged).
    normalize
        Standardise each spectrogram (zero mean, unit variance over freq x time)
        and yield float32; off by default because the models do it themselves.
    drop_remainder
        Drop the last, short batch of each epoch.
    inputs
        Per-segment store variables to stream, each read with the same chunked reads. One input
        (the default, ``spectrogram``) yields ``x`` as an array; more yield ``x`` as a dict keyed by
        variable name, the input names of a model that takes them (``("spectrogram", "rr")``).
    augment
        A training augmentation applied to each shuffle group after it is read (``pipeline.augment``:
        ``augment(xs, y, rng) -> (xs, y)`` with ``xs`` by variable name, seeded by the group's seed); if it
        has ``count_shift(y, rr, n_classes)``, class weights count the labels it changes.
    """

    batch_size: int = 256
    shuffle: bool = True
    shuffle_chunks: int = 16
    parallel_reads: int = 2
    seed: int | None = None
    class_weighting: Weighting = "none"
    balanced_sampling: bool = False
    normalize: bool = False
    drop_remainder: bool = False
    inputs: tuple[str, ...] = ("spectrogram",)
    augment: Any = None

    def __post_init__(self):
        if self.batch_size < 1 or self.shuffle_chunks < 1 or self.parallel_reads < 1:
            raise ValueError("batch_size, shuffle_chunks and parallel_reads must be >= 1")
        if not self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs must name distinct store variables, not {self.inputs!r}")
        if self.class_weighting not in ("none", "balanced", "sqrt"):
            raise ValueError(f"class_weighting must be none, balanced or sqrt, not {self.class_weighting!r}")


def class_weights(counts: np.ndarray, how: Weighting) -> np.ndarray:
    """Per-class weights from class counts (0 for absent classes); mean weight over samples is 1."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.zeros_like(counts)
    present = counts > 0
    if how == "none" or not present.any():
        return np.where(present, 1.0, 0.0)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    if how == "sqrt":
        w = np.sqrt(w)
    return w / (w * counts).sum() * counts.sum()


def _open_group(path: str, storage_options: Mapping[str, Any] | None):
    try:
        return zarr.open_group(store=path, mode="r", zarr_format=3, use_consolidated=False,
                               storage_options=url_options(path, storage_options))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"no Zarr store at {path}") from exc


class ZarrSegmentLoader:
    """Stream ``(spectrogram, class)`` batches of chosen segments of a store (beat or rhythm).

    Parameters
    ----------
    path
        Store written by ``ecg-pipeline preprocess``: a local path or an fsspec URL.
    indices
        Segment indices to load (e.g. ``split["train"]``); ``None`` for all.
    options
        Batching, shuffling and weighting (``LoaderOptions``).
    storage_options
        Passed to fsspec for remote stores.

    Examples
    --------
    >>> loader = ZarrSegmentLoader("mitdb.zarr", split["train"], LoaderOptions(seed=0))
    >>> model.fit(loader.dataset(), epochs=10)
    """

    def __init__(self, path: str, indices: np.ndarray | None = None, options: LoaderOptions | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        self.path = str(path)
        self.options = options or LoaderOptions()
        root = _open_group(self.path, storage_options)
        attrs = decode_attrs(root.attrs)
        if attrs.get("package") != "ecg-pipeline":
            raise StoreError(f"{path} is not an ecg-pipeline store")
        check_version(attrs, self.path)
        if not attrs.get("complete"):
            raise StoreError(f"{path}: the job that writes this store has not finished (attrs complete=false)")
        self.attrs = attrs
        self.classes: tuple[str, ...] = tuple(attrs["classes"])
        group = segments_of(root, attrs)
        self._spec = group["spectrogram"]
        self.sample_shape: tuple[int, int] = tuple(self._spec.shape[1:])  # type: ignore[assignment]
        self.dtype = np.dtype(self._spec.dtype)
        self.chunk_size = int(self._spec.chunks[0])
        n = int(self._spec.shape[0])
        self.n_segments_in_store = n
        self._arrays = {}
        for name in self.options.inputs:
            if name not in group:
                raise StoreError(f"{path} has no variable {name!r} (store schema v{attrs.get('schema_version')}, "
                                 f"{attrs.get('task')} segments); {rebuild_hint(attrs, self.path)}")
            arr = group[name]
            if arr.shape[0] != n or int(arr.chunks[0]) != self.chunk_size:
                raise StoreError(f"{path}: variable {name!r} is not laid out along the segments like spectrogram")
            self._arrays[name] = arr
        #: per input: sample shape and dtype
        self.input_shapes = {k: tuple(a.shape[1:]) for k, a in self._arrays.items()}
        self.input_dtypes = {k: np.dtype(a.dtype) for k, a in self._arrays.items()}

        idx = np.arange(n, dtype=np.int64) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= n):
            raise IndexError(f"segment indices must lie in [0, {n}) for {path}")
        self.indices = idx
        label = np.asarray(group[LABEL][:]).astype(object)  # StringDType (zarr v3 vlen) -> str objects
        lookup = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(np.unique(label[idx])) - set(lookup))
        if unknown:
            raise StoreError(f"{path}: segments labelled {unknown}, which are not among the store's classes {self.classes}")
        codes = np.full(len(label), -1, dtype=np.int32)
        for c, i in lookup.items():
            codes[label == c] = i
        self.labels = codes[idx]  #: class index of each selected segment, in segment order
        self.class_counts = np.bincount(self.labels, minlength=len(self.classes))
        counts = self.class_counts.astype(np.float64)
        aug = self.options.augment
        if aug is not None and hasattr(aug, "count_shift") and "rr" in self._arrays:
            counts = np.maximum(counts + aug.count_shift(self.labels, np.asarray(self._arrays["rr"][:])[idx],
                                                         len(self.classes)), 0.0)
        self.class_weights = class_weights(counts, self.options.class_weighting)

        # Per needed chunk: positions of the selected segments inside it.
        chunk_of = idx // self.chunk_size
        self.chunks, starts = np.unique(chunk_of, return_index=True)
        bounds = np.append(starts, len(idx))
        self._local = [idx[a:b] - k * self.chunk_size for k, a, b in zip(self.chunks, bounds[:-1], bounds[1:])]
        self._codes = [self.labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        # Balanced sampling draws sample i with probability proportional to 1 / n_class(i).
        with np.errstate(divide="ignore"):
            self._draw_weight = np.where(self.class_counts > 0, 1.0 / self.class_counts, 0.0)

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def n_chunks(self) -> int:
        """Chunks the selection touches (those the loader reads)."""
        return int(self.chunks.size)

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        b = batch_size or self.options.batch_size
        return len(self) // b if self.options.drop_remainder else -(-len(self) // b)

    def read_chunks(self, positions: Sequence[int], order: np.ndarray | None = None) -> tuple[Any, np.ndarray]:
        """Inputs and class indices of the selected segments in chunks ``self.chunks[positions]``.

        Each chunk of each input variable is read with one Zarr call (the span of its selected
        segments). With ``order`` (a permutation of the group's samples), the result is
        ``x[order]``, written in place so that a group is copied once, not twice. ``x`` is an
        array for one input, a dict by variable name for several.
        """
        xs = self._read_inputs(positions, order)
        total = sum(len(self._local[p]) for p in positions)
        y = np.concatenate([self._codes[p] for p in positions]) if total else np.zeros(0, np.int32)
        return (xs[self.options.inputs[0]] if len(xs) == 1 else xs), (y if order is None else y[order])

    def _read_inputs(self, positions: Sequence[int], order: np.ndarray | None) -> dict[str, np.ndarray]:
        sizes = [len(self._local[p]) for p in positions]
        total = int(sum(sizes))
        dest = np.arange(total) if order is None else np.argsort(order)
        out = {}
        for name, arr in self._arrays.items():
            x = np.empty((total, *self.input_shapes[name]), self.input_dtypes[name])
            start = 0
            for p, size in zip(positions, sizes):
                k, local = int(self.chunks[p]), self._local[p]
                lo = k * self.chunk_size
                block = arr[lo + int(local[0]): lo + int(local[-1]) + 1]
                x[dest[start:start + size]] = block[local - local[0]]
                start += size
            out[name] = x
        return out

    def _read_group(self, positions: np.ndarray, seed: np.int64):
        """One shuffle group: its samples permuted (or, for balanced sampling, drawn), with weights."""
        order = draw = None
        rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFF)
        if self.options.shuffle or self.options.balanced_sampling:
            y_all = np.concatenate([self._codes[p] for p in positions])
            if self.options.balanced_sampling:
                w = self._draw_weight[y_all]
                draw = rng.choice(len(y_all), size=len(y_all), replace=True, p=w / w.sum())
            else:
                order = rng.permutation(len(y_all))
        xs = self._read_inputs(positions, order)
        y = np.concatenate([self._codes[p] for p in positions])
        y = y if order is None else y[order]
        if draw is not None:
            xs, y = {k: v[draw] for k, v in xs.items()}, y[draw]
        if self.options.augment is not None:
            xs, y = self.options.augment(xs, y, rng)
            xs = {k: xs[k] for k in self._arrays}
        return (*xs.values(), y, self.class_weights[y].astype(np.float32))

    def dataset(self, *, batch_size: int | None = None, shard: tuple[int, int] | None = None):
        """The ``tf.data.Dataset`` of one epoch (Keras re-iterates it, reshuffled, each epoch).

        Parameters
        ----------
        batch_size
            Overrides ``options.batch_size`` (e.g. the per-replica size).
        shard
            ``(index, count)``: keep every ``count``-th chunk starting at ``index``, so that
            input pipelines of a ``tf.distribute`` strategy read disjoint chunks.

        Yields
        ------
        ``(x, y)`` or, with class weighting, ``(x, y, sample_weight)``; ``x`` is
        ``(batch, freq, time)`` in the store's dtype (float32 when normalising), ``y`` int32.
        """
        import tensorflow as tf

        opt = self.options
        batch_size = batch_size or opt.batch_size
        positions = np.arange(self.n_chunks, dtype=np.int64)
        if shard is not None:
            index, count = shard
            positions = positions[index::count]
        seed = opt.seed if opt.seed is not None else int(np.random.default_rng().integers(2**31))
        ids = tf.data.Dataset.from_tensor_slices(positions)
        if opt.shuffle and len(positions):
            ids = ids.shuffle(len(positions), seed=seed, reshuffle_each_iteration=True)
        groups = ids.batch(opt.shuffle_chunks)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        names = tuple(self._arrays)
        dtypes = [tf.as_dtype(self.input_dtypes[k]) for k in names]

        def read(pos, s):
            *xs, y, w = tf.numpy_function(self._read_group, [pos, s], [*dtypes, tf.int32, tf.float32], stateful=False)
            xs = [tf.ensure_shape(x, (None, *self.input_shapes[k])) for k, x in zip(names, xs)]
            x = xs[0] if len(xs) == 1 else dict(zip(names, xs))
            return x, tf.ensure_shape(y, (None,)), tf.ensure_shape(w, (None,))

        ds = tf.data.Dataset.zip(groups, seeds).map(read, num_parallel_calls=opt.parallel_reads, deterministic=True)
        ds = ds.rebatch(batch_size, drop_remainder=opt.drop_remainder)
        if opt.normalize:
            def norm(x, y, w):
                if isinstance(x, dict):
                    return {**x, "spectrogram": standardize(x["spectrogram"])}, y, w
                return standardize(x), y, w

            ds = ds.map(norm, num_parallel_calls=tf.data.AUTOTUNE)
        if opt.class_weighting == "none":
            ds = ds.map(lambda x, y, w: (x, y))
        if shard is None:
            # rebatch hides the length from tf.data; declaring it gives Keras a known epoch length.
            n = len(self) // batch_size if opt.drop_remainder else -(-len(self) // batch_size)
            ds = ds.apply(tf.data.experimental.assert_cardinality(n))
        options = tf.data.Options()
        # Shards are chosen by chunk (shard=...); never let tf.distribute shard by file.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF \
            if shard is not None else tf.data.experimental.AutoShardPolicy.DATA
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def distribute(self, strategy, global_batch_size: int | None = None):
        """A distributed dataset for ``strategy``: each input pipeline reads its own chunks."""
        import tensorflow as tf

        global_batch_size = global_batch_size or self.options.batch_size

        def fn(ctx: tf.distribute.InputContext):
            shard = (ctx.input_pipeline_id, ctx.num_input_pipelines) if ctx.num_input_pipelines > 1 else None
            return self.dataset(batch_size=ctx.get_per_replica_batch_size(global_batch_size), shard=shard)

        return strategy.distribute_datasets_from_function(fn)


def standardize(x):
    """Per-sample standardisation over the last two axes (tf): ``(x - mean) / std``."""
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    mean, var = tf.nn.moments(x, axes=[-2, -1], keepdims=True)
    return (x - mean) / tf.sqrt(var + 1e-6)


ZarrBeatLoader = ZarrSegmentLoader  #: the name of schema v1 days, kept for scripts that use it
