"""Publishing versions onto engines with a real SQLite store, real ONNX export and real ONNX Runtime sessions:
a version goes live only after parity with torch passed, and a broken one leaves the live engine untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_service.engines.base import EngineError
from cl_service.engines.export import ONNX_FILE
from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.publish import ENGINES_FILE, ParityError, activate, golden_images
from cl_service.serving.slot import EngineSlot
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from replay_store.store import NewSample, Store
from tests.conftest import store_url

pytestmark = pytest.mark.integration

CLASSES = ("good", "pit", "scratch")
CONFIG = ModelConfig(image_size=48)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    generator = SurfaceGenerator(SurfaceConfig(width=64, height=64, classes=CLASSES, seed=3))
    batch = []
    for image in generator.stream(0, 40):
        data = encode_image(image.pixels)
        digest = hashlib.sha256(data).hexdigest()
        batch.append(NewSample("cam-1", f"r{image.index}", digest, "png", 64, 64, data, label=image.label))
    store.add_samples(batch)
    return store


def _version(repository: ModelRepository, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = InspectionModel(CONFIG, list(CLASSES))
    folder = repository.folder(name)
    folder.mkdir(parents=True)
    save_checkpoint(folder / CHECKPOINT, model, version=name, parent_version=None)


def _recorded(repository: ModelRepository, version: str) -> dict[str, object]:
    entry: dict[str, object] = json.loads((repository.folder(version) / ENGINES_FILE).read_text())["onnxruntime"]
    return entry


def test_versions_go_live_after_parity_and_broken_ones_leave_the_live_engine_alone(
    store: Store, tmp_path: Path
) -> None:
    repository = ModelRepository(tmp_path / "models", store)
    slot = EngineSlot(drain_timeout_s=5)
    for name, seed in (("v0001", 1), ("v0002", 2), ("v0003", 3), ("v0004", 4)):
        _version(repository, name, seed)

    first = activate(slot, store, repository, "v0001", "onnxruntime")
    assert slot.version == "v0001" and first.parity.passed and first.parity.images == 32
    recorded = _recorded(repository, "v0001")
    assert recorded["ok"] is True and recorded["parity"]["top1_agreement"] == 1.0  # type: ignore[index]
    golden = golden_images(store, CONFIG)
    with slot.lease() as lease:
        assert lease.engine.infer(golden).shape == (32, len(CLASSES))

    activate(slot, store, repository, "v0002", "onnxruntime")
    assert slot.version == "v0002"
    with pytest.raises(EngineError, match="not loaded"):  # the replaced engine was drained and closed
        first.engine.infer(golden)

    # v0003: its ONNX file is corrupted on disk -> load fails; v0002 stays live
    (repository.folder("v0003") / ONNX_FILE).write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(EngineError, match="cannot load"):
        activate(slot, store, repository, "v0003", "onnxruntime")
    assert slot.version == "v0002" and _recorded(repository, "v0003")["ok"] is False

    # v0004: a well-formed ONNX file of another model's weights -> parity fails; v0002 stays live
    (repository.folder("v0004") / ONNX_FILE).write_bytes((repository.folder("v0001") / ONNX_FILE).read_bytes())
    with pytest.raises(ParityError, match="parity of onnxruntime FAILED"):
        activate(slot, store, repository, "v0004", "onnxruntime")
    assert slot.version == "v0002"
    assert "FAILED" in str(_recorded(repository, "v0004")["error"])
    with slot.lease() as lease:
        assert lease.version == "v0002" and np.isfinite(lease.engine.infer(golden)).all()
    slot.close()


def test_an_empty_store_has_no_golden_batch(tmp_path: Path) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    with pytest.raises(EngineError, match="no images for a golden batch"):
        golden_images(store, CONFIG)
