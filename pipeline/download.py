"""Stage 1: fetch PhysioNet files from any fsspec source into a local cache.

Every file is streamed to a temporary name beside its target, hashed on the way,
checked against ``SHA256SUMS.txt`` when the database publishes one, and only then
renamed into place (``os.replace`` is atomic), so no partial or corrupt file ever
sits under its final name. A small marker under ``.verified/`` remembers that a
cached file was checked, so a re-run skips it without hashing it again.

``wfdb.dl_database``/``dl_files`` are not used: they ask physionet.org for the
version whatever the mirror, and can leave a corrupt ``.dat`` on a re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import fsspec
from fsspec.spec import AbstractFileSystem

from .config import DownloadConfig
from .errors import CacheError, ChecksumError, DownloadError, SourceNotFound

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "https://physionet.org/files/"


def default_cache_dir() -> Path:
    """``$ECG_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/ecg-pipeline``, else ``~/.cache/ecg-pipeline``."""
    if os.environ.get("ECG_PIPELINE_CACHE"):
        return Path(os.environ["ECG_PIPELINE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "ecg-pipeline"


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir`` (``~`` expanded), or ``default_cache_dir()`` when None: read where a task runs (a worker's
    environment names its own cache)."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")


#: Attempts, back-off and timeouts of source requests: the configuration's ``download`` section itself
#: (one declaration, ``config.DownloadConfig``), so no job maps one onto the other.
RetryPolicy = DownloadConfig


@dataclass(frozen=True)
class FetchResult:
    """One file in the local cache."""

    name: str  #: path relative to the database folder
    path: Path  #: local path
    sha256: str
    checksum: Literal["verified", "unlisted"]  #: matched SHA256SUMS.txt, or not listed there
    bytes_downloaded: int  #: 0 when the cached copy was reused
    seconds: float


@dataclass(frozen=True)
class Manifest:
    """What the source says about a database before any record is fetched."""

    records: tuple[str, ...] | None  #: the RECORDS file, or None when the source has none
    sha256: Mapping[str, str]  #: SHA256SUMS.txt entries (relative name -> hex digest)
    has_checksums: bool
    missing: tuple[str, ...]  #: files SHA256SUMS.txt lists that the source's listing lacks
    listing_error: str | None  #: why the missing-file check could not run, if it could not


def safe_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside a database folder.

    Record names come from the source (``RECORDS``, headers); a name such as
    ``../../x`` or ``/etc/x`` must never choose where a file is written.
    """
    if not _SAFE_NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"unsafe file name {name!r} (expected a relative path of [A-Za-z0-9_.+-] parts)")
    return name


def open_source(url: str, policy: RetryPolicy = RetryPolicy()) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem and root path of a PhysioNet-style file tree.

    ``url`` is any fsspec URL or a local path: ``https://physionet.org/files/``,
    ``http://127.0.0.1:8000/``, ``file:///data/physionet``, ``/data/physionet``,
    ``s3://bucket/physionet``.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options: dict = {}
    if protocol in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=policy.timeout_s)}
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


def database_root(source_root: str, db: str, version: str) -> str:
    """Path of ``<db>/<version>`` under a source root."""
    return posixpath.join(source_root, safe_name(db), safe_name(version))


def parse_sha256sums(text: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>`` per line)."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise ValueError(f"SHA256SUMS.txt line {lineno} is not '<sha256>  <file>': {line[:80]!r}")
        out[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return out


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return True
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError and friends
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429)


def _retrying(what: str, policy: RetryPolicy, fn):
    """Call ``fn()``; retry transient errors with exponential back-off."""
    error: BaseException | None = None
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except FileNotFoundError as exc:
            # fsspec's HTTP backend turns *any* failure of its info request (connection
            # refused included) into FileNotFoundError: only a bare one or a 404 means "absent".
            cause = exc.__cause__
            if cause is None or isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404:
                raise SourceNotFound(f"{what}: not found at source") from exc
            error = cause
        except ChecksumError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - classified below
            error = exc
        if _is_permanent(error):
            raise DownloadError(f"{what}: {_cause(error)}") from error
        if attempt < policy.retries:
            delay = policy.backoff_s * 2**attempt
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", what, attempt + 1, _cause(error), delay)
            time.sleep(delay)
    if isinstance(error, ChecksumError):
        raise error
    raise DownloadError(
        f"{what}: failed after {policy.retries + 1} attempts: {_cause(error)}"
    ) from error


