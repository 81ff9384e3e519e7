"""One conformance test for every engine this machine can run, plus export, parity and the registry's errors.

TensorRT cannot be installed here (no NVIDIA GPU, wheels from NVIDIA's index): its cases are marked `gpu` and
skip with the reason `availability` gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cl_service.engines import onnx_engine
from cl_service.engines.base import (
    BuildInputs,
    EngineError,
    EngineUnavailableError,
    availability,
    available_engines,
    build_engine,
    default_engine,
    engine_names,
    open_engine,
)
from cl_service.engines.export import ONNX_FILE, export_onnx, parity, torch_logits
from cl_service.learning.model import InspectionModel, load_checkpoint, save_checkpoint
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving import publish
from replay_store.store import Store
from tests.conftest import store_url

SIZE = 64
CLASSES = ["good", "patch", "pit", "scratch"]


def _striped_images(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images of four clearly different classes (brightness and stripe frequency), and their labels:
    an engine test needs outputs with real margins, which a tiny fitted head gets from clearly different inputs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    x = np.linspace(0, 2 * np.pi, SIZE, dtype=np.float32)
    images = np.empty((count, 3, SIZE, SIZE), dtype=np.float32)
    for i, label in enumerate(labels):
        stripes = np.sin((label + 1) * 2 * x + rng.uniform(0, 2 * np.pi))[None, :] * np.ones((SIZE, 1), np.float32)
        images[i] = 0.5 * stripes + (label - 1.5) / 3 + rng.normal(0, 0.05, (3, SIZE, SIZE))
    return images.clip(-1, 1), labels


def _fitted_version(folder: Path, head_input: str = "embedding") -> Path:
    """A version whose head holds the class means of features of synthetic images (nearest-mean), so that
    its classes are separated by clear margins on them, as a trained model's are. The backbone is a small ResNet
    without pretrained weights: quick, and any timm backbone must work (Lite0's export has its own test)."""
    folder.mkdir()
    torch.manual_seed(0)
    config = ModelConfig(image_size=SIZE, backbone="resnet10t", pretrained="none", head_input=head_input)
    model = InspectionModel(config, CLASSES).eval()
    images, labels = _striped_images(seed=10, count=64)
    with torch.no_grad():  # nearest class mean: each head row is its class's mean feature direction
        features = model.head_features(model.backbone(torch.from_numpy(images)))
        means = torch.stack([features[torch.from_numpy(labels == c)].mean(0) for c in range(len(CLASSES))])
        model.head.weight.copy_(10 * torch.nn.functional.normalize(means, dim=1))
        model.head.bias.zero_()
    save_checkpoint(folder / CHECKPOINT, model, version=folder.name, parent_version=None)
    return folder


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fitted_version(tmp_path_factory.mktemp("models") / "v0001")


@pytest.fixture(scope="module")
def inputs(version_dir: Path) -> BuildInputs:
    """The golden batch: images the version was fitted on (as the service's golden batch comes from its store)."""
    model, _ = load_checkpoint(version_dir / CHECKPOINT)
    golden, labels = _striped_images(seed=10, count=32)
    reference = torch_logits(model, golden)
    assert (reference.argmax(1) == labels).mean() == 1.0
    calibration, _ = _striped_images(seed=30, count=48)
    return BuildInputs(calibration=calibration, golden=golden, reference_logits=reference)


def _engine_params() -> list[object]:
    out: list[object] = []
    for name in engine_names():
        marks = [pytest.mark.gpu] if name.startswith("tensorrt") else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _engine_params())
