"""The engine slot (lease, swap, drain) and the micro-batcher, with a small in-process engine.

`RecordingEngine` implements the engine protocol itself (it is not a stand-in for a library): its logits say
which version produced them and which image they belong to, and it can be held mid-inference.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cl_service.serving.batcher import MicroBatcher, QueueFullError
from cl_service.serving.slot import EngineSlot, NoLiveEngineError


class RecordingEngine:
    def __init__(self, version: int) -> None:
        self.name = "recording"
        self.version_dir = Path(f"v{version:04d}")
        self.version = version
        self.closed = False
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.entered = threading.Event()

    def load(self) -> None: ...

    def warmup(self, batch_sizes: Any = (1,)) -> None: ...

    def infer(self, images: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        if self.closed:
            raise RuntimeError(f"{self.version_dir.name} is not loaded")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine failure")
        self.batches.append(len(images))
        # logits: [version, the image's first pixel]
        return np.stack([np.full(len(images), self.version, np.float32), images[:, 0, 0, 0]], axis=1)

    def close(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}


def _image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, dtype=np.float32)


def test_a_lease_keeps_its_engine_through_a_swap_and_the_old_engine_closes_after_draining() -> None:
    slot = EngineSlot(drain_timeout_s=10)
    with pytest.raises(NoLiveEngineError), slot.lease():
        pass
    first, second = RecordingEngine(1), RecordingEngine(2)
    assert slot.swap("v0001", first) is None
    swapped: list[str | None] = []
    with slot.lease() as held:
        thread = threading.Thread(target=lambda: swapped.append(slot.swap("v0002", second)))
        thread.start()
        time.sleep(0.2)
        with slot.lease() as fresh:
            assert fresh.version == "v0002" and fresh.engine is second  # new requests: the new engine at once
        assert held.version == "v0001" and not first.closed  # the running request keeps its engine
        assert held.engine.infer(_image(0)[None])[0, 0] == 1
        assert not swapped  # swap waits for the drain
    thread.join(5)
    assert swapped == ["v0001"] and first.closed and not second.closed
    slot.close()
    assert second.closed and slot.version is None


def test_a_stuck_lease_does_not_pin_the_old_engine_forever(caplog: pytest.LogCaptureFixture) -> None:
    slot = EngineSlot(drain_timeout_s=0.2)
    first = RecordingEngine(1)
    slot.swap("v0001", first)
    with caplog.at_level(logging.WARNING), slot.lease() as held:
        assert slot.swap("v0002", RecordingEngine(2)) == "v0001"
        assert first.closed and "still had 1 requests" in caplog.text
        with pytest.raises(RuntimeError, match="not loaded"):
            held.engine.infer(_image(0)[None])


def test_the_batcher_groups_concurrent_requests_and_answers_each_with_its_own_row() -> None:
    async def scenario() -> None:
        slot = EngineSlot()
        engine = RecordingEngine(1)
        slot.swap("v0001", engine)
        batcher = MicroBatcher(slot, max_batch=8, max_wait_ms=20, max_queue=100)
        batcher.start()
        try:
            predictions = await asyncio.gather(*(batcher.classify(_image(i)) for i in range(40)))
        finally:
            await batcher.stop()
        assert [p.logits[1] for p in predictions] == list(range(40))
        assert all(p.version == "v0001" for p in predictions)
        assert max(engine.batches) == 8 and sum(engine.batches) == 40 and len(engine.batches) < 40

    asyncio.run(scenario())


def test_a_full_queue_is_refused_at_once_with_a_retry_hint_and_nothing_queued_is_lost() -> None:
    async def scenario() -> None:
        slot = EngineSlot()
        engine = RecordingEngine(1)
        engine.gate.clear()  # the engine is busy: requests pile up
        slot.swap("v0001", engine)
        batcher = MicroBatcher(slot, max_batch=2, max_wait_ms=0, max_queue=4)
        batcher.start()
        try:
            waiting = [asyncio.ensure_future(batcher.classify(_image(0)))]
            await asyncio.to_thread(engine.entered.wait, 10)  # the first request is in the (busy) engine
            waiting += [asyncio.ensure_future(batcher.classify(_image(i))) for i in range(1, 5)]
            await asyncio.sleep(0.05)  # the next 4 fill the queue
            assert batcher.depth == 4
            with pytest.raises(QueueFullError) as refused:
                await batcher.classify(_image(99))
            assert refused.value.retry_after_ms >= 1 and "queue is full" in str(refused.value)
            engine.gate.set()
            answers = await asyncio.gather(*waiting)
        finally:
            await batcher.stop()
        assert sorted(p.logits[1] for p in answers) == list(range(5))

    asyncio.run(scenario())


def test_an_engine_failure_reaches_the_batch_callers_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        slot = EngineSlot()
        engine = RecordingEngine(1)
        slot.swap("v0001", engine)
        batcher = MicroBatcher(slot, max_batch=4, max_wait_ms=1)
        batcher.start()
        try:
            engine.fail_next = True
            with pytest.raises(RuntimeError, match="engine failure"):
                await batcher.classify(_image(1))
            assert (await batcher.classify(_image(2))).logits[1] == 2
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_every_answer_during_swaps_comes_from_a_version_that_was_live_during_its_request() -> None:
    async def scenario() -> None:
        slot = EngineSlot(drain_timeout_s=5)
        slot.swap("v0001", RecordingEngine(1))
        batcher = MicroBatcher(slot, max_batch=4, max_wait_ms=1)
        batcher.start()
        live_since: dict[str, float] = {"v0001": time.monotonic()}
        retired_at: dict[str, float] = {}

        async def swapper() -> None:
            for n in range(2, 6):
                await asyncio.sleep(0.05)
                version = f"v{n:04d}"
                live_since[version] = time.monotonic()
                previous = await asyncio.to_thread(slot.swap, version, RecordingEngine(n))
                assert previous is not None
                retired_at.setdefault(previous, time.monotonic())

        async def client(k: int) -> list[tuple[float, float, str]]:
            out = []
            for i in range(40):
                start = time.monotonic()
                prediction = await batcher.classify(_image(k * 1000 + i))
                assert prediction.logits[1] == k * 1000 + i
                assert prediction.version == f"v{int(prediction.logits[0]):04d}"
                out.append((start, time.monotonic(), prediction.version))
            return out

        try:
            results = await asyncio.gather(swapper(), *(client(k) for k in range(4)))
        finally:
            await batcher.stop()
        for start, end, version in (r for per_client in results[1:] for r in per_client):
            assert live_since[version] <= end and retired_at.get(version, float("inf")) >= start

    asyncio.run(scenario())
