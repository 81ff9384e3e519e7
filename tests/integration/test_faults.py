"""Faults on real processes: `cl-service serve` killed with SIGKILL around a hot swap and in the middle of an update, a
data folder on a disk that really fills up (a small tmpfs), and clients whose deadlines pass while the server works.

Every test checks what the outside world can rely on afterwards: images acknowledged as stored are there with their
exact bytes, the store checks clean, the store and the server agree on the live model version, and the server (or
its successor) keeps answering.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import random
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from sqlalchemy import select
from sqlmodel import col

from cl_service.api.server import server_in_thread
from cl_service.client import Client, channel
from cl_service.config import Settings, load_settings
from cl_service.engines.base import default_engine
from cl_service.learning.model import InspectionModel
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.publish import prebuild
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from replay_store import runs
from replay_store.blobs import BlobLocation
from replay_store.models import BLOBS, SAMPLES, ModelActivation, ModelVersionRow, UpdateRun, UpdateState
from replay_store.store import NewSample, Store
from tests.conftest import add_model_version, png_bytes, wait_until
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")
CLASSES = ("good", "scratch", "pit")
CLASS_COUNT = {"v0001": 2, "v0002": 3}  # each version of the swap test has its own number of classes
SEED = 20240611
SWAP_KILLS = 4
LEASE_S = 5  # update_lease_s: the smallest the settings allow; a run is reaped after 2 leases without a heartbeat
MIB = 1 << 20

Key = tuple[str, str]  # (camera_id, request_id)
Acked = dict[Key, tuple[int, bytes]]  # what the cameras were told is stored: sample id and the exact bytes


# ------------------------------------------------------------------------------------------------ processes


def _alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    return False


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts server processes; at the end kills whatever is still running, the servers' orphaned children too."""
    started: list[ServerProcess] = []

    def start(data_dir: Path, *, config: Path | None = None, env: Mapping[str, str] = {}) -> ServerProcess:
        server = ServerProcess(data_dir, tmp_path / f"server-{len(started)}", config=config, env=env)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill()
    for child in itertools.chain.from_iterable(server.children for server in started):
        with contextlib.suppress(psutil.Error):
            child.kill()  # psutil refuses when the pid was reused by another process


# ------------------------------------------------------------------------------------------------ traffic


class Camera(threading.Thread):
    """One camera streaming fresh images (about 100 a second) until the server dies.

    An image is in `sent` just before gRPC takes it, and in `stored` once a STORED reply names it."""

    def __init__(self, target: str, camera_id: str, first_seed: int) -> None:
        super().__init__(name=f"camera-{camera_id}", daemon=True)
        self.target, self.camera_id, self.first_seed = target, camera_id, first_seed
        self.sent: dict[Key, bytes] = {}
        self.stored: Acked = {}
        self.other_replies: list[pb.IngestReply] = []
        self.ended_with: grpc.StatusCode | None = None
        self.answered = threading.Event()

    def _requests(self) -> Iterator[pb.IngestRequest]:
        for n in itertools.count():
            key = (self.camera_id, f"{self.first_seed}-{n}")
            self.sent[key] = png_bytes(self.first_seed + n)
            yield pb.IngestRequest(camera_id=key[0], request_id=key[1], image=self.sent[key])
            time.sleep(0.005)

    def run(self) -> None:
        try:
            with channel(self.target) as chan:
                for reply in pb_grpc.InspectionServiceStub(chan).Ingest(self._requests()):
                    key = (self.camera_id, reply.request_id)
                    if reply.status == pb.INGEST_STATUS_STORED:
                        self.stored[key] = (reply.sample_id, self.sent[key])
                        self.answered.set()
                    else:
                        self.other_replies.append(reply)
        except grpc.RpcError as exc:
            self.ended_with = exc.code()


class Classifier(threading.Thread):
    """Classifies one image in a loop until the server dies; records every reply and every error."""

    def __init__(self, target: str, image: bytes) -> None:
        super().__init__(name="classifier", daemon=True)
        self.target, self.image = target, image
        self.replies: list[tuple[float, str, int]] = []  # (finished, version, classes)
        self.errors: list[tuple[float, grpc.StatusCode]] = []  # (finished, code)

    def run(self) -> None:
        with Client(self.target, timeout_s=30) as client:
            while True:
                try:
                    prediction = client.classify(self.image, top_k=20)
                except grpc.RpcError as exc:
                    self.errors.append((time.monotonic(), exc.code()))
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return  # the server is gone
                    continue
                self.replies.append((time.monotonic(), prediction.model_version, len(prediction.top_classes)))


