"""Classify on the real server: no model -> a clear error; a version made live in the store is published onto ONNX
Runtime and answers; a newer one is hot-swapped in; a broken one leaves the serving version alone; bad input gets
clear status codes and the server goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.engines.export import ONNX_FILE
from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.v1 import inspection_pb2 as pb
from tests.conftest import add_model_version, png_bytes, wait_for_live

pytestmark = pytest.mark.integration

CONFIG = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, ModelRepository]]:
    settings = load_settings(
        data_dir=tmp_path / "data", bind="127.0.0.1:0", model_poll_s=0.2, max_image_bytes=100_000, shutdown_grace_s=2
    )
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        images = [CameraImage(png_bytes(seed), label="good" if seed % 2 else None) for seed in range(40)]
        assert all(result.durable for result in CameraClient(target, "cam-1").stream(images))
        yield target, ModelRepository(settings.data_dir / "models", running.core.store)


def _make_live(repository: ModelRepository, version: str, model: InspectionModel) -> None:
    add_model_version(repository, version, model, make_live=True)


def _code_and_reason(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    reason = dict(error.trailing_metadata() or ()).get("cl-error-reason", "")  # type: ignore[attr-defined]
    return error.code(), reason  # type: ignore[attr-defined]


def test_classify_serves_the_live_version_and_swaps_to_newer_ones(served: tuple[str, ModelRepository]) -> None:
    target, repository = served
    with Client(target) as client:
        assert "Classify" in client.status().capabilities
        code, reason = _code_and_reason(lambda: client.classify(png_bytes(1)))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_LIVE_MODEL")

        torch.manual_seed(0)
        model = InspectionModel(CONFIG, ["good", "pit"])
        _make_live(repository, "v0001", model)
        wait_for_live(client, "v0001")
        prediction = client.classify(png_bytes(7), top_k=5)
        assert prediction.model_version == "v0001" and prediction.class_name in ("good", "pit")
        scores = [s.probability for s in prediction.top_classes]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
        assert prediction.confidence == scores[0] and prediction.top_classes[0].class_name == prediction.class_name
        assert len(client.classify(png_bytes(8)).top_classes) == 1  # top_k 0 means 1
        engines = (repository.folder("v0001") / "engines.json").read_text()
        assert '"onnxruntime"' in engines and '"ok": true' in engines

        model.grow(["scratch"])
        _make_live(repository, "v0002", model)
        wait_for_live(client, "v0002")
        prediction = client.classify(png_bytes(9), top_k=3)
        assert prediction.model_version == "v0002" and len(prediction.top_classes) == 3

        # a live version whose ONNX file is broken: recorded, and v0002 keeps serving
        broken = InspectionModel(CONFIG, ["good", "pit", "scratch"])
        folder = repository.folder("v0003")
        folder.mkdir(parents=True)
        (folder / ONNX_FILE).write_bytes(b"not an onnx file")
        save_checkpoint(folder / CHECKPOINT, broken, version="v0003", parent_version=None)
        repository.record("v0003", parent=None, accepted=True, model=broken, metrics={}, reason="t", make_live=True)
        deadline = time.monotonic() + 30
        while not (folder / "engines.json").exists():
            assert time.monotonic() < deadline, "the server never tried v0003"
            time.sleep(0.1)
        assert '"ok": false' in (folder / "engines.json").read_text()
        time.sleep(0.5)  # several polls: v0003 is not retried into service
        assert client.status().live_model_version == "v0002"
        assert client.classify(png_bytes(10)).model_version == "v0002"


def test_classify_refuses_bad_input_with_clear_codes_and_keeps_serving(served: tuple[str, ModelRepository]) -> None:
    target, repository = served
    _make_live(repository, "v0001", InspectionModel(CONFIG, ["good", "pit"]))
    png = png_bytes(3)
    with Client(target) as client, grpc.insecure_channel(target) as channel:
        wait_for_live(client, "v0001")
        raw = channel.unary_unary(
            "/cl_service.v1.InspectionService/Classify",
            request_serializer=lambda data: data,
            response_deserializer=pb.ClassifyReply.FromString,
        )
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        checks = [
            (lambda: client.classify(b""), invalid, "IMAGE_EMPTY"),
            (lambda: client.classify(b"\x00garbage" * 50), invalid, "IMAGE_UNDECODABLE"),
            (lambda: client.classify(png[: len(png) // 2]), invalid, "IMAGE_TRUNCATED"),
            (lambda: client.classify(png_bytes(4, size=400)), invalid, "IMAGE_TOO_LARGE"),
            (lambda: client.classify(png, top_k=21), invalid, "TOP_K_INVALID"),
            (lambda: client.classify(png, top_k=-1), invalid, "TOP_K_INVALID"),
            (lambda: raw(b"\xff\xff\xff"), invalid, "MESSAGE_MALFORMED"),
        ]
        for call, code, reason in checks:
            assert _code_and_reason(call) == (code, reason), reason
        assert client.classify(png).model_version == "v0001"  # the server goes on
