"""The teacher's guard for new classes: an unlabeled image whose nearest labelled image (in the teacher's embedding
space) is of a class the teacher cannot predict gets no pseudo-label (it would be filed under an old class)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention

from cl_service.learning.update import nearest_label_in


def _around(centre: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(centre + 0.1 * torch.randn((count, centre.shape[0]), generator=generator), dim=1)


def test_images_next_to_a_new_class_are_found_and_the_others_are_not() -> None:
    generator = torch.Generator().manual_seed(0)
    crack, good, pit = torch.eye(8)[:3]
    references = torch.cat([_around(crack, 10, generator), _around(good, 10, generator), _around(pit, 5, generator)])
    labels = ["crack"] * 10 + ["good"] * 10 + ["pit"] * 5
    queries = torch.cat([_around(pit, 7, generator), _around(crack, 6, generator), _around(good, 6, generator)])
    near = nearest_label_in(queries, references, labels, {"pit"})
    assert near == [True] * 7 + [False] * 12
    assert nearest_label_in(queries, references, labels, set()) == [False] * 19  # no new class: nothing held back


def test_empty_sets_and_mismatched_labels() -> None:
    references = F.normalize(torch.ones((3, 4)), dim=1)
    assert nearest_label_in(torch.empty((0, 4)), references, ["a", "b", "c"], {"a"}) == []
    assert nearest_label_in(references, torch.empty((0, 4)), [], {"a"}) == [False] * 3
    with pytest.raises(ValueError, match="3 references but 2 labels"):
        nearest_label_in(references, references, ["a", "b"], {"a"})
