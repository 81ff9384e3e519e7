"""The shared class-incremental stream protocol: one split, one step cut, one evaluation, for every strategy.

`load_split` reads every image of a `<root>/<class>/<file>` set once, drops byte-identical duplicates (sha256; the
first file in sorted path order is kept) so no image is in both train and test, and splits each class on its own
(seeded) into train and test. `incremental_steps` cuts a seeded class order into steps; `decode_all` decodes a list
of items once into a normalised tensor cache; `evaluate_model` scores a model on the test images of the seen classes
(argmax over the model's outputs for seen classes only, so a head sized to all classes is scored like a grown one);
`AccuracyMatrix` keeps `R[i][j]` (accuracy on step j's test images after training step i) and summarises it with
`cl_service.learning.metrics.stream_metrics` (average accuracy, forgetting, backward transfer).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from cl_service.learning.metrics import StreamMetrics, stream_metrics
from cl_service.learning.model import preprocess_encoded
from cl_service.learning.settings import ModelConfig
from cl_service.simulate.folder import FolderSource


class Item(NamedTuple):
    """One deduplicated image: content hash, class name, encoded bytes."""

    sha256: str
    label: str
    data: bytes


@dataclass(frozen=True)
class Split:
    """Train and test items of one set; every class is split on its own, `classes` is sorted."""

    classes: tuple[str, ...]
    train: list[Item]
    test: list[Item]
    duplicates_removed: int
    files_read: int

    def counts(self) -> dict[str, tuple[int, int]]:
        """(train, test) images per class."""
        return {c: (_count(self.train, c), _count(self.test, c)) for c in self.classes}


def _count(items: Sequence[Item], label: str) -> int:
    return sum(1 for item in items if item.label == label)


def load_split(
    root: Path | str,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    per_class_limit: int | None = None,
) -> Split:
    """Read, deduplicate (by sha256, across classes too) and split every class of `root` into train and test.

    Each class with n unique images gives round(n * test_fraction) test images (at least 1 and at most n - 1 when
    n >= 2), drawn by a generator seeded from `seed`. `classes` restricts to those (normalised) class names;
    `per_class_limit` keeps a seeded subset of that many unique images per class (for smoke runs).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    source = FolderSource(Path(root))
    wanted = tuple(source.classes) if classes is None else tuple(classes)
    unknown = sorted(set(wanted) - set(source.classes))
    if unknown:
        raise ValueError(f"{root} has no classes {unknown}; it has {list(source.classes)}")
    items = sorted(source.items(order="class_incremental"), key=lambda item: str(item.path))
    seen: set[str] = set()
    by_class: dict[str, list[Item]] = {c: [] for c in sorted(wanted)}
    duplicates = 0
    files = 0
    for folder_item in items:
        if folder_item.label not in by_class:
            continue
        data = source.read(folder_item)
        files += 1
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        by_class[folder_item.label].append(Item(digest, folder_item.label, data))
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    train: list[Item] = []
    test: list[Item] = []
    for label, members in by_class.items():
        order = rng.permutation(len(members))
        if per_class_limit is not None:
            order = order[:per_class_limit]
        n = len(order)
        n_test = round(n * test_fraction)
        if n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        test.extend(members[i] for i in order[:n_test])
        train.extend(members[i] for i in order[n_test:])
        if n == 0:
            raise ValueError(f"class {label!r} has no images")
    return Split(tuple(sorted(wanted)), train, test, duplicates, files)


def incremental_steps(classes: Sequence[str], sizes: Sequence[int] = (3, 2, 2), seed: int = 1) -> list[list[str]]:
    """A seeded permutation of `classes` cut into consecutive steps of `sizes` classes (sizes must sum to all)."""
    names = sorted(classes)
    if sum(sizes) != len(names) or any(s < 1 for s in sizes):
        raise ValueError(f"step sizes {tuple(sizes)} must be positive and sum to the {len(names)} classes")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    order = [names[i] for i in rng.permutation(len(names))]
    steps: list[list[str]] = []
    start = 0
    for size in sizes:
        steps.append(order[start : start + size])
        start += size
    return steps


@dataclass(frozen=True)
class Decoded:
    """Normalised images (N, 3, S, S) and their class names, in item order."""

    x: Tensor
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, classes: Sequence[str]) -> Decoded:
        wanted = set(classes)
        index = [i for i, label in enumerate(self.labels) if label in wanted]
        return Decoded(self.x[index], tuple(self.labels[i] for i in index))

    def targets(self, class_order: Sequence[str]) -> Tensor:
        lookup = {name: i for i, name in enumerate(class_order)}
        return torch.tensor([lookup[label] for label in self.labels], dtype=torch.long)


def decode_all(items: Sequence[Item], config: ModelConfig, *, batch_size: int = 256) -> Decoded:
    """Decode and preprocess every item once (in batches of `batch_size`)."""
    size = config.image_size
    x = torch.empty((len(items), 3, size, size), dtype=torch.float32)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        x[start : start + len(chunk)] = preprocess_encoded([item.data for item in chunk], config)
    return Decoded(x, tuple(item.label for item in items))


