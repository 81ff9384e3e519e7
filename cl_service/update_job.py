"""One update run, in its own process: what the scheduler starts (`cl-service run-update`).

Training runs outside the serving process so that it never competes with requests for the GIL (and, niced, for
the CPU as little as possible). The worker holds the `update` lease its parent took, renews it with the run's
heartbeat and progress (stage, step, loss, ETA), runs the learning loop, builds and checks the accepted
candidate's engine, applies retention, and ends the run. A crash anywhere before the loop records the version
leaves the live model as it was; the heartbeat stops and the run is marked failed. The worker also stops when the server
that started it dies: its successor then reaps the run the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from cl_service.anomaly.config import AnomalyConfig
from cl_service.config import Settings
from cl_service.engines.base import default_engine
from cl_service.inspector import fit_anomaly
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import UpdateSettings
from cl_service.learning.update import Progress, UpdateResult, UpdateSkippedError, run_update
from cl_service.logs import log_failure
from cl_service.reports import write_version_report
from cl_service.serving.publish import prebuild
from replay_store import runs
from replay_store.models import UpdateState
from replay_store.store import Store

log = logging.getLogger(__name__)


class _Progress:
    """The run's latest progress, as WatchUpdate shows it; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._stage_started = self._started
        self.data: dict[str, Any] = {"stage": "snapshot", "step": 0, "total_steps": 0, "loss": 0.0, "eta_s": 0.0}

    def __call__(self, stage: str, step: int, total: int, values: dict[str, float]) -> None:
        now = time.monotonic()
        with self._lock:
            if stage != self.data["stage"]:
                self._stage_started = now
            eta = 0.0
            if stage == "train" and 0 < step < total:  # training dominates: extrapolate its pace
                eta = (now - self._stage_started) / step * (total - step)
            self.data = {
                "stage": stage,
                "step": step,
                "total_steps": total,
                "loss": float(values.get("loss", self.data.get("loss", 0.0))),
                "eta_s": round(eta, 1),
                "message": "  ".join(f"{k} {v:.3f}" for k, v in values.items()),
                "elapsed_s": round(now - self._started, 1),
            }

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        with self._lock:
            return {**self.data, **extra}


@dataclass(frozen=True)
class Updated:
    result: UpdateResult
    engine_note: str  # the accepted version's engine: built and checked, with its parity figures
    anomaly_note: str  # its anomaly model: "fitted", "too few images yet" or "failed: ..."
    pruned: list[str]  # versions retention removed


def update_and_publish(
    settings: Settings,
    store: Store,
    repository: ModelRepository,
    update_settings: UpdateSettings,
    progress: Progress,
) -> Updated:
    """One whole update, as `cl-service update` and the scheduler's worker both run it: the learning loop; the
    accepted candidate's engine built and checked before it is recorded; its anomaly model; retention.
    Raises UpdateSkippedError when there is nothing to train on."""
    engine = default_engine() if settings.engine == "auto" else settings.engine
    notes: list[str] = []

    def engine_check(version: str) -> None:
        built = prebuild(store, repository, version, engine)
        notes.append(f"{engine} engine built and checked in {built.seconds:.1f} s: {built.parity.describe()}")

    result = run_update(store, repository, update_settings, progress=progress, engine_check=engine_check)
    anomaly_note = ""
    if result.accepted:  # its anomaly model, fitted beside its classifier (servers load it when it appears)
        progress("anomaly", 0, 1, {})
        try:
            fitted = fit_anomaly(
                store,
                repository,
                result.version,
                update_settings,
                target_false_alarm_rate=settings.anomaly_false_alarm_rate,
                config=AnomalyConfig.model_validate(settings.anomaly),
            )
            anomaly_note = "fitted" if fitted else "too few images yet"
        except Exception as exc:
            log.exception("the anomaly model of %s failed", result.version)
            anomaly_note = f"failed: {exc}"
    progress("report", 0, 1, {})
    try:  # the version's HTML report (`cl-service report VERSION` rewrites it with what happened since)
        write_version_report(store, repository, result.version)
    except Exception:  # a report that cannot be drawn never fails the update
        log.exception("the report of %s could not be written", result.version)
    pruned = repository.prune(settings.keep_versions)
    return Updated(result, notes[0] if notes else "", anomaly_note, pruned)


ORPHANED_EXIT = 3  # the worker's exit code when it stops because its server died
PARENT_CHECK_S = 0.5


def _exit_with_parent(parent: int, run_id: int, stop: threading.Event) -> None:
    """Stop the worker at once when the server that started it dies (SIGKILL, OOM kill, a crash): nobody reads its
    output or waits for it any more, and it must not train on unseen and make a candidate live behind the back of the
    server that replaces it. Its heartbeat stops with it, so that server reaps the run (failed, live model as it was).
    """
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent:
            log.error("update run %d: the server that started it (pid %d) is gone; stopping the worker", run_id, parent)
            os._exit(ORPHANED_EXIT)


def run_job(settings: Settings, run_id: int, owner: str) -> int:
    """Run update run `run_id` (claimed by `owner`, who holds the lease) to its end; 0 unless it failed."""
    if settings.update.threads:  # this process only trains: the whole update (anomaly model included) uses them
        torch.set_num_threads(settings.update.threads)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    progress = _Progress()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(settings.update_lease_s / 4):
            try:
                if not runs.renew(store, owner, settings.update_lease_s, run_id, progress.snapshot()):
                    log.error("update run %d lost its lease; another process may take over", run_id)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again at the next beat (log_failure logs it)
                log_failure(log, "renewing the update lease failed", exc)

    heart = threading.Thread(target=beat, name="update-heartbeat", daemon=True)
    heart.start()
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent, run_id, stop), name="parent-watch", daemon=True).start()
    try:
        repository = ModelRepository(settings.data_dir / "models", store)
        update_settings = UpdateSettings.model_validate(settings.update.model_dump())
        try:
            updated = update_and_publish(settings, store, repository, update_settings, progress)
        except UpdateSkippedError as exc:
            runs.finish(
                store,
                run_id,
                UpdateState.SKIPPED,
                reason=str(exc),
                progress=progress.snapshot(stage="done"),
            )
            return 0
        result = updated.result
        state = UpdateState.SUCCEEDED if result.accepted else UpdateState.REJECTED
        runs.finish(
            store,
            run_id,
            state,
            reason=None if result.accepted else "; ".join(result.reasons),
            parent_version=result.parent or "",
            candidate_version=result.version,
            progress=progress.snapshot(
                stage="done",
                eta_s=0.0,
                pruned=updated.pruned,
                timings=result.timings,
                engine=updated.engine_note,
                anomaly_model=updated.anomaly_note,
            ),
        )
        log.info("update run %d: %s -> %s (%s)", run_id, result.parent, result.version, state.value)
        return 0
    except Exception as exc:
        log.exception("update run %d failed", run_id)
        runs.finish(
            store, run_id, UpdateState.FAILED, reason=f"{type(exc).__name__}: {exc}", progress=progress.snapshot()
        )
        return 1
    finally:
        stop.set()
        heart.join(5)
        runs.release_lease(store, owner)
        store.close()
