"""Validation metrics, stream (class-incremental) metrics and the validation gate's decision. numpy only.

- `evaluate`: accuracy, macro-F1, per-class accuracy (recall), precision, F1 and support, confusion matrix.
  Macro-F1 averages over the classes present in `y_true` only: a class without validation images has no defined
  recall, and counting it as 0 (or skipping it only when nothing predicts it, as scikit-learn's default does) would
  move the score with the class list instead of with the model. This equals
  `sklearn.metrics.f1_score(y_true, y_pred, labels=<classes present>, average="macro", zero_division=0)`.
- `stream_metrics`: average accuracy, average forgetting (Chaudhry et al., ECCV 2018, "Riemannian Walk") and backward
  transfer (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory") from an accuracy matrix.
- `compare`: the gate: a candidate is rejected when an old class with enough validation images, or overall macro-F1,
  drops by more than the tolerance against the live model scored on the same images.

Everything is JSON-serialisable through `to_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
Labels = Sequence[int] | Sequence[str] | npt.NDArray[Any]


@dataclass(frozen=True)
class ClassMetrics:
    """One class: `accuracy` is its recall (correct / support); None where undefined (no images, no predictions)."""

    support: int
    accuracy: float | None
    precision: float | None
    f1: float | None


@dataclass(frozen=True)
class Metrics:
    """Scores of one model on one validation set; `confusion[i][j]` counts true class i predicted as class j."""

    classes: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        return cls(
            classes=[str(c) for c in data["classes"]],
            n=int(data["n"]),
            accuracy=float(data["accuracy"]),
            macro_f1=float(data["macro_f1"]),
            per_class={str(k): ClassMetrics(**v) for k, v in data["per_class"].items()},
            confusion=[[int(v) for v in row] for row in data["confusion"]],
        )


def _as_indices(labels: Labels, classes: Sequence[str], what: str) -> I64:
    values = np.asarray(labels)
    if values.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind in "US":
        lookup = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in values} - lookup.keys())
        if unknown:
            raise ValueError(f"{what} names classes not in the class list: {unknown}")
        return np.array([lookup[str(v)] for v in values], dtype=np.int64)
    if values.size and values.dtype.kind not in "iu":
        raise ValueError(f"{what} must be class indices or class names, got dtype {values.dtype}")
    indices = values.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(classes)):
        raise ValueError(f"{what} holds class indices outside 0..{len(classes) - 1}")
    return indices


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def evaluate(y_true: Labels, y_pred: Labels, classes: Sequence[str]) -> Metrics:
    """Score predictions against the truth; labels are indices into `classes` or class names."""
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    truth, pred = _as_indices(y_true, classes, "y_true"), _as_indices(y_pred, classes, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {truth.shape[0]} vs {pred.shape[0]}")
    if truth.size == 0:
        raise ValueError("nothing to evaluate: y_true is empty")
    k = len(classes)
    confusion = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    correct = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    per_class: dict[str, ClassMetrics] = {}
    f1_present: list[float] = []
    for i, name in enumerate(classes):
        recall = _ratio(correct[i], support[i])
        precision = _ratio(correct[i], predicted[i])
        f1 = _ratio(2 * correct[i], support[i] + predicted[i])  # = 2PR/(P+R), and 0 when nothing is right
        per_class[name] = ClassMetrics(int(support[i]), recall, precision, f1)
        if support[i] > 0:
            f1_present.append(f1 if f1 is not None else 0.0)
    return Metrics(
        classes=classes,
        n=int(truth.size),
        accuracy=float(correct.sum() / truth.size),
        macro_f1=float(np.mean(f1_present)),
        per_class=per_class,
        confusion=confusion.tolist(),
    )


# -- stream metrics -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamMetrics:
    """Class-incremental summary of an accuracy matrix `R[i][j]` (accuracy on step j's classes after step i).

    `average_accuracy[i]` is the mean of `R[i][0..i]`; `final_accuracy` its last value. `forgetting` (Chaudhry et al.)
    is the mean over old steps j < T-1 of `max_{j <= l < T-1} R[l][j] - R[T-1][j]`; `backward_transfer` (Lopez-Paz &
    Ranzato) the mean over j < T-1 of `R[T-1][j] - R[j][j]`. Both are None with a single step. Entries above the
    diagonal (steps not yet trained) are ignored.
    """

    average_accuracy: list[float]
    final_accuracy: float
    forgetting: float | None
    backward_transfer: float | None
    per_step_forgetting: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stream_metrics(accuracy_matrix: Sequence[Sequence[float | None]] | npt.NDArray[Any]) -> StreamMetrics:
    """Average accuracy, forgetting and backward transfer; see `StreamMetrics`."""
    rows = [list(row) for row in accuracy_matrix]
    steps = len(rows)
    if steps == 0 or any(len(row) != steps for row in rows):
        raise ValueError("the accuracy matrix must be square and non-empty")
    r = np.full((steps, steps), np.nan)
    for i in range(steps):
        for j in range(i + 1):
            value = rows[i][j]
            if value is None or not np.isfinite(value):
                raise ValueError(f"R[{i}][{j}] must be a finite number (step {j} was trained by step {i})")
            r[i, j] = float(value)
    average = [float(r[i, : i + 1].mean()) for i in range(steps)]
    if steps == 1:
        return StreamMetrics(average, average[-1], None, None, [])
    last = steps - 1
    per_step = [float(r[j:last, j].max() - r[last, j]) for j in range(last)]
    bwt = float(np.mean([r[last, j] - r[j, j] for j in range(last)]))
    return StreamMetrics(average, average[-1], float(np.mean(per_step)), bwt, per_step)


# -- the gate --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """Accepted or not; `reasons` say why a candidate was rejected, `notes` what else was checked or skipped."""

    accepted: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _points(value: float) -> str:
    return f"{100.0 * value:.1f}"


@dataclass(frozen=True)
class Flips:
    """Paired outcome of one class's validation images: live right and candidate wrong, and the reverse."""

    worse: int
    better: int

    def p_worse(self) -> float:
        """One-sided exact sign test (McNemar): P(at least `worse` of the changed images go against the candidate
        if a change were as likely either way). Small: the candidate really is worse on this class."""
        n = self.worse + self.better
        return sum(math.comb(n, k) for k in range(self.worse, n + 1)) / 2.0**n if n else 1.0


def paired_changes(
    y_true: Labels, live_pred: Labels, candidate_pred: Labels, classes: Sequence[str]
) -> dict[str, Flips]:
    """Per true class, the images only the live model got right (worse) and only the candidate got right (better)."""
    classes = [str(c) for c in classes]
    truth = _as_indices(y_true, classes, "y_true")
    live_idx = _as_indices(live_pred, classes, "live_pred")
    cand_idx = _as_indices(candidate_pred, classes, "candidate_pred")
    if not truth.shape == live_idx.shape == cand_idx.shape:
        raise ValueError("y_true, live_pred and candidate_pred differ in length")
    live, cand = live_idx == truth, cand_idx == truth
    return {
        name: Flips(int((live & ~cand & (truth == i)).sum()), int((cand & ~live & (truth == i)).sum()))
        for i, name in enumerate(classes)
    }


def _misread(metrics: Metrics, name: str) -> str:
    """Where `metrics` put the images of class `name` it got wrong: '; misread as pit 6, good 2'."""
    row = metrics.confusion[metrics.classes.index(name)]
    wrong = sorted(
        ((n, metrics.classes[j]) for j, n in enumerate(row) if n and j != metrics.classes.index(name)),
        key=lambda pair: (-pair[0], pair[1]),
    )
    return "; misread as " + ", ".join(f"{c} {n}" for n, c in wrong) if wrong else ""


def compare(
    candidate: Metrics,
    live: Metrics,
    *,
    old_classes: Sequence[str] | None = None,
    tolerance: float = 0.02,
    min_support: int = 10,
    changes: Mapping[str, Flips] | None = None,
    significance: float = 0.0,
) -> GateDecision:
    """Gate a candidate against the live model, both scored on the same validation images.

    Rejects when an old class (default: every class of `live`) with at least `min_support` images loses more than
    `tolerance` accuracy (0.02 = 2 points), when an old class is missing from the candidate, or when macro-F1 drops by
    more than `tolerance`. Score both models with the same class list (the candidate's: the live model simply never
    predicts the new classes); differing supports mean different images, a ValueError.

    With `changes` (from `paired_changes`) and `significance` > 0, a class's drop beyond the tolerance rejects only
    when it is also unlikely to be chance: the one-sided sign test over the images whose outcome changed gives
    p <= `significance`. On 50 images one image is 2 points; without the test a 2-point gate rejects on noise.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if not 0.0 <= significance < 1.0:
        raise ValueError(f"significance must be in [0, 1), got {significance}")
    if candidate.n != live.n:
        raise ValueError(f"candidate and live were scored on different images: n={candidate.n} vs n={live.n}")
    olds = list(live.classes) if old_classes is None else [str(c) for c in old_classes]
    reasons: list[str] = []
    notes: list[str] = []
    eps = 1e-12  # a drop of exactly the tolerance passes, whatever the float rounding
    for name in olds:
        if name not in candidate.per_class:
            reasons.append(f"old class '{name}' is missing from the candidate's classes")
            continue
        cand = candidate.per_class[name]
        ref = live.per_class.get(name)
        support = cand.support
        if ref is not None and ref.support != support:
            raise ValueError(f"class '{name}' has {support} images for the candidate but {ref.support} for live")
        if support < min_support or cand.accuracy is None:
            notes.append(f"class '{name}' not gated: {support} validation images < min_support {min_support}")
            continue
        live_acc = ref.accuracy if ref is not None and ref.accuracy is not None else 0.0
        drop = live_acc - cand.accuracy
        if drop > tolerance + eps:
            what = (
                f"class '{name}': accuracy {_points(live_acc)}% -> {_points(cand.accuracy)}% "
                f"(-{_points(drop)} points > tolerance {_points(tolerance)}, n={support}"
            )
            flips = None if changes is None or significance <= 0 else changes.get(name)
            if flips is None:
                reasons.append(f"{what}{_misread(candidate, name)})")
            elif (p := flips.p_worse()) <= significance:
                reasons.append(
                    f"{what}; {flips.worse} worse, {flips.better} better: p={p:.3g} <= {significance:g}"
                    f"{_misread(candidate, name)})"
                )
            else:
                notes.append(
                    f"{what}; but {flips.worse} worse, {flips.better} better: p={p:.3g} > {significance:g}, "
                    "within chance)"
                )
    f1_drop = live.macro_f1 - candidate.macro_f1
    summary = (
        f"macro-F1 {_points(live.macro_f1)}% -> {_points(candidate.macro_f1)}%, "
        f"accuracy {_points(live.accuracy)}% -> {_points(candidate.accuracy)}% (n={candidate.n})"
    )
    if f1_drop > tolerance + eps:
        reasons.append(f"{summary}: macro-F1 -{_points(f1_drop)} points > tolerance {_points(tolerance)}")
    else:
        notes.append(summary)
    return GateDecision(accepted=not reasons, reasons=reasons, notes=notes)
