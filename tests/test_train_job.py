"""The training and evaluation jobs on a small real store (five MIT-BIH records): real TensorFlow training,
resume from a checkpoint, the evaluate command, and submission to a real `dask scheduler` + `dask worker`
that declares a GPU resource."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from helpers import dask_processes  # noqa: E402
from ecg_pipeline.pipeline.store import open_dataset  # noqa: E402

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SPLIT = "train: ['208', '209', '220']\nval: ['119']\ntest: ['100']\n"
# refit_epochs 0: the refit runs as many epochs as the best one (the default, 10, would triple the test)
CONFIG = "batch_size: 128\npatience: 5\nrefit_epochs: 0\nmodel_options: {width: 8, dense: 32}\n"
OUTPUTS = ("model.keras", "metrics.json", "classification_report.txt", "curves.png", "confusion_counts.png",
           "confusion_ratios.png", "history.json", "history.csv", "split.json", "config.yaml", "run.json",
           "checkpoint.keras", "train_state.json")


def _without_metadata(src, dst):
    """A copy of the .keras archive ``src`` without its ecg_pipeline.json (as any plain ``model.save`` writes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename != "ecg_pipeline.json":
                zout.writestr(item, zin.read(item.filename))
    return dst


def _epoch_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("epoch ")]


def _cli(*args, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-files")
    (tmp / "split.yaml").write_text(SPLIT)
    (tmp / "config.yaml").write_text(CONFIG)
    return tmp


@pytest.fixture(scope="module")
def run(small_store, files):
    """Three epochs, without --no-progress: stdout is a pipe, as when a run is logged to a file."""
    out = files / "run"
    r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--config",
             str(files / "config.yaml"), "--epochs", "3", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def test_training_writes_every_output_and_learns(run, small_store):
    out, r = run
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    assert len(history["val_macro_f1"]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["part"] == "test" and metrics["support"] == int(np.sum(metrics["confusion_matrix"]))
    ds = open_dataset(str(small_store))
    assert metrics["support"] == int(ds.record_n_segments.values[list(ds.record_id.values).index("100")])
    assert metrics["accuracy"] > 0.5  # record 100 is ~99% N: a model that learnt anything gets most of it right
    report = (out / "classification_report.txt").read_text()
    assert f"{metrics['macro_f1']:.4f}" in report
    assert "macro F1" in r.stdout or "macro avg" in r.stdout


def test_progress_into_a_pipe_is_one_plain_line_an_epoch(run):
    _, r = run
    assert "\x1b[" not in r.stdout and "\r" not in r.stdout, r.stdout[-2000:]
    lines = _epoch_lines(r.stdout)
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], r.stdout[-2000:]
    for line in lines:
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"):
            assert re.search(rf"(^|  ){key} \S+", line), (key, line)
        assert re.search(r"  \d+\.\d s$", line), line
    assert "(best)" in lines[0]  # the first epoch is always the best so far
    assert "Epoch 1/3" not in r.stdout and "step" not in r.stdout  # no Keras progress output


def test_every_model_file_of_the_run_folder_is_self_describing(run):
    from ecg_pipeline.pipeline.models import read_metadata

    out, _ = run
    assert sorted(p.name for p in out.glob("*.keras")) == ["checkpoint.keras", "model.keras"]
    assert not list(out.glob("*.tmp*"))
    model, checkpoint = read_metadata(out / "model.keras"), read_metadata(out / "checkpoint.keras")
    state = json.loads((out / "train_state.json").read_text())
    assert model["train"]["complete"] and model["train"]["weights_epoch"] == state["best_epoch"]
    assert not checkpoint["train"]["complete"] and checkpoint["train"]["weights_epoch"] == state["epoch"] == 3
    assert {k: v for k, v in model.items() if k != "train"} == {k: v for k, v in checkpoint.items() if k != "train"}
    assert model["classes"] and model["store"]["spectrogram"]


def test_the_kept_model_is_refit_on_train_and_val_for_the_best_epochs(run):
    """``refit`` (the default): model.keras is a fresh model trained on train + val for the best epoch's count
    of epochs at the selection run's learning rates, its last half of epochs averaged, and says so."""
    from ecg_pipeline.pipeline.models import read_metadata

    out, r = run
    state = json.loads((out / "train_state.json").read_text())
    history = json.loads((out / "history.json").read_text())
    split = json.loads((out / "split.json").read_text())
    refit = read_metadata(out / "model.keras")["train"]["refit"]
    assert refit["epochs"] == state["best_epoch"] == state["refit_epochs"] >= 1
    assert refit["learning_rates"] == history["epoch_learning_rate"][: state["best_epoch"]]
    assert refit["n_segments"] == split["n_segments"]["train"] + split["n_segments"]["val"]
    best = state["best_epoch"]
    assert refit["averaged_epochs"] == list(range(best - (best + 1) // 2 + 1, best + 1))  # its last half
    assert json.loads((out / "run.json").read_text())["refit_epochs"] == state["best_epoch"]
    assert f"refit on train + val for {state['best_epoch']} epochs" in r.stdout
    assert "refit" not in read_metadata(out / "checkpoint.keras")["train"]


def test_without_refit_the_best_epoch_is_kept(small_store, files, tmp_path):
    from ecg_pipeline.pipeline.models import read_metadata

    (tmp_path / "config.yaml").write_text((files / "config.yaml").read_text() + "refit: false\n")
    r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--config",
             str(tmp_path / "config.yaml"), "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    train = read_metadata(tmp_path / "run" / "model.keras")["train"]
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert "refit" not in train and train["weights_epoch"] == state["best_epoch"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["refit_epochs"] == 0
    assert "refit on" not in r.stdout


def test_the_default_refit_trains_two_members_and_keeps_their_mean(run, small_store, files):
    """``members: 2`` (the default): the refit trains two models (own seeds) and model.keras averages them;
    evaluate and the metadata agree, the cost per segment is both members'."""
    from ecg_pipeline.jobs.train import run_evaluation
    from ecg_pipeline.pipeline.models import flops_per_segment, load_model, read_metadata

    out, r = run
    path = out / "model.keras"
    assert read_metadata(path)["train"]["refit"]["members"] == 2
    assert ", 2 members averaged (the model kept)" in r.stdout
    assert json.loads((out / "run.json").read_text())["members"] == 2
    model, _ = load_model(path)
    one, two = model.get_layer("member0"), model.get_layer("member1")
    assert not all(np.array_equal(a, b) for a, b in zip(one.get_weights(), two.get_weights()))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["flops_per_segment"] == flops_per_segment(model) == 2 * flops_per_segment(one)
    again = run_evaluation(str(path), str(small_store), str(files / "split.yaml"))
    assert again["confusion_matrix"] == metrics["confusion_matrix"]


def test_a_model_file_without_metadata_is_refused_in_one_line(run, small_store, files, tmp_path):
    out, _ = run
    bare = _without_metadata(out / "model.keras", tmp_path / "bare.keras")
    r = _cli("evaluate", "--model", str(bare), "--store", str(small_store), "--split", str(files / "split.yaml"))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    # the model card's refusal (ModelCard.read), the same words as score's below
    assert len(lines) == 1 and lines[0].startswith("ecg-pipeline: error: ") and "no ecg_pipeline.json metadata" in lines[0], \
        r.stderr[-3000:]
    assert str(bare) in lines[0] and "not saved by `ecg-pipeline train`" in lines[0]
    r = _cli("score", "--model", str(bare), "--input", str(tmp_path), "--out", str(tmp_path / "scores.zarr"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no ecg_pipeline.json metadata" in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "scores.zarr").exists()


def test_saved_model_takes_the_store_as_stored(run, small_store):
    from ecg_pipeline.pipeline.models import load_model

    out, _ = run
    model, meta = load_model(out / "model.keras")
    ds = open_dataset(str(small_store))
    assert meta["store"]["spectrogram"] == ds.attrs["spectrogram"]
    assert meta["classes"] == ds.attrs["classes"]
    # Fed by name from the store variables its metadata lists (the default model takes spectrogram, rr and
    # template), exactly as stored (float16 spectrograms and templates, float32 RR features).
    assert meta["input"]["variables"] == ["spectrogram", "rr", "template"] and meta["input"]["rr"] == ds.attrs["rr"]
    assert meta["input"]["template"] == ds.attrs["template"]
    x = {name: ds[name][:8].values for name in meta["input"]["variables"]}
    p = model.predict(x, verbose=0)
    assert p.shape == (8, 5) and np.allclose(p.sum(axis=1), 1, atol=1e-4)
    assert 0 < json.loads((out / "metrics.json").read_text())["flops_per_segment"] < 3e6


def test_evaluate_recomputes_the_metrics(run, small_store, files, tmp_path):
    out, _ = run
    r = _cli("evaluate", "--model", str(out / "model.keras"), "--store", str(small_store), "--split",
             str(files / "split.yaml"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "metrics.json").read_text())
    saved = json.loads((out / "metrics.json").read_text())
    assert again["confusion_matrix"] == saved["confusion_matrix"]
    assert f"{saved['accuracy']:.4f}" in r.stdout


def test_resume_continues_from_the_checkpoint(run, small_store, files, tmp_path):
    out, _ = run
    again = tmp_path / "run"
    shutil.copytree(out, again)
    # as an older version left it: the best epoch also in a best.keras without metadata
    _without_metadata(out / "model.keras", again / "best.keras")
    r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--out", str(again))
    assert r.returncode == 2 and "--resume" in r.stderr  # never silently overwrites a run
    r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--config",
             str(files / "config.yaml"), "--epochs", "4", "--out", str(again), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    before = json.loads((out / "history.json").read_text())
    after = json.loads((again / "history.json").read_text())
    assert len(after["loss"]) == 4 and after["loss"][:3] == before["loss"]
    assert json.loads((again / "train_state.json").read_text())["epoch"] == 4
    assert "\x1b[" not in r.stdout and "\r" not in r.stdout
    assert [line.split()[1] for line in _epoch_lines(r.stdout)] == ["4/4"]  # --no-progress: one line an epoch
    from ecg_pipeline.pipeline.models import read_metadata

    assert sorted(p.name for p in again.glob("*.keras")) == ["checkpoint.keras", "model.keras"]  # best.keras folded in
    for name in ("model.keras", "checkpoint.keras"):
        assert read_metadata(again / name)["train"]["epoch"] == 4, name


def test_bad_requests_exit_2(small_store, tmp_path):
    r = _cli("train", "--store", str(tmp_path / "absent.zarr"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no Zarr store" in r.stderr
    (tmp_path / "bad.yaml").write_text("epochs: -1\n")
    r = _cli("train", "--store", str(small_store), "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "epochs" in r.stderr


def test_submit_to_a_gpu_worker(small_store, files, tmp_path):
    """A real `dask scheduler` and a `dask worker --resources GPU=1`; the task runs on it (on CPU here)."""
    with dask_processes(tmp_path, n_workers=1, resources="GPU=1") as sched:
        r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--config",
                 str(files / "config.yaml"), "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--scheduler-file", str(sched))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "resources: {'GPU': 1.0}" in r.stderr
        run_info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run_info["epochs_run"] == 1 and os.getpid() != run_info.get("pid")
        r = _cli("train", "--store", str(small_store), "--split", str(files / "split.yaml"), "--epochs", "1",
                 "--out", str(tmp_path / "run2"), "--scheduler-file", str(sched), "--resources", "FPGA=1")
        assert r.returncode == 2 and "no worker of the cluster declares" in r.stderr


def test_evaluate_refuses_a_store_made_differently(run, mirror, tmp_path):
    """A model never meets spectrograms made with other window/STFT settings than it was trained on."""
    out, _ = run
    (tmp_path / "wide.yaml").write_text("window: {before_s: 0.3, after_s: 0.5}\n")
    store = tmp_path / "wide.zarr"
    r = _cli("preprocess", "mitdb", "--source", mirror.as_uri(), "--out", str(store), "--records", "100",
             "--config", str(tmp_path / "wide.yaml"), "--workers", "1", "--cache-dir", str(tmp_path / "cache"),
             "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "split.yaml").write_text("train: ['100']\ntest: ['100']\n")
    r = _cli("evaluate", "--model", str(out / "model.keras"), "--store", str(store), "--split",
             str(tmp_path / "split.yaml"), "--part", "train")
    assert r.returncode == 2 and "other parameters" in r.stderr and "n_after" in r.stderr, r.stderr[-2000:]
