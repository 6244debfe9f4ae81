"""Benchmark: the preprocess job on a full database from a loopback HTTP mirror.

Two cases (``--case``): ``mitdb`` (48 half-hour records, 109k beats) and
``challenge-2017`` (8,528 short recordings in one zip archive, 30 s windows). Side by
side in one run, repeated (medians reported):

* baseline: one process reads every record from local files (``wfdb.rdrecord``, and
  ``wfdb.rdann`` for beats; the Challenge 2017 archive is extracted before the clock
  starts), cuts its segments (beats, aligned to their fiducial points as the job's
  label source aligns them; windows covering the recording), runs one vectorised STFT
  per record and ``np.save``s the result: the job's transforms, in one process;
* lean baseline (Challenge 2017 only): one process reads each recording straight out of the zip held in
  memory (one ``loadmat``), windows, one vectorised STFT per recording, ``np.save``;
* job: in a new Python process each repeat, as the CLI runs it (imports before the clock), a
  fresh local Dask cluster of ``--workers`` processes (start-up included), cold download
  cache, every file (or the archive) fetched over HTTP from 127.0.0.1 and verified, a zip
  read member by member, the store written to local disk.

Prints segments/s, wall times (medians), the ratio job/baseline (target: at most 2 on 2
workers: the median of the repeats' ratios, and their range), peak RSS per worker and the
time split per stage (task-seconds summed over workers).

    python benchmarks/preprocess.py [--case mitdb|challenge-2017|all] [--mirror ../shared/physionet]
                                    [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import wfdb

from ecg_pipeline.jobs.preprocess import PreprocessRequest, run_preprocess
from ecg_pipeline.pipeline import rr, segment, spectrogram, template
from ecg_pipeline.pipeline.cluster import dask_client
from ecg_pipeline.pipeline.config import PreprocessConfig, load_config
from ecg_pipeline.pipeline.databases import get_database
from ecg_pipeline.pipeline.labels import RecordInput, label_source_for

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
    """MIT-BIH: single process, local files, one vectorised STFT per record, np.save.

    The job's transforms, so the same segments: the beats of the label source (``label_source.segments``: the
    annotations, each beat moved to its fiducial point where ``window.align`` says so), windows inside the record,
    the STFT, the neighbour templates (``config.template``), RR features from every beat.
    """
    label_source = label_source_for(get_database("mitdb"), config)
    tmpl = config.template.spec()  # the beats' neighbour templates, where the configuration has them
    t0 = time.perf_counter()
    n = 0
    for rec in (db_dir / "RECORDS").read_text().split():
        base = str(db_dir / rec)
        h = wfdb.rdheader(base)
        names = [s.upper() for s in h.sig_name]
        ch = names.index("MLII") if "MLII" in names else names.index("V5")
        sig = wfdb.rdrecord(base, channels=[ch]).p_signal[:, 0].astype(np.float32)
        segs = label_source.segments(RecordInput(rec, Path(base), h.fs, h.sig_len, sig))
        w = segment.WindowSpec.from_seconds(config.window.before_s, config.window.after_s, h.fs)
        keep = segment.in_bounds(segs.anchor, h.sig_len, w)
        spec = spectrogram.spec_from_config(config, h.fs)
        s = spectrogram.spectrogram(segment.extract_windows(sig, segs.anchor[keep], w), spec)
        np.save(out_dir / f"{rec}.npy", s.astype(np.float16))
        if tmpl is not None:
            np.save(out_dir / f"{rec}.template.npy", template.neighbour_template(s, tmpl.beats).astype(np.float16))
        np.save(out_dir / f"{rec}.rr.npy", rr.features_at(segs.anchor[keep], segs.beats, h.fs, config.rr.spec(), sig))
        n += s.shape[0]
    return time.perf_counter() - t0, n


def _cover_spectrograms(x: np.ndarray, fs: float, config: PreprocessConfig, label_source) -> np.ndarray:
    """Windows covering the recording ``x`` (the rhythm task's, wrapped) and their spectrograms."""
    r = config.rhythm
    w = segment.WindowSpec.from_seconds(0.0, r.length_s, fs, pad="wrap")
    anchor = segment.cover_windows(len(x), w.length, int(round(r.hop_s * fs)))
    return spectrogram.spectrogram(segment.extract_windows(x, anchor, w),
                                   spectrogram.spec_from_config(config, fs, label_source))


def baseline_challenge(folder: Path, out_dir: Path, config: PreprocessConfig) -> tuple[float, int]:
    """Challenge 2017: single process, extracted local files, windows covering each recording, np.save."""
    label_source = label_source_for(get_database("challenge-2017"), config)  # its windows: (0, length_s), wrapped
    t0 = time.perf_counter()
    n = 0
    for rec in (folder / "RECORDS").read_text().split():
        base = str(folder / rec)
        x = wfdb.rdrecord(base).p_signal[:, 0].astype(np.float32)
        s = _cover_spectrograms(x, 300.0, config, label_source)
        np.save(out_dir / f"{rec}.npy", s.astype(np.float16))
        n += s.shape[0]
    return time.perf_counter() - t0, n


def baseline_challenge_zip(archive: Path, inner: str, out_dir: Path, config: PreprocessConfig) -> tuple[float, int]:
    """Challenge 2017, the lean baseline: one process reads each recording straight out of the zip held in memory
    (one ``loadmat``, its gain from the header), windows covering the recording, one vectorised STFT, np.save."""
    import io

    from scipy.io import loadmat

    label_source = label_source_for(get_database("challenge-2017"), config)
    t0 = time.perf_counter()
    n = 0
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as z:
        prefix = f"{inner}/" if inner else ""
        for rec in z.read(f"{prefix}RECORDS").decode().split():
            header = z.read(f"{prefix}{rec}.hea").decode().splitlines()
            fields = header[1].split()
            fs = float(header[0].split()[2])
            gain, baseline_adu = float(fields[2].split("/")[0]), int(fields[4])
            adu = loadmat(io.BytesIO(z.read(f"{prefix}{rec}.mat")))["val"][0]
            x = ((adu - baseline_adu) / gain).astype(np.float32)
            s = _cover_spectrograms(x, fs, config, label_source)
            np.save(out_dir / f"{rec}.npy", s.astype(np.float16))
            n += s.shape[0]
    return time.perf_counter() - t0, n


def _peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` where Linux gives it (``ru_maxrss`` of a forked worker starts at its
    parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job(db: str, url: str, work: Path, workers: int, config: PreprocessConfig):
    t0 = time.perf_counter()
    with dask_client(n_workers=workers, dashboard_address=None) as client:
        t_cluster = time.perf_counter() - t0
        req = PreprocessRequest(db=db, out=str(work / f"{db}.zarr"), source=url, cache_dir=str(work / "cache"),
                                config=config)
        report = run_preprocess(req, client)
        rss = client.run(_peak_rss_mb)
    return time.perf_counter() - t0, t_cluster, report, rss


def _job_child(queue, *args) -> None:
    try:
        queue.put(("ok", (*job(*args), _peak_rss_mb())))
    except BaseException as exc:  # noqa: BLE001 - the parent says what failed
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def job_in_fresh_process(db: str, url: str, work: Path, workers: int, config: PreprocessConfig):
    """``job`` in a new Python process (its imports before the clock), as the CLI runs a job: the first local cluster
    of a process forks its workers, a later one spawns them (2-3 s more), so repeats in one process would differ.
    Returns ``job``'s figures and the process's peak RSS (the driver and the local scheduler)."""
    import queue as queues

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_job_child, args=(results, db, url, work, workers, config))
    proc.start()
    try:
        while True:  # until the child answers, or dies without answering (killed, out of memory)
            try:
                status, out = results.get(timeout=5)
                break
            except queues.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the job's process exited with status {proc.exitcode} and no result") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"the job failed: {out}")
    return out


def run_case(case: str, mirror: Path, url: str, repeats: int, workers: int) -> float | None:
    """Baseline and job side by side, ``repeats`` times; prints the medians; returns the ratio."""
    db = get_database(case)
    config = load_config(None, dict(db.preprocess_defaults))
    folder = mirror / db.name / db.version
    unit = "beats" if case == "mitdb" else "windows"
    if not (folder / (db.archive or "RECORDS")).exists():
        print(f"no {case} mirror at {folder}: case skipped", file=sys.stderr)
        return None
    base_t, lean_t, job_t, cluster_t, rows = [], [], [], [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "npy").mkdir()
            if db.archive:  # the baseline reads local files: extracted before its clock starts
                with zipfile.ZipFile(folder / db.archive) as z:
                    z.extractall(work / "extracted")
                bt, bn = baseline_challenge(work / "extracted" / db.archive_folder, work / "npy", config)
                lt, ln = baseline_challenge_zip(folder / db.archive, db.archive_folder, work / "npy", config)
                assert ln == bn, (ln, bn)
                lean_t.append(lt)
            else:
                bt, bn = baseline(folder, work / "npy", config)
            jt, ct, report, rss, driver_rss = job_in_fresh_process(case, url, work, workers, config)
            assert report.ok and report.n_segments == bn, (report.n_segments, bn)
            base_t.append(bt)
            job_t.append(jt)
            cluster_t.append(ct)
            rows.append((report, rss, driver_rss))
            lean = f", lean baseline {lean_t[-1]:.2f} s" if lean_t else ""
            print(f"{case} run {i + 1}: baseline {bt:.2f} s{lean}, job {jt:.2f} s (cluster start {ct:.2f} s, "
                  f"{', '.join(f'{k} {v:.2f} s' for k, v in report.phase_s.items())}), ratio {jt / bt:.2f}")
    report, rss, driver_rss = rows[-1]
    n = report.n_segments
    b, j = statistics.median(base_t), statistics.median(job_t)  # the times; the ratios are each repeat's
    stages = Counter()
    for r, _, _ in rows:
        stages.update(r.stage_s)
    print(f"\n{db.title}: {len(report.records):,} records, {n:,} {unit}, {workers} workers, {repeats} repeats "
          "(medians)")
    print(f"  baseline (1 process, local files, np.save)   {b:6.2f} s   {n / b:10,.0f} {unit}/s")
    print(f"  job (cluster start + HTTP download + zarr)   {j:6.2f} s   {n / j:10,.0f} {unit}/s")
    print(f"  ratio job / baseline                         {_ratio(job_t, base_t)}   (target <= 2)")
    if lean_t:
        lb = statistics.median(lean_t)
        print(f"  lean baseline (1 process, zip in memory)     {lb:6.2f} s   {n / lb:10,.0f} {unit}/s")
        print(f"  ratio job / lean baseline                    {_ratio(job_t, lean_t)}   (issue 37's target <= 1.5)")
    print(f"  cluster start                                {statistics.median(cluster_t):6.2f} s")
    print("  peak RSS per worker (MB)                     " + ", ".join(f"{v:.0f}" for v in rss.values()))
    print(f"  peak RSS of the driver (MB)                  {driver_rss:.0f}")
    print("  task-seconds per stage (summed over workers, mean per run):")
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<18} {v / len(rows):6.2f}")
    print()
    return statistics.median(jt / bt for jt, bt in zip(job_t, base_t))


def _ratio(job_t: list[float], base_t: list[float]) -> str:
    """The median of each repeat's ratio, and their range: a repeat's job and baselines run minutes apart at
    most, so a shared machine's slow spells (here the baselines alone moved 18-31 s between repeats) cancel
    in each ratio, where a ratio of medians would pair one repeat's job with another's baseline."""
    each = [jt / bt for jt, bt in zip(job_t, base_t)]
    spread = f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
    return f"{statistics.median(each):6.2f}{spread}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("mitdb", "challenge-2017", "all"), default="all")
    ap.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cases = ("mitdb", "challenge-2017") if args.case == "all" else (args.case,)
    proc, url = serve(args.mirror)
    try:
        ratios = {c: run_case(c, args.mirror, url, args.repeats, args.workers) for c in cases}
    finally:
        proc.terminate()
    if all(r is None for r in ratios.values()):
        return 2
    print("ratios job / baseline: " + ", ".join(f"{c} {r:.2f}" for c, r in ratios.items() if r is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
