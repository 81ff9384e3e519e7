"""Ingest against the real server on a free loopback port, with a real SQLite file and real blobs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator

import grpc
import pytest

from cl_service.client import CameraClient, CameraImage, Client
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from replay_store.store import Store
from tests.conftest import ServerHandle, png_bytes

pytestmark = pytest.mark.integration


def _store_of(server: ServerHandle) -> Store:
    return server.running.core.store


def test_thousand_images_are_stored_and_read_back_byte_identical(server: ServerHandle) -> None:
    images = [
        CameraImage(png_bytes(i), label="scratch" if i % 10 == 0 else "", request_id=f"r{i}") for i in range(1000)
    ]
    results = list(CameraClient(server.target, "cam-1").stream(images))

    assert len(results) == 1000
    assert {result.status for result in results} == {"stored"}
    by_request = {result.request_id: result for result in results}
    with Client(server.target) as client:
        for index, image in enumerate(images):
            result = by_request[f"r{index}"]
            sample = client.get_sample(result.sample_id, include_image=True)
            assert sample.image == image.image
            assert sample.image_sha256 == hashlib.sha256(image.image).hexdigest() == result.sha256
            assert sample.camera_id == "cam-1" and sample.request_id == f"r{index}"
            if image.label:
                assert sample.effective_label.class_name == "scratch"
                assert sample.effective_label.source == pb.LABEL_SOURCE_CAMERA
        status = client.status()
    assert status.samples_total == 1000
    assert status.samples_unlabeled == 900
    assert [(c.class_name, c.camera_labels) for c in status.classes] == [("scratch", 100)]
    assert _store_of(server).integrity_problems(verify_bytes=True) == []


def test_resend_after_a_broken_stream_stores_nothing_twice(server: ServerHandle) -> None:
    images = [CameraImage(png_bytes(i), request_id=f"req-{i}") for i in range(120)]
    # First connection: send everything, read 40 replies, then drop the connection.
    channel = grpc.insecure_channel(server.target)
    call = pb_grpc.InspectionServiceStub(channel).Ingest(
        iter([pb.IngestRequest(request_id=i.request_id, camera_id="cam-r", image=i.image) for i in images])
    )
    first = {}
    for reply in call:
        first[reply.request_id] = reply.sample_id
        if len(first) == 40:
            call.cancel()
            break
    channel.close()

    # Reconnect and resend everything with the same request ids, as CameraClient does.
    results = list(CameraClient(server.target, "cam-r").stream(images))
    assert len(results) == 120
    for result in results:
        assert result.durable
        if result.request_id in first:
            assert result.status == "already_stored"
            assert result.sample_id == first[result.request_id]
    assert len({result.sample_id for result in results}) == 120
    assert _store_of(server).counts().samples == 120

    # A third time: everything is already stored, with the same ids.
    again = {r.request_id: r for r in CameraClient(server.target, "cam-r").stream(images)}
    assert {r.status for r in again.values()} == {"already_stored"}
    assert {r.request_id: r.sample_id for r in results} == {k: r.sample_id for k, r in again.items()}


def test_identical_bytes_are_stored_once_but_each_capture_is_a_sample(server: ServerHandle) -> None:
    image = png_bytes(7)
    results = list(
        CameraClient(server.target, "cam-d").stream([CameraImage(image, request_id=f"d{i}") for i in range(5)])
    )
    assert {r.status for r in results} == {"stored"}
    assert len({r.sample_id for r in results}) == 5
    counts = _store_of(server).counts()
    assert (counts.samples, counts.blobs, counts.blob_bytes) == (5, 1, len(image))


def test_a_request_id_reused_with_other_bytes_keeps_the_original_and_says_so(server: ServerHandle) -> None:
    client = CameraClient(server.target, "cam-c")
    (first,) = client.stream([CameraImage(png_bytes(1), request_id="same")])
    (second,) = client.stream([CameraImage(png_bytes(2), request_id="same")])
    assert second.status == "already_stored" and second.sample_id == first.sample_id
    assert any("different image bytes" in warning for warning in second.warnings)


def test_concurrent_streams_from_four_cameras(server: ServerHandle) -> None:
    results: dict[int, list[str]] = {}

    def camera(index: int) -> None:
        images = [CameraImage(png_bytes(10_000 * (index + 1) + i)) for i in range(150)]
        results[index] = [r.status for r in CameraClient(server.target, f"cam-{index}", window=16).stream(images)]

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {i: set(statuses) for i, statuses in results.items()} == {i: {"stored"} for i in range(4)}
    assert _store_of(server).counts().samples == 600


def test_a_slow_store_slows_the_camera_instead_of_buffering(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: with a slow store, the server holds at most its window of unanswered messages per
    stream and stops reading the client, instead of buffering without limit."""
    window = server.running.core.settings.stream_max_in_flight
    ingest = server.running.core.ingest
    real_ingest = ingest.ingest
    busy = {"now": 0, "max": 0}

    async def slow_ingest(item: object) -> object:
        busy["now"] += 1
        busy["max"] = max(busy["max"], busy["now"])
        try:
            await asyncio.sleep(0.02)
            return await real_ingest(item)  # type: ignore[arg-type]
        finally:
            busy["now"] -= 1

    monkeypatch.setattr(ingest, "ingest", slow_ingest)
    image = png_bytes(3, size=300)
    pulled = 0
    lock = threading.Lock()

    def requests() -> Iterator[pb.IngestRequest]:
        nonlocal pulled
        for i in range(400):
            with lock:
                pulled += 1
            yield pb.IngestRequest(request_id=f"bp{i}", camera_id="cam-bp", image=image)

    channel = grpc.insecure_channel(server.target)
    replies = 0
    lag = 0
    for reply in pb_grpc.InspectionServiceStub(channel).Ingest(requests()):
        assert reply.status in (pb.INGEST_STATUS_STORED, pb.INGEST_STATUS_ALREADY_STORED)
        replies += 1
        with lock:
            lag = max(lag, pulled - replies)
    channel.close()
    assert replies == 400
    assert busy["max"] <= window
    # The client ran ahead by the window plus what HTTP/2 flow control lets the transport buffer
    # (a few MiB at most), not by the whole stream.
    transport_bytes = (lag - window) * len(image)
    assert transport_bytes <= 8 << 20, f"the client ran {lag} messages ahead with a window of {window}"
    assert lag < 200


def test_the_camera_window_bounds_unanswered_bytes(server: ServerHandle) -> None:
    """A camera never has more than `window_bytes` unanswered (one image alone may exceed it)."""
    images = [CameraImage(png_bytes(i, size=96), request_id=f"w{i}") for i in range(60)]
    size = len(images[0].image)
    camera = CameraClient(server.target, "cam-window", window=1000, window_bytes=3 * size)
    sent = 0
    most_unanswered = 0

    def counted() -> Iterator[CameraImage]:
        nonlocal sent, most_unanswered
        for image in images:
            sent += 1
            most_unanswered = max(most_unanswered, sent - answered)
            yield image

    answered = 0
    for result in camera.stream(counted()):
        assert result.status == "stored"
        answered += 1
    assert answered == len(images)
    assert 1 <= most_unanswered <= 4  # three images fill the byte window; the source is asked for one more
