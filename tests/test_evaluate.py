"""Metrics against a confusion matrix worked out by hand, the report layout and the plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ecg_pipeline.pipeline.evaluate import classification_metrics, confusion_matrix, format_report, plot_history, write_evaluation

CLASSES = ("N", "S", "V", "F", "Q")
#            N  N  N  N  S  S  S  V  V  V  V  F
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 2, 2, 2, 3, 2]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(np.array(Y_TRUE), np.array(Y_PRED), 5)
    assert cm.tolist() == [
        [3, 1, 0, 0, 0],  # N: 3 right, 1 called S
        [1, 2, 0, 0, 0],  # S: 2 right, 1 called N
        [0, 0, 3, 1, 0],  # V: 3 right, 1 called F
        [0, 0, 1, 0, 0],  # F: called V
        [0, 0, 0, 0, 0],  # Q: none
    ]


def test_metrics_by_hand():
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), CLASSES)
    pc = m["per_class"]
    # N: precision 3/4, recall 3/4; S: precision 2/3, recall 2/3; V: 3/4, 3/4; F: 0/1, 0/1.
    assert pc["N"]["precision"] == pytest.approx(0.75) and pc["N"]["recall"] == pytest.approx(0.75)
    assert pc["S"]["f1"] == pytest.approx(2 / 3)
    assert pc["V"]["f1"] == pytest.approx(0.75)
    assert pc["F"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "sensitivity": 0.0,
                       "positive_predictivity": 0.0, "false_positive_rate": pytest.approx(1 / 11)}
    # EC57's names: Se = recall, +P = precision; FPR = FP / (FP + TN) over the beats of the other classes.
    assert pc["N"]["sensitivity"] == pc["N"]["recall"] and pc["N"]["positive_predictivity"] == pc["N"]["precision"]
    assert pc["N"]["false_positive_rate"] == pytest.approx(1 / 8)
    ec57 = format_report(m).split("ANSI/AAMI EC57")[1].splitlines()
    assert ec57[2].split() == ["N", "0.7500", "0.7500", "0.1250", "0.7500"]
    assert pc["Q"]["support"] == 0
    assert m["accuracy"] == pytest.approx(8 / 12)
    # Q has no support: the macro average is over N, S, V, F only.
    assert m["macro_over"] == ["N", "S", "V", "F"]
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 0.75 + 0) / 4)
    assert m["weighted_f1"] == pytest.approx((4 * 0.75 + 3 * 2 / 3 + 4 * 0.75 + 0) / 12)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 5)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 5)


def test_report_and_files(tmp_path):
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), CLASSES)
    text = format_report(m)
    assert "precision" in text and "macro avg" in text
    n_line = next(line for line in text.splitlines() if line.strip().startswith("N "))
    assert n_line.split()[1:] == ["0.7500", "0.7500", "0.7500", "4"]
    paths = write_evaluation(tmp_path, m, title="hand-made")
    assert json.loads(paths["metrics"].read_text())["confusion_matrix"][2] == [0, 0, 3, 1, 0]
    for key in ("confusion_counts", "confusion_ratios"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = plot_history({"loss": [1.0, 0.5], "accuracy": [0.5, 0.8], "val_macro_f1": [0.3, 0.6]}, tmp_path / "c.png")
    assert curve.stat().st_size > 1000


def test_challenge_f1_is_the_mean_f1_of_n_a_o_by_hand():
    """Challenge 2017 scoring: F1 of N, A and O averaged; the noisy class is not in the mean."""
    classes = ["N", "A", "O", "~"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([0, 0, 0, 2, 1, 0, 2, 2, 3, 3])
    m = classification_metrics(y_true, y_pred, classes, challenge_classes=["N", "A", "O"])
    # N: TP 3, FP 1 (an A), FN 1 -> F1 2*3/(2*3+1+1) = 0.75; A: TP 1, FP 0, FN 1 -> 2/3;
    # O: TP 2, FP 1 (an N), FN 1 -> 4/6 = 2/3. Mean: (0.75 + 2/3 + 2/3) / 3.
    assert m["per_class"]["N"]["f1"] == pytest.approx(0.75)
    assert m["per_class"]["A"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["O"]["f1"] == pytest.approx(2 / 3)
    assert m["challenge_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m["challenge_f1"] != pytest.approx(m["macro_f1"])  # ~ (F1 2/3 here) is left out
    assert "challenge F1" in format_report(m)
    assert "challenge_f1" not in classification_metrics(y_true, y_pred, classes)


def test_window_probabilities_are_averaged_per_record_in_order():
    from ecg_pipeline.pipeline.evaluate import aggregate_by_record

    prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]], np.float32)
    names, mean, y = aggregate_by_record(prob, np.array([1, 0, 0, 1]), np.array(["b", "a", "a", "b"], object))
    assert names.tolist() == ["b", "a"] and y.tolist() == [1, 0]
    np.testing.assert_allclose(mean, [[0.5, 0.5], [0.4, 0.6]], rtol=1e-6)
