"""``ecg-pipeline``: the command line.

    ecg-pipeline preprocess mitdb --out mitdb.zarr
    ecg-pipeline inspect mitdb.zarr
    ecg-pipeline train --store mitdb.zarr --split inter-patient --out runs/mitdb
    ecg-pipeline evaluate --model runs/mitdb/model.keras --store mitdb.zarr --split inter-patient
    ecg-pipeline score --model runs/mitdb/model.keras --input recordings.zip --out scores.zarr
    ecg-pipeline plot scores.zarr --record 208 --start 60 --out plots/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Sequence

from .. import pipeline
from ..pipeline.databases import DATABASES
from ..pipeline.download import DEFAULT_SOURCE
from ..pipeline.errors import PipelineError
from ..pipeline.locations import locate, parse_storage_options
from ..pipeline.models import MODELS
from ..pipeline.splits import SPLITS
from ..pipeline.tables import TABLE_FORMATS
# _cluster, _print_config, _progress: the names the train and score commands call them by.
from .console import dask_session as _cluster, print_config as _print_config, progress_bars as _progress
from .console import job_cluster, setup_logging

# `--help` and `--print-config` must answer at once: this module imports no SciPy, TensorFlow, Dask,
# xarray or Zarr at the top (tests/test_project.py checks it). Each command imports what it runs.

EXIT_OK, EXIT_RECORDS_FAILED, EXIT_ERROR = 0, 1, 2


def _records_arg(text: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of record names, e.g. 100,101,102")
    return names


def _registry_help(registry) -> str:
    """``  name            help`` lines, wrapped, for a registry of ``name -> (factory, help)``."""
    import textwrap

    out = []
    for name, (_, text) in registry.items():
        lines = textwrap.wrap(text, 78) or [""]
        out.append(f"  {name:<15} {lines[0]}\n" + "".join(f"  {'':<15} {line}\n" for line in lines[1:]))
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-pipeline",
        description="PhysioNet ECG databases -> beat or rhythm-window spectrograms in labelled Zarr stores, on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {pipeline.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (_add_preprocess, _add_train, _add_evaluate, _add_score, _add_inspect, _add_plot):
        add(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--storage-option", action="append", metavar="KEY=VALUE", dest="storage_option",
            help="fsspec option for the job's s3:// (or other fsspec) stores, outputs, model and config files, "
                 "repeatable: endpoint_url=http://minio:9000, anon=true, profile=NAME (workers get them with the "
                 "job). Options per protocol, and those of --source: fsspec's configuration, e.g. "
                 "FSSPEC_S3_ENDPOINT_URL in the environment")
    return parser


def _add_preprocess(sub) -> None:
    """``preprocess DB --out STORE``."""
    pre = sub.add_parser(
        "preprocess",
        help="download, segment and transform a database into a Zarr store",
        description=(
            "Download a PhysioNet database on Dask workers, cut one window per annotated beat (beat databases) or "
            "fixed windows covering each recording (rhythm databases such as challenge-2017), "
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
    pre.add_argument("--db-version", "--version", dest="db_version", metavar="VERSION",
                     help="database version (default: the version the project knows, e.g. mitdb 1.0.0)")
    pre.add_argument("--source", metavar="URL",
                     help="root of a PhysioNet-style file tree <db>/<version>/...: https://, http://, file://, "
                          f"s3:// or a local path (default: $ECG_PIPELINE_SOURCE, else {DEFAULT_SOURCE})")
    pre.add_argument("--records", type=_records_arg, metavar="LIST", help="comma-separated subset of records")
    pre.add_argument("--config", metavar="FILE", help="YAML configuration (schemas/preprocess-config.schema.json)")
    pre.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    _cluster_args(pre, "submit to this Dask scheduler (tcp://host:8786)")
    pre.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    pre.add_argument("--report", metavar="FILE", help="also write the run report as JSON")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")
    pre.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _add_train(sub) -> None:
    """``train --store STORE --out RUN``."""
    tr = sub.add_parser(
        "train",
        help="train a CNN on a store's spectrograms and evaluate it",
        description=(
            "Train a 2D CNN on the spectrograms of a store written by `ecg-pipeline preprocess`, streaming "
            "Zarr chunks through tf.data. The epoch with the best validation macro F1 is kept (early stopping "
            "after `patience` epochs without improvement) and evaluated on the split's test part. Without "
            "--model/--epochs/--config, the defaults are the configuration whose figures the README reports."
        ),
        epilog=(
            "splits:\n" + _registry_help(SPLITS)
            + "  FILE            YAML/JSON {train: [records], val: [records], test: [records]}\n\n"
            "models:\n" + _registry_help(MODELS) + "\n"
            "examples:\n"
            "  ecg-pipeline train --store mitdb.zarr --split inter-patient --out runs/mitdb\n"
            "  ecg-pipeline train --store mitdb.zarr --split intra-patient --epochs 10 --out runs/intra\n"
            "  ecg-pipeline train --store mitdb.zarr --split inter-patient --out runs/mitdb --resume\n"
            "  ecg-pipeline train ... --scheduler tcp://gpu-node:8786    # on a worker started with --resources GPU=1\n\n"
            "writes to --out: model.keras, metrics.json, classification_report.txt, curves.png,\n"
            "confusion_counts.png, confusion_ratios.png, history.json/.csv, split.json, config.yaml, run.json,\n"
            "and checkpoint.keras + train_state.json for --resume\n\n"
            "exit status: 0 done, 2 the job could not run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--store", help="store written by `ecg-pipeline preprocess` (path or fsspec URL)")
    tr.add_argument("--split", metavar="SPLIT",
                    help=f"{', '.join(SPLITS)} or a split file (default: inter-patient for beat stores, stratified "
                         "for rhythm stores)")
    tr.add_argument("--out", help="run folder (required unless --print-config)")
    tr.add_argument("--model", choices=sorted(MODELS), metavar="MODEL",
                    help=f"{', '.join(MODELS)} (default: from the config; see models below)")
    tr.add_argument("--epochs", type=int, help="most epochs (default: from the config)")
    tr.add_argument("--seed", type=int, help="seed of weights, intra-patient split and loader order")
    tr.add_argument("--config", metavar="FILE", help="YAML training configuration (schemas/train-config.schema.json)")
    tr.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    grp = tr.add_mutually_exclusive_group()
    grp.add_argument("--scheduler", metavar="ADDRESS",
                     help="run as a task on this Dask cluster (tcp://host:8786); --store and --out must be "
                          "reachable from the worker (shared file system or fsspec URL)")
    grp.add_argument("--scheduler-file", metavar="FILE", help="the same, for the scheduler described by this file")
    tr.add_argument("--resources", default="GPU=1", metavar="SPEC",
                    help="worker resources the task needs with --scheduler, e.g. GPU=1; 'none' for any worker "
                         "(default: %(default)s)")
    tr.add_argument("--no-progress", action="store_true", help="one line an epoch instead of a progress bar")
    tr.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _add_evaluate(sub) -> None:
    """``evaluate --model M --store STORE``."""
    ev = sub.add_parser(
        "evaluate",
        help="recompute the metrics of a saved model on a store",
        description="Score a part of a split with a model saved by `ecg-pipeline train` and print (and, with --out, "
                    "write) the classification report, metrics.json and confusion matrix plots. The model is "
                    "loaded in Keras safe mode, and refused if its spectrogram parameters differ from the store's.",
        epilog="example:\n  ecg-pipeline evaluate --model runs/mitdb/model.keras --store mitdb.zarr --split inter-patient",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--model", required=True, help="model.keras written by `ecg-pipeline train`")
    ev.add_argument("--store", required=True, help="store (path or fsspec URL)")
    ev.add_argument("--split", help=f"{', '.join(SPLITS)} or a split file (default: the split the model was "
                                    "trained on, from its metadata)")
    ev.add_argument("--part", default="test", choices=("train", "val", "test"), help="part of the split (default: %(default)s)")
    ev.add_argument("--seed", type=int, help="intra-patient split seed (default: the model's training seed)")
    ev.add_argument("--out", help="also write metrics.json, classification_report.txt and plots here")
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress bar (there is one only when stdout is a terminal)")
    ev.add_argument("-v", "--verbose", action="count", default=0, help="more logging")


def _add_score(sub) -> None:
    """``score --model M --input IN --out SCORES``."""
    sc = sub.add_parser(
        "score",
        help="score every beat of an archive of ECG records with a trained model",
        description=(
            "Find the beats of every record in --input with an R-peak detector (annotations are not used to find "
            "them), cut and transform each beat exactly as the model's training store was (the window and STFT "
            "travel with the model), and score them with the model on Dask workers: each record planned first (header, lead, quality "
            "verdict, pieces), then one task per piece, the model loaded once per worker. Writes per-beat probabilities to a Zarr store "
            "and a per-record summary table. Where records carry reference annotations, also reports the "
            "detector's sensitivity and positive predictivity and per-class metrics (EC57 matching within 150 ms). "
            "Re-running over the same --out skips records already scored."
        ),
        epilog=(
            "inputs (records are found by their .hea headers, nested folders too):\n"
            "  --input recordings/             a folder\n"
            "  --input recordings.zip          a .zip, .tar, .tar.gz archive (members checked: no absolute or ..\n"
            "                                  paths, links or oversized contents)\n"
            "  --input s3://bucket/ecg/        any fsspec folder URL (RECORDS file or a listing; SHA256SUMS.txt\n"
            "                                  verified where present), or an archive URL\n"
            "  --db mitdb [--source URL]       a PhysioNet database (default source https://physionet.org/files/)\n\n"
            "examples:\n"
            "  ecg-pipeline score --model runs/mitdb/model.keras --input recordings.zip --out scores.zarr\n"
            "  ecg-pipeline score --model runs/mitdb/model.keras --db mitdb --records 100,101 --out s.zarr\n"
            "  ecg-pipeline score --model runs/cinc2017/model.keras --input path/to/A00003   # prints probabilities\n"
            "  ecg-pipeline score --model runs/mitdb/model.keras --input mitdb/208 --format csv  # one row per beat\n"
            "  ecg-pipeline score ... --scheduler tcp://10.0.0.5:8786\n\n"
            "writes: --out (Zarr: probability, predicted, reference per beat; per-record table), the summary\n"
            "table (--summary, default <out stem>.records.csv: scores.zarr -> scores.records.csv) and, with a\n"
            "reference, <out stem>.metrics.json; with --wfdb-out, one WFDB annotation file per record\n\n"
            "exit status: 0 every record scored, 1 some records failed (listed), 2 the job could not run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sc.add_argument("--model", help="model.keras written by `ecg-pipeline train` (loaded in Keras safe mode)")
    sc.add_argument("--input", metavar="PATH|URL", help="folder, .zip/.tar(.gz) archive, or fsspec URL of records; "
                                                        "or one record (path/to/100, or its URL): scored here, "
                                                        "without --out")
    sc.add_argument("--db", metavar="DB", help="score a PhysioNet database instead of --input")
    sc.add_argument("--source", metavar="URL", help="root of the PhysioNet-style tree for --db (default: "
                                                     f"$ECG_PIPELINE_SOURCE, else {DEFAULT_SOURCE})")
    sc.add_argument("--db-version", "--version", dest="db_version", metavar="VERSION", help="database version for --db")
    sc.add_argument("--records", type=_records_arg, metavar="LIST", help="comma-separated subset of records")
    sc.add_argument("--out", help="scores store: a path or fsspec URL (optional for a single record: its "
                                  "probabilities are printed)")
    sc.add_argument("--labels", metavar="FILE.csv",
                    help="rhythm models: reference classes as `record,label` lines (default: a REFERENCE.csv beside "
                         "the records, if there is one); the job then reports evaluate's metrics")
    ann = sc.add_mutually_exclusive_group()
    ann.add_argument("--annotations", metavar="EXT",
                     help="compare with reference annotation files <record>.EXT, and fail records without one "
                          "(default: compare where the model database's files, e.g. .atr, are present)")
    ann.add_argument("--no-annotations", action="store_true", help="do not compare with reference annotations")
    sc.add_argument("--summary", metavar="FILE",
                    help=f"per-record table: a file ending in {', '.join(TABLE_FORMATS)} (.parquet needs pyarrow; "
                         "default: <out without .zarr>.records.csv)")
    sc.add_argument("--format", choices=("text", "csv", "json"), default="text",
                    help="a single record without --out (scored in this process, no cluster): text (default), or "
                         "one row per beat or window with its class probabilities as csv or json")
    sc.add_argument("--wfdb-out", metavar="DIR",
                    help="also write each scored record as a WFDB annotation file DIR/<record>.ecgp (beats: their "
                         "class as WFDB code N S V F Q; rhythm: (AFIB-style notes), for wfdb.rdann, WFDB viewers "
                         "and bxb/rxr (path or fsspec URL)")
    sc.add_argument("--config", metavar="FILE", help="YAML scoring configuration (schemas/score-config.schema.json)")
    sc.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    _cluster_args(sc, "submit to this Dask scheduler (tcp://host:8786); folder and archive inputs must be on a "
                      "file system the workers share")
    sc.add_argument("--work-dir", metavar="DIR", help="where archives are extracted (default: <cache-dir>/archives)")
    sc.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    sc.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _add_inspect(sub) -> None:
    """``inspect STORE``."""
    ins = sub.add_parser("inspect", help="validate a store (spectrograms or scores) and print its summary",
                         description="Open a store written by `preprocess` or `score` with its schema check and print "
                                     "its per-record table and class counts.")
    ins.add_argument("store", help="store path or fsspec URL")
    ins.add_argument("--allow-incomplete", action="store_true", help="show a store whose job has not finished")


def _add_plot(sub) -> None:
    """``plot STORE [--record R] [--start S] [--seconds N] [--out DIR]``."""
    pl = sub.add_parser(
        "plot",
        help="draw a store as PNG figures: a spectrogram gallery, or a scored record's overview and ECG strip",
        description=(
            "Draw what a store holds, for people who never open a notebook. A spectrogram store (from `preprocess`) "
            "gives a gallery of stored spectrograms per class, each beside its waveform (read again from the "
            "store's source); with --record and --start also an ECG strip with the stored segments marked by their "
            "labels. A scores store (from `score`) gives, for one record, an overview over time (beats per class "
            "and the ectopic share; for rhythm models the windows' probabilities, episodes and time per class, the "
            "AF burden) and an ECG strip with each beat marked by its predicted class and, where the record has "
            "annotations, its reference class, mismatches highlighted (rhythm: the windows' classes as a band)."
        ),
        epilog=(
            "examples:\n"
            "  ecg-pipeline plot mitdb.zarr --out plots/                       # gallery of every record\n"
            "  ecg-pipeline plot mitdb.zarr --record 208 --start 120           # its gallery and a strip\n"
            "  ecg-pipeline plot scores.zarr --record 208 --start 60 --seconds 15\n"
            "  ecg-pipeline plot rhythm.zarr --record 201 --start 600 --seconds 120\n\n"
            "writes <store>[-<record>]-gallery.png, <store>-<record>-overview.png, <store>-<record>-strip-<start>s.png\n"
            "into --out and prints their paths.\n\n"
            "exit status: 0 figures written, 2 nothing could be drawn (unknown record, a time outside it, not a store)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("store", help="a store of `preprocess` or `score` (path or fsspec URL)")
    pl.add_argument("--record", metavar="NAME", help="the record to draw (default: all records for a gallery, the "
                                                     "first scored record for scores)")
    pl.add_argument("--start", type=float, metavar="SECONDS", help="where the ECG strip starts in the record (default "
                                                                 "for scores: shortly before the first ectopic beat "
                                                                 "or non-N window)")
    pl.add_argument("--seconds", type=float, metavar="N", help="length of the strip (default 10 s; 90 s for rhythm)")
    pl.add_argument("--out", default="plots", metavar="DIR", help="folder for the PNG files (default: plots)")
    pl.add_argument("--input", metavar="PATH|URL", help="where to read the records' samples: for a spectrogram store "
                                                        "the root of a PhysioNet-style tree (as preprocess --source), "
                                                        "for scores the records (as score --input); default: the "
                                                        "store's own source or input")
    pl.add_argument("--per-class", type=int, default=4, metavar="N", help="gallery: segments per class (default 4)")
    pl.add_argument("--seed", type=int, default=0, help="gallery: which segments are drawn (default 0)")
    pl.add_argument("--no-waveforms", action="store_true", help="gallery: spectrograms only (no record is read)")
    pl.add_argument("--cache-dir", metavar="DIR",
                    help="download cache (default: $ECG_PIPELINE_CACHE, else $XDG_CACHE_HOME/ecg-pipeline, "
                         "else ~/.cache/ecg-pipeline)")
    pl.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")


def _cluster_args(parser: argparse.ArgumentParser, scheduler_help: str) -> None:
    """--scheduler / --scheduler-file / --workers / --cache-dir, shared by the Dask jobs."""
    grp = parser.add_mutually_exclusive_group()
    grp.add_argument("--scheduler", metavar="ADDRESS", help=scheduler_help)
    grp.add_argument("--scheduler-file", metavar="FILE", help="submit to the Dask scheduler described by this file")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster (default: cores)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="download cache on the workers (default: $ECG_PIPELINE_CACHE, else "
                             "$XDG_CACHE_HOME/ecg-pipeline, else ~/.cache/ecg-pipeline)")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ..pipeline.config import load_config

    options = parse_storage_options(args.storage_option)
    config = load_config(args.config, dict(DATABASES[args.db].preprocess_defaults), options)
    if args.print_config:
        return _print_config(config)
    if not args.out:
        raise PipelineError("--out is required")
    from .preprocess import PreprocessRequest, run_preprocess

    request = PreprocessRequest(db=args.db, out=args.out, version=args.db_version, source=_source(args),
                                records=args.records, cache_dir=args.cache_dir, config=config,
                                overwrite=args.overwrite, storage_options=options)
    with _hint_source(args), job_cluster(args, args.out, "preprocess", n_workers=args.workers,
                                         storage_options=options) as client:
        report = run_preprocess(request, client, progress=_progress(not args.no_progress))
    sys.stdout.write(report.text())
    if args.report:
        locate(args.report, options).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return EXIT_OK if report.ok else EXIT_RECORDS_FAILED


@contextlib.contextmanager
def _hint_source(args: argparse.Namespace):
    """An unreachable default source (physionet.org) says how to use another one."""
    from ..pipeline.sources import SourceUnreachable

    try:
        yield
    except SourceUnreachable as exc:
        if args.source or os.environ.get("ECG_PIPELINE_SOURCE") or getattr(args, "input", None):
            raise
        raise SourceUnreachable(f"{exc}. To read a copy of the database instead, pass --source (a local folder, or "
                                "a file://, http(s):// or s3:// URL of a PhysioNet-style tree) or set "
                                "ECG_PIPELINE_SOURCE") from None


def _source(args: argparse.Namespace) -> str:
    """``--source``, else ``$ECG_PIPELINE_SOURCE``, else physionet.org."""
    return args.source or os.environ.get("ECG_PIPELINE_SOURCE") or DEFAULT_SOURCE


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..pipeline.reports import store_text

    sys.stdout.write(store_text(args.store, require_complete=not args.allow_incomplete,
                                storage_options=parse_storage_options(args.storage_option)))
    return EXIT_OK


def _resources_arg(text: str) -> dict[str, float] | None:
    if text.strip().lower() in ("", "none"):
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise PipelineError(f"--resources {text!r}: expected NAME=NUMBER[,NAME=NUMBER] or none") from None
        if not sep or not name.strip():
            raise PipelineError(f"--resources {text!r}: expected NAME=NUMBER[,NAME=NUMBER] or none")
    return out


def _store_task(store: str | None, storage_options: dict[str, Any]) -> str | None:
    """The ``task`` a store declares (its training defaults depend on it); None (the default task) when there is
    no store yet, or it is not one (the training job then says so clearly)."""
    if not store:
        return None
    from ..pipeline.store import store_task

    try:
        return store_task(store, storage_options)
    except PipelineError:
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipeline.config import load_train_config

    options = parse_storage_options(args.storage_option)
    config = load_train_config(args.config, _store_task(args.store, options), model=args.model, epochs=args.epochs,
                               seed=args.seed, storage_options=options)
    if args.print_config:
        return _print_config(config)
    if not args.store or not args.out:
        raise PipelineError("--store and --out are required")
    from .train import TrainRequest, format_result, run_training, submit_training

    remote = bool(args.scheduler or args.scheduler_file)

    request = TrainRequest(store=args.store, split=args.split, out=args.out, config=config, resume=args.resume,
                           overwrite=args.overwrite, storage_options=options,
                           verbose=2 if (args.no_progress or remote) else 1)
    if remote:
        resources = _resources_arg(args.resources)
        with _cluster(args) as client:
            sys.stderr.write(f"submitting to {client.scheduler.address} (resources: {resources or 'any worker'})\n")
            result = submit_training(request, client, resources)
    else:
        result = run_training(request)
    sys.stdout.write(format_result(result))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import run_evaluation
    from ..pipeline.evaluate import format_report

    metrics = run_evaluation(args.model, args.store, args.split, part=args.part, out=args.out, seed=args.seed,
                             storage_options=parse_storage_options(args.storage_option),
                             progress=not args.no_progress and sys.stdout.isatty())
    sys.stdout.write(format_report(metrics, f"{args.model} on {args.store}: {metrics['split']} split, {args.part} part"))
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from ..pipeline.config import load_score_config

    options = parse_storage_options(args.storage_option)
    config = load_score_config(args.config, options)
    if args.print_config:
        return _print_config(config)
    from ..pipeline.sources import single_record

    one = single_record(args.input)
    if args.model and args.input and not (args.out or one):
        raise PipelineError(f"--input {args.input} is not one WFDB record (no {args.input.rstrip('/')}.hea there); "
                            "give --out to score a folder, archive or URL of records")
    if not args.model or not (args.out or one):
        raise PipelineError("--model and --out are required (--out may be left out for a single record)")
    if not args.input and not args.db:
        raise PipelineError("give --input (a folder, archive or URL), or --db (with --source) for a PhysioNet database")
    if one and not args.out and not (args.scheduler or args.scheduler_file):
        return _predict_one(args, one, config, options)
    from ..pipeline.model_runtime import ModelFile
    from ..pipeline.scores import summary_path
    from .score import ScoreRequest, check_summary, run_scoring

    # Refuse an unsafe or foreign model file, or a summary that cannot be written, before starting a cluster.
    model = ModelFile.read(args.model, options)
    if args.out:
        check_summary(summary_path(args.out, args.summary))
    with contextlib.ExitStack() as stack:
        out = args.out or os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "scores.zarr")
        annotations = None if args.no_annotations else (args.annotations or "auto")
        request = ScoreRequest(model=model, out=out, input=one[0] if one else args.input, source=_source(args),
                               db=args.db, version=args.db_version, records=(one[1],) if one else args.records,
                               annotations=annotations, config=config, cache_dir=args.cache_dir,
                               work_dir=args.work_dir, summary=args.summary, overwrite=args.overwrite,
                               labels=args.labels, storage_options=options, wfdb_out=args.wfdb_out)
        from ..pipeline.lease import hold

        with _hint_source(args), hold(out, "score", storage_options=options), \
                _cluster(args, n_workers=args.workers) as client:  # the lease first, as above
            link = client.dashboard_link
            sys.stderr.write(f"Dask dashboard: {link}\n" if link else "Dask dashboard: not available\n")
            report = run_scoring(request, client, progress=_progress(not args.no_progress, unit="record"))
        sys.stdout.write(report.records_text() if one else report.text())
        if args.wfdb_out:
            sys.stdout.write(f"WFDB annotations: {args.wfdb_out}/<record>.ecgp (read with wfdb.rdann(record, 'ecgp'))\n")
    return EXIT_OK if report.ok else EXIT_RECORDS_FAILED


def _predict_one(args: argparse.Namespace, one: tuple[str, str], config, options) -> int:
    """``score --input RECORD`` without ``--out``: the record scored in this process, no cluster."""
    from ..pipeline.predict_one import score_one

    annotations = None if args.no_annotations else (args.annotations or "auto")
    result = score_one(args.model, one[0], one[1], config, annotations=annotations, labels=args.labels,
                       cache_dir=args.cache_dir, storage_options=options)
    if args.format == "csv":
        sys.stdout.write(result.frame().to_csv(index=False) if result.ok else result.text())
    else:
        sys.stdout.write(result.to_json() if args.format == "json" else result.text())
    return EXIT_OK if result.ok else EXIT_RECORDS_FAILED


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import PlotRequest, run_plot

    request = PlotRequest(store=args.store, out=args.out, record=args.record, start_s=args.start, seconds=args.seconds,
                          input=args.input, per_class=args.per_class, seed=args.seed, waveforms=not args.no_waveforms,
                          cache_dir=args.cache_dir, storage_options=parse_storage_options(args.storage_option))
    for path in run_plot(request):
        sys.stdout.write(f"{path}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's C++ log (CPU features, "failed call to cuInit" on machines without a GPU, tf.data
    # buffer notes) is noise on a command line; errors that matter reach Python as exceptions. -vv shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if getattr(args, "verbose", 0) >= 2 else "3")
    setup_logging(getattr(args, "verbose", 0))
    try:
        commands = {"preprocess": cmd_preprocess, "train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score,
                    "inspect": cmd_inspect, "plot": cmd_plot}
        return commands[args.command](args)
    except (PipelineError, KeyError, OSError) as exc:
        # A job-level error is one line; -v adds the traceback (for a task's error: the driver's side of it).
        if getattr(args, "verbose", 0):
            import traceback

            traceback.print_exc()
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"ecg-pipeline: error: {msg}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("ecg-pipeline: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
