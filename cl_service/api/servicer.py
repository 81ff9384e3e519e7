"""The InspectionService servicer: each RPC converts its request, calls the core, converts the reply.

Handlers are registered with deserializers that never raise: a message that is not valid protobuf
reaches the handler as `Malformed`, so that Ingest can answer it with its own error and read on,
instead of gRPC ending the stream. Core errors become status codes in one place, `_unary`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from cl_service.alerts import alert_snapshot, parse_cursor
from cl_service.api import convert
from cl_service.app import ModelView, ServiceCore
from cl_service.auth import Authenticator
from cl_service.errors import ErrorCode, ServiceError, invalid, store_unavailable
from cl_service.ingest.images import decode_checked, decode_image
from cl_service.ingest.ratelimit import CameraRates
from cl_service.ingest.service import IngestOutcome, IngestStatus
from cl_service.metrics import ServiceMetrics
from cl_service.operator import CorrectionRequest, review_queue, submit_corrections
from cl_service.scheduler import TRIGGER_MANUAL
from cl_service.serving.batcher import QueueFullError
from cl_service.serving.slot import NoLiveEngineError
from cl_service.v1 import inspection_pb2 as pb
from replay_store import runs
from replay_store.db import is_unreachable, short_reason
from replay_store.naming import identifier_problem

log = logging.getLogger(__name__)

SERVICE_NAME = "cl_service.v1.InspectionService"
REASON_METADATA_KEY = "cl-error-reason"
MAX_TOP_K = 20
INGEST_TOP_K = 3  # classes in an Ingest reply's prediction
WATCH_UPDATE_POLL_S = 0.5

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes are not a valid message of the expected type."""

    type_name: str
    problem: str

    def error(self) -> ServiceError:
        return invalid("MESSAGE_MALFORMED", f"the request is not a valid {self.type_name}: {self.problem}")


def safe_parser(message_type: type[M]) -> Callable[[bytes], M | Malformed]:
    def parse(data: bytes) -> M | Malformed:
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            return Malformed(message_type.DESCRIPTOR.full_name, str(exc))
        return message

    return parse


def unknown_field_warnings(message: Message) -> list[str]:
    numbers = sorted({field.field_number for field in UnknownFieldSet(message)})  # type: ignore[attr-defined]
    if not numbers:
        return []
    return [f"unknown fields {numbers} were ignored (a newer client? this server speaks cl_service.v1)"]


