"""The project's own promises: dependency lists agree, the README's commands are the ones CI runs."""

import re
import subprocess
import sys
import tomllib

import pytest

from helpers import REPO


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_agrees_with_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (REPO / "environment.yml").read_text()
    conda = {}
    for line in env.splitlines():
        m = re.match(r"\s+-\s+([A-Za-z0-9_.-]+)\s*([<>=!~].*)?$", line)
        if m and m.group(1) not in ("pip", "python"):
            conda[m.group(1).lower().replace("_", "-")] = (m.group(2) or "").strip()
    for d in deps:
        spec = d[len(_name(d)):].strip()
        assert _name(d) in conda, f"{_name(d)} is in pyproject.toml but not in environment.yml"
        assert conda[_name(d)] == spec, f"{_name(d)}: pyproject {spec!r} vs environment.yml {conda[_name(d)]!r}"


def test_readme_opens_with_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    first = blocks[0]
    assert re.search(r"^pip install -e \"?\.", first, re.M) and "ecg-pipeline preprocess mitdb --out mitdb.zarr" in first
    test_cmd = next(line for line in first.splitlines() if line.startswith("python -m pytest")).split("#")[0].strip()
    assert test_cmd in ci.splitlines()


def test_help_names_every_option_of_the_contract():
    out = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "--help"], capture_output=True, text=True)
    for opt in ("--out", "--version", "--db-version", "--source", "--scheduler", "--scheduler-file", "--workers",
                "--records", "--config", "--storage-option", "ECG_PIPELINE_SOURCE"):
        assert opt in out.stdout
    out = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "train", "--help"], capture_output=True, text=True)
    for opt in ("--store", "--split", "--model", "--epochs", "--out", "--scheduler", "--resume", "--config",
                "inter-patient", "intra-patient"):
        assert opt in out.stdout
    out = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "evaluate", "--help"], capture_output=True, text=True)
    for opt in ("--model", "--store", "--split", "--part", "--out", "--no-progress", "--storage-option"):
        assert opt in out.stdout


HEAVY = ("scipy", "tensorflow", "keras", "distributed", "dask", "xarray", "zarr")


def test_help_and_print_config_import_nothing_heavy(tmp_path):
    """`--help` and `--print-config` answer at once (~0.2 s, against ~2 s when they loaded SciPy and Dask):
    checked deterministically, by what they import, rather than by wall time."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("window: {before_s: 0.3}\n")
    commands = [["--help"], ["--version"], ["preprocess", "--help"], ["train", "--help"], ["evaluate", "--help"],
                ["score", "--help"], ["inspect", "--help"], ["preprocess", "mitdb", "--print-config"],
                ["preprocess", "mitdb", "--print-config", "--config", str(cfg)], ["train", "--print-config"],
                ["train", "--print-config", "--epochs", "3"], ["score", "--print-config"]]
    probe = ("import contextlib, io, json, sys\n"
             "from ecg_pipeline.jobs import cli\n"
             f"HEAVY = {HEAVY!r}\n"
             "for argv in json.loads(sys.argv[1]):\n"
             "    out = io.StringIO()\n"
             "    try:\n"
             "        with contextlib.redirect_stdout(out):\n"
             "            rc = cli.main(argv)\n"
             "    except SystemExit as exc:\n"
             "        rc = exc.code\n"
             "    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))\n"
             "    print(json.dumps([argv, rc, len(out.getvalue()), loaded]))\n")
    import json

    r = subprocess.run([sys.executable, "-c", probe, json.dumps(commands)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [argv for argv, *_ in results] == commands
    for argv, rc, n_out, loaded in results:
        assert rc in (0, None) and n_out > 0, (argv, rc, r.stderr)
        assert not loaded, f"`ecg-pipeline {' '.join(argv)}` imported {loaded}"


def test_train_defaults_match_the_schema_and_print():
    import yaml

    from ecg_pipeline.pipeline.config import TrainConfig, load_train_config

    out = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "train", "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert load_train_config(None) == TrainConfig() and yaml.safe_load(out.stdout) == TrainConfig().to_dict()


def test_installs_as_one_package_and_never_under_generic_names(tmp_path):
    """The wheel's only top-level name is ecg_pipeline; `import pipeline|jobs|schemas` fails from anywhere,
    and a user's own `pipeline/` folder on the path shadows nothing of ours."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ecg_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ecg_pipeline"}, top
    assert "ecg_pipeline/schemas/store-v5.json" in names and "ecg_pipeline/jobs/cli.py" in names

    own = tmp_path / "user"
    for name in ("pipeline", "jobs", "schemas"):
        (own / name).mkdir(parents=True)
        (own / name / "__init__.py").write_text("MINE = True\n")
    probe = ("import importlib, sys\n"
             "import ecg_pipeline.pipeline.store, ecg_pipeline.jobs.cli, ecg_pipeline.schemas as s\n"
             "assert s.load('store-v5.json') and not hasattr(ecg_pipeline.pipeline, 'MINE')\n"
             "for name in ('pipeline', 'jobs', 'schemas'):\n"
             "    try:\n"
             "        m = importlib.import_module(name)\n"
             "    except ImportError:\n"
             "        print(name, 'absent')\n"
             "    else:\n"
             "        print(name, 'mine' if getattr(m, 'MINE', False) else 'OURS')\n")
    for cwd in (REPO, own, tmp_path):
        r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "OURS" not in r.stdout, (cwd, r.stdout)
        if cwd == own:
            assert r.stdout.split().count("mine") == 3


