"""How an update composes its training batches: at least `min_steps` steps, and new labels of one class get that
class's share of a batch beside the replayed old classes (not a whole batch of their own)."""

from __future__ import annotations

from typing import Any

import torch

from cl_service.learning.data import ImageTensors, balanced_batches
from cl_service.learning.ewc import OnlineEWC
from cl_service.learning.model import InspectionModel
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.learning.update import _batch_share, _Set, _train

CONFIG = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")


def _set(targets: list[int]) -> _Set:
    images = torch.randint(0, 256, (len(targets), 3, 32, 32), dtype=torch.uint8)
    return _Set([], images, torch.tensor(targets, dtype=torch.long), logits=[None] * len(targets))


def test_labels_of_one_new_class_get_its_share_of_the_batch() -> None:
    new = _set([2] * 30)
    replay = _set([0] * 10 + [1] * 10)
    none = _set([])
    assert _batch_share(new, [new, none, replay], 30) == 10  # one class of three
    labels = _set([0, 1, 2] * 10)
    assert _batch_share(labels, [labels, none, replay], 30) == 30  # the labels cover every class
    assert _batch_share(new, [new, none, none], 30) == 30  # cold start: nothing replayed
    one, many = _set([2]), _set(list(range(2)) * 40 + list(range(2, 80)))
    assert _batch_share(one, [one, none, many], 32) == 1  # at least one


def test_pseudo_labels_of_the_new_classes_get_their_share_too() -> None:
    new, replay = _set([3] * 8), _set([0] * 10 + [1] * 10 + [2] * 10)
    pseudo = _set([3] * 60 + [4] * 20 + [0] * 2)  # propagated labels of the new classes, two of the teacher's
    parts = [new, pseudo, replay]
    assert _batch_share(pseudo, parts, 30) == 18  # three classes of five
    assert _batch_share(new, parts, 30) == 6  # one class of five: class 4 came by pseudo-labels alone


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
    settings = UpdateSettings(
        classifier="trained", model=CONFIG, epochs=2, min_steps=7, batch_size=12, lwf_weight=0.0, threads=1
    )
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


def test_balanced_batches_even_out_classes_and_plain_ones_follow_the_data() -> None:
    labels = [0] * 90 + [1] * 10
    drawn = {
        balanced: torch.cat(list(balanced_batches(labels, 50, 40, torch.Generator().manual_seed(0), balanced)))
        for balanced in (True, False)
    }
    share_of_rare = {balanced: float((drawn[balanced] >= 90).float().mean()) for balanced in drawn}
    assert 0.45 < share_of_rare[True] < 0.55  # balanced: half the draws from the 10 rare images
    assert 0.07 < share_of_rare[False] < 0.13  # plain: about their 10%
