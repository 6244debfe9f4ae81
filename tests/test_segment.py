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


# --- rhythm windows: every sample of a recording is in a window, short ones are padded -----------------


@pytest.mark.parametrize("sig_len, length, hop, expected", [
    (9000, 9000, 9000, [0]),  # exactly one window
    (9001, 9000, 9000, [0, 1]),  # one sample more: a second window ends with the record
    (18300, 9000, 9000, [0, 9000, 9300]),  # 61 s in 30 s windows: the last ends at the end
    (18300, 9000, 4500, [0, 4500, 9000, 9300]),
    (2715, 9000, 9000, [0]),  # shorter than a window: one, padded
    (0, 9000, 9000, []),
])
def test_cover_windows_leave_no_sample_out(sig_len, length, hop, expected):
    from ecg_pipeline.pipeline.segment import cover_windows

    start = cover_windows(sig_len, length, hop)
    assert start.tolist() == expected
    covered = np.zeros(sig_len, bool)
    for s in start:
        covered[s:s + length] = True
    assert covered.all()
    assert all(s + length <= sig_len for s in start) or (len(start) == 1 and sig_len < length)


def test_a_short_recording_is_padded_by_repeating_itself():
    from ecg_pipeline.pipeline.segment import check_windows

    x = np.arange(7, dtype=np.float32)
    pad = WindowSpec(0, 10, "wrap")
    assert extract_windows(x, np.array([0]), pad).tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    # The same record without padding has no usable window; with it, one that starts inside the record.
    assert check_windows(x, np.array([0]), WindowSpec(0, 10)).keep.tolist() == [False]
    assert check_windows(x, np.array([0, 7]), pad).keep.tolist() == [True, False]
    # A NaN in the real part makes the padded window invalid; past the record there is nothing to check.
    y = x.copy()
    y[3] = np.nan
    c = check_windows(y, np.array([0]), pad)
    assert c.keep.tolist() == [False] and c.n_invalid == 1
    with pytest.raises(IndexError):
        extract_windows(x, np.array([0]), WindowSpec(0, 10))
