"""The teacher's guard for new classes: an unlabeled image whose nearest labelled image (in the teacher's embedding
space) is of a class the teacher cannot predict gets no pseudo-label from the teacher (it would be filed under an old
class); when its k nearest labelled images agree, it takes their label instead (label propagation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention

from cl_service.learning.update import near_new_labels


def _around(centre: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(centre + 0.1 * torch.randn((count, centre.shape[0]), generator=generator), dim=1)


def test_images_next_to_a_new_class_are_found_and_take_its_label() -> None:
    generator = torch.Generator().manual_seed(0)
    crack, good, pit = torch.eye(8)[:3]
    references = torch.cat([_around(crack, 10, generator), _around(good, 10, generator), _around(pit, 5, generator)])
    labels = ["crack"] * 10 + ["good"] * 10 + ["pit"] * 5
    queries = torch.cat([_around(pit, 7, generator), _around(crack, 6, generator), _around(good, 6, generator)])
    found = near_new_labels(queries, references, labels, {"pit"}, k=3)
    assert [f is not None for f in found] == [True] * 7 + [False] * 12
    assert all(f.label == "pit" and f.agreed and 0.8 < f.similarity <= 1.0 for f in found[:7] if f)
    assert near_new_labels(queries, references, labels, set(), k=3) == [None] * 19  # no new class: nothing held back
    off = near_new_labels(queries, references, labels, {"pit"}, k=0)  # propagation off: held back, never labelled
    assert [f is not None and not f.agreed and f.similarity == 0.0 for f in off] == [True] * 7 + [False] * 12


def test_an_image_between_classes_is_held_back_but_not_labelled() -> None:
    # nearest is a pit, the next two are cracks: not the teacher's to label, and no agreement to take a label from
    references = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.5], [0.9, 0.55], [0.0, 1.0]]), dim=1)
    labels = ["pit", "crack", "crack", "good"]
    query = F.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    (found,) = near_new_labels(query, references, labels, {"pit"}, k=3)
    assert found is not None and found.label == "pit" and not found.agreed
    (alone,) = near_new_labels(query, references, labels, {"pit"}, k=1)
    assert alone is not None and alone.agreed  # k = 1: the nearest alone decides
    (few,) = near_new_labels(query, references[:2], labels[:2], {"pit"}, k=3)
    assert few is not None and not few.agreed  # fewer references than k: no agreement


def test_empty_sets_and_mismatched_labels() -> None:
    references = F.normalize(torch.ones((3, 4)), dim=1)
    assert near_new_labels(torch.empty((0, 4)), references, ["a", "b", "c"], {"a"}, k=3) == []
    assert near_new_labels(references, torch.empty((0, 4)), [], {"a"}, k=3) == [None] * 3
    with pytest.raises(ValueError, match="3 references but 2 labels"):
        near_new_labels(references, references, ["a", "b"], {"a"}, k=3)
