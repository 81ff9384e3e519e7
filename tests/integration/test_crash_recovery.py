"""Crash recovery: the server runs as its own process and is killed with SIGKILL at random moments while
cameras stream into it. After every kill, each image whose reply said STORED is in the store with its
sample id and its exact bytes, and the store opens (without migration or repair) and checks clean.
After every restart, resending acknowledged images is answered ALREADY_STORED with the original sample id,
and resending the images that were sent without an answer stores each of them exactly once."""

from __future__ import annotations

import hashlib
import itertools
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from cl_service.client import channel
from cl_service.config import load_settings
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from replay_store.blobs import BlobLocation
from replay_store.models import BLOBS, SAMPLES
from replay_store.store import Store
from tests.conftest import png_bytes
from tests.server_process import CLI, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = 6
CAMERAS = ("cam-a", "cam-b")
KILL_DELAY_S = (0.2, 1.5)
RESEND_ACKED_PER_ROUND = 30
SEED = 20240607

Key = tuple[str, str]  # (camera_id, request_id)


@dataclass
class Ledger:
    """What the cameras know: every image sent, those acknowledged as stored (with their sample ids), and
    those sent without an answer (the server may or may not have stored them)."""

    images: dict[Key, bytes] = field(default_factory=dict)
    acked: dict[Key, int] = field(default_factory=dict)
    unanswered: set[Key] = field(default_factory=set)

    def request(self, key: Key) -> pb.IngestRequest:
        return pb.IngestRequest(camera_id=key[0], request_id=key[1], image=self.images[key])


class CameraStream(threading.Thread):
    """One camera streaming fresh images as fast as the server takes them, until the server dies.

    An image is recorded in `sent` just before gRPC takes it, and in `stored` when a STORED reply names it.
    Once the call has ended nothing more is recorded, so `sent` holds every image that can have reached
    the server."""

    def __init__(self, target: str, camera_id: str, request_prefix: str, first_seed: int) -> None:
        super().__init__(name=f"stream-{camera_id}", daemon=True)
        self.target = target
        self.camera_id = camera_id
        self.request_prefix = request_prefix
        self.first_seed = first_seed
        self.sent: dict[Key, bytes] = {}
        self.stored: dict[Key, int] = {}
        self.other_replies: list[pb.IngestReply] = []
        self.ended_with: grpc.StatusCode | None = None
        self.answered = threading.Event()
        self._lock = threading.Lock()
        self._ended = False

    def _requests(self) -> Iterator[pb.IngestRequest]:
        for n in itertools.count():
            image = png_bytes(self.first_seed + n)
            key = (self.camera_id, f"{self.request_prefix}-{n}")
            with self._lock:
                if self._ended:
                    return
                self.sent[key] = image
            yield pb.IngestRequest(camera_id=key[0], request_id=key[1], image=image)

    def run(self) -> None:
        try:
            with channel(self.target) as chan:
                for reply in pb_grpc.InspectionServiceStub(chan).Ingest(self._requests()):
                    if reply.status == pb.INGEST_STATUS_STORED:
                        self.stored[(self.camera_id, reply.request_id)] = reply.sample_id
                        self.answered.set()
                    else:
                        self.other_replies.append(reply)
        except grpc.RpcError as exc:
            self.ended_with = exc.code()
        finally:
            with self._lock:
                self._ended = True


def ingest_all(target: str, requests: Iterable[pb.IngestRequest]) -> dict[Key, pb.IngestReply]:
    """Stream requests to a live server and collect one reply per request (matched by sequence)."""
    sent = list(requests)
    with channel(target) as chan:
        replies = list(pb_grpc.InspectionServiceStub(chan).Ingest(iter(sent), timeout=60))
    assert sorted(reply.sequence for reply in replies) == list(range(1, len(sent) + 1))
    by_key: dict[Key, pb.IngestReply] = {}
    for reply in replies:
        request = sent[reply.sequence - 1]
        assert reply.request_id == request.request_id
        by_key[(request.camera_id, request.request_id)] = reply
    return by_key


def resend_after_restart(target: str, ledger: Ledger, rng: random.Random) -> None:
    """Resend some acknowledged images (ALREADY_STORED, original id) and every unanswered one (now stored)."""
    acked_sample = rng.sample(sorted(ledger.acked), min(RESEND_ACKED_PER_ROUND, len(ledger.acked)))
    unanswered = sorted(ledger.unanswered)
    replies = ingest_all(target, (ledger.request(key) for key in [*acked_sample, *unanswered]))
    for key in acked_sample:
        reply = replies[key]
        assert reply.status == pb.INGEST_STATUS_ALREADY_STORED, (key, reply)
        assert reply.sample_id == ledger.acked[key]
        assert reply.image_sha256 == hashlib.sha256(ledger.images[key]).hexdigest()
        assert not reply.warnings
    for key in unanswered:
        reply = replies[key]
        # STORED if the crash came before its commit, ALREADY_STORED if only the reply was lost.
        assert reply.status in (pb.INGEST_STATUS_STORED, pb.INGEST_STATUS_ALREADY_STORED), (key, reply)
        assert reply.image_sha256 == hashlib.sha256(ledger.images[key]).hexdigest()
        assert not reply.warnings
        ledger.acked[key] = reply.sample_id
    ledger.unanswered.clear()


