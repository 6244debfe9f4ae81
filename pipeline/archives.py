"""Stage 1b: ECG archives (folders, ``.zip``, ``.tar``, ``.tar.gz``) -> WFDB records on local disk.

Archives come from users, so they are untrusted: every member is checked
before anything is written. Members with absolute paths, ``..`` parts or drive
letters, links and device files are refused, as are archives whose declared
size (or actual size, counted while extracting) exceeds ``max_bytes``. Members
are extracted under a temporary folder that is renamed into place at the end,
so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tarfile
import threading
import uuid
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from .errors import PipelineError

DEFAULT_MAX_BYTES = 8 * 2**30
_CHUNK = 1 << 20


class ArchiveError(PipelineError):
    """An archive that cannot be opened safely."""


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise ArchiveError(f"{archive}: member {name!r} would be written outside the extraction folder; refused")
    return p


def _copy_limited(src, dst, budget: list[int], archive: Path, name: str) -> None:
    while chunk := src.read(_CHUNK):
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise ArchiveError(f"{archive}: expands beyond the size limit while extracting {name!r}; refused")
        dst.write(chunk)


def extract_archive(archive: str | Path, dest: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Extract a ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` or ``.tar.bz2`` safely into ``dest``; return ``dest``.

    Raises
    ------
    ArchiveError
        Naming the archive, the offending member and why; ``dest`` is then not created.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise ArchiveError(f"{dest} already exists; extract into a new folder")
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # per task
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    budget = [max_bytes]
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, budget, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, budget, max_bytes)
        else:
            raise ArchiveError(f"{archive}: not a zip or tar archive")
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another task extracted the same archive first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@dataclass(frozen=True)
class _Member:
    """What the shared extraction needs to know of a zip or tar member."""

    name: str
    size: int
    is_dir: bool
    refusal: str  #: why the member may not be extracted ("" when it may)
    open: Callable[[], IO[bytes]]


def _extract_members(archive: Path, members: list[_Member], out: Path, budget: list[int], max_bytes: int,
                     errors: tuple[type[BaseException], ...]) -> None:
    """Check every member first (paths, kinds, declared size), then stream each file out under the size budget."""
    for m in members:
        _safe_member(m.name, archive)
        if m.refusal:
            raise ArchiveError(f"{archive}: member {m.name!r} is a {m.refusal}; refused")
    declared = sum(m.size for m in members)
    if declared > max_bytes:
        raise ArchiveError(f"{archive}: declares {declared:,} bytes, over the limit of {max_bytes:,}; refused")
    for m in members:
        target = out / _safe_member(m.name, archive)
        if m.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with m.open() as src, open(target, "wb") as dst:
                _copy_limited(src, dst, budget, archive, m.name)
        except errors as exc:
            raise ArchiveError(f"{archive}: cannot extract {m.name!r}: {exc}") from None


def _extract_zip(archive: Path, out: Path, budget: list[int], max_bytes: int) -> None:
    try:
        z = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{archive}: corrupt zip archive ({exc})") from None
    with z:
        members = [_Member(i.filename, i.file_size, i.is_dir(),
                           "symbolic link" if stat.S_ISLNK(i.external_attr >> 16) else "",
                           functools.partial(z.open, i)) for i in z.infolist()]
        _extract_members(archive, members, out, budget, max_bytes, (zipfile.BadZipFile, OSError, EOFError))


def _tar_refusal(m: tarfile.TarInfo) -> str:
    if m.isfile() or m.isdir():
        return ""
    return "link" if (m.issym() or m.islnk()) else "special file"


def _extract_tar(archive: Path, out: Path, budget: list[int], max_bytes: int) -> None:
    try:
        t = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: corrupt tar archive ({exc})") from None
    with t:
        try:
            infos = t.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"{archive}: corrupt tar archive ({exc})") from None
        for m in infos:
            # The standard library's `data` filter is the reference check for tar members (absolute
            # paths, `..`, links out of the folder, devices, odd modes); links inside are refused below too.
            try:
                tarfile.data_filter(m, str(out))
            except tarfile.FilterError as exc:
                raise ArchiveError(f"{archive}: member {m.name!r}: {exc}; refused") from None
        members = [_Member(m.name, m.size, m.isdir(), _tar_refusal(m), functools.partial(t.extractfile, m))
                   for m in infos]
        _extract_members(archive, members, out, budget, max_bytes, (tarfile.TarError, OSError, EOFError))


def find_records(root: str | Path) -> list[Path]:
    """WFDB records under ``root`` (nested folders too): the paths of their ``.hea`` files without the suffix."""
    root = Path(root)
    return sorted(p.with_suffix("") for p in root.rglob("*.hea") if p.is_file())


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


#: The open ``ZipMembers`` of this process, made safe in a forked child (``_after_fork``).
_OPEN_ZIPS: "weakref.WeakSet[ZipMembers]" = weakref.WeakSet()


def _reset_after_fork() -> None:
    for members in list(_OPEN_ZIPS):
        members._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class ZipMembers:
    """A zip archive read member by member: into memory (``read``), or written out the first time a task needs it
    on disk (``extract``).

    No extraction step runs in front of a job: the worker that reads a record reads that record's
    members (and only those), so the work spreads over the workers; writing a small member out costs
    about ten times reading it (file creation), so records are read from memory where they can be. The whole archive is
    checked when it is opened, as ``extract_archive`` checks it (member paths, links, declared size);
    each member's CRC-32 is checked by ``zipfile`` as it is read, and its size against ``max_bytes``.
    A member is written to a temporary name and renamed into place, so one that exists is whole.

    Raises
    ------
    ArchiveError
        The archive is not a readable zip, or one of its members is refused.
    """

    def __init__(self, archive: str | Path, dest: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.archive, self.dest, self.max_bytes = Path(archive), Path(dest), max_bytes
        try:
            self._zip = zipfile.ZipFile(self.archive)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(f"{archive}: corrupt zip archive ({exc})") from None
        infos = self._zip.infolist()
        for i in infos:
            _safe_member(i.filename, self.archive)
            if stat.S_ISLNK(i.external_attr >> 16):
                raise ArchiveError(f"{archive}: member {i.filename!r} is a symbolic link; refused")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise ArchiveError(f"{archive}: declares {declared:,} bytes, over the limit of {max_bytes:,}; refused")
        self._info = {i.filename: i for i in infos if not i.is_dir()}
        self._lock = threading.Lock()  # one read at a time through the shared file handle (a worker's threads)
        self._identity = _file_identity(self.archive)
        _OPEN_ZIPS.add(self)

    def _after_fork(self) -> None:
        """In a forked child (its only thread): a new lock (the parent's may have been held at the fork) and the
        archive opened again on first use, since parent and child would share one file offset and each one's reads
        land where the other left it (measured: zlib's "invalid distance too far back", records failing at random,
        when a driver that had read the archive forked its local workers)."""
        self._lock, self._zip = threading.Lock(), None

    def _handle(self) -> zipfile.ZipFile:
        """The open archive (opened again after a fork, if it is still the same file). Call with the lock."""
        if self._zip is None:
            if _file_identity(self.archive) != self._identity:
                raise ArchiveError(f"{self.archive}: the archive changed on disk while the job read it")
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ArchiveError(f"{self.archive}: corrupt zip archive ({exc})") from None
        return self._zip

    def names(self) -> list[str]:
        """The file members, in the archive's order."""
        return list(self._info)

    def has(self, name: str) -> bool:
        return name in self._info

    def digest(self, name: str) -> str:
        """The member's identity from the archive's directory (CRC-32 and size): no bytes are read."""
        info = self._info[name]
        return f"crc32:{info.CRC:08x}:{info.file_size}"

    def size(self, name: str) -> int:
        """The member's size from the archive's directory."""
        return self._info[name].file_size

    def _within_limit(self, name: str) -> zipfile.ZipInfo:
        """The member's entry, refused (``ArchiveError``) where it declares more than ``max_bytes``."""
        info = self._info[name]
        if info.file_size > self.max_bytes:
            raise ArchiveError(f"{self.archive}: member {name!r} declares {info.file_size:,} bytes, over the limit "
                               f"of {self.max_bytes:,}; refused")
        return info

    def read(self, name: str) -> bytes:
        """The member's bytes, read into memory (nothing written): its CRC-32 checked as ``extract`` checks it.
        Raises as ``extract`` does."""
        info = self._within_limit(name)
        try:
            with self._lock, self._handle().open(info) as src:
                data = src.read(info.file_size + 1)  # one byte past the declared size: a member that lies is caught
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.archive}: cannot read {name!r}: {exc}") from None
        if len(data) != info.file_size:
            raise ArchiveError(f"{self.archive}: member {name!r} holds {len(data):,} bytes, its directory says "
                               f"{info.file_size:,}")
        return data

    def extract(self, name: str) -> Path:
        """The member as a file under ``dest``, written now unless a whole copy is there already.

        Raises
        ------
        KeyError
            The archive has no such member.
        ArchiveError
            It cannot be read (a bad CRC, a truncated archive) or is larger than ``max_bytes``.
        """
        info = self._info[name]
        target = self.dest / _safe_member(name, self.archive)
        try:
            if target.stat().st_size == info.file_size:
                return target
        except FileNotFoundError:
            pass
        self._within_limit(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with self._lock, self._handle().open(info) as src, open(tmp, "wb") as dst:
                _copy_limited(src, dst, [self.max_bytes], self.archive, name)
            os.replace(tmp, target)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.archive}: cannot extract {name!r}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return target
