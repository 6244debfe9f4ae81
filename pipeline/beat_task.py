"""The beat task: beats found at R peaks, each scored alone (the AAMI classes N, S, V, F, Q).

Scoring a piece of a record (``BeatTask.score_piece``): the lead is read with margins on both sides
(``margin_s``: the detector's context, the RR features' and templates' reach), R peaks are found by
``labels.DetectedBeats`` at the model's rate (``extract.detected_segments``), matched to the record's
beat annotations where it has them, cut and transformed as the model's store was, and scored. Pieces
merge with a beat found on both sides of a cut kept once. The store's metrics are the detector's
sensitivity and positive predictivity and the classification of matched beats (EC57).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from . import extract, records, scores
from .evaluate import classification_metrics, format_report
from .labels import BeatAnnotations
from .tasks import Task, register_task

#: Signal read on each side of a piece, so the detector (its search back looks 64 intervals each way) and
#: the windows see the context the whole record gives.
MARGIN_S = 60.0


@dataclass(frozen=True)
class BeatTask(Task):
    """Beats found at R peaks, each scored alone (AAMI classes N, S, V, F, Q)."""

    name: ClassVar[str] = "beat"
    unit: ClassVar[str] = "beats"
    anchor_kind: ClassVar[str] = "r-peak"
    default_split: ClassVar[str] = "inter-patient"
    trace_sizes: ClassVar[tuple[int, ...]] = (256, 255)
    beats: ClassVar[bool] = True
    detector_columns: ClassVar[bool] = True
    ectopic: ClassVar[tuple[str, ...]] = ("S", "V", "F")
    unreadable_class: ClassVar[str | None] = "Q"  # AAMI EC57: unclassifiable

    def min_seconds(self, card) -> float:
        """A record shorter than one beat window has nothing to score."""
        return card.window_s

    def margin_s(self, card) -> float:
        """Signal read on each side of a piece: the detector's context, and the RR features' and templates' reach."""
        # A template's neighbours: 2 x beats on a side near an end, at most a 3 s interval each (rr.RRSpec.max_rr_s).
        reach = 2 * card.template_spec.beats * 3.0 if card.template_spec is not None else 0.0
        return MARGIN_S + max(card.rr_spec.reach_s if card.rr_spec is not None else 0.0, reach)

    def default_annotator(self, card) -> str:
        return card.annotator

    def scores_attrs(self, card, config) -> dict[str, Any]:
        return {"anchor_kind": self.anchor_kind, "detector": config.to_dict()["detector"]}

    def score_piece(self, ctx, base, plan, start: int, stop: int, predict: Callable[[Any], np.ndarray],
                    result: scores.RecordScores, timer) -> None:
        card, header = ctx.card, plan.header
        margin = int(self.margin_s(card) * header.fs)
        first, last = max(start - margin, 0), min(stop + margin, header.sig_len)
        with timer("read"):
            x = records.read_signal(base, header, plan.lead, first, last)
        reference = (BeatAnnotations(ctx.annotator, unknown="Q", align="annotation", symbols=card.label_map)
                     if plan.has_reference else None)
        seg = extract.detected_segments(x, header.fs, first, start, stop, card.spec, ctx.config.detector,
                                        plan.mv_per_unit, card.rr_spec, card.template_spec, reference=reference,
                                        tolerance_s=ctx.config.match_tolerance_s, record=plan.record, base=base,
                                        sig_len=header.sig_len)
        timer.add(seg.seconds)
        from .model_runtime import network_inputs

        with timer("model"):
            result.probability = predict(network_inputs(card, seg.spectrogram, seg.rr, seg.template))
        result.anchor = seg.anchor
        with timer("quality"):
            result.flags = self.judge_segments(card, ctx.config, x, first, seg.anchor, header.fs, plan.mv_per_unit,
                                               seg.beats)
        result.n_detected, result.n_dropped_edge, result.n_dropped_invalid = (
            len(seg.detected), seg.n_dropped_edge, seg.n_dropped_invalid)
        result.reference = seg.label if reference is not None else np.full(len(seg.anchor), "", dtype=object)
        if seg.agreement is not None:
            a = seg.agreement
            result.reference_file, result.n_reference, result.n_reference_edge = ctx.annotator, a.n_reference, a.n_edge
            result.tp, result.fn, result.fp = a.tp, a.fn, a.fp

    def merge(self, parts: Sequence[scores.RecordScores], config) -> scores.RecordScores:
        """One record from its pieces' scores (in order); a beat found on both sides of a cut is kept once."""
        base = parts[0]
        sample = np.concatenate([s.anchor for s in parts])
        # Only across cuts: within a piece the detector already keeps beats a refractory period apart.
        keep = np.ones(len(sample), bool)
        for c in np.cumsum([len(s.anchor) for s in parts])[:-1]:
            if 0 < c < len(sample):
                j = c
                while j < len(sample) and sample[j] - sample[c - 1] < config.detector.refractory_s * base.fs:
                    keep[j] = False
                    j += 1
        merged = scores.merged_counts(parts)
        merged["n_detected"] -= int((~keep).sum())
        return scores.RecordScores(
            base.record, "ok", "", base.checksum, base.lead, base.lead_fallback, base.fs, base.sig_len,
            anchor=sample[keep], probability=np.concatenate([s.probability for s in parts])[keep],
            reference=np.concatenate([s.reference for s in parts])[keep], reference_file=base.reference_file,
            flags=np.concatenate([s.segment_flags for s in parts])[keep],
            task=base.task, reference_class=base.reference_class, quality=base.quality, **merged)

    def store_metrics(self, writer: scores.ScoresWriter, rows: Sequence[Mapping[str, Any]], card, config
                      ) -> dict[str, Any] | None:
        """Detector sensitivity / positive predictivity (EC57 gross) and per-class metrics of matched beats."""
        with_ref = [r for r in rows if r["status"] == "ok" and r["reference"]]
        if not with_ref:
            return None
        tp, fn, fp = (sum(int(r[k]) for r in with_ref) for k in ("tp", "fn", "fp"))
        edge = sum(int(r.get("n_reference_edge", 0) or 0) for r in with_ref)  # rows of older stores lack it
        reference, predicted = writer.segments("reference", "predicted")
        index = {c: i for i, c in enumerate(card.classes)}
        matched = reference != ""
        y_true = np.array([index[c] for c in reference[matched]], dtype=np.int64)
        y_pred = np.array([index[c] for c in predicted[matched]], dtype=np.int64)
        return {
            "records": len(with_ref),
            "detector": {"tp": tp, "fn": fn, "fp": fp, "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
                         "positive_predictivity": tp / (tp + fp) if tp + fp else 0.0,
                         "tolerance_s": config.match_tolerance_s, "edge_beats": edge},
            "classification": classification_metrics(y_true, y_pred, list(card.classes)),
        }

    def report_lines(self, reference: Mapping[str, Any] | None) -> list[str]:
        if not reference:
            return []
        d = reference["detector"]
        lines = [f"  reference   {reference['records']} records with annotations: detector sensitivity "
                 f"{100 * d['sensitivity']:.2f}%, positive predictivity {100 * d['positive_predictivity']:.2f}% "
                 f"(TP {d['tp']:,}, FN {d['fn']:,}, FP {d['fp']:,}; match within {1000 * d['tolerance_s']:.0f} ms)"]
        if d.get("edge_beats"):
            lines.append(f"              {d['edge_beats']:,} reference beat(s) nearer a record end than a window's "
                         "half-width are left out of these figures (no window fits there)")
        lines.append(format_report(reference["classification"], "  matched beats, reference class vs predicted"))
        return lines

    def record_text(self, row: Mapping[str, Any], classes: Sequence[str]) -> str:
        counts = "  ".join(f"{c} {int(n):,}" for c, n in zip(classes, row["segments"]))
        u = row.get("unreadable") or 0.0
        unreadable = f"  ({100 * u:.1f}% unreadable, predicted Q)" if u > 0 else ""
        return f"{row['record']}: {int(row['n_segments']):,} beats  {counts}{unreadable}"

    def wfdb_annotations(self, view) -> tuple[np.ndarray, list[str], list[str]]:
        # The AAMI classes are WFDB beat codes themselves (N, S, V, F, Q), which bxb maps to the same classes.
        return np.asarray(view.anchor, np.int64), [str(c) for c in view.predicted], [""] * len(view.anchor)


register_task(BeatTask())
