"""Benchmark: R-peak detectors side by side on MIT-BIH and on the noise stress set (``benchmarks/stress.py``).

Detectors (``--detectors`` picks a subset; a peer that is not installed is reported as skipped, with the
reason, never a crash; ``pip install -e ".[bench]"`` installs them):

* ``ecg_pipeline``: this project's ``ecg_pipeline.pipeline.detect.detect_r_peaks`` (default spec), imported
  at run time: whatever version is checked out. ``--baseline-detector PATH`` adds a copy of another
  ``detect.py`` as the row ``ecg_pipeline (before)`` (``--baseline-config PATH``: with that version's
  ``config.py`` defaults; else the checked-out ``DetectorSpec()``);
* ``xqrs``, ``gqrs``: ``wfdb.processing.xqrs_detect`` and ``gqrs_detect`` (physical input);
* ``sleepecg``: ``sleepecg.detect_heartbeats`` (its C backend);
* ``neurokit``, ``neurokit-pantompkins``: NeuroKit2 ``ecg_peaks`` on ``ecg_clean`` with the same ``method``
  (``"neurokit"``, ``"pantompkins1985"``), cleaning timed too, as NeuroKit2 documents their use;
* ``hamilton``, ``engzee``, ``two-average``, ``swt``, ``pan-tompkins``: py-ecg-detectors
  (``ecgdetectors.Detectors(fs)``). Not run unless named: ``christov`` (per-sample Python loops: ~27 s per
  hour of ECG here, 3x GQRS, for a detector of the same family as Hamilton's), ``wqrs`` (its length transform
  is a Python loop over every sample and window, orders of magnitude slower; it marks QRS onsets, not R
  peaks) and ``matched-filter`` (needs a QRS template for the sampling rate: stock ones exist for 250 and
  360 Hz only, so it is no general detector).

Data: the 48 MIT-BIH records (lead as ``score`` picks it: ``choose_lead`` with the mitdb database's leads;
whole records) and, with ``--stress DIR``, a stress set built by ``benchmarks/stress.py`` (its records at
``--snrs``), scored over the whole records and over the noisy stretches only (reference beats and detections
inside the manifest's noisy ranges). Every signal goes to the detectors in millivolts, float64.

Scoring: ``match_beats`` (EC57: one-to-one within 150 ms) against ``label_beats(ann.sample, ann.symbol,
AAMI_EC57).sample``; gross figures: TP, FN, FP summed over records, Se = TP/(TP+FN), +P = TP/(TP+FP),
F1 = 2TP/(2TP+FN+FP); ``lag ms``: median of detection minus reference over matched beats (a detector that
reports a filtered signal's peak lags); ``s/h``: seconds of detector wall time per hour of ECG, one thread
(BLAS limited to 1), each detector warmed up on 10 s first (imports, JIT, templates). A detector that fails on
a record counts all that record's beats as missed and the failure in ``errors``.

Prints markdown tables; ``--json`` and ``--markdown`` write them to files too.

    python -m benchmarks.detectors [--stress runs/stress] [--snrs 24 18 12 6 0 -6] [--detectors ...]
                                   [--records 100 101 ...] [--stress-records 100 103 ...] [--datasets mitdb stress]
                                   [--quick] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
QUICK_RECORDS = ("100", "119")
log = logging.getLogger("benchmarks.detectors")


@dataclass(frozen=True)
class Detector:
    name: str
    label: str
    package: str  #: distribution whose version is reported
    make: Callable[[float], Callable[[np.ndarray], np.ndarray]]  #: fs -> x (mV) -> sample indices; imports here
    default: bool = True


def _ours(fs):
    from ecg_pipeline.pipeline.detect import detect_r_peaks

    return lambda x: detect_r_peaks(x, fs)


def _xqrs(fs):
    from wfdb import processing

    return lambda x: processing.xqrs_detect(x, fs, verbose=False)


def _gqrs(fs):
    from wfdb import processing

    return lambda x: processing.gqrs_detect(sig=x, fs=fs)


def _sleepecg(fs):
    import sleepecg

    return lambda x: sleepecg.detect_heartbeats(x, fs)


def _neurokit(method):
    def make(fs):
        import neurokit2 as nk

        def run(x):
            _, info = nk.ecg_peaks(nk.ecg_clean(x, sampling_rate=fs, method=method), sampling_rate=fs, method=method)
            return info["ECG_R_Peaks"]

        return run

    return make


def _ecgdetectors(method):
    def make(fs):
        from ecgdetectors import Detectors

        return getattr(Detectors(fs), f"{method}_detector")

    return make


DETECTORS: dict[str, Detector] = {d.name: d for d in [
    Detector("ecg_pipeline", "ecg_pipeline", "ecg-pipeline", _ours),
    Detector("xqrs", "wfdb XQRS", "wfdb", _xqrs),
    Detector("gqrs", "wfdb GQRS", "wfdb", _gqrs),
    Detector("sleepecg", "sleepecg", "sleepecg", _sleepecg),
    Detector("neurokit", "NeuroKit2 (neurokit)", "neurokit2", _neurokit("neurokit")),
    Detector("neurokit-pantompkins", "NeuroKit2 (pantompkins1985)", "neurokit2", _neurokit("pantompkins1985")),
    Detector("hamilton", "py-ecg-detectors Hamilton", "py-ecg-detectors", _ecgdetectors("hamilton")),
    Detector("engzee", "py-ecg-detectors Engzee", "py-ecg-detectors", _ecgdetectors("engzee")),
    Detector("two-average", "py-ecg-detectors two average", "py-ecg-detectors", _ecgdetectors("two_average")),
    Detector("swt", "py-ecg-detectors SWT", "py-ecg-detectors", _ecgdetectors("swt")),
    Detector("pan-tompkins", "py-ecg-detectors Pan-Tompkins", "py-ecg-detectors", _ecgdetectors("pan_tompkins")),
    Detector("christov", "py-ecg-detectors Christov", "py-ecg-detectors", _ecgdetectors("christov"), default=False),
    Detector("matched-filter", "py-ecg-detectors matched filter", "py-ecg-detectors", _ecgdetectors("matched_filter"),
             default=False),
    Detector("wqrs", "py-ecg-detectors WQRS", "py-ecg-detectors", _ecgdetectors("wqrs"), default=False),
]}
BEFORE = "ecg_pipeline-before"


def load_module(path: Path, name: str):
    """A copy of a ``pipeline/`` module (``detect.py``, ``config.py``), imported as a sibling of the installed
    ones so its relative imports (``from .config import ...``) resolve."""
    spec = importlib.util.spec_from_file_location(f"ecg_pipeline.pipeline.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def baseline_detector(path: Path, config: Path | None = None) -> Detector:
    def make(fs):
        module = load_module(Path(path), "_bench_detect_before")
        spec = load_module(Path(config), "_bench_config_before").DetectorSpec() if config else None
        return lambda x: module.detect_r_peaks(x, fs, spec)

    return Detector(BEFORE, "ecg_pipeline (before)", "ecg-pipeline", make)


def _detect_source() -> dict:
    """Which ``detect.py`` the ``ecg_pipeline`` row measured: its path, sha256, and the git state of the checkout."""
    import hashlib
    import subprocess

    from ecg_pipeline.pipeline import detect

    path = Path(detect.__file__)
    out = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    try:
        git = ["git", "-C", str(path.parent)]
        out["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        out["modified"] = bool(subprocess.run([*git, "status", "--porcelain", "--", path.name], capture_output=True,
                                              text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


@dataclass
class Case:
    """One signal to run every detector on."""

    dataset: str  #: "mitdb" or "stress"
    record: str
    snr: int | None
    fs: float
    x: np.ndarray  #: mV, float64
    reference: np.ndarray  #: reference beat samples (sorted)
    noisy: list[tuple[int, int]] = field(default_factory=list)


def _read(base: Path, record: str, n_max: int | None, leads: tuple[str, ...]) -> tuple[np.ndarray, float, np.ndarray]:
    import wfdb

    from ecg_pipeline.pipeline import quality, records
    from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats

    h = records.read_header(base, record)
    lead = records.choose_lead(h, leads, "first")
    h = h.for_lead(lead)
    n = h.sig_len if n_max is None else min(h.sig_len, n_max)
    x = records.read_signal(base, h, lead, 0, n).astype(np.float64) * (quality.mv_per_unit(h.units_of(lead)) or 1.0)
    ann = wfdb.rdann(str(base), "atr")
    ref = label_beats(ann.sample, ann.symbol, AAMI_EC57).sample
    return x, h.fs, np.sort(ref[(ref >= 0) & (ref < n)])


def mitdb_cases(mirror: Path, names: list[str], minutes: float | None):
    from ecg_pipeline.pipeline.databases import get_database

    db_dir = mirror / "mitdb" / "1.0.0"
    leads = get_database("mitdb").leads
    for rec in names:
        x, fs, ref = _read(db_dir / rec, rec, None if minutes is None else int(minutes * 60 * 360), leads)
        yield Case("mitdb", rec, None, fs, x, ref)


def stress_cases(folder: Path, sources: list[str] | None, snrs: list[int] | None, limit: int | None):
    from ecg_pipeline.pipeline.databases import get_database

    manifest = json.loads((folder / "manifest.json").read_text())
    leads = get_database("mitdb").leads
    entries = [e for e in manifest["records"] if (sources is None or e["source"] in sources)
               and (snrs is None or e["snr_db"] in snrs)]
    if limit is not None:
        keep = list(dict.fromkeys(e["source"] for e in entries))[:limit]
        entries = [e for e in entries if e["source"] in keep]
    for e in entries:
        x, fs, ref = _read(folder / e["record"], e["record"], None, leads)
        yield Case("stress", e["record"], e["snr_db"], fs, x, ref, [tuple(r) for r in e["noisy"]])


def _inside(samples: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(samples.size, bool)
    for a, b in ranges:
        m |= (samples >= a) & (samples < b)
    return m


@dataclass
class Tally:
    tp: int = 0
    fn: int = 0
    fp: int = 0
    seconds: float = 0.0
    hours: float = 0.0
    records: int = 0
    errors: int = 0
    lags: list = field(default_factory=list)

    def row(self) -> dict:
        tp, fn, fp = self.tp, self.fn, self.fp
        lag = np.concatenate(self.lags) if self.lags else np.zeros(0)
        return {"tp": tp, "fn": fn, "fp": fp, "se": tp / (tp + fn) if tp + fn else float("nan"),
                "ppv": tp / (tp + fp) if tp + fp else float("nan"),
                "f1": 2 * tp / (2 * tp + fn + fp) if tp + fn + fp else float("nan"),
                "lag_ms": float(np.median(lag)) if lag.size else float("nan"), "seconds": round(self.seconds, 3),
                "hours": round(self.hours, 4), "s_per_h": self.seconds / self.hours if self.hours else float("nan"),
                "records": self.records, "errors": self.errors}


def run(cases, detectors: list[Detector]) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Run every detector on every case. Returns (summary rows, per-record rows, skipped: name -> reason)."""
    import threadpoolctl

    from ecg_pipeline.pipeline.detect import match_beats

    threadpoolctl.threadpool_limits(limits=1)
    ready: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    tallies: dict[tuple, Tally] = defaultdict(Tally)
    per_record = []
    for case in cases:
        hours = case.x.size / case.fs / 3600
        for det in detectors:
            if det.name in skipped:
                continue
            if det.name not in ready:
                try:
                    fn = det.make(case.fs)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fn(case.x[:int(10 * case.fs)])  # warm-up: imports, JIT, templates
                    ready[det.name] = fn
                except ImportError as exc:
                    skipped[det.name] = f"not installed ({exc})"
                    log.warning("%s skipped: %s", det.name, skipped[det.name])
                    continue
                except Exception as exc:  # noqa: BLE001 - a broken peer is reported, not fatal
                    skipped[det.name] = f"failed to start: {type(exc).__name__}: {exc}"
                    log.warning("%s skipped: %s", det.name, skipped[det.name])
                    continue
            error = None
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    found = ready[det.name](case.x)
                seconds = time.perf_counter() - t0
                found = np.unique(np.asarray(found, dtype=np.int64).ravel())
                found = found[(found >= 0) & (found < case.x.size)]
            except Exception as exc:  # noqa: BLE001
                seconds = time.perf_counter() - t0
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s failed on %s: %s", det.name, case.record, error)
                found = np.zeros(0, np.int64)
            m = match_beats(case.reference, found, case.fs)
            ref_d = found[m.det_index] - case.reference[m.ref_index]
            scopes = [("whole", np.ones(case.reference.size, bool), np.ones(found.size, bool))]
            if case.dataset == "stress":
                scopes.append(("noisy", _inside(case.reference, case.noisy), _inside(found, case.noisy)))
            for scope, ref_in, det_in in scopes:
                matched_ref = np.zeros(case.reference.size, bool)
                matched_ref[m.ref_index] = True
                matched_det = np.zeros(found.size, bool)
                matched_det[m.det_index] = True
                tp = int((matched_ref & ref_in).sum())
                fn = int(ref_in.sum()) - tp
                fp = int((det_in & ~matched_det).sum())
                t = tallies[(case.dataset, case.snr, scope, det.name)]
                t.tp, t.fn, t.fp = t.tp + tp, t.fn + fn, t.fp + fp
                t.seconds += seconds
                t.hours += hours
                t.records += 1
                t.errors += error is not None
                t.lags.append(ref_d[ref_in[m.ref_index]] / case.fs * 1000)
                per_record.append({"dataset": case.dataset, "record": case.record, "snr_db": case.snr, "scope": scope,
                                   "detector": det.name, "tp": tp, "fn": fn, "fp": fp, "seconds": round(seconds, 4),
                                   **({"error": error} if error else {})})
        log.info("%s %s done", case.dataset, case.record)
    labels = {d.name: d.label for d in detectors}
    rows = [{"dataset": ds, "snr_db": snr, "scope": scope, "detector": name, "label": labels[name], **t.row()}
            for (ds, snr, scope, name), t in tallies.items()]
    return rows, per_record, skipped


