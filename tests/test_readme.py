"""The README's quick start, executed: every command of its "Quick start" block runs as written, in a fresh
folder, with only what a test must change: the PhysioNet mirror as `--source`, seven records instead of 48 (so
`--split inter-patient` becomes a split file giving them their inter-patient roles: DS1 training, DS1 validation,
DS2 test), one epoch of a small network, no progress bars."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# DS1 training records, two DS1 validation records and DS2 test records, so that `--split inter-patient` has all
# three parts; 208 and 232 are the ones the quick start scores.
RECORDS = "101,106,208,119,220,100,232"
SPLIT = "train: ['101', '106', '208']\nval: ['119', '220']\ntest: ['100', '232']\n"
SMALL = "batch_size: 256\npatience: 5\nrefit_epochs: 0\nmodel_options: {width: 8, dense: 32}\n"


def quick_start() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Quick start[^\n]*\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert block, "README.md has no Quick start section with a bash block"
    return [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_the_quick_start_runs_as_written(mirror, tmp_path):
    pytest.importorskip("tensorflow")
    commands = quick_start()
    assert [c[:2] for c in commands][:3] == [["ecg-pipeline", "preprocess"], ["ecg-pipeline", "inspect"],
                                            ["ecg-pipeline", "train"]]
    (tmp_path / "small.yaml").write_text(SMALL)
    (tmp_path / "split.yaml").write_text(SPLIT)
    added = {"preprocess": ["--source", mirror.as_uri(), "--records", RECORDS, "--workers", "2", "--no-progress"],
             "train": ["--epochs", "1", "--config", str(tmp_path / "small.yaml"), "--no-progress"],
             "score": ["--source", mirror.as_uri(), "--workers", "2", "--no-progress"]}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for argv in commands:
        assert argv[0] == "ecg-pipeline", argv
        args = [str(tmp_path / "split.yaml") if a == "inter-patient" and argv[i] == "--split" else a
                for i, a in enumerate(argv[1:])]
        cmd = [sys.executable, "-m", "ecg_pipeline", *args, *added.get(argv[1], [])]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, (shlex.join(argv), r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "runs" / "mitdb" / "model.keras").is_file() and (tmp_path / "scores.records.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "mitdb-gallery.png", "scores-208-overview.png", "scores-208-strip-60s.png"]
