"""Stream evaluation on the real defect images: our loop through ingest -> update, beside the references.

One run, same split and backbone for everything (ImageNet-pretrained tf_efficientnet_lite0, 96x96, 2 CPU threads).
Ours is the service's default, `classifier = "lda"` (the pretrained backbone frozen, a discriminant head from running
class statistics: nothing trained, so no epochs and no seed enter it); the references and `ours_trained` (the
`classifier = "trained"` mode: replay + LwF + online EWC) train 4 epochs per step. Our updates run with the gate open,
so that the figures measure the learner; what the default gate (2 points) would have said of each update is recorded
beside them:

1. xsdd, all labels, 3 class-incremental steps (3/2/2 classes): ours, ours_trained (update seed 0; its seeds 0-2
   spread over about 2 points, docs/learning.md) with a replay budget of 10 images per class, and the references
   naive, cumulative, joint, Avalanche Replay and DER (memory 200).
2. xsdd, 10% of the labels per class, the rest streamed unlabeled through the teacher; and the same loop sent the
   10% labels alone (what the pseudo-labels add).
3. Update time against stored history: one update of the last step's images on a store holding the earlier steps'
   images once (1x) and five times (5x: four copies with one pixel changed each), same replay budget.
4. magnetic_tile: its five defect classes (steps 2/2/1), and with `free` (2/2/2), ours against naive, cumulative,
   joint (and Avalanche on the five defects).

Prints markdown tables and writes bench/results/stream_eval.json (flat figures), stream_eval.md (the tables) and
one PNG plot per stream. Needs ../shared/datasets (xsdd, magnetic_tile) and the bench extra (Avalanche).

    python bench/stream_eval.py            # the whole run (about an hour on 2 cores)
    python bench/stream_eval.py --quick    # smoke: few images, small inputs, 1 epoch (results_quick files)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, RESULTS_DIR, Figure, machine, write_results

from cl_service.api.server import server_in_thread
from cl_service.config import load_settings
from cl_service.evaluation.protocol import StreamData
from cl_service.evaluation.references import STRATEGIES, Recipe
from cl_service.evaluation.runner import Evaluation, StreamSpec, evaluate_stream, load_stream, markdown, write_outputs
from cl_service.evaluation.stream import StreamPlan, labeled_subset, padded_history, send
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.learning.update import run_update

DATASETS = REPO_ROOT.parent / "shared" / "datasets"
PER_CLASS_BUDGET = 10
REFERENCE_MEMORY = 200


def say(line: str) -> None:
    print(line, flush=True)


def update_seconds(stream: StreamData, settings: UpdateSettings, history_copies: int, work_dir: Path) -> float:
    """Seconds of one update that learns the last step, on a store holding the earlier steps `history_copies` times.

    The history's own update (untimed) runs with one epoch: only the timed update's cost matters here.
    """
    earlier = [item for item in stream.split.train if item.label not in stream.steps[-1]]
    last = [item for item in stream.split.train if item.label in stream.steps[-1]]
    history = padded_history(earlier, history_copies - 1)
    service = load_settings(
        data_dir=work_dir, bind="127.0.0.1:0", log_level="WARNING", update=settings, scheduler=False
    )
    with server_in_thread(service) as running:
        target = f"127.0.0.1:{running.port}"
        repository = ModelRepository(work_dir / "models", running.core.store)
        send(target, history, {item.sha256 for item in history}, "history")
        run_update(running.core.store, repository, settings.model_copy(update={"epochs": 1}))
        send(target, last, {item.sha256 for item in last}, "new")
        start = time.perf_counter()
        result = run_update(running.core.store, repository, settings)
        seconds = time.perf_counter() - start
    say(f"update with {history_copies}x history ({len(history)} stored images): {seconds:.1f} s, {result.timings}")
    return seconds


def flat(prefix: str, evaluation: Evaluation) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for r in evaluation.results:
        for key, value in r.figures().items():
            if key != "strategy":
                out[f"{prefix}_{r.strategy}_{key}"] = value
    out[f"{prefix}_steps"] = " | ".join(",".join(step) for step in evaluation.steps)
    out[f"{prefix}_train_images"] = sum(tr for tr, _ in evaluation.counts.values())
    out[f"{prefix}_test_images"] = sum(te for _, te in evaluation.counts.values())
    return out


def run_stream(
    name: str,
    spec: StreamSpec,
    settings: UpdateSettings,
    plans: Sequence[tuple[str, StreamPlan]],
    references: Sequence[str],
    recipe: Recipe,
    work: Path,
    suffix: str,
) -> tuple[StreamData, Evaluation]:
    stream = load_stream(spec, settings)
    budget = PER_CLASS_BUDGET * len(stream.split.classes)
    settings = settings.model_copy(update={"replay_budget": budget})
    say(f"== {name}: steps {stream.steps}, replay budget {budget}")
    evaluation = evaluate_stream(
        stream,
        spec,
        settings=settings,
        plans=plans,
        references=references,
        recipe=recipe,
        work_dir=work / name,
        say=say,
    )
    write_outputs(evaluation, RESULTS_DIR, name=f"stream_eval_{name}{suffix}", title=name)
    return stream, evaluation


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke size: 25 images per class, 32x32, 1 epoch")
    args = parser.parse_args(argv)
    missing = [name for name in ("xsdd", "magnetic_tile") if not (DATASETS / name).is_dir()]
    if missing:
        print(f"stream_eval needs {', '.join(missing)} in {DATASETS} (see its README); nothing was run")
        return 2
    size, epochs, limit = (32, 1, 25) if args.quick else (96, 4, None)
    # The gate is opened (any drop passes) to measure the learner itself; each update's verdict under the default
    # gate is recorded beside it (default_gate_rejections).
    settings = UpdateSettings(model=ModelConfig(image_size=size), epochs=epochs, threads=2, gate_tolerance=1.0)
    recipe = Recipe(image_size=size, epochs=epochs, mem_size=REFERENCE_MEMORY)
    suffix = "_quick" if args.quick else ""
    started = time.perf_counter()
    figures: dict[str, Figure] = {}
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stream-eval-") as tmp:
        work = Path(tmp)
        xsdd = StreamSpec(DATASETS / "xsdd", (3, 2, 2), per_class_limit=limit)
        plans = [("ours", StreamPlan(1.0)), ("ours_trained", StreamPlan(1.0, classifier="trained"))]
        stream, full = run_stream("xsdd_full", xsdd, settings, plans, STRATEGIES, recipe, work, suffix)
        ours = full.result("ours")
        joint, cumulative = full.result("joint"), full.result("cumulative")
        best_avalanche = max(full.result("replay").final_accuracy, full.result("der").final_accuracy)
        ceiling = max(joint.final_accuracy, cumulative.final_accuracy)
        figures.update(flat("xsdd_full", full))
        figures.update(
            {
                "xsdd_full_final_acc": ours.final_accuracy,
                "xsdd_full_trained_acc": full.result("ours_trained").final_accuracy,
                "xsdd_full_joint_acc": joint.final_accuracy,
                "xsdd_full_cumulative_acc": cumulative.final_accuracy,
                "xsdd_full_naive_acc": full.result("naive").final_accuracy,
                "xsdd_full_avalanche_best_acc": best_avalanche,
                "xsdd_full_forgetting": ours.forgetting or 0.0,
                "xsdd_full_ceiling_acc": ceiling,
                "xsdd_full_gap_to_ceiling_points": 100 * (ceiling - ours.final_accuracy),
            }
        )
        sections.append(markdown(full, "xsdd, all labels"))

        plans = [
            ("ours_10pct", StreamPlan(0.1)),
            ("ours_10pct_labels_only", StreamPlan(0.1, send_unlabeled=False)),
        ]
        _, semi = run_stream("xsdd_10pct", xsdd, settings, plans, [], recipe, work, suffix)
        with_teacher, labels_only = semi.result("ours_10pct"), semi.result("ours_10pct_labels_only")
        figures.update(flat("xsdd_10pct", semi))
        figures.update(
            {
                "xsdd_10pct_final_acc": with_teacher.final_accuracy,
                "xsdd_10pct_labels_only_acc": labels_only.final_accuracy,
                "xsdd_10pct_forgetting": with_teacher.forgetting or 0.0,
                "xsdd_10pct_labeled_images": len(labeled_subset(stream.split.train, 0.1, 0)),
                "xsdd_10pct_gap_to_ceiling_points": 100 * (ceiling - with_teacher.final_accuracy),
            }
        )
        sections.append(markdown(semi, "xsdd, 10% of the labels"))

        timed = settings.model_copy(update={"replay_budget": PER_CLASS_BUDGET * len(stream.split.classes)})
        one = update_seconds(stream, timed, 1, work / "time_1x")
        five = update_seconds(stream, timed, 5, work / "time_5x")
        figures.update({"update_seconds_1x": one, "update_seconds_5x": five, "update_time_ratio_5x": five / one})

        for name, classes, sizes, references in (
            ("magnetic_tile_defects", ("blowhole", "break", "crack", "fray", "uneven"), (2, 2, 1), STRATEGIES),
            ("magnetic_tile_with_free", None, (2, 2, 2), ("naive", "cumulative", "joint")),
        ):
            spec = StreamSpec(DATASETS / "magnetic_tile", sizes, classes=classes, per_class_limit=limit)
            _, evaluation = run_stream(
                name, spec, settings, [("ours", StreamPlan(1.0))], references, recipe, work, suffix
            )
            figures.update(flat(name, evaluation))
            sections.append(markdown(evaluation, name.replace("_", " ")))

    figures.update(
        {
            "quick": args.quick,
            "image_size": size,
            "epochs": epochs,
            "replay_per_class": PER_CLASS_BUDGET,
            "reference_memory": REFERENCE_MEMORY,
            "wall_seconds": time.perf_counter() - started,
            **machine(),
        }
    )
    timing = (
        f"Update time (last step's images, replay budget {PER_CLASS_BUDGET}/class): {one:.0f} s with 1x history, "
        f"{five:.0f} s with 5x ({five / one:.2f}x)."
    )
    report = "\n\n".join([*sections, timing])
    (RESULTS_DIR / f"stream_eval{suffix}.md").write_text(report + "\n")
    print(report)
    print(write_results("stream_eval" + suffix, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
