"""Stage 1c: record sources, the places an archive of ECG records to score can live.

A source is the contract between the scoring job and storage, in two steps:

* ``prepare()`` runs once, on a worker (which must reach the source): it lists the
  records and reads what the source says about them (``SHA256SUMS.txt``), and
  returns the ready source and the record names (paths relative to the source root,
  without suffix: ``"100"``, ``"batch1/100"``);
* ``fetch(record, annotator, cache, policy)`` runs on a worker for each record: it
  makes the header, signal files and (if present) the annotation file local, and
  returns a ``LocalRecord``.

Sources are small frozen dataclasses, so they travel to workers by pickle. Two
kinds cover every ``--input``:

* ``FolderSource``: a local (or shared) folder; records are found by their ``.hea``
  files in nested folders; nothing is copied. Archives (``.zip``, ``.tar(.gz)``)
  are extracted safely (``pipeline.archives``) into a folder, then read as one.
* ``RemoteSource``: any fsspec URL (``https://``, ``s3://``, ``file://``) of a
  folder. Records come from its ``RECORDS`` file when there is one (PhysioNet
  databases), else from a listing of ``.hea`` files; files are fetched into the
  cache through ``pipeline.download`` (retries, atomic writes) and verified against
  ``SHA256SUMS.txt`` where the folder has one.

``resolve_source`` turns the command line's ``--input`` / ``--source`` + ``--db``
into one of them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Protocol

import fsspec

from . import archives, download, records
from .errors import DownloadError, PipelineError, RecordError, SourceNotFound

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2")


class SourceError(PipelineError):
    """An input that cannot be read as a set of records (the whole job stops)."""


@dataclass(frozen=True)
class LocalRecord:
    """A record whose files are on local disk."""

    record: str
    base: Path  #: local path without suffix, as ``wfdb`` wants it
    annotation: bool  #: the requested annotation file is there
    checksum: Literal["verified", "unlisted", "local"]


class RecordSource(Protocol):
    """What the scoring job needs of an input."""

    @property
    def description(self) -> str: ...

    def prepare(self, policy: download.RetryPolicy) -> tuple["RecordSource", tuple[str, ...]]: ...

    def fetch(self, record: str, annotator: str | None, cache: Path, policy: download.RetryPolicy) -> LocalRecord: ...


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class FolderSource:
    """Records under a local folder, read in place."""

    root: str
    origin: str = ""  #: the archive the folder was extracted from, if any

    @property
    def description(self) -> str:
        return f"{self.origin} (extracted to {self.root})" if self.origin else self.root

    def prepare(self, policy: download.RetryPolicy = download.RetryPolicy()) -> tuple["FolderSource", tuple[str, ...]]:
        root = Path(self.root)
        if not root.is_dir():
            raise SourceError(f"{self.root}: no such folder")
        return self, tuple(p.relative_to(root).as_posix() for p in archives.find_records(root))

    def fetch(self, record: str, annotator: str | None, cache: Path,
              policy: download.RetryPolicy = download.RetryPolicy()) -> LocalRecord:
        base = Path(self.root) / record
        return LocalRecord(record, base, bool(annotator) and base.with_name(f"{base.name}.{annotator}").is_file(),
                           "local")


@dataclass(frozen=True)
class RemoteSource:
    """Records under a folder of any fsspec file system, fetched into the local cache."""

    url: str
    sha256: Mapping[str, str] = field(default_factory=dict)  #: from the folder's SHA256SUMS.txt

    @property
    def description(self) -> str:
        return self.url

    def _root(self, policy: download.RetryPolicy):
        return download.open_source(self.url, policy)

    def prepare(self, policy: download.RetryPolicy = download.RetryPolicy()) -> tuple["RemoteSource", tuple[str, ...]]:
        fs, root = self._root(policy)
        try:
            manifest = download.read_manifest(fs, root, policy)
        except DownloadError as exc:
            raise SourceError(f"{self.url}: unreachable: {exc}") from exc
        names = manifest.records
        if names is None:
            try:
                found = fs.find(root)
            except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types
                raise SourceError(f"{self.url}: has no RECORDS file and cannot be listed ({type(exc).__name__}: "
                                  f"{exc})") from exc
            prefix = root.rstrip("/") + "/"
            names = tuple(sorted(p[len(prefix):-4] for p in found if p.endswith(".hea") and p.startswith(prefix)))
        if not manifest.has_checksums:
            log.warning("%s has no SHA256SUMS.txt: files are fetched unverified", self.url)
        return replace(self, sha256=dict(manifest.sha256)), tuple(names)

    def cache_dir(self, cache: Path) -> Path:
        """Where this source's files go: one folder per URL."""
        return cache / "sources" / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def _get(self, fs, root: str, name: str, cache: Path, record: str, policy) -> download.FetchResult:
        try:
            return download.fetch_file(fs, root, download.safe_name(name), cache, self.sha256.get(name), policy)
        except ValueError as exc:
            raise RecordError(record, "download", str(exc)) from exc
        except download.ChecksumError as exc:
            raise RecordError(record, "checksum", str(exc)) from exc
        except SourceNotFound:
            raise
        except DownloadError as exc:
            raise RecordError(record, "download", str(exc)) from exc

    def fetch(self, record: str, annotator: str | None, cache: Path,
              policy: download.RetryPolicy = download.RetryPolicy()) -> LocalRecord:
        fs, root = self._root(policy)
        local = self.cache_dir(cache)
        folder = posixpath.dirname(record)
        got = []
        try:
            got.append(self._get(fs, root, f"{record}.hea", local, record, policy))
            header = records.read_header(local / record, record)
            for f in header.files:
                got.append(self._get(fs, root, posixpath.join(folder, f), local, record, policy))
        except SourceNotFound as exc:
            raise RecordError(record, "download", str(exc)) from exc
        has_annotation = False
        if annotator:
            try:
                got.append(self._get(fs, root, f"{record}.{annotator}", local, record, policy))
                has_annotation = True
            except SourceNotFound:
                pass  # scoring needs no annotations; the summary says the record had none
        checksum = "verified" if all(g.checksum == "verified" for g in got) else "unlisted"
        return LocalRecord(record, local / record, has_annotation, checksum)


