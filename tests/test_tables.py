"""Per-record table formats: a registry of suffixes, checked before any work."""

import pandas as pd
import pytest

from ecg_pipeline.pipeline import tables
from ecg_pipeline.pipeline.errors import PipelineError


def test_csv_roundtrip_and_unknown_suffix(tmp_path):
    frame = pd.DataFrame({"record": ["100", "101"], "n_beats": [3, 4]})
    tables.write_table(frame, str(tmp_path / "t.csv"))
    assert pd.read_csv(tmp_path / "t.csv", dtype={"record": str}).equals(frame)
    with pytest.raises(PipelineError, match=r"name a \.csv or \.parquet file"):
        tables.table_format(str(tmp_path / "t.xlsx"))


def test_a_registered_format_is_used_and_its_needs_are_checked(tmp_path):
    def tsv(frame) -> bytes:
        return frame.to_csv(sep="\t", index=False).encode()

    fmt = tables.TableFormat(".tsv-test", "TSV", tsv, needs=("no_such_module_x",))
    tables.register_table_format(fmt)
    try:
        with pytest.raises(PipelineError, match="TSV needs no_such_module_x"):
            tables.write_table(pd.DataFrame({"a": [1]}), str(tmp_path / "t.tsv-test"))
        assert not (tmp_path / "t.tsv-test").exists()
        tables.register_table_format(tables.TableFormat(".tsv-test", "TSV", tsv))
        tables.write_table(pd.DataFrame({"a": [1], "b": [2]}), str(tmp_path / "t.tsv-test"))
        assert (tmp_path / "t.tsv-test").read_text() == "a\tb\n1\t2\n"
    finally:
        tables._REGISTRY.pop(".tsv-test")
