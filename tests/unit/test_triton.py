"""Versions in Triton's model-repository layout (Triton itself cannot run here: the files are checked, and the ONNX
files are run with ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.triton import write_triton_repository
from replay_store.store import Store
from tests.conftest import store_url

CONFIG = ModelConfig(image_size=32, backbone="resnet10t", pretrained="none")


def _save(repository: ModelRepository, version: str, model: InspectionModel) -> None:
    folder = repository.folder(version)
    folder.mkdir(parents=True)
    save_checkpoint(folder / CHECKPOINT, model, version=version, parent_version=None)


def test_grown_versions_share_one_triton_model_with_the_newest_labels(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models", Store.open(store_url(tmp_path), tmp_path / "b"))
    torch.manual_seed(0)
    model = InspectionModel(CONFIG, ["good", "pit"])
    _save(repository, "v0001", model)
    model.grow(["scratch"])
    _save(repository, "v0003", model)

    folder = write_triton_repository(repository, ["v0003", "v0001"], tmp_path / "triton")
    assert folder == tmp_path / "triton" / "cl_inspection"
    assert (folder / "labels.txt").read_text().split() == ["good", "pit", "scratch"]
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ 3, 32, 32 ]" in config
    assert "versions: [ 1, 3 ]" in config and "kind: KIND_CPU" in config
    images = np.zeros((2, 3, 32, 32), dtype=np.float32)
    for number, outputs in ((1, 2), (3, 3)):
        session = ort.InferenceSession(str(folder / str(number) / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.run(None, {"images": images})[0].shape == (2, outputs)
    assert not [p for p in (tmp_path / "triton").iterdir() if p.name.startswith(".")]  # no staging left behind

    write_triton_repository(repository, ["v0001"], tmp_path / "triton")  # rewritten, not merged
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_versions_that_cannot_share_a_triton_model_are_refused(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models", Store.open(store_url(tmp_path), tmp_path / "b"))
    _save(repository, "v0001", InspectionModel(CONFIG, ["good", "pit"]))
    _save(repository, "v0002", InspectionModel(CONFIG, ["pit", "good"]))
    _save(repository, "v0003", InspectionModel(CONFIG.model_copy(update={"image_size": 48}), ["good", "pit"]))
    with pytest.raises(ValueError, match="not a prefix"):
        write_triton_repository(repository, ["v0001", "v0002"], tmp_path / "triton")
    with pytest.raises(ValueError, match="one input size"):
        write_triton_repository(repository, ["v0001", "v0003"], tmp_path / "triton")
    with pytest.raises(ValueError, match="at least one"):
        write_triton_repository(repository, [], tmp_path / "triton")
