"""The model the server classifies with: the store's live version on an engine, kept current by polling.

`cl-service update` (or, later, the scheduler) makes a version live in the store; the server notices within
`model_poll_s`, publishes it onto the configured engine (build, warm-up, parity) and hot-swaps it in. A version
that fails is recorded, logged and not retried until another version becomes live; the old engine keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from cl_service.config import Settings
from cl_service.engines.base import default_engine
from cl_service.learning.model import preprocess
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.batcher import MicroBatcher
from cl_service.serving.publish import activate
from cl_service.serving.slot import EngineSlot, NoLiveEngineError
from replay_store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classified:
    version: str
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
        row = await asyncio.to_thread(self.repository.live)
        if row is None or row.version == self.slot.version or row.version in self._failed:
            return self.slot.version
        try:
            model = await asyncio.to_thread(self.repository.load_model, row.version)
            # known before the swap: a reply from the new engine may come the moment it is live
            self._served[row.version] = _Served(tuple(model.classes), model.config)
            await asyncio.to_thread(
                activate, self.slot, self.store, self.repository, row.version, self.engine_name, model=model
            )
        except Exception:  # publish recorded why; the old engine keeps serving
            log.exception("%s cannot go live on %s; still serving %s", row.version, self.engine_name, self.slot.version)
            self._failed.add(row.version)
            self._served.pop(row.version, None)
        return self.slot.version

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not end polling
                log.exception("looking for a new live model version failed; trying again later")
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
        return Classified(prediction.version, served.classes, (probabilities / probabilities.sum()).astype(np.float32))
