"""The fixed validation split: by content hash, capped per class without ever pulling a trained image back."""

from __future__ import annotations

import hashlib

from cl_service.learning.data import in_validation, split_validation
from replay_store.store import SnapshotRow


def _rows(label: str, start: int, count: int) -> list[SnapshotRow]:
    return [
        SnapshotRow(i, hashlib.sha256(f"{label}-{i}".encode()).hexdigest(), "cam", label, None, i)
        for i in range(start, start + count)
    ]


def test_the_split_follows_the_hash_and_the_cap_keeps_the_smallest_keys() -> None:
    rows = _rows("a", 0, 400) + _rows("b", 1000, 50)
    train, validation = split_validation(rows, 0.2)
    assert {r.sample_id for r in validation} == {r.sample_id for r in rows if in_validation(r.sha256, 0.2)}
    assert len(train) + len(validation) == len(rows)
    assert 50 <= sum(r.label == "a" for r in validation) <= 110  # about 20% of 400

    capped_train, capped = split_validation(rows, 0.2, max_per_class=30)
    assert sum(r.label == "a" for r in capped) == 30
    assert {r.sample_id for r in capped if r.label == "b"} == {r.sample_id for r in validation if r.label == "b"}
    assert {r.sample_id for r in capped} <= {r.sample_id for r in validation}
    assert len(capped_train) + len(capped) == len(rows)


def test_growing_history_never_moves_a_trained_image_back_into_validation() -> None:
    rows = _rows("a", 0, 300)
    train_before, _ = split_validation(rows, 0.2, max_per_class=25)
    grown = rows + _rows("a", 300, 2000)
    _, validation_after = split_validation(grown, 0.2, max_per_class=25)
    assert len(validation_after) == 25
    assert not {r.sample_id for r in train_before} & {r.sample_id for r in validation_after}
