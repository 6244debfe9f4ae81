"""benchmarks/stress.py (the noise stress set) and benchmarks/detectors.py (the detector benchmark) on real data."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from helpers import REPO

sys.path.insert(0, str(REPO))  # the benchmarks/ folder is not part of the installed package

from benchmarks import detectors, stress  # noqa: E402

SNRS = (12, 0)
SOURCE = "100"
PROTOCOL = stress.Protocol(clean_s=60.0, stretch_s=60.0)
DURATION_S = 240.0


@pytest.fixture(scope="module")
def stress_set(mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("stress")
    manifest = stress.build_stress_set(out, [SOURCE], SNRS, seed=3, mirror=mirror, duration_s=DURATION_S,
                                       protocol=PROTOCOL, noise_limit=12)
    return out, manifest


def _sigamp_qrs(d, sample, symbol, fs):
    """sigamp -a, written again here: p-p over t-50 ms..t+50 ms of the first 300 map1-NORMAL beats, 5% trimmed."""
    half = round(0.05 * fs)
    normal = set("N L R a J A S j / Q B e n f".split())
    t = [s for s, c in zip(sample, symbol) if c in normal and half <= s < len(d) - half][:300]
    pp = np.sort([np.ptp(d[s - half:s + half + 1]) for s in t])
    k = len(pp) // 20
    return pp[k:len(pp) - k].mean()


def _sigamp_rms(x, fs, ranges):
    """sigamp -r over the noisy ranges: RMS about the mean of each whole second, 5% trimmed."""
    k = int(fs)
    rms = [np.sqrt(np.mean((c - c.mean()) ** 2)) for a, b in ranges for c in
           (x[a + i * k:a + (i + 1) * k] for i in range((b - a) // k))]
    rms = np.sort(rms)
    j = len(rms) // 20
    return rms[j:len(rms) - j].mean()


@pytest.mark.realdata
@pytest.mark.slow
def test_stress_set_is_nstdb_like(stress_set, mirror):
    import wfdb

    out, manifest = stress_set
    base = mirror / "mitdb" / "1.0.0" / SOURCE
    n = int(DURATION_S * 360)
    clean = wfdb.rdrecord(str(base), physical=False, sampto=n)
    ref = wfdb.rdann(str(base), "atr")
    ranges = [(21600, 43200), (64800, 86400)]  # noise 1:00-2:00 and 3:00-4:00
    assert (out / "RECORDS").read_text().split() == ["100e12", "100e00"]
    assert [e["record"] for e in manifest["records"]] == ["100e12", "100e00"]
    noisy = np.zeros(n, bool)
    for a, b in ranges:
        noisy[a:b] = True
    for entry, snr in zip(manifest["records"], SNRS):
        assert entry["noisy"] == [list(r) for r in ranges] and entry["snr_db"] == snr
        assert entry["scored_lead"] == "MLII"
        rec = wfdb.rdrecord(str(out / entry["record"]), physical=False)
        assert rec.sig_len == n and rec.sig_name == clean.sig_name and list(rec.adc_gain) == list(clean.adc_gain)
        assert rec.fmt[0] == entry["fmt"] and entry["fmt"] in ("212", "16")
        ann = wfdb.rdann(str(out / entry["record"]), "atr")
        keep = ref.sample < n
        assert np.array_equal(ann.sample, ref.sample[keep]) and ann.symbol == list(np.array(ref.symbol)[keep])
        added = rec.d_signal.astype(np.int64) - clean.d_signal.astype(np.int64)
        # the clean stretches are the source's samples, bit for bit; every noisy stretch carries noise
        assert not added[~noisy].any()
        for a, b in ranges:
            assert (added[a:b] != 0).mean() > 0.5
        for k in range(rec.n_sig):  # the SNR measured back from what was written, as nst defines it
            s = _sigamp_qrs(clean.d_signal[:, k], ref.sample, ref.symbol, 360.0)
            measured = 10 * np.log10(s ** 2 / 8 / _sigamp_rms(added[:, k].astype(float), 360.0, ranges) ** 2)
            assert abs(measured - snr) < 0.5, (entry["record"], k, measured)
            assert abs(entry["leads"][k]["snr_db_achieved"] - measured) < 0.01
    # the two leads get different noise, the same at both SNRs up to the gain
    lead_noise = [wfdb.rdrecord(str(out / "100e00"), physical=False).d_signal[:, k].astype(float)
                  - clean.d_signal[:, k] for k in range(2)]
    assert abs(np.corrcoef(lead_noise[0][noisy], lead_noise[1][noisy])[0, 1]) < 0.5
    e12 = wfdb.rdrecord(str(out / "100e12"), physical=False).d_signal[:, 0].astype(float) - clean.d_signal[:, 0]
    assert np.corrcoef(e12[noisy], lead_noise[0][noisy])[0, 1] > 0.99
    sums = dict(line.split()[::-1] for line in (out / "SHA256SUMS.txt").read_text().splitlines())
    assert {"100e12.dat", "100e12.hea", "100e12.atr", "manifest.json", "noise.npy", "RECORDS"} <= set(sums)
    noise = manifest["noise"]
    assert noise["n_kept"] >= 1 and all(r["ecg_index_cancelled"] <= 1.5 for r in noise["recordings"] if r["kept"])


@pytest.mark.realdata
def test_stress_set_is_deterministic(stress_set, mirror, tmp_path):
    out, manifest = stress_set
    again = stress.build_stress_set(tmp_path, [SOURCE], SNRS[:1], seed=3, mirror=mirror, duration_s=DURATION_S,
                                    protocol=PROTOCOL, noise_bank=np.load(out / "noise.npy"))
    assert (tmp_path / "100e12.dat").read_bytes() == (out / "100e12.dat").read_bytes()
    assert again["records"][0]["leads"] == manifest["records"][0]["leads"]


def test_names_and_protocol():
    assert [stress.record_name("118", s) for s in stress.SNRS] == ["118e24", "118e18", "118e12", "118e06", "118e00",
                                                                    "118e_6"]
    assert stress.Protocol().noisy_ranges(650000, 360.0)[:2] == [(108000, 151200), (194400, 237600)]
    assert stress.Protocol().noisy_ranges(650000, 360.0)[-1] == (626400, 650000)
    assert len(stress.DS1) == len(stress.DS2) == 22 and not set(stress.DS1) & set(stress.DS2)


def _installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.realdata
@pytest.mark.slow
def test_detector_benchmark_quick(stress_set, tmp_path, capsys):
    out, _ = stress_set
    names = ["ecg_pipeline", "xqrs"] + [name for name, module in (("sleepecg", "sleepecg"), ("neurokit", "neurokit2"),
                                                                  ("hamilton", "ecgdetectors")) if _installed(module)]
    rc = detectors.main(["--quick", "--stress", str(out), "--detectors", *names, "--json", str(tmp_path / "d.json"),
                         "--markdown", str(tmp_path / "d.md"), "--baseline-detector",
                         str(REPO / "pipeline" / "detect.py")])
    assert rc == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    rows = {(r["dataset"], r["snr_db"], r["scope"], r["detector"]): r for r in doc["results"]}
    want = ["ecg_pipeline", detectors.BEFORE, *names[1:]]
    assert {d for (ds, *_, d) in rows if ds == "mitdb"} == set(want)
    assert set(rows) == {("mitdb", None, "whole", d) for d in want} | {
        ("stress", s, scope, d) for s in SNRS for scope in ("whole", "noisy") for d in want}
    assert not doc["skipped"]
    ours = rows[("mitdb", None, "whole", "ecg_pipeline")]
    assert ours["records"] == 2 and ours["errors"] == 0 and ours["se"] > 0.99 and ours["ppv"] > 0.99
    assert abs(ours["hours"] - 2 * 5 / 60) < 1e-3 and ours["s_per_h"] > 0
    for d in want:  # the noisy stretches are part of the whole records
        for s in SNRS:
            n, w = rows[("stress", s, "noisy", d)], rows[("stress", s, "whole", d)]
            assert n["tp"] <= w["tp"] and n["fn"] <= w["fn"] and n["fp"] <= w["fp"]
            assert n["tp"] + n["fn"] > 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "d.md").read_text() + "\n"
    for label in ("| ecg_pipeline |", "| ecg_pipeline (before) |", "| wfdb XQRS |", "| 12 | ecg_pipeline |",
                  "| 0 | wfdb XQRS |"):
        assert label in text


def test_a_missing_peer_is_skipped_not_fatal():
    def missing(fs):
        raise ImportError("No module named 'nope'")

    def flaky(fs):
        def detect(x):  # the 10 s warm-up passes, the record fails
            if x.size > 10 * fs:
                raise RuntimeError("boom")
            return np.zeros(0, np.int64)

        return detect

    fs = 360.0
    t = np.arange(int(60 * fs)) / fs
    x = np.where((t % 0.8) < 0.02, 1.0, 0.0) + 0.01 * np.sin(2 * np.pi * t)  # a spike every 0.8 s
    ref = np.flatnonzero(np.diff(np.concatenate([[0.0], (t % 0.8) < 0.02]).astype(int)) == 1)
    case = detectors.Case("mitdb", "synthetic", None, fs, x, ref)
    dets = [detectors.DETECTORS["ecg_pipeline"], detectors.Detector("nope", "Nope", "nope", missing),
            detectors.Detector("broken", "Broken", "nope", flaky)]
    rows, per_record, skipped = detectors.run([case], dets)
    assert set(skipped) == {"nope"} and "not installed" in skipped["nope"]
    by = {r["detector"]: r for r in rows}
    assert set(by) == {"ecg_pipeline", "broken"}
    assert by["broken"]["errors"] == 1 and by["broken"]["tp"] == 0 and by["broken"]["fn"] == ref.size
    text = detectors.markdown(rows, dets, skipped, {"versions": {}})
    assert "- nope: not installed" in text
