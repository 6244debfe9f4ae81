import numpy as np
import pytest
import wfdb

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


def test_lead_names_are_matched_by_the_lead_they_name(tmp_path):
    """Spelling variants of one lead are that lead, for the preference lists and for the fallback."""
    for name in ("ECG lead II", "ECG_lead_II", "ECG_II", "II (ECG)", "lead ii", "ecg-II", "D2", "DII"):
        assert records.canonical_lead(name) == "II", name
    for name in ("MCL1", "mcl 1", "MCL_6", "ECG MCL1"):
        assert records.is_ecg_lead(name) and records.canonical_lead(name).startswith("MCL"), name
    assert records.canonical_lead("ml-ii") == "MLII" != records.canonical_lead("II")  # a modified lead is its own
    assert records.canonical_lead("ECG-PLETH") != records.canonical_lead("PLETH") and not records.is_ecg_lead("ECG-PLETH")
    # A record whose lead II is spelt otherwise: the preference list's II is found, not the fallback's first lead.
    write_record(tmp_path, "s", leads=("ECG lead I", "ECG lead II"))
    h = records.read_header(tmp_path / "s", "s")
    assert records.choose_lead(h, ("MLII", "II"), "first") == records.Lead(1, "ECG lead II", False)
    # A Holter record with MCL1 beside other signals is scored on MCL1 (it used to fail "no ECG lead").
    write_record(tmp_path, "m", leads=("ABP", "MCL1", "RESP"))
    h = records.read_header(tmp_path / "m", "m")
    assert records.choose_lead(h, ("MLII", "II"), "first") == records.Lead(1, "MCL1", True)


# ---------------------------------------------------------------------------------------------------------------------
# the fast reader (records._fast_channel) against wfdb's, and the header memo

#: (first, stop) sample ranges of a 1001-sample record: odd and even starts and stops, the ends, one sample
RANGES = [(0, None), (0, 1), (1, 2), (1, 1000), (2, 1001), (3, 8), (500, 501), (999, 1001), (1000, 1001)]
#: digital range and invalid-sample code of each format the tests write with wfdb
CODES = {"16": (-32768, 32767), "212": (-2048, 2047), "80": (-128, 127), "32": (-2**31, 2**31 - 1)}


def _write_digital(folder, name, fmt, n_sig, sig_len=1001, seed=0):
    """A record of random digital samples with invalid ones (NaN) and both extremes; returns them."""
    lo, hi = CODES[fmt]
    rng = np.random.default_rng(seed)
    d = rng.integers(lo + 1, hi, (sig_len, n_sig), endpoint=True)
    d[rng.integers(0, sig_len, 20), rng.integers(0, n_sig, 20)] = lo  # the invalid-sample code
    d[:2], d[-2:] = lo, hi  # invalid and the largest value at both ends
    d[5, :], d[6, :] = lo + 1, hi
    gains, baselines = [200.0, 13.7, 0.3][:n_sig], [0, -12, 1024][:n_sig]
    wfdb.wrsamp(name, fs=250, units=["mV"] * n_sig, sig_name=[f"s{i}" for i in range(n_sig)], d_signal=d,
                fmt=[fmt] * n_sig, adc_gain=gains, baseline=baselines, write_dir=str(folder))
    return d, gains, baselines


def _with_byte_offset(folder, name, k):
    """Move the record's samples ``k`` bytes into its file (junk before them), as its header then says."""
    dat = folder / f"{name}.dat"
    dat.write_bytes(b"\xff" * k + dat.read_bytes())
    lines = (folder / f"{name}.hea").read_text().splitlines()
    lines[1:] = [" ".join([t[0], f"{t[1]}+{k}", *t[2:]]) for t in (line.split() for line in lines[1:])]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")