def _cause(error: BaseException | None) -> str:
    """``Type: message``, or the type alone for errors without a message (a timeout's is empty)."""
    text = str(error) if error is not None else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_in_place(folder: Path, name: str, expected_sha256: str | None) -> FetchResult:
    """A file of a local (or network) folder, read where it is: hashed and checked against ``expected_sha256``.

    Raises
    ------
    SourceNotFound
        The folder has no such file.
    ChecksumError
        Its bytes do not match ``expected_sha256``.
    """
    start = time.perf_counter()
    path = Path(folder) / name
    try:
        with open(path, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SourceNotFound(f"{name}: not found in {folder}") from None
    if expected_sha256 is not None and got != expected_sha256:
        raise ChecksumError(f"{name}: SHA-256 mismatch (SHA256SUMS.txt {expected_sha256[:12]}..., got {got[:12]}..., "
                            f"{path.stat().st_size} bytes)")
    return FetchResult(name, path, got, "verified" if expected_sha256 else "unlisted", 0, time.perf_counter() - start)


def read_text(fs: AbstractFileSystem, path: str, policy: RetryPolicy = RetryPolicy()) -> str:
    """Read a small text file from the source, with retries."""
    return _retrying(path, policy, lambda: fs.cat_file(path)).decode("utf-8")


def fetch_manifest(source: str, db: str, version: str, policy: RetryPolicy = RetryPolicy()) -> Manifest:
    """Read ``RECORDS`` and ``SHA256SUMS.txt`` and list the database folder.

    The listing finds files that ``SHA256SUMS.txt`` names but the source lacks
    (mitdb's ``102-0.atr`` on some mirrors): they are reported, not fatal; a record
    that needs one fails on its own download.
    """
    fs, root = open_source(source, policy)
    return read_manifest(fs, database_root(root, db, version), policy)


def read_manifest(fs: AbstractFileSystem, base: str, policy: RetryPolicy = RetryPolicy()) -> Manifest:
    """``fetch_manifest`` for any folder ``base`` of ``fs`` (``RECORDS`` and ``SHA256SUMS.txt`` are optional)."""
    try:
        # Names are checked (safe_name) by the task of each record, so one hostile entry fails alone.
        records = tuple(read_text(fs, posixpath.join(base, "RECORDS"), policy).split())
    except SourceNotFound:
        records = None
    try:
        sums = parse_sha256sums(read_text(fs, posixpath.join(base, "SHA256SUMS.txt"), policy))
        has_checksums = True
    except SourceNotFound:
        sums, has_checksums = {}, False
    missing: tuple[str, ...] = ()
    listing_error = None
    if has_checksums:
        try:
            listed = {posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False)}
            missing = tuple(sorted(n for n in sums if "/" not in n and n not in listed))
        except Exception as exc:  # noqa: BLE001 - a source without listings is fine
            listing_error = f"{type(exc).__name__}: {exc}"
    return Manifest(records, sums, has_checksums, missing, listing_error)


def _marker(path: Path) -> Path:
    return path.parent / ".verified" / (path.name + ".json")


def _cached(path: Path, expected: str | None) -> str | None:
    """Digest of a cached file this module wrote and verified, or None if it must be fetched."""
    try:
        st = path.stat()
        mark = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return None
    if mark.get("size") != st.st_size or mark.get("mtime_ns") != st.st_mtime_ns:
        return None
    if expected is not None and mark.get("sha256") != expected:
        return None
    return mark.get("sha256")


def cached_digest(path: Path) -> str | None:
    """The SHA-256 of a cached file this module wrote and verified (its marker, no hashing); None if there is none."""
    return _cached(path, None)


def _write_marker(path: Path, digest: str) -> None:
    st = path.stat()
    marker = _marker(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex}.part")
    tmp.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, marker)


def writable_folder(folder: Path, what: str = "download cache", option: str = "--cache-dir") -> Path:
    """Create ``folder`` and prove a file can be written there, before any record needs it.

    A job checks its cache once, when it lists the source, so a cache it cannot write is one
    job-level error before work starts, not the same failure repeated for every record.

    Raises
    ------
    CacheError
        Naming the folder and the operating system's reason.
    """
    folder = Path(folder)
    probe = folder / f".write-probe.{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"{what} {folder}: cannot write there ({type(exc).__name__}: "
                         f"{exc.strerror or exc}); pass {option} with a writable folder") from None
    return folder


def fetch_file(
    fs: AbstractFileSystem,
    db_root: str,
    name: str,
    cache_dir: Path,
    expected_sha256: str | None,
    policy: RetryPolicy = RetryPolicy(),
) -> FetchResult:
    """Fetch ``<db_root>/<name>`` into ``<cache_dir>/<name>``, verified and atomically.

    Parameters
    ----------
    fs, db_root
        Source filesystem and the database folder on it (see ``open_source``).
    name
        File name relative to the database folder (``"100.dat"``).
    cache_dir
        Local folder of this database version.
    expected_sha256
        Digest from ``SHA256SUMS.txt``, or None when the file is not listed.

    Raises
    ------
    SourceNotFound
        The source has no such file.
    ChecksumError
        Every attempt produced bytes that do not match ``expected_sha256``.
    DownloadError
        The source stayed unreachable or kept failing through all retries.
    """
    start = time.perf_counter()
    local = Path(cache_dir) / safe_name(name)
    checksum: Literal["verified", "unlisted"] = "verified" if expected_sha256 else "unlisted"
    digest = _cached(local, expected_sha256)
    if digest is not None:
        return FetchResult(name, local, digest, checksum, 0, time.perf_counter() - start)
    local.parent.mkdir(parents=True, exist_ok=True)
    remote = posixpath.join(db_root, name)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    # HTTP: streamed in one GET. A size given keeps fsspec from asking it first with a HEAD (a second request
    # a file: most of the cost of a database of short recordings); a stream needs none.
    open_kw = {"block_size": 0, "size": -1} if protocol in ("http", "https") else {}

    def attempt() -> tuple[str, int]:
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            h = hashlib.sha256()
            n = 0
            with fs.open(remote, "rb", **open_kw) as src, open(tmp, "wb") as dst:
                while block := src.read(_CHUNK):
                    h.update(block)
                    dst.write(block)
                    n += len(block)
            got = h.hexdigest()
            if expected_sha256 is not None and got != expected_sha256:
                raise ChecksumError(
                    f"{name}: SHA-256 mismatch (SHA256SUMS.txt {expected_sha256[:12]}..., got {got[:12]}..., {n} bytes)"
                )
            os.replace(tmp, local)
            return got, n
        finally:
            tmp.unlink(missing_ok=True)

    digest, n = _retrying(remote, policy, attempt)
    _write_marker(local, digest)
    return FetchResult(name, local, digest, checksum, n, time.perf_counter() - start)
