"""Shared fixtures. Tools that write to $HOME are pointed at temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest

from helpers import MIRROR


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="ecg-pipeline-test-home-")
    for var in ("KERAS_HOME", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
                "MPLCONFIGDIR"):
        os.environ[var] = os.path.join(home, var.lower())
    os.environ["ECG_PIPELINE_CACHE"] = os.path.join(home, "cache")


@pytest.fixture(scope="session")
def mirror():
    """The real PhysioNet mirror (../shared/physionet); tests that need it skip without it."""
    if not (MIRROR / "mitdb" / "1.0.0" / "RECORDS").is_file():
        pytest.skip(f"PhysioNet mirror not found at {MIRROR} (it is present in this project's CI)")
    return MIRROR


@pytest.fixture(scope="session")
def client():
    """A real local Dask cluster: 2 worker processes, 1 thread each."""
    from pipeline.cluster import dask_client

    with dask_client(n_workers=2, dashboard_address=None) as c:
        yield c
