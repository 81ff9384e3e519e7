"""The model the server classifies with: the store's live version on an engine, kept current by polling.

`cl-service update` (or, later, the scheduler) makes a version live in the store; the server notices within
`model_poll_s`, publishes it onto the configured engine (build, warm-up, parity) and hot-swaps it in. A version
that fails is recorded, logged and not retried until another version becomes live; the old engine keeps serving.

`activate` (the ActivateModel RPC: promotion or rollback) works the other way round: the engine is built and
checked first, and only then is the version marked live in the store (with the audit trail) and swapped in, so a
version that cannot serve never becomes live anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cl_service.config import Settings
from cl_service.engines.base import default_engine
from cl_service.errors import ErrorCode, ServiceError
from cl_service.learning.model import preprocess, read_checkpoint_info
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.logs import log_failure
from cl_service.serving.batcher import MicroBatcher
from cl_service.serving.publish import prepare_version
from cl_service.serving.slot import EngineSlot, NoLiveEngineError
from replay_store.models import ModelState, ModelVersionRow
from replay_store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classified:
    version: str
    engine: str
    classes: tuple[str, ...]
    probabilities: np.ndarray  # (C,) float32, summing to 1


@dataclass(frozen=True)
class _Served:
    classes: tuple[str, ...]
    config: ModelConfig


class LiveModels:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.repository = ModelRepository(settings.data_dir / "models", store)
        self.engine_name = default_engine() if settings.engine == "auto" else settings.engine
        self.slot = EngineSlot()
        self.batcher = MicroBatcher(
            self.slot,
            max_batch=settings.classify_max_batch,
            max_wait_ms=settings.classify_max_wait_ms,
            max_queue=settings.classify_max_queue,
        )
        self._served: dict[str, _Served] = {}
        self._failed: set[str] = set()
        self._poller: asyncio.Task[None] | None = None
        self._publishing = asyncio.Lock()  # one publication (poll or ActivateModel) at a time

    async def start(self) -> None:
        """Start batching and polling; the first look for a live version happens at once, in the background."""
        self.batcher.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="live-model-poller")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.batcher.stop()
        await asyncio.to_thread(self.slot.close)

    async def refresh(self) -> str | None:
        """Publish the store's live version if it is not the one serving; returns the serving version."""
        async with self._publishing:
            row = await asyncio.to_thread(self.repository.live)
            if row is None or row.version == self.slot.version or row.version in self._failed:
                return self.slot.version
            try:
                await self._publish(row.version)
            except Exception:  # publish recorded why; the old engine keeps serving
                log.exception(
                    "%s cannot go live on %s; still serving %s", row.version, self.engine_name, self.slot.version
                )
                self._failed.add(row.version)
            return self.slot.version

    async def activate(self, version: str, *, requested_by: str, reason: str) -> ModelVersionRow:
        """Make a kept, accepted version live (promotion or rollback): build and check its engine, then mark it
        live in the store with the audit entry, then swap. On failure nothing changes, here or in the store."""
        if not requested_by.strip():
            raise ServiceError(ErrorCode.INVALID_ARGUMENT, "REQUESTED_BY_MISSING", "say who asks (requested_by)")
        await asyncio.to_thread(self.check_activatable, version)
        # Shielded: when the caller gives up (its deadline passes, it cancels), the build goes on in its worker thread
        # anyway, and the publication must keep the lock until it has ended, or a retry builds the same version's
        # files beside it (the ONNX exporter is not re-entrant: a retry failed with MODEL_ENGINE_FAILED). The
        # activation then completes or fails on its own; the store and this server agree either way.
        publication = asyncio.ensure_future(self._activate_locked(version, requested_by, reason))
        try:
            await asyncio.shield(publication)
        except asyncio.CancelledError:
            publication.add_done_callback(_log_abandoned_failure)
            raise
        row = await asyncio.to_thread(self.repository.get, version)
        assert row is not None  # checked above; rows are never deleted
        return row

    async def _activate_locked(self, version: str, requested_by: str, reason: str) -> None:
        async with self._publishing:
            live = await asyncio.to_thread(self.repository.live)
            if self.slot.version == version:
                if live is None or live.version != version:  # serving already; the store learns it now
                    await asyncio.to_thread(self.repository.set_live, version, requested_by=requested_by, reason=reason)
                return
            try:
                await self._publish(
                    version,
                    before_swap=lambda: self.repository.set_live(version, requested_by=requested_by, reason=reason),
                )
            except Exception as exc:
                raise ServiceError(
                    ErrorCode.FAILED_PRECONDITION,
                    "MODEL_ENGINE_FAILED",
                    f"{version} cannot serve on {self.engine_name}, {self.slot.version or 'nothing'} stays live: {exc}",
                ) from exc
            self._failed.discard(version)

    def check_activatable(self, version: str) -> None:
        """Raise the ServiceError that says why `version` cannot be made live, if it cannot."""
        row = self.repository.get(version) if version and len(version) <= 64 else None
        if row is None:
            raise ServiceError(ErrorCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND", f"there is no model version {version!r}")
        if row.state != ModelState.ACCEPTED.value:
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION,
                "MODEL_REJECTED",
                f"{version} was rejected by the validation gate and cannot be made live: {row.rejection_reason}",
            )
        if row.pruned_at is not None or not (self.repository.folder(version) / CHECKPOINT).exists():
            raise ServiceError(
                ErrorCode.FAILED_PRECONDITION,
                "MODEL_NOT_KEPT",
                f"{version} is no longer kept: retention removed its files (keep_versions)",
            )

    async def _publish(self, version: str, *, before_swap: Callable[[], object] | None = None) -> None:
        info = await asyncio.to_thread(read_checkpoint_info, self.repository.folder(version) / CHECKPOINT)
        # known before the swap: a reply from the new engine may come the moment it is live
        self._served[version] = _Served(info.classes, info.config)
        # an update builds and checks its version's engine in its own process; here that is mostly loading
        prepared = await asyncio.to_thread(prepare_version, self.store, self.repository, version, self.engine_name)
        if before_swap is not None:
            try:
                await asyncio.to_thread(before_swap)
            except BaseException:
                prepared.engine.close()
                raise
        replaced = await asyncio.to_thread(self.slot.swap, version, prepared.engine)
        log.info(
            "%s live on %s (was %s): %s", version, self.engine_name, replaced or "nothing", prepared.parity.describe()
        )

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end polling (log_failure logs it)
                log_failure(log, "looking for a new live model version failed; trying again later", exc)
            await asyncio.sleep(self.settings.model_poll_s)

    async def classify(self, image: object) -> Classified:
        """Probabilities for one decoded image (a PIL image) from the live engine."""
        version = self.slot.version
        if version is None or version not in self._served:
            raise NoLiveEngineError("no model version is live yet: the first update has not been accepted")
        batch = await asyncio.to_thread(preprocess, [image], self._served[version].config)  # type: ignore[list-item]
        prediction = await self.batcher.classify(batch[0].numpy())
        served = self._served[prediction.version]
        logits = prediction.logits.astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        return Classified(
            prediction.version,
            self.engine_name,
            served.classes,
            (probabilities / probabilities.sum()).astype(np.float32),
        )


def _log_abandoned_failure(publication: asyncio.Future[None]) -> None:
    """An activation whose caller went away still ends: say so when it failed (nobody else hears of it)."""
    if not publication.cancelled() and publication.exception() is not None:
        log.warning("an activation whose caller had gone away failed: %s", publication.exception())
