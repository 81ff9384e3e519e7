"""Reference strategies for stream evaluation, on the protocol of `protocol.py` (same split, steps, backbone).

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
argmax to the seen classes, so scores compare with the grown heads of naive/cumulative. Avalanche is imported
only when one of its strategies runs (`pip install cl-service[bench]`; the import takes seconds).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cl_service.evaluation.protocol import (
    AccuracyMatrix,
    Decoded,
    Result,
    StreamData,
    concat,
    evaluate_model,
    per_class_accuracy,
)
from cl_service.learning.model import InspectionModel
from cl_service.learning.settings import ModelConfig

STRATEGIES = ("naive", "cumulative", "joint", "replay", "der")


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


def _finish(
    strategy: str,
    model: InspectionModel,
    stream: StreamData,
    matrix: AccuracyMatrix,
    final: float,
    seconds: list[float],
) -> Result:
    per_class = per_class_accuracy(model, concat(stream.test), stream.class_order)
    return Result.of(strategy, matrix, final, seconds, per_class=per_class)


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
        matrix.add(per_step, final)
    return _finish("cumulative" if cumulative else "naive", model, stream, matrix, final, seconds)


def run_joint(stream: StreamData, recipe: Recipe) -> Result:
    """One model on every class at once; the matrix holds its single row of per-step accuracies."""
    generator = torch.Generator().manual_seed(recipe.seed)
    model = _new_model(recipe, stream.class_order)
    start = time.perf_counter()
    _fit(model, concat(stream.train), recipe, generator)
    seconds = time.perf_counter() - start
    final, per_step = evaluate_model(model, stream.test, stream.class_order)
    per_class = per_class_accuracy(model, concat(stream.test), stream.class_order)
    return Result("joint", [per_step], final, [seconds], seen_accuracy=[final], per_class=per_class)


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
        matrix.add(per_step, final)
    return _finish(method, model, stream, matrix, final, seconds)


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
