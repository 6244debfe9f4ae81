"""Stage 9: classification metrics, the text report and the plots of a run.

``classification_metrics`` is the single source of the numbers: ``metrics.json``,
the text report and the plots are all made from its output. Definitions follow
scikit-learn's: precision = TP / (TP + FP), recall (sensitivity) = TP / (TP + FN),
F1 their harmonic mean, 0 where a denominator is 0; the macro average is over
the classes with support (beats in the reference) so that a class absent from a
test set (Q in DS2 has 7 beats; a custom split may have none) does not count as 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: row = reference class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"class indices must lie in [0, {n_classes})")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1, support; accuracy; macro and weighted F1."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted.astype(float))
    recall = _ratio(tp, support.astype(float))
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0
    total = int(support.sum())
    # ANSI/AAMI EC57's names for the same counts: sensitivity Se = recall, positive predictivity +P = precision,
    # and the false-positive rate FPR = FP / (FP + TN), the share of the other classes' beats called this class.
    fp = predicted - tp
    negatives = total - support
    fpr = _ratio(fp, negatives.astype(float))
    return {
        "classes": list(classes),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i]), "sensitivity": float(recall[i]),
                          "positive_predictivity": float(precision[i]), "false_positive_rate": float(fpr[i])}
                      for i, c in enumerate(classes)},
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / total) if total else 0.0,
        "macro_over": [c for c, p in zip(classes, present) if p],
        "support": total,
        "confusion_matrix": cm.tolist(),
    }


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                           challenge_classes: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of predicted class indices against reference class indices.

    With ``challenge_classes`` (Challenge 2017: N, A, O), ``challenge_f1`` is the mean of
    their F1: the challenge's score, which leaves the noisy class out.
    """
    m = metrics_from_confusion(confusion_matrix(y_true, y_pred, len(classes)), classes)
    if challenge_classes:
        m["challenge_classes"] = list(challenge_classes)
        m["challenge_f1"] = float(np.mean([m["per_class"][c]["f1"] for c in challenge_classes]))
    return m


def aggregate_by_record(prob: np.ndarray, y: np.ndarray, record: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-record predictions from per-window ones: the mean of each record's window probabilities.

    Parameters
    ----------
    prob
        ``(n_windows, n_classes)`` probabilities.
    y
        Reference class index of each window (a record's windows share its label).
    record
        Record name of each window.

    Returns
    -------
    names, mean_prob, y_record
        Records in order of first appearance, ``(n_records, n_classes)``, their class index.
    """
    names, first, inverse = np.unique(np.asarray(record).astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first)  # records in the order the windows came
    sums = np.zeros((len(names), prob.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, prob)
    counts = np.bincount(inverse, minlength=len(names))[:, None]
    mean = (sums / np.maximum(counts, 1)).astype(np.float32)
    return names[order], mean[order], np.asarray(y)[first][order]


def format_report(metrics: Mapping[str, Any], title: str = "") -> str:
    """A text table in the layout of scikit-learn's ``classification_report``."""
    lines = [title] if title else []
    lines.append(f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
    for c, m in metrics["per_class"].items():
        lines.append(f"{c:>12} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>9d}")
    lines.append("")
    lines.append(f"{'accuracy':>12} {'':>9} {'':>9} {metrics['accuracy']:>9.4f} {metrics['support']:>9d}")
    lines.append(f"{'macro avg':>12} {metrics['macro_precision']:>9.4f} {metrics['macro_recall']:>9.4f} "
                 f"{metrics['macro_f1']:>9.4f} {metrics['support']:>9d}")
    lines.append(f"{'weighted f1':>12} {'':>9} {'':>9} {metrics['weighted_f1']:>9.4f} {metrics['support']:>9d}")
    if len(metrics["macro_over"]) < len(metrics["classes"]):
        lines.append(f"(macro average over the classes with support: {', '.join(metrics['macro_over'])})")
    if "challenge_f1" in metrics:
        lines.append(f"{'challenge F1':>12} {'':>9} {'':>9} {metrics['challenge_f1']:>9.4f}   "
                     f"(mean F1 of {', '.join(metrics['challenge_classes'])})")
    if metrics.get("unit") == "record":
        lines.append(f"(per recording: {metrics.get('aggregation', 'windows aggregated per recording')})")
    if all("false_positive_rate" in m for m in metrics["per_class"].values()):
        lines += ["", "ANSI/AAMI EC57 (Se sensitivity, +P positive predictivity, FPR false-positive rate)",
                  f"{'':>12} {'Se':>9} {'+P':>9} {'FPR':>9} {'F1':>9}"]
        lines += [f"{c:>12} {m['sensitivity']:>9.4f} {m['positive_predictivity']:>9.4f} "
                  f"{m['false_positive_rate']:>9.4f} {m['f1']:>9.4f}" for c, m in metrics["per_class"].items()]
    if "flops_per_segment" in metrics:
        lines += ["", f"model cost: {metrics['flops_per_segment'] / 1e6:.2f} MFLOP per segment (conv and dense layers)"]
    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    lines += ["", "confusion matrix (rows: reference, columns: predicted)",
              f"{'':>12} " + " ".join(f"{c:>8}" for c in classes)]
    lines += [f"{c:>12} " + " ".join(f"{v:>8d}" for v in row) for c, row in zip(classes, cm)]
    return "\n".join(lines) + "\n"


def plot_confusion(metrics: Mapping[str, Any], path: str | Path, *, normalize: bool, title: str = "") -> Path:
    """Save ``plots.confusion_figure`` to ``path``."""
    from .plots import confusion_figure

    confusion_figure(metrics, normalize=normalize, title=title).savefig(path)
    return Path(path)


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Save ``plots.history_figure`` to ``path``."""
    from .plots import history_figure

    history_figure(history).savefig(path)
    return Path(path)


def write_evaluation(out_dir: str | Path, metrics: Mapping[str, Any], *, prefix: str = "", title: str = "") -> dict[str, Path]:
    """Write ``metrics.json``, ``classification_report.txt`` and both confusion plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out / f"{prefix}metrics.json",
        "report": out / f"{prefix}classification_report.txt",
        "confusion_counts": out / f"{prefix}confusion_counts.png",
        "confusion_ratios": out / f"{prefix}confusion_ratios.png",
    }
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    paths["report"].write_text(format_report(metrics, title), encoding="utf-8")
    plot_confusion(metrics, paths["confusion_counts"], normalize=False, title=f"{title} (counts)" if title else "")
    plot_confusion(metrics, paths["confusion_ratios"], normalize=True, title=f"{title} (row ratios)" if title else "")
    return paths


def episode_agreement(reference: Sequence[tuple[float, float]], predicted: Sequence[tuple[float, float]]
                      ) -> dict[str, Any]:
    """Episode sensitivity and positive predictivity of one rhythm (e.g. AF), by overlap.

    A reference episode ``(start_s, end_s)`` is detected when a predicted one overlaps it;
    a predicted episode is true when it overlaps a reference one (the episode counts of
    ANSI/AAMI EC57's AF statistics, with any overlap as the match).
    """
    def overlaps(a, b):
        return a[0] < b[1] and b[0] < a[1]

    detected = sum(any(overlaps(r, p) for p in predicted) for r in reference)
    true = sum(any(overlaps(p, r) for r in reference) for p in predicted)
    return {"n_reference": len(reference), "n_predicted": len(predicted), "detected": detected, "true": true,
            "sensitivity": detected / len(reference) if reference else float("nan"),
            "positive_predictivity": true / len(predicted) if predicted else float("nan")}
