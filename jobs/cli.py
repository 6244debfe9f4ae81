"""``ecg-pipeline``: the command line.

    ecg-pipeline preprocess mitdb --out mitdb.zarr
    ecg-pipeline inspect mitdb.zarr
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import yaml

import pipeline
from pipeline.config import load_config
from pipeline.databases import DATABASES
from pipeline.download import DEFAULT_SOURCE
from pipeline.errors import PipelineError

log = logging.getLogger("ecg-pipeline")

EXIT_OK, EXIT_RECORDS_FAILED, EXIT_ERROR = 0, 1, 2


def _records_arg(text: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of record names, e.g. 100,101,102")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-pipeline",
        description="PhysioNet ECG databases -> beat spectrograms in labelled Zarr stores, on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {pipeline.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser(
        "preprocess",
        help="download, segment and transform a database into a Zarr store",
        description=(
            "Download a PhysioNet database on Dask workers, cut one window per annotated beat, "
            "compute its log-magnitude STFT and write everything into a chunked, labelled Zarr v3 store. "
            "Re-running over the same --out resumes: only missing or changed chunks are written."
        ),
        epilog=(
            "examples:\n"
            "  ecg-pipeline preprocess mitdb --out mitdb.zarr\n"
            "  ecg-pipeline preprocess mitdb --out s.zarr --records 100,101 --source /data/physionet\n"
            "  ecg-pipeline preprocess mitdb --out s.zarr --scheduler tcp://10.0.0.5:8786\n"
            "  ecg-pipeline preprocess mitdb --print-config > my.yaml   # edit, then --config my.yaml\n\n"
            "exit status: 0 every record succeeded, 1 some records failed (listed), 2 the job could not run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument("db", choices=sorted(DATABASES), metavar="DB", help=f"database ({', '.join(sorted(DATABASES))})")
    pre.add_argument("--out", help="output store: a path or fsspec URL (required unless --print-config)")
    pre.add_argument("--version", dest="db_version", metavar="VERSION",
                     help="database version (default: the version the project knows, e.g. mitdb 1.0.0)")
    pre.add_argument("--source", default=DEFAULT_SOURCE, metavar="URL",
                     help="root of a PhysioNet-style file tree <db>/<version>/...: https://, http://, file://, "
                          "s3:// or a local path (default: %(default)s)")
    pre.add_argument("--records", type=_records_arg, metavar="LIST", help="comma-separated subset of records")
    pre.add_argument("--config", metavar="FILE", help="YAML configuration (schemas/preprocess-config.schema.json)")
    pre.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    grp = pre.add_mutually_exclusive_group()
    grp.add_argument("--scheduler", metavar="ADDRESS", help="submit to this Dask scheduler (tcp://host:8786)")
    grp.add_argument("--scheduler-file", metavar="FILE", help="submit to the Dask scheduler described by this file")
    pre.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster (default: cores)")
    pre.add_argument("--cache-dir", metavar="DIR",
                     help="download cache on the workers (default: $ECG_PIPELINE_CACHE or ~/.cache/ecg-pipeline)")
    pre.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    pre.add_argument("--report", metavar="FILE", help="also write the run report as JSON")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")
    pre.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")

    ins = sub.add_parser("inspect", help="validate a store and print its summary",
                         description="Open a store with the schema check and print its per-record table and class counts.")
    ins.add_argument("store", help="store path or fsspec URL")
    ins.add_argument("--allow-incomplete", action="store_true", help="show a store whose job has not finished")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # distributed sets its logger to INFO when imported; its start/stop chatter is only wanted with -vv.
    import distributed  # noqa: F401

    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda desc, total: tqdm(total=total, desc=desc, unit="task", file=sys.stderr, leave=True)


def format_report(report) -> str:
    """The end-of-job summary table."""
    ok = [r for r in report.records if r.status == "ok"]
    lines = [
        "",
        f"{report.database} {report.version} -> {report.out}",
        f"  records     {len(ok)} done, {len(report.failed)} failed, {len(report.records)} total",
        f"  segments    {report.n_segments:,}   chunks written {report.chunks_written}, "
        f"already there {report.chunks_skipped}, of {report.chunks_total}",
        "  beats per class   " + "   ".join(f"{c} {n:,}" for c, n in report.beats_per_class.items()),
        f"  dropped     {sum(r.n_dropped_edge for r in report.records):,} at record edges, "
        f"{sum(r.n_dropped_invalid for r in report.records):,} over invalid samples, "
        f"{sum(r.n_dropped_unknown for r in report.records):,} unknown symbols "
        f"({sum(r.n_unknown for r in report.records):,} unknown in all)",
        f"  downloaded  {report.bytes_downloaded / 1e6:,.1f} MB",
        f"  wall time   {report.wall_s:.1f} s  ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.phase_s.items()) + ")",
    ]
    if report.missing_source_files:
        lines.append(f"  note: the source lacks {len(report.missing_source_files)} file(s) listed in SHA256SUMS.txt: "
                     f"{', '.join(report.missing_source_files)} (no record that succeeded needed them)")
    if report.failed:
        lines.append("  failed records:")
        lines += [f"    {r.record:>8}  {r.error}" for r in report.failed]
    return "\n".join(lines) + "\n"


def _report_json(report) -> dict:
    from dataclasses import asdict

    d = asdict(report)
    d["n_segments"] = report.n_segments
    d["ok"] = report.ok
    return d


def cmd_preprocess(args: argparse.Namespace) -> int:
    from jobs.preprocess import PreprocessRequest, run_preprocess
    from pipeline.cluster import dask_client

    config = load_config(args.config)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return EXIT_OK
    if not args.out:
        raise PipelineError("--out is required")
    request = PreprocessRequest(db=args.db, out=args.out, version=args.db_version, source=args.source,
                                records=args.records, cache_dir=args.cache_dir, config=config,
                                overwrite=args.overwrite)
    with dask_client(args.scheduler, args.scheduler_file, args.workers) as client:
        link = client.dashboard_link
        sys.stderr.write(f"Dask dashboard: {link}\n" if link else "Dask dashboard: not available\n")
        report = run_preprocess(request, client, progress=_progress(not args.no_progress))
    sys.stdout.write(format_report(report))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(_report_json(report), f, indent=2, default=str)
    return EXIT_OK if report.ok else EXIT_RECORDS_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.store import open_dataset

    ds = open_dataset(args.store, require_complete=not args.allow_incomplete)
    a = ds.attrs
    out = [f"{args.store}: {a['database']} {a['database_version']} ({a['database_title']}), "
           f"schema v{a['schema_version']}, complete={a['complete']}",
           f"  spectrogram {dict(ds.spectrogram.sizes)} {ds.spectrogram.dtype}, chunks {ds.spectrogram.encoding.get('chunks')}",
           f"  freq {float(ds.freq[0]):.1f}-{float(ds.freq[-1]):.1f} Hz, time {float(ds.time[0]):+.3f}..{float(ds.time[-1]):+.3f} s",
           "  beats per class   " + "   ".join(f"{c} {n:,}" for c, n in a.get("beats_per_class", {}).items()),
           f"  {'record':>8} {'status':>7} {'lead':>5} {'beats':>7} {'offset':>8} {'checksum':>9}  error"]
    for i in range(ds.sizes["record_id"]):
        row = {k: ds[k].values[i] for k in ("record_id", "record_status", "record_lead", "record_n_beats",
                                           "record_offset", "record_checksum", "record_error")}
        out.append(f"  {row['record_id']:>8} {row['record_status']:>7} {row['record_lead']:>5} {row['record_n_beats']:>7} "
                   f"{row['record_offset']:>8} {row['record_checksum']:>9}  {row['record_error']}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        if args.command == "preprocess":
            return cmd_preprocess(args)
        return cmd_inspect(args)
    except (PipelineError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"ecg-pipeline: error: {msg}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
