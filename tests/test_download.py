import hashlib
import socket
from pathlib import Path

import pytest

from helpers import Faults, HTTPMirror, make_db
from ecg_pipeline.pipeline import download
from ecg_pipeline.pipeline.errors import ChecksumError, DownloadError, SourceNotFound

FAST = download.RetryPolicy(retries=2, backoff_s=0.01, timeout_s=5)


@pytest.fixture
def db(tmp_path):
    root = tmp_path / "src"
    make_db(root, {"100": {}, "101": {"seed": 1}})
    return root


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fetch_verifies_writes_atomically_and_resumes(db, tmp_path):
    sums = download.parse_sha256sums((db / "mitdb/0.0.1/SHA256SUMS.txt").read_text())
    with HTTPMirror(db) as srv:
        fs, root = download.open_source(srv.url, FAST)
        base = download.database_root(root, "mitdb", "0.0.1")
        cache = tmp_path / "cache"
        r = download.fetch_file(fs, base, "100.dat", cache, sums["100.dat"], FAST)
        assert r.checksum == "verified" and r.bytes_downloaded == (db / "mitdb/0.0.1/100.dat").stat().st_size
        assert _sha(cache / "100.dat") == sums["100.dat"]
        assert not list(cache.glob(".*.part"))
        # One request a file: one GET, streamed, and no HEAD to ask its size first.
        assert srv.faults.requests == ["/mitdb/0.0.1/100.dat"] and srv.faults.heads == []
        n_requests = len(srv.faults.requests)
        again = download.fetch_file(fs, base, "100.dat", cache, sums["100.dat"], FAST)
        assert again.bytes_downloaded == 0 and len(srv.faults.requests) == n_requests  # no second GET
        # a cached file changed behind our back is fetched again
        (cache / "100.dat").write_bytes(b"garbage")
        third = download.fetch_file(fs, base, "100.dat", cache, sums["100.dat"], FAST)
        assert third.bytes_downloaded > 0 and _sha(cache / "100.dat") == sums["100.dat"]


def test_checksum_mismatch_leaves_nothing_under_the_final_name(db, tmp_path):
    sums = download.parse_sha256sums((db / "mitdb/0.0.1/SHA256SUMS.txt").read_text())
    with HTTPMirror(db, Faults(corrupt={"100.dat"})) as srv:
        fs, root = download.open_source(srv.url, FAST)
        with pytest.raises(ChecksumError, match="100.dat: SHA-256 mismatch"):
            download.fetch_file(fs, download.database_root(root, "mitdb", "0.0.1"), "100.dat", tmp_path / "c",
                                sums["100.dat"], FAST)
        assert sum(p.endswith("100.dat") for p in srv.faults.requests) == FAST.retries + 1
    assert not (tmp_path / "c" / "100.dat").exists()
    assert not list((tmp_path / "c").glob(".*part"))


def test_transient_errors_are_retried(db, tmp_path):
    with HTTPMirror(db, Faults(fail_first={"100.hea": 2})) as srv:
        fs, root = download.open_source(srv.url, FAST)
        r = download.fetch_file(fs, download.database_root(root, "mitdb", "0.0.1"), "100.hea", tmp_path, None, FAST)
        assert r.checksum == "unlisted" and (tmp_path / "100.hea").exists()
        assert sum(p.endswith("100.hea") for p in srv.faults.requests) == 3


def test_missing_file_is_not_retried(db, tmp_path):
    with HTTPMirror(db) as srv:
        fs, root = download.open_source(srv.url, FAST)
        with pytest.raises(SourceNotFound, match="not found at source"):
            download.fetch_file(fs, download.database_root(root, "mitdb", "0.0.1"), "999.dat", tmp_path, None, FAST)
        assert sum(p.endswith("999.dat") for p in srv.faults.requests) == 1


def test_unreachable_source_fails_after_retries(tmp_path):
    # The port stays bound, never listening, for the whole test: connections to it are refused, and no other
    # process can start listening on it meanwhile (a port closed here could be taken by anyone at once).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        fs, root = download.open_source(f"http://127.0.0.1:{port}/", FAST)
        with pytest.raises(DownloadError, match=r"failed after 3 attempts"):
            download.fetch_file(fs, download.database_root(root, "mitdb", "1.0.0"), "100.hea", tmp_path, None, FAST)


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_local_sources(db, tmp_path, form):
    url = str(db) if form == "path" else db.as_uri()
    m = download.fetch_manifest(url, "mitdb", "0.0.1", FAST)
    assert m.records == ("100", "101") and m.has_checksums and m.missing == ()
    fs, root = download.open_source(url, FAST)
    r = download.fetch_file(fs, download.database_root(root, "mitdb", "0.0.1"), "101.atr", tmp_path, m.sha256["101.atr"])
    assert r.checksum == "verified"


def test_manifest_reports_files_the_source_lacks(db):
    folder = db / "mitdb/0.0.1"
    (folder / "101.atr").unlink()
    with HTTPMirror(db) as srv:
        m = download.fetch_manifest(srv.url, "mitdb", "0.0.1", FAST)
    assert m.missing == ("101.atr",)


def test_manifest_without_checksums(db):
    (db / "mitdb/0.0.1/SHA256SUMS.txt").unlink()
    m = download.fetch_manifest(str(db), "mitdb", "0.0.1", FAST)
    assert not m.has_checksums and m.sha256 == {} and m.records == ("100", "101")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "x\\y", "", "a//b", "100 .dat"])
def test_hostile_names_are_refused(name):
    with pytest.raises(ValueError, match="unsafe file name"):
        download.safe_name(name)


def test_parse_sha256sums():
    h = "a" * 64
    assert download.parse_sha256sums(f"{h}  100.dat\n{h.upper()} *x_mitdb/x_111.atr\n\n") == {
        "100.dat": h, "x_mitdb/x_111.atr": h}
    with pytest.raises(ValueError, match="line 1"):
        download.parse_sha256sums("nothex  100.dat\n")


def test_a_stalled_server_times_out_and_each_retry_says_why(tmp_path, caplog):
    """A server that accepts the connection and never answers: the timeout's exception has no message of its own."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # kept open, never answered
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    policy = FAST.model_copy(update={"timeout_s": 0.5})
    try:
        fs, root = download.open_source(f"http://127.0.0.1:{server.getsockname()[1]}/", policy)
        with pytest.raises(DownloadError, match=r"failed after 3 attempts: \w*Timeout\w*"):
            download.fetch_file(fs, download.database_root(root, "mitdb", "1.0.0"), "100.hea", tmp_path, None, policy)
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
    retries = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert len(retries) == 2 and all("failed (" in m and "failed ()" not in m for m in retries), retries
