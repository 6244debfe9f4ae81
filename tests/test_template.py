"""The neighbour template (pipeline.template): hand-made sequences, pieces against whole records, and the
same templates from a real store's annotated beats as from scoring's detected beats."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_pipeline.pipeline.template import TemplateSpec, neighbour_indices, neighbour_template, with_context


def test_each_segment_takes_its_neighbours_never_itself_and_slides_inward_at_the_ends():
    idx = neighbour_indices(10, 2)
    assert idx.shape == (10, 4)
    assert idx[5].tolist() == [3, 4, 6, 7]  # two on each side
    assert idx[0].tolist() == [1, 2, 3, 4] and idx[9].tolist() == [5, 6, 7, 8]  # the window slides at the ends
    assert all(i not in row for i, row in enumerate(idx))
    small = neighbour_indices(3, 2)  # fewer than 2 x beats others: all of them, repeated
    assert [sorted(set(r)) for r in small.tolist()] == [[1, 2], [0, 2], [0, 1]]
    assert neighbour_indices(1, 2).tolist() == [[0, 0, 0, 0]] and neighbour_indices(0, 2).shape == (0, 4)


def test_an_odd_beat_does_not_move_its_neighbours_templates_and_stands_out_against_its_own():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(8, 24)).astype(np.float32)
    odd = normal + 3.0  # a ventricular beat: unlike the patient's others
    x = np.repeat(normal[None], 30, axis=0) + rng.normal(scale=0.01, size=(30, 8, 24)).astype(np.float32)
    x[15] = odd
    t = neighbour_template(x, 8)
    assert t.shape == x.shape and t.dtype == np.float32
    assert np.abs(t - normal).max() < 0.05  # the median ignores one odd neighbour
    assert np.abs((x - t)[15]).mean() > 2.9 and np.abs((x - t)[14]).mean() < 0.05
    # A couplet and a bigeminy-free run: two odd neighbours of 16 still leave the template normal.
    x[16] = odd
    assert np.abs(neighbour_template(x, 8)[20] - normal).max() < 0.05
    assert np.array_equal(neighbour_template(x[:1], 8), x[:1])  # a lone segment is its own template


@pytest.mark.parametrize("n,beats", [(500, 8), (40, 3), (9, 8), (2, 1), (100, 5)])
def test_the_sorting_network_gives_numpys_median_exactly(n, beats):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 8, 24)).astype(np.float32)
    x[: n // 2] = np.round(x[: n // 2])  # ties as well
    want = np.median(x[neighbour_indices(n, beats)], axis=1)
    assert np.array_equal(neighbour_template(x, beats), want)


@pytest.mark.parametrize("beats", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 18, 19, 25, 40, 299, 600])
def test_templates_are_numpys_median_of_the_neighbours_bit_for_bit(n, beats):
    """Centred segments done in pairs (blocks of them, an odd one left over), the ends, and records too short
    for a centred window: each template is ``np.median`` over its neighbours to the last bit, ties included
    (no -0.0: which of two equal zeros a median takes is arbitrary), and the input is left as it was."""
    rng = np.random.default_rng(100 * n + beats)
    x = rng.normal(size=(n, 8, 24)).astype(np.float32)
    x[::2] = np.round(x[::2] * 2) / 2 + np.float32(0.0)  # ties; adding +0.0 turns -0.0 into +0.0
    before = x.copy()
    want = np.median(x[neighbour_indices(n, beats)], axis=1)
    got = neighbour_template(x, beats)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(x, before) and np.array_equal(neighbour_template(x, 0), x)


@pytest.mark.parametrize("lo,hi", [(0, 7), (20, 40), (90, 100), (3, 97)])
def test_a_piece_with_its_context_gives_the_whole_records_templates(lo, hi):
    x = np.random.default_rng(1).normal(size=(100, 8, 24)).astype(np.float32)
    whole = neighbour_template(x, 8)
    a, b = with_context(100, lo, hi, 8)
    assert np.array_equal(neighbour_template(x[a:b], 8)[lo - a:hi - a], whole[lo:hi])


def test_the_spec_round_trips_through_attributes():
    spec = TemplateSpec(5)
    assert TemplateSpec.from_attrs(spec.attrs()) == spec
    with pytest.raises(ValueError, match="statistic"):
        TemplateSpec.from_attrs({**spec.attrs(), "statistic": "mean"})


@pytest.mark.realdata
def test_the_store_holds_each_beats_template_over_its_record_split_over_chunks(small_store):
    from ecg_pipeline.pipeline import store

    ds = store.open_dataset(str(small_store))
    assert ds.attrs["schema_version"] == store.store_schema()["schema_version"] and ds["template"].dims == ("segment", "freq", "time")
    assert TemplateSpec.from_attrs(ds.attrs["template"]) == TemplateSpec()
    spec = ds["spectrogram"].values.astype(np.float32)
    tmpl = ds["template"].values.astype(np.float32)
    assert np.isfinite(tmpl).all()
    chunk = int(ds.attrs["chunk_size"])
    for i, record in enumerate(ds["record_id"].values):
        off, n = int(ds["record_offset"].values[i]), int(ds["record_n_segments"].values[i])
        assert n > chunk  # each record spans chunks, written by different tasks
        want = neighbour_template(spec[off:off + n], TemplateSpec().beats)
        # The store computed them from float32 spectrograms and keeps float16 (3 decimal digits).
        assert np.abs(want - tmpl[off:off + n]).max() < 0.02, record
    lab = np.asarray(ds["label"].values).astype(str)
    unlike = np.abs(spec - tmpl).mean(axis=(1, 2))
    assert np.median(unlike[lab == "V"]) > 2 * np.median(unlike[lab == "N"])  # V beats stand out, N beats do not


@pytest.mark.realdata
def test_detected_beats_of_a_piece_get_the_templates_of_the_whole_record(mirror):
    """Scoring makes templates from detected beats, pieces of a long record with their margins: a piece's
    templates equal those of the record scored whole."""
    import wfdb

    from ecg_pipeline.pipeline.config import DetectorSpec
    from ecg_pipeline.pipeline.extract import detected_segments
    from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec

    sig = wfdb.rdrecord(str(mirror / "mitdb" / "1.0.0" / "208"), channels=[0]).p_signal[:, 0].astype(np.float32)
    spec = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64, max_freq_hz=40.0)
    ts = TemplateSpec()
    whole = detected_segments(sig, 360.0, 0, 0, len(sig), spec, DetectorSpec(), template_spec=ts)
    start, stop, margin = 300 * 360, 600 * 360, 60 * 360
    piece = detected_segments(sig[start - margin:stop + margin], 360.0, start - margin, start, stop, spec,
                              DetectorSpec(), template_spec=ts)
    assert len(piece.anchor) > 300 and piece.template.shape == piece.spectrogram.shape
    at = np.searchsorted(whole.anchor, piece.anchor)
    assert np.array_equal(whole.anchor[at], piece.anchor)
    assert np.allclose(piece.template, whole.template[at], atol=1e-5)
    # The STFT's float32 products round by batch (BLAS blocks differ with the number of windows), and the log
    # magnifies that where a bin's magnitude is small (1.4e-4 at -6.5 measured): equal to that, not to 1e-5.
    assert np.allclose(piece.spectrogram, whole.spectrogram[at], atol=1e-3)


def test_a_template_model_whose_metadata_omits_how_templates_are_made_is_refused(tmp_path):
    pytest.importorskip("tensorflow")
    from ecg_pipeline.pipeline.model_card import ModelCard
    from ecg_pipeline.pipeline.models import ModelError, build_model, save_model
    from ecg_pipeline.pipeline.rr import STORED_FEATURES, RRSpec
    from ecg_pipeline.pipeline.spectrogram import SpectrogramSpec

    spec = SpectrogramSpec(fs=360.0, n_before=90, n_after=162, nperseg=64, hop=8, nfft=64, max_freq_hz=40.0)
    n = len(STORED_FEATURES)
    model = build_model("beat-template-cnn", (spec.n_freq, spec.n_time), 5, options={"width": 4, "dense": 8},
                        rr_stats={"n": n, "mean": [0.0] * n, "variance": [1.0] * n})
    inp = {"shape": [spec.n_freq, spec.n_time], "dtype": "float16", "variable": "spectrogram",
           "variables": ["spectrogram", "rr", "template"], "rr": RRSpec().attrs(), "template": TemplateSpec().attrs()}
    meta = {"task": "beat", "classes": list("NSVFQ"), "input": inp, "store": {"spectrogram": spec.attrs()}}
    ok = save_model(model, tmp_path / "ok.keras", meta)
    assert ModelCard.read(ok).template_spec == TemplateSpec() and ModelCard.read(ok).rr_spec == RRSpec()
    bad = save_model(model, tmp_path / "bad.keras", {**meta, "input": {k: v for k, v in inp.items() if k != "template"}})
    with pytest.raises(ModelError, match="takes neighbour templates but its metadata does not say how they are made"):
        ModelCard.read(bad)
    bad_rr = save_model(model, tmp_path / "bad-rr.keras", {**meta, "input": {k: v for k, v in inp.items() if k != "rr"}})
    with pytest.raises(ModelError, match="takes RR features but its metadata does not say how they are computed"):
        ModelCard.read(bad_rr)