def _read_all(base, name, monkeypatch=None):
    """Every signal of the record over every range in ``RANGES``; with ``monkeypatch``, by wfdb's reader only."""
    with pytest.MonkeyPatch.context() as mp:
        if monkeypatch:
            mp.setattr(records, "_fast_channel", lambda *args: None)
        h = records.read_header(base, name)
        return [records.read_signal(base, h, records.Lead(c, h.sig_names[c], False), a, b)
                for c in range(len(h.sig_names)) for a, b in RANGES]


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("n_sig", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["16", "212", "80", "32"])
def test_fast_reader_gives_wfdbs_samples_bit_for_bit(tmp_path, fmt, n_sig, offset):
    d, gains, baselines = _write_digital(tmp_path, "f", fmt, n_sig)
    if offset:
        _with_byte_offset(tmp_path, "f", offset)
    seg = records._load(tmp_path / "f", "f").segments[0]
    assert all(records._fast_channel(seg, c, 0, 1001) is not None for c in range(n_sig))  # the fast path is taken
    fast, slow = _read_all(tmp_path / "f", "f"), _read_all(tmp_path / "f", "f", monkeypatch=True)
    assert len(fast) == len(slow) == n_sig * len(RANGES)
    for got, want in zip(fast, slow):
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)  # NaN where wfdb has NaN
        assert got.tobytes() == want.tobytes()  # and bit for bit
    for c in range(n_sig):  # and the values themselves: (d - baseline) / gain in float64, NaN for the invalid code
        expected = ((d[:, c] - baselines[c]) / gains[c]).astype(np.float32)
        expected[d[:, c] == CODES[fmt][0]] = np.nan
        np.testing.assert_array_equal(fast[c * len(RANGES)], expected)
        assert np.isnan(fast[c * len(RANGES)]).sum() >= 2


@pytest.mark.parametrize("fmt, dtype, shift", [("61", ">i2", 0), ("160", "<u2", 32768)])
def test_fast_reader_reads_formats_wfdb_does_not_write(tmp_path, fmt, dtype, shift):
    rng = np.random.default_rng(1)
    d = rng.integers(-32768, 32767, (1001, 2), endpoint=True)
    d[[0, 10, 1000], [0, 1, 1]] = -32768
    (tmp_path / "g.dat").write_bytes(b"\0" * 3 + (d + shift).astype(dtype).tobytes())
    (tmp_path / "g.hea").write_text(f"g 2 250 1001\ng.dat {fmt}+3 200 16 0 0 0 0 s0\n"
                                    f"g.dat {fmt}+3 31.5(-7) 16 0 0 0 0 s1\n")
    fast, slow = _read_all(tmp_path / "g", "g"), _read_all(tmp_path / "g", "g", monkeypatch=True)
    for got, want in zip(fast, slow):
        assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(fast[len(RANGES)][[0, 10, 1000]], 
                                  np.float32([(d[0, 1] + 7) / 31.5, np.nan, np.nan]))


def test_fast_reader_reads_each_file_of_a_record_with_several(tmp_path):
    _write_digital(tmp_path, "a", "16", 2, seed=2)
    _write_digital(tmp_path, "b", "212", 3, seed=3)
    lines = [ln for name in "ab" for ln in (tmp_path / f"{name}.hea").read_text().splitlines()[1:]]
    (tmp_path / "m.hea").write_text("m 5 250 1001\n" + "\n".join(lines) + "\n")
    fast, slow = _read_all(tmp_path / "m", "m"), _read_all(tmp_path / "m", "m", monkeypatch=True)
    for got, want in zip(fast, slow):
        assert got.tobytes() == want.tobytes()


def test_fast_reader_leaves_other_layouts_to_wfdb(tmp_path):
    d = np.arange(-50, 50).reshape(50, 2)
    wfdb.wrsamp("s", fs=250, units=["mV"] * 2, sig_name=["a", "b"], e_d_signal=[d[:, 0], d[::2, 1]],
                samps_per_frame=[2, 1], fmt=["16", "16"], adc_gain=[200.0, 200.0], baseline=[0, 0],
                write_dir=str(tmp_path))
    seg = records._load(tmp_path / "s", "s").segments[0]
    assert records._fast_channel(seg, 1, 0, 25) is None  # several samples per frame in its file
    h = records.read_header(tmp_path / "s", "s")
    np.testing.assert_array_equal(records.read_signal(tmp_path / "s", h, records.Lead(0, "a", False)),
                                  np.float32(d[:, 0] / 200))
    np.testing.assert_array_equal(records.read_signal(tmp_path / "s", h, records.Lead(1, "b", False)),
                                  np.float32(d[::2, 1] / 200))
    _write_digital(tmp_path, "k", "16", 2)
    text = (tmp_path / "k.hea").read_text().replace("k.dat 16 ", "k.dat 16:1 ", 1)  # a skewed signal
    (tmp_path / "k.hea").write_text(text)
    assert records._fast_channel(records._load(tmp_path / "k", "k").segments[0], 1, 0, 10) is None