def _f(v, spec=".4f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def markdown(rows: list[dict], detectors: list[Detector], skipped: dict[str, str], meta: dict) -> str:
    order = {d.name: i for i, d in enumerate(detectors)}
    out = []
    mit = sorted((r for r in rows if r["dataset"] == "mitdb"), key=lambda r: order[r["detector"]])
    if mit:
        out += [f"### MIT-BIH: {mit[0]['records']} records, {mit[0]['hours']:.2f} h of ECG (lead as `score` picks it)", "",
                "| detector | Se | +P | F1 | TP | FN | FP | lag ms | s/h | errors |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['label']} | {_f(r['se'])} | {_f(r['ppv'])} | {_f(r['f1'])} | {r['tp']} | {r['fn']} | {r['fp']} | "
                f"{_f(r['lag_ms'], '.0f')} | {_f(r['s_per_h'], '.2f')} | {r['errors']} |" for r in mit]
        out.append("")
    stress = [r for r in rows if r["dataset"] == "stress"]
    if stress:
        snrs = sorted({r["snr_db"] for r in stress}, reverse=True)
        by = {(r["snr_db"], r["scope"], r["detector"]): r for r in stress}
        one = next(r for r in stress if r["scope"] == "whole")
        out += [f"### Noise stress set: {one['records']} records per SNR ({meta.get('stress_sources', '?')}), F1 over "
                "the noisy stretches only", "",
                "| detector | " + " | ".join(f"{s} dB" for s in snrs) + " |", "|---|" + "---|" * len(snrs)]
        for d in sorted({r["detector"] for r in stress}, key=order.get):
            out.append(f"| {by[(snrs[0], 'noisy', d)]['label']} | "
                       + " | ".join(_f(by[(s, 'noisy', d)]['f1']) if (s, 'noisy', d) in by else "" for s in snrs) + " |")
        out += ["", "### Noise stress set by SNR: noisy stretches only, and whole records", "",
                "| SNR dB | detector | Se noisy | +P noisy | F1 noisy | Se whole | +P whole | F1 whole | s/h |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in snrs:
            for d in sorted({r["detector"] for r in stress if r["snr_db"] == s}, key=order.get):
                n, w = by[(s, "noisy", d)], by[(s, "whole", d)]
                out.append(f"| {s} | {w['label']} | {_f(n['se'])} | {_f(n['ppv'])} | {_f(n['f1'])} | {_f(w['se'])} | "
                           f"{_f(w['ppv'])} | {_f(w['f1'])} | {_f(w['s_per_h'], '.2f')} |")
        out.append("")
    if skipped:
        out += ["Skipped:", *[f"- {name}: {why}" for name, why in skipped.items()], ""]
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    return "\n".join(out) + "\n"


def _plain(v):
    """JSON-safe: NaN -> None, NumPy scalars -> Python."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return list(dict.fromkeys(p for v in values for p in v.replace(",", " ").split()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="PhysioNet mirror root (default: %(default)s)")
    p.add_argument("--stress", type=Path, help="a stress set built by benchmarks/stress.py (manifest.json inside)")
    p.add_argument("--datasets", nargs="+", choices=("mitdb", "stress"), help="default: mitdb, and stress with --stress")
    p.add_argument("--detectors", nargs="+", help=f"subset of: {', '.join(DETECTORS)} (default: those not marked "
                                                  "opt-in: all but christov, matched-filter, wqrs)")
    p.add_argument("--records", nargs="+", help="MIT-BIH records (default: all 48; --quick: 100 119)")
    p.add_argument("--stress-records", nargs="+", help="source records of the stress set to run (default: all)")
    p.add_argument("--snrs", nargs="+", type=int, help="SNRs of the stress set to run (default: all)")
    p.add_argument("--minutes", type=float, help="MIT-BIH: the first minutes of each record only")
    p.add_argument("--quick", action="store_true", help="2 MIT-BIH records x 5 minutes, 2 source records of the stress "
                                                        "set: a smoke test")
    p.add_argument("--baseline-detector", type=Path, help="a copy of an older pipeline/detect.py: the row "
                                                          "'ecg_pipeline (before)'")
    p.add_argument("--baseline-config", type=Path, help="that version's pipeline/config.py (its DetectorSpec defaults)")
    p.add_argument("--json", type=Path, help="write the results (summary and per record) here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    names = _names(args.detectors) or [n for n, d in DETECTORS.items() if d.default]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        p.error(f"unknown detectors {unknown}; choose from {list(DETECTORS)}")
    detectors = [DETECTORS[n] for n in names]
    if args.baseline_detector:
        detectors.insert(1 if names[0] == "ecg_pipeline" else 0, baseline_detector(args.baseline_detector,
                                                                                    args.baseline_config))
    datasets = args.datasets or (["mitdb", "stress"] if args.stress else ["mitdb"])
    if "stress" in datasets and not args.stress:
        p.error("--datasets stress needs --stress DIR (build one with python -m benchmarks.stress)")
    db_dir = args.mirror / "mitdb" / "1.0.0"
    if "mitdb" in datasets and not (db_dir / "RECORDS").is_file():
        sys.exit(f"no MIT-BIH mirror at {db_dir}")
    records = _names(args.records) or (list(QUICK_RECORDS) if args.quick else (db_dir / "RECORDS").read_text().split())
    minutes = args.minutes if args.minutes is not None else (5.0 if args.quick else None)

    def cases():
        if "mitdb" in datasets:
            yield from mitdb_cases(args.mirror, records, minutes)
        if "stress" in datasets:
            yield from stress_cases(args.stress, _names(args.stress_records), args.snrs, 2 if args.quick else None)

    detect_py = _detect_source() if "ecg_pipeline" in names else None  # the version imported now, not at the end
    t0 = time.perf_counter()
    rows, per_record, skipped = run(cases(), detectors)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "wall_s": round(time.perf_counter() - t0, 1),
            "versions": {pkg: _version(pkg) for pkg in dict.fromkeys(d.package for d in detectors)},
            "mitdb_records": records if "mitdb" in datasets else [], "minutes": minutes,
            "stress": str(args.stress) if args.stress else None,
            "detectors": [d.name for d in detectors], "baseline_detector": str(args.baseline_detector or "") or None,
            "detect_py": detect_py}
    if "stress" in datasets:
        run_sources = sorted({r["record"] for r in per_record if r["dataset"] == "stress"})
        meta["stress_records"] = run_sources
        srcs = sorted({s.split("e")[0] for s in run_sources})
        meta["stress_sources"] = f"sources {' '.join(srcs)}"
    text = markdown(rows, detectors, skipped, meta)
    if args.json:
        doc = {"meta": meta, "skipped": skipped, "results": rows, "per_record": per_record}
        args.json.write_text(json.dumps(_plain(doc), indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