class _Budget:
    """Image bytes held by all ingest streams together; a stream waits here before reading on."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> int:
        size = min(size, self._limit)  # one message larger than the whole budget still gets through alone
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + size <= self._limit)
            self._used += size
        return size

    async def release(self, size: int) -> None:
        async with self._changed:
            self._used -= size
            self._changed.notify_all()


class InspectionServicer:
    """Implements cl_service.v1.InspectionService on a ServiceCore."""

    def __init__(self, core: ServiceCore, metrics: ServiceMetrics | None = None) -> None:
        self.core = core
        self.metrics = metrics
        self._budget = _Budget(core.settings.ingest_max_in_flight_bytes)
        self._rates = CameraRates(core.settings.camera_max_images_per_s)

    # ------------------------------------------------------------------------------------- Ingest

    async def Ingest(  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[pb.IngestRequest | Malformed], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.IngestReply]:
        window = asyncio.Semaphore(self.core.settings.stream_max_in_flight)
        replies: asyncio.Queue[pb.IngestReply | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, window, replies))
        self.core.active_streams += 1
        try:
            while True:
                reply = await replies.get()
                if reply is None:
                    break
                if isinstance(reply, BaseException):
                    raise reply
                yield reply
                window.release()
        finally:
            self.core.active_streams -= 1
            if not reader.done():
                reader.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.IngestRequest | Malformed],
        window: asyncio.Semaphore,
        replies: asyncio.Queue[pb.IngestReply | BaseException | None],
    ) -> None:
        pending: set[asyncio.Task[None]] = set()
        sequence = 0
        ending: BaseException | None = None
        try:
            async for request in requests:
                await window.acquire()
                if self._rates.limited and not isinstance(request, Malformed):
                    await self._rates.wait(request.camera_id)
                sequence += 1
                task = asyncio.create_task(self._answer(sequence, request, replies))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the transport ended the stream; answer what was read
            log.info("ingest stream ended by the transport: %s", exc)
            ending = exc
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await replies.put(ending)

    async def _answer(
        self,
        sequence: int,
        request: pb.IngestRequest | Malformed,
        replies: asyncio.Queue[pb.IngestReply | BaseException | None],
    ) -> None:
        if isinstance(request, Malformed):
            await replies.put(convert.ingest_reply(sequence, "", IngestOutcome.rejected(request.error()), []))
            return
        held = await self._budget.acquire(len(request.image))
        try:
            outcome = await self.core.ingest.ingest(convert.ingest_item(request))
            if self.metrics is not None:
                self.metrics.observe_ingest(outcome.status.value, len(request.image))
            warnings = unknown_field_warnings(request)
            prediction = None
            if outcome.status is not IngestStatus.REJECTED and self.core.live.slot.version is not None:
                prediction = await self._predict(request.image, warnings)
        finally:
            await self._budget.release(held)
        await replies.put(convert.ingest_reply(sequence, request.request_id, outcome, warnings, prediction))

    async def _predict(self, image: bytes, warnings: list[str]) -> pb.Prediction | None:
        """The live model's prediction for an image the store accepted; None (and a warning when it matters) where
        there is none: the image is stored either way."""
        try:
            decoded = await asyncio.to_thread(decode_image, image)
            return convert.prediction(await self.core.live.classify(decoded), INGEST_TOP_K)
        except NoLiveEngineError:
            return None
        except QueueFullError as exc:
            warnings.append(f"stored without a prediction: {exc}")
        except Exception as exc:  # a stored image never fails for want of a prediction
            log.exception("predicting a stored image failed")
            warnings.append(f"stored without a prediction: {exc}")
        return None

    # ------------------------------------------------------------------------------------- unary RPCs

    async def GetSample(self, request: pb.GetSampleRequest, context: Any) -> pb.Sample:  # noqa: N802
        if request.sample_id <= 0:
            raise invalid("SAMPLE_ID_INVALID", "sample_id must be a positive sample id")
        view = await asyncio.to_thread(
            self.core.get_sample,
            request.sample_id,
            include_image=request.include_image,
            include_heatmap=request.include_heatmap,
        )
        return convert.sample(view)

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.ServiceStatus:  # noqa: N802
        return convert.status(await asyncio.to_thread(self.core.status))

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyReply:  # noqa: N802
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise invalid("TOP_K_INVALID", f"top_k must be 0..{MAX_TOP_K} (0 means 1), got {request.top_k}")
        settings = self.core.settings
        image = await asyncio.to_thread(
            decode_checked, request.image, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
        try:
            classified = await self.core.live.classify(image)
        except NoLiveEngineError as exc:
            raise ServiceError(ErrorCode.FAILED_PRECONDITION, "NO_LIVE_MODEL", str(exc)) from None
        except QueueFullError as exc:
            raise ServiceError(
                ErrorCode.RESOURCE_EXHAUSTED,
                "CLASSIFY_QUEUE_FULL",
                str(exc),
                metadata=(("retry-after-ms", str(exc.retry_after_ms)),),
            ) from None
        return pb.ClassifyReply(prediction=convert.prediction(classified, request.top_k))

    async def SubmitCorrection(  # noqa: N802
        self, request: pb.SubmitCorrectionRequest, context: Any
    ) -> pb.SubmitCorrectionReply:
        corrections = [CorrectionRequest(c.sample_id, c.class_name, c.new_class, c.note) for c in request.corrections]
        results = await asyncio.to_thread(
            submit_corrections,
            self.core.store,
            request.operator_id,
            corrections,
            allowed_classes=self.core.settings.allowed_classes,
        )
        return pb.SubmitCorrectionReply(results=[convert.correction_result(result) for result in results])

    async def ListReviewQueue(  # noqa: N802
        self, request: pb.ListReviewQueueRequest, context: Any
    ) -> pb.ListReviewQueueReply:
        page = await asyncio.to_thread(
            review_queue,
            self.core.store,
            page_size=request.page_size,
            page_token=request.page_token,
            reason=convert.review_reason(request.reason),
            camera_id=request.camera_id,
        )
        return pb.ListReviewQueueReply(
            items=[convert.review_item(item) for item in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def AcknowledgeAlert(self, request: pb.AcknowledgeAlertRequest, context: Any) -> pb.Alert:  # noqa: N802
        acknowledged = await asyncio.to_thread(
            self.core.alerts.acknowledge, request.alert_id, request.operator_id, request.note
        )
        return convert.alert(alert_snapshot(acknowledged))

    async def TriggerUpdate(self, request: pb.TriggerUpdateRequest, context: Any) -> pb.UpdateRun:  # noqa: N802
        problem = identifier_problem("requested_by", request.requested_by)
        if problem:
            raise invalid("REQUESTED_BY_INVALID", problem)
        if len(request.reason) > 2048:
            raise invalid("REASON_TOO_LONG", f"reason is at most 2048 characters, got {len(request.reason)}")
        run = await asyncio.to_thread(
            self.core.updates.trigger, TRIGGER_MANUAL, requested_by=request.requested_by, reason=request.reason
        )
        return convert.update_run(run)

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsReply:  # noqa: N802
        views = await asyncio.to_thread(self.core.list_models, include_rejected=request.include_rejected)
        live = next((view.row.version for view in views if view.row.live), "")
        return pb.ListModelsReply(models=[convert.model_version(view) for view in views], live_version=live)

    async def ActivateModel(self, request: pb.ActivateModelRequest, context: Any) -> pb.ModelVersion:  # noqa: N802
        for name, value, limit in (("requested_by", request.requested_by, 128), ("reason", request.reason, 2048)):
            if len(value) > limit:
                raise invalid(f"{name.upper()}_TOO_LONG", f"{name} is at most {limit} characters, got {len(value)}")
        row = await self.core.live.activate(request.version, requested_by=request.requested_by, reason=request.reason)
        views = await asyncio.to_thread(self.core.list_models, include_rejected=False)
        view = next((view for view in views if view.row.version == row.version), None)
        return convert.model_version(view or ModelView(row, []))

    async def WatchAlerts(  # noqa: N802
        self, request: pb.WatchAlertsRequest, context: Any
    ) -> AsyncIterator[pb.AlertEvent]:
        book = self.core.alerts
        cursor = parse_cursor(request.cursor)
        if cursor is None:  # the open alerts' events first, then everything after the newest event seen then
            cursor = await asyncio.to_thread(book.newest_event_id)
            for event in await asyncio.to_thread(book.open_alert_events):
                if (event.id or 0) <= cursor:
                    yield convert.alert_event(event)
        while True:
            events = await asyncio.to_thread(book.events_after, cursor)
            for event in events:
                yield convert.alert_event(event)
                cursor = event.id or cursor
            if not events:
                await book.wait_for_news(self.core.settings.alert_poll_s)

    async def WatchUpdate(  # noqa: N802
        self, request: pb.WatchUpdateRequest, context: Any
    ) -> AsyncIterator[pb.UpdateProgress]:
        store = self.core.store
        if request.run_id < 0:
            raise invalid("RUN_ID_INVALID", "run_id is a run's id, or 0 for the current one")
        run = await asyncio.to_thread(runs.get, store, request.run_id) if request.run_id else None
        if run is None and request.run_id == 0:
            run = await asyncio.to_thread(runs.current_or_latest, store)
        if run is None or run.id is None:
            raise ServiceError(ErrorCode.NOT_FOUND, "UPDATE_RUN_NOT_FOUND", f"there is no update run {request.run_id}")
        last: pb.UpdateProgress | None = None
        while True:
            progress = convert.update_progress(run)
            unchanged = last is not None and progress.SerializeToString() == last.SerializeToString()
            if not unchanged:
                yield progress
                last = progress
            if run.state in runs.TERMINAL:
                return
            await asyncio.sleep(WATCH_UPDATE_POLL_S)
            run = await asyncio.to_thread(runs.get, store, run.id) or run


# ------------------------------------------------------------------------------------- registration

_UNARY = {
    "Classify": pb.ClassifyRequest,
    "SubmitCorrection": pb.SubmitCorrectionRequest,
    "ListReviewQueue": pb.ListReviewQueueRequest,
    "GetSample": pb.GetSampleRequest,
    "AcknowledgeAlert": pb.AcknowledgeAlertRequest,
    "TriggerUpdate": pb.TriggerUpdateRequest,
    "ListModels": pb.ListModelsRequest,
    "ActivateModel": pb.ActivateModelRequest,
    "GetStatus": pb.GetStatusRequest,
}
_SERVER_STREAMING = {"WatchAlerts": pb.WatchAlertsRequest, "WatchUpdate": pb.WatchUpdateRequest}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: ServiceError) -> None:
    context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason), *exc.metadata))
    await context.abort(grpc.StatusCode[exc.code.name], f"{exc.reason}: {exc.message}")


def _unary(
    method: Callable[[Any, Any], Awaitable[Message]], guard: Guard, timer: Timer
) -> Callable[[Any, Any], Awaitable[Message]]:
    async def handle(request: Message | Malformed, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        timing = timer()
        try:
            await guard(context)
            if isinstance(request, Malformed):
                raise request.error()
            response = await method(request, context)
        except asyncio.CancelledError:
            timing.cancelled()
            raise
        except Exception as exc:
            await _fail(context, timing, exc, method)
            raise AssertionError("unreachable: abort raises") from exc
        timing.done()
        return response

    return handle


def _streaming(
    method: Callable[[Any, Any], AsyncIterator[Message]], guard: Guard, timer: Timer
) -> Callable[[Any, Any], AsyncIterator[Message]]:
    async def handle(
        request: Message | Malformed, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Message]:
        timing = timer()
        try:
            await guard(context)
            if isinstance(request, Malformed):
                raise request.error()
            async for item in method(request, context):
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            timing.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001 - a ServiceError is answered as such, anything else by _unexpected
            await _fail(context, timing, exc, method)
        else:
            timing.done()

    return handle


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], timing: _Timing, exc: Exception, method: Callable[..., Any]
) -> None:
    """Answers a failed call with its error. The call's time is recorded first: the client sees the status as soon as
    the abort sends it, and a metrics scrape made after that must already count the call."""
    error = exc if isinstance(exc, ServiceError) else _unexpected(exc, method)
    timing.failed(error)
    timing.done()
    await _abort(context, error)


def _unexpected(exc: Exception, method: Callable[..., Any]) -> ServiceError:
    """The answer to an exception the method did not turn into a ServiceError: UNAVAILABLE when the store's database
    cannot be reached (retry), INTERNAL (with the traceback in the log) for anything else."""
    name = getattr(method, "__name__", "rpc")
    if is_unreachable(exc):
        log.warning("%s: the store's database cannot be reached: %s", name, short_reason(exc))
        return store_unavailable(short_reason(exc))
    log.exception("unexpected error in %s", name)
    return ServiceError(ErrorCode.INTERNAL, "INTERNAL", f"unexpected server error: {exc}")


def generic_handler(
    servicer: InspectionServicer, authenticator: Authenticator | None = None
) -> grpc.GenericRpcHandler[Any, Any]:
    """The method handlers of InspectionService, with never-raising deserializers; with an authenticator, every
    call's token and role are checked before the method runs."""
    observe = servicer.metrics.observe_rpc if servicer.metrics is not None else _ignore
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Ingest": grpc.stream_stream_rpc_method_handler(
            _streaming(servicer.Ingest, _guard(authenticator, "Ingest"), _timed("Ingest", observe)),
            request_deserializer=safe_parser(pb.IngestRequest),
            response_serializer=pb.IngestReply.SerializeToString,
        )
    }
    for name, request_type in _UNARY.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name), _guard(authenticator, name), _timed(name, observe)),
            request_deserializer=safe_parser(request_type),
            response_serializer=lambda message: message.SerializeToString(),
        )
    for name, request_type in _SERVER_STREAMING.items():
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            _streaming(getattr(servicer, name), _guard(authenticator, name), _timed(name, observe)),
            request_deserializer=safe_parser(request_type),
            response_serializer=lambda message: message.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


