"""Stage 11: per-record tables as files, in the formats of a registry (CSV, Parquet, ...).

A format is a file suffix, a writer ``fn(frame, path)`` and the optional packages it
needs; ``register_table_format`` adds one (the ``--summary`` help lists them).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import PipelineError


@dataclass(frozen=True)
class TableFormat:
    suffix: str
    name: str
    write: Callable[[Any, str], None]  #: (pandas.DataFrame, fsspec path) -> None
    needs: tuple[str, ...] = ()  #: importable modules it requires
    extra: str = ""  #: the package extra that installs them


_REGISTRY: dict[str, TableFormat] = {}
TABLE_FORMATS: Mapping[str, TableFormat] = MappingProxyType(_REGISTRY)


def register_table_format(fmt: TableFormat) -> None:
    """Make files ending in ``fmt.suffix`` a choice of ``--summary``."""
    _REGISTRY[fmt.suffix] = fmt


def _write_csv(frame, path: str) -> None:
    import fsspec

    with fsspec.open(path, "w", newline="") as f:
        frame.to_csv(f, index=False)


def _write_parquet(frame, path: str) -> None:
    import fsspec

    with fsspec.open(path, "wb") as f:
        frame.to_parquet(f, index=False)


register_table_format(TableFormat(".csv", "CSV", _write_csv))
register_table_format(TableFormat(".parquet", "Parquet", _write_parquet, needs=("pyarrow",), extra="parquet"))


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


def write_table(frame, path: str) -> None:
    """Write ``frame`` to ``path`` in the format its suffix names."""
    table_format(path).write(frame, path)
