"""Benchmark: does a beat model score records of other sampling rates as it scores 360 Hz ones?

Makes copies of the MIT-BIH DS2 records (de Chazal et al.'s test half of the inter-patient
split) at other sampling rates (default 128 Hz and 250 Hz: ``scipy.signal.resample_poly`` of
every lead, the reference beat annotations moved to the nearest sample of the new rate, written
with ``wfdb.wrsamp`` / ``wfdb.wrann``), then scores the original and every copy with ``score``
(beats found by the detector, matched with the reference beats as EC57 does) in one run, on one
local cluster, and prints the per-class F1 of the matched beats side by side with each copy's
difference from 360 Hz (target: every class within 0.05; classes with fewer than ``--min-beats``
reference beats are shown but not judged). With ``--store`` (the preprocess store the model was
trained on), it also prints ``evaluate`` on the annotated DS2 beats of that store beside the 360 Hz scoring
with detected beats (target: every class within 0.02).

    python benchmarks/resampled.py --model runs/mitdb/model.keras [--store mitdb.zarr] [--rates 128 250]

The copies are made under ``--work`` (a temporary folder by default, removed at the end).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ecg_pipeline.jobs.score import ScoreRequest, run_scoring  # noqa: E402
from ecg_pipeline.pipeline.cluster import dask_client  # noqa: E402
from ecg_pipeline.pipeline.config import ScoreConfig  # noqa: E402
from ecg_pipeline.pipeline.splits import DS2  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
TOLERANCE = 0.05
log = logging.getLogger("benchmarks.resampled")


def resample_record(src: Path, record: str, dst: Path, fs: float) -> None:
    """Write ``record`` of ``src`` at ``fs`` into ``dst``: every lead resampled, the ``atr`` annotations
    moved to the new rate (their symbols, sub-types, channels and aux notes kept)."""
    import wfdb
    from scipy.signal import resample_poly

    rec = wfdb.rdrecord(str(src / record), physical=True)
    ratio = Fraction(fs / rec.fs).limit_denominator(1000)
    x = resample_poly(rec.p_signal, ratio.numerator, ratio.denominator, axis=0)
    wfdb.wrsamp(record, fs=fs, units=rec.units, sig_name=rec.sig_name, p_signal=x, fmt=["16"] * x.shape[1],
                adc_gain=[200.0] * x.shape[1], baseline=[0] * x.shape[1], comments=rec.comments,
                write_dir=str(dst))
    ann = wfdb.rdann(str(src / record), "atr")
    sample = np.minimum(np.round(ann.sample * fs / rec.fs).astype(np.int64), x.shape[0] - 1)
    wfdb.wrann(record, "atr", sample, symbol=ann.symbol, subtype=ann.subtype, chan=ann.chan, num=ann.num,
               aux_note=ann.aux_note, fs=fs, write_dir=str(dst))


def make_copy(src: Path, records: list[str], dst: Path, fs: float) -> Path:
    """A folder of ``records`` at ``fs``, with a ``RECORDS`` file."""
    dst.mkdir(parents=True, exist_ok=True)
    for r in records:
        resample_record(src, r, dst, fs)
    (dst / "RECORDS").write_text("\n".join(records) + "\n")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="model.keras of `ecg-pipeline train` (a beat model)")
    p.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="PhysioNet mirror root (default: %(default)s)")
    p.add_argument("--rates", type=float, nargs="+", default=[128.0, 250.0], help="copies' rates, Hz")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--min-beats", type=int, default=100, help="judge a class only with this many reference beats")
    p.add_argument("--work", type=Path, help="folder for the copies and scores (default: a temporary one)")
    p.add_argument("--store", help="the model's preprocess store: also compare with `evaluate` on its DS2 beats")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = args.mirror / "mitdb" / "1.0.0"
    if not (src / "RECORDS").is_file():
        sys.exit(f"no MIT-BIH mirror at {src}")
    records = [str(r) for r in DS2]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-resampled-"))
    results: dict[float, dict] = {}
    try:
        inputs = {360.0: src}
        for fs in args.rates:
            t0 = time.perf_counter()
            inputs[fs] = make_copy(src, records, work / f"ds2-{fs:g}hz", fs)
            log.warning("DS2 at %g Hz written in %.1f s", fs, time.perf_counter() - t0)
        with dask_client(n_workers=args.workers, dashboard_address=None) as client:
            for fs, folder in inputs.items():
                out = work / f"scores-{fs:g}hz.zarr"
                shutil.rmtree(out, ignore_errors=True)
                req = ScoreRequest(model=str(args.model), out=str(out), input=str(folder), records=tuple(records),
                                   annotations="atr", config=ScoreConfig(), cache_dir=str(work / "cache"),
                                   summary=str(work / f"scores-{fs:g}hz.csv"))
                rep = run_scoring(req, client)
                if rep.failed:
                    log.warning("%g Hz: %d record(s) failed: %s", fs, len(rep.failed), rep.failed[:3])
                results[fs] = {"reference": rep.reference, "wall_s": rep.wall_s}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    base = results[360.0]["reference"]["classification"]["per_class"]
    classes = list(base)
    print(f"\nDS2 ({len(records)} records) scored with detected beats, per-class F1 of the matched beats; "
          f"model {args.model}")
    print(f"{'rate':>8} {'det Se':>7} {'det +P':>7} " + " ".join(f"{c:>14}" for c in classes) + f" {'wall s':>7}")
    verdicts = []
    for fs, res in results.items():
        ref = res["reference"]
        d, pc = ref["detector"], ref["classification"]["per_class"]
        cells = []
        for c in classes:
            f1 = pc[c]["f1"]
            if fs == 360.0:
                cells.append(f"{f1:>14.3f}")
                continue
            delta = f1 - base[c]["f1"]
            judged = base[c].get("support", 0) >= args.min_beats
            cells.append(f"{f1:>6.3f} ({delta:+.3f})" + ("" if judged else "*"))
            if judged:
                verdicts.append(abs(delta) <= TOLERANCE)
        print(f"{fs:>6g}Hz {d['sensitivity']:>7.4f} {d['positive_predictivity']:>7.4f} " + " ".join(cells)
              + f" {res['wall_s']:>7.1f}")
    print(f"(*: fewer than {args.min_beats} reference beats, not judged)")
    print(f"target: every judged class within {TOLERANCE} of 360 Hz -> {'met' if all(verdicts) else 'NOT met'}")
    if args.store:
        from ecg_pipeline.jobs.train import run_evaluation

        ev = run_evaluation(str(args.model), args.store, "inter-patient")["per_class"]
        diffs = {c: base[c]["f1"] - ev[c]["f1"] for c in classes if ev[c].get("support", 0) >= args.min_beats}
        print("evaluate (annotated DS2 beats of the store) vs score (detected, matched, 360 Hz), F1: " + ", ".join(
            f"{c} {ev[c]['f1']:.3f} / {base[c]['f1']:.3f} ({base[c]['f1'] - ev[c]['f1']:+.3f})" for c in classes))
        ok = all(abs(d) <= 0.02 for d in diffs.values())
        print(f"target: every judged class within 0.02 -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
