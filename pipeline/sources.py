"""Stage 1: record sources, the one record layer of both jobs.

Every place records can live is a ``RecordSource``, a small frozen dataclass
(it travels to workers by pickle) with three operations:

* ``prepare(cache, policy)`` runs once, on a worker (which must reach the source):
  it lists the records and reads what the source says about them
  (``SHA256SUMS.txt``, missing files) and returns a ``Listing`` holding the ready
  source (with that knowledge inside) and the record names, paths relative to the
  source root without suffix (``"100"``, ``"batch1/100"``);
* ``fetch(record, annotators, cache, policy)`` runs on a worker for each record: it
  makes the header, the signal files and the annotation files that exist local,
  verified where the source lists checksums, and returns a ``LocalRecord``;
* ``fetch_file(name, cache, policy)`` makes one other file of the source local (a
  label table such as ``REFERENCE.csv``).

The kinds:

* ``FolderSource``: a local (or shared) folder, read in place; records are found
  by their ``RECORDS`` file or their ``.hea`` files in nested folders.
* ``RemoteSource``: a folder of any fsspec file system (``https://``, ``s3://``,
  ``file://``), a PhysioNet database folder ``<source>/<db>/<version>`` among them:
  records from its ``RECORDS`` file, else from a listing of ``.hea`` files; files
  verified against ``SHA256SUMS.txt`` where the folder has one. Remote files are
  fetched into the cache through ``pipeline.download`` (retries, atomic writes); a
  folder on a local or network file system is read in place, never copied.
* ``ArchiveSource``: a ``.zip``/``.tar(.gz)`` archive, local or at any fsspec URL,
  alone or as a member of a PhysioNet tree (then checked against the tree's
  ``SHA256SUMS.txt``): fetched and checked once per machine into the cache; a zip's
  members are then read by the worker that needs them, a tar is extracted safely
  (``pipeline.archives``) and read as a folder.

``resolve_source`` turns a command line (``--input``, or a database with
``--source``) into one of them; a database entry (``pipeline.databases``) says
whether its records are loose files or an archive member.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import posixpath
import stat
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Protocol, Sequence

import fsspec

from . import archives, download, records
from .errors import DownloadError, PipelineError, RecordError, SourceNotFound

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2")

Checksum = Literal["verified", "unlisted", "local"]


class SourceError(PipelineError):
    """An input that cannot be read as a set of records (the whole job stops)."""


class SourceUnreachable(SourceError):
    """The source did not answer (after the retries)."""


@dataclass(frozen=True)
class LocalRecord:
    """A record whose files are on local disk, or (an archive's members) some of them held in memory."""

    record: str
    base: Path  #: local path without suffix, as ``wfdb`` wants it
    annotators: frozenset[str]  #: the requested annotation extensions that are present
    checksum: Checksum  #: every file matched SHA256SUMS.txt / some were unlisted / read in place
    #: (name, digest) of every file read, header first. The digest is what says the file is the same at no extra
    #: cost: its SHA-256 where it was downloaded or checked against SHA256SUMS.txt, ``crc32:<crc>:<size>`` for
    #: an archive member (from the archive's directory), ``stat:<size>:<mtime_ns>`` for a local folder's file.
    files: tuple[tuple[str, str], ...] = ()
    bytes_downloaded: int = 0
    #: The header and signal files held in memory, by name relative to the header's folder (``records.read_header``'s
    #: ``contents``): a zip's members, read without writing them out. None: every file is on disk at ``base``.
    contents: Mapping[str, bytes] | None = field(default=None, compare=False, repr=False)

    def has(self, annotator: str | None) -> bool:
        return bool(annotator) and annotator in self.annotators

    @property
    def digest(self) -> str:
        """SHA-256 over the record's file digests: its content identity (store fingerprints)."""
        return hashlib.sha256(repr(sorted(self.files)).encode()).hexdigest()


@dataclass(frozen=True)
class Listing:
    """What ``prepare`` found: the ready source, its records, and notes for the report."""

    source: "RecordSource"
    records: tuple[str, ...]
    has_checksums: bool = False
    missing: tuple[str, ...] = ()  #: files SHA256SUMS.txt lists that the source lacks
    listing_error: str | None = None  #: why the missing-file check could not run


class RecordSource(Protocol):
    """What both jobs need of a place that holds records."""

    @property
    def description(self) -> str: ...

    def prepare(self, cache: Path, policy: download.RetryPolicy) -> Listing: ...

    def fetch(self, record: str, annotators: Sequence[str], cache: Path,
              policy: download.RetryPolicy, *, in_memory: bool = False) -> LocalRecord:
        """The record's files, checked. ``in_memory``: the caller reads them with ``LocalRecord.contents``
        (``records.read_header(local.base, record, contents=local.contents)``), so a source that can hold them in
        memory may leave them unwritten (an archive's members); other sources ignore it."""
        ...

    def fetch_file(self, name: str, cache: Path, policy: download.RetryPolicy) -> Path: ...

    def fetch_again(self, local: "LocalRecord", cache: Path, policy: download.RetryPolicy) -> Path:
        """The base path of a record fetched before, its files checked against ``local.files`` (no header parse)."""
        ...

    def unchanged(self, local: "LocalRecord", cache: Path, policy: download.RetryPolicy) -> bool:
        """Whether the source still holds the files of ``local`` as they were, asked as cheaply as the source
        allows (its SHA256SUMS.txt, a cache marker, a file's size and time, an archive's directory); never
        fetches. False when it cannot tell: the record is then read again."""
        ...


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_digest(path: Path) -> str | None:
    """A local file's identity without reading it (size and modification time), None when it is not a file.

    Hashing every file of a folder would cost more than reading the records (a database of short recordings);
    a file rewritten in place gets a new modification time, so a resumed store sees that it changed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"stat:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None


def _signal_names(files: Sequence[str], record: str) -> list[str]:
    """Files named by the record's header (``records.header_files``), relative to the source root (names checked)."""
    folder = posixpath.dirname(record)
    out = []
    for f in files:
        name = posixpath.join(folder, f) if folder else f
        try:
            out.append(download.safe_name(name))
        except ValueError as exc:
            raise RecordError(record, "header", str(exc)) from exc
    return out


def _named_files(named: Callable[[], Sequence[str]], record: str) -> Iterator[str]:
    """The files a record's header names (``named``: ``records.header_files`` of what is fetched so far), each once,
    for the caller to fetch as they come: until nothing new is named, as a multi-segment header names segment
    headers, which name signal files. A round that fetched no header ends it without parsing the header again
    (one parse a recording, not two, for the usual single-segment record)."""
    fetched = {f"{record}.hea"}
    while todo := [n for n in _signal_names(named(), record) if n not in fetched]:
        for name in todo:
            yield name
            fetched.add(name)
        if not any(n.endswith(".hea") for n in todo):
            return


def list_folder(root: Path) -> list[str]:
    """The records of a local folder, as PhysioNet lays them out.

    A ``RECORDS`` file lists them, in its order; an entry ending in ``/`` is a folder
    of records (its own ``RECORDS``, else its headers). Without one at the root, every
    ``.hea`` file is a record, except where a folder has its own ``RECORDS`` (that list
    holds for the folder and below) and except the segment and layout headers of a
    multi-segment record (part of that record).
    """
    root = Path(root)
    if (root / "RECORDS").is_file():
        return _records_file(root, "", set())
    return _discover(root, "", set())


def _records_file(root: Path, prefix: str, seen: set[str]) -> list[str]:
    seen.add(prefix)
    text = (root / prefix / "RECORDS").read_text(encoding="utf-8", errors="replace")
    out = []
    for entry in text.split():
        name = posixpath.join(prefix, entry) if prefix else entry
        if not entry.endswith("/"):
            out.append(name)
            continue
        sub = name.rstrip("/")
        try:
            download.safe_name(sub)
        except ValueError:
            out.append(sub)  # fails alone, as an unsafe record name
            continue
        if sub in seen:
            continue
        if (root / sub / "RECORDS").is_file():
            out += _records_file(root, sub, seen)
        elif (root / sub).is_dir():
            out += _discover(root, sub, seen)
        else:
            out.append(sub)  # fails alone: not found
    return out


def _discover(root: Path, prefix: str, seen: set[str]) -> list[str]:
    top = root / prefix if prefix else root
    listed = sorted({p.parent for p in top.rglob("RECORDS") if p.is_file() and p.parent != top},
                    key=lambda p: len(p.parts))
    owned: list[Path] = []  # folders whose RECORDS file speaks for them (outermost first)
    for folder in listed:
        if not any(folder.is_relative_to(o) for o in owned):
            owned.append(folder)
    heads = [p for p in archives.find_records(top) if not any(p.is_relative_to(o) for o in owned)]
    segments = {(p.parent, s) for p in heads for s in records.segment_names(p.with_name(f"{p.name}.hea"))}
    out = [p.relative_to(root).as_posix() for p in heads if (p.parent, p.name) not in segments]
    for folder in owned:
        out += _records_file(root, folder.relative_to(root).as_posix(), seen)
    return sorted(out)


@dataclass(frozen=True)
class FolderSource:
    """Records under a local folder, read in place."""

    root: str
    origin: str = ""  #: what the folder stands for (an archive it was extracted from), for reports

    @property
    def description(self) -> str:
        return self.origin or self.root

    def prepare(self, cache: Path | None = None, policy: download.RetryPolicy = download.RetryPolicy()) -> Listing:
        root = Path(self.root)
        if not root.is_dir():
            raise SourceError(f"{self.description}: no such folder")
        return Listing(self, tuple(list_folder(root)))

    def fetch(self, record: str, annotators: Sequence[str] = (), cache: Path | None = None,
              policy: download.RetryPolicy = download.RetryPolicy(), *, in_memory: bool = False) -> LocalRecord:
        try:
            download.safe_name(record)
        except ValueError as exc:
            raise RecordError(record, "download", str(exc)) from exc
        root = Path(self.root)
        base = root / record
        hea = base.with_name(f"{base.name}.hea")
        if not hea.is_file():
            raise RecordError(record, "download", f"{record}.hea: not found in {self.description}")
        names = [f"{record}.hea", *_signal_names(records.header_files(base, record), record)]
        present = frozenset(a for a in annotators if (root / f"{record}.{a}").is_file())
        names += [f"{record}.{a}" for a in annotators if a in present]
        files = []
        for name in names:
            digest = _stat_digest(root / name)
            if digest is None:
                raise RecordError(record, "signal", f"{name}: not found in {self.description}")
            files.append((name, digest))
        return LocalRecord(record, base, present, "local", tuple(files))

    def fetch_file(self, name: str, cache: Path | None = None,
                   policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        path = Path(self.root) / download.safe_name(name)
        if not path.is_file():
            raise SourceNotFound(f"{name}: not found in {self.description}")
        return path

    def fetch_again(self, local: LocalRecord, cache: Path | None = None,
                    policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        root = Path(self.root)
        for name, digest in local.files:
            if _stat_digest(root / name) != digest:
                raise RecordError(local.record, "download", f"{name} changed in {self.description} during the job")
        return root / local.record

    def unchanged(self, local: LocalRecord, cache: Path | None = None,
                  policy: download.RetryPolicy = download.RetryPolicy()) -> bool:
        return all(_stat_digest(Path(self.root) / name) == digest for name, digest in local.files)


@dataclass(frozen=True)
class RemoteSource:
    """Records under a folder of any fsspec file system, fetched into the local cache."""

    url: str
    sha256: Mapping[str, str] = field(default_factory=dict)  #: from the folder's SHA256SUMS.txt
    cache_name: str = ""  #: cache sub-folder; default: one per URL
    require_checksums: bool = False  #: refuse files SHA256SUMS.txt does not list

    @property
    def description(self) -> str:
        return self.url

    def _root(self, policy: download.RetryPolicy):
        return download.open_source(self.url, policy)

    @property
    def in_place(self) -> Path | None:
        """The folder itself when it is on a local (or network) file system: its files are read there, checked
        against SHA256SUMS.txt, and never copied into the cache; None for remote URLs."""
        protocol = fsspec.core.split_protocol(self.url)[0]
        if protocol not in (None, "file"):
            return None
        return Path(fsspec.core.strip_protocol(self.url) if protocol else self.url).expanduser()

    def _folder(self, cache: Path) -> Path:
        """Where a record's files are read: the source folder itself (``in_place``), else the cache."""
        return self.in_place or self.cache_dir(cache)

    def prepare(self, cache: Path | None = None, policy: download.RetryPolicy = download.RetryPolicy()) -> Listing:
        if cache is not None and self.in_place is None:
            download.writable_folder(self.cache_dir(cache))
        fs, root = self._root(policy)
        try:
            manifest = download.read_manifest(fs, root, policy)
        except DownloadError as exc:
            raise SourceUnreachable(f"{self.url}: unreachable: {exc}") from exc
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
        return Listing(replace(self, sha256=dict(manifest.sha256)), tuple(names), manifest.has_checksums,
                       manifest.missing, manifest.listing_error)

    def cache_dir(self, cache: Path) -> Path:
        """Where this source's files go: ``cache_name``, or one folder per URL."""
        return Path(cache) / (self.cache_name or posixpath.join("sources", hashlib.sha256(self.url.encode()).hexdigest()[:16]))

    def _get(self, fs, root: str, name: str, cache: Path, record: str, policy) -> download.FetchResult:
        expected = self.sha256.get(name)
        if expected is None and self.require_checksums:
            raise RecordError(record, "checksum", f"{name} is not listed in SHA256SUMS.txt (download.require_checksums)")
        try:
            if self.in_place is not None:
                return download.check_in_place(self.in_place, download.safe_name(name), expected)
            return download.fetch_file(fs, root, download.safe_name(name), cache, expected, policy)
        except ValueError as exc:
            raise RecordError(record, "download", str(exc)) from exc
        except download.ChecksumError as exc:
            raise RecordError(record, "checksum", str(exc)) from exc
        except SourceNotFound:
            raise
        except DownloadError as exc:
            raise RecordError(record, "download", str(exc)) from exc

    def fetch(self, record: str, annotators: Sequence[str] = (), cache: Path = Path("."),
              policy: download.RetryPolicy = download.RetryPolicy(), *, in_memory: bool = False) -> LocalRecord:
        try:
            download.safe_name(record)
        except ValueError as exc:
            raise RecordError(record, "download", str(exc)) from exc
        fs, root = self._root(policy)
        local = self._folder(cache)
        got = []
        try:
            got.append(self._get(fs, root, f"{record}.hea", local, record, policy))
            # Until nothing new is named: a multi-segment header names segment headers, which name signal files.
            for name in _named_files(lambda: records.header_files(local / record, record), record):
                got.append(self._get(fs, root, name, local, record, policy))
        except SourceNotFound as exc:
            raise RecordError(record, "download", str(exc)) from exc
        present = set()
        for a in annotators:
            try:
                got.append(self._get(fs, root, f"{record}.{a}", local, record, policy))
                present.add(a)
            except SourceNotFound:
                pass  # the caller decides whether a record needs its annotations
        checksum: Checksum = "verified" if all(g.checksum == "verified" for g in got) else "unlisted"
        return LocalRecord(record, local / record, frozenset(present), checksum,
                           tuple((g.name, g.sha256) for g in got), sum(g.bytes_downloaded for g in got))

    def fetch_again(self, local: LocalRecord, cache: Path,
                    policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        # Each file against the digest it had: a cheap marker check where it is cached, a verified
        # download on a machine that has not seen it, a hash where it is read in place (a changed file then
        # fails the record).
        fs, root = self._root(policy)
        folder = self._folder(cache)
        for name, digest in local.files:
            try:
                if self.in_place is not None:
                    download.check_in_place(folder, download.safe_name(name), digest)
                    continue
                download.fetch_file(fs, root, download.safe_name(name), folder, digest, policy)
            except (download.ChecksumError, SourceNotFound) as exc:
                raise RecordError(local.record, "download", f"{name} changed at the source during the job ({exc})") from exc
            except (DownloadError, ValueError) as exc:
                raise RecordError(local.record, "download", str(exc)) from exc
        return folder / local.record

    def unchanged(self, local: LocalRecord, cache: Path,
                  policy: download.RetryPolicy = download.RetryPolicy()) -> bool:
        # A listed file is what SHA256SUMS.txt says (it is verified whenever it is read); an unlisted one is
        # known only where this machine holds a verified copy (the cache's marker) or reads it in place.
        folder = self._folder(cache)
        for name, digest in local.files:
            listed = self.sha256.get(name)
            if listed is not None:
                if listed != digest:
                    return False
                continue
            try:
                if self.in_place is not None:
                    if download.check_in_place(folder, download.safe_name(name), None).sha256 != digest:
                        return False
                elif download.cached_digest(folder / download.safe_name(name)) != digest:
                    return False
            except (SourceNotFound, ValueError):
                return False
        return True

    def fetch_file(self, name: str, cache: Path, policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        fs, root = self._root(policy)
        try:
            if self.in_place is not None:
                return download.check_in_place(self.in_place, download.safe_name(name), self.sha256.get(name)).path
            return download.fetch_file(fs, root, download.safe_name(name), self.cache_dir(cache),
                                       self.sha256.get(name), policy).path
        except ValueError as exc:
            raise SourceError(f"{self.url}: {exc}") from exc


#: A record whose members together take more than this is written out to be read, not held in memory (a day-long
#: Holter record, a multi-segment record of many files).
RECORD_IN_MEMORY_MAX = 64 * 2**20


@dataclass(frozen=True)
class ArchiveSource:
    """Records inside a ``.zip``/``.tar(.gz)`` archive: a local path or any fsspec URL.

    The archive is fetched (verified against ``sha256`` when known) once per machine. A zip is then
    read member by member (``archives.ZipMembers``): the worker that reads a record writes out its members
    (or, asked ``in_memory``, reads them into memory: ``LocalRecord.contents``), with no extraction step in
    front of the job. A tar archive cannot be
    read that way: it is extracted safely, once per machine, by whichever worker first needs it, and its
    ``inner`` folder read as a ``FolderSource``.
    """

    archive: str
    inner: str = ""  #: folder inside the archive that holds the records ("" = its root)
    sha256: str | None = None  #: expected digest (a PhysioNet tree's SHA256SUMS.txt entry)
    checksums_from: str | None = None  #: the folder whose SHA256SUMS.txt lists the archive (a tree)
    max_bytes: int = archives.DEFAULT_MAX_BYTES
    work_dir: str | None = None  #: where archives are fetched and extracted; None: <cache>/archives

    @property
    def description(self) -> str:
        return f"{self.archive}:{self.inner}" if self.inner else self.archive

    def _work(self, cache: Path | None) -> Path:
        return Path(self.work_dir).expanduser() if self.work_dir else Path(cache or ".") / "archives"

    def _local_archive(self, work: Path, policy: download.RetryPolicy) -> tuple[Path, str | None]:
        protocol = fsspec.core.split_protocol(self.archive)[0]
        if protocol in (None, "file"):
            path = Path(fsspec.core.strip_protocol(self.archive) if protocol else self.archive).expanduser()
            if not path.is_file():
                raise SourceError(f"{self.archive}: no such file")
            if self.sha256 and _sha256_once(path) != self.sha256:
                raise SourceError(f"{self.archive}: SHA-256 does not match SHA256SUMS.txt")
            return path, self.sha256
        parent, name = self.archive.rstrip("/").rsplit("/", 1)
        fs, root = download.open_source(parent, policy)
        folder = work / "downloads" / hashlib.sha256(self.archive.encode()).hexdigest()[:16]
        try:
            result = download.fetch_file(fs, root, download.safe_name(name), folder, self.sha256, policy)
        except (DownloadError, ValueError) as exc:
            raise SourceError(f"{self.archive}: cannot fetch the archive: {exc}") from exc
        return result.path, result.sha256

    def folder(self, cache: Path | None, policy: download.RetryPolicy = download.RetryPolicy()) -> FolderSource:
        """The extracted records as a folder (fetched and extracted on the first call on this machine).

        Once per process: every record fetch asks for the folder, and checking the archive's cache
        marker thousands of times (Challenge 2017: 8,528 recordings, twice each) would cost more than
        reading them. Each record's own files are still checked by their digests (``fetch_again``).
        """
        return _extracted_folder(self, str(self._work(cache)), policy)

    def _folder(self, work: Path, policy: download.RetryPolicy) -> FolderSource:
        path, digest = self._local_archive(work, policy)
        key = digest or _archive_key(path)
        dest = work / f"{path.name}-{key[:16]}"
        if not dest.is_dir():  # extraction renames into place, so an existing folder is complete
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                archives.extract_archive(path, dest, max_bytes=self.max_bytes)
            except archives.ArchiveError:
                if not dest.is_dir():  # another task extracted the same archive first
                    raise
            log.info("extracted %s to %s", self.archive, dest)
        root = dest / self.inner if self.inner else dest
        return FolderSource(str(root), origin=self.description)

    def zip_members(self, cache: Path | None,
                    policy: download.RetryPolicy = download.RetryPolicy()) -> archives.ZipMembers | None:
        """The archive read member by member where it is a zip (once per process); None for a tar archive,
        which cannot be read member by member and is extracted whole (``folder``)."""
        return _zip_members(self, str(self._work(cache)), policy)

    def _root(self, z: archives.ZipMembers) -> Path:
        return z.dest / self.inner if self.inner else z.dest

    def _member(self, name: str) -> str:
        return f"{self.inner}/{name}" if self.inner else name

    def prepare(self, cache: Path | None = None, policy: download.RetryPolicy = download.RetryPolicy()) -> Listing:
        sha = self.sha256
        if sha is None and self.checksums_from:
            fs, root = download.open_source(self.checksums_from, policy)
            try:
                manifest = download.read_manifest(fs, root, policy)
            except DownloadError as exc:
                raise SourceUnreachable(f"{self.checksums_from}: unreachable: {exc}") from exc
            sha = manifest.sha256.get(self.archive.rstrip("/").rsplit("/", 1)[-1])
            if sha is None:
                log.warning("%s: not listed in SHA256SUMS.txt: fetched unverified", self.archive)
        ready = replace(self, sha256=sha)
        download.writable_folder(self._work(cache), *(("work folder", "--work-dir") if self.work_dir else ()))
        z = ready.zip_members(cache, policy)
        names = ready.folder(cache, policy).prepare(cache, policy).records if z is None else ready._zip_listing(z)
        return Listing(ready, tuple(names), has_checksums=sha is not None)

    def _zip_listing(self, z: archives.ZipMembers) -> list[str]:
        """``list_folder`` of the ``inner`` folder, from its ``RECORDS`` member alone where that lists records;
        else from the ``RECORDS`` and ``.hea`` members (written out: small) of the folder."""
        prefix = self._member("")
        inside = [n for n in z.names() if n.startswith(prefix)]
        if not inside:
            raise SourceError(f"{self.description}: no such folder in the archive")
        if z.has(self._member("RECORDS")):
            entries = z.extract(self._member("RECORDS")).read_text(encoding="utf-8", errors="replace").split()
            if not any(e.endswith("/") for e in entries):
                return entries
        for n in inside:
            if posixpath.basename(n) == "RECORDS" or n.endswith(".hea"):
                z.extract(n)
        return list_folder(self._root(z))

    def fetch(self, record: str, annotators: Sequence[str] = (), cache: Path | None = None,
              policy: download.RetryPolicy = download.RetryPolicy(), *, in_memory: bool = False) -> LocalRecord:
        z = self.zip_members(cache, policy)
        if z is None:
            local = self.folder(cache, policy).fetch(record, annotators, cache, policy)
        else:
            local = self._fetch_members(z, record, annotators, in_memory)
        # The archive's bytes were checked as a whole: its members are as verified as it is.
        return replace(local, checksum="verified" if self.sha256 else "local")

    def _fetch_members(self, z: archives.ZipMembers, record: str, annotators: Sequence[str],
                       in_memory: bool) -> LocalRecord:
        """The record's members written out by this worker; ``in_memory``: its header and signal members read into
        memory instead (``LocalRecord.contents``; written out all the same where together they take more than
        ``RECORD_IN_MEMORY_MAX``), its annotation members written out (``wfdb.rdann`` reads files, and the
        header beside them for the annotations' rate). Each file's
        digest is its CRC-32 and size from the archive's directory (no hashing: the archive was checked whole,
        ``zipfile`` checks each CRC on read)."""
        try:
            download.safe_name(record)
        except ValueError as exc:
            raise RecordError(record, "download", str(exc)) from exc
        root = self._root(z)
        folder = posixpath.dirname(record)
        contents: dict[str, bytes] | None = {} if in_memory else None
        held_bytes = 0

        def get(name: str, stage: str, keep: bool = True) -> tuple[str, str]:
            nonlocal contents, held_bytes
            member = self._member(name)
            if not z.has(member):
                raise RecordError(record, stage, f"{name}: not found in {self.description}")
            try:
                if keep and contents is not None and held_bytes + z.size(member) <= RECORD_IN_MEMORY_MAX:
                    contents[posixpath.relpath(name, folder) if folder else name] = z.read(member)
                    held_bytes += z.size(member)
                else:
                    if keep and contents is not None:  # too large to hold: the record's files all go on disk
                        for held in list(contents):
                            z.extract(self._member(posixpath.join(folder, held) if folder else held))
                        contents = None
                    z.extract(member)
            except archives.ArchiveError as exc:
                raise RecordError(record, "download", str(exc)) from exc
            return name, z.digest(member)

        files = [get(f"{record}.hea", "download")]
        for name in _named_files(lambda: records.header_files(root / record, record, contents=contents), record):
            files.append(get(name, "signal"))
        present = frozenset(a for a in annotators if z.has(self._member(f"{record}.{a}")))
        files += [get(f"{record}.{a}", "annotations", keep=False) for a in annotators if a in present]
        if present and contents is not None:
            # wfdb.rdann takes the annotations' rate from the header beside them where the file has none: without
            # it the anchors of a lead with several samples per frame would not be moved to the lead's rate
            try:
                z.extract(self._member(f"{record}.hea"))
            except archives.ArchiveError as exc:
                raise RecordError(record, "download", str(exc)) from exc
        return LocalRecord(record, root / record, present, "local", tuple(files), contents=contents)

    def fetch_file(self, name: str, cache: Path | None = None,
                   policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        z = self.zip_members(cache, policy)
        if z is None:
            return self.folder(cache, policy).fetch_file(name, cache, policy)
        member = self._member(download.safe_name(name))
        if not z.has(member):
            raise SourceNotFound(f"{name}: not found in {self.description}")
        try:
            return z.extract(member)
        except archives.ArchiveError as exc:
            raise SourceError(str(exc)) from exc

    def fetch_again(self, local: LocalRecord, cache: Path | None = None,
                    policy: download.RetryPolicy = download.RetryPolicy()) -> Path:
        z = self.zip_members(cache, policy)
        if z is None:
            return self.folder(cache, policy).fetch_again(local, cache, policy)
        for name, digest in local.files:
            member = self._member(name)
            if not z.has(member) or z.digest(member) != digest:
                raise RecordError(local.record, "download", f"{name} changed in {self.description} during the job")
            try:
                z.extract(member)
            except archives.ArchiveError as exc:
                raise RecordError(local.record, "download", str(exc)) from exc
        return self._root(z) / local.record

    def unchanged(self, local: LocalRecord, cache: Path | None = None,
                  policy: download.RetryPolicy = download.RetryPolicy()) -> bool:
        z = self.zip_members(cache, policy)
        if z is None:
            return self.folder(cache, policy).unchanged(local, cache, policy)
        return all(z.has(self._member(n)) and z.digest(self._member(n)) == d for n, d in local.files)


@functools.lru_cache(maxsize=16)
def _extracted_folder(source: ArchiveSource, work: str, policy: download.RetryPolicy) -> FolderSource:
    return source._folder(Path(work), policy)


@functools.lru_cache(maxsize=16)
def _zip_members(source: ArchiveSource, work: str, policy: download.RetryPolicy) -> archives.ZipMembers | None:
    path, digest = source._local_archive(Path(work), policy)
    if not zipfile.is_zipfile(path):
        return None
    key = digest or _archive_key(path)
    return archives.ZipMembers(path, Path(work) / f"{path.name}-{key[:16]}", max_bytes=source.max_bytes)


def _sha256_once(path: Path) -> str:
    """SHA-256 of a local archive, hashed once per process while its size and mtime stay the same.

    Every record fetch of an archive source checks the archive; hashing 100 MB per record would
    dominate a job of thousands of short records.
    """
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return _sha256(Path(path))


def _archive_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def database_source(db, source: str | None = None, version: str | None = None, *, work_dir: str | None = None,
                    max_archive_bytes: int = archives.DEFAULT_MAX_BYTES,
                    require_checksums: bool = False) -> RecordSource:
    """The source of a database entry (``pipeline.databases.Database``) in a PhysioNet-style tree."""
    base = (source or download.DEFAULT_SOURCE).rstrip("/")
    version = version or db.version
    folder = f"{base}/{download.safe_name(db.name)}/{download.safe_name(version)}"
    if db.archive:
        return ArchiveSource(f"{folder}/{download.safe_name(db.archive)}", inner=db.archive_folder,
                             checksums_from=folder, max_bytes=max_archive_bytes, work_dir=work_dir)
    return RemoteSource(folder, cache_name=f"physionet/{db.name}/{version}", require_checksums=require_checksums)


def resolve_source(
    input: str | None = None,
    *,
    source: str | None = None,
    db: str | None = None,
    version: str | None = None,
    work_dir: str | Path | None = None,
    max_archive_bytes: int = archives.DEFAULT_MAX_BYTES,
    require_checksums: bool = False,
) -> RecordSource:
    """The source behind a command line: ``--input``, or a database with ``--source``.

    Parameters
    ----------
    input
        A local folder, a local ``.zip``/``.tar(.gz)`` archive, an fsspec URL of a
        folder, or an fsspec URL of an archive.
    source, db, version
        A database of ``pipeline.databases`` in a PhysioNet-style tree
        ``<source>/<db>/<version>`` (default: physionet.org).
    work_dir
        Where archives are fetched and extracted (default ``<cache>/archives`` on each
        worker; a remote cluster's workers each extract their own copy).

    Raises
    ------
    SourceError
        Nothing usable at ``input``.
    """
    wd = str(work_dir) if work_dir else None
    if db:
        if input:
            raise SourceError("give --input, or --source with --db, not both")
        from .databases import get_database

        return database_source(get_database(db), source, version, work_dir=wd, max_archive_bytes=max_archive_bytes,
                               require_checksums=require_checksums)
    if not input:
        raise SourceError("give --input (a folder, archive or URL), or --db with --source")
    protocol = fsspec.core.split_protocol(input)[0]
    if protocol in (None, "file"):
        path = Path(fsspec.core.strip_protocol(input) if protocol else input).expanduser()
        if path.is_dir():
            return FolderSource(str(path.resolve()))
        if path.is_file():
            return ArchiveSource(str(path.resolve()), max_bytes=max_archive_bytes, work_dir=wd)
        raise SourceError(f"{input}: no such file or folder")
    if is_archive(input):
        return ArchiveSource(input, max_bytes=max_archive_bytes, work_dir=wd)
    return RemoteSource(input.rstrip("/"), require_checksums=require_checksums)


def single_record(input: str | None) -> tuple[str, str] | None:
    """``(folder, record)`` when ``input`` names one WFDB record: a local ``path/to/A00003`` (or its ``.hea``), or
    the URL of one (``https://host/mitdb/1.0.0/100``: its header is there). ``folder`` is a path or a URL.

    Only the header's presence is asked for a URL; an unreachable one gives None, and the job that reads the
    input then says what is wrong with it."""
    if not input:
        return None
    if fsspec.core.split_protocol(input)[0] not in (None, "file"):
        if input.endswith("/") or is_archive(input):
            return None
        base = input[:-4] if input.endswith(".hea") else input
        try:
            fs, path = download.open_source(base + ".hea")
            if not fs.isfile(path):
                return None
        except Exception:  # noqa: BLE001 - any fsspec backend's own error: then it is not one record we can see
            return None
        folder, _, name = base.rpartition("/")
        return folder, name
    path = Path(fsspec.core.strip_protocol(input)).expanduser()
    if path.suffix == ".hea":
        path = path.with_suffix("")
    if path.is_dir() or not path.with_name(path.name + ".hea").is_file():
        return None
    return str(path.parent.resolve()), path.name


def record_folder(folder: str, policy: download.RetryPolicy = download.RetryPolicy()) -> "FolderSource | RemoteSource":
    """The source of ``single_record``'s ``folder``: read in place when local, else fetched from the URL and
    checked against the folder's ``SHA256SUMS.txt`` where it has one (the folder is not listed).

    Raises
    ------
    SourceUnreachable
        The URL's folder cannot be read.
    """
    if fsspec.core.split_protocol(folder)[0] in (None, "file"):
        return FolderSource(str(Path(fsspec.core.strip_protocol(folder)).expanduser().resolve()))
    remote = RemoteSource(folder.rstrip("/"))
    fs, root = remote._root(policy)
    try:
        manifest = download.read_manifest(fs, root, policy)
    except DownloadError as exc:
        raise SourceUnreachable(f"{folder}: unreachable: {exc}") from exc
    return replace(remote, sha256=dict(manifest.sha256))


def fetch_record(source: RecordSource, record: str, annotators: Sequence[str], cache: Path,
                 policy: download.RetryPolicy, *, required: Sequence[str] = (), in_memory: bool = False) -> LocalRecord:
    """``source.fetch`` that fails the record (stage ``annotations``) when a ``required`` annotation file is absent."""
    local = source.fetch(record, tuple(dict.fromkeys([*annotators, *required])), cache, policy, in_memory=in_memory)
    for a in required:
        if not local.has(a):
            raise RecordError(record, "annotations", f"no {record}.{a} in {source.description}")
    return local