def stream_until_killed(server: ServerProcess, ledger: Ledger, rng: random.Random, round_index: int) -> None:
    """Stream from every camera at once, SIGKILL the server at a random moment, and record the outcome."""
    streams = [
        CameraStream(server.target, camera, f"r{round_index}", first_seed=(round_index * 100 + index) * 1_000_000)
        for index, camera in enumerate(CAMERAS)
    ]
    for stream in streams:
        stream.start()
    try:
        for stream in streams:
            assert stream.answered.wait(30), f"{stream.camera_id} got no reply:\n{server.output()}"
        time.sleep(rng.uniform(*KILL_DELAY_S))
        assert all(stream.is_alive() for stream in streams), "the kill must come while the cameras are streaming"
    finally:
        server.kill()
    in_flight = 0
    for stream in streams:
        stream.join(30)
        assert not stream.is_alive()
        assert stream.ended_with is not None, "the stream must break when the server dies"
        assert stream.other_replies == []
        assert stream.stored.keys() <= stream.sent.keys()
        ledger.images.update(stream.sent)
        ledger.acked.update(stream.stored)
        ledger.unanswered.update(stream.sent.keys() - stream.stored.keys())
        in_flight += len(stream.sent) - len(stream.stored)
    assert in_flight, "the kill must come while images are in flight"


def check_store(data_dir: Path, ledger: Ledger) -> int:
    """With the server dead: the store opens as it is, checks clean, and holds every acknowledged image
    with its sample id and exact bytes. Returns how many samples it holds."""
    settings = load_settings(data_dir=data_dir)
    store = Store.open(settings.resolved_database_url, settings.blob_dir, migrate_schema=False)
    try:
        assert store.integrity_problems(verify_bytes=True) == []
        query = select(
            SAMPLES.c.camera_id,
            SAMPLES.c.request_id,
            SAMPLES.c.id,
            BLOBS.c.sha256,
            BLOBS.c.segment,
            BLOBS.c.offset,
            BLOBS.c.length,
        ).outerjoin(BLOBS, SAMPLES.c.sha256 == BLOBS.c.sha256)
        with store.engine.connect() as connection:
            rows = connection.execute(query).all()
        stored = {(row.camera_id, row.request_id): row for row in rows}
        # Nothing is stored that was never sent; each image at most once.
        assert len(stored) == len(rows)
        assert stored.keys() <= ledger.acked.keys() | ledger.unanswered
        for key, sample_id in ledger.acked.items():
            row = stored.get(key)
            assert row is not None, f"acknowledged image {key} (sample {sample_id}) is missing"
            assert row.id == sample_id, f"acknowledged image {key} changed its sample id"
            assert row.segment is not None, f"acknowledged image {key} has no blob"
            location = BlobLocation(row.sha256, row.segment, row.offset, row.length)
            assert store.blobs.read(location) == ledger.images[key], f"image {key} does not read back intact"
        return len(rows)
    finally:
        store.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[Path], ServerProcess]]:
    """Starts server processes; kills whatever is still running at the end, whatever happened."""
    started: list[ServerProcess] = []

    def start(data_dir: Path) -> ServerProcess:
        server = ServerProcess(data_dir, tmp_path / f"server-{len(started)}")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill()


def test_acknowledged_images_survive_sigkill_at_random_moments(
    tmp_path: Path, start_server: Callable[[Path], ServerProcess]
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    ledger = Ledger()
    for round_index in range(KILLS):
        server = start_server(data_dir)
        if round_index:
            resend_after_restart(server.target, ledger, rng)
        stream_until_killed(server, ledger, rng, round_index)
        check_store(data_dir, ledger)

    # A last restart answers what the last kill left unanswered: now every image sent is stored, once.
    server = start_server(data_dir)
    resend_after_restart(server.target, ledger, rng)
    server.kill()
    assert check_store(data_dir, ledger) == len(ledger.acked) == len(ledger.images)

    check = subprocess.run(
        [*CLI, "check-store", "--data-dir", str(data_dir), "--verify-bytes"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(ledger.images)} samples" in check.stdout and "OK" in check.stdout, check.stdout