def concat(parts: Sequence[Decoded]) -> Decoded:
    if not parts:
        raise ValueError("nothing to concatenate")
    return Decoded(torch.cat([p.x for p in parts]), tuple(label for p in parts for label in p.labels))


@torch.no_grad()
def predict(model: torch.nn.Module, x: Tensor, allowed: Sequence[int], *, batch_size: int = 128) -> Tensor:
    """Argmax over the `allowed` output indices; returns output indices (N,)."""
    allowed_t = torch.tensor(list(allowed), dtype=torch.long)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        out.append(allowed_t[logits[:, allowed_t].argmax(dim=1)])
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate_model(
    model: Any, test_by_step: Sequence[Decoded], seen_classes: Sequence[str]
) -> tuple[float, list[float | None]]:
    """(accuracy over all test images of seen classes, per-step accuracies; None for steps with unseen classes).

    Labels are mapped through `model.classes`; predictions are restricted to the seen classes the model knows.
    Images of a seen class the model does not know (its update was rejected) count as errors.
    """
    per_step: list[float | None] = []
    correct = total = 0
    for part in test_by_step:
        if not part.labels or not set(part.labels) <= set(seen_classes):
            per_step.append(None)
            continue
        hits = int(_hits(model, part, seen_classes).sum())
        per_step.append(hits / len(part))
        correct += hits
        total += len(part)
    if total == 0:
        raise ValueError("no test images of seen classes")
    return correct / total, per_step


def per_class_accuracy(model: Any, test: Decoded, seen_classes: Sequence[str]) -> dict[str, float]:
    """Accuracy on each seen class's test images (0 for a class the model does not know)."""
    part = test.select(seen_classes)
    hits = _hits(model, part, seen_classes)
    out: dict[str, float] = {}
    for name in seen_classes:
        mask = torch.tensor([label == name for label in part.labels], dtype=torch.bool)
        if bool(mask.any()):
            out[name] = float(hits[mask].float().mean())
    return out


def _hits(model: Any, part: Decoded, seen_classes: Sequence[str]) -> Tensor:
    """Boolean (N,): the model's argmax over the seen classes it knows equals the image's class."""
    classes = list(model.classes)
    seen = set(seen_classes)
    allowed = [i for i, name in enumerate(classes) if name in seen]
    if not allowed:
        return torch.zeros(len(part), dtype=torch.bool)
    lookup = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([lookup.get(label, -1) for label in part.labels], dtype=torch.long)
    return predict(model, part.x, allowed) == targets


@dataclass
class AccuracyMatrix:
    """`rows[i][j]`: accuracy on step j's test images after training step i (None above the diagonal)."""

    steps: int
    rows: list[list[float | None]] = field(default_factory=list)
    seen_accuracy: list[float] = field(default_factory=list)  # after step i, over all seen classes' test images

    def add(self, per_step: Sequence[float | None], seen_accuracy: float) -> None:
        if len(per_step) != self.steps:
            raise ValueError(f"expected {self.steps} per-step accuracies, got {len(per_step)}")
        i = len(self.rows)
        if i >= self.steps:
            raise ValueError("the matrix is full")
        if any(per_step[j] is None for j in range(i + 1)):
            raise ValueError(f"after step {i} every step 0..{i} must have an accuracy")
        self.rows.append([per_step[j] if j <= i else None for j in range(self.steps)])
        self.seen_accuracy.append(seen_accuracy)

    def metrics(self) -> StreamMetrics:
        if len(self.rows) != self.steps:
            raise ValueError(f"{len(self.rows)} of {self.steps} steps recorded")
        return stream_metrics(self.rows)


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
    seen_accuracy: list[float] = field(default_factory=list)  # after each step, on all seen classes' test images
    per_class: dict[str, float] = field(default_factory=dict)  # final accuracy per class
    details: list[dict[str, Any]] = field(default_factory=list)  # per step, strategy-specific (ours: the update)

    @classmethod
    def of(cls, strategy: str, matrix: AccuracyMatrix, final: float, seconds: list[float], **extra: Any) -> Result:
        """A result from a full accuracy matrix (forgetting and backward transfer from its metrics)."""
        m = matrix.metrics()
        return cls(
            strategy,
            matrix.rows,
            final,
            seconds,
            m.average_accuracy,
            m.forgetting,
            m.backward_transfer,
            seen_accuracy=list(matrix.seen_accuracy),
            **extra,
        )

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
        verdicts = [d["default_gate_accepts"] for d in self.details if "default_gate_accepts" in d]
        if verdicts:
            out["default_gate_rejections"] = verdicts.count(False)
        if self.backward_transfer is not None:
            out["backward_transfer"] = self.backward_transfer
        return out


def prepare(split: Split, steps: list[list[str]], config: ModelConfig) -> StreamData:
    """Decode the split once and cut train and test into the steps' classes."""
    start = time.perf_counter()
    train_all = decode_all(split.train, config)
    test_all = decode_all(split.test, config)
    seconds = time.perf_counter() - start
    return StreamData(steps, [train_all.select(s) for s in steps], [test_all.select(s) for s in steps], split, seconds)
