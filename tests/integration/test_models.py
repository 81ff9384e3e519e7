"""The model repository over gRPC: ListModels, ActivateModel (promotion, rollback, refusals), retention, predictions
on Ingest, and hot swaps under load: concurrent Classify callers and an Ingest stream see no failed request while
versions are promoted and rolled back, and every reply comes from a version that was live during its request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from cl_service.api.server import server_in_thread
from cl_service.cli import main
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.engines.export import ONNX_FILE
from cl_service.learning.model import InspectionModel
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.v1 import inspection_pb2 as pb
from replay_store.models import ModelState
from replay_store.store import Store
from tests.conftest import add_model_version, png_bytes, store_url, wait_for_live

pytestmark = pytest.mark.integration

CONFIG = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")
CLASSES = ["good", "pit", "scratch", "dent", "stain", "burr"]
METRICS = {"candidate": {"accuracy": 0.9, "macro_f1": 0.8, "n": 10, "per_class": {"good": {"accuracy": 1.0}}}}


@dataclass
class Served:
    target: str
    repository: ModelRepository


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", model_poll_s=0.2, shutdown_grace_s=2)
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        images = [CameraImage(png_bytes(seed), label="good" if seed % 2 else None) for seed in range(40)]
        assert all(result.durable for result in CameraClient(target, "cam-1").stream(images))
        yield Served(target, ModelRepository(settings.data_dir / "models", running.core.store))


def _model(classes: int, seed: int) -> InspectionModel:
    torch.manual_seed(seed)
    return InspectionModel(CONFIG, CLASSES[:classes])


def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    return error.code(), dict(error.trailing_metadata() or ()).get("cl-error-reason", "")  # type: ignore[attr-defined]


def test_list_activate_roll_back_and_refuse(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    repository = served.repository
    add_model_version(repository, "v0001", _model(2, 1), metrics=METRICS, make_live=True)
    add_model_version(repository, "v0002", _model(3, 2), parent="v0001", make_live=True)
    add_model_version(repository, "v0003", _model(3, 3), parent="v0002", accepted=False)
    with Client(served.target, timeout_s=120) as client:
        wait_for_live(client, "v0002")
        listed = client.list_models()
        assert [m.version for m in listed.models] == ["v0002", "v0001"] and listed.live_version == "v0002"
        newest, oldest = listed.models
        assert newest.live and newest.parent_version == "v0001" and list(newest.classes) == CLASSES[:3]
        assert newest.engines == ["onnxruntime"]
        assert newest.state == pb.MODEL_STATE_ACCEPTED and newest.created_at.seconds > 0
        assert dict(oldest.metrics) == pytest.approx(
            {"accuracy": 0.9, "macro_f1": 0.8, "validation_images": 10.0, "accuracy/good": 1.0}
        )
        everything = client.list_models(include_rejected=True).models
        rejected = next(m for m in everything if m.version == "v0003")
        assert rejected.state == pb.MODEL_STATE_REJECTED and "deliberately rejected" in rejected.rejection_reason

        # rollback: built and checked first, then live in the store and here, with the audit entry
        activated = client.activate_model("v0001", requested_by="alice", reason="v0002 misses pits")
        assert activated.version == "v0001" and activated.live and activated.engines == ["onnxruntime"]
        assert client.status().live_model_version == "v0001"
        assert client.classify(png_bytes(5), top_k=20).model_version == "v0001"
        assert client.list_models().live_version == "v0001"
        trail = repository.activations()
        assert [(a.version, a.previous_version, a.requested_by) for a in trail] == [
            ("v0001", None, "update"),
            ("v0002", "v0001", "update"),
            ("v0001", "v0002", "alice"),
        ]
        assert trail[-1].reason == "v0002 misses pits"
        assert client.activate_model("v0001", requested_by="alice").live  # already live: nothing to do
        assert main(["models", "--target", served.target, "--activate", "v0002", "--by", "eve"]) == 0
        assert client.status().live_model_version == "v0002" and repository.activations()[-1].requested_by == "eve"
        assert main(["models", "--target", served.target, "--activate", "v0001", "--by", "eve"]) == 0
        printed = capsys.readouterr().out
        assert "v0001    -        accepted     90.0%    80.0%  onnxruntime   good,pit *" in printed, printed
        assert main(["models", "--target", served.target, "--activate", "v0003"]) == 1
        assert "rejected by the validation gate" in capsys.readouterr().err

        failed = grpc.StatusCode.FAILED_PRECONDITION
        assert _refusal(lambda: client.activate_model("v0003", requested_by="bob")) == (failed, "MODEL_REJECTED")
        assert _refusal(lambda: client.activate_model("v0042", requested_by="bob")) == (
            grpc.StatusCode.NOT_FOUND,
            "MODEL_VERSION_NOT_FOUND",
        )
        assert _refusal(lambda: client.activate_model("../etc", requested_by="bob"))[0] == grpc.StatusCode.NOT_FOUND
        assert _refusal(lambda: client.activate_model("v0002", requested_by=" ")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUESTED_BY_MISSING",
        )
        assert _refusal(lambda: client.activate_model("v0002", requested_by="x" * 129))[1] == "REQUESTED_BY_TOO_LONG"

        # a version whose engine cannot be built: refused, and nothing changes here or in the store
        add_model_version(repository, "v0004", _model(4, 4), parent="v0001")
        (repository.folder("v0004") / ONNX_FILE).write_bytes(b"not an onnx file")
        assert _refusal(lambda: client.activate_model("v0004", requested_by="carol")) == (failed, "MODEL_ENGINE_FAILED")
        assert client.status().live_model_version == "v0001" and client.list_models().live_version == "v0001"
        assert client.classify(png_bytes(6)).model_version == "v0001"
        assert len(repository.activations()) == 5

        # retention: the newest two and the live one stay; an older one is gone and cannot come back
        add_model_version(repository, "v0005", _model(4, 5), parent="v0001")
        assert repository.prune(2) == ["v0003", "v0002"]
        assert not repository.folder("v0002").exists() and repository.folder("v0001").exists()
        assert [m.version for m in client.list_models(include_rejected=True).models] == ["v0005", "v0004", "v0001"]
        assert _refusal(lambda: client.activate_model("v0002", requested_by="dave")) == (failed, "MODEL_NOT_KEPT")
        assert repository.next_version() == "v0006"  # names are never reused


def test_ingest_replies_carry_the_live_prediction(served: Served) -> None:
    with Client(served.target) as client:
        images = [CameraImage(png_bytes(100 + i)) for i in range(3)]
        results = list(CameraClient(served.target, "cam-2").stream(images))
        assert all(r.durable and r.prediction is None for r in results)  # nothing live yet

        add_model_version(served.repository, "v0001", _model(3, 1), make_live=True)
        wait_for_live(client, "v0001")
        images = [CameraImage(png_bytes(200 + i), label="pit" if i == 0 else None) for i in range(5)]
        results = list(CameraClient(served.target, "cam-2").stream(images))
        assert all(r.durable for r in results)
        for result in results:
            prediction = result.prediction
            assert prediction is not None and prediction.model_version == "v0001" and prediction.engine == "onnxruntime"
            assert prediction.class_name in CLASSES[:3] and len(prediction.top_classes) == 3
        bad = list(CameraClient(served.target, "cam-2").stream([CameraImage(b"not an image")]))
        assert not bad[0].durable and bad[0].prediction is None


@dataclass(frozen=True)
class _Reply:
    started: float
    finished: float
    version: str
    classes: int


def test_hot_swaps_under_load_drop_nothing(served: Served) -> None:
    """4 Classify callers and 1 Ingest stream for at least 10 s across 3 promotions and 1 rollback."""
    repository = served.repository
    class_count = {f"v000{n}": n + 1 for n in range(1, 5)}  # every version has its own number of classes
    for n in range(1, 5):
        add_model_version(repository, f"v000{n}", _model(n + 1, n), make_live=n == 1)
    replies: list[_Reply] = []
    failures: list[BaseException] = []
    ingested: list[str] = []
    stop = threading.Event()

    def call_classify(worker: int) -> None:
        with Client(served.target, timeout_s=60) as client:
            image = png_bytes(300 + worker)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    prediction = client.classify(image, top_k=20)
                except grpc.RpcError as exc:
                    failures.append(exc)
                    continue
                replies.append(_Reply(started, time.monotonic(), prediction.model_version, len(prediction.top_classes)))

    def ingest() -> None:
        def images() -> Iterator[CameraImage]:
            n = 0
            while not stop.is_set():
                n += 1
                yield CameraImage(png_bytes(1000 + n))
                time.sleep(0.02)

        for result in CameraClient(served.target, "cam-load").stream(images()):
            if not result.durable or result.prediction is None:
                failures.append(RuntimeError(f"ingest result not stored with a prediction: {result}"))
            # an ingest reply's request time is not known exactly here; its version must be one that went live
            elif result.prediction.model_version not in class_count:
                failures.append(RuntimeError(f"unknown version {result.prediction.model_version}"))
            else:
                ingested.append(result.prediction.model_version)

    with Client(served.target, timeout_s=120) as admin:
        wait_for_live(admin, "v0001")
        workers = [threading.Thread(target=call_classify, args=(i,)) for i in range(4)]
        workers.append(threading.Thread(target=ingest))
        began = time.monotonic()
        for worker in workers:
            worker.start()
        # each activation: (version, when it was asked for, when it answered); v0001 was live before
        activations = [("v0001", float("-inf"), began)]
        for version in ("v0002", "v0003", "v0004", "v0002"):  # three promotions, then a rollback
            time.sleep(1.5)
            asked = time.monotonic()
            admin.activate_model(version, requested_by="test", reason="swap under load")
            activations.append((version, asked, time.monotonic()))
        time.sleep(max(1.5, 10.0 - (time.monotonic() - began)))
        stop.set()
        for worker in workers:
            worker.join(60)
        assert not any(worker.is_alive() for worker in workers)
        assert time.monotonic() - began >= 10.0

    assert failures == []
    assert len(replies) > 100 and len(ingested) > 50
    assert {reply.version for reply in replies} == {"v0001", "v0002", "v0003", "v0004"}
    for reply in replies:
        assert reply.classes == class_count[reply.version], "a reply's scores came from another version's engine"
        # the version's live periods: from (at the latest) its activation's answer until (at the latest) the next
        # activation's answer; the reply is consistent when its request overlaps one of them
        periods = [
            (asked, activations[i + 1][2] if i + 1 < len(activations) else float("inf"))
            for i, (version, asked, _) in enumerate(activations)
            if version == reply.version
        ]
        assert any(reply.started <= end and reply.finished >= start for start, end in periods), reply
    assert repository.live() is not None and repository.live().version == "v0002"  # type: ignore[union-attr]
    assert [a.version for a in repository.activations()][-4:] == ["v0002", "v0003", "v0004", "v0002"]
    assert all(r.state == ModelState.ACCEPTED.value for r in repository.versions())


def test_store_only_retention_keeps_the_live_version(tmp_path: Path) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    repository = ModelRepository(tmp_path / "models", store)
    for n in range(1, 5):
        add_model_version(repository, f"v000{n}", _model(2, n), make_live=n == 1)
    with pytest.raises(ValueError, match="at least 1"):
        repository.prune(0)
    assert repository.prune(1) == ["v0003", "v0002"]
    assert [row.version for row in repository.versions()] == ["v0004", "v0001"]
    assert repository.prune(1) == []
    store.close()
