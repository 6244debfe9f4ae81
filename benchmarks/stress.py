"""Noise stress set: MIT-BIH records with real recorded noise added at calibrated SNRs, as the MIT-BIH Noise
Stress Test Database (nstdb) was made with WFDB's ``nst``, written as a PhysioNet-style tree that
``ecg-pipeline score --input DIR`` and ``benchmarks/detectors.py --stress DIR`` read.

Protocol (nst's standard one)
    Clean for the first 5 minutes (the "learning period"), then noise on and off in alternating 2-minute
    stretches to the end of the record: noisy 5:00-7:00, clean 7:00-9:00, noisy 9:00-11:00, ... The noisy
    sample ranges of every record are in ``manifest.json``. Both leads of the record are kept, each with
    its own noise (score picks its lead as for MIT-BIH, e.g. MLII second in 114); the clean stretches are
    the source record's samples unchanged, bit for bit.

Noise: the Challenge 2017 recordings labelled ``~`` (too noisy to classify), ECG cancelled
    nstdb's noise records (``bw``, ``em``, ``ma``) were recorded with electrodes where the ECG is not
    visible; they are not in this mirror. The closest real noise here is the 284 Challenge 2017 training
    recordings that cardiologists labelled ``~``: single-lead ambulatory (AliveCor) recordings dominated by
    electrode motion, contact loss, baseline wander and muscle noise, i.e. mostly ``em``-like noise, the
    kind nstdb calls the most troublesome. Unlike ``em`` they often still carry some ECG of their own, and
    beats in the noise are not in the MIT-BIH reference, so they would count against a detector that finds
    them. Hence, for each ``~`` recording, in name order:

    1. to 360 Hz with ``scipy.signal.resample_poly(x, 6, 5)``; its first second dropped (the recorder's
       start-up transient);
    2. zero-phase 2nd-order Butterworth high-pass at 0.5 Hz: sub-hertz drift is what the SNR measure
       below (RMS about each 1-s mean) barely sees, so it would be added uncounted;
    3. its own ECG cancelled: beats found by XQRS and GQRS (``wfdb.processing``: independent of this
       project's detector, so the set does not change when ``pipeline/detect.py`` does), merged within
       100 ms; the median beat (-200 to +400 ms, Tukey-tapered) subtracted at each of them, aligned within
       +-33 ms and scaled by least squares (scale clipped to [0, 2], so a detection in pure noise, which
       fits no beat, subtracts ~nothing);
    4. kept only if little ECG is left: its *ECG index* (peak-to-peak of the median of the windows at the
       beats XQRS or GQRS still find, over the recording's RMS as ``noise_amplitude`` measures it) is at
       most ``max_ecg_index`` (1.5; windows at random places of pure noise give ~0.5, clean ECG 5-10);
       about 128 recordings, 53 minutes, pass;
    5. Tukey-tapered (0.25 s ends) and concatenated: the *noise bank* (``noise.npy``, float32 mV at 360 Hz).

    The noise of a record runs alongside it as nst's noise record does: sample ``t`` of lead ``k`` gets bank
    sample ``(offset_k + t) mod len(bank)`` (the bank rewinds like nst's), ``offset_0`` drawn from the seed
    and the record name, ``offset_1 = offset_0 + len(bank) / 2``; a record gets the same noise at every
    SNR. The noise fades in and out over 0.5 s (raised cosine) at each end of each noisy stretch, so no
    step is made where it switches on or off (nst instead switches at once and adds an offset that keeps
    the output continuous, an offset it carries into the next clean stretch).

SNR (nst's definition, WFDB Applications Guide, nst(1) and sigamp(1)); ``SNR = 10 log10(S / N)``
    * ``S = A**2 / 8`` with ``A`` the QRS amplitude of the clean lead: the peak-to-peak range of the digital
      samples from 50 ms before to 50 ms after (t-18..t+18 at 360 Hz) each of the first 300 reference
      beats that WFDB's ``map1`` maps to NORMAL (N L R a J A S j / Q B e n f; not V E r F), the largest 5%
      and smallest 5% dropped (``n // 20`` each side of the sorted list, as sigamp does), the rest
      averaged (``qrs_amplitude``);
    * ``N = a**2 n**2`` with ``n`` the RMS amplitude of the noise: 1-second chunks, in each the RMS of the
      samples about that chunk's mean, the largest and smallest 5% dropped, the rest averaged
      (``noise_amplitude``), and ``a`` the gain applied to the noise. Where nst measures ``n`` over the
      first 300 s of its noise record, here it is measured over the noise this lead of this record
      actually gets (all of its noisy stretches, 1-s chunks laid from each stretch's start), because the
      bank's level varies from one recording to the next; so the SNR written in the manifest is the one
      achieved, up to rounding to ADC units (``a = sqrt(S / (N_1 10**(SNR/10)))``).

Output (``build_stress_set``)
    ``<out>/<rec>e<SNR>.hea/.dat/.atr`` named as nstdb's (``118e24``, ``118e06``, ``118e00``, ``118e_6``);
    the source's gain, baseline, ADC resolution and zero, header comments (plus one line saying what was
    added), and format 212 where every sample fits its 12 bits, else format 16 with the same gain (as
    nstdb wrote 118e00 and 118e_6); the reference ``.atr`` copied byte for byte (rewritten with
    ``wfdb.wrann`` when ``duration_s`` cuts the record short); ``RECORDS``; ``SHA256SUMS.txt``;
    ``noise.npy``; ``manifest.json`` (protocol, SNR definition, noise provenance, and per record: source,
    SNR, noisy sample ranges ``[start, stop)``, and per lead the amplitudes, gain and achieved SNR).

    python -m benchmarks.stress --out runs/stress [--records DS2|DS1|118 119 ...] [--snrs 24 18 12 6 0 -6]
                                [--seed 0] [--mirror ../shared/physionet] [--duration-s S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ecg_pipeline.pipeline.splits import DS1, DS2  # de Chazal's inter-patient split (paced records in neither)

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "physionet"
log = logging.getLogger("benchmarks.stress")

SNRS = (24, 18, 12, 6, 0, -6)
FS = 360.0
#: WFDB ecgmap.h map1(): the annotation codes it maps to NORMAL, whose amplitude sigamp -a measures
MAP1_NORMAL = frozenset(["N", "L", "R", "a", "J", "A", "S", "j", "/", "Q", "B", "e", "n", "f"])
FMT212_MAX = 2047  # format 212 holds 12 bits; -2048 is WFDB's "invalid sample"
FORMAT = "ecg-pipeline stress set 1"
RAMP_S = 0.5  #: noise faded in and out over this at each end of a noisy stretch


@dataclass(frozen=True)
class Protocol:
    """nst's standard protocol: ``clean_s`` noise-free, then noise on and off every ``stretch_s``."""

    clean_s: float = 300.0
    stretch_s: float = 120.0

    def noisy_ranges(self, n: int, fs: float) -> list[tuple[int, int]]:
        """``[start, stop)`` sample ranges of a record of ``n`` samples that carry noise."""
        first, step = int(round(self.clean_s * fs)), int(round(self.stretch_s * fs))
        return [(s, min(s + step, n)) for s in range(first, n, 2 * step) if s < n]


