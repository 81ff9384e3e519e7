"""Unknown-defect alerts: incidents of similar unusual images, and the durable alert log that WatchAlerts follows.

An anomalous image joins the open incident whose centroid (the mean of its images' L2-normalised embeddings) is
most similar to its own embedding, when that similarity is at least `group_similarity` and the incident saw an
image within `group_window_s`; otherwise it opens a new incident. Every change appends an event to the log with
the alert as it was after it; the event's id is the cursor a client resumes after, so nothing is lost across
reconnects or server restarts (the log is in the store). Several server processes may write: an incident is
updated under a row lock where the database has them (PostgreSQL); SQLite serialises writers anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlmodel import Session, col

from cl_service.errors import ErrorCode, ServiceError, invalid
from replay_store.models import Alert, AlertEvent, AlertState, as_utc, utcnow
from replay_store.naming import identifier_problem
from replay_store.store import Store

MAX_EXAMPLES = 16
MAX_NOTE = 1024
KIND_UNKNOWN_DEFECT = "unknown_defect"


class EventType:
    OPENED = "opened"
    UPDATED = "updated"
    ACKNOWLEDGED = "acknowledged"


@dataclass(frozen=True)
class Unusual:
    """One image the anomaly model flagged."""

    sample_id: int
    camera_id: str
    embedding: np.ndarray  # (D,) float32, any norm
    score: float
    threshold: float
    model_version: str
    seen_at: datetime


class AlertBook:
    def __init__(self, store: Store, *, group_similarity: float = 0.8, group_window_s: float = 3600.0) -> None:
        if not -1.0 <= group_similarity <= 1.0:
            raise ValueError(f"group_similarity is a cosine similarity in [-1, 1], got {group_similarity}")
        self.store = store
        self.group_similarity = group_similarity
        self.group_window = timedelta(seconds=group_window_s)
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------- writing

    def record(self, unusual: Unusual) -> tuple[Alert, AlertEvent]:
        """Add an anomalous image to the incident it resembles, or open one; returns the alert and its event."""
        vector = _unit(unusual.embedding)
        with self.store.session() as session:
            alert = self._closest_open(session, vector, unusual.seen_at)
            if alert is None:
                alert = Alert(
                    kind=KIND_UNKNOWN_DEFECT,
                    state=AlertState.OPEN.value,
                    camera_id=unusual.camera_id,
                    count=1,
                    example_sample_ids=[unusual.sample_id],
                    max_score=unusual.score,
                    threshold=unusual.threshold,
                    model_version=unusual.model_version,
                    first_seen=unusual.seen_at,
                    last_seen=unusual.seen_at,
                    centroid=vector.tobytes(),
                )
                event_type = EventType.OPENED
                session.add(alert)
                session.flush()
            else:
                centroid = np.frombuffer(alert.centroid or b"", dtype=np.float32)
                alert.centroid = _unit(centroid * alert.count + vector).tobytes()
                alert.count += 1
                if len(alert.example_sample_ids) < MAX_EXAMPLES:
                    alert.example_sample_ids = [*alert.example_sample_ids, unusual.sample_id]
                alert.max_score = max(alert.max_score, unusual.score)
                alert.threshold = unusual.threshold
                alert.model_version = unusual.model_version
                alert.last_seen = max(as_utc(alert.last_seen), unusual.seen_at)
                event_type = EventType.UPDATED
            event = self._log(session, alert, event_type)
            session.commit()
        self._notify()
        return alert, event

    def acknowledge(self, alert_id: int, operator_id: str, note: str = "") -> Alert:
        problem = identifier_problem("operator_id", operator_id)
        if problem:
            raise invalid("OPERATOR_ID_INVALID", problem)
        if len(note) > MAX_NOTE:
            raise invalid("NOTE_TOO_LONG", f"a note is at most {MAX_NOTE} characters, got {len(note)}")
        with self.store.session() as session:
            alert = session.get(Alert, alert_id, with_for_update=True) if alert_id > 0 else None
            if alert is None:
                raise ServiceError(ErrorCode.NOT_FOUND, "ALERT_NOT_FOUND", f"there is no alert {alert_id}")
            if alert.state == AlertState.ACKNOWLEDGED.value:
                return alert  # already done: the first acknowledgement stands, nothing new in the log
            alert.state = AlertState.ACKNOWLEDGED.value
            alert.acknowledged_by = operator_id
            alert.acknowledged_at = utcnow()
            alert.note = note or None
            self._log(session, alert, EventType.ACKNOWLEDGED)
            session.commit()
        self._notify()
        return alert

    def _closest_open(self, session: Session, vector: np.ndarray, seen_at: datetime) -> Alert | None:
        since = seen_at - self.group_window
        query = select(Alert).where(
            col(Alert.state) == AlertState.OPEN.value,
            col(Alert.last_seen) >= since,
            col(Alert.centroid).is_not(None),
        )
        best, best_similarity = None, self.group_similarity
        for alert in session.scalars(query.with_for_update()):
            centroid = np.frombuffer(alert.centroid or b"", dtype=np.float32)
            if centroid.shape != vector.shape:  # another embedding model: never the same incident
                continue
            similarity = float(centroid @ vector)
            if similarity >= best_similarity:
                best, best_similarity = alert, similarity
        return best

    @staticmethod
    def _log(session: Session, alert: Alert, event_type: str) -> AlertEvent:
        event = AlertEvent(
            alert_id=alert.id or 0, event_type=event_type, created_at=utcnow(), alert=alert_snapshot(alert)
        )
        session.add(event)
        session.flush()
        return event

    # ------------------------------------------------------------------------------------- reading

    def events_after(self, cursor: int, limit: int = 500) -> list[AlertEvent]:
        with self.store.session() as session:
            query = select(AlertEvent).where(col(AlertEvent.id) > cursor).order_by(col(AlertEvent.id)).limit(limit)
            return list(session.scalars(query))

    def alerted_since(self, since: datetime | None) -> int:
        """How many images joined or opened incidents after `since` (all when None): the automatic update trigger."""
        query = (
            select(func.count())
            .select_from(AlertEvent)
            .where(col(AlertEvent.event_type).in_((EventType.OPENED, EventType.UPDATED)))
        )
        if since is not None:
            query = query.where(col(AlertEvent.created_at) > since)
        with self.store.session() as session:
            return int(session.scalar(query) or 0)

    def newest_event_id(self) -> int:
        with self.store.session() as session:
            return int(session.scalar(select(func.max(AlertEvent.id))) or 0)

    def open_alert_events(self) -> list[AlertEvent]:
        """Every event of the alerts that are still open, oldest first (where a watch without a cursor starts)."""
        with self.store.session() as session:
            open_ids = select(col(Alert.id)).where(col(Alert.state) == AlertState.OPEN.value)
            query = select(AlertEvent).where(col(AlertEvent.alert_id).in_(open_ids)).order_by(col(AlertEvent.id))
            return list(session.scalars(query))

    def open_count(self) -> int:
        with self.store.session() as session:
            query = select(func.count()).select_from(Alert).where(col(Alert.state) == AlertState.OPEN.value)
            return int(session.scalar(query) or 0)

    # ------------------------------------------------------------------------------------- following

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let watchers on `loop` wake as soon as this process logs an event (others are seen by polling)."""
        self._loop = loop
        self._changed = asyncio.Condition()

    def _notify(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is None or changed is None or loop.is_closed():
            return

        async def wake() -> None:
            async with changed:
                changed.notify_all()

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(wake())
        else:
            asyncio.run_coroutine_threadsafe(wake(), loop)

    async def wait_for_news(self, timeout_s: float) -> None:
        """Return when this process logged an event, or after `timeout_s` (events of other processes)."""
        changed = self._changed
        if changed is None:
            await asyncio.sleep(timeout_s)
            return
        async with changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout_s)