def _job_imports(text: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from ecg_pipeline.jobs... import ...`` in a source text."""
    out = []
    for module, wrapped, names in re.findall(r"from ecg_pipeline\.jobs(\.\w+)? import (?:\(([^)]*)\)|([^\n#]+))", text):
        out += [(f"jobs{module}", n.strip()) for n in (wrapped or names).replace("\n", ",").split(",") if n.strip()]
    return out


def test_notebooks_and_benchmarks_use_the_jobs_public_api_only():
    """A notebook or benchmark imports a job's run_*/submit_* functions and its requests, reports and results;
    everything else it needs is in pipeline/ (a job's internals may move without notice)."""
    public = re.compile(r"^(run_\w+|submit_\w+|\w+Request|\w+Report|\w+Result)$")
    for path in [*sorted((REPO / "notebooks").glob("*.ipynb")), *sorted((REPO / "benchmarks").glob("*.py"))]:
        text = path.read_text(encoding="utf-8").replace('\\n",\n    "', "\n")  # a notebook's lines joined
        assert "ecg_pipeline.jobs.cli" not in text, f"{path.name} imports the command line"
        bad = [f"{m}.{n}" for m, n in _job_imports(text) if not public.match(n)]
        assert not bad, f"{path.name} imports job internals: {', '.join(bad)}"
        if path.suffix == ".ipynb":
            assert _job_imports(text) or "ecg_pipeline.pipeline" in text, f"{path.name}: the check read nothing"


def test_the_package_front_version_main_and_open_calls(tmp_path):
    """`python -m ecg_pipeline` is the command line; `ecg_pipeline.__version__` is the installed version; the two
    stores open with one call each (from any working directory, the checkout's included)."""
    import importlib.metadata

    for cwd in (REPO, tmp_path):
        r = subprocess.run([sys.executable, "-m", "ecg_pipeline", "--version"], capture_output=True, text=True,
                           cwd=cwd)
        assert r.returncode == 0 and r.stdout.strip() == f"ecg-pipeline {importlib.metadata.version('ecg-pipeline')}"
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline", "score", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--wfdb-out" in r.stdout
    import ecg_pipeline
    from ecg_pipeline.pipeline.scores import open_scores
    from ecg_pipeline.pipeline.store import open_dataset

    assert ecg_pipeline.__version__ == importlib.metadata.version("ecg-pipeline")
    assert ecg_pipeline.open_store.__doc__ and ecg_pipeline.open_scores.__doc__
    from ecg_pipeline.pipeline.errors import StoreError

    for front, inner in ((ecg_pipeline.open_store, open_dataset), (ecg_pipeline.open_scores, open_scores)):
        with pytest.raises(StoreError) as a:
            front(str(tmp_path / "absent.zarr"))
        with pytest.raises(StoreError) as b:
            inner(str(tmp_path / "absent.zarr"))
        assert str(a.value) == str(b.value)
