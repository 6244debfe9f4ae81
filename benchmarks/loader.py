"""Benchmark: the tf.data Zarr loader over the full MIT-BIH store, side by side with its ceiling and a peer.

In one run, on the same store and batch size (medians over ``--epochs`` epochs
after one warm-up epoch for the first two):

* loader: ``ZarrSegmentLoader`` streaming whole Zarr chunks (shuffled chunk groups,
  seeded), every segment of the store, ``(x, y)`` batches;
* ceiling: the same float16 tensors and labels already in memory, through
  ``tf.data.Dataset.from_tensor_slices`` + ``shuffle`` (a buffer of as many samples as
  the loader's group) + ``batch`` + ``prefetch``. Loading the arrays into memory is
  not timed;
* peer: xbatcher's Keras loader (``xbatcher.loaders.keras.CustomTFDataset`` over two
  ``BatchGenerator``s of ``xarray.open_zarr`` arrays, batches in shuffled order),
  timed over ``--peer-seconds`` and extrapolated (it is far slower).

Memory: in fresh processes, the peak resident-memory growth of streaming two
epochs, for the whole store and for a quarter of it, with the default shuffle
group (16 chunks) and a small one (4 chunks). Memory bounded by the buffer and not
by the dataset shows as growth that changes with the group, not with the data.

    python benchmarks/loader.py --store mitdb.zarr [--epochs 3] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

log = logging.getLogger("benchmarks.loader")


class PeakRSS:
    """Sample this process's resident memory every 5 ms in a thread; ``peak`` in bytes."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def epoch_rate(ds) -> tuple[float, int]:
    """Samples per second of one pass over ``ds``."""
    t0 = time.perf_counter()
    n = 0
    for batch in ds:
        n += int(batch[1].shape[0])
    return n / (time.perf_counter() - t0), n


def bench_loader(store: str, batch: int, epochs: int, fraction: float = 1.0, shuffle_chunks: int = 16):
    from ecg_pipeline.pipeline.loader import LoaderOptions, ZarrSegmentLoader

    n_all = ZarrSegmentLoader(store, np.arange(1)).n_segments_in_store
    idx = np.arange(int(n_all * fraction))
    loader = ZarrSegmentLoader(store, idx, LoaderOptions(batch_size=batch, seed=0, shuffle_chunks=shuffle_chunks))
    ds = loader.dataset()
    with PeakRSS() as mem:
        first, n = epoch_rate(ds)
        rates = [epoch_rate(ds)[0] for _ in range(epochs)]
    return loader, first, rates, n, mem.peak - mem.start


def bench_ceiling(x: np.ndarray, y: np.ndarray, batch: int, buffer: int, epochs: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(buffer, seed=0).batch(batch).prefetch(tf.data.AUTOTUNE)
    first, _ = epoch_rate(ds)
    return first, [epoch_rate(ds)[0] for _ in range(epochs)]


def bench_xbatcher(store: str, batch: int, seconds: float, codes: np.ndarray):
    import xarray as xr
    import xbatcher
    from xbatcher.loaders.keras import CustomTFDataset

    ds = xr.open_zarr(store, group="segments", consolidated=False, zarr_format=3)
    x = ds["spectrogram"]
    y = xr.DataArray(codes, dims=["segment"], name="label")
    data = CustomTFDataset(xbatcher.BatchGenerator(x, input_dims={"segment": batch}, preload_batch=False),
                           xbatcher.BatchGenerator(y, input_dims={"segment": batch}, preload_batch=False))
    order = np.random.default_rng(0).permutation(len(data))
    t0 = time.perf_counter()
    n = 0
    for i in order:
        xb, yb = data[int(i)]
        n += int(yb.shape[0])
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0), n, len(data)


def memory_probe(store: str, batch: int, fraction: float, shuffle_chunks: int) -> tuple[float, float]:
    """Peak RSS growth (MB) of streaming 2 epochs, in a fresh process; and the MB of data streamed."""
    import json
    import subprocess
    import sys

    code = (f"import json, numpy as np; import benchmarks.loader as b; "
            f"l, _, _, n, rss = b.bench_loader({store!r}, {batch}, 1, {fraction}, {shuffle_chunks}); "
            f"print('RESULT', json.dumps([rss / 1e6, n * int(np.prod(l.sample_shape)) * l.dtype.itemsize / 1e6]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    return tuple(json.loads(out.split("RESULT", 1)[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="full MIT-BIH store from `ecg-pipeline preprocess mitdb`")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up (median reported)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--peer-seconds", type=float, default=20.0, help="time budget of the xbatcher peer")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loader, first, rates, n, rss = bench_loader(args.store, args.batch_size, args.epochs)
    ours = statistics.median(rates)
    stored_mb = n * np.prod(loader.sample_shape) * loader.dtype.itemsize / 1e6
    group = loader.options.shuffle_chunks * loader.chunk_size

    x = loader.read_chunks(np.arange(loader.n_chunks))[0]  # untimed: the ceiling's data in memory
    c_first, c_rates = bench_ceiling(x, loader.labels, args.batch_size, group, args.epochs)
    ceiling = statistics.median(c_rates)
    del x
    peer, peer_n, peer_batches = bench_xbatcher(args.store, args.batch_size, args.peer_seconds, loader.labels)

    log.info("store %s: %d segments of %s %s (%.0f MB), batch %d, shuffle group %d segments",
             args.store, n, loader.sample_shape, loader.dtype, stored_mb, args.batch_size, group)
    log.info("%-34s %12s %14s", "", "warm-up ep.", "median (of %d)" % args.epochs)
    log.info("%-34s %12.0f %14.0f samples/s", "loader (Zarr chunks -> tf.data)", first, ours)
    log.info("%-34s %12.0f %14.0f samples/s", "ceiling (in memory, from_tensor_slices)", c_first, ceiling)
    log.info("%-34s %12s %14.0f samples/s  (%d of %d batches in %.0f s)", "peer (xbatcher Keras loader)", "",
             peer, peer_n // args.batch_size, peer_batches, args.peer_seconds)
    log.info("loader / ceiling = %.2f   (target >= 0.8)", ours / ceiling)
    log.info("loader / peer    = %.0f    (target >= 10)", ours / peer)
    log.info("memory (fresh process each, 2 epochs): peak RSS growth")
    for fraction in (0.25, 1.0):
        for chunks in (4, 16):
            grow, data = memory_probe(args.store, args.batch_size, fraction, chunks)
            log.info("  %4.0f%% of the store (%4.0f MB of spectrograms), group of %2d chunks: %5.0f MB",
                     100 * fraction, data, chunks, grow)


if __name__ == "__main__":
    main()
