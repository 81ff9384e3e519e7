"""Micro-batching of classification requests onto the live engine.

Requests wait in a bounded queue; one worker takes up to `max_batch` of them, waiting at most `max_wait_ms`
after the first for more, leases the live engine once for the whole batch and answers each request with its
logits and the version that produced them. A full queue is refused at once (`QueueFullError`, with a retry
hint): memory never grows with the offered load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from cl_service.engines.base import Batch
from cl_service.serving.slot import EngineSlot


class QueueFullError(RuntimeError):
    """The classification queue is full; retry after `retry_after_ms`."""

    def __init__(self, depth: int, retry_after_ms: int) -> None:
        super().__init__(f"the classification queue is full ({depth} waiting); retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class Prediction:
    version: str
    logits: Batch  # (C,) float32


@dataclass
class _Request:
    image: Batch  # (3, S, S)
    future: asyncio.Future[Prediction]


class MicroBatcher:
    """Run `start()` inside the server's event loop; `classify` from any coroutine of that loop."""

    def __init__(
        self, slot: EngineSlot, *, max_batch: int = 32, max_wait_ms: float = 2.0, max_queue: int = 256
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.slot = slot
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._batch_seconds = 0.01  # running estimate, for the retry hint

    def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            while not self._queue.empty():
                request = self._queue.get_nowait()
                if not request.future.done():
                    request.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def classify(self, image: Batch) -> Prediction:
        if self._queue is None:
            raise RuntimeError("the micro-batcher is not started")
        request = _Request(image, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            batches_ahead = self.depth / self.max_batch + 1
            raise QueueFullError(self.depth, max(1, round(1000 * batches_ahead * self._batch_seconds))) from None
        return await request.future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [request for request in batch if not request.future.done()]  # a caller may have gone away
            if live:
                await self._answer(live)

    async def _answer(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        try:
            version, logits = await asyncio.to_thread(self._infer, np.stack([r.image for r in batch]))
        except Exception as exc:  # noqa: BLE001 - every waiting caller learns why, and the worker goes on
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        for request, row in zip(batch, logits, strict=True):
            if not request.future.done():
                request.future.set_result(Prediction(version, row))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)

    def _infer(self, images: Batch) -> tuple[str, Batch]:
        with self.slot.lease() as lease:
            return lease.version, lease.engine.infer(images)
