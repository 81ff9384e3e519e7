"""How an update composes its training batches: at least `min_steps` steps, and new labels of one class get that
class's share of a batch beside the replayed old classes (not a whole batch of their own)."""

from __future__ import annotations

from typing import Any

import torch

from cl_service.learning.data import ImageTensors
from cl_service.learning.ewc import OnlineEWC
from cl_service.learning.model import InspectionModel
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.learning.update import _labeled_batch_size, _Set, _train

CONFIG = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")


def _set(targets: list[int]) -> _Set:
    images = torch.randint(0, 256, (len(targets), 3, 32, 32), dtype=torch.uint8)
    return _Set([], images, torch.tensor(targets, dtype=torch.long), logits=[None] * len(targets))


def test_labels_of_one_new_class_get_its_share_of_the_batch() -> None:
    new = _set([2] * 30)
    replay = _set([0] * 10 + [1] * 10)
    assert _labeled_batch_size(new, replay, 30) == 10  # one class of three
    assert _labeled_batch_size(_set([0, 1, 2] * 10), replay, 30) == 30  # the labels cover every class
    assert _labeled_batch_size(new, _set([]), 30) == 30  # cold start: nothing replayed
    assert _labeled_batch_size(_set([2]), _set(list(range(2)) * 40 + list(range(2, 80))), 32) == 1  # at least one


def test_an_update_on_a_few_new_labels_still_takes_min_steps_steps() -> None:
    torch.manual_seed(0)
    model = InspectionModel(CONFIG, ["a", "b", "c"])
    sizes: list[list[int]] = []
    forward = model.forward_features_and_logits

    def recording(batch: torch.Tensor) -> Any:
        sizes.append([len(batch)])
        return forward(batch)

    model.forward_features_and_logits = recording  # type: ignore[method-assign]
    steps: list[int] = []
    settings = UpdateSettings(model=CONFIG, epochs=2, min_steps=7, batch_size=12, lwf_weight=0.0, threads=1)
    labeled, replay = _set([2] * 12), _set([0] * 6 + [1] * 6)
    _train(
        model,
        None,
        labeled,
        _set([]),
        replay,
        OnlineEWC(),
        ImageTensors(None, CONFIG),  # type: ignore[arg-type]  # only normalise() is used
        settings,
        torch.Generator().manual_seed(0),
        lambda stage, step, total, values: steps.append(step),
    )
    # 12 labels in batches of 4 (a third of 12) are 3 steps per epoch, 6 in two epochs: min_steps raises it to 7
    assert steps == list(range(1, 8))
    assert sizes == [[4 + 12]] * 7  # 4 labeled + 12 replayed per step
