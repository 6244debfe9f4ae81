"""Where a user's files live: a local path or an fsspec URL, reached through one helper.

Every path a user gives a job (``--out``, ``--model``, ``--config``, a split file, plot and summary
outputs) goes through ``locate``: a local path, a ``file://`` URL or any fsspec URL (``s3://``,
``gs://``, ``abfs://``, ``memory://``...). Nothing here turns a URL into a ``pathlib.Path``, so a
URL can never become a local folder named ``s3:``.

Writes are whole or nothing: on a local disk a temporary file renamed over the name, on an object
store one upload, which the store publishes only once complete. ``Location.create`` is an exclusive
create (``O_EXCL`` locally, ``If-None-Match: *`` on S3 and stores that honour it), the primitive the
job lease is built on.

Storage options (endpoint, credentials, ...) come with the URL: from ``--storage-option KEY=VALUE``,
or from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL=...`` and the like in the environment,
or ``~/.config/fsspec/*.json``), which every process that opens the URL reads for itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError

__all__ = ["Location", "check_s3fs", "is_url", "locate", "parse_storage_options", "url_options"]


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a non-local file system (``s3://...``; ``file://`` is local)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A file or folder on some file system: ``fs`` and its ``path``, and the ``url`` the user gave (for messages).

    Build one with ``locate``.
    """

    url: str
    fs: Any = field(repr=False)
    path: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return self.url

    @property
    def local(self) -> bool:
        """Whether this is on the local file system (a plain path works with ``open``)."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *names: str) -> "Location":
        """The location ``names`` below this one (``/``-joined, as every fsspec file system takes)."""
        sep = os.sep if self.local else "/"
        path = sep.join([self.path.rstrip(sep), *names])
        url = "/".join([self.url.rstrip("/"), *names])
        return Location(url, self.fs, path, self.storage_options)

    # -- reading ------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def isfile(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def isdir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def open(self, mode: str = "rb", **kwargs: Any):
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def modified(self) -> float:
        """Modification time, epoch seconds."""
        if self.local:
            return os.stat(self.path).st_mtime
        return float(self.fs.modified(self.path).timestamp())

    @contextlib.contextmanager
    def local_file(self) -> Iterator[str]:
        """A local path holding this file's bytes for the block: the file itself when local, else a copy.

        For readers that need a real file (Keras, zip archives read many times).
        """
        if self.local:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="ecg-pipeline-") as tmp:
            copy = os.path.join(tmp, self.name or "file")
            self.fs.get_file(self.path, copy)
            yield copy

    # -- writing ------------------------------------------------------------------------------------------------
    def makedirs(self) -> None:
        """Create this folder (on object stores there is nothing to create)."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        else:
            with contextlib.suppress(FileExistsError):
                self.fs.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Write the file whole or not at all (a crash leaves the previous version, never half of one).

        For files with one writer at a time: locally the temporary file is ``<name>.tmp``, so the next write
        replaces what a crashed one left.
        """
        if not self.local:
            self.fs.pipe_file(self.path, data)  # one upload: the object appears only once complete
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    @contextlib.contextmanager
    def writing(self, suffix: str = "") -> Iterator[str]:
        """A local path to write this file through: moved (or uploaded) here when the block ends without error.

        For writers that need a real file (Keras' ``model.save``). ``suffix`` is the temporary file's ending.
        """
        folder = os.path.dirname(self.path) if self.local else None
        if folder:
            os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ecg-pipeline-", dir=folder) as tmp:
            path = os.path.join(tmp, f"{uuid.uuid4().hex[:8]}{suffix}")
            yield path
            if self.local:
                os.replace(path, self.path)  # same folder, so the same file system: atomic
            else:
                self.fs.put_file(path, self.path)

    def create(self, data: bytes) -> bool:
        """Write the file only if nothing is there (atomically, one winner among racing writers); False if taken.

        Locally ``O_EXCL`` (the file written whole first, then hard-linked where links exist); elsewhere the file
        system's exclusive mode (``"xb"``: S3's ``If-None-Match: *``).

        Raises
        ------
        ConfigError
            The file system has no exclusive create.
        """
        if self.local:
            return _create_local(self.path, data)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as exc:
            raise ConfigError(f"{self.url}: this file system ({type(self.fs).__name__}) offers no exclusive "
                              f"create ({exc}); jobs cannot hold a lease there") from None
        return True

    def remove(self) -> None:
        """Remove the file if it is there."""
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.remove(self.path)
            else:
                self.fs.rm_file(self.path)


def _create_local(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and the file appears whole
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive create
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def locate(url: str | os.PathLike | Location, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The ``Location`` of ``url``: a local path (``~`` expanded), a ``file://`` URL or any fsspec URL.

    Raises
    ------
    ConfigError
        The URL's protocol is unknown, or its file system's package is not installed (naming the extra).
    """
    if isinstance(url, Location):
        return url
    text = os.fspath(url)
    if not is_url(text):
        path = text[len("file://"):] if text.startswith("file://") else text
        path = os.path.abspath(os.path.expanduser(path))
        return Location(text, LocalFileSystem(), path, {})
    options = dict(storage_options or {})
    protocol = text.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        check_s3fs()
    try:
        fs, path = fsspec.core.url_to_fs(text, **options)
    except ImportError as exc:
        extra = ' (pip install "ecg-pipeline[s3]")' if protocol in ("s3", "s3a") else ""
        raise ConfigError(f"{text}: the file system for {protocol}:// is not installed{extra}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{text}: not a path or URL this machine can open ({exc})") from None
    return Location(text, fs, path, options)


#: The oldest s3fs with the async file system zarr and this package use (the ``s3`` extra's bound).
MIN_S3FS = (2024, 6)


def check_s3fs(installed: str | None = None) -> None:
    """Refuse an s3fs too old to work (pip picks 0.4 beside a current boto3 when nothing bounds it).

    ``installed``: the version to judge (default: the one installed; none installed passes, ``url_to_fs``
    then names the extra to install).
    """
    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("s3fs")
        except PackageNotFoundError:
            return
    parts = tuple(int(p) for p in re.findall(r"\d+", installed)[:2])
    if parts < MIN_S3FS:
        raise ConfigError(f"s3fs {installed} is too old for s3:// URLs (needs >= {MIN_S3FS[0]}.{MIN_S3FS[1]}): "
                          'pip install "ecg-pipeline[s3]" (or "s3fs>=2024.6")')


def url_options(path: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` for ``path`` as zarr and xarray take them: None for a local path (zarr refuses options
    it would not use), the options for a URL. A job's options are for its URLs; its local paths need none."""
    return dict(storage_options) if storage_options and is_url(path) else None


def parse_storage_options(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--storage-option``) as fsspec storage options.

    A value is read as YAML (``anon=true``, ``default_block_size=5242880``) and a dotted key nests
    (``client_kwargs.endpoint_url=http://...``), so every option fsspec file systems take can be given.

    Raises
    ------
    ConfigError
        An item is not ``KEY=VALUE``.
    """
    import yaml

    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option {item!r}: expected KEY=VALUE (for example endpoint_url=http://...)")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        if not isinstance(parsed, (str, int, float, bool)) or parsed is None:
            parsed = value
        node = options
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--storage-option {item!r}: {p} is both a value and a group")
        node[leaf] = parsed
    return options