if TYPE_CHECKING:  # generic in the type stubs only
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    _GenericHandler = grpc.GenericRpcHandler


class LateHandler(_GenericHandler):
    """The service's handlers (`inner`) once the core is open; until then every call of the service is answered
    UNAVAILABLE STORE_NOT_OPEN (health says NOT_SERVING meanwhile), each with the handler of its own kind."""

    def __init__(self) -> None:
        self.inner: grpc.GenericRpcHandler[Any, Any] | None = None
        error = ServiceError(
            ErrorCode.UNAVAILABLE, "STORE_NOT_OPEN", "the service is starting: its store is not open yet, retry shortly"
        )

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _abort(context, error)

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await _abort(context, error)
            yield None  # never reached: makes this an async generator

        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Ingest": grpc.stream_stream_rpc_method_handler(refuse_stream),
            **{name: grpc.unary_unary_rpc_method_handler(refuse) for name in _UNARY},
            **{name: grpc.unary_stream_rpc_method_handler(refuse_stream) for name in _SERVER_STREAMING},
        }
        self._starting = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return (self.inner or self._starting).service(handler_call_details)


Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
Timer = Callable[[], "_Timing"]


def _ignore(method: str, code: str, seconds: float) -> None:
    pass


class _Timing:
    """Measures one call from its start; `code` is set where the call ends (OK unless an error is seen)."""

    def __init__(self, method: str, observe: Callable[[str, str, float], None]) -> None:
        self.method, self.observe = method, observe
        self.code = "OK"
        self.started = time.perf_counter()

    def failed(self, exc: ServiceError) -> None:
        self.code = exc.code.name

    def cancelled(self) -> None:
        self.code = "CANCELLED"
        self.done()

    def done(self) -> None:
        self.observe(self.method, self.code, time.perf_counter() - self.started)


def _timed(method: str, observe: Callable[[str, str, float], None]) -> Timer:
    return lambda: _Timing(method, observe)


def _guard(authenticator: Authenticator | None, method: str) -> Guard:
    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if authenticator is not None:
            await authenticator.check(method, context.invocation_metadata())

    return check
