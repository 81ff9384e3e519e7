"""The stream protocol (cl_service.evaluation.protocol): dedupe, stratified split, step cut, evaluation bookkeeping."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from cl_service.evaluation.protocol import (
    AccuracyMatrix,
    Decoded,
    evaluate_model,
    incremental_steps,
    load_split,
    per_class_accuracy,
)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color=value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes of 10, 20 and 5 distinct images; class 'b' also holds 3 byte copies of its own images."""
    value = 0
    for name, count in (("a", 10), ("b", 20), ("c", 5)):
        (tmp_path / name).mkdir()
        for k in range(count):
            (tmp_path / name / f"{k:03d}.png").write_bytes(_png(value))
            value += 1
    for k in range(3):
        (tmp_path / "b" / f"copy{k}.png").write_bytes((tmp_path / "b" / f"{k:03d}.png").read_bytes())
    (tmp_path / "README.md").write_text("not an image")
    return tmp_path


def test_duplicates_are_removed_and_counted(folder: Path) -> None:
    split = load_split(folder)
    assert split.files_read == 38
    assert split.duplicates_removed == 3
    everything = split.train + split.test
    assert len(everything) == 35
    assert len({item.sha256 for item in everything}) == 35


def test_split_is_stratified_disjoint_and_seeded(folder: Path) -> None:
    split = load_split(folder, test_fraction=0.3, seed=0)
    assert split.classes == ("a", "b", "c")
    assert split.counts() == {"a": (7, 3), "b": (14, 6), "c": (3, 2)}  # round(1.5) == 2
    assert not {i.sha256 for i in split.train} & {i.sha256 for i in split.test}
    again = load_split(folder, test_fraction=0.3, seed=0)
    assert [i.sha256 for i in again.test] == [i.sha256 for i in split.test]
    other = load_split(folder, test_fraction=0.3, seed=1)
    assert [i.sha256 for i in other.test] != [i.sha256 for i in split.test]


def test_class_filter_and_limit(folder: Path) -> None:
    split = load_split(folder, classes=["c", "a"], per_class_limit=4)
    assert split.classes == ("a", "c")
    assert split.counts() == {"a": (3, 1), "c": (3, 1)}
    with pytest.raises(ValueError, match="no classes"):
        load_split(folder, classes=["zzz"])


def test_incremental_steps() -> None:
    classes = [f"k{i}" for i in range(7)]
    steps = incremental_steps(classes, (3, 2, 2), seed=1)
    assert [len(s) for s in steps] == [3, 2, 2]
    assert sorted(c for s in steps for c in s) == classes
    assert steps == incremental_steps(list(reversed(classes)), (3, 2, 2), seed=1)  # input order does not matter
    assert steps != incremental_steps(classes, (3, 2, 2), seed=2)
    with pytest.raises(ValueError):
        incremental_steps(classes, (3, 3))


class _Fixed(torch.nn.Module):
    """Predicts the class whose index is written in the first pixel; `classes` as an InspectionModel has."""

    def __init__(self, classes: list[str]) -> None:
        super().__init__()
        self.classes = tuple(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), len(self.classes)).float()


def _decoded(indices: list[int], labels: list[str]) -> Decoded:
    x = torch.zeros((len(indices), 3, 2, 2))
    x[:, 0, 0, 0] = torch.tensor(indices, dtype=torch.float32)
    return Decoded(x, tuple(labels))


def test_evaluate_model_restricts_to_seen_and_fills_the_matrix() -> None:
    model = _Fixed(["a", "b", "c", "d"])
    step0 = _decoded([0, 1, 1, 1], ["a", "a", "b", "b"])  # 3 of 4 right
    step1 = _decoded([2, 3], ["c", "d"])
    overall, per_step = evaluate_model(model, [step0, step1], ["a", "b"])
    assert per_step == [0.75, None]
    assert overall == 0.75
    # an unseen class's output is never predicted: index 2 on a seen-only model falls back among a, b
    overall, per_step = evaluate_model(model, [_decoded([2], ["a"])], ["a", "b"])
    assert per_step == [1.0]  # logits of a, b tie at 0: the first seen class, "a"
    assert per_class_accuracy(model, step0, ["a", "b"]) == {"a": 0.5, "b": 1.0}
    # a seen class the model does not know (its update was rejected) counts as wrong, never as an error
    narrow = _Fixed(["a", "b"])
    new = _decoded([0, 1], ["c", "d"])
    overall, per_step = evaluate_model(narrow, [step0, new], ["a", "b", "c", "d"])
    assert per_step == [0.75, 0.0]
    assert overall == pytest.approx(3 / 6)
    assert per_class_accuracy(narrow, new, ["a", "b", "c", "d"]) == {"c": 0.0, "d": 0.0}
    matrix = AccuracyMatrix(2)
    matrix.add([1.0, None], 1.0)
    matrix.add([0.5, 1.0], 0.75)
    assert matrix.seen_accuracy == [1.0, 0.75]
    m = matrix.metrics()
    assert m.forgetting == pytest.approx(0.5)
    assert m.backward_transfer == pytest.approx(-0.5)
    assert m.final_accuracy == pytest.approx(0.75)
