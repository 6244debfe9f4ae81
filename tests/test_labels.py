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
