"""The figures of a version report, each returned as PNG bytes (to be inlined in the page).

matplotlib is imported inside each function, so importing this module stays cheap. Figures are drawn on a
`matplotlib.figure.Figure` of their own (rendered by Agg), not through pyplot: no global backend switch and no
figure registry that a long-running server would have to remember to close.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
BEFORE_COLOUR = "#9aa5b1"
AFTER_COLOUR = "#2f6fb0"
GROUP_COLOURS = ("#2f6fb0", "#d9822b", "#7b8794", "#2e8540")
THRESHOLD_COLOUR = "#c0392b"


def plain(text: str) -> str:
    """Text that matplotlib draws literally: a `$` would otherwise start mathtext (and a stray one fails to draw)."""
    return text.replace("$", r"\$")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def confusion_matrix(classes: Sequence[str], confusion: Sequence[Sequence[int]]) -> bytes:
    """Rows: true class, columns: predicted; colour is the share of the row (its recall on the diagonal), text the
    count, so that a small class's mistakes stand out as much as a large one's."""
    counts = np.asarray(confusion, dtype=np.float64).reshape(len(classes), len(classes))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = min(13.0, 3.2 + 0.6 * len(classes))
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    shown = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [plain(name) for name in classes]
    axes.set_xticks(range(len(classes)), labels, rotation=35, ha="right", fontsize=9)
    axes.set_yticks(range(len(classes)), labels, fontsize=9)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    size = 10 if len(classes) <= 12 else 7
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if shares[i, j] > 0.55 else "#1f2933"
            axes.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour, fontsize=size)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    return _png(figure)


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str,
    percent: bool = False,
    colours: Sequence[str] = (BEFORE_COLOUR, AFTER_COLOUR),
) -> bytes:
    """One group of bars per category, one bar per series; a missing value (None) draws no bar and says "n/a"."""
    names = list(series)
    width = 0.8 / max(1, len(names))
    figure = _figure(min(14.0, 3.5 + 0.9 * len(categories) * max(1, len(names)) / 2), 3.8)
    axes = figure.add_subplot()
    scale = 100.0 if percent else 1.0
    top = 0.0
    for k, name in enumerate(names):
        values = list(series[name])
        positions = [i + (k - (len(names) - 1) / 2) * width for i in range(len(categories))]
        heights = [scale * v if v is not None else 0.0 for v in values]
        top = max([top, *heights])
        bars = axes.bar(positions, heights, width, label=plain(name), color=colours[k % len(colours)])
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if value is None else (f"{scale * value:.0f}" if percent else f"{value:g}")
            axes.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axes.set_xticks(range(len(categories)), [plain(c) for c in categories], rotation=30, ha="right", fontsize=9)
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 105 if percent else max(1.0, top) * 1.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def score_histogram(groups: Mapping[str, Sequence[float]], threshold: float | None) -> bytes:
    """Overlaid histograms (shared bins) of anomaly scores per group, the threshold as a vertical line."""
    every = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()] or [np.zeros(0)])
    low, high = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, 31).tolist()
    figure = _figure(8.5, 3.8)
    axes = figure.add_subplot()
    for k, (name, scores) in enumerate(groups.items()):
        if len(scores):
            colour = GROUP_COLOURS[k % len(GROUP_COLOURS)]
            label = plain(f"{name} ({len(scores)})")
            axes.hist(scores, bins=edges, histtype="stepfilled", alpha=0.35, color=colour, label=label)
            axes.hist(scores, bins=edges, histtype="step", linewidth=1.4, color=colour)
    if threshold is not None:
        axes.axvline(
            threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.6, label=f"threshold {threshold:.3f}"
        )
    from matplotlib.ticker import MaxNLocator

    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("anomaly score (combined, standardised)")
    axes.set_ylabel("images")
    axes.grid(alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(fontsize=9)
    return _png(figure)


def horizontal_bars(values: Mapping[str, float], *, xlabel: str, unit: str = "s") -> bytes:
    """One bar per entry, top to bottom in the mapping's order, each labelled with its value."""
    names = list(values)
    figure = _figure(8.0, 0.9 + 0.42 * max(1, len(names)))
    axes = figure.add_subplot()
    bars = axes.barh(range(len(names)), [values[n] for n in names], color=AFTER_COLOUR)
    axes.set_yticks(range(len(names)), [plain(n) for n in names])
    axes.invert_yaxis()
    for bar, name in zip(bars, names, strict=True):
        axes.annotate(
            f"{values[name]:.2f} {unit}",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    axes.set_xlim(0, max([1e-3, *values.values()]) * 1.18)
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    return _png(figure)
