"""Benchmark: the whole scoring path (detector, quality stage, beat model) under noise and on hand-held recordings.

Two measurements of a beat model, each with ``ecg-pipeline score``'s own job (``run_scoring``) on a local cluster:

* **noise stress set** (``benchmarks/stress.py``: MIT-BIH records with real recorded noise added at 24 ... -6 dB
  in alternating 2-minute stretches, as nstdb): per SNR, over the noisy stretches and over whole records,
  the share of detected beats that are *classified* (not judged unreadable, ``quality == 0``), and among the
  classified ones the V beats' positive predictivity, counted two ways: over every detection predicted V
  (an unmatched detection, a beat found in noise, is a false V) and over matched beats only (EC57's bxb
  matrix); V sensitivity over matched reference V beats, and the detector's Se / +P.
* **Challenge 2017** recordings (300 Hz, hand-held, lead I) labelled normal rhythm (``N``) and noisy (``~``):
  the share of classified beats that follow the previous detection by less than 0.36 s (a T wave counted as
  a beat, at any rate under 167 bpm) and the share predicted V.

``--part calibration`` takes the DS1 stress records and the even-numbered recordings of each Challenge 2017
class (in name order); ``--part report`` the DS2 records and the odd-numbered ones: thresholds are set on one and
reported on the other, never on a record name.

    python -m benchmarks.stress_scoring --model runs/beat/model.keras --stress runs/stress --part report \\
        [--config score.yaml] [--c17 200] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ecg_pipeline.jobs.score import ScoreRequest, run_scoring  # noqa: E402
from ecg_pipeline.pipeline.cluster import dask_client  # noqa: E402
from ecg_pipeline.pipeline.config import load_score_config  # noqa: E402
from ecg_pipeline.pipeline.scores import open_scores  # noqa: E402

from ecg_pipeline.pipeline.splits import DS1, DS2  # noqa: E402 - de Chazal's inter-patient split

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
SHORT_RR_S = 0.36
log = logging.getLogger("benchmarks.stress_scoring")


def score(client, model: str, out: Path, records: list[str], config, **where) -> "xr.Dataset":  # noqa: F821
    """Score ``records`` with the job and open the store."""
    req = ScoreRequest(model=model, out=str(out), records=tuple(records), config=config, overwrite=True, **where)
    rep = run_scoring(req, client)
    log.info("%s: %d records, %d beats in %.1f s", out.name, rep.n_records, rep.n_beats, rep.wall_s)
    return open_scores(str(out))


def _quality(ds) -> np.ndarray:
    """The segments' quality flags; all readable in a store written before the quality stage (schema 2)."""
    return ds["quality"].values if "quality" in ds else np.zeros(ds.sizes["segment"], np.uint8)


def _v_figures(ref: np.ndarray, pred: np.ndarray, quality: np.ndarray) -> dict[str, float]:
    classified = quality == 0
    called_v = classified & (pred == "V")
    true_v = called_v & (ref == "V")
    matched = ref != ""
    return {
        "beats": int(ref.size), "classified": float(classified.mean()) if ref.size else float("nan"),
        "v_called": int(called_v.sum()), "v_true": int(true_v.sum()),
        "v_ppv_all": float(true_v.sum() / called_v.sum()) if called_v.any() else float("nan"),
        "v_ppv_matched": float(true_v.sum() / (called_v & matched).sum()) if (called_v & matched).any() else float("nan"),
        "v_se": float(true_v.sum() / (matched & (ref == "V")).sum()) if (matched & (ref == "V")).any() else float("nan"),
        "unmatched": int((~matched).sum()),
    }


def stress_table(ds, manifest: dict) -> list[dict]:
    """Per SNR: the V figures over the noisy stretches and over whole records."""
    by_name = {e["record"]: e for e in manifest["records"]}
    rec = ds["record"].values.astype(str)
    anchor, pred = ds["anchor"].values, ds["predicted"].values.astype(str)
    ref, quality = ds["reference"].values.astype(str), _quality(ds)
    rows = []
    for snr in sorted({e["snr_db"] for e in by_name.values()}, reverse=True):
        names = [n for n, e in by_name.items() if e["snr_db"] == snr and n in set(rec)]
        whole = np.isin(rec, names)
        noisy = np.zeros(rec.size, bool)
        for n in names:
            here = rec == n
            for a, b in by_name[n]["noisy"]:
                noisy |= here & (anchor >= a) & (anchor < b)
        for part, mask in (("noisy stretches", noisy), ("whole records", whole)):
            rows.append({"snr_db": snr, "part": part, "records": len(names),
                         **_v_figures(ref[mask], pred[mask], quality[mask])})
        t = ds.sel(record_id=[n for n in names if n in ds["record_id"].values])
        tp, fn, fp = (int(t[f"record_{k}"].sum()) for k in ("tp", "fn", "fp"))
        rows[-1].update(det_se=tp / (tp + fn) if tp + fn else float("nan"),
                        det_ppv=tp / (tp + fp) if tp + fp else float("nan"))
    return rows


