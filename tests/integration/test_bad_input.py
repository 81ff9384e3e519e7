"""Hostile input against the real server: each bad message gets its own error, the stream goes on,
the server survives, and nothing acknowledged is lost."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from cl_service.api.servicer import _UNARY, SERVICE_NAME
from cl_service.config import Settings, load_settings
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, png_bytes

pytestmark = pytest.mark.integration

MAX_IMAGE_BYTES = 200_000


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        bind="127.0.0.1:0",
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=4_000_000,
        allowed_classes=["good", "scratch"],
        shutdown_grace_s=1.0,
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels but carries almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def encoded(fmt: str, size: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def request(request_id: str, image: bytes, **fields: object) -> bytes:
    message = pb.IngestRequest(request_id=request_id, camera_id="cam-x", image=image)
    for name, value in fields.items():
        if name == "metadata":
            message.metadata.update(value)  # type: ignore[arg-type]
        else:
            setattr(message, name, value)
    return message.SerializeToString()


def raw_ingest(target: str, messages: list[bytes]) -> list[pb.IngestReply]:
    """Stream raw bytes (so that malformed protobuf can be sent) and collect the replies."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.stream_stream(
            "/cl_service.v1.InspectionService/Ingest",
            request_serializer=lambda data: data,
            response_deserializer=pb.IngestReply.FromString,
        )
        return list(call(iter(messages)))


