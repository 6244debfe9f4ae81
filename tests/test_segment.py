import numpy as np
import pytest

from ecg_pipeline.pipeline.segment import WindowSpec, extract_windows, finite_windows, in_bounds


def test_window_spec_from_seconds():
    w = WindowSpec.from_seconds(0.25, 0.45, 360)
    assert (w.n_before, w.n_after, w.length) == (90, 162, 252)


def test_extract_windows_matches_slicing():
    sig = np.arange(1000, dtype=np.float32)
    w = WindowSpec(3, 5)
    out = extract_windows(sig, np.array([10, 500, 994]), w)
    assert out.shape == (3, 8)
    for row, s in zip(out, [10, 500, 994]):
        np.testing.assert_array_equal(row, sig[s - 3 : s + 5])
        assert row[w.n_before] == s  # the R peak sits at index n_before


def test_extract_windows_with_offset_and_out_of_range():
    sig = np.arange(100, 200, dtype=np.float32)  # record samples 100..199
    w = WindowSpec(2, 2)
    np.testing.assert_array_equal(extract_windows(sig, np.array([150]), w, offset=100)[0], [148, 149, 150, 151])
    with pytest.raises(IndexError):
        extract_windows(sig, np.array([101]), w, offset=100)


def test_in_bounds_drops_edge_beats():
    w = WindowSpec(10, 20)
    mask = in_bounds(np.array([5, 10, 50, 80, 81]), 100, w)
    assert mask.tolist() == [False, True, True, True, False]


def test_finite_windows_flags_nan():
    sig = np.zeros(100, dtype=np.float32)
    sig[40] = np.nan
    w = WindowSpec(5, 5)
    assert finite_windows(sig, np.array([20, 38, 45, 46, 60]), w).tolist() == [True, False, False, True, True]
