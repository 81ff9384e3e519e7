"""When updates run: the nightly schedule, automatic triggers, TriggerUpdate, and one run at a time.

APScheduler (3.x, AsyncIOScheduler) fires the `update_cron` job in `update_timezone` and the trigger check every
`update_check_s`. Its defaults would silently drop a late run (misfire grace of 1 s): the cron job gets
`update_misfire_grace_s`, coalescing and one instance. Its job store is in memory, so a nightly run missed while no
server was up is caught up at start (when it fell within the grace time, no run was queued since, and the store has
run updates before).

Firing only queues a run in the store (requests coalesce into the one queued run). The runner loop of every server
process tries to take the store's `update` lease; the one that holds it claims the oldest queued run and starts
`cl-service run-update` in a child process (niced), which trains, checks and records, renewing the lease. Runs whose
worker died are marked failed by whichever runner looks next. The live model changes only when the worker records
an accepted version; every server then swaps to it (LiveModels).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cl_service.config import Settings
from cl_service.logs import log_failure
from replay_store import runs
from replay_store.files import write_private
from replay_store.models import UpdateRun, UpdateState, utcnow
from replay_store.operator import human_labels_since_time
from replay_store.store import Store

log = logging.getLogger(__name__)

TRIGGER_SCHEDULE = "schedule"
TRIGGER_MANUAL = "manual"
TRIGGER_NEW_LABELS = "new_labels"
TRIGGER_ALERTS = "alerts"
RUNNER_POLL_S = 1.0
STDERR_TAIL = 2000


class UpdateScheduler:
    def __init__(self, settings: Settings, store: Store, *, alerted_since: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._alerted_since = alerted_since  # callable(datetime | None) -> int: images alerted since then
        self._scheduler: Any = None
        self._runner: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None

    # ------------------------------------------------------------------------------------- life cycle

    async def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger

        settings = self.settings
        self._scheduler = AsyncIOScheduler(timezone=settings.update_timezone)
        if settings.update_cron.strip():
            cron = CronTrigger.from_crontab(settings.update_cron, timezone=settings.update_timezone)
            self._scheduler.add_job(
                self._scheduled,
                cron,
                id="nightly-update",
                misfire_grace_time=int(settings.update_misfire_grace_s),
                coalesce=True,
                max_instances=1,
            )
            await asyncio.to_thread(self._catch_up, cron)
        self._scheduler.add_job(
            self._check_triggers, "interval", seconds=settings.update_check_s, id="update-triggers", max_instances=1
        )
        self._scheduler.start()
        self._runner = asyncio.get_running_loop().create_task(self._run_queued(), name="update-runner")

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    def next_scheduled(self) -> datetime | None:
        job = self._scheduler.get_job("nightly-update") if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    # ------------------------------------------------------------------------------------- queueing

    def trigger(self, trigger: str, *, requested_by: str | None = None, reason: str | None = None) -> UpdateRun:
        run = runs.enqueue(self.store, trigger, requested_by=requested_by, reason=reason)
        log.info("update run %s queued (%s%s)", run.id, trigger, f" by {requested_by}" if requested_by else "")
        return run

    async def _scheduled(self) -> None:
        await asyncio.to_thread(self.trigger, TRIGGER_SCHEDULE)

    def _catch_up(self, cron: Any) -> None:
        """Queue the scheduled run that was due while no server was up, if it is still within the grace time."""
        now = utcnow()
        since = now - timedelta(seconds=self.settings.update_misfire_grace_s)
        due = cron.get_next_fire_time(None, since)
        if due is None or due > now:
            return
        latest = runs.latest_created_at(self.store)
        if latest is not None and latest < due:  # a store that never ran an update has nothing to catch up
            log.info("the scheduled update due at %s did not run; queueing it now", due.isoformat())
            self.trigger(TRIGGER_SCHEDULE, reason=f"catch-up of the run due at {due.isoformat()}")

    async def _check_triggers(self) -> None:
        await asyncio.to_thread(self.check_triggers)

    def check_triggers(self) -> UpdateRun | None:
        """Queue a run when enough human labels or alerted images arrived since the last run was queued."""
        settings = self.settings
        since = runs.latest_created_at(self.store)
        if settings.update_after_labels:
            labels = human_labels_since_time(self.store, since)
            if labels >= settings.update_after_labels:
                return self.trigger(TRIGGER_NEW_LABELS, reason=f"{labels} new human labels")
        if settings.update_after_alerts and self._alerted_since is not None:
            alerted = int(self._alerted_since(since))
            if alerted >= settings.update_after_alerts:
                return self.trigger(TRIGGER_ALERTS, reason=f"{alerted} images raised alerts")
        return None

    # ------------------------------------------------------------------------------------- running

    async def _run_queued(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the runner (log_failure logs it)
                log_failure(log, "the update runner failed; trying again", exc)
            await asyncio.sleep(RUNNER_POLL_S)

    async def run_once(self) -> int | None:
        """Reap dead runs; then, holding the lease, run the oldest queued run to its end. Returns its id."""
        store, settings = self.store, self.settings
        reaped = await asyncio.to_thread(runs.reap_stale, store, 2 * settings.update_lease_s)
        for run_id in reaped:
            log.warning("update run %d was marked failed: its worker stopped", run_id)
        queued = await asyncio.to_thread(runs.oldest_queued, store)
        if queued is None or queued.id is None:
            return None
        owner = f"{self.owner}:{queued.id}"
        if not await asyncio.to_thread(runs.acquire_lease, store, owner, settings.update_lease_s):
            return None  # another process is running an update
        try:
            if not await asyncio.to_thread(runs.claim, store, queued.id, owner):
                return None
            await self._run_child(queued.id, owner)
        finally:
            await asyncio.to_thread(runs.release_lease, store, owner)
        return queued.id

    async def _run_child(self, run_id: int, owner: str) -> None:
        # The worker's settings hold the database URL (a password, maybe): readable by this user only, deleted when
        # the worker has read them (and here, should it never get that far).
        settings_file = self.settings.data_dir / "runs" / f"{run_id}.settings.json"
        write_private(settings_file, self.settings.model_dump_json().encode())
        command = [sys.executable, "-c", "import sys; from cl_service.cli import main; sys.exit(main())"]
        command += ["run-update", "--run-id", str(run_id), "--owner", owner, "--settings-json", str(settings_file)]
        log_file = settings_file.with_name(f"{run_id}.log")  # the worker's log lines, kept for the operator
        log.info("update run %d starting in a worker process (its log: %s)", run_id, log_file)
        with log_file.open("ab") as worker_log:
            self._child = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.DEVNULL, stderr=worker_log
            )
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(run_id, owner), name="update-lease")
        try:
            await self._child.wait()
        except asyncio.CancelledError:  # the server stops: so does its update (the run is marked failed)
            self._child.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self._child.wait(), 10)
            await asyncio.to_thread(
                runs.finish, self.store, run_id, UpdateState.FAILED, reason="the server stopped during the update"
            )
            raise
        finally:
            keeper.cancel()
            code, self._child = self._child.returncode, None
            settings_file.unlink(missing_ok=True)
        if code != 0:
            tail = _tail(log_file, STDERR_TAIL)
            reason = f"the update worker exited with code {code} (its log: {log_file}): {tail.strip() or 'no message'}"
            if await asyncio.to_thread(runs.finish, self.store, run_id, UpdateState.FAILED, reason=reason):
                log.error("update run %d failed: %s", run_id, reason)

    async def _keep_lease(self, run_id: int, owner: str) -> None:
        """Renew the lease (and the run's heartbeat) while the worker runs: it starts slowly (importing torch) and
        beats on its own once going; should this process die, the worker stops too (update_job._exit_with_parent)
        and the lease runs out."""
        ttl = self.settings.update_lease_s
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(runs.renew, self.store, owner, ttl, run_id)
            await asyncio.sleep(ttl / 4)


def _tail(path: Path, size: int) -> str:
    """The last `size` bytes of `path` as text ('' when it cannot be read)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - size))
            return file.read().decode(errors="replace")
    except OSError:
        return ""
