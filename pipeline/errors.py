"""Exceptions that carry the record and the cause, so a job can report and go on."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PipelineError):
    """A configuration file or option does not match its declaration in ``pipeline.config``."""


class RecordError(PipelineError):
    """One record cannot be processed; the job marks it failed and goes on.

    Parameters
    ----------
    record
        Record name (``"100"``).
    stage
        Stage that failed: ``download``, ``checksum``, ``header``, ``signal``,
        ``annotations``, ``lead``, ``segment`` or ``write``.
    message
        Human-readable cause.
    """

    def __init__(self, record: str, stage: str, message: str):
        self.record = record
        self.stage = stage
        self.message = message
        super().__init__(f"record {record}: {stage}: {message}")


class DownloadError(PipelineError):
    """A file could not be fetched from the source (after retries)."""


class ChecksumError(DownloadError):
    """A fetched file does not match its SHA256SUMS.txt entry."""


class SourceNotFound(DownloadError, FileNotFoundError):
    """The source answered that the file does not exist (HTTP 404 and the like)."""


class CacheError(PipelineError):
    """The local download cache or work folder cannot be written (a job-level error, found before work)."""


class StoreError(PipelineError):
    """A Zarr store does not match the store schema, or cannot be resumed."""
