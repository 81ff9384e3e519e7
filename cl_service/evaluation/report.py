"""What a stream evaluation shows people: a markdown table, a per-class table, a PNG plot, flat JSON figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cl_service.evaluation.protocol import Result


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def results_table(results: Sequence[Result]) -> str:
    """One row per strategy: final accuracy, average incremental accuracy, forgetting, BWT, training seconds."""
    lines = [
        "| strategy | final accuracy | avg. incremental accuracy | forgetting (points) | BWT (points) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        average = sum(r.average_accuracy) / len(r.average_accuracy) if r.average_accuracy else None
        lines.append(
            f"| {r.strategy} | {_pct(r.final_accuracy)} | {_pct(average)} | {_points(r.forgetting)} | "
            f"{_points(r.backward_transfer)} | {sum(r.step_seconds):.0f} |"
        )
    return "\n".join(lines)


def per_class_table(results: Sequence[Result]) -> str:
    """Final accuracy per class (rows) and strategy (columns)."""
    classes = sorted({name for r in results for name in r.per_class})
    lines = ["| class | " + " | ".join(r.strategy for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(_pct(r.per_class.get(name)) for r in results) + " |")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path, *, title: str) -> Path:
    """Accuracy on all seen classes after each step, one line per strategy (joint: one point at the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    steps = max(len(r.seen_accuracy) for r in results)
    for r in results:
        xs = list(range(steps - len(r.seen_accuracy) + 1, steps + 1))
        style = "-" if r.strategy.startswith("ours") else "--"
        curves.plot(xs, [100 * a for a in r.seen_accuracy], style, marker="o", label=r.strategy)
    curves.set_xticks(range(1, steps + 1))
    curves.set_xlabel("after step")
    curves.set_ylabel("accuracy on all seen classes (%)")
    curves.set_ylim(0, 101)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    curves.set_title(title, fontsize=10)

    classes = sorted({name for r in results for name in r.per_class})
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        positions = [i + k * width for i in range(len(classes))]
        bars.bar(positions, [100 * r.per_class.get(name, 0.0) for name in classes], width, label=r.strategy)
    bars.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))])
    bars.set_xticklabels(classes, rotation=30, ha="right", fontsize=7)
    bars.set_ylabel("final accuracy per class (%)")
    bars.set_ylim(0, 101)
    bars.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