def test_every_available_engine_builds_loads_and_follows_torch(
    name: str, version_dir: Path, inputs: BuildInputs
) -> None:
    reason = availability(name)
    if reason is not None:
        pytest.skip(reason)
    precision = "int8" if name.endswith("int8") else "fp16" if name == "tensorrt" else "fp32"
    paths = build_engine(name, version_dir, inputs)
    assert all(path.is_file() for path in paths)
    if name == "onnxruntime-int8":
        assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(paths[0])).graph.node}
    engine = open_engine(name, version_dir)
    with pytest.raises(EngineError, match="not loaded"):
        engine.infer(inputs.golden)
    engine.load()
    engine.warmup((1, 3))
    assert inputs.golden is not None and inputs.reference_logits is not None
    logits = engine.infer(inputs.golden)
    assert logits.shape == (len(inputs.golden), len(CLASSES)) and logits.dtype == np.float32
    single = engine.infer(inputs.golden[:1])
    assert np.allclose(single, logits[:1], atol=1e-4 if precision == "fp32" else 5e-2)  # batch size changes nothing
    check = parity(name, inputs.reference_logits, logits, precision=precision)
    assert check.passed, check.describe()
    with pytest.raises(ValueError, match="expected a batch"):
        engine.infer(np.zeros((2, 3, SIZE + 1, SIZE), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        engine.infer(np.full((1, 3, SIZE, SIZE), np.nan, dtype=np.float32))
    assert engine.describe()["engine"] == name
    engine.close()
    with pytest.raises(EngineError, match="not loaded"):
        engine.infer(inputs.golden)


def test_a_head_on_square_rooted_normalised_features_exports_with_them(tmp_path: Path) -> None:
    """head_input = 'sqrt_l2' (the 'lda' classifier's) is part of the exported graph: the engine's logits follow
    torch's, which they could not if the engine fed the raw embedding to the head."""
    folder = _fitted_version(tmp_path / "v0001", head_input="sqrt_l2")
    model, _ = load_checkpoint(folder / CHECKPOINT)
    assert model.config.head_input == "sqrt_l2"
    golden, _ = _striped_images(seed=10, count=32)
    reference = torch_logits(model, golden)
    with torch.no_grad():
        raw = model.head(model.backbone(torch.from_numpy(golden))).numpy()
    assert np.abs(raw - reference).max() > 0.1  # the transform matters on these images
    build_engine("onnxruntime", folder, BuildInputs(calibration=None, golden=golden, reference_logits=reference))
    engine = open_engine("onnxruntime", folder)
    engine.load()
    check = parity("onnxruntime", reference, engine.infer(golden), precision="fp32")
    assert check.passed and check.top1_agreement == 1.0, check.describe()
    engine.close()


def test_lite0_exports_as_one_checked_onnx_file_with_constant_paddings_a_dynamic_batch_and_the_classes(
    tmp_path: Path,
) -> None:
    model = InspectionModel(ModelConfig(image_size=SIZE), CLASSES).eval()  # ImageNet Lite0: TF 'same' padding
    path = export_onnx(model, tmp_path / ONNX_FILE)
    proto = onnx.load(str(path))
    # no shape arithmetic left from the dynamic 'same' padding: INT8 quantization would quantize it (wrongly)
    assert not {"Shape", "Ceil"} & {node.op_type for node in proto.graph.node}
    images, _ = _striped_images(seed=5, count=6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": images})[0] - torch_logits(model, images)).max() < 1e-4
    assert proto.opset_import[0].version >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    assert {p.key: p.value for p in proto.metadata_props}["classes"].split("\n") == CLASSES
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no scratch file left behind
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "old.onnx", opset=13)


def test_int8_is_refused_without_calibration_or_below_the_agreement_floor(
    version_dir: Path, inputs: BuildInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "v0002"
    folder.mkdir()
    (folder / CHECKPOINT).write_bytes((version_dir / CHECKPOINT).read_bytes())
    with pytest.raises(EngineError, match="no calibration images"):
        build_engine("onnxruntime-int8", folder, BuildInputs())
    monkeypatch.setattr(onnx_engine, "MIN_INT8_AGREEMENT", 1.01)  # no model can reach it
    with pytest.raises(EngineError, match="rejected: top-1 agreement with FP32"):
        build_engine("onnxruntime-int8", folder, inputs)
    assert not (folder / onnx_engine.INT8_FILE).exists()


def test_int8_goes_live_only_within_one_point_of_torch_on_validation_images(
    version_dir: Path, inputs: BuildInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    repository = ModelRepository(tmp_path / "models", store)
    repository.folder("v0001").mkdir(parents=True)
    shutil.copy(version_dir / CHECKPOINT, repository.folder("v0001") / CHECKPOINT)
    images, labels = _striped_images(seed=50, count=64)  # not seen by the head's fit nor the calibration
    assert inputs.golden is not None
    arguments = {
        "golden": inputs.golden,
        "calibration": inputs.calibration,
        "validation": (images, [CLASSES[i] for i in labels]),
    }
    prepared = publish.prepare(repository, "v0001", "onnxruntime-int8", **arguments)  # type: ignore[arg-type]
    prepared.engine.close()
    recorded = json.loads((repository.folder("v0001") / publish.ENGINES_FILE).read_text())["onnxruntime-int8"]
    assert recorded["ok"] and recorded["validation"]["images"] == 64
    assert recorded["validation"]["torch"] - recorded["validation"]["engine"] <= 0.01
    monkeypatch.setattr(publish, "MAX_INT8_ACCURACY_DROP", -0.01)  # no engine can be better than torch by that
    with pytest.raises(publish.ParityError, match="validation accuracy"):
        publish.prepare(repository, "v0001", "onnxruntime-int8", **arguments)  # type: ignore[arg-type]
    recorded = json.loads((repository.folder("v0001") / publish.ENGINES_FILE).read_text())["onnxruntime-int8"]
    assert not recorded["ok"] and "validation accuracy" in recorded["error"]
    store.close()


def test_a_corrupted_onnx_file_fails_to_load_with_a_clear_error(version_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "v0003"
    folder.mkdir()
    data = (version_dir / ONNX_FILE).read_bytes()
    (folder / ONNX_FILE).write_bytes(data[: len(data) // 2])
    engine = open_engine("onnxruntime", folder)
    with pytest.raises(EngineError, match="cannot load"):
        engine.load()
    empty = tmp_path / "v0004"
    empty.mkdir()
    with pytest.raises(EngineError, match="does not exist"):
        open_engine("onnxruntime", empty).load()


def test_parity_fails_on_disagreeing_or_non_finite_logits() -> None:
    reference = np.array([[2.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert parity("x", reference, reference + 1e-5).passed
    large = reference * 1e3  # logits in the thousands: float32 rounding alone differs by more than 1e-3
    assert parity("x", large, large + 5e-3).passed
    assert not parity("x", large, large + 5e-2).passed
    swapped = parity("x", reference, reference[:, ::-1].copy())
    assert not swapped.passed and swapped.top1_agreement == 0.0 and "FAILED" in swapped.describe()
    broken = parity("x", reference, np.full_like(reference, np.nan))
    assert not broken.passed and broken.max_abs_diff == float("inf")
    with pytest.raises(EngineError, match="shape"):
        parity("x", reference, reference[:1])


def test_the_registry_names_engines_and_says_why_one_cannot_run() -> None:
    assert {"torch", "onnxruntime", "onnxruntime-int8", "tensorrt", "tensorrt-int8"} <= set(engine_names())
    assert {"torch", "onnxruntime", "onnxruntime-int8"} <= set(available_engines())
    with pytest.raises(EngineError, match="unknown engine 'onnx'"):
        open_engine("onnx", Path())
    reason = availability("tensorrt")
    if reason is not None:  # this machine: no TensorRT or no GPU
        assert "TensorRT" in reason
        assert default_engine() == "onnxruntime"
        with pytest.raises(EngineUnavailableError, match="TensorRT"):
            open_engine("tensorrt", Path())
