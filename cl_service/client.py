"""Client SDK: `CameraClient` for cameras (streaming, reconnect, idempotent resend), `Client` for the rest.

A camera streams through `CameraClient.stream(images)`, which yields one `IngestResult` per image.
Every image gets a request id (the caller's, or a generated one); an image stays "outstanding" until its
reply arrives. When the connection breaks, the client reconnects with backoff and resends every
outstanding image with the same request id: the server answers those it had already stored with
ALREADY_STORED and the original sample id, so nothing is stored twice and nothing is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc

from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
DEFAULT_MAX_MESSAGE = 64 << 20


@dataclass(frozen=True)
class CameraImage:
    """One image to send. Leave request_id empty to have one generated."""

    image: bytes
    label: str = ""
    request_id: str = ""
    captured_at: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    """The server's answer about one image."""

    request_id: str
    status: str  # "stored", "already_stored" or "rejected"
    sample_id: int
    sha256: str
    error_reason: str = ""
    error_message: str = ""
    warnings: tuple[str, ...] = ()
    prediction: pb.Prediction | None = None
    label: str = ""

    @property
    def durable(self) -> bool:
        """True when the image is stored (now or before): it survives a crash of the server."""
        return self.status in ("stored", "already_stored")


_STATUS_NAMES = {
    pb.INGEST_STATUS_STORED: "stored",
    pb.INGEST_STATUS_ALREADY_STORED: "already_stored",
    pb.INGEST_STATUS_REJECTED: "rejected",
}