def _ingest(target: str, requests: list[pb.IngestRequest], timeout_s: float = 60) -> list[pb.IngestReply]:
    """One Ingest stream of `requests`; one reply per request, in request order."""
    with channel(target) as chan:
        replies = list(pb_grpc.InspectionServiceStub(chan).Ingest(iter(requests), timeout=timeout_s))
    assert sorted(reply.sequence for reply in replies) == list(range(1, len(requests) + 1))
    return sorted(replies, key=lambda reply: reply.sequence)


def _serving(target: str) -> bool:
    with channel(target) as chan:
        answer = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


# ------------------------------------------------------------------------------------------------ the store


def _settings(data_dir: Path, config: Path | None = None, **extra: Any) -> Settings:
    """The settings a server on `data_dir` uses (the database URL from the environment when the run sets one)."""
    return load_settings(config, data_dir=data_dir, **extra)


@contextlib.contextmanager
def _open_store(settings: Settings) -> Iterator[Store]:
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    try:
        yield store
    finally:
        store.close()


def _model(classes: int, seed: int) -> InspectionModel:
    torch.manual_seed(seed)
    return InspectionModel(MODEL, list(CLASSES[:classes]))


def _add_images(store: Store, camera_id: str, count: int, *, labeled: bool = False) -> Acked:
    """Images stored directly (as acknowledged ones): synthetic surfaces, labeled good or scratch when asked."""
    generator = SurfaceGenerator(SurfaceConfig(width=48, height=48, classes=("good", "scratch"), seed=7))
    batch, images = [], {}
    for image in generator.stream(0, count):
        data = encode_image(image.pixels)
        key = (camera_id, f"seed-{image.index}")
        images[key] = data
        sha = hashlib.sha256(data).hexdigest()
        label = image.label if labeled else None
        batch.append(NewSample(camera_id, key[1], sha, "png", 48, 48, data, label=label))
    stored = store.add_samples(batch)
    return {key: (result.sample_id, images[key]) for key, result in zip(images, stored, strict=True)}


def _live_rows(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(col(ModelVersionRow.version)).where(col(ModelVersionRow.live))))


def _check_store(settings: Settings, acked: Acked) -> str | None:
    """With no server writing: the store opens as it is (no migration, no repair), checks clean, holds every
    acknowledged image with its sample id and exact bytes, has at most one live version, and its audit trail ends
    with that version. Returns the live version."""
    store = Store.open(settings.resolved_database_url, settings.blob_dir, migrate_schema=False)
    try:
        assert store.integrity_problems(verify_bytes=True) == []
        query = select(SAMPLES.c.camera_id, SAMPLES.c.request_id, SAMPLES.c.id, BLOBS.c.sha256, BLOBS.c.segment,
                       BLOBS.c.offset, BLOBS.c.length).outerjoin(BLOBS, SAMPLES.c.sha256 == BLOBS.c.sha256)  # fmt: skip
        with store.engine.connect() as connection:
            rows = {(row.camera_id, row.request_id): row for row in connection.execute(query)}
        for key, (sample_id, data) in acked.items():
            row = rows.get(key)
            assert row is not None, f"acknowledged image {key} (sample {sample_id}) is missing"
            assert row.id == sample_id, f"acknowledged image {key} changed its sample id"
            location = BlobLocation(row.sha256, row.segment, row.offset, row.length)
            assert store.blobs.read(location) == data, f"acknowledged image {key} does not read back intact"
        live = _live_rows(store)
        assert len(live) <= 1, f"more than one live version: {live}"
        with store.session() as session:
            trail = list(session.scalars(select(ModelActivation).order_by(col(ModelActivation.id))))
        if live:
            assert trail and trail[-1].version == live[0], "the audit trail does not end with the live version"
        return live[0] if live else None
    finally:
        store.close()


