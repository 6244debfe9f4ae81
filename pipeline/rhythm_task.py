"""The rhythm task: fixed windows over a recording (the Challenge 2017 classes N, A, O, ~).

Scoring a piece (``RhythmTask.score_piece``): the windows starting in it, on the grid preprocess
uses (``segment.window_grid``), are read, transformed as the model's store was and scored; a
recording's class is the mean of its windows' probabilities. References: a label table's class of
the recording (``--labels``, or a ``REFERENCE.csv`` beside the records) and, where the record has
WFDB rhythm notes, each window's majority rhythm (``labels.RhythmAnnotations``). The store's metrics
are evaluate's per-recording figures against the table, and against the rhythm notes the AF burden
per record and the episodes' sensitivity and positive predictivity.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from . import extract, records, scores, segment
from .errors import RecordError
from .evaluate import classification_metrics, episode_agreement, format_report
from .labels import RecordInput, RhythmAnnotations
from .tasks import Task, register_task


#: A rhythm model's class -> the rhythm note WFDB annotation files use for it (without the "(").
WFDB_RHYTHM: Mapping[str, str] = MappingProxyType({"A": "AFIB", "N": "N", "O": "O"})


@dataclass(frozen=True)
class RhythmTask(Task):
    """Fixed windows over a recording; a recording's class is the mean of its windows' probabilities."""

    name: ClassVar[str] = "rhythm"
    unit: ClassVar[str] = "windows"
    anchor_kind: ClassVar[str] = "window-start"
    default_split: ClassVar[str] = "stratified"
    writes_predictions: ClassVar[bool] = True
    reads_label_table: ClassVar[bool] = True
    record_prediction: ClassVar[bool] = True
    trace_sizes: ClassVar[tuple[int, ...]] = (16, 15)  # rhythm windows are ~100x larger than beats
    unreadable_class: ClassVar[str | None] = "~"  # the Challenge 2017 noise class

    def evaluation_units(self, prob, y, names, segment_record, aggregation=""):
        from .evaluate import aggregate_by_record

        names, prob, y = aggregate_by_record(prob, y, segment_record)
        return names, prob, y, {"unit": "record", "n_windows": int(len(segment_record)),
                                "aggregation": aggregation or "mean of the window probabilities per record"}

    def min_seconds(self, card) -> float:
        return card.min_s

    def check_record(self, card, header) -> None:
        if header.sig_len <= 0:
            raise RecordError(header.record, "signal", "the record holds no samples")
        if header.sig_len < card.min_s * header.fs:
            raise RecordError(header.record, "signal", f"{header.sig_len / header.fs:.2f} s long, shorter than the "
                                                       f"{card.min_s:g} s the model's recordings had at least")

    def quality_windows(self, card, config, anchor, fs, n):
        """A window is judged on itself."""
        a = np.asarray(anchor, np.int64)
        return np.clip(a, 0, n), np.clip(a + int(round(card.window_s * fs)), 0, n)

    def default_annotator(self, card) -> str:
        return "atr"  # the WFDB reference annotations, whose rhythm notes are compared with the windows

    @staticmethod
    def hop_s(card, config) -> float:
        return config.rhythm_hop_s or card.hop_s

    def scores_attrs(self, card, config) -> dict[str, Any]:
        return {"anchor_kind": self.anchor_kind, "window_s": card.window_s, "hop_s": self.hop_s(card, config),
                "detector": {}}

    def score_piece(self, ctx, base, plan, start: int, stop: int, predict: Callable[[Any], np.ndarray],
                    result: scores.RecordScores, timer) -> None:
        card, header = ctx.card, plan.header
        hop_s = self.hop_s(card, ctx.config)
        grid = segment.window_grid(header.sig_len, header.fs, card.window_s, hop_s)
        anchor = grid[(grid >= start) & (grid < stop)]  # windows are shared out by their start: none is in two pieces
        n_win = int(round(card.window_s * header.fs))
        result.probability = np.zeros((0, len(card.classes)), np.float32)  # a piece may own no window start
        if len(anchor):
            first, last = int(anchor[0]), min(int(anchor[-1]) + n_win, header.sig_len)
            with timer("read"):
                x = records.read_signal(base, header, plan.lead, first, last)
            seg = extract.window_segments(x, header.fs, first, anchor, header.sig_len, card.spec)
            timer.add(seg.seconds)
            with timer("model"):
                result.probability = predict(seg.spectrogram.astype(card.input_dtype))
            result.anchor, result.n_detected, result.n_dropped_invalid = seg.anchor, len(anchor), seg.n_dropped_invalid
            with timer("quality"):
                result.flags = self.judge_segments(card, ctx.config, x, first, seg.anchor, header.fs, plan.mv_per_unit)
        result.reference_class = ctx.labels.get(plan.record.rsplit("/", 1)[-1], "")
        result.reference = np.full(len(result.anchor), result.reference_class, dtype=object)
        if plan.has_reference:
            # Rhythm notes ((AFIB, (N, ...): each window's majority rhythm, as a class, on the same grid.
            notes = RhythmAnnotations(ctx.annotator, card.window_s, hop_s, tuple(card.classes)).segments(
                RecordInput(plan.record, base, header.fs, header.sig_len))
            if np.any(notes.symbol != ""):
                result.reference = notes.label[np.searchsorted(notes.anchor, result.anchor)]
                result.reference_file = ctx.annotator

    def merge(self, parts: Sequence[scores.RecordScores], config) -> scores.RecordScores:
        """One record from its pieces' windows (in order; no window is in two pieces)."""
        base = parts[0]
        return scores.RecordScores(
            base.record, "ok", "", base.checksum, base.lead, base.lead_fallback, base.fs, base.sig_len,
            anchor=np.concatenate([s.anchor for s in parts]), reference_file=base.reference_file,
            probability=np.concatenate([s.probability for s in parts]),
            flags=np.concatenate([s.segment_flags for s in parts]),
            reference=np.concatenate([s.reference for s in parts]), task=base.task,
            reference_class=base.reference_class, quality=base.quality, **scores.merged_counts(parts))

    def store_metrics(self, writer: scores.ScoresWriter, rows: Sequence[Mapping[str, Any]], card, config
                      ) -> dict[str, Any] | None:
        metrics = table_metrics(rows, card.classes, card.challenge_classes)
        annotated = annotation_metrics(writer, rows, card.classes)
        if annotated:
            metrics = {**(metrics or {}), "rhythm_annotations": annotated}
        return metrics

    def side_tables(self, writer: scores.ScoresWriter, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {".episodes.csv": episodes_frame(writer, rows)}

    def report_lines(self, reference: Mapping[str, Any] | None) -> list[str]:
        if not reference:
            return []
        lines = []
        if reference.get("classification"):
            lines.append(format_report(reference["classification"], f"  {reference['records']} records with a "
                                                                    "reference class (label table), per record"))
        ann = reference.get("rhythm_annotations")
        if ann:
            e = ann["episodes"]
            se, pp = e.get("sensitivity"), e.get("positive_predictivity")
            lines.append(f"  rhythm annotations: {len(ann['records'])} records; {ann['rhythm']} episodes: "
                         f"sensitivity {'-' if se is None else f'{100 * se:.1f}%'} ({e.get('detected', 0)}/"
                         f"{e.get('n_reference', 0)}), positive predictivity {'-' if pp is None else f'{100 * pp:.1f}%'}"
                         f" ({e.get('true', 0)}/{e.get('n_predicted', 0)})")
            lines.append(f"    {'record':>10} {'burden model':>13} {'reference':>10}")
            for rec, b in sorted(ann["records"].items()):
                lines.append(f"    {rec:>10} {b['burden_model']:>13.1%} {b['burden_reference']:>10.1%}")
        return lines

    def wfdb_annotations(self, view) -> tuple[np.ndarray, list[str], list[str]]:
        # One rhythm annotation ("+") where each run of windows of one class starts, its class as WFDB's rhythm
        # note: (AFIB for A, (N for N, (O for other rhythms (no WFDB code covers them all); noise is "~".
        sample, symbol, aux = [], [], []
        for start_s, _, c in scores.episodes(view.anchor, view.predicted, view.sig_len, view.fs):
            sample.append(int(round(start_s * view.fs)))
            symbol.append("~" if c == "~" else "+")
            aux.append("" if c == "~" else "(" + WFDB_RHYTHM.get(c, c))
        return np.asarray(sample, np.int64), symbol, aux

    def record_text(self, row: Mapping[str, Any], classes: Sequence[str]) -> str:
        probs = "  ".join(f"{c} {p:.3f}" for c, p in zip(classes, row["probability"]))
        ref = f"   (reference {row['reference_class']})" if row.get("reference_class") else ""
        return (f"{row['record']}: {row['predicted']}{ref}\n  probability  {probs}\n"
                f"  {int(row['n_segments'])} window(s), {row['sig_len'] / row['fs']:.1f} s; "
                "mean of the window probabilities"
                + (f"; {100 * row['unreadable']:.0f}% of the windows unreadable" if (row.get("unreadable") or 0) > 0
                   else ""))


def table_metrics(rows, classes: Sequence[str], challenge_classes: Sequence[str]) -> dict | None:
    """Per-record metrics against the records' reference classes (a label table), as ``evaluate`` gives them."""
    index = {c: i for i, c in enumerate(classes)}
    rated = [r for r in rows if r["status"] == "ok" and r.get("reference_class") in index and r.get("predicted")]
    if not rated:
        return None
    y_true = np.array([index[r["reference_class"]] for r in rated], dtype=np.int64)
    y_pred = np.array([index[r["predicted"]] for r in rated], dtype=np.int64)
    m = classification_metrics(y_true, y_pred, list(classes), list(challenge_classes))
    m.update(unit="record", aggregation="mean of the window probabilities per record")
    unknown = sorted({r["reference_class"] for r in rows if r.get("reference_class") and
                      r["reference_class"] not in index})
    return {"records": len(rated), "classification": m, "unknown_reference_classes": unknown}


def _record_slices(rows) -> list[tuple[Mapping[str, Any], slice]]:
    """The ok rows with segments, by record name (records are committed as they finish: the order of side
    tables must not depend on that), each with its slice of the store's per-segment arrays."""
    return [(r, slice(int(r["offset"]), int(r["offset"]) + int(r["n_segments"])))
            for r in sorted(rows, key=lambda r: r["record"]) if r["status"] == "ok" and int(r["n_segments"])]


def annotation_metrics(writer: scores.ScoresWriter, rows, classes: Sequence[str], rhythm: str = "A") -> dict | None:
    """Windows against the records' rhythm annotations (each window's majority rhythm, as a class).

    Per record: the share of time in ``rhythm`` (AF burden) from the model and from the reference, on the
    same window grid (``scores.time_shares``); over all records: ``rhythm`` episode sensitivity and positive
    predictivity (``evaluate.episode_agreement``) and per-window classification metrics.
    """
    rated = [(r, s) for r, s in _record_slices(rows) if r.get("reference")]
    if not rated:
        return None
    per_record, y_true, y_pred, counts = {}, [], [], Counter()
    index = {c: i for i, c in enumerate(classes)}
    anchors, predictions, references = writer.segments("anchor", "predicted", "reference")
    for r, s in rated:
        anchor, pred, ref = anchors[s], predictions[s], references[s]
        sig_len, fs = int(r["sig_len"]), float(r["fs"])
        have = ref != ""
        ref_filled = np.where(have, ref, "O")  # windows before the first rhythm note: not the rhythm
        per_record[r["record"]] = {
            "burden_model": float(scores.time_shares(anchor, pred, sig_len, classes)[index[rhythm]]),
            "burden_reference": float(scores.time_shares(anchor, ref_filled, sig_len, classes)[index[rhythm]])}
        ep = episode_agreement([(a, b) for a, b, c in scores.episodes(anchor, ref_filled, sig_len, fs) if c == rhythm],
                               [(a, b) for a, b, c in scores.episodes(anchor, pred, sig_len, fs) if c == rhythm])
        counts.update({k: ep[k] for k in ("n_reference", "n_predicted", "detected", "true")})
        y_true += [index[c] for c in ref[have]]
        y_pred += [index[c] for c in pred[have]]
    return {
        "rhythm": rhythm, "records": per_record,
        "episodes": {**dict(counts),
                     "sensitivity": counts["detected"] / counts["n_reference"] if counts["n_reference"] else None,
                     "positive_predictivity": counts["true"] / counts["n_predicted"] if counts["n_predicted"] else None},
        "windows": classification_metrics(np.array(y_true, np.int64), np.array(y_pred, np.int64), list(classes)),
        "grid": "per window: its majority rhythm note (N -> N, AFIB -> A, other rhythms -> O); "
                "each window owns the time until the next window starts",
    }


def episodes_frame(writer: scores.ScoresWriter, rows):
    """``record, start_s, end_s, class`` of every run of windows of one predicted class (``scores.episodes``)."""
    import pandas as pd

    out = []
    anchors, predictions = writer.segments("anchor", "predicted")
    for r, s in _record_slices(rows):
        for start, end, c in scores.episodes(anchors[s], predictions[s], int(r["sig_len"]), float(r["fs"])):
            out.append({"record": r["record"], "start_s": round(start, 3), "end_s": round(end, 3), "class": c})
    return pd.DataFrame(out, columns=["record", "start_s", "end_s", "class"])


register_task(RhythmTask())
