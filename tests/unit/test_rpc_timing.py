"""A failed call's latency is recorded before its status goes out: grpc.aio's `context.abort` sends the status and
only then raises, so a client (or a metrics scrape it triggers) can see the error before code placed after the abort
runs. This is the race that made a scrape right after a NOT_FOUND miss the call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cl_service.api.servicer import _streaming, _timed, _unary
from cl_service.errors import ErrorCode, ServiceError


class _AbortedError(Exception):
    pass


class _Context:
    """What the wrappers use of a grpc.aio ServicerContext; `abort` notes what was observed when the status left."""

    def __init__(self, observed: list[tuple[str, str]]) -> None:
        self.observed = observed
        self.observed_at_abort: list[tuple[str, str]] | None = None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.observed_at_abort = list(self.observed)
        raise _AbortedError(details)


async def _allow(context: Any) -> None:
    pass


def _missing() -> ServiceError:
    return ServiceError(ErrorCode.NOT_FOUND, "SAMPLE_NOT_FOUND", "no sample 7")


def test_a_failed_unary_call_is_counted_before_its_status_is_sent() -> None:
    observed: list[tuple[str, str]] = []

    async def get(request: Any, context: Any) -> Any:
        raise _missing()

    handle = _unary(get, _allow, _timed("GetSample", lambda m, c, s: observed.append((m, c))))
    context = _Context(observed)
    with pytest.raises(_AbortedError):
        asyncio.run(handle(object(), context))  # type: ignore[arg-type]
    assert context.observed_at_abort == [("GetSample", "NOT_FOUND")]
    assert observed == [("GetSample", "NOT_FOUND")]  # once, not again on the way out


def test_a_failed_streaming_call_is_counted_before_its_status_is_sent() -> None:
    observed: list[tuple[str, str]] = []

    async def watch(request: Any, context: Any) -> AsyncIterator[Any]:
        yield "first"
        raise RuntimeError("boom")  # not a ServiceError: answered INTERNAL

    handle = _streaming(watch, _allow, _timed("WatchAlerts", lambda m, c, s: observed.append((m, c))))
    context = _Context(observed)

    async def drain() -> list[Any]:
        return [item async for item in handle(object(), context)]  # type: ignore[arg-type]

    with pytest.raises(_AbortedError):
        asyncio.run(drain())
    assert context.observed_at_abort == [("WatchAlerts", "INTERNAL")]
    assert observed == [("WatchAlerts", "INTERNAL")]


def test_a_call_that_ends_well_is_counted_once_as_ok() -> None:
    observed: list[tuple[str, str]] = []

    async def status(request: Any, context: Any) -> Any:
        return "answer"

    handle = _unary(status, _allow, _timed("GetStatus", lambda m, c, s: observed.append((m, c))))
    assert asyncio.run(handle(object(), _Context(observed))) == "answer"  # type: ignore[arg-type]
    assert observed == [("GetStatus", "OK")]


def test_a_server_stream_closed_by_its_client_is_counted_once_as_cancelled() -> None:
    observed: list[tuple[str, str]] = []

    async def watch(request: Any, context: Any) -> AsyncIterator[Any]:
        while True:
            yield "alert"

    handle = _streaming(watch, _allow, _timed("WatchAlerts", lambda m, c, s: observed.append((m, c))))

    async def read_one_then_close() -> None:
        stream = handle(object(), _Context(observed))  # type: ignore[arg-type]
        assert await anext(stream) == "alert"
        await stream.aclose()  # what grpc.aio does when the client goes away: GeneratorExit at the yield

    asyncio.run(read_one_then_close())
    assert observed == [("WatchAlerts", "CANCELLED")]


def test_a_cancelled_unary_call_is_counted_once_as_cancelled() -> None:
    observed: list[tuple[str, str]] = []

    async def slow(request: Any, context: Any) -> Any:
        await asyncio.sleep(60)

    handle = _unary(slow, _allow, _timed("Predict", lambda m, c, s: observed.append((m, c))))

    async def cancel_it() -> None:
        task = asyncio.ensure_future(handle(object(), _Context(observed)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert observed == [("Predict", "CANCELLED")]