def _agreed_live_version(target: str, settings: Settings, timeout_s: float = 90.0) -> str:
    """After a (re)start: the server serves the store's live version, and Classify's replies come from it."""
    with _open_store(settings) as store:
        live = _live_rows(store)
    assert len(live) == 1 and live[0] in CLASS_COUNT, f"live versions in the store: {live}"
    with Client(target, timeout_s=30) as client:
        wait_until(lambda: client.status().live_model_version != "", timeout_s, "a version going live after the start")
        served = client.status().live_model_version
        assert served == live[0], f"the store says {live[0]} is live, the restarted server serves {served}"
        prediction = client.classify(png_bytes(11), top_k=20)
        assert prediction.model_version == served and len(prediction.top_classes) == CLASS_COUNT[served]
    return served


# ------------------------------------------------------------------------------------------------ 1. hot swap


@dataclass
class _Activation:
    version: str
    finished: float = 0.0
    code: grpc.StatusCode | None = None  # None: it answered OK
    done: threading.Event = field(default_factory=threading.Event)


def _activate(target: str, activation: _Activation) -> None:
    try:
        with Client(target, timeout_s=60) as client:
            client.activate_model(activation.version, requested_by="fault-test", reason="swap before a SIGKILL")
    except grpc.RpcError as exc:
        activation.code = exc.code()
    activation.finished = time.monotonic()
    activation.done.set()


def test_sigkill_around_a_hot_swap_leaves_the_store_and_the_restarted_server_agreeing(
    tmp_path: Path, launch: Callable[..., ServerProcess]
) -> None:
    """Two accepted versions; Classify and Ingest traffic; ActivateModel of the other version; SIGKILL 0-1 s after it
    was asked for (one kill in each quarter of that second, in random order), four times. After every kill the store
    checks clean with every acknowledged image; after every restart the store's live version, the server's and the
    version in Classify's replies are one and the same, and an ActivateModel that answered OK was not lost."""
    rng = random.Random(SEED)
    settings = _settings(tmp_path / "data")
    with _open_store(settings) as store:
        acked = _add_images(store, "cam-seed", 40)  # the golden batch for the engines' parity checks
        repository = ModelRepository(settings.data_dir / "models", store)
        add_model_version(repository, "v0001", _model(2, 1), make_live=True)
        add_model_version(repository, "v0002", _model(3, 2), parent="v0001")
        for version in CLASS_COUNT:  # built and checked ahead, as an update does: a swap then mostly loads
            prebuild(store, repository, version, default_engine())
    env = {"CL_SERVICE_MODEL_POLL_S": "0.3"}
    delays = [rng.uniform(i / SWAP_KILLS, (i + 1) / SWAP_KILLS) for i in range(SWAP_KILLS)]
    rng.shuffle(delays)
    outcomes = []
    for round_index, delay in enumerate(delays):
        server = launch(settings.data_dir, env=env)
        live = _agreed_live_version(server.target, settings)
        other = "v0002" if live == "v0001" else "v0001"
        camera = Camera(server.target, f"cam-{round_index}", first_seed=(round_index + 1) * 1_000_000)
        classifiers = [Classifier(server.target, png_bytes(100 + i)) for i in range(2)]
        for thread in (camera, *classifiers):
            thread.start()
        assert camera.answered.wait(30), f"the camera got no reply:\n{server.output()}"
        wait_until(lambda: all(c.replies for c in classifiers), 30, "Classify replies")  # noqa: B023 - waited here
        activation = _Activation(other)
        asked = time.monotonic()
        threading.Thread(target=_activate, args=(server.target, activation), daemon=True).start()
        time.sleep(max(0.0, asked + delay - time.monotonic()))
        killed_at = time.monotonic()
        server.kill()
        for thread in (camera, *classifiers):
            thread.join(30)
            assert not thread.is_alive()
        assert activation.done.wait(30)

        # before the kill, the swap dropped nothing: no error, every reply from one of the two versions' engines
        for classifier in classifiers:
            assert [code for finished, code in classifier.errors if finished < killed_at] == []
            for _, version, classes in classifier.replies:
                assert CLASS_COUNT.get(version) == classes, f"a reply from {version} with {classes} classes"
        assert camera.other_replies == [] and camera.ended_with is not None
        acked.update(camera.stored)
        answered_ok = activation.code is None and activation.finished < killed_at
        store_live = _check_store(settings, acked)
        assert store_live in CLASS_COUNT
        if answered_ok:  # an activation the client was told about survives the crash
            assert store_live == other, f"ActivateModel({other}) answered OK, yet {store_live} is live after a kill"
        took = f"answered in {activation.finished - asked:.2f} s" if answered_ok else "cut off"
        outcomes.append((round(delay, 2), other, took, store_live))

    server = launch(settings.data_dir, env=env)
    final = _agreed_live_version(server.target, settings)
    server.kill()
    assert _check_store(settings, acked) == final
    print("kills (delay s, asked for, activation, live after):", outcomes)


