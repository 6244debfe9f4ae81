"""Benchmark: the scoring job (detect + STFT + model) on the full MIT-BIH database.

Side by side in one run, repeated (medians reported):

* baseline: one process, one TensorFlow thread, the same stages in a plain loop
  over the records (read the lead, detect R peaks, cut windows, one vectorised STFT,
  ``predict_on_batch``);
* job, cold: ``run_scoring`` on a fresh local Dask cluster of ``--workers``
  processes, started as the CLI starts it: cluster start, TensorFlow import and
  model load on every worker included;
* job, warm: ``run_scoring`` again on the running cluster (a new output store each
  time; the model plugin is registered, and loaded, again per run);
* model alone: ``predict_on_batch`` over the inputs of every beat the baseline made,
  already in memory, on the baseline's one thread; times ``--workers`` (one thread each)
  it is what the workers' model compute alone could do, so ``warm / model alone`` is
  the share of the model's rate the whole job keeps (target >= 0.7).

The model is ``--model`` or, by default, the training default architecture
(``beat-template-cnn``: spectrogram, RR features and neighbour template; as many members as
``TrainConfig.members``) with random weights on the default preprocess window: the compute is
the same as a trained one's.
Prints beats/s, the ratios to the baseline, the targets (>= 5,000 beats/s on 2
workers; >= 0.7 x the model-alone rate warm) and the share of worker time per stage.

    python benchmarks/score.py [--mirror ../shared/physionet] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ecg_pipeline.jobs.score import ScoreRequest, run_scoring  # noqa: E402
from ecg_pipeline.pipeline.model_runtime import dummy_inputs, network_inputs, predict  # noqa: E402
from ecg_pipeline.pipeline import extract, records  # noqa: E402
from ecg_pipeline.pipeline.cluster import dask_client  # noqa: E402
from ecg_pipeline.pipeline.config import PreprocessConfig, ScoreConfig  # noqa: E402
from ecg_pipeline.pipeline.databases import get_database  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
TARGET = 5000.0
MODEL_SHARE_TARGET = 0.7
log = logging.getLogger("benchmarks.score")


def default_model(path: Path) -> Path:
    """The training default architecture with random weights and the default store's metadata."""
    from ecg_pipeline.pipeline.spectrogram import spec_from_config as spectrogram_spec
    from ecg_pipeline.pipeline import rr
    from ecg_pipeline.pipeline.config import TrainConfig
    from ecg_pipeline.pipeline.labels import AAMI_EC57
    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import MODEL_INPUTS, average_members, build_model, save_model

    config, train = PreprocessConfig(), TrainConfig()
    db = get_database("mitdb")
    spec = spectrogram_spec(config, 360.0)
    rr_spec = config.rr.spec()
    n_rr = len(rr_spec.features)
    stats = {"n": n_rr, "features": list(rr_spec.features), "mean": [0.0] * n_rr, "variance": [1.0] * n_rr}
    model = average_members([build_model(train.model, (spec.n_freq, spec.n_time), 5, input_dtype="float16",
                                         rr_stats=stats) for _ in range(train.members)])
    inputs = list(MODEL_INPUTS[train.model])
    card = ModelCard(task="beat", classes=list("NSVFQ"),
                     input={"shape": [spec.n_freq, spec.n_time], "dtype": "float16", "variables": inputs,
                            **({"rr": rr_spec.attrs()} if "rr" in inputs else {}),
                            **({"template": config.template.spec().attrs()} if "template" in inputs else {})},
                     accepted={"min_fs_hz": spec.min_fs_hz},
                     store={"database": "mitdb", "database_version": db.version, "spectrogram": spec.attrs(),
                            "preprocess_config": config.to_dict(), "label_map": dict(AAMI_EC57)})
    return save_model(model, path, card.to_dict())


