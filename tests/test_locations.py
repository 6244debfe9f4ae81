"""One helper for every path a user gives: local paths, file:// and fsspec URLs; --storage-option parsing; the
s3 extra's bound. (S3 itself: test_object_store.py, against a real S3-compatible server on 127.0.0.1.)"""

from __future__ import annotations

import os
import re
import tomllib

import fsspec
import pytest

from helpers import REPO
from ecg_pipeline.pipeline.errors import ConfigError
from ecg_pipeline.pipeline.locations import MIN_S3FS, check_s3fs, is_url, locate, parse_storage_options


def test_local_paths_and_file_urls_are_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("runs/r1", f"file://{tmp_path}/runs/r1", "~/x"):
        where = locate(given)
        assert where.local and os.path.isabs(where.path) and where.url == given
    assert locate("runs/r1").path == str(tmp_path / "runs" / "r1")
    assert not is_url("runs/r1") and not is_url("file:///a") and is_url("s3://b/k") and is_url("memory://x")


def test_a_url_stays_a_url_and_never_becomes_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = locate("memory://bucket/runs/r1").join("model.keras")
    assert not where.local and where.url == "memory://bucket/runs/r1/model.keras"
    where.write_bytes(b"abc")
    assert where.read_bytes() == b"abc" and where.isfile() and where.name == "model.keras"
    with where.local_file() as copy:
        assert open(copy, "rb").read() == b"abc" and copy.endswith("model.keras")
    with where.writing(suffix=".keras") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert where.read_bytes() == b"new"
    assert not where.create(b"x") and where.read_bytes() == b"new"  # exclusive create: taken
    where.remove()
    assert where.create(b"x") and where.read_bytes() == b"x"
    assert os.listdir(tmp_path) == []
    fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary(tmp_path):
    where = locate(str(tmp_path / "a.json"))
    where.write_text("old")
    with pytest.raises(RuntimeError):
        with where.writing() as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert where.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_exclusive_create_locally_has_one_winner(tmp_path):
    where = locate(str(tmp_path / "out.lock"))
    assert where.create(b"1") and not where.create(b"2") and where.read_bytes() == b"1"


def test_storage_options_go_to_urls_only():
    from ecg_pipeline.pipeline.locations import url_options

    opts = {"endpoint_url": "http://127.0.0.1:9000"}
    assert url_options("s3://b/x.zarr", opts) == opts and url_options("/data/x.zarr", opts) is None
    assert url_options("file:///data/x.zarr", opts) is None and url_options("s3://b/x.zarr", None) is None


def test_storage_options_from_the_command_line():
    got = parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=true", "default_block_size=5242880",
                                 "client_kwargs.region_name=eu-west-1", "profile=my=profile"])
    assert got == {"endpoint_url": "http://127.0.0.1:9000", "anon": True, "default_block_size": 5242880,
                   "client_kwargs": {"region_name": "eu-west-1"}, "profile": "my=profile"}
    assert parse_storage_options(None) == {}
    for bad in ("novalue", "=x"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_storage_options([bad])


def test_unknown_protocols_and_old_s3fs_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="not a path or URL|not installed"):
        locate("nosuchproto://x/y")
    with pytest.raises(ConfigError, match=r"s3fs 0\.4\.2 is too old.*ecg-pipeline\[s3\]"):
        check_s3fs("0.4.2")
    check_s3fs("2026.9.0")


def test_the_s3_extra_is_bounded_where_the_code_needs_it():
    """Unbounded, pip picks s3fs 0.4.2 beside a current boto3 (measured), which fails on the first job."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("s3", "test"):
        spec = next(d for d in extras[name] if d.startswith("s3fs"))
        assert re.fullmatch(rf"s3fs>={MIN_S3FS[0]}\.{MIN_S3FS[1]}", spec), spec