def _archive_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def extracted_folder(archive: Path, work_dir: Path, max_bytes: int) -> Path:
    """Extract ``archive`` once under ``work_dir`` (an earlier extraction of the same file is reused)."""
    dest = Path(work_dir) / f"{archive.name}-{_archive_key(archive)}"
    if dest.is_dir():  # extraction renames into place, so an existing folder is complete
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return archives.extract_archive(archive, dest, max_bytes=max_bytes)


def resolve_source(
    input: str | None = None,
    *,
    source: str | None = None,
    db: str | None = None,
    version: str | None = None,
    work_dir: str | Path,
    max_archive_bytes: int = archives.DEFAULT_MAX_BYTES,
    policy: download.RetryPolicy = download.RetryPolicy(),
) -> RecordSource:
    """The source behind the command line's ``--input``, or ``--source`` + ``--db``.

    Parameters
    ----------
    input
        A local folder, a local ``.zip``/``.tar(.gz)`` archive, an fsspec URL of a
        folder, or an fsspec URL of an archive (fetched into ``work_dir`` first).
    source, db, version
        A PhysioNet-style tree: the database folder is ``<source>/<db>/<version>``.
    work_dir
        Where archives are fetched and extracted (local; shared with the workers of a
        remote cluster).

    Raises
    ------
    SourceError
        Nothing usable at ``input``.
    archives.ArchiveError
        A hostile or oversized archive.
    """
    if db:
        if input:
            raise SourceError("give --input, or --source with --db, not both")
        base = (source or download.DEFAULT_SOURCE).rstrip("/")
        return RemoteSource(f"{base}/{download.safe_name(db)}/{download.safe_name(version or _default_version(db))}")
    if not input:
        raise SourceError("give --input (a folder, archive or URL), or --db with --source")
    protocol = fsspec.core.split_protocol(input)[0]
    if protocol in (None, "file"):
        path = Path(fsspec.core.strip_protocol(input) if protocol else input).expanduser()
        if path.is_dir():
            return FolderSource(str(path.resolve()))
        if path.is_file():
            return FolderSource(str(extracted_folder(path, Path(work_dir), max_archive_bytes)), origin=input)
        raise SourceError(f"{input}: no such file or folder")
    if is_archive(input):
        return FolderSource(str(extracted_folder(_fetch_archive(input, Path(work_dir), policy), Path(work_dir),
                                                 max_archive_bytes)), origin=input)
    return RemoteSource(input.rstrip("/"))


def _default_version(db: str) -> str:
    from .databases import get_database

    return get_database(db).version


def _fetch_archive(url: str, work_dir: Path, policy: download.RetryPolicy) -> Path:
    """Fetch a remote archive into ``work_dir/downloads`` (atomically; reused by a re-run)."""
    parent, name = url.rstrip("/").rsplit("/", 1)
    fs, root = download.open_source(parent, policy)
    folder = work_dir / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    try:
        result = download.fetch_file(fs, root, download.safe_name(name), folder, None, policy)
    except (DownloadError, ValueError) as exc:
        raise SourceError(f"{url}: cannot fetch the archive: {exc}") from exc
    log.info("fetched %s (%.1f MB)", url, os.path.getsize(result.path) / 1e6)
    return result.path
