"""Stage 12: figures of spectrogram stores and scores stores, for people who would rather look than read.

Each function draws arrays it is given and returns a ``matplotlib.figure.Figure`` built
without pyplot: no backend is chosen for the process, so a notebook shows the figure
inline (Jupyter displays a bare ``Figure``) and the CLI saves it (``fig.savefig``).
Reading what is drawn is elsewhere: a store's spectrograms and labels come from
``store.open_dataset``, a record's scores from ``scores.record_view``, its samples from
``extract.read_strip`` and ``extract.segment_waveforms``.

* ``spectrogram_gallery``: stored spectrograms per class, each beside its waveform;
* ``ecg_strip``: an ECG stretch with each beat marked by its predicted class (and the
  reference class, mismatches highlighted), or for rhythm scores the windows' classes
  as a band under the strip;
* ``scores_overview``: one record of a scores store over time: beats per class and the
  ectopic share, or the rhythm windows' probabilities, episodes and time per class;
* ``history_figure``, ``confusion_figure``: a training run's curves and confusion matrices
  (``evaluate.write_evaluation`` saves them into the run folder).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .scores import ECTOPIC, RecordView, episodes, time_shares

#: One colour per class; beat and rhythm classes share letters (N) but not meaning, hence two maps.
BEAT_COLOURS = {"N": "#8c8c8c", "S": "#1f77b4", "V": "#d62728", "F": "#9467bd", "Q": "#8c564b"}
RHYTHM_COLOURS = {"N": "#2ca02c", "A": "#d62728", "O": "#ff7f0e", "~": "#8c8c8c"}
_SPARE = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#aec7e8", "#ffbb78")
MISMATCH = "#ffd92f"  #: background of a beat whose predicted class is not its reference class


def class_colours(classes: Sequence[str], task: str = "beat") -> dict[str, str]:
    """A colour per class: the fixed ones of ``task``, then spare colours for any other class name."""
    known = RHYTHM_COLOURS if task == "rhythm" else BEAT_COLOURS
    spare = iter(_SPARE * (len(classes) // len(_SPARE) + 1))
    return {c: known.get(c) or next(spare) for c in classes}


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def gallery_indices(labels: np.ndarray, classes: Sequence[str], per_class: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``per_class`` segment indices of each class, drawn at random (seeded), in store order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=object)
    out = {}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        out[c] = np.sort(rng.choice(idx, size=min(per_class, idx.size), replace=False)) if idx.size else idx
    return out


def spectrogram_gallery(spectrogram: np.ndarray, label: Sequence[str], freq: np.ndarray, time: np.ndarray, *,
                        classes: Sequence[str], task: str = "beat", waveform: np.ndarray | None = None,
                        fs: float | None = None, n_before: int = 0, caption: Sequence[str] | None = None,
                        title: str = ""):
    """Spectrograms of a few segments per class: one column per class, each spectrogram beside its waveform.

    Parameters
    ----------
    spectrogram
        ``(n, n_freq, n_time)``: the selected segments (``gallery_indices`` picks them).
    label
        The class of each segment; classes without a segment get an empty column.
    freq, time
        The store's coordinates: Hz, and seconds from the segment's anchor.
    waveform
        ``(n, n_samples)`` signal windows at ``fs`` (``extract.segment_waveforms``), drawn left
        of each spectrogram with ``n_before`` samples before the anchor; None: spectrograms only.
    caption
        A short text per segment (its record and anchor time).
    """
    label = np.asarray(label, dtype=object)
    classes = list(classes)
    rows = max([int(np.sum(label == c)) for c in classes] + [1])
    per_cell = 2 if waveform is not None else 1
    fig = _figure(figsize=(2.3 * per_cell * len(classes), 1.9 * rows + 0.8), dpi=110, layout="constrained")
    axes = fig.subplots(rows, per_cell * len(classes), squeeze=False)
    colours = class_colours(classes, task)
    spectrogram = np.asarray(spectrogram, dtype=np.float32)
    finite = spectrogram[np.isfinite(spectrogram)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    image = None
    xlabel = "s from window start" if task == "rhythm" else "s from R peak"
    for col, c in enumerate(classes):
        idx = np.flatnonzero(label == c)
        for row in range(rows):
            ax_w = axes[row, per_cell * col] if waveform is not None else None
            ax_s = axes[row, per_cell * col + per_cell - 1]
            if row >= idx.size:
                for ax in (ax_w, ax_s):
                    if ax is not None:
                        ax.set_axis_off()
                if row == 0:
                    ax_s.text(0.5, 0.5, f"no {c} segments", ha="center", va="center", transform=ax_s.transAxes)
                continue
            i = idx[row]
            image = ax_s.pcolormesh(time, freq, spectrogram[i], shading="nearest", cmap="magma", vmin=vmin, vmax=vmax)
            ax_s.set_ylabel("Hz" if col == 0 or waveform is not None else "", fontsize=7)
            ax_s.tick_params(labelsize=6)
            if ax_w is not None:
                t = (np.arange(waveform.shape[1]) - n_before) / float(fs or 1)
                ax_w.plot(t, waveform[i], color=colours[c], lw=0.8)
                ax_w.axvline(0, color="k", lw=0.4, ls=":")
                ax_w.tick_params(labelsize=6)
                ax_w.set_ylabel("mV", fontsize=7)
            top = ax_w if ax_w is not None else ax_s
            if row == 0:
                top.set_title(f"class {c}", color=colours[c], fontsize=10, fontweight="bold", loc="left")
            if caption is not None:
                ax_s.set_title(caption[i], fontsize=6, loc="right")
            if row == rows - 1 or row == idx.size - 1:
                ax_s.set_xlabel(xlabel, fontsize=7)
                if ax_w is not None:
                    ax_w.set_xlabel(xlabel, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="log |STFT|")
    fig.suptitle(title or "stored spectrograms per class")
    return fig


def ecg_strip(strip: Any, *, anchor: np.ndarray, predicted: Sequence[str], classes: Sequence[str],
              task: str = "beat", reference: Sequence[str] | None = None, window_s: float | None = None,
              reference_beats: tuple[np.ndarray, Sequence[str]] | None = None, title: str = ""):
    """An ECG stretch with the scorer's classes on it.

    Parameters
    ----------
    strip
        ``extract.Strip``: the samples (``signal``, ``fs``, ``start``, ``lead``, ``units``).
    anchor, predicted
        The scored segments of the record (all of them; those in the stretch are drawn):
        beats' R peaks, or rhythm windows' starts, in record samples.
    reference
        Per segment: the matched reference class, "" where none. Beats whose predicted
        class differs from it get a highlighted background and both classes written.
    window_s
        Rhythm scores: the windows' length. The windows' classes become a band under the
        strip (each window owns its time until the next one starts, as in
        ``scores.time_shares``), with the reference windows in a second band.
    reference_beats
        ``(samples, classes)`` of reference beats no scored beat matched: drawn as crosses.
    """
    rhythm = window_s is not None
    colours = class_colours(classes, task)
    anchor = np.asarray(anchor, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=object)
    reference = np.asarray(reference if reference is not None else [""] * anchor.size, dtype=object)
    t = strip.times
    t0, t1 = float(t[0]), float(t[-1]) + 1 / strip.fs
    fig = _figure(figsize=(min(max(8.0, 1.1 * (t1 - t0)), 16.0), 3.6 if rhythm else 3.2), dpi=110)
    if rhythm:
        bands = 2 if np.any(reference != "") else 1
        ax, *band_axes = fig.subplots(1 + bands, 1, sharex=True, height_ratios=[6] + [1] * bands)
    else:
        ax, band_axes = fig.subplots(), []
    ax.plot(t, strip.signal, color="k", lw=0.7)
    ax.set_ylabel(f"{strip.lead} ({strip.units})")
    ax.set_xlim(t0, t1)
    ax.grid(alpha=0.25)
    if not rhythm:
        shown = _mark_beats(ax, strip, anchor, predicted, reference, colours, reference_beats)
    else:
        shown = _window_bands(band_axes, strip, anchor, predicted, reference, colours, window_s, (t0, t1))
    (band_axes[-1] if band_axes else ax).set_xlabel("time (s)")
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[c], label=f"{c} ({shown[c]})") for c in classes if c in shown]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False,
                  title="windows" if rhythm else "beats", title_fontsize=7)
    ax.set_title(title or f"record {strip.record}, {t0:.1f}-{t1:.1f} s", fontsize=10)
    fig.tight_layout()
    return fig


def _mark_beats(ax, strip: Any, anchor: np.ndarray, predicted: np.ndarray, reference: np.ndarray,
                colours: Mapping[str, str], reference_beats: tuple[np.ndarray, Sequence[str]] | None) -> dict[str, int]:
    """``ecg_strip``'s beats: a dot and the class over each scored beat in the strip, mismatches highlighted,
    crosses under the unscored reference beats. Returns the beats drawn per class (for the legend)."""
    shown: dict[str, int] = {}
    inside = (anchor >= strip.start) & (anchor < strip.start + strip.signal.shape[0])
    lo, hi = np.nanmin(strip.signal), np.nanmax(strip.signal)
    pad = 0.15 * (hi - lo or 1)
    ax.set_ylim(lo - pad, hi + 2.2 * pad)
    for a, p, r in zip(anchor[inside], predicted[inside], reference[inside]):
        x = a / strip.fs
        y = strip.signal[a - strip.start]
        mismatch = r != "" and r != p
        if mismatch:
            ax.axvspan(x - 0.12, x + 0.12, color=MISMATCH, alpha=0.6, lw=0, zorder=0)
        ax.plot([x], [y], "o", ms=5, color=colours.get(p, "k"), zorder=3)
        ax.text(x, hi + pad, str(p) if not mismatch else f"{p}\n(ref {r})", ha="center", va="bottom",
                fontsize=7, color=colours.get(p, "k"), fontweight="bold" if p in ECTOPIC else "normal")
        shown[str(p)] = shown.get(str(p), 0) + 1
    if reference_beats is not None and len(reference_beats[0]):
        samples, labels = reference_beats
        for s, c in zip(samples, labels):
            if strip.start <= s < strip.start + strip.signal.shape[0]:
                ax.plot([s / strip.fs], [lo - 0.5 * pad], "x", ms=6, color=colours.get(str(c), "k"), mew=1.5)
        ax.text(0.995, 0.02, "x: reference beat not scored (missed, or at the record's edge)", transform=ax.transAxes, ha="right", fontsize=7)
    return shown


def _window_bands(band_axes, strip: Any, anchor: np.ndarray, predicted: np.ndarray, reference: np.ndarray,
                  colours: Mapping[str, str], window_s: float, span: tuple[float, float]) -> dict[str, int]:
    """``ecg_strip``'s rhythm windows: each window's class as a band under the strip (it owns its time until the
    next window starts), predicted then reference. Returns the predicted windows drawn per class (for the legend)."""
    t0, t1 = span
    shown: dict[str, int] = {}
    last = strip.sig_len or (int(anchor[-1]) + int(window_s * strip.fs) if anchor.size else 0)
    ends = np.append(anchor[1:], last)
    for band, values, name in zip(band_axes, (predicted, reference), ("predicted", "reference")):
        for a, e, c in zip(anchor, ends, values):
            if e / strip.fs <= t0 or a / strip.fs >= t1 or c == "":
                continue
            band.axvspan(max(a / strip.fs, t0), min(e / strip.fs, t1), color=colours.get(str(c), "k"), lw=0)
            shown.setdefault(str(c), 0)
            if name == "predicted":
                shown[str(c)] += 1
        band.set_yticks([])
        band.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return shown


def _bin_seconds(duration_s: float) -> float:
    """A bin width that gives 20 to 60 bins: 1 min for a 30-min record, 10 s for a 5-min one."""
    for b in (5, 10, 30, 60, 120, 300, 600, 1800, 3600):
        if duration_s / b <= 60:
            return float(b)
    return 3600.0


def scores_overview(view: RecordView, *, bin_s: float | None = None, title: str = ""):
    """One record of a scores store over time.

    Beats: beats per predicted class in time bins (stacked) and the ectopic share
    (S + V + F) per bin. Rhythm windows: each class's probability over time, the
    predicted episodes (and the reference windows, where known) as bands, and the share
    of the record's time per class (the AF burden is the share of A).
    """
    colours = class_colours(view.classes, view.task)
    t = view.anchor / view.fs if view.fs else np.zeros(0)
    duration = max(view.duration_s, float(t[-1]) if t.size else 0.0, 1e-9)
    if view.task == "rhythm":
        return _rhythm_overview(view, t, duration, colours, title)
    bin_s = bin_s or _bin_seconds(duration)
    edges = np.arange(0.0, duration + bin_s, bin_s)
    fig = _figure(figsize=(10, 4.6), dpi=110)
    ax, ax_e = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    counts = {c: np.histogram(t[view.predicted == c], bins=edges)[0] for c in view.classes}
    bottom = np.zeros(edges.size - 1)
    centres, width = edges[:-1] / 60, bin_s / 60
    for c in view.classes:
        if counts[c].any():
            ax.bar(centres, counts[c], width=width, bottom=bottom, align="edge", color=colours[c],
                   label=f"{c} ({int(counts[c].sum()):,})")
            bottom += counts[c]
    ax.set_ylabel(f"beats per {bin_s:g} s")
    ax.legend(fontsize=7, ncol=len(view.classes), loc="upper right")
    ectopic = sum((counts[c] for c in view.classes if c in ECTOPIC), np.zeros(edges.size - 1))
    share = np.divide(ectopic, bottom, out=np.full(bottom.shape, np.nan), where=bottom > 0)
    ax_e.step(edges[:-1] / 60, 100 * share, where="post", color="#d62728")
    total = 100 * ectopic.sum() / bottom.sum() if bottom.sum() else float("nan")
    ax_e.axhline(total, color="#d62728", ls=":", lw=0.8)
    ax_e.set_ylabel("ectopic share (%)")
    ax_e.set_xlabel("time (min)")
    ax_e.set_ylim(0, max(5.0, np.nanmax(100 * share) * 1.1 if np.isfinite(share).any() else 5.0))
    for a in (ax, ax_e):
        a.grid(alpha=0.25)
    unreadable = f", unreadable {100 * view.unreadable:.1f} % (predicted Q)" if view.unreadable else ""
    ax.set_title(title or f"record {view.record}: {t.size:,} beats, ectopic (S+V+F) {total:.1f} %{unreadable}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _rhythm_overview(view: RecordView, t: np.ndarray, duration: float, colours: Mapping[str, str], title: str):
    fig = _figure(figsize=(10, 4.8), dpi=110)
    grid = fig.add_gridspec(3, 2, width_ratios=[5, 1], height_ratios=[4, 1, 1])
    ax = fig.add_subplot(grid[0, 0])
    bands = [fig.add_subplot(grid[1, 0], sharex=ax), fig.add_subplot(grid[2, 0], sharex=ax)]
    ax_share = fig.add_subplot(grid[:, 1])
    unit = 60.0 if duration > 600 else 1.0
    for j, c in enumerate(view.classes):
        if view.probability.size:
            ax.step(t / unit, view.probability[:, j], where="post", color=colours[c], label=c, lw=1.2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("window probability")
    ax.legend(fontsize=7, ncol=len(view.classes), loc="upper right")
    ax.grid(alpha=0.25)
    for band, values, name in zip(bands, (view.predicted, view.reference), ("predicted", "reference")):
        known = values != "" if values.size else np.zeros(0, bool)
        if known.any():
            for start, end, c in episodes(view.anchor[known], values[known], view.sig_len, view.fs):
                band.axvspan(start / unit, end / unit, color=colours.get(c, "k"), lw=0)
        else:
            band.text(0.5, 0.5, "no reference windows", ha="center", va="center", fontsize=7, transform=band.transAxes)
        band.set_yticks([])
        band.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    bands[-1].set_xlim(0, duration / unit)
    bands[-1].set_xlabel("time (min)" if unit == 60 else "time (s)")
    shares = time_shares(view.anchor, view.predicted, view.sig_len, view.classes) if view.anchor.size \
        else np.zeros(len(view.classes))
    ax_share.barh(list(view.classes)[::-1], 100 * shares[::-1], color=[colours[c] for c in view.classes][::-1])
    for y, v in enumerate(shares[::-1]):
        ax_share.text(100 * v + 1, y, f"{100 * v:.0f}%", va="center", fontsize=7)
    ax_share.set_xlim(0, 115)
    ax_share.set_xlabel("% of time")
    ax_share.set_title("time per class", fontsize=8)
    af = dict(zip(view.classes, shares)).get("A")
    head = f"record {view.record}: {t.size} windows"
    if view.probability.size:
        mean = view.probability.mean(axis=0)
        head += f", record class {view.classes[int(np.argmax(mean))]}"
    if view.reference_class:
        head += f" (reference {view.reference_class})"
    if af is not None:
        head += f", AF burden {100 * af:.1f} %"
    ax.set_title(title or head, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(metrics: Mapping[str, Any], *, normalize: bool, title: str = ""):
    """A confusion matrix (``evaluate.classification_metrics``) as counts, or as ratios of each reference class
    (rows sum to 1)."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    classes = metrics["classes"]
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) if normalize else cm
    fig = _figure(figsize=(5.2, 4.6), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("reference class")
    ax.set_title(title or ("confusion matrix (row ratios)" if normalize else "confusion matrix (counts)"))
    limit = (shown.max() or 1) / 2
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(shown[i, j]):,}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if shown[i, j] > limit else "black")
    fig.tight_layout()
    return fig


def history_figure(history: Mapping[str, Sequence[float]]):
    """Loss, accuracy and the validation F1 (macro, or the challenge's) per epoch of a training run."""
    panels = [("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy")),
              ("F1", ("val_macro_f1", "val_challenge_f1"))]
    panels = [(t, [k for k in keys if k in history]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig = _figure(figsize=(4.2 * len(panels), 3.4), dpi=120)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            values = history[k]
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=k.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
