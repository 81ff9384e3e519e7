"""What operators write and read: their labels (corrections) and the review queue's raw material (predictions).

Operator labels are appended like every label (the history is the audit trail: author, note, time); they rank
above camera and pseudo-labels when reading. Checks that need people's words (unknown class, bad names) are the
caller's; this module only stores what was decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlmodel import col

from replay_store.models import LABELS, Label, LabelSource, PredictionRow, Sample, utcnow
from replay_store.store import Store


@dataclass(frozen=True)
class OperatorLabel:
    sample_id: int
    class_name: str
    note: str = ""


def existing_sample_ids(store: Store, sample_ids: Sequence[int]) -> set[int]:
    found: set[int] = set()
    ids = sorted(set(sample_ids))
    with store.session() as session:
        for start in range(0, len(ids), 500):
            found.update(session.scalars(select(col(Sample.id)).where(col(Sample.id).in_(ids[start : start + 500]))))
    return found


def add_operator_labels(store: Store, operator_id: str, labels: Sequence[OperatorLabel]) -> list[Label]:
    """Append the labels in one transaction (new class names are created, introduced by `operator_id`); returns
    the stored rows in the order given."""
    if not labels:
        return []
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "sample_id": label.sample_id,
            "class_name": label.class_name,
            "source": LabelSource.OPERATOR.value,
            "confidence": 1.0,
            "model_version": None,
            "author": operator_id,
            "note": label.note or None,
            "created_at": now,
        }
        for label in labels
    ]
    with store.engine.begin() as connection:
        names = {label.class_name for label in labels}
        store.ensure_classes(connection, names, now, created_by=operator_id, source=LabelSource.OPERATOR.value)
        ids = list(
            connection.execute(insert(LABELS).returning(LABELS.c.id, sort_by_parameter_order=True), rows).scalars()
        )
    return [Label(id=label_id, **row) for label_id, row in zip(ids, rows, strict=True)]


def human_labels_since_time(store: Store, since: datetime | None) -> int:
    """How many operator and camera labels were made after `since` (all when None): the automatic update trigger."""
    human = (LabelSource.OPERATOR.value, LabelSource.CAMERA.value)
    query = select(func.count()).select_from(Label).where(col(Label.source).in_(human))
    if since is not None:
        query = query.where(col(Label.created_at) > since)
    with store.session() as session:
        return int(session.scalar(query) or 0)


def save_predictions(store: Store, predictions: Sequence[PredictionRow]) -> None:
    """Keep each sample's latest prediction (replacing an older one)."""
    if not predictions:
        return
    with store.session() as session:
        ids = [p.sample_id for p in predictions]
        session.execute(delete(PredictionRow).where(col(PredictionRow.sample_id).in_(ids)))
        session.add_all(predictions)
        session.commit()


def prediction_of(store: Store, sample_id: int) -> PredictionRow | None:
    with store.session() as session:
        return session.get(PredictionRow, sample_id)


def anomalous_sample_ids(store: Store, sample_ids: Sequence[int]) -> set[int]:
    """Which of these samples the inspector flagged as unlike anything known (their latest prediction)."""
    flagged: set[int] = set()
    wanted = sorted(set(sample_ids))
    with store.session() as session:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            query = select(col(PredictionRow.sample_id)).where(
                col(PredictionRow.sample_id).in_(chunk), col(PredictionRow.anomalous).is_(True)
            )
            flagged.update(int(sample_id) for sample_id in session.scalars(query))
    return flagged


def newest_prediction_sample_id(store: Store) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.max(PredictionRow.sample_id))) or 0)


def newest_sample_id(store: Store) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.max(Sample.id))) or 0)


def samples_after(store: Store, sample_id: int, limit: int) -> list[Sample]:
    """The next `limit` samples with an id above `sample_id`, in id order."""
    with store.session() as session:
        query = select(Sample).where(col(Sample.id) > sample_id).order_by(col(Sample.id)).limit(limit)
        return list(session.scalars(query))