def baseline(db_dir: Path, names: list[str], model_path: Path, batch: int) -> tuple[float, int, float]:
    """One process, one TensorFlow thread: the job's stages in a loop. Returns its wall time, the beats,
    and the seconds ``predict`` alone takes on all of them (the model-alone rate, same thread)."""
    import tensorflow as tf
    import threadpoolctl

    from ecg_pipeline.pipeline.config import DetectorSpec
    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import load_model

    # One TensorFlow thread, as each worker of the job has (one per worker thread).
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    # One BLAS thread too, as the local cluster gives each one-thread worker (LimitNativeThreads).
    threadpoolctl.threadpool_limits(limits=1)
    model, _ = load_model(model_path)
    card = ModelCard.read(model_path)
    predict(model, dummy_inputs(card, 256), batch)  # trace once
    t0 = time.perf_counter()
    n, inputs = 0, []
    for rec in names:
        base = db_dir / rec
        h = records.read_header(base, rec)
        lead = records.choose_lead(h, card.leads, "first")
        x = records.read_signal(base, h, lead)
        seg = extract.detected_segments(x, h.fs, 0, 0, len(x), card.spec, DetectorSpec(), 1.0, card.rr_spec,
                                        card.template_spec)
        inputs.append(network_inputs(card, seg.spectrogram, seg.rr, seg.template))
        n += len(predict(model, inputs[-1], batch))
    wall = time.perf_counter() - t0
    if isinstance(inputs[0], dict):
        every = {k: np.concatenate([b[k] for b in inputs]) for k in inputs[0]}
    else:
        every = np.concatenate(inputs)
    t0 = time.perf_counter()
    predict(model, every, batch)
    return wall, n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="PhysioNet mirror root (default: %(default)s)")
    p.add_argument("--model", type=Path, help="model.keras to score with (default: the default architecture, "
                                              "random weights)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_model:
        default_model(args.make_model)
        return
    logging.basicConfig(level=logging.WARNING)
    db_dir = args.mirror / "mitdb" / "1.0.0"
    if not (db_dir / "RECORDS").is_file():
        sys.exit(f"no MIT-BIH mirror at {db_dir}")
    names = (db_dir / "RECORDS").read_text().split()
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        model = args.model
        if model is None:  # built in a child process: this one must not import TensorFlow before forking workers
            model = tmp / "model.keras"
            subprocess.run([sys.executable, __file__, "--make-model", str(model)], check=True)
        config = ScoreConfig()

        def request(i: int) -> ScoreRequest:
            return ScoreRequest(model=str(model), out=str(tmp / f"scores-{i}.zarr"), input=str(db_dir),
                                records=tuple(names), annotations=None, config=config, cache_dir=str(tmp / "cache"),
                                summary=str(tmp / f"scores-{i}.csv"))

        cold, warm, stages, cold_phases, warm_phases = [], [], Counter(), [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            # Workers start as the CLI starts them (forked on Linux): the jobs run before the baseline
            # imports TensorFlow into this process.
            with dask_client(n_workers=args.workers, dashboard_address=None) as client:
                rep = run_scoring(request(2 * i), client)
                cold.append((time.perf_counter() - t0, rep.n_beats_run))
                cold_phases.append(rep.phase_s)
                rep = run_scoring(request(2 * i + 1), client)
                warm.append((rep.wall_s, rep.n_beats_run))
                warm_phases.append(rep.phase_s)
                stages.update(rep.stage_s)
        base_runs = [baseline(db_dir, names, model, config.batch_size) for _ in range(args.repeats)]
        base_s = statistics.median(t for t, _, _ in base_runs)
        n_base = base_runs[0][1]
        alone_s = statistics.median(m for _, _, m in base_runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(runs):
        return statistics.median(n / t for t, n in runs)

    rows = [("baseline: 1 process, 1 thread, plain loop", n_base, base_s, n_base / base_s),
            (f"job, {args.workers} workers, cold (cluster start + model load)", cold[0][1],
             statistics.median(t for t, _ in cold), rate(cold)),
            (f"job, {args.workers} workers, warm cluster", warm[0][1], statistics.median(t for t, _ in warm),
             rate(warm)),
            ("model alone: predict only, inputs in memory, 1 thread", n_base, alone_s, n_base / alone_s),
            (f"model alone x {args.workers} workers (1 thread each)", n_base, alone_s / args.workers,
             args.workers * n_base / alone_s)]
    print(f"\nscoring MIT-BIH ({len(names)} records), model {'given' if args.model else 'default architecture'}, "
          f"median of {args.repeats}")
    print(f"{'case':<58} {'beats':>8} {'wall s':>8} {'beats/s':>9} {'x baseline':>11}")
    for name, n, t, r in rows:
        print(f"{name:<58} {n:>8,} {t:>8.1f} {r:>9,.0f} {r / rows[0][3]:>11.2f}")
    for name, phases in (("cold", cold_phases), ("warm", warm_phases)):
        print(f"driver phases, {name} (median s): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in phases):.1f}" for k in phases[0]))
    total = sum(stages.values())
    print("worker time per stage (warm runs): " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items()))
    share = rate(warm) / rows[-1][3]
    print(f"target >= {MODEL_SHARE_TARGET} x the model-alone rate on a warm cluster: {share:.2f} -> "
          f"{'met' if share >= MODEL_SHARE_TARGET else 'NOT met'}")
    best = max(rate(cold), rate(warm))
    print(f"target >= {TARGET:,.0f} beats/s end to end: cold {rate(cold):,.0f}, warm {rate(warm):,.0f} -> "
          f"{'met' if rate(cold) >= TARGET else ('met on a warm cluster' if best >= TARGET else 'NOT met')}")


if __name__ == "__main__":
    main()
