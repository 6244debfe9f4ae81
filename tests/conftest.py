"""Shared fixtures. Tools that write to $HOME are pointed at temporary folders."""

from __future__ import annotations

import os
import tempfile
from unittest import mock

import pytest

from helpers import MIRROR


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="ecg-pipeline-test-home-")
    for var in ("KERAS_HOME", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
                "MPLCONFIGDIR"):
        os.environ[var] = os.path.join(home, var.lower())
    os.environ["ECG_PIPELINE_CACHE"] = os.path.join(home, "cache")


@pytest.fixture
def environ_restored():
    """``os.environ`` put back as it was after the test. For tests that run ``cli.main`` in this process: it sets
    defaults there for its own process (``TF_CPP_MIN_LOG_LEVEL``, ``DASK_LOGGING__DISTRIBUTED``) that every later
    test, and every process they start, would otherwise inherit."""
    with mock.patch.dict(os.environ):  # restores the whole mapping on exit, added names removed
        yield


@pytest.fixture(scope="session")
def mirror():
    """The real PhysioNet mirror (../shared/physionet); tests that need it skip without it."""
    if not (MIRROR / "mitdb" / "1.0.0" / "RECORDS").is_file():
        pytest.skip(f"PhysioNet mirror not found at {MIRROR} (it is present in this project's CI)")
    return MIRROR


@pytest.fixture(scope="session")
def client():
    """A real local Dask cluster: 2 worker processes, 1 thread each."""
    from ecg_pipeline.pipeline.cluster import dask_client

    with dask_client(n_workers=2, dashboard_address=None) as c:
        yield c


SMALL_RECORDS = ("100", "119", "208", "209", "220")


@pytest.fixture(scope="session")
def small_store(mirror, tmp_path_factory):
    """A real store of five MIT-BIH records (N, S, V and F beats) in chunks of 256 segments."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("small-store")
    (tmp / "config.yaml").write_text("store:\n  chunk_size: 256\n")
    out = tmp / "small.zarr"
    r = subprocess.run([sys.executable, "-m", "ecg_pipeline.jobs.cli", "preprocess", "mitdb", "--source", mirror.as_uri(),
                        "--out", str(out), "--records", ",".join(SMALL_RECORDS), "--config", str(tmp / "config.yaml"),
                        "--workers", "2", "--cache-dir", str(tmp / "cache"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory):
    """A beat model with the pipeline's metadata and random weights: scoring needs its window and STFT, not skill
    (the fault and kill tests score with it)."""
    pytest.importorskip("tensorflow")
    from ecg_pipeline.pipeline import models
    from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec

    spec = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64)
    model = models.spectrogram_cnn((spec.n_freq, spec.n_time), 5, input_dtype="float32", width=4, dense=8)
    path = tmp_path_factory.mktemp("untrained-model") / "model.keras"
    models.save_model(model, path, {
        "package": "ecg-pipeline", "task": "beat", "anchor_kind": "r-peak", "classes": ["N", "S", "V", "F", "Q"],
        "input": {"shape": [spec.n_freq, spec.n_time], "dtype": "float32", "variable": "spectrogram"},
        "store": {"database": "mitdb", "spectrogram": spec.attrs(), "label_map": {}, "preprocess_config": {}}})
    return path