# ------------------------------------------------------------------------------------------------ 2. update


def _toml(path: Path, values: Mapping[str, Any]) -> Path:
    """A settings file from nested mappings of plain values (strings, numbers, booleans, lists of those)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(item, list):
            return "[" + ", ".join(value(i) for i in item) + "]"
        return repr(item)

    lines: list[str] = []

    def table(prefix: str, mapping: Mapping[str, Any]) -> None:
        nested = {k: v for k, v in mapping.items() if isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in mapping.items() if not isinstance(v, Mapping))
        for key, sub in nested.items():
            table(f"{prefix}.{key}" if prefix else key, sub)

    table("", values)
    path.write_text("\n".join(lines) + "\n")
    return path


def _update_config(tmp_path: Path, epochs: int) -> Path:
    return _toml(
        tmp_path / "server.toml",
        {
            "update_cron": "",
            "update_lease_s": LEASE_S,
            "update_after_labels": 0,
            "update_after_alerts": 0,
            "model_poll_s": 0.3,
            "shutdown_grace_s": 2,
            "keep_versions": 5,
            "update": {
                "classifier": "trained",  # a training that lasts `epochs`: long enough to be killed mid-way
                "epochs": epochs,
                "min_steps": 1,
                "batch_size": 16,
                "replay_budget": 8,
                "cold_start_min_per_class": 3,
                "cold_start_min_accuracy": 0.0,
                "gate_tolerance": 1.0,
                "threads": 1,
                "model": {"image_size": MODEL.image_size, "backbone": MODEL.backbone, "pretrained": MODEL.pretrained},
            },
            "anomaly": {"image_size": 32, "channels": [8, 16, 32], "min_steps": 40, "epochs": 1},
        },
    )


def _run(settings: Settings, run_id: int) -> UpdateRun:
    with _open_store(settings) as store:
        run = runs.get(store, run_id)
    assert run is not None
    return run


def test_sigkill_of_the_server_mid_update_fails_the_run_and_keeps_the_live_model(
    tmp_path: Path, launch: Callable[..., ServerProcess]
) -> None:
    """TriggerUpdate with many epochs; SIGKILL of the server (not of its worker) while the worker trains. The worker
    must not outlive its server; after a restart the run is reaped as failed, v0001 stays live in the store and on
    the server, every acknowledged image is there, and a new update can be triggered and starts."""
    config = _update_config(tmp_path, epochs=200)
    settings = _settings(tmp_path / "data", config)
    with _open_store(settings) as store:
        acked = _add_images(store, "cam-seed", 40, labeled=True)
        repository = ModelRepository(settings.data_dir / "models", store)
        add_model_version(repository, "v0001", _model(2, 1), make_live=True)
        prebuild(store, repository, "v0001", default_engine())
    env = {"CL_SERVICE_SCHEDULER": "true"}
    server = launch(settings.data_dir, config=config, env=env)
    assert _agreed_live_version(server.target, settings) == "v0001"
    with Client(server.target) as client:
        run_id = client.trigger_update("alice", "a fault test").run_id
    wait_until(lambda: _run(settings, run_id).progress.get("stage") == "train", 120, "the worker training")
    workers = server.workers()
    assert len(workers) == 1, f"update workers of the server: {workers}"
    worker = workers[0]
    camera = Camera(server.target, "cam-live", first_seed=5_000_000)  # images arriving while the worker trains
    camera.start()
    assert camera.answered.wait(30)
    time.sleep(0.5)
    server.kill()
    camera.join(30)
    acked.update(camera.stored)
    assert _check_store(settings, acked) == "v0001"

    # the worker was the server's child; its parent is gone, and it must go too (not train on, unseen, for hours)
    gone = _wait_for(lambda: not _alive(worker), 10)
    assert gone, f"the update worker {worker.pid} outlived its killed server by 10 s and is still running"

    server = launch(settings.data_dir, config=config, env=env)
    wait_until(lambda: _run(settings, run_id).state in runs.TERMINAL, 2 * LEASE_S + 30, "the orphaned run ending")
    run = _run(settings, run_id)
    assert run.state == UpdateState.FAILED.value and run.reason, (run.state, run.reason)
    assert run.candidate_version is None
    assert _agreed_live_version(server.target, settings) == "v0001"
    with Client(server.target) as client:
        again = client.trigger_update("bob", "after the crash")
        assert again.run_id != run_id and again.state == pb.UPDATE_STATE_QUEUED
        wait_until(lambda: _run(settings, again.run_id).state != "queued", 30, "the new run starting")
        assert client.status().live_model_version == "v0001"
    assert server.terminate() == 0  # a graceful stop ends its worker and fails its run
    assert _run(settings, again.run_id).state in (UpdateState.FAILED.value, UpdateState.SUCCEEDED.value)
    assert _check_store(settings, acked) in ("v0001", "v0002")


def _wait_for(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


# ------------------------------------------------------------------------------------------------ 3. full disk


@contextlib.contextmanager
def _tmpfs(folder: Path, size_mib: int) -> Iterator[Path]:
    """A real small disk: a tmpfs of `size_mib` mounted on `folder` (unmounted at the end, whatever happened)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the full-disk tests run as root, e.g. in CI's container)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _resize(folder: Path, size_mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(folder)], check=True, capture_output=True)


