import numpy as np
import pytest

from ecg_pipeline.pipeline.labels import AAMI_EC57, label_beats


def test_aami_ec57_groups_match_the_standard():
    groups = {}
    for sym, cls in AAMI_EC57.items():
        groups.setdefault(cls, set()).add(sym)
    assert groups == {"N": set("NLRej"), "S": set("AaJS"), "V": set("VE"), "F": {"F"}, "Q": set("/fQ")}


def test_non_beats_are_skipped_and_counted():
    out = label_beats([10, 20, 30, 40, 50], ["+", "N", "~", "V", "|"])
    assert out.sample.tolist() == [20, 40]
    assert out.label.tolist() == ["N", "V"]
    assert out.symbol.tolist() == ["N", "V"]
    assert out.n_nonbeat == 3 and out.n_unknown == 0


@pytest.mark.parametrize("policy, kept", [("Q", [1, 2, 3]), ("drop", [1, 3])])
def test_unknown_symbols_follow_the_policy(policy, kept):
    out = label_beats([1, 2, 3], ["N", "Z", "A"], unknown=policy)
    assert out.sample.tolist() == kept
    assert out.n_unknown == 1 and out.unknown_symbols == ("Z",)
    if policy == "Q":
        assert out.label.tolist() == ["N", "Q", "S"] and out.symbol.tolist() == ["N", "Z", "A"]


def test_unknown_symbols_can_fail():
    with pytest.raises(ValueError, match="unknown annotation symbols.*'B'"):
        label_beats([1, 2], ["N", "B"], unknown="fail")


def test_empty_annotations():
    out = label_beats(np.zeros(0, np.int64), np.zeros(0, object))
    assert out.sample.size == 0 and out.n_nonbeat == 0


def _rec(name, seconds, fs=300.0):
    from ecg_pipeline.pipeline.labels import RecordInput

    return RecordInput(name, None, fs, int(seconds * fs))  # a label table reads no file


def test_a_label_table_gives_each_window_its_recordings_label():
    from ecg_pipeline.pipeline.errors import RecordError
    from ecg_pipeline.pipeline.labels import RecordLabelTable, orphan_labels

    t = RecordLabelTable(classes_=("N", "A", "O", "~"), window_s=30, hop_s=30, min_s=5).load(
        "A1,N\nA2,A\nA3,X\nA4,O\nA5,~\n")
    long = t.segments(_rec("sub/A2", 61))
    assert long.anchor.tolist() == [0, 9000, 9300] and set(long.label) == {"A"}
    short = t.segments(_rec("A1", 9.05))
    assert short.anchor.tolist() == [0] and short.label.tolist() == ["N"]  # padded, never relabelled
    with pytest.raises(RecordError, match="unknown label 'X'"):
        t.segments(_rec("A3", 30))
    with pytest.raises(RecordError, match="no label in REFERENCE.csv"):
        t.segments(_rec("A9", 30))
    with pytest.raises(RecordError, match=r"4.00 s long, shorter than the 5 s a recording needs"):
        t.segments(_rec("A4", 4))
    assert orphan_labels(t, ["A1", "A2", "A3", "A9"]) == {
        "A4": "labels: REFERENCE.csv labels A4 (O), but the source has no such recording",
        "A5": "labels: REFERENCE.csv labels A5 (~), but the source has no such recording"}
    with pytest.raises(ValueError, match="A1 is labelled twice"):
        t.load("A1,N\nA1,A\n")


def test_symbols_that_are_no_text_are_ignored_and_counted():
    beats = label_beats(np.array([10, 20, 30, 40]), np.array(["N", float("nan"), None, "V"], dtype=object))
    assert beats.sample.tolist() == [10, 40] and beats.label.tolist() == ["N", "V"]
    assert (beats.n_not_text, beats.n_unknown) == (2, 0)  # not class Q