def c17_table(ds, labels: dict[str, str]) -> list[dict]:
    """Per reference class: classified beats following the previous detection by < 0.36 s, and predicted V."""
    rec = ds["record"].values.astype(str)
    anchor, pred, quality = ds["anchor"].values, ds["predicted"].values.astype(str), _quality(ds)
    fs = dict(zip(ds["record_id"].values.astype(str), ds["record_fs"].values))
    same = np.concatenate([[False], rec[1:] == rec[:-1]])
    gap = np.full(rec.size, np.inf)
    gap[1:] = np.diff(anchor) / np.array([fs[r] for r in rec[1:]])
    short = same & (gap < SHORT_RR_S)
    rows = []
    for cls in sorted(set(labels.values())):
        m = np.isin(rec, [r for r, c in labels.items() if c == cls])
        c = m & (quality == 0)
        rows.append({"class": cls, "records": len({r for r in rec[m]}), "beats": int(m.sum()),
                     "classified": float(c.sum() / m.sum()) if m.any() else float("nan"),
                     "short_rr": float((c & short).sum() / c.sum()) if c.any() else float("nan"),
                     "v_share": float((c & (pred == "V")).sum() / c.sum()) if c.any() else float("nan")})
    return rows


def c17_records(mirror: Path, part: str, n: int) -> dict[str, str]:
    """Challenge 2017 recordings of classes N and ~ of ``part`` (even / odd positions in name order), ``n`` at most
    of each."""
    import zipfile

    with zipfile.ZipFile(mirror / "challenge-2017" / "1.0.0" / "training2017.zip") as z:
        ref = dict(line.split(",") for line in z.read("training2017/REFERENCE.csv").decode().split())
    out = {}
    for cls in ("N", "~"):
        names = sorted(r for r, c in ref.items() if c == cls)[(part == "report")::2][:n]
        out.update({r: cls for r in names})
    return out


def markdown(stress: list[dict], c17: list[dict]) -> str:
    lines = ["| SNR dB | part | beats | classified | V called | V +P (all detections) | V +P (matched) | V Se | "
             "detector Se / +P |", "|---|---|---|---|---|---|---|---|---|"]
    for r in stress:
        det = f"{r['det_se']:.3f} / {r['det_ppv']:.3f}" if "det_se" in r else ""
        lines.append(f"| {r['snr_db']} | {r['part']} | {r['beats']:,} | {r['classified']:.3f} | {r['v_called']:,} | "
                     f"{r['v_ppv_all']:.3f} | {r['v_ppv_matched']:.3f} | {r['v_se']:.3f} | {det} |")
    lines += ["", "| Challenge 2017 class | recordings | beats | classified | RR < 0.36 s | V |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['records']} | {r['beats']:,} | {r['classified']:.3f} | {r['short_rr']:.4f} | "
              f"{r['v_share']:.4f} |" for r in c17]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="beat model (model.keras)")
    p.add_argument("--stress", type=Path, help="a stress set folder built by benchmarks/stress.py (none: skipped)")
    p.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="the PhysioNet mirror (Challenge 2017)")
    p.add_argument("--part", choices=("calibration", "report"), default="report")
    p.add_argument("--c17", type=int, default=200, help="Challenge 2017 recordings of each class (0: skipped)")
    p.add_argument("--config", help="score configuration (YAML)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for the scores stores (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the tables here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_score_config(args.config)
    work = args.work or Path(tempfile.mkdtemp(prefix="stress-scoring-"))
    work.mkdir(parents=True, exist_ok=True)
    stress, c17 = [], []
    t0 = time.perf_counter()
    with dask_client(n_workers=args.workers, dashboard_address=None) as client:
        if args.stress:
            manifest = json.loads((args.stress / "manifest.json").read_text())
            sources = DS1 if args.part == "calibration" else DS2
            names = [e["record"] for e in manifest["records"] if e["source"] in sources]
            ds = score(client, args.model, work / "stress.zarr", names, config, input=str(args.stress),
                       annotations="atr")
            stress = stress_table(ds, manifest)
        if args.c17:
            labels = c17_records(args.mirror, args.part, args.c17)
            ds = score(client, args.model, work / "c17.zarr", sorted(labels), config, db="challenge-2017",
                       source=args.mirror.resolve().as_uri(), annotations=None)
            c17 = c17_table(ds, labels)
    text = markdown(stress, c17)
    sys.stdout.write(text + f"\n\n({args.part} part, {time.perf_counter() - t0:.0f} s)\n")
    if args.json:
        args.json.write_text(json.dumps({"part": args.part, "model": args.model, "config": config.to_dict(),
                                         "stress": stress, "c17": c17}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