@dataclass(frozen=True)
class Tls:
    """What a client needs for TLS: the CA that signed the server's certificate, and for mutual TLS its own
    certificate chain and key (PEM bytes)."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | os.PathLike[str], cert: str | os.PathLike[str] | None = None,
                   key: str | os.PathLike[str] | None = None) -> Tls:  # fmt: skip
        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        return cls(read(ca) or b"", read(cert), read(key))


def channel(
    target: str, *, token: str | None = None, tls: Tls | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE
) -> grpc.Channel:
    """A channel to `target` (host:port) sized for large images: plaintext, or TLS with `tls`. With `token`, every
    call carries `authorization: Bearer <token>` (default: the CL_SERVICE_TOKEN environment variable, when set)."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if tls is None:
        chan = grpc.insecure_channel(target, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        chan = grpc.secure_channel(target, credentials, options=options)
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    return grpc.intercept_channel(chan, _BearerToken(token)) if token else chan


TOKEN_ENV = "CL_SERVICE_TOKEN"


if TYPE_CHECKING:  # generic in the type stubs only
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class _BearerToken(_UnaryUnary, _UnaryStream, _StreamStream):
    """Adds the token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._pair]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class CameraClient:
    """Streams a camera's images with a bounded window (at most `window` images and `window_bytes` bytes
    unanswered), reconnecting and resending on failure."""

    def __init__(
        self,
        target: str,
        camera_id: str,
        *,
        window: int = 256,
        window_bytes: int = 64 << 20,
        max_reconnects: int = 20,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        token: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        if window < 1 or window_bytes < 1:
            raise ValueError("window and window_bytes must be at least 1")
        self.target = target
        self.camera_id = camera_id
        self.window = window
        self.window_bytes = window_bytes
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        self.token = token
        self.tls = tls
        self.reconnects = 0

    def stream(self, images: Iterable[CameraImage]) -> Iterator[IngestResult]:
        """Send every image; yield one result per image (in reply order, not send order)."""
        state = _StreamState(iter(images), self.camera_id, self.window, self.window_bytes)
        failures = 0
        while not state.finished():
            with channel(self.target, token=self.token, tls=self.tls) as chan:
                stub = pb_grpc.InspectionServiceStub(chan)
                attempt = state.new_attempt()
                try:
                    for reply in stub.Ingest(state.requests(attempt)):
                        result = state.answer(reply)
                        if result is not None:
                            failures = 0
                            yield result
                    if state.finished():
                        return
                    raise _StreamEndedError("the server ended the stream before answering every image")
                except (grpc.RpcError, _StreamEndedError) as exc:
                    code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                    if code not in RETRYABLE or failures >= self.max_reconnects:
                        raise
                    failures += 1
                    self.reconnects += 1
                    delay = min(self.backoff_s[1], self.backoff_s[0] * 2 ** (failures - 1))
                    log.info(
                        "ingest stream broke (%s); reconnecting in %.1f s and resending %d images",
                        code.name,
                        delay,
                        state.outstanding_count(),
                    )
                finally:
                    state.end_attempt(attempt)
            time.sleep(delay)


class _StreamEndedError(Exception):
    pass


class _StreamState:
    """What has been sent and not yet answered, shared by the request and reply sides of a stream."""

    def __init__(self, source: Iterator[CameraImage], camera_id: str, window: int, window_bytes: int) -> None:
        self._source = source
        self._camera_id = camera_id
        self._window = window
        self._window_bytes = window_bytes
        self._outstanding_bytes = 0
        self._outstanding: OrderedDict[str, tuple[pb.IngestRequest, str]] = OrderedDict()
        self._exhausted = False
        self._changed = threading.Condition()
        self._attempt = 0

    def new_attempt(self) -> int:
        with self._changed:
            self._attempt += 1
            return self._attempt

    def end_attempt(self, attempt: int) -> None:
        with self._changed:
            if self._attempt == attempt:
                self._attempt += 1
            self._changed.notify_all()

    def finished(self) -> bool:
        with self._changed:
            return self._exhausted and not self._outstanding

    def outstanding_count(self) -> int:
        with self._changed:
            return len(self._outstanding)

    def requests(self, attempt: int) -> Iterator[pb.IngestRequest]:
        """The request side of one attempt: first resend what is outstanding, then new images."""
        with self._changed:
            resend = [request for request, _ in self._outstanding.values()]
        yield from resend
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._attempt != attempt or self._exhausted or self._has_room())
                if self._attempt != attempt or self._exhausted:
                    return
                request = self._next_request()
                if request is None:
                    return
            yield request

    def _has_room(self) -> bool:
        if not self._outstanding:
            return True  # one image larger than the byte window still goes, alone
        return len(self._outstanding) < self._window and self._outstanding_bytes < self._window_bytes

    def _next_request(self) -> pb.IngestRequest | None:
        try:
            image = next(self._source)
        except StopIteration:
            self._exhausted = True
            self._changed.notify_all()
            return None
        request = _to_request(image, self._camera_id)
        self._outstanding[request.request_id] = (request, image.label)
        self._outstanding_bytes += len(request.image)
        return request

    def answer(self, reply: pb.IngestReply) -> IngestResult | None:
        with self._changed:
            entry = self._outstanding.pop(reply.request_id, None)
            if entry is not None:
                self._outstanding_bytes -= len(entry[0].image)
            self._changed.notify_all()
        if entry is None:
            return None  # a late duplicate answer to a resent image
        return IngestResult(
            request_id=reply.request_id,
            status=_STATUS_NAMES.get(reply.status, "rejected"),
            sample_id=reply.sample_id,
            sha256=reply.image_sha256,
            error_reason=reply.error.reason,
            error_message=reply.error.message,
            warnings=tuple(reply.warnings),
            prediction=reply.prediction if reply.HasField("prediction") else None,
            label=entry[1],
        )


def _to_request(image: CameraImage, camera_id: str) -> pb.IngestRequest:
    request = pb.IngestRequest(
        request_id=image.request_id or uuid.uuid4().hex,
        camera_id=camera_id,
        image=image.image,
        label=image.label,
        metadata=dict(image.metadata),
    )
    if image.captured_at is not None:
        request.captured_at.FromDatetime(image.captured_at)
    return request


class Client:
    """Unary calls for operators and admins (status, samples, health)."""

    def __init__(
        self, target: str, *, timeout_s: float = 30.0, token: str | None = None, tls: Tls | None = None
    ) -> None:
        self._channel = channel(target, token=token, tls=tls)
        self.stub = pb_grpc.InspectionServiceStub(self._channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def status(self) -> pb.ServiceStatus:
        return self.stub.GetStatus(pb.GetStatusRequest(), timeout=self.timeout_s)

    def get_sample(self, sample_id: int, *, include_image: bool = False, include_heatmap: bool = False) -> pb.Sample:
        request = pb.GetSampleRequest(sample_id=sample_id, include_image=include_image, include_heatmap=include_heatmap)
        return self.stub.GetSample(request, timeout=self.timeout_s)

    def classify(self, image: bytes, *, top_k: int = 1) -> pb.Prediction:
        """The live model's prediction for one encoded image (it names the version that produced it)."""
        return self.stub.Classify(pb.ClassifyRequest(image=image, top_k=top_k), timeout=self.timeout_s).prediction

    def submit_corrections(
        self, operator_id: str, corrections: Sequence[tuple[int, str] | pb.Correction]
    ) -> list[pb.CorrectionResult]:
        """Label samples as an operator: (sample_id, class_name) pairs or full Correction messages (new_class,
        note); one result per correction, in order."""
        messages = [
            c if isinstance(c, pb.Correction) else pb.Correction(sample_id=c[0], class_name=c[1]) for c in corrections
        ]
        request = pb.SubmitCorrectionRequest(operator_id=operator_id, corrections=messages)
        return list(self.stub.SubmitCorrection(request, timeout=self.timeout_s).results)

    def review_queue(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        reason: pb.ReviewReason.ValueType = pb.REVIEW_REASON_UNSPECIFIED,
        camera_id: str = "",
    ) -> pb.ListReviewQueueReply:
        """One page of the samples a label would help most (pass next_page_token back for the next page)."""
        request = pb.ListReviewQueueRequest(
            page_size=page_size,
            page_token=page_token,
            reason=reason,
            camera_id=camera_id,
        )
        return self.stub.ListReviewQueue(request, timeout=self.timeout_s)

    def watch_alerts(self, cursor: str = "", *, timeout_s: float | None = None) -> Iterator[pb.AlertEvent]:
        """Follow the alert log: after `cursor` (the last event's cursor you handled), or from the open alerts.
        Blocks while there is nothing new; keep the last cursor and pass it again after a reconnect."""
        return iter(self.stub.WatchAlerts(pb.WatchAlertsRequest(cursor=cursor), timeout=timeout_s))

    def acknowledge_alert(self, alert_id: int, operator_id: str, note: str = "") -> pb.Alert:
        request = pb.AcknowledgeAlertRequest(alert_id=alert_id, operator_id=operator_id, note=note)
        return self.stub.AcknowledgeAlert(request, timeout=self.timeout_s)

    def trigger_update(self, requested_by: str, reason: str = "") -> pb.UpdateRun:
        """Queue an update run now (joins the run already queued, if any)."""
        request = pb.TriggerUpdateRequest(requested_by=requested_by, reason=reason)
        return self.stub.TriggerUpdate(request, timeout=self.timeout_s)

    def watch_update(self, run_id: int = 0, *, timeout_s: float | None = None) -> Iterator[pb.UpdateProgress]:
        """Progress reports of a run (0: the current or latest one) until it ends."""
        return iter(self.stub.WatchUpdate(pb.WatchUpdateRequest(run_id=run_id), timeout=timeout_s))

    def list_models(self, *, include_rejected: bool = False) -> pb.ListModelsReply:
        """The kept model versions, newest first, and which one is live."""
        request = pb.ListModelsRequest(include_rejected=include_rejected)
        return self.stub.ListModels(request, timeout=self.timeout_s)

    def activate_model(self, version: str, *, requested_by: str, reason: str = "") -> pb.ModelVersion:
        """Make a kept, accepted version live (promotion or rollback). The server builds and checks its engine
        first, so this can take a while (the client's timeout applies)."""
        request = pb.ActivateModelRequest(version=version, requested_by=requested_by, reason=reason)
        return self.stub.ActivateModel(request, timeout=self.timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the server answers health checks with SERVING (or raise TimeoutError)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server did not become ready within {timeout_s} s")