def _held(folder, *names):
    """The files ``names`` of ``folder`` in memory, as ``LocalRecord.contents`` holds an archive's members."""
    return {n: (folder / n).read_bytes() for n in names}


@pytest.mark.parametrize("fmt", ["16", "212"])
def test_a_record_held_in_memory_reads_as_it_does_on_disk(tmp_path, fmt):
    _write_digital(tmp_path, "f", fmt, 3)
    _with_byte_offset(tmp_path, "f", 5)
    contents = _held(tmp_path, "f.hea", "f.dat")
    nowhere = tmp_path / "not-on-disk" / "f"  # every byte comes from ``contents``
    h = records.read_header(nowhere, "f", contents=contents)
    assert h == records.read_header(tmp_path / "f", "f")
    mem = [records.read_signal(nowhere, h, records.Lead(c, h.sig_names[c], False), a, b, contents=contents)
           for c in range(3) for a, b in RANGES]
    for got, want in zip(mem, _read_all(tmp_path / "f", "f"), strict=True):
        assert got.tobytes() == want.tobytes()
    # Refused as on disk: a truncated signal file, an absent header.
    short = {**contents, "f.dat": contents["f.dat"][:1000]}
    with pytest.raises(RecordError, match=r"record f: signal: f\.dat is truncated: 1,000 bytes"):
        records.read_header(nowhere, "f", contents=short)
    with pytest.raises(RecordError, match=r"record f: signal: f\.dat is truncated"):
        records.read_signal(nowhere, h, records.Lead(0, "s0", False), contents=short)
    with pytest.raises(RecordError, match=r"record f: header: f\.hea: not found"):
        records.read_header(nowhere, "f", contents={})


def test_a_layout_only_wfdb_reads_is_read_from_memory_too(tmp_path):
    d = np.arange(-50, 50).reshape(50, 2)
    wfdb.wrsamp("s", fs=250, units=["mV"] * 2, sig_name=["a", "b"], e_d_signal=[d[:, 0], d[::2, 1]],
                samps_per_frame=[2, 1], fmt=["16", "16"], adc_gain=[200.0, 200.0], baseline=[0, 0],
                write_dir=str(tmp_path))
    contents, nowhere = _held(tmp_path, "s.hea", "s.dat"), tmp_path / "not-on-disk" / "s"
    h = records.read_header(nowhere, "s", contents=contents)
    # several samples per frame: wfdb's reader, given a temporary copy of the files
    np.testing.assert_array_equal(records.read_signal(nowhere, h, records.Lead(0, "a", False), contents=contents),
                                  np.float32(d[:, 0] / 200))
    assert records.header_files(nowhere, "s", contents=contents) == ("s.dat",)


@pytest.mark.realdata
@pytest.mark.parametrize("record", ["100", "114", "203", "232"])
def test_fast_reader_on_mitdb_records(mirror, record, monkeypatch):
    base = mirror / "mitdb" / "1.0.0" / record
    h = records.read_header(base, record)
    for c in range(2):
        lead = records.Lead(c, h.sig_names[c], False)
        for a, b in [(0, None), (1, 1001), (2, 1000), (333333, 333334), (649999, 650000)]:
            got = records.read_signal(base, h, lead, a, b)
            with monkeypatch.context() as mp:
                mp.setattr(records, "_fast_channel", lambda *args: None)
                want = records.read_signal(base, h, lead, a, b)
            assert got.tobytes() == want.tobytes(), (record, c, a, b)


def test_a_header_changed_on_disk_is_read_anew(tmp_path):
    write_record(tmp_path, "h", leads=("MLII", "V1"))
    hea = tmp_path / "h.hea"
    original = hea.read_text()
    assert records.read_header(tmp_path / "h", "h").sig_names == ("MLII", "V1")
    hea.write_text(original.replace(" V1", " V5"))
    assert records.read_header(tmp_path / "h", "h").sig_names == ("MLII", "V5")
    hea.write_text(original)
    assert records.read_header(tmp_path / "h", "h").sig_names == ("MLII", "V1")


