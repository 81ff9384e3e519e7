"""One stream evaluation run: split, steps, our loop and the references on the same decoded images; outputs.

Used by `cl-service eval-stream DIR` and `bench/stream_eval.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cl_service.evaluation.protocol import Result, StreamData, incremental_steps, load_split, prepare
from cl_service.evaluation.references import STRATEGIES, Recipe, run
from cl_service.evaluation.report import per_class_table, plot, results_table
from cl_service.evaluation.stream import StreamPlan, run_ours
from cl_service.learning.settings import UpdateSettings

Say = Callable[[str], None]


@dataclass(frozen=True)
class StreamSpec:
    """Which images and how they are cut: the folder, step sizes, split and order seeds, optional class subset."""

    root: Path
    step_sizes: tuple[int, ...] = (3, 2, 2)
    split_seed: int = 0
    order_seed: int = 1
    test_fraction: float = 0.3
    classes: tuple[str, ...] | None = None
    per_class_limit: int | None = None


@dataclass
class Evaluation:
    """Every strategy's result on one stream, and what the stream was."""

    spec: StreamSpec
    steps: list[list[str]]
    counts: dict[str, tuple[int, int]]
    results: list[Result] = field(default_factory=list)

    def result(self, strategy: str) -> Result:
        for r in self.results:
            if r.strategy == strategy:
                return r
        raise KeyError(f"no result for {strategy!r}; have {[r.strategy for r in self.results]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.spec.root),
            "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.spec).items()},
            "steps": self.steps,
            "counts": self.counts,
            "results": [asdict(r) for r in self.results],
        }


def load_stream(spec: StreamSpec, settings: UpdateSettings) -> StreamData:
    """Read, deduplicate, split and decode the folder once (at the model's input size)."""
    split = load_split(
        spec.root,
        test_fraction=spec.test_fraction,
        seed=spec.split_seed,
        classes=spec.classes,
        per_class_limit=spec.per_class_limit,
    )
    steps = incremental_steps(split.classes, spec.step_sizes, seed=spec.order_seed)
    return prepare(split, steps, settings.model)


def evaluate_stream(
    stream: StreamData,
    spec: StreamSpec,
    *,
    settings: UpdateSettings,
    plans: Sequence[tuple[str, StreamPlan]],
    references: Sequence[str],
    recipe: Recipe,
    work_dir: Path,
    say: Say = lambda line: None,
) -> Evaluation:
    """Our loop once per plan (each in its own data folder under `work_dir`), then each reference strategy."""
    unknown = sorted(set(references) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"unknown reference strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    evaluation = Evaluation(spec, stream.steps, stream.split.counts())
    for name, plan in plans:
        evaluation.results.append(run_ours(stream, plan, settings, work_dir / name, name=name, say=say))
    for strategy in references:
        say(f"reference {strategy} ...")
        result = run(strategy, stream, recipe)
        say(f"reference {strategy}: final accuracy {result.final_accuracy:.1%}")
        evaluation.results.append(result)
    return evaluation


def write_outputs(evaluation: Evaluation, out_dir: Path, *, name: str = "stream_eval", title: str = "") -> list[Path]:
    """`NAME.json` (everything), `NAME.md` (tables) and `NAME.png` (accuracy after each step, per class)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"{evaluation.spec.root.name}: steps {' | '.join(', '.join(s) for s in evaluation.steps)}"
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(evaluation.to_json(), indent=2) + "\n")
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown(evaluation, title) + "\n")
    png_path = plot(evaluation.results, out_dir / f"{name}.png", title=title)
    return [json_path, md_path, png_path]


def markdown(evaluation: Evaluation, title: str) -> str:
    counts = ", ".join(f"{c} {tr}/{te}" for c, (tr, te) in evaluation.counts.items())
    parts = [
        f"### {title}",
        f"Train/test images per class: {counts}.",
        results_table(evaluation.results),
        "Final accuracy per class:",
        per_class_table(evaluation.results),
    ]
    lines = [_step_line(r.strategy, d) for r in evaluation.results for d in r.details]
    if lines:
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _step_line(strategy: str, d: dict[str, Any]) -> str:
    pseudo = d.get("pseudo_labels", 0)
    notes = [f"pseudo-labels {d.get('pseudo_correct', 0)}/{pseudo} right"] if pseudo else []
    if held := d.get("counts", {}).get("unlabeled_near_new_class"):
        propagated = d.get("counts", {}).get("pseudo_propagated", 0)
        notes.append(f"{held} unlabeled images next to a new class kept from the teacher, {propagated} labelled as it")
    if d.get("default_gate_accepts") is False:
        notes.append("the default gate would reject it: " + "; ".join(d.get("default_gate_reasons", [])))
    return (
        f"- {strategy} step {d['step']}: sent {d['sent_labeled']} labeled + {d['sent_unlabeled']} unlabeled, "
        f"update {d['update_seconds']:.0f} s, {'accepted' if d['accepted'] else 'not accepted'}; "
        f"accuracy on seen classes {100 * d['accuracy_seen']:.1f}%" + "".join(f"; {n}" for n in notes)
    )