def alert_snapshot(alert: Alert) -> dict[str, Any]:
    """The alert's fields as JSON (without the centroid)."""

    def stamp(value: datetime | None) -> str | None:
        return as_utc(value).isoformat() if value is not None else None

    return {
        "id": alert.id,
        "kind": alert.kind,
        "state": alert.state,
        "camera_id": alert.camera_id,
        "count": alert.count,
        "example_sample_ids": list(alert.example_sample_ids),
        "max_score": alert.max_score,
        "threshold": alert.threshold,
        "model_version": alert.model_version,
        "first_seen": stamp(alert.first_seen),
        "last_seen": stamp(alert.last_seen),
        "acknowledged_by": alert.acknowledged_by,
        "acknowledged_at": stamp(alert.acknowledged_at),
        "note": alert.note,
    }


def parse_cursor(cursor: str) -> int | None:
    """The event id after which to resume (None: no cursor, start with the open alerts)."""
    if not cursor:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19:  # "¹".isdigit(), but not for int()
        raise invalid("CURSOR_INVALID", "cursor is not one this server handed out (the cursor of an AlertEvent)")
    return int(cursor)


def _unit(vector: np.ndarray) -> np.ndarray:
    values = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not values.size or not np.isfinite(values).all():
        raise ValueError("an alert's embedding must be a non-empty finite vector")
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values