def test_each_parse_gives_its_own_record(tmp_path):
    write_record(tmp_path, "i")
    first = records._parse(records._Folder(tmp_path), "i.hea", "i")
    first.sig_name[0], first.fmt[1] = "changed", "16"
    first.file_name.append("x.dat")
    first.comments.append("a note")
    again = records._parse(records._Folder(tmp_path), "i.hea", "i")
    assert again is not first and again.sig_name == ["MLII", "V1"] and again.fmt == ["212", "212"]
    assert again.file_name == ["i.dat", "i.dat"] and "a note" not in again.comments


def test_a_bad_header_fails_the_same_way_every_time(tmp_path):
    (tmp_path / "c.hea").write_text("c two 360 650000\nc.dat 212 200 11 1024 0 0 0 MLII\n")
    messages = set()
    for _ in range(2):
        with pytest.raises(RecordError, match="record c: header: cannot parse c.hea: HeaderSyntaxError") as exc:
            records.read_header(tmp_path / "c", "c")
        messages.add(str(exc.value))
    assert len(messages) == 1


@pytest.mark.parametrize("size", [1000, 2999, 3000])
def test_a_file_truncated_after_read_header_fails_in_read_signal(tmp_path, size):
    write_record(tmp_path, "t", seconds=3.0)  # 1080 frames, 3,240 bytes
    h = records.read_header(tmp_path / "t", "t")
    with open(tmp_path / "t.dat", "r+b") as f:
        f.truncate(size)
    with pytest.raises(RecordError) as fresh:
        records.read_header(tmp_path / "t", "t")
    for c in range(2):
        with pytest.raises(RecordError, match=f"record t: signal: t.dat is truncated: {size:,} bytes, the header "
                                              "implies 3,240") as exc:
            records.read_signal(tmp_path / "t", h, records.Lead(c, h.sig_names[c], False), 0, 10)
        assert str(exc.value) == str(fresh.value)


def test_headers_are_parsed_as_wfdb_parses_them(mirror):
    """The header parser without pandas gives wfdb's fields, values and types, on every MIT-BIH header, Challenge
    2017 headers, and hand-made lines for wfdb's special cases (a gain of 0, a baseline from the ADC zero, no
    units, skew and byte offsets, fractional rates, a counter frequency)."""
    import zipfile

    from wfdb.io import _header
    from wfdb.io import header as wfdb_header

    from ecg_pipeline.pipeline.records import _parse_record_line, _parse_signal_lines, _record_line

    texts = [p.read_text() for p in sorted((mirror / "mitdb" / "1.0.0").glob("*.hea"))]
    archive = mirror / "challenge-2017" / "1.0.0" / "training2017.zip"
    if archive.is_file():
        with zipfile.ZipFile(archive) as z:
            texts += [z.read(n).decode() for n in sorted(z.namelist()) if n.endswith(".hea")][:300]
    texts += ["r 2 360.5/100(12) 1000\nr.dat 212 0(3)/uV 11 1024 0 0 0 MLII\nr.dat 212 200 11 -5 0 0 0 V5\n",
              "r 1 250\nr.dat 16x4:2+512 100.5e1/mV 12 7\n", "r 1 128 10\n~ 16\n", "r 2\nr.dat 80 -3.5(-7)\nr.dat 80\n",
              "r 1 360\nr.mat 16+24 1000/mV 16 0 -127 0 0 ECG lead II\n"]
    assert len(texts) > 100
    for text in texts:
        lines, _ = wfdb_header.parse_header_content(text)
        line = _record_line(lines[0])
        ours, theirs = _parse_record_line(line), _header._parse_record_line(line)
        assert ours == theirs and [type(v) for v in ours.values()] == [type(v) for v in theirs.values()], text
        ours, theirs = _parse_signal_lines(lines[1:]), _header._parse_signal_lines(lines[1:])
        assert ours == theirs, text
        assert {k: [type(x) for x in v] for k, v in ours.items()} == {k: [type(x) for x in v] for k, v in theirs.items()}
    with pytest.raises(_header.HeaderSyntaxError):
        _parse_signal_lines(["r.dat x y"])
