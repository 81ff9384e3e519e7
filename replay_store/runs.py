"""Update runs and the lease that keeps them single-flight across server processes.

A run is queued (by the schedule, an automatic trigger or TriggerUpdate), claimed by the one process that holds the
`update` lease, then ended as succeeded, rejected or failed. The worker that trains renews the lease and the run's
heartbeat; a run whose heartbeat is older than the lease time belongs to a process that died (a crash, `kill -9`)
and is marked failed by whoever looks next, so a crash never leaves a run "running" for ever.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from replay_store.models import Lease, UpdateRun, UpdateState, as_utc, utcnow
from replay_store.store import Store

UPDATE_LEASE = "update"
ACTIVE = (UpdateState.QUEUED.value, UpdateState.RUNNING.value)
TERMINAL = tuple(state.value for state in UpdateState if state.value not in ACTIVE)


def enqueue(store: Store, trigger: str, *, requested_by: str | None = None, reason: str | None = None) -> UpdateRun:
    """A queued run; when one is queued already, that one (requests coalesce into the next run)."""
    with store.session() as session:
        queued = session.scalars(
            select(UpdateRun).where(col(UpdateRun.state) == UpdateState.QUEUED.value).order_by(col(UpdateRun.id))
        ).first()
        if queued is not None:
            return queued
        run = UpdateRun(
            trigger=trigger,
            state=UpdateState.QUEUED.value,
            requested_by=requested_by,
            request_reason=reason,
            created_at=utcnow(),
            progress={},
        )
        session.add(run)
        session.commit()
        return run


def get(store: Store, run_id: int) -> UpdateRun | None:
    with store.session() as session:
        return session.get(UpdateRun, run_id)


def active(store: Store) -> UpdateRun | None:
    """The running run, else the oldest queued one."""
    with store.session() as session:
        for state in (UpdateState.RUNNING.value, UpdateState.QUEUED.value):
            query = select(UpdateRun).where(col(UpdateRun.state) == state).order_by(col(UpdateRun.id))
            run = session.scalars(query).first()
            if run is not None:
                return run
    return None


def current_or_latest(store: Store) -> UpdateRun | None:
    """The running run, else the oldest queued one, else the newest run of all."""
    with store.session() as session:
        for state, order in (
            (UpdateState.RUNNING.value, col(UpdateRun.id)),
            (UpdateState.QUEUED.value, col(UpdateRun.id)),
        ):
            run = session.scalars(select(UpdateRun).where(col(UpdateRun.state) == state).order_by(order)).first()
            if run is not None:
                return run
        return session.scalars(select(UpdateRun).order_by(col(UpdateRun.id).desc())).first()


def latest_created_at(store: Store) -> datetime | None:
    with store.session() as session:
        value = session.scalar(select(func.max(UpdateRun.created_at)))
    return as_utc(value) if value is not None else None


def acquire_lease(store: Store, owner: str, ttl_s: float, name: str = UPDATE_LEASE) -> bool:
    """Take the lease when it is free or expired; True when `owner` holds it now."""
    now = utcnow()
    with store.session() as session:
        lease = session.get(Lease, name, with_for_update=True)
        if lease is None:
            session.add(Lease(name=name, owner=owner, acquired_at=now, expires_at=now + timedelta(seconds=ttl_s)))
        elif lease.owner == owner or as_utc(lease.expires_at) <= now:
            lease.owner, lease.acquired_at, lease.expires_at = owner, now, now + timedelta(seconds=ttl_s)
        else:
            return False
        try:
            session.commit()
        except IntegrityError:  # another process inserted it first
            return False
    return True


def renew(store: Store, owner: str, ttl_s: float, run_id: int, progress: dict[str, Any] | None = None) -> bool:
    """Extend the lease and beat the run's heart (and record progress); False when the lease was lost."""
    now = utcnow()
    with store.session() as session:
        held = session.execute(
            update(Lease)
            .where(col(Lease.name) == UPDATE_LEASE, col(Lease.owner) == owner)
            .values(expires_at=now + timedelta(seconds=ttl_s))
        )
        values: dict[str, Any] = {"heartbeat_at": now}
        if progress is not None:
            values["progress"] = progress
        running = (col(UpdateRun.id) == run_id, col(UpdateRun.state) == UpdateState.RUNNING.value)
        # only while running: a beat that lands after `finish` must not overwrite the run's final progress
        session.execute(update(UpdateRun).where(*running).values(**values))
        session.commit()
    return bool(held.rowcount)  # type: ignore[attr-defined]


def release_lease(store: Store, owner: str, name: str = UPDATE_LEASE) -> None:
    with store.session() as session:
        session.execute(delete(Lease).where(col(Lease.name) == name, col(Lease.owner) == owner))
        session.commit()


def claim(store: Store, run_id: int, owner: str) -> bool:
    """Queued -> running for `owner` (who holds the lease); False when someone else took it first."""
    now = utcnow()
    with store.session() as session:
        result = session.execute(
            update(UpdateRun)
            .where(col(UpdateRun.id) == run_id, col(UpdateRun.state) == UpdateState.QUEUED.value)
            .values(state=UpdateState.RUNNING.value, owner=owner, started_at=now, heartbeat_at=now)
        )
        session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def oldest_queued(store: Store) -> UpdateRun | None:
    with store.session() as session:
        query = select(UpdateRun).where(col(UpdateRun.state) == UpdateState.QUEUED.value).order_by(col(UpdateRun.id))
        return session.scalars(query).first()


def finish(
    store: Store,
    run_id: int,
    state: UpdateState,
    *,
    reason: str | None = None,
    parent_version: str | None = None,
    candidate_version: str | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Running -> a terminal state; False when the run was not running any more (e.g. reaped meanwhile)."""
    values: dict[str, Any] = {
        "state": state.value,
        "finished_at": utcnow(),
        "reason": reason[:2048] if reason else None,
    }
    if parent_version is not None:
        values["parent_version"] = parent_version
    if candidate_version is not None:
        values["candidate_version"] = candidate_version
    if progress is not None:
        values["progress"] = progress
    with store.session() as session:
        result = session.execute(
            update(UpdateRun)
            .where(col(UpdateRun.id) == run_id, col(UpdateRun.state) == UpdateState.RUNNING.value)
            .values(**values)
        )
        session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def reap_stale(store: Store, stale_after_s: float) -> list[int]:
    """Mark failed the running runs whose heartbeat stopped (their process died); returns their ids."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with store.session() as session:
        stale = list(
            session.scalars(
                select(col(UpdateRun.id)).where(
                    col(UpdateRun.state) == UpdateState.RUNNING.value, col(UpdateRun.heartbeat_at) < cutoff
                )
            )
        )
    reaped = []
    for run_id in (i for i in stale if i is not None):
        reason = f"the process running it stopped (no heartbeat for {stale_after_s:.0f} s); the live model is unchanged"
        if finish(store, run_id, UpdateState.FAILED, reason=reason):
            reaped.append(run_id)
    return reaped