def _hostile_cases() -> list[tuple[str, bytes, str]]:
    """(case, raw message, expected reason or "" for stored)."""
    good_png = png_bytes(1)
    jpeg = encoded("JPEG", 128)
    unknown_field = request("unknown-field", png_bytes(2)) + b"\x98\x06\x01"  # field 99, varint 1
    bad_utf8 = b"\x0a\x03\xff\xfe\xfd" + b"\x12\x05cam-x"  # request_id (field 1) holds invalid UTF-8
    return [
        ("good", request("good-1", good_png), ""),
        ("empty image", request("empty", b""), "IMAGE_EMPTY"),
        ("garbage bytes", request("garbage", b"this is not an image" * 10), "IMAGE_UNDECODABLE"),
        ("truncated png", request("trunc-png", good_png[: len(good_png) // 2]), "IMAGE_TRUNCATED"),
        ("truncated jpeg", request("trunc-jpeg", jpeg[: len(jpeg) * 2 // 3]), "IMAGE_TRUNCATED"),
        ("png header only", request("png-magic", good_png[:40]), "IMAGE_UNDECODABLE"),
        ("gif", request("gif", encoded("GIF")), "IMAGE_FORMAT_UNSUPPORTED"),
        ("ppm", request("ppm", encoded("PPM")), "IMAGE_FORMAT_UNSUPPORTED"),
        ("over the byte cap", request("huge", encoded("PNG", 600)), "IMAGE_TOO_LARGE"),
        ("decompression bomb", request("bomb", crafted_png(60_000, 60_000)), "IMAGE_TOO_MANY_PIXELS"),
        ("zero-sized", request("zero", crafted_png(0, 16)), "IMAGE_UNDECODABLE"),
        ("label breaks the rule", request("label-1", png_bytes(3), label="Scratch!"), "LABEL_INVALID"),
        ("label too long", request("label-2", png_bytes(4), label="a" * 65), "LABEL_INVALID"),
        ("label not allowed", request("label-3", png_bytes(5), label="pit"), "LABEL_NOT_ALLOWED"),
        (
            "missing camera id",
            pb.IngestRequest(request_id="no-cam", image=png_bytes(6)).SerializeToString(),
            "CAMERA_ID_MISSING",
        ),
        ("missing request id", request("", png_bytes(7)), "REQUEST_ID_INVALID"),
        ("hostile request id", request("../../etc/passwd", png_bytes(8)), "REQUEST_ID_INVALID"),
        (
            "too much metadata",
            request("meta", png_bytes(9), metadata={f"k{i}": "v" for i in range(40)}),
            "METADATA_INVALID",
        ),
        ("not protobuf", b"\xff\xff\xff\xff\xff", "MESSAGE_MALFORMED"),
        ("truncated protobuf", request("cut", png_bytes(10))[:30], "MESSAGE_MALFORMED"),
        ("invalid utf-8 in a string", bad_utf8, "MESSAGE_MALFORMED"),
        ("unknown field", unknown_field, ""),
        ("good after all that", request("good-2", png_bytes(11), label="scratch"), ""),
    ]


def test_every_bad_message_gets_its_own_error_and_the_stream_goes_on(server: ServerHandle) -> None:
    cases = _hostile_cases()
    replies = {reply.sequence: reply for reply in raw_ingest(server.target, [raw for _, raw, _ in cases])}

    assert sorted(replies) == list(range(1, len(cases) + 1)), "every message gets exactly one reply"
    for sequence, (case, _, reason) in enumerate(cases, start=1):
        reply = replies[sequence]
        if reason:
            assert reply.status == pb.INGEST_STATUS_REJECTED, case
            assert (reply.error.reason, reply.error.code) == (reason, grpc.StatusCode.INVALID_ARGUMENT.value[0]), case
            assert reply.error.message, case
            assert reply.sample_id == 0, case
        else:
            assert reply.status == pb.INGEST_STATUS_STORED, f"{case}: {reply.error}"
    assert any("unknown fields [99]" in w for w in replies[len(cases) - 1].warnings)
    assert server.running.core.store.counts().samples == 3
    assert server.running.core.store.integrity_problems(verify_bytes=True) == []


def test_a_message_over_the_transport_limit_ends_only_its_stream(server: ServerHandle) -> None:
    limit = server.running.core.settings.transport_max_message_bytes
    stored_first = pb.IngestRequest(request_id="before", camera_id="cam-t", image=png_bytes(20))
    oversized = pb.IngestRequest(request_id="giant", camera_id="cam-t", image=b"\x00" * (limit + 1024))

    def messages() -> Iterator[pb.IngestRequest]:
        yield stored_first
        while not acked:
            import time

            time.sleep(0.01)
        yield oversized

    acked: list[pb.IngestReply] = []
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = pb_grpc.InspectionServiceStub(channel).Ingest(messages())
        with pytest.raises(grpc.RpcError) as ended:
            for reply in call:
                acked.append(reply)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [r.status for r in acked] == [pb.INGEST_STATUS_STORED]

    # The server survives and the acknowledged image is there; a new stream works.
    replies = raw_ingest(server.target, [request("after", png_bytes(21))])
    assert [r.status for r in replies] == [pb.INGEST_STATUS_STORED]
    assert server.running.core.store.get_sample(acked[0].sample_id) is not None


def test_unary_rpcs_answer_bad_input_with_clear_status_codes(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        raw_get = channel.unary_unary(
            "/cl_service.v1.InspectionService/GetSample",
            request_serializer=lambda data: data,
            response_deserializer=pb.Sample.FromString,
        )
        checks: list[tuple[object, grpc.StatusCode, str]] = [
            (lambda: raw_get(b"\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_MALFORMED"),
            (
                lambda: stub.GetSample(pb.GetSampleRequest(sample_id=-5)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SAMPLE_ID_INVALID",
            ),
            (
                lambda: stub.GetSample(pb.GetSampleRequest(sample_id=424242)),
                grpc.StatusCode.NOT_FOUND,
                "SAMPLE_NOT_FOUND",
            ),
            (
                lambda: stub.Classify(pb.ClassifyRequest(image=png_bytes(1))),
                grpc.StatusCode.FAILED_PRECONDITION,
                "NO_LIVE_MODEL",
            ),
            (
                lambda: stub.SubmitCorrection(pb.SubmitCorrectionRequest()),
                grpc.StatusCode.INVALID_ARGUMENT,
                "OPERATOR_ID_INVALID",
            ),
            (
                lambda: stub.ListReviewQueue(pb.ListReviewQueueRequest(page_token="%%%")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "PAGE_TOKEN_INVALID",
            ),
            (
                lambda: stub.ActivateModel(pb.ActivateModelRequest(version="v0001", requested_by="x")),
                grpc.StatusCode.NOT_FOUND,
                "MODEL_VERSION_NOT_FOUND",
            ),
            (
                lambda: list(stub.WatchAlerts(pb.WatchAlertsRequest(cursor="-1"))),
                grpc.StatusCode.INVALID_ARGUMENT,
                "CURSOR_INVALID",
            ),
            (
                lambda: stub.AcknowledgeAlert(pb.AcknowledgeAlertRequest(alert_id=7, operator_id="op")),
                grpc.StatusCode.NOT_FOUND,
                "ALERT_NOT_FOUND",
            ),
            (
                lambda: list(stub.WatchUpdate(pb.WatchUpdateRequest())),
                grpc.StatusCode.NOT_FOUND,
                "UPDATE_RUN_NOT_FOUND",
            ),
            (
                lambda: list(stub.WatchUpdate(pb.WatchUpdateRequest(run_id=-3))),
                grpc.StatusCode.INVALID_ARGUMENT,
                "RUN_ID_INVALID",
            ),
            (
                lambda: stub.TriggerUpdate(pb.TriggerUpdateRequest(requested_by="a b")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUESTED_BY_INVALID",
            ),
        ]
        for call, code, reason in checks:
            with pytest.raises(grpc.RpcError) as error:
                call()  # type: ignore[operator]
            assert error.value.code() == code
            assert error.value.details().startswith(reason)
            assert ("cl-error-reason", reason) in tuple(error.value.trailing_metadata() or ())
        for name in _UNARY:  # bytes that are no protobuf message at all, to every unary RPC
            raw = channel.unary_unary(f"/{SERVICE_NAME}/{name}", request_serializer=lambda data: data)
            with pytest.raises(grpc.RpcError) as error:
                raw(b"\xff\xff\xff")
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert error.value.details().startswith("MESSAGE_MALFORMED"), name
        assert stub.GetStatus(pb.GetStatusRequest()).server_version


def test_health_and_reflection_are_on(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "cl_service.v1.InspectionService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"cl_service.v1.InspectionService", "grpc.health.v1.Health"} <= services