def record_name(source: str, snr: int) -> str:
    """nstdb's names: ``118e24``, ``118e06``, ``118e00``, ``118e_6``."""
    snr = int(snr)
    return f"{source}e{snr:02d}" if snr >= 0 else f"{source}e_{-snr}"


def _trimmed_mean(values: np.ndarray) -> float:
    """sigamp's trimmed mean: sorted, ``n // 20`` dropped at each end, the rest averaged."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    lo = v.size // 20
    return float(v[lo:v.size - lo].mean()) if v.size else float("nan")


def qrs_amplitude(d: np.ndarray, sample: np.ndarray, symbol, fs: float, n_max: int = 300) -> float:
    """``sigamp -a atr``: trimmed mean peak-to-peak amplitude (units of ``d``) of the first ``n_max`` beats
    that ``map1`` calls NORMAL, each over ``t - 50 ms .. t + 50 ms`` inclusive."""
    half = int(round(0.05 * fs))
    sample = np.asarray(sample, dtype=np.int64)
    normal = np.array([s in MAP1_NORMAL for s in symbol], dtype=bool)
    t = sample[normal & (sample - half >= 0) & (sample + half < d.size)][:n_max]
    if not t.size:
        raise ValueError("no NORMAL beat to measure the QRS amplitude on")
    w = d[t[:, None] + np.arange(-half, half + 1)[None, :]]
    return _trimmed_mean(w.max(axis=1) - w.min(axis=1))


def chunk_rms(x: np.ndarray, fs: float) -> np.ndarray:
    """RMS about the mean of each whole 1-second chunk of ``x`` (sigamp -r's measurements)."""
    k = int(round(fs))
    n = x.size // k
    c = np.asarray(x[:n * k], dtype=np.float64).reshape(n, k)
    return np.sqrt(((c - c.mean(axis=1, keepdims=True)) ** 2).mean(axis=1))


def noise_amplitude(x: np.ndarray, fs: float, ranges: list[tuple[int, int]] | None = None) -> float:
    """``sigamp -r``: trimmed mean of the 1-s chunk RMS of ``x``, chunks laid from the start of each range
    (the whole of ``x`` by default)."""
    ranges = ranges or [(0, x.size)]
    rms = np.concatenate([chunk_rms(x[a:b], fs) for a, b in ranges])
    return _trimmed_mean(rms)


def snr_db(qrs_pp: float, noise_rms: float) -> float:
    """nst's SNR of a QRS amplitude and a noise RMS (same units): ``10 log10((A**2 / 8) / n**2)``."""
    return float(10 * np.log10(qrs_pp ** 2 / 8 / noise_rms ** 2))


# --- the noise bank ---------------------------------------------------------------------------------------

_LO_S, _HI_S, _SHIFT_S = 0.2, 0.4, 0.033


def _beats(x: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    from wfdb import processing

    xq = np.asarray(processing.xqrs_detect(x, fs, verbose=False), dtype=np.int64)
    gq = np.asarray(processing.gqrs_detect(sig=x, fs=fs), dtype=np.int64)
    return xq, gq


def _template(x: np.ndarray, pos: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    pos = pos[(pos - lo >= 0) & (pos + hi < x.size)]
    if pos.size < 3:
        return pos, np.zeros(lo + hi)
    w = x[pos[:, None] + np.arange(-lo, hi)[None, :]]
    return pos, np.median(w - np.median(w, axis=1, keepdims=True), axis=0)


def ecg_index(x: np.ndarray, fs: float) -> float:
    """How much ECG is left in a noise recording: peak-to-peak of the median beat at the beats XQRS or GQRS
    find (the larger of the two), over ``noise_amplitude(x)``."""
    lo, hi = int(_LO_S * fs), int(_HI_S * fs)
    ptp = max(np.ptp(_template(x, p, lo, hi)[1]) for p in _beats(x, fs))
    return float(ptp / noise_amplitude(x, fs))


def cancel_ecg(x: np.ndarray, fs: float) -> np.ndarray:
    """``x`` less its own ECG: the median beat at the XQRS and GQRS beats, aligned and scaled per beat."""
    from scipy import signal

    lo, hi, s = int(_LO_S * fs), int(_HI_S * fs), int(round(_SHIFT_S * fs))
    pos = np.unique(np.concatenate(_beats(x, fs)))
    if pos.size:
        pos = pos[np.concatenate([[True], np.diff(pos) > 0.1 * fs])]
    pos, tpl = _template(x, pos, lo, hi)
    pos = pos[(pos - lo - s >= 0) & (pos + hi + s < x.size)]
    if pos.size < 3 or not np.any(tpl):
        return x.copy()
    tpl = tpl * signal.windows.tukey(lo + hi, 0.3)
    shifts = np.arange(-s, s + 1)
    seg = x[pos[:, None, None] + shifts[None, :, None] + np.arange(-lo, hi)[None, None, :]]
    seg = seg - seg.mean(axis=-1, keepdims=True)
    gain = np.clip(seg @ tpl / (tpl @ tpl), 0.0, 2.0)
    best = ((seg - gain[..., None] * tpl) ** 2).sum(axis=-1).argmin(axis=1)
    y = x.copy()
    for p, k, g in zip(pos, shifts[best], gain[np.arange(pos.size), best]):
        y[p + k - lo:p + k + hi] -= g * tpl
    return y


def _noisy_recordings(mirror: Path, limit: int | None) -> list[tuple[str, np.ndarray, float]]:
    """``(name, signal in mV, fs)`` of the Challenge 2017 recordings labelled ``~``, in name order."""
    import wfdb

    archive = mirror / "challenge-2017" / "1.0.0" / "training2017.zip"
    if not archive.is_file():
        raise FileNotFoundError(f"no Challenge 2017 archive at {archive}")
    with zipfile.ZipFile(archive) as z, tempfile.TemporaryDirectory(prefix="stress-noise-") as tmp:
        ref = z.read("training2017/REFERENCE.csv").decode()
        names = sorted(r.split(",")[0] for r in ref.split() if r.strip().endswith(",~"))[:limit]
        out = []
        for name in names:
            for ext in (".hea", ".mat"):
                (Path(tmp) / f"{name}{ext}").write_bytes(z.read(f"training2017/{name}{ext}"))
            rec = wfdb.rdrecord(str(Path(tmp) / name))
            out.append((name, rec.p_signal[:, 0].astype(np.float64), float(rec.fs)))
    return out


def build_noise_bank(mirror: Path = DEFAULT_MIRROR, fs: float = FS, max_ecg_index: float = 1.5,
                     limit: int | None = None) -> tuple[np.ndarray, dict]:
    """The noise bank (float32, mV, at ``fs``) and its provenance (see the module docstring).

    ``limit`` takes only the first ``limit`` ``~`` recordings (tests)."""
    from fractions import Fraction

    from scipy import signal

    t0 = time.perf_counter()
    pieces, info = [], []
    sos = None
    for name, x, fs_in in _noisy_recordings(mirror, limit):
        ratio = Fraction(fs / fs_in).limit_denominator(1000)
        x = signal.resample_poly(x, ratio.numerator, ratio.denominator)[int(fs):]
        if x.size < 4 * fs:
            info.append({"name": name, "seconds": round(x.size / fs, 2), "kept": False, "why": "too short"})
            continue
        sos = sos if sos is not None else signal.butter(2, 0.5, "highpass", fs=fs, output="sos")
        x = signal.sosfiltfilt(sos, x)
        before = ecg_index(x, fs)
        y = cancel_ecg(x, fs)
        after = ecg_index(y, fs)
        keep = after <= max_ecg_index
        info.append({"name": name, "seconds": round(y.size / fs, 2), "ecg_index": round(before, 3),
                     "ecg_index_cancelled": round(after, 3), "kept": bool(keep)})
        if keep:
            pieces.append(y * signal.windows.tukey(y.size, 2 * 0.25 * fs / y.size))
    if not pieces:
        raise RuntimeError("no noise recording passed the ECG index limit")
    bank = np.concatenate(pieces).astype(np.float32)
    kept = [i for i in info if i["kept"]]
    log.info("noise bank: %d of %d '~' recordings kept (%.1f min) in %.0f s", len(kept), len(info),
             bank.size / fs / 60, time.perf_counter() - t0)
    return bank, {
        "source": "challenge-2017/1.0.0/training2017.zip: the training recordings labelled '~' in REFERENCE.csv",
        "steps": ["resample_poly to 360 Hz", "first 1 s dropped", "2nd-order Butterworth high-pass 0.5 Hz, "
                  "zero phase", "own ECG cancelled (median beat at XQRS+GQRS beats, aligned, LS-scaled)",
                  f"kept if ECG index <= {max_ecg_index}", "Tukey-tapered 0.25 s ends, concatenated"],
        "fs": fs, "max_ecg_index": max_ecg_index, "limit": limit, "samples": int(bank.size),
        "minutes": round(bank.size / fs / 60, 2), "n_considered": len(info), "n_kept": len(kept),
        "recordings": info,
    }


# --- the stress records -----------------------------------------------------------------------------------

def _stretch_noise(bank: np.ndarray, offset: int, ranges: list[tuple[int, int]], n: int, fs: float) -> np.ndarray:
    """Noise of one lead over the whole record (0 outside ``ranges``), bank sample ``(offset + t) mod len``,
    faded in and out over ``RAMP_S`` at each end of each stretch (raised cosine)."""
    out = np.zeros(n, dtype=np.float64)
    k = int(round(RAMP_S * fs))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
    for a, b in ranges:
        seg = bank[(offset + np.arange(a, b)) % bank.size].astype(np.float64)
        m = min(k, seg.size // 2)
        seg[:m] *= ramp[:m]
        seg[seg.size - m:] *= ramp[:m][::-1]
        out[a:b] = seg
    return out


def _signed16(v: int) -> int:
    return int((int(v) + 32768) % 65536 - 32768)


def _write_record(out: Path, name: str, src, d: np.ndarray, comment: str) -> str:
    import wfdb

    fits = int(np.abs(d).max()) <= FMT212_MAX and int(d.min()) > -2048
    fmt = "212" if fits and all(f == "212" for f in src.fmt) else "16"
    n_sig = d.shape[1]
    rec = wfdb.Record(record_name=name, n_sig=n_sig, fs=src.fs, sig_len=d.shape[0], file_name=[f"{name}.dat"] * n_sig,
                      fmt=[fmt] * n_sig, adc_gain=list(src.adc_gain), baseline=list(src.baseline), units=list(src.units),
                      sig_name=list(src.sig_name), adc_res=[int(r) if fmt == "212" else 16 for r in src.adc_res],
                      adc_zero=list(src.adc_zero), block_size=[0] * n_sig, d_signal=d,
                      comments=[*(src.comments or []), comment])
    rec.set_d_features(do_adc=False)
    rec.checksum = [_signed16(c) for c in rec.checksum]  # WFDB headers give the 16-bit checksum signed
    rec.wrsamp(write_dir=str(out))
    return fmt


def _write_annotations(out: Path, name: str, base: Path, n: int, full: bool) -> None:
    import wfdb

    if full:
        shutil.copyfile(f"{base}.atr", out / f"{name}.atr")
        return
    ann = wfdb.rdann(str(base), "atr")
    keep = np.flatnonzero(ann.sample < n)
    aux = [ann.aux_note[i] for i in keep] if ann.aux_note else None
    wfdb.wrann(name, "atr", ann.sample[keep], symbol=[ann.symbol[i] for i in keep], subtype=ann.subtype[keep],
               chan=ann.chan[keep], num=ann.num[keep], aux_note=aux, fs=ann.fs, write_dir=str(out))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_stress_set(out: Path | str, records=DS2, snrs=SNRS, seed: int = 0, *, mirror: Path = DEFAULT_MIRROR,
                     duration_s: float | None = None, protocol: Protocol = Protocol(), noise_bank: np.ndarray | None = None,
                     noise_limit: int | None = None, max_ecg_index: float = 1.5) -> dict:
    """Write the stress records of ``records`` (MIT-BIH names) at ``snrs`` (dB) under ``out``; return the
    manifest (also written to ``out/manifest.json``). Deterministic given ``seed``.

    ``duration_s`` cuts each record to its first seconds (tests); ``noise_bank`` reuses a bank (float32 mV at
    360 Hz, e.g. ``np.load(out / "noise.npy")``) instead of building it; ``noise_limit`` builds it from the
    first ``noise_limit`` ``~`` recordings only (tests).
    """
    import wfdb

    from ecg_pipeline.pipeline import records as rec_io
    from ecg_pipeline.pipeline.databases import get_database

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db_dir = Path(mirror) / "mitdb" / "1.0.0"
    records = [str(r) for r in records]
    snrs = [int(s) for s in snrs]
    if len(set(snrs)) != len(snrs) or len(set(records)) != len(records):
        raise ValueError("records and SNRs must be distinct")
    if noise_bank is None:
        noise_bank, noise_info = build_noise_bank(mirror, FS, max_ecg_index, noise_limit)
    else:
        noise_info = {"source": "given", "samples": int(noise_bank.size), "minutes": round(noise_bank.size / FS / 60, 2)}
    noise_bank = np.asarray(noise_bank, dtype=np.float32)
    np.save(out / "noise.npy", noise_bank)
    noise_info["file"] = "noise.npy"
    leads_pref = get_database("mitdb").leads

    entries, names = [], []
    for source in records:
        base = db_dir / source
        src = wfdb.rdrecord(str(base), physical=False)
        if abs(src.fs - FS) > 1e-6:
            raise ValueError(f"{source}: {src.fs} Hz, the noise bank is at {FS} Hz")
        n = src.sig_len if duration_s is None else min(src.sig_len, int(round(duration_s * src.fs)))
        clean = src.d_signal[:n].astype(np.int64)
        ann = wfdb.rdann(str(base), "atr")
        ranges = protocol.noisy_ranges(n, src.fs)
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        offset0 = int(rng.integers(noise_bank.size))
        lead = rec_io.choose_lead(rec_io.read_header(base, source), leads_pref, "first")
        leads = []
        for k in range(src.n_sig):
            offset = (offset0 + k * (noise_bank.size // 2)) % noise_bank.size
            noise = _stretch_noise(noise_bank, offset, ranges, n, src.fs)
            qrs = qrs_amplitude(clean[:, k], ann.sample, ann.symbol, src.fs)
            rms = noise_amplitude(noise, src.fs, ranges) if ranges else float("nan")
            leads.append({"name": src.sig_name[k], "noise_offset": offset, "qrs_pp_adc": round(qrs, 3),
                          "qrs_pp_mv": round(qrs / src.adc_gain[k], 4), "noise_rms_bank_mv": round(rms, 5),
                          "_noise": noise, "_qrs": qrs, "_rms": rms})
        for snr in snrs:
            name = record_name(source, snr)
            d = clean.copy()
            per_lead = []
            for k, ld in enumerate(leads):
                # a**2 * N_1 = S / 10**(snr/10), in ADC units of this lead
                gain = ld["_qrs"] / np.sqrt(8 * 10 ** (snr / 10)) / ld["_rms"] if ranges else 0.0
                d[:, k] += np.rint(gain * ld["_noise"]).astype(np.int64)
                added = (d[:, k] - clean[:, k]).astype(np.float64)
                achieved = snr_db(ld["_qrs"], noise_amplitude(added, src.fs, ranges)) if ranges else float("inf")
                per_lead.append({**{k2: v for k2, v in ld.items() if not k2.startswith("_")},
                                 "gain_adc_per_mv": round(float(gain), 4), "snr_db_achieved": round(achieved, 3)})
            fmt = _write_record(out, name, src, d, f"stress record: MIT-BIH {source} + Challenge 2017 '~' noise, "
                                                    f"SNR {snr} dB in the noisy stretches (benchmarks/stress.py, seed {seed})")
            _write_annotations(out, name, base, n, n == src.sig_len)
            names.append(name)
            entries.append({"record": name, "source": source, "snr_db": snr, "fs": src.fs, "sig_len": n, "fmt": fmt,
                            "scored_lead": lead.name, "noisy": [list(r) for r in ranges], "leads": per_lead})
            log.info("%s: SNR %s dB (achieved %s), format %s", name, snr,
                     "/".join(f"{p['snr_db_achieved']:.2f}" for p in per_lead), fmt)
    (out / "RECORDS").write_text("".join(f"{r}\n" for r in names))
    manifest = {
        "format": FORMAT, "created_by": "benchmarks/stress.py", "seed": seed, "snrs_db": snrs, "sources": records,
        "fs": FS, "duration_s": duration_s, "protocol": asdict(protocol),
        "snr_definition": "nst: SNR = 10 log10(S/N); S = A^2/8, A = trimmed mean (5% each end) peak-to-peak of the "
                          "clean lead over t-50..t+50 ms at the first 300 map1-NORMAL reference beats; N = trimmed "
                          "mean (5% each end) of the 1-s-chunk RMS (about each chunk's mean) of the noise added, "
                          "over all noisy stretches of that lead",
        "noise": noise_info, "records": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "SHA256SUMS.txt")
    (out / "SHA256SUMS.txt").write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))
    return manifest


def load_manifest(folder: Path | str) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def _records_arg(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for part in v.replace(",", " ").split():
            out += list({"DS1": DS1, "DS2": DS2}.get(part.upper(), (part,)))
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write the stress records to")
    p.add_argument("--records", nargs="+", default=["DS2"],
                   help="MIT-BIH records, or DS1 / DS2 for de Chazal's halves (default: DS2)")
    p.add_argument("--snrs", nargs="+", type=int, default=list(SNRS), help="SNRs in dB (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="PhysioNet mirror root (default: %(default)s)")
    p.add_argument("--duration-s", type=float, help="cut each record to its first seconds (default: whole records)")
    p.add_argument("--noise-limit", type=int, help="build the noise bank from the first N '~' recordings only")
    p.add_argument("--noise-bank", type=Path, help="reuse a noise.npy instead of building the bank")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not (args.mirror / "mitdb" / "1.0.0" / "RECORDS").is_file():
        sys.exit(f"no MIT-BIH mirror at {args.mirror / 'mitdb' / '1.0.0'}")
    t0 = time.perf_counter()
    bank = np.load(args.noise_bank) if args.noise_bank else None
    m = build_stress_set(args.out, _records_arg(args.records), args.snrs, args.seed, mirror=args.mirror,
                         duration_s=args.duration_s, noise_bank=bank, noise_limit=args.noise_limit)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"\nstress set: {len(m['records'])} records ({len(m['sources'])} sources x {len(m['snrs_db'])} SNRs) in "
          f"{args.out}, {size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s; noise bank "
          f"{m['noise']['minutes']} min")
    print(f"{'SNR dB':>7} {'records':>8} {'achieved dB (min..max over leads)':>36} {'format 16':>10}")
    for snr in m["snrs_db"]:
        rows = [r for r in m["records"] if r["snr_db"] == snr]
        ach = [ld["snr_db_achieved"] for r in rows for ld in r["leads"]]
        print(f"{snr:>7} {len(rows):>8} {min(ach):>17.2f} .. {max(ach):<16.2f} "
              f"{sum(r['fmt'] == '16' for r in rows):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
