"""The operator loop's core: corrections (operator labels) and the review queue.

A correction is checked one by one (the sample exists, the class name follows the naming rule, a new class is
named as such, the class is allowed here); the accepted ones are stored in one transaction and outrank camera
and pseudo-labels from then on. The next update trains on them (their label ids are above its watermark).

The review queue ranks the samples that have no human label by how much a label would help, from each one's
latest stored prediction: a small margin between the top two classes, an anomaly flag, a teacher (pseudo-label)
that disagrees with the live model, a predicted class with few human labels. Pages are keyset-paginated (the
token holds the last item's priority and id), so items do not repeat or vanish between pages as the queue moves.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import and_, case, exists, false, func, literal, or_, select
from sqlmodel import col

from cl_service.errors import ErrorCode, ServiceError, invalid
from replay_store.models import LABELS, Label, LabelSource, PredictionRow, Sample
from replay_store.naming import class_name_problem, identifier_problem
from replay_store.operator import OperatorLabel, add_operator_labels, existing_sample_ids
from replay_store.store import Store

MAX_CORRECTIONS = 1000
MAX_NOTE = 1024
DEFAULT_PAGE = 50
MAX_PAGE = 500
LOW_MARGIN = 0.25  # top-1 minus top-2 probability below this: the model is unsure
RARE_LABELS = 20  # a predicted class with fewer human labels than this is rare
_HUMAN = (LabelSource.OPERATOR.value, LabelSource.CAMERA.value)


class ReviewReason(Enum):
    LOW_CONFIDENCE = "low_confidence"
    ANOMALOUS = "anomalous"
    DISAGREEMENT = "disagreement"
    RARE_CLASS = "rare_class"


@dataclass(frozen=True)
class CorrectionRequest:
    sample_id: int
    class_name: str
    new_class: bool = False
    note: str = ""


@dataclass(frozen=True)
class CorrectionResult:
    sample_id: int
    label: Label | None = None
    error: ServiceError | None = None


@dataclass(frozen=True)
class ReviewItem:
    sample: Sample
    prediction: PredictionRow
    priority: float
    reasons: tuple[ReviewReason, ...]


@dataclass(frozen=True)
class ReviewPage:
    items: list[ReviewItem]
    next_page_token: str
    total_size: int


def submit_corrections(
    store: Store, operator_id: str, corrections: Sequence[CorrectionRequest], *, allowed_classes: Sequence[str] = ()
) -> list[CorrectionResult]:
    """Check each correction, store the good ones together; one result per correction, in order."""
    problem = identifier_problem("operator_id", operator_id)
    if problem:
        raise invalid("OPERATOR_ID_INVALID", problem)
    if not corrections:
        raise invalid("CORRECTIONS_EMPTY", "send at least one correction")
    if len(corrections) > MAX_CORRECTIONS:
        raise invalid("TOO_MANY_CORRECTIONS", f"at most {MAX_CORRECTIONS} corrections per call, got {len(corrections)}")
    known_samples = existing_sample_ids(store, [c.sample_id for c in corrections if c.sample_id > 0])
    known_classes = set(store.class_names())
    allowed = set(allowed_classes)
    results: list[CorrectionResult] = []
    accepted: list[tuple[int, OperatorLabel]] = []
    for position, correction in enumerate(corrections):
        error = _correction_problem(correction, known_samples, known_classes, allowed)
        if error is not None:
            results.append(CorrectionResult(correction.sample_id, error=error))
            continue
        results.append(CorrectionResult(correction.sample_id))
        accepted.append((position, OperatorLabel(correction.sample_id, correction.class_name, correction.note)))
    stored = add_operator_labels(store, operator_id, [label for _, label in accepted])
    for (position, _), row in zip(accepted, stored, strict=True):
        results[position] = CorrectionResult(row.sample_id, label=row)
    return results


def _correction_problem(
    correction: CorrectionRequest, samples: set[int], classes: set[str], allowed: set[str]
) -> ServiceError | None:
    if correction.sample_id not in samples:
        return ServiceError(ErrorCode.NOT_FOUND, "SAMPLE_NOT_FOUND", f"there is no sample {correction.sample_id}")
    problem = class_name_problem(correction.class_name)
    if problem:
        return invalid("CLASS_NAME_INVALID", problem)
    if allowed and correction.class_name not in allowed:
        return invalid("CLASS_NOT_ALLOWED", f"the class {correction.class_name!r} is not allowed here")
    if correction.class_name not in classes and not correction.new_class:
        known = ", ".join(sorted(classes)) or "none yet"
        return invalid(
            "CLASS_UNKNOWN",
            f"there is no class {correction.class_name!r} (known: {known}); set new_class to create it",
        )
    if len(correction.note) > MAX_NOTE:
        return invalid("NOTE_TOO_LONG", f"a note is at most {MAX_NOTE} characters, got {len(correction.note)}")
    return None


def review_queue(
    store: Store,
    *,
    page_size: int = 0,
    page_token: str = "",
    reason: ReviewReason | None = None,
    camera_id: str = "",
) -> ReviewPage:
    """One page of the samples without a human label that a label would help most, highest priority first."""
    if not 0 <= page_size <= MAX_PAGE:
        raise invalid("PAGE_SIZE_INVALID", f"page_size must be 0..{MAX_PAGE} (0 means {DEFAULT_PAGE}), got {page_size}")
    size = page_size or DEFAULT_PAGE
    after = _decode_token(page_token)
    counts = store.label_counts()
    human = {name: by.get("operator", 0) + by.get("camera", 0) for name, by in counts.items()}
    rare = sorted(name for name in {*human, *store.class_names()} if human.get(name, 0) < RARE_LABELS)

    p = PredictionRow.__table__.c  # type: ignore[attr-defined]
    latest_pseudo = (
        select(LABELS.c.class_name)
        .where(LABELS.c.sample_id == p.sample_id, LABELS.c.source == LabelSource.PSEUDO.value)
        .order_by(LABELS.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    flags = {
        ReviewReason.LOW_CONFIDENCE: p.margin < LOW_MARGIN,
        ReviewReason.ANOMALOUS: p.anomalous.is_(True),
        ReviewReason.DISAGREEMENT: and_(latest_pseudo.is_not(None), latest_pseudo != p.class_name),
        ReviewReason.RARE_CLASS: p.class_name.in_(rare) if rare else false(),
    }
    weights = {
        ReviewReason.LOW_CONFIDENCE: 0.0,
        ReviewReason.ANOMALOUS: 1.0,
        ReviewReason.DISAGREEMENT: 0.5,
        ReviewReason.RARE_CLASS: 0.5,
    }
    priority = (literal(1.0) - p.margin + sum(case((flag, weights[r]), else_=0.0) for r, flag in flags.items())).label(
        "priority"
    )
    flag_columns = [case((flag, 1), else_=0).label(r.value) for r, flag in flags.items()]
    conditions: list[Any] = [
        ~exists().where(LABELS.c.sample_id == p.sample_id, LABELS.c.source.in_(_HUMAN)),
        flags[reason] if reason else or_(*flags.values()),
    ]
    if camera_id:
        conditions.append(col(Sample.camera_id) == camera_id)
    base = select(PredictionRow, Sample, priority, *flag_columns).join(Sample, col(Sample.id) == p.sample_id)
    base = base.where(*conditions)
    page_query = base
    if after is not None:
        last_priority, last_id = after
        page_query = base.where(or_(priority < last_priority, and_(priority == last_priority, p.sample_id < last_id)))
    page_query = page_query.order_by(priority.desc(), p.sample_id.desc()).limit(size + 1)
    with store.session() as session:
        rows = list(session.execute(page_query))
        total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    items = [
        ReviewItem(
            sample=row[1],
            prediction=row[0],
            priority=float(row[2]),
            reasons=tuple(r for r, value in zip(flags, row[3:], strict=True) if value),
        )
        for row in rows[:size]
    ]
    token = _encode_token(items[-1].priority, items[-1].prediction.sample_id) if len(rows) > size else ""
    return ReviewPage(items, token, total)


def _encode_token(priority: float, sample_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([priority, sample_id]).encode()).decode()


def _decode_token(token: str) -> tuple[float, int] | None:
    if not token:
        return None
    try:
        priority, sample_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(priority), int(sample_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise invalid("PAGE_TOKEN_INVALID", "page_token is not one this server handed out") from None