def _noise(seed: int, side: int = 160) -> bytes:
    """A distinct incompressible image (random RGB pixels, PNG stored without compression): about 77 KB."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


@dataclass
class _Filled:
    acked: Acked
    refusals: list[tuple[int, str, str]]  # (code, reason, message) of every refused image


def _fill_until_refused(target: str, camera_id: str, first_seed: int, *, after_refusal: int = 30) -> _Filled:
    """Stream distinct incompressible images until the server refuses them, then `after_refusal` more."""
    filled = _Filled({}, [])
    images: dict[str, bytes] = {}
    refused = threading.Event()

    def requests() -> Iterator[pb.IngestRequest]:
        for n in range(1000):  # 77 MB: far more than the disk holds
            if refused.is_set():
                break
            request_id = f"{first_seed}-{n}"
            images[request_id] = _noise(first_seed + n)
            yield pb.IngestRequest(camera_id=camera_id, request_id=request_id, image=images[request_id])
        for n in range(1000, 1000 + after_refusal):
            request_id = f"{first_seed}-{n}"
            images[request_id] = _noise(first_seed + n)
            yield pb.IngestRequest(camera_id=camera_id, request_id=request_id, image=images[request_id])

    with channel(target) as chan:
        for reply in pb_grpc.InspectionServiceStub(chan).Ingest(requests(), timeout=120):
            if reply.status == pb.INGEST_STATUS_STORED:
                filled.acked[(camera_id, reply.request_id)] = (reply.sample_id, images[reply.request_id])
            else:
                assert reply.status == pb.INGEST_STATUS_REJECTED, reply
                filled.refusals.append((reply.error.code, reply.error.reason, reply.error.message))
                refused.set()
    assert len(filled.acked) + len(filled.refusals) == len(images), "every image sent must be answered"
    return filled


def _check_live_store(store: Store, acked: Acked) -> None:
    """The store of a running server: it checks clean and reads back every acknowledged image exactly."""
    assert store.integrity_problems(verify_bytes=True) == []
    for key, (sample_id, data) in acked.items():
        sample = store.get_sample(sample_id)
        assert sample is not None and (sample.camera_id, sample.request_id) == key, f"{key} is not sample {sample_id}"
        assert store.read_blob(sample.sha256, verify=True) == data, f"acknowledged image {key} does not read back"


@contextlib.contextmanager
def _full_disk(tmp_path: Path, min_free: int, size_mib: int = 24) -> Iterator[tuple[Path, Settings]]:
    with _tmpfs(tmp_path / "disk", size_mib) as disk:
        yield disk, _settings(disk / "data", bind="127.0.0.1:0", min_free_disk_bytes=min_free, shutdown_grace_s=1)


STORE_FULL = (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "STORE_FULL")
DISK_FULL_IN_THE_DATABASE = (grpc.StatusCode.UNAVAILABLE.value[0], "STORE_UNAVAILABLE")  # SQLite: "disk is full"


def _assert_clear_full_disk_refusals(refusals: list[tuple[int, str, str]]) -> None:
    assert refusals, "the disk never filled up"
    for code, reason, message in refusals:
        if (code, reason) == STORE_FULL:
            assert "disk is full" in message, message
        else:  # the blob write fitted, the database's commit did not (seen now and then; see the report)
            assert (code, reason) == DISK_FULL_IN_THE_DATABASE and "disk is full" in message, (code, reason, message)


def _acked(camera_id: str, requests: list[pb.IngestRequest], replies: list[pb.IngestReply]) -> Acked:
    return {(camera_id, r.request_id): (p.sample_id, r.image) for r, p in zip(requests, replies, strict=True)}


def _server_answers(target: str, samples: int) -> None:
    assert _serving(target)
    with Client(target, timeout_s=10) as client:
        assert client.status().samples_total == samples


def test_a_full_disk_refuses_images_clearly_and_keeps_every_acknowledged_one(tmp_path: Path) -> None:
    """No guard (min_free_disk_bytes 0): the real ENOSPC path. Refusals say the disk is full, the stream and the server
    go on, every image acknowledged as stored reads back exactly and the store checks clean."""
    with _full_disk(tmp_path, min_free=0) as (_disk, settings):
        with server_in_thread(settings) as running:
            target = f"127.0.0.1:{running.port}"
            filled = _fill_until_refused(target, "cam-full", 1_000_000)
            assert len(filled.acked) > 100, "a 24 MiB disk holds more than 100 images of 77 KB"
            _assert_clear_full_disk_refusals(filled.refusals)
            _server_answers(target, len(filled.acked))
            with Client(target) as client:  # reads work on a full disk
                key, (sample_id, data) = next(iter(filled.acked.items()))
                assert client.get_sample(sample_id, include_image=True).image == data
            _check_live_store(running.core.store, filled.acked)
            # still full: a resent acknowledged image is ALREADY_STORED, a new one refused again, the stream goes on
            # (in one stream they often share a group commit: the new image's failure must not answer for the resend)
            again = pb.IngestRequest(camera_id=key[0], request_id=key[1], image=data)
            new = pb.IngestRequest(camera_id="cam-full", request_id="new", image=_noise(7))
            replies = _ingest(target, [again, new])
            assert replies[0].status == pb.INGEST_STATUS_ALREADY_STORED and replies[0].sample_id == sample_id
            assert replies[1].status == pb.INGEST_STATUS_REJECTED
            _assert_clear_full_disk_refusals(
                [(replies[1].error.code, replies[1].error.reason, replies[1].error.message)]
            )
        _check_store(settings, filled.acked)


def test_ingest_works_again_once_the_full_disk_has_space(tmp_path: Path) -> None:
    """The disk fills for real (ENOSPC), then grows (remount 24 -> 64 MiB) under the running server: ingest stores
    images again without a restart, and every image acknowledged before and after reads back exactly."""
    with _full_disk(tmp_path, min_free=0) as (disk, settings):
        with server_in_thread(settings) as running:
            target = f"127.0.0.1:{running.port}"
            filled = _fill_until_refused(target, "cam-full", 2_000_000)
            _assert_clear_full_disk_refusals(filled.refusals)
            _resize(disk, 64)
            requests = [pb.IngestRequest(camera_id="cam-after", request_id=f"a{n}", image=_noise(3_000_000 + n))
                        for n in range(40)]  # fmt: skip
            replies = _ingest(target, requests)
            assert [reply.error.reason for reply in replies] == [""] * len(requests)
            assert all(reply.status == pb.INGEST_STATUS_STORED for reply in replies)
            acked = dict(filled.acked)
            acked.update(_acked("cam-after", requests, replies))
            _server_answers(target, len(acked))
            _check_live_store(running.core.store, acked)
        _check_store(settings, acked)


def test_the_disk_guard_refuses_before_the_disk_is_full_and_lets_images_in_again(tmp_path: Path) -> None:
    """min_free_disk_bytes 16 MiB on a 24 MiB disk: DISK_LOW (RESOURCE_EXHAUSTED) comes first, the disk never fills;
    once the disk grows, the same server stores images again (the guard measures again) and everything reads back."""
    with _full_disk(tmp_path, min_free=16 * MIB) as (disk, settings):
        with server_in_thread(settings) as running:
            target = f"127.0.0.1:{running.port}"
            filled = _fill_until_refused(target, "cam-guard", 4_000_000)
            assert filled.acked, "the guard let nothing in"
            assert {(code, reason) for code, reason, _ in filled.refusals} == {
                (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "DISK_LOW")
            }
            assert "min_free_disk_bytes" in filled.refusals[0][2]
            assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 12 * MIB, "the guard came too late"
            _server_answers(target, len(filled.acked))
            _resize(disk, 64)
            time.sleep(0.6)  # the guard measures the free space at most every 0.5 s
            requests = [pb.IngestRequest(camera_id="cam-guard", request_id=f"b{n}", image=_noise(5_000_000 + n))
                        for n in range(20)]  # fmt: skip
            replies = _ingest(target, requests)
            assert [reply.error.reason for reply in replies] == [""] * len(requests)
            acked = dict(filled.acked)
            acked.update(_acked("cam-guard", requests, replies))
            _server_answers(target, len(acked))
            _check_live_store(running.core.store, acked)
        _check_store(settings, acked)


# ------------------------------------------------------------------------------------------------ 4. deadlines


def _huge_image(side: int = 6000) -> bytes:
    """A small file (a flat grey PNG, about 48 KB) that takes the server about a second to decode and preprocess."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "PNG")
    return buffer.getvalue()


