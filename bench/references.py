"""Reference strategies for the class-incremental stream benchmark, on the protocol of `_stream_protocol.py`.

Every strategy uses the same split, step cut, backbone and recipe: `InspectionModel` (ImageNet-pretrained
tf_efficientnet_lite0, 96x96), `epochs` per step (4), Adam lr 1e-3 (a fresh optimiser per step), batch 32, CPU.

- `naive`: fine-tune on each step's data only, the head grown with the step's classes (the floor).
- `cumulative`: at each step train on all data seen so far, starting from the previous step's model (head grown).
- `joint`: one model trained on all classes' training data at once; only its final accuracy is reported.
- `replay`: Avalanche `Naive` + `ReplayPlugin(mem_size)`.
- `der`: Avalanche `DER(mem_size, alpha=0.1, beta=0.5)`.

The Avalanche strategies run on `avalanche.benchmarks.tensors_benchmark` built from the same decoded tensors, with
a FIXED head sized to all classes (in step order): DER distils stored logits with an MSE that needs the logit width
to stay constant, and Replay gets the same head so the two differ only in the method. Evaluation restricts the
argmax to the seen classes, so scores compare with the grown heads of naive/cumulative.

    python bench/references.py                      # every strategy; writes bench/results/references.json
    python bench/references.py --strategy naive --quick   # one strategy, smoke size; prints JSON only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine, markdown_table, write_results
from _stream_protocol import (
    AccuracyMatrix,
    Decoded,
    Split,
    concat,
    decode_all,
    evaluate_model,
    incremental_steps,
    load_split,
)

from cl_service.learning.model import InspectionModel, ModelConfig
from cl_service.simulate.folder import FolderSource

STRATEGIES = ("naive", "cumulative", "joint", "replay", "der")
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "xsdd"


@dataclass(frozen=True)
class Recipe:
    image_size: int = 96
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    mem_size: int = 200
    der_alpha: float = 0.1
    der_beta: float = 0.5
    seed: int = 0
    threads: int = 2


@dataclass
class StreamData:
    """The decoded split, cut into steps: `train[j]` / `test[j]` hold step j's classes only."""

    steps: list[list[str]]
    train: list[Decoded]
    test: list[Decoded]
    split: Split
    decode_seconds: float

    @property
    def class_order(self) -> list[str]:
        return [c for step in self.steps for c in step]


@dataclass
class Result:
    strategy: str
    accuracy_matrix: list[list[float | None]]
    final_accuracy: float  # over all test images of the seen (= all) classes after the last step
    step_seconds: list[float]
    average_accuracy: list[float] = field(default_factory=list)
    forgetting: float | None = None
    backward_transfer: float | None = None

    def figures(self) -> dict[str, float | int | str | bool]:
        out: dict[str, float | int | str | bool] = {
            "strategy": self.strategy,
            "final_accuracy": self.final_accuracy,
            "train_seconds": sum(self.step_seconds),
        }
        for i, seconds in enumerate(self.step_seconds):
            out[f"step{i}_seconds"] = seconds
        for i, row in enumerate(self.accuracy_matrix):
            for j, value in enumerate(row):
                if value is not None:
                    out[f"R_{i}_{j}"] = value
        if self.average_accuracy:
            out["average_accuracy_final"] = self.average_accuracy[-1]
            out["average_incremental_accuracy"] = sum(self.average_accuracy) / len(self.average_accuracy)
        if self.forgetting is not None:
            out["forgetting"] = self.forgetting
        if self.backward_transfer is not None:
            out["backward_transfer"] = self.backward_transfer
        return out


def prepare(
    root: Path,
    recipe: Recipe,
    *,
    sizes: Sequence[int] = (3, 2, 2),
    classes: Sequence[str] | None = None,
    per_class_limit: int | None = None,
) -> StreamData:
    split = load_split(root, seed=recipe.seed, classes=classes, per_class_limit=per_class_limit)
    steps = incremental_steps(split.classes, sizes)
    config = ModelConfig(image_size=recipe.image_size)
    start = time.perf_counter()
    train_all = decode_all(split.train, config)
    test_all = decode_all(split.test, config)
    seconds = time.perf_counter() - start
    return StreamData(steps, [train_all.select(s) for s in steps], [test_all.select(s) for s in steps], split, seconds)


def _new_model(recipe: Recipe, classes: Sequence[str]) -> InspectionModel:
    torch.manual_seed(recipe.seed)
    return InspectionModel(ModelConfig(image_size=recipe.image_size), list(classes))


def _fit(model: InspectionModel, data: Decoded, recipe: Recipe, generator: torch.Generator) -> None:
    """Plain supervised training: fresh Adam, `epochs` shuffled passes in mini-batches."""
    targets = data.targets(model.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            if len(index) < 2:  # BatchNorm cannot train on a single image
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(data.x[index]), targets[index])
            loss.backward()
            optimizer.step()
    model.eval()


def _finish(strategy: str, matrix: AccuracyMatrix, final: float, seconds: list[float]) -> Result:
    m = matrix.metrics()
    return Result(strategy, matrix.rows, final, seconds, m.average_accuracy, m.forgetting, m.backward_transfer)


