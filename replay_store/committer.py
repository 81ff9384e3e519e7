"""Group commit: one writer thread turns many concurrent ingest requests into few durable batches.

Callers submit a NewSample and get a Future. The writer takes whatever is queued (up to `max_batch`),
stores it with `Store.add_samples` (one parallel blob fsync round and one database commit), and then
resolves every future of the batch. Under load batches grow by themselves while the previous one is
being written, so the cost of durability is paid per batch, not per image, without an artificial delay.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from replay_store.db import is_unreachable, short_reason
from replay_store.store import NewSample, Store, StoredSample

log = logging.getLogger(__name__)


@dataclass
class CommitStats:
    """Counters for metrics and benchmarks."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    busy_seconds: float = 0.0


class CommitterClosedError(RuntimeError):
    """The committer was stopped; nothing more is accepted."""


class GroupCommitter:
    """A single writer thread that stores submitted samples in batches."""

    def __init__(self, store: Store, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._store = store
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[NewSample, Future[StoredSample]] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self.stats = CommitStats()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, sample: NewSample) -> Future[StoredSample]:
        """Queue a sample; the future resolves once it is durable (or with the error that stopped it)."""
        if self._closed.is_set():
            raise CommitterClosedError("the store is shutting down; resend this image after reconnecting")
        future: Future[StoredSample] = Future()
        self._queue.put((sample, future))
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, write what is queued, then stop the thread."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                stopping = True
                batch: list[tuple[NewSample, Future[StoredSample]]] = []
            else:
                batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if batch:
                self._write(batch)

    def _write(self, batch: list[tuple[NewSample, Future[StoredSample]]]) -> None:
        live = [(sample, future) for sample, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            results = self._store.add_samples([sample for sample, _ in live])
        except Exception as exc:
            self.stats.failed_batches += 1
            if is_unreachable(exc):
                log.warning("storing a batch of %d images failed: %s", len(live), short_reason(exc))
                for _, future in live:
                    future.set_exception(exc)
                return
            if len(live) == 1:
                log.exception("storing an image failed")
                live[0][1].set_exception(exc)
                return
            # One item's failure (its blob hit a full disk, say) must not answer for the others: an already-stored
            # resend is still ALREADY_STORED, an image that fits is still stored. Each is tried on its own.
            log.warning("storing a batch of %d images failed (%s); storing them one by one", len(live), exc)
            for sample, future in live:
                self._write_one(sample, future)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)

    def _write_one(self, sample: NewSample, future: Future[StoredSample]) -> None:
        try:
            (result,) = self._store.add_samples([sample])
        except Exception as exc:  # noqa: BLE001 - any failure is this image's answer
            log.warning("storing image %s/%s failed: %s", sample.camera_id, sample.request_id, short_reason(exc))
            future.set_exception(exc)
            return
        self.stats.items += 1
        future.set_result(result)
