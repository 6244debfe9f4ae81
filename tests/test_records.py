import numpy as np
import pytest

from helpers import write_record
from ecg_pipeline.pipeline import records
from ecg_pipeline.pipeline.errors import RecordError


def test_header_and_lead_choice(tmp_path):
    write_record(tmp_path, "a", leads=("V5", "MLII"))
    h = records.read_header(tmp_path / "a", "a")
    assert (h.fs, h.sig_len, h.sig_names, h.files) == (360.0, 7200, ("V5", "MLII"), ("a.dat",))
    assert records.choose_lead(h, ("MLII", "V5")) == records.Lead(1, "MLII", False)  # like record 114
    assert records.choose_lead(h, ("mlii",)).name == "MLII"  # case-insensitive
    assert records.choose_lead(h, ("V1", "V5")).name == "V5"  # declared fallback order
    assert records.choose_lead(h, ("V1",), "first") == records.Lead(0, "V5", True)
    with pytest.raises(RecordError, match=r"record a: lead: none of the leads \['V1'\] in signals \['V5', 'MLII'\]"):
        records.choose_lead(h, ("V1",), "fail")


def test_mitdb_models_score_lead_ii_of_a_12_lead_record(tmp_path):
    from ecg_pipeline.pipeline.databases import get_database

    twelve = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    write_record(tmp_path, "t", leads=twelve)
    h = records.read_header(tmp_path / "t", "t")
    assert records.choose_lead(h, get_database("mitdb").leads, "first") == records.Lead(1, "II", False)


def test_signal_and_annotations(tmp_path):
    info = write_record(tmp_path, "b", symbols=None)
    h = records.read_header(tmp_path / "b", "b")
    lead = records.choose_lead(h, ("MLII",))
    sig = records.read_signal(tmp_path / "b", h, lead)
    assert sig.dtype == np.float32 and sig.shape == (h.sig_len,)
    part = records.read_signal(tmp_path / "b", h, lead, 100, 200)
    np.testing.assert_array_equal(part, sig[100:200])
    ann = records.read_annotations(tmp_path / "b", "b", "atr")
    np.testing.assert_array_equal(ann.sample, info["sample"])


@pytest.mark.parametrize("text, message", [
    ("c two 360 650000\nc.dat 212 200 11 1024 0 0 0 MLII\n", "record c: header: cannot parse c.hea: HeaderSyntaxError"),
    ("c 2 360 650000\nc.dat 212 200 11 1024 0 0 0 MLII\n", "record c: header: header declares 2 signals but describes 1"),
])
def test_bad_header(tmp_path, text, message):
    (tmp_path / "c.hea").write_text(text)
    with pytest.raises(RecordError, match=message):
        records.read_header(tmp_path / "c", "c")


def test_truncated_signal(tmp_path):
    write_record(tmp_path, "d")
    h = records.read_header(tmp_path / "d", "d")
    with open(tmp_path / "d.dat", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(RecordError, match=r"record d: signal: d.dat is truncated: 1,000 bytes, the header implies 21,600"):
        records.read_signal(tmp_path / "d", h, records.Lead(0, "MLII", False))


def test_missing_annotations(tmp_path):
    write_record(tmp_path, "e")
    with pytest.raises(RecordError, match="record e: annotations: cannot read e.qrs"):
        records.read_annotations(tmp_path / "e", "e", "qrs")


def test_ecg_lead_names_are_recognised_and_other_signals_never_taken_by_the_fallback(tmp_path):
    for name in ("MLII", "II", "aVF", "V1", "V6", "ECG", "ECG1", "ecg 2", "EKG", "Lead II", "ML5", "CM5", "I", "III"):
        assert records.is_ecg_lead(name), name
    for name in ("PLETH", "ABP", "RESP", "signal 0", "", "SpO2", "EEG", "V7", "ECG-PLETH"):
        assert not records.is_ecg_lead(name), name
    write_record(tmp_path, "p", leads=("PLETH", "II", "ABP"))
    h = records.read_header(tmp_path / "p", "p")
    assert records.choose_lead(h, ("MLII",), "first") == records.Lead(1, "II", True)
    write_record(tmp_path, "q", leads=("PLETH", "ABP"))
    h = records.read_header(tmp_path / "q", "q")
    with pytest.raises(RecordError, match=r"no ECG lead among its signals \['PLETH', 'ABP'\]"):
        records.choose_lead(h, ("MLII",), "first")
    assert records.choose_lead(h, ("pleth",), "first") == records.Lead(0, "PLETH", False)  # named: taken
