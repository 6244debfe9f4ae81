"""Benchmark: the preprocess job on the full MIT-BIH database from a loopback HTTP mirror.

Side by side in one run, repeated (medians reported):

* baseline: one process reads every record from local files (``wfdb.rdrecord`` +
  ``wfdb.rdann``), labels and cuts the beats, runs one vectorised STFT per record and
  ``np.save``s the result;
* job: a fresh local Dask cluster of ``--workers`` processes (start-up included), cold
  download cache, every file fetched over HTTP from 127.0.0.1 and verified, the store
  written to local disk.

Prints beats/s, wall times, the ratio job/baseline, peak RSS per worker and the time
split per stage (task-seconds summed over workers).

    python benchmarks/preprocess.py [--mirror ../shared/physionet] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import wfdb

from ecg_pipeline.jobs.preprocess import PreprocessRequest, run_preprocess
from ecg_pipeline.pipeline import segment, spectrogram
from ecg_pipeline.pipeline.cluster import dask_client
from ecg_pipeline.pipeline.config import PreprocessConfig
from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on an ephemeral loopback port; returns the process and URL."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 43567 (http://127.0.0.1:43567/) ..."
    port = int(line.split(" port ")[1].split()[0])
    return proc, f"http://127.0.0.1:{port}/"


def baseline(db_dir: Path, out_dir: Path, config: PreprocessConfig) -> tuple[float, int]:
    """Single process, local files, one vectorised STFT per record, np.save."""
    t0 = time.perf_counter()
    n = 0
    for rec in (db_dir / "RECORDS").read_text().split():
        base = str(db_dir / rec)
        h = wfdb.rdheader(base)
        names = [s.upper() for s in h.sig_name]
        ch = names.index("MLII") if "MLII" in names else names.index("V5")
        sig = wfdb.rdrecord(base, channels=[ch]).p_signal[:, 0].astype(np.float32)
        ann = wfdb.rdann(base, "atr")
        beats = label_beats(ann.sample, ann.symbol, AAMI_EC57, "Q")
        w = segment.WindowSpec.from_seconds(config.window.before_s, config.window.after_s, h.fs)
        keep = segment.in_bounds(beats.sample, h.sig_len, w)
        spec = spectrogram.SpectrogramSpec(h.fs, w.n_before, w.n_after, config.stft.nperseg, config.stft.hop,
                                           config.stft.nfft or config.stft.nperseg)
        s = spectrogram.spectrogram(segment.extract_windows(sig, beats.sample[keep], w), spec)
        np.save(out_dir / f"{rec}.npy", s.astype(np.float16))
        n += s.shape[0]
    return time.perf_counter() - t0, n


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job(url: str, work: Path, workers: int, config: PreprocessConfig):
    t0 = time.perf_counter()
    with dask_client(n_workers=workers, dashboard_address=None) as client:
        t_cluster = time.perf_counter() - t0
        req = PreprocessRequest(db="mitdb", out=str(work / "mitdb.zarr"), source=url,
                                cache_dir=str(work / "cache"), config=config)
        report = run_preprocess(req, client)
        rss = client.run(_peak_rss_mb)
    return time.perf_counter() - t0, t_cluster, report, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    db_dir = args.mirror / "mitdb" / "1.0.0"
    if not (db_dir / "RECORDS").exists():
        print(f"no MIT-BIH mirror at {db_dir}", file=sys.stderr)
        return 2
    config = PreprocessConfig()
    proc, url = serve(args.mirror)
    base_t, job_t, cluster_t, rows = [], [], [], []
    try:
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                (work / "npy").mkdir()
                bt, bn = baseline(db_dir, work / "npy", config)
                jt, ct, report, rss = job(url, work, args.workers, config)
                assert report.ok and report.n_segments == bn, (report.n_segments, bn)
                base_t.append(bt)
                job_t.append(jt)
                cluster_t.append(ct)
                rows.append((report, rss))
                print(f"run {i + 1}: baseline {bt:.2f} s, job {jt:.2f} s (cluster start {ct:.2f} s, "
                      f"{', '.join(f'{k} {v:.2f} s' for k, v in report.phase_s.items())}), ratio {jt / bt:.2f}")
    finally:
        proc.terminate()
    report, rss = rows[-1]
    n = report.n_segments
    b, j = statistics.median(base_t), statistics.median(job_t)
    stages = Counter()
    for r, _ in rows:
        stages.update(r.stage_s)
    print(f"\nMIT-BIH, {n:,} beats, {args.workers} workers, {args.repeats} repeats (medians)")
    print(f"  baseline (1 process, local files, np.save)   {b:6.2f} s   {n / b:10,.0f} beats/s")
    print(f"  job (cluster start + HTTP download + zarr)   {j:6.2f} s   {n / j:10,.0f} beats/s")
    print(f"  ratio job / baseline                         {j / b:6.2f}")
    print(f"  cluster start                                {statistics.median(cluster_t):6.2f} s")
    print("  peak RSS per worker (MB)                     " + ", ".join(f"{v:.0f}" for v in rss.values()))
    print(f"  peak RSS of the driver (MB)                  {_peak_rss_mb():.0f}")
    print("  task-seconds per stage (summed over workers, mean per run):")
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<18} {v / len(rows):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
