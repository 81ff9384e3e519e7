"""Property-based tests of every RPC's request handling on one real server: arbitrary bytes as the request, and
well-formed requests with arbitrary field values (hypothesis). Every call gets a clear status (never UNKNOWN,
never INTERNAL: a server bug would show as one of those), and the server keeps serving and keeps what it stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from cl_service.v1 import inspection_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = pb.DESCRIPTOR.services_by_name["InspectionService"]
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
STREAM_TIMEOUT_S = 0.5  # endless streams (WatchAlerts) end with DEADLINE_EXCEEDED: a clear status
EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("properties")
    config = load_settings(data_dir=folder / "data", bind="127.0.0.1:0", max_image_bytes=200_000, alert_poll_s=0.1)
    with server_in_thread(config) as running:
        address = f"127.0.0.1:{running.port}"
        image = encode_image(next(SurfaceGenerator(SurfaceConfig(width=48, height=48, seed=0)).stream(0, 1)).pixels)
        assert all(r.durable for r in CameraClient(address, "cam-1").stream([CameraImage(image, label="good")]))
        yield address
        with Client(address) as client:
            assert client.status().samples_total >= 1  # what was stored before the storm is still there


def _call(channel: grpc.Channel, method: Any, payload: bytes) -> grpc.StatusCode:
    path = f"/{SERVICE.full_name}/{method.name}"
    identity = {"request_serializer": lambda data: data, "response_deserializer": lambda data: data}
    try:
        if method.client_streaming:
            list(channel.stream_stream(path, **identity)(iter([payload, payload]), timeout=10))
        elif method.server_streaming:
            list(channel.unary_stream(path, **identity)(payload, timeout=STREAM_TIMEOUT_S))
        else:
            channel.unary_unary(path, **identity)(payload, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: st.text(max_size=300),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=2000),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
}


def _message(descriptor: Any, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of `descriptor` with arbitrary values in arbitrary subsets of its fields."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            value: st.SearchStrategy[Any] = _message(field.message_type, depth + 1)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            value = st.integers(-3, 12)
        elif field.type in SCALARS:
            value = SCALARS[field.type]
        else:
            continue
        fields[field.name] = st.lists(value, max_size=3) if field.is_repeated else value

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = pb.__dict__[descriptor.name]() if depth == 0 else _class_of(descriptor)()
        for name, strategy in fields.items():
            if draw(st.booleans()):
                value = draw(strategy)
                target_field = descriptor.fields_by_name[name]
                if target_field.type == FieldDescriptor.TYPE_MESSAGE:
                    values = value if target_field.is_repeated else [value]
                    for item in values:
                        part = getattr(message, name).add() if target_field.is_repeated else getattr(message, name)
                        part.MergeFromString(item)
                elif target_field.is_repeated:
                    getattr(message, name).extend(value)
                else:
                    setattr(message, name, value)
        return message.SerializeToString()  # type: ignore[no-any-return]

    return build()


def _class_of(descriptor: Any) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_arbitrary_bytes_get_a_clear_status(target: str, method: Any) -> None:
    with grpc.insecure_channel(target) as channel:

        @EXAMPLES
        @given(payload=st.binary(max_size=4000))
        def check(payload: bytes) -> None:
            assert _call(channel, method, payload) not in BAD_CODES

        check()


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_arbitrary_field_values_get_a_clear_status(target: str, method: Any) -> None:
    with grpc.insecure_channel(target) as channel:

        @EXAMPLES
        @given(payload=_message(method.input_type))
        def check(payload: bytes) -> None:
            assert _call(channel, method, payload) not in BAD_CODES

        check()