def run_finetune(stream: StreamData, recipe: Recipe, *, cumulative: bool) -> Result:
    """`naive` (cumulative=False) or `cumulative`: our own loop, head grown at each step."""
    generator = torch.Generator().manual_seed(recipe.seed)
    model = _new_model(recipe, stream.steps[0])
    matrix = AccuracyMatrix(len(stream.steps))
    seconds: list[float] = []
    final = 0.0
    for i, step in enumerate(stream.steps):
        start = time.perf_counter()
        if i > 0:
            model.grow(step)
        data = concat(stream.train[: i + 1]) if cumulative else stream.train[i]
        _fit(model, data, recipe, generator)
        seconds.append(time.perf_counter() - start)
        seen = [c for s in stream.steps[: i + 1] for c in s]
        final, per_step = evaluate_model(model, stream.test, seen)
        matrix.add(per_step)
    return _finish("cumulative" if cumulative else "naive", matrix, final, seconds)


def run_joint(stream: StreamData, recipe: Recipe) -> Result:
    """One model on every class at once; the matrix holds its single row of per-step accuracies."""
    generator = torch.Generator().manual_seed(recipe.seed)
    model = _new_model(recipe, stream.class_order)
    start = time.perf_counter()
    _fit(model, concat(stream.train), recipe, generator)
    seconds = time.perf_counter() - start
    final, per_step = evaluate_model(model, stream.test, stream.class_order)
    return Result("joint", [per_step], final, [seconds])


def run_avalanche(stream: StreamData, recipe: Recipe, *, method: str) -> Result:
    """`replay` or `der` through Avalanche 0.6's strategy API on a tensors benchmark of the same tensors."""
    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.supervised import DER, Naive

    order = stream.class_order
    benchmark = tensors_benchmark(
        train_tensors=[(d.x, d.targets(order)) for d in stream.train],
        test_tensors=[(d.x, d.targets(order)) for d in stream.test],
        task_labels=[0] * len(stream.steps),
    )
    model = _new_model(recipe, order)  # fixed head over all classes, see the module docstring
    torch.manual_seed(recipe.seed)
    common: dict[str, Any] = {
        "model": model,
        "optimizer": torch.optim.Adam(model.parameters(), lr=recipe.lr),
        "criterion": nn.CrossEntropyLoss(),
        "train_mb_size": recipe.batch_size,
        "train_epochs": recipe.epochs,
        "eval_mb_size": 128,
        "device": "cpu",
        "evaluator": EvaluationPlugin(loggers=[]),
    }
    if method == "replay":
        strategy: Any = Naive(plugins=[ReplayPlugin(mem_size=recipe.mem_size)], **common)
    elif method == "der":
        strategy = DER(mem_size=recipe.mem_size, alpha=recipe.der_alpha, beta=recipe.der_beta, **common)
    else:
        raise ValueError(f"unknown Avalanche method {method!r}")
    matrix = AccuracyMatrix(len(stream.steps))
    seconds: list[float] = []
    final = 0.0
    for i, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience)
        seconds.append(time.perf_counter() - start)
        seen = [c for s in stream.steps[: i + 1] for c in s]
        final, per_step = evaluate_model(model, stream.test, seen)
        matrix.add(per_step)
    return _finish(method, matrix, final, seconds)


def run(strategy: str, stream: StreamData, recipe: Recipe) -> Result:
    torch.set_num_threads(recipe.threads)
    if strategy == "naive":
        return run_finetune(stream, recipe, cumulative=False)
    if strategy == "cumulative":
        return run_finetune(stream, recipe, cumulative=True)
    if strategy == "joint":
        return run_joint(stream, recipe)
    if strategy in ("replay", "der"):
        return run_avalanche(stream, recipe, method=strategy)
    raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=STRATEGIES, help="one strategy (prints JSON); default: all, written")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--quick", action="store_true", help="smoke: 2 classes/step, 20 images/class, 1 epoch, 32px")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--mem-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.quick:
        recipe = Recipe(image_size=args.image_size or 32, epochs=args.epochs or 1, mem_size=args.mem_size)
        classes = FolderSource(args.dataset).classes[:6]
        sizes, limit = (2, 2, 2), 20
    else:
        recipe = Recipe(image_size=args.image_size or 96, epochs=args.epochs or 4, mem_size=args.mem_size)
        classes, sizes, limit = None, (3, 2, 2), None
    recipe = Recipe(**{**asdict(recipe), "seed": args.seed})
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    stream = prepare(args.dataset, recipe, sizes=sizes, classes=classes, per_class_limit=limit)
    if args.strategy:
        result = run(args.strategy, stream, recipe)
        print(json.dumps({"recipe": asdict(recipe), "steps": stream.steps, **asdict(result)}, indent=2))
        return 0
    results = [run(strategy, stream, recipe) for strategy in STRATEGIES]
    figures: dict[str, float | int | str | bool] = {
        f"{result.strategy}_{key}": value
        for result in results
        for key, value in result.figures().items()
        if key != "strategy"
    }
    figures.update(
        {
            "quick": args.quick,
            "wall_seconds": time.perf_counter() - start,
            "epochs": recipe.epochs,
            "image_size": recipe.image_size,
            "mem_size": recipe.mem_size,
            "steps": " | ".join(",".join(s) for s in stream.steps),
            "train_images": len(stream.split.train),
            "test_images": len(stream.split.test),
            "duplicates_removed": stream.split.duplicates_removed,
            **machine(),
        }
    )
    header = ["strategy", "final accuracy", "forgetting (points)", "training seconds"]
    rows = [
        [
            r.strategy,
            f"{r.final_accuracy:.1%}",
            "" if r.forgetting is None else f"{100 * r.forgetting:.1f}",
            f"{sum(r.step_seconds):.0f}",
        ]
        for r in results
    ]
    print(markdown_table(header, rows))
    print(write_results("references" + ("_quick" if args.quick else ""), figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
