"""The project's own promises: dependency lists agree, the README's commands are the ones CI runs."""

import re
import subprocess
import sys
import tomllib

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
    assert "pip install -e ." in first and "ecg-pipeline preprocess mitdb --out mitdb.zarr" in first
    test_cmd = next(line for line in first.splitlines() if line.startswith("python -m pytest")).split("#")[0].strip()
    assert test_cmd in ci.splitlines()


def test_help_names_every_option_of_the_contract():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "preprocess", "--help"], capture_output=True, text=True)
    for opt in ("--out", "--version", "--source", "--scheduler", "--scheduler-file", "--workers", "--records",
                "--config"):
        assert opt in out.stdout
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--help"], capture_output=True, text=True)
    for opt in ("--store", "--split", "--model", "--epochs", "--out", "--scheduler", "--resume", "--config",
                "inter-patient", "intra-patient"):
        assert opt in out.stdout
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--help"], capture_output=True, text=True)
    for opt in ("--model", "--store", "--split", "--part", "--out"):
        assert opt in out.stdout


def test_train_defaults_match_the_schema_and_print():
    import yaml

    from pipeline.config import TrainConfig, load_train_config

    out = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert load_train_config(None) == TrainConfig() and yaml.safe_load(out.stdout) == TrainConfig().to_dict()