def _rpc_calls(metrics_port: int, method: str) -> dict[str, tuple[float, float]]:
    """From the server's /metrics: per status code, how many `method` calls ended so and their total seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        for part, index in (("_count", 0), ("_sum", 1)):
            prefix = f"cl_rpc_duration_seconds{part}{{"
            if line.startswith(prefix) and f'method="{method}"' in line:
                code = line.split('code="', 1)[1].split('"', 1)[0]
                found.setdefault(code, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {code: (values[0], values[1]) for code, values in found.items()}


def test_deadlines_end_calls_and_the_server_answers_the_next_one(tmp_path: Path) -> None:
    """Classify with a deadline that passes before it is sent and one that passes while the server decodes a huge
    image; an Ingest stream whose deadline passes while it is open, and a burst that outlasts its deadline;
    ActivateModel cut off by its deadline. Each ends with DEADLINE_EXCEEDED at the deadline, the server answers the next
    call and stops working on the expired Classify calls (its metrics); the streams' acknowledged images are stored,
    a resend of the burst stores each image exactly once, no stream stays open on the server, and the store and the
    server agree on the live version after the cut-off activation."""
    settings = _settings(
        tmp_path / "data", bind="127.0.0.1:0", model_poll_s=0.3, shutdown_grace_s=1, metrics_bind="127.0.0.1:0"
    )
    with _open_store(settings) as store:
        _add_images(store, "cam-seed", 40)
        repository = ModelRepository(settings.data_dir / "models", store)
        add_model_version(repository, "v0001", _model(2, 1), make_live=True)
        add_model_version(repository, "v0002", _model(3, 2), parent="v0001")
        for version in CLASS_COUNT:
            prebuild(store, repository, version, default_engine())
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        stub_channel = channel(target)
        stub = pb_grpc.InspectionServiceStub(stub_channel)
        with Client(target, timeout_s=30) as client:
            wait_until(lambda: client.status().live_model_version == "v0001", 60, "v0001 going live")

            def deadline_exceeded(call: Callable[[], object], limit_s: float) -> float:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
                elapsed = time.monotonic() - started
                assert elapsed < limit_s, f"the call ended {elapsed:.2f} s after it started"
                return elapsed

            def answers_next() -> None:
                started = time.monotonic()
                prediction = client.classify(png_bytes(3), top_k=20)
                assert len(prediction.top_classes) == CLASS_COUNT[prediction.model_version]
                assert time.monotonic() - started < 5.0

            image = png_bytes(2)
            deadline_exceeded(lambda: stub.Classify(pb.ClassifyRequest(image=image), timeout=0.001), 1.0)
            answers_next()
            huge = _huge_image()
            for _ in range(3):
                deadline_exceeded(lambda: stub.Classify(pb.ClassifyRequest(image=huge), timeout=0.2), 1.0)
            answers_next()
            # the server stopped each expired call at its deadline (gRPC cancels the handler): none of them counts as
            # answered, and together they took the server about their deadlines, not the second each one needs
            assert running.metrics_port is not None
            calls = _rpc_calls(running.metrics_port, "Classify")
            assert calls["OK"][0] == 2, calls  # the two answers_next()
            assert calls["CANCELLED"][0] >= 3 and calls["CANCELLED"][1] < 3 * 0.6, calls
            assert client.classify(huge).model_version == "v0001"  # with time enough, the huge image is classified

            # an Ingest stream: 5 images answered, then the camera goes quiet past the stream's deadline
            sent: dict[str, bytes] = {}
            quiet = threading.Event()

            def requests() -> Iterator[pb.IngestRequest]:
                for n in range(5):
                    sent[f"d{n}"] = png_bytes(9000 + n)
                    yield pb.IngestRequest(camera_id="cam-deadline", request_id=f"d{n}", image=sent[f"d{n}"])
                quiet.wait(10)

            replies: list[pb.IngestReply] = []

            def stream() -> None:
                replies.extend(stub.Ingest(requests(), timeout=1.5))

            try:
                deadline_exceeded(stream, 4.0)
            finally:
                quiet.set()
            assert len(replies) == 5 and all(r.status == pb.INGEST_STATUS_STORED for r in replies), replies
            wait_until(lambda: client.status().active_streams == 0, 5, "the expired stream ending on the server")
            for reply in replies:
                assert client.get_sample(reply.sample_id, include_image=True).image == sent[reply.request_id]
            answers_next()

            # a burst cut off by its deadline: whatever the server stored, a resend stores each image exactly once
            burst = [pb.IngestRequest(camera_id="cam-burst", request_id=f"b{n}", image=_noise(7_000_000 + n, 300))
                     for n in range(150)]  # fmt: skip
            answered: list[pb.IngestReply] = []
            deadline_exceeded(lambda: answered.extend(stub.Ingest(iter(burst), timeout=0.4)), 3.0)
            assert len(answered) < len(burst), "the burst was meant to outlast its deadline"
            wait_until(lambda: client.status().active_streams == 0, 5, "the expired burst ending on the server")
            resent = _ingest(target, burst)
            assert all(r.status in (pb.INGEST_STATUS_STORED, pb.INGEST_STATUS_ALREADY_STORED) for r in resent)
            for reply in answered:
                assert resent[reply.sequence - 1].sample_id == reply.sample_id, "an acknowledged image was stored twice"
            assert client.status().samples_total == 40 + 5 + len(burst)
            answers_next()

            # ActivateModel cut off while the server loads and checks v0002's engine
            deadline_exceeded(
                lambda: stub.ActivateModel(pb.ActivateModelRequest(version="v0002", requested_by="t"), timeout=0.05),
                2.0,
            )
            answers_next()

            def agreed() -> bool:  # whether the cut came before or after the store was told, the server follows it
                live = _live_rows(running.core.store)
                return live == [client.status().live_model_version]

            wait_until(agreed, 30, "the store and the server agreeing on the live version")
            activated = client.activate_model("v0002", requested_by="t", reason="with time enough")
            assert activated.live and client.classify(image, top_k=20).model_version == "v0002"
            assert _live_rows(running.core.store) == ["v0002"]
        stub_channel.close()
        assert running.core.store.integrity_problems(verify_bytes=True) == []
