"""Stage 11: per-record tables as files, in the formats of a registry (CSV, Parquet, ...).

A format is a file suffix, an encoder ``fn(frame) -> bytes`` and the optional packages it
needs; ``register_table_format`` adds one (the ``--summary`` help lists them). ``write_table``
writes the bytes whole to a local path or an fsspec URL (``locations``).
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import PipelineError
from .locations import locate


@dataclass(frozen=True)
class TableFormat:
    suffix: str
    name: str
    encode: Callable[[Any], bytes]  #: pandas.DataFrame -> the file's bytes
    needs: tuple[str, ...] = ()  #: importable modules it requires
    extra: str = ""  #: the package extra that installs them


_REGISTRY: dict[str, TableFormat] = {}
TABLE_FORMATS: Mapping[str, TableFormat] = MappingProxyType(_REGISTRY)


def register_table_format(fmt: TableFormat) -> None:
    """Make files ending in ``fmt.suffix`` a choice of ``--summary``."""
    _REGISTRY[fmt.suffix] = fmt


def _csv(frame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


def _parquet(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


register_table_format(TableFormat(".csv", "CSV", _csv))
register_table_format(TableFormat(".parquet", "Parquet", _parquet, needs=("pyarrow",), extra="parquet"))


def table_format(path: str) -> TableFormat:
    """The format of ``path``, checked before any work: known suffix, required packages installed."""
    fmt = next((f for s, f in TABLE_FORMATS.items() if path.endswith(s)), None)
    if fmt is None:
        raise PipelineError(f"--summary {path}: name a {' or '.join(TABLE_FORMATS)} file")
    missing = [m for m in fmt.needs if importlib.util.find_spec(m) is None]
    if missing:
        hint = f"pip install 'ecg-pipeline[{fmt.extra}]'" if fmt.extra else f"pip install {' '.join(missing)}"
        raise PipelineError(f"--summary {path}: {fmt.name} needs {', '.join(missing)} ({hint}); or name a .csv file")
    return fmt


def write_table(frame, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``frame`` to ``path`` (a local path or fsspec URL) in the format its suffix names, whole or not at all."""
    locate(path, storage_options).write_bytes(table_format(path).encode(frame))
