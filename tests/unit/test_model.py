"""The inspection model: Lite0 weights mapped into timm, strict loading, a head that grows, checkpoints, inputs."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cl_service.learning.model import (
    CheckpointError,
    InspectionModel,
    ModelConfig,
    decode_image,
    lite0_package_weights_path,
    load_checkpoint,
    load_strictly,
    map_lite0_state_dict,
    preprocess,
    preprocess_encoded,
    read_state_dict,
    save_checkpoint,
)
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image

LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
SMALL = ModelConfig(image_size=64, pretrained="none")


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    return read_state_dict(lite0_package_weights_path())


@pytest.fixture(scope="module")
def pretrained() -> InspectionModel:
    return InspectionModel(ModelConfig(image_size=64), ["good", "scratch"]).eval()


def _batch(seed: int, n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the Lite0 key mapping ----------------------------------------------------------------------


def test_every_lite0_key_maps_onto_timm_with_equal_shapes(lite0_source: dict[str, torch.Tensor]) -> None:
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    assert isinstance(full.blocks, torch.nn.Sequential)
    assert [len(list(stage.children())) for stage in full.blocks] == list(LITE0_DEPTHS)
    mapped = map_lite0_state_dict(lite0_source, LITE0_DEPTHS, keep_classifier=True)
    own = full.state_dict()
    assert len(mapped) == len(lite0_source) == len(own)
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    # Spot checks of the layout: the expand-ratio-1 first block, a stage boundary, the head.
    assert mapped["blocks.0.0.conv_pw.weight"] is lite0_source["_blocks.0._project_conv.weight"]
    assert mapped["blocks.2.1.conv_pwl.weight"] is lite0_source["_blocks.4._project_conv.weight"]
    assert mapped["blocks.6.0.bn3.running_var"] is lite0_source["_blocks.15._bn2.running_var"]
    assert mapped["bn2.weight"] is lite0_source["_bn1.weight"]
    backbone_only = map_lite0_state_dict(lite0_source, LITE0_DEPTHS)
    assert backbone_only.keys() == own.keys() - {"classifier.weight", "classifier.bias"}


def _sample_photo(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed; its sample photo is the offline ImageNet check")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def test_mapped_lite0_recognises_imagenet_photos(lite0_source: dict[str, torch.Tensor]) -> None:
    """The strongest offline check of the mapping: the full ImageNet model names well-known sample photos."""
    photos = {  # sample photos shipped inside matplotlib and scikit-learn -> ImageNet class index
        _sample_photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): 652,  # military uniform
        _sample_photo("sklearn", "datasets/images/flower.jpg"): 985,  # daisy
        _sample_photo("sklearn", "datasets/images/china.jpg"): 698,  # palace
    }
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    load_strictly(full, map_lite0_state_dict(lite0_source, LITE0_DEPTHS, keep_classifier=True), "lite0")
    for path, expected in photos.items():
        with Image.open(path) as photo:
            rgb = photo.convert("RGB")
        side = min(rgb.size)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        crop = rgb.crop((left, top, left + side, top + side))
        x = preprocess([crop], ModelConfig(image_size=224))
        with torch.no_grad():
            top1 = int(full(x).argmax(1))
        assert top1 == expected, f"{path.name}: top-1 class {top1}, expected {expected}"


def test_pretrained_backbone_holds_the_package_weights(
    pretrained: InspectionModel, lite0_source: dict[str, torch.Tensor]
) -> None:
    backbone = pretrained.backbone.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], lite0_source["_conv_stem.weight"])
    assert torch.equal(backbone["blocks.5.3.bn2.running_var"], lite0_source["_blocks.14._bn1.running_var"])
    batch_norms = [m for m in pretrained.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 49
    for bn in batch_norms:  # not the 0/1 defaults of a fresh model
        assert bn.running_mean is not None and bn.running_var is not None
        assert not torch.all(bn.running_var == 1.0) and not torch.all(bn.running_mean == 0.0)
    assert pretrained.config.embedding_dim == pretrained.embedding_dim == 1280


def test_features_are_deterministic_and_tell_images_apart(pretrained: InspectionModel) -> None:
    x = _batch(0, n=2)
    first, logits = pretrained.forward_features_and_logits(x)
    again = pretrained.embed(x)
    assert first.shape == (2, 1280) and logits.shape == (2, 2)
    assert torch.allclose(again, torch.nn.functional.normalize(first, dim=1).detach())
    assert torch.equal(again, pretrained.embed(x))
    assert again.dtype == torch.float32 and torch.allclose(again.norm(dim=1), torch.ones(2))
    assert float((again[0] - again[1]).norm()) > 0.05


def _probe_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Ridge-regression linear probe: fit on the first half, accuracy on the second."""
    z = features.double()
    half = len(z) // 2
    z = (z - z[:half].mean(0)) / (z[:half].std(0) + 1e-6)
    targets = torch.nn.functional.one_hot(labels, 2).double() * 2 - 1
    a = z[:half]
    w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets[:half])
    return float(((z[half:] @ w).argmax(1) == labels[half:]).double().mean())


def test_pretrained_features_separate_two_defects_far_better_than_random(pretrained: InspectionModel) -> None:
    classes = ("scratch", "pit")
    stream = SurfaceGenerator(SurfaceConfig(width=64, height=64, classes=classes, seed=1)).stream(count=80)
    images = list(stream)
    x = preprocess([image.pixels for image in images], pretrained.config)
    labels = torch.tensor([classes.index(image.label) for image in images])
    assert 25 <= int(labels.sum()) <= 55
    torch.manual_seed(0)
    random_init = InspectionModel(SMALL, list(classes)).eval()
    with torch.no_grad():
        pretrained_accuracy = _probe_accuracy(pretrained.backbone(x), labels)
        random_accuracy = _probe_accuracy(random_init.backbone(x), labels)
    assert pretrained_accuracy >= 0.8, (pretrained_accuracy, random_accuracy)
    assert pretrained_accuracy >= random_accuracy + 0.25, (pretrained_accuracy, random_accuracy)


def test_lite0_weights_are_refused_for_other_backbones() -> None:
    with pytest.raises(ValueError, match="fit only the backbone 'tf_efficientnet_lite0'"):
        ModelConfig(backbone="efficientnet_lite0")
    with pytest.raises(ValueError, match="not a timm model name"):
        InspectionModel(ModelConfig(backbone="no_such_net", pretrained="none"), ["good"])
    assert ModelConfig(backbone="efficientnet_lite0", pretrained="none").backbone == "efficientnet_lite0"


def test_mapping_and_strict_loading_name_what_does_not_fit(lite0_source: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match=r"no timm counterpart: _blocks\.15"):
        map_lite0_state_dict(lite0_source, (1, 2, 2, 3, 3, 4))  # one block short
    with pytest.raises(CheckpointError, match="no timm counterpart: _weird"):
        map_lite0_state_dict({**lite0_source, "_weird.weight": torch.zeros(1)}, LITE0_DEPTHS)
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    state = map_lite0_state_dict(lite0_source, LITE0_DEPTHS)
    del state["conv_head.weight"]
    state["bn2.weight"] = torch.ones(7)
    state["extra.bias"] = torch.ones(1)
    with pytest.raises(CheckpointError) as raised:
        load_strictly(backbone, state, "the test weights")
    message = str(raised.value)
    assert "missing: conv_head.weight" in message
    assert "unexpected: extra.bias" in message
    assert "bn2.weight (7,) vs (1280,)" in message


# ---- other timm checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_timm_checkpoint_loads_for_any_backbone(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    path = tmp_path / f"mnv3{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    config = ModelConfig(backbone="mobilenetv3_small_050", image_size=64, pretrained=str(path))
    model = InspectionModel(config, ["good", "pit"]).eval()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    loaded = model.backbone.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert model.embedding_dim == 1024  # MobileNetV3's pooled output is its head conv, not num_features
    assert model(_batch(0, n=2)).shape == (2, 2)


def test_a_checkpoint_of_another_backbone_is_refused_with_the_mismatches(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("mobilenetv3_small_075", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"do not fit the model: .*shape \(file vs model\): blocks"):
        InspectionModel(ModelConfig(backbone="mobilenetv3_small_050", pretrained=str(path)), ["good"])
    with pytest.raises(CheckpointError, match="does not exist"):
        InspectionModel(ModelConfig(backbone="mobilenetv3_small_050", pretrained=str(tmp_path / "no.pth")), ["a"])
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        InspectionModel(ModelConfig(backbone="mobilenetv3_small_050", pretrained=str(tmp_path / "junk.pth")), ["a"])


# ---- the head -----------------------------------------------------------------------------------


def test_growing_the_head_keeps_old_logits_exactly() -> None:
    torch.manual_seed(2)
    model = InspectionModel(ModelConfig(image_size=64, pretrained="none", drop_rate=0.3), ["good", "scratch"])
    model.eval()
    x = _batch(3)
    with torch.no_grad():
        embedding_before, before = model.forward_features_and_logits(x)
    old_weight, old_bias = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    assert model.grow(["pit", "crack"]) == (2, 3)
    assert model.grow([]) == ()
    with torch.no_grad():
        embedding_after, after = model.forward_features_and_logits(x)
    assert model.classes == ("good", "scratch", "pit", "crack") and model.num_classes == 4
    assert after.shape == (4, 4)
    # The old head rows are copied bit for bit, so old logits are the same numbers; the GEMM over 4 columns may
    # round differently from the one over 2 (by ~1e-7), so the full product is compared with a tolerance.
    assert torch.equal(model.head.weight[:2], old_weight) and torch.equal(model.head.bias[:2], old_bias)
    assert torch.equal(torch.nn.functional.linear(embedding_after, model.head.weight[:2], model.head.bias[:2]), before)
    assert torch.allclose(after[:, :2], before, rtol=0.0, atol=1e-5)
    assert torch.equal(after[:, :2].argmax(1), before.argmax(1))
    assert torch.equal(embedding_after, embedding_before)
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    model.train()
    model(x).logsumexp(1).mean().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.shape == (4, 1280)


def test_new_head_rows_come_from_the_given_generator_whatever_the_global_one_did() -> None:
    rows = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # another thread may have drawn from the global generator meanwhile
        model = InspectionModel(SMALL, ["good", "scratch"])
        old = model.head.weight.detach().clone()
        model.grow(["pit"], torch.Generator().manual_seed(7))
        assert torch.equal(model.head.weight[:2], old)
        rows.append((model.head.weight[2].detach().clone(), model.head.bias[2].detach().clone()))
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1], rows[1][1])
    bound = 1.0 / math.sqrt(1280)  # nn.Linear's own init range
    assert rows[0][0].abs().max() <= bound and rows[0][0].std() > bound / 3


def test_a_new_models_head_comes_from_the_given_generator_whatever_the_global_one_did() -> None:
    heads = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model = InspectionModel(SMALL, ["good", "scratch"], generator=torch.Generator().manual_seed(7))
        heads.append(torch.cat([model.head.weight.detach().flatten(), model.head.bias.detach()]))
    assert torch.equal(heads[0], heads[1])
    torch.manual_seed(0)
    drawn_globally = InspectionModel(SMALL, ["good", "scratch"]).head.weight.detach().flatten()
    assert not torch.equal(drawn_globally, heads[0][: drawn_globally.numel()])


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["scratch"], "already a class"),
        (["pit", "pit"], "given twice"),
        (["Pit"], "naming rule"),
        ([""], "empty"),
        ("pit", "not the string"),
    ],
)
def test_grow_refuses_bad_names_and_changes_nothing(names: list[str], message: str) -> None:
    model = InspectionModel(SMALL, ["good", "scratch"])
    head = model.head
    with pytest.raises(ValueError, match=message):
        model.grow(names)
    assert model.classes == ("good", "scratch") and model.head is head


def test_a_model_needs_at_least_one_valid_class() -> None:
    with pytest.raises(ValueError, match="at least one class"):
        InspectionModel(SMALL, [])
    with pytest.raises(ValueError, match="naming rule"):
        InspectionModel(SMALL, ["good", "Bad name"])
    with pytest.raises(ValueError, match="embedding_dim=12"):
        InspectionModel(ModelConfig(image_size=64, pretrained="none", embedding_dim=12), ["good"])


def test_config_round_trips_through_json() -> None:
    config = ModelConfig(backbone="resnet18", image_size=80, mean=(0.4, 0.5, 0.6), pretrained="none", drop_rate=0.2)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.mean == (0.4, 0.5, 0.6)
    assert ModelConfig.from_dict({}) == ModelConfig()
    with pytest.raises(ValueError, match="extra"):
        ModelConfig.from_dict({"backbone_name": "resnet18"})
    with pytest.raises(ValueError, match="std must be positive"):
        ModelConfig(std=(0.5, 0.0, 0.5))


# ---- checkpoints --------------------------------------------------------------------------------


def _grown_model() -> InspectionModel:
    torch.manual_seed(4)
    model = InspectionModel(
        ModelConfig(image_size=64, pretrained="/nowhere/weights.pth"), ["good"], load_pretrained=False
    )
    model.grow(["scratch", "pit"])
    return model.eval()


def test_checkpoint_round_trip_gives_identical_logits_and_metadata(tmp_path: Path) -> None:
    model = _grown_model()
    path = tmp_path / "models" / "v2.safetensors"
    saved = save_checkpoint(path, model, version="v2", parent_version="v1", extra_metadata={"macro_f1": 0.93})
    assert [p.name for p in path.parent.iterdir()] == ["v2.safetensors"]  # no temporary file left behind
    # The recorded pretrained source does not exist: loading must not try to read it.
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    x = _batch(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info == saved
    assert info.version == "v2" and info.parent_version == "v1"
    assert info.classes == loaded.classes == ("good", "scratch", "pit")
    assert info.config == model.config and info.config.embedding_dim == 1280
    assert info.extra == {"macro_f1": 0.93}
    assert info.created_at.utcoffset() is not None
    first, _ = load_checkpoint(
        save_checkpoint(tmp_path / "v1.safetensors", model, version="v1", parent_version=None).path
    )
    assert first.classes == model.classes


def test_save_checkpoint_refuses_bad_versions_and_metadata(tmp_path: Path) -> None:
    model = InspectionModel(SMALL, ["good"])
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="version"):
        save_checkpoint(path, model, version="", parent_version=None)
    with pytest.raises(ValueError, match="its own parent"):
        save_checkpoint(path, model, version="v1", parent_version="v1")
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(path, model, version="v1", parent_version=None, extra_metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []


def _rewrite_metadata(path: Path, **changes: object) -> None:
    """Change metadata entries of a safetensors file in place, leaving the tensors as they are."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].update({key: json.dumps(value) for key, value in changes.items()})
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def test_unusable_checkpoints_raise_clear_errors(tmp_path: Path) -> None:
    model = _grown_model()
    good = save_checkpoint(tmp_path / "good.safetensors", model, version="v1", parent_version=None).path
    data = good.read_bytes()

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    cases = {
        "garbage": (b"\x00" * 3 + b"not a safetensors file", "corrupt or not a safetensors file"),
        "truncated": (data[: len(data) // 2], "corrupt or not a safetensors file"),
        "flipped": (data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:], "do not match their checksum"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)

    misfit = tmp_path / "misfit.safetensors"
    misfit.write_bytes(data)
    _rewrite_metadata(misfit, classes=["good", "scratch"])
    with pytest.raises(CheckpointError, match=r"do not fit the model: shape \(file vs model\): head.bias \(3,\) vs"):
        load_checkpoint(misfit)
    _rewrite_metadata(misfit, classes=["good", "scratch", "pit"], config={"backbone": "nonsense_net"})
    with pytest.raises(CheckpointError, match=r"metadata .* is missing or invalid"):
        load_checkpoint(misfit)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"metadata .* is missing or invalid"):
        load_checkpoint(foreign)


# ---- preprocessing ------------------------------------------------------------------------------


def test_preprocess_turns_any_camera_image_into_a_normalised_batch() -> None:
    config = ModelConfig(image_size=32, pretrained="none", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5))
    white_grey = np.full((40, 70), 255, dtype=np.uint8)
    black_rgb = Image.new("RGB", (20, 10), (0, 0, 0))
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # alpha is dropped, not read as a colour
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    half = np.full((32, 32, 1), 0.5, dtype=np.float64)
    batch = preprocess([white_grey, black_rgb, rgba, sixteen, half], config)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32 and batch.is_contiguous()
    assert torch.allclose(batch[0, 0], torch.full((32, 32), 2.0)) and torch.allclose(batch[0, 1:], torch.ones(1))
    assert torch.allclose(batch[1, 0], torch.full((32, 32), -2.0)) and torch.allclose(batch[1, 1:], -torch.ones(1))
    assert torch.equal(batch[2], batch[1])
    assert torch.allclose(batch[3], batch[0])
    assert torch.allclose(batch[4], torch.zeros(1), atol=1e-6)
    assert preprocess([], config).shape == (0, 3, 32, 32)


def test_preprocess_resizes_with_antialiasing() -> None:
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes average to grey when halved, instead of aliasing to black or white
    out = preprocess([stripes], ModelConfig(image_size=32, pretrained="none"))
    assert float(out[..., 1:-1].abs().max()) < 0.01  # the border columns see a truncated filter


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8), dtype=bool), "uint8, uint16 or float"),
        (np.full((8, 8), 1.5, dtype=np.float32), "finite values in 0..1"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "HxW or HxWx1/3/4"),
        (np.zeros((0, 8), dtype=np.uint8), "not empty"),
        ("image.png", "PIL image or a numpy array"),
    ],
)
def test_preprocess_refuses_what_is_not_an_image(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess([image], SMALL)  # type: ignore[list-item]


def test_encoded_images_decode_into_the_same_batch() -> None:
    pixels = SurfaceGenerator(SurfaceConfig(width=48, height=48, seed=3)).sample(0).pixels
    png, jpeg = encode_image(pixels, "png"), encode_image(pixels, "jpeg", quality=95)
    batch = preprocess_encoded([png, jpeg], SMALL)
    assert batch.shape == (2, 3, 64, 64)
    assert torch.equal(batch[0], preprocess([pixels], SMALL)[0])
    assert float((batch[0] - batch[1]).abs().mean()) < 0.05  # JPEG is lossy, but close
    assert decode_image(png).size == (48, 48)
    with pytest.raises(ValueError, match="cannot be decoded"):
        preprocess_encoded([png[:50]], SMALL)
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_image(b"GIF89a nonsense")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF")
    assert torch.equal(preprocess_encoded([buffer.getvalue()], SMALL), batch[:1])


def test_head_input_sqrt_l2_feeds_the_head_the_normalised_square_root_and_survives_a_checkpoint(tmp_path: Path) -> None:
    model = InspectionModel(SMALL.model_copy(update={"head_input": "sqrt_l2"}), ["good", "scratch"]).eval()
    x = _batch(3)
    with torch.no_grad():
        embedding, logits = model.forward_features_and_logits(x)
        expected = model.head(torch.nn.functional.normalize(embedding.clamp_min(0).sqrt(), dim=1))
        assert torch.allclose(logits, expected) and not torch.allclose(logits, model.head(embedding))
        assert torch.allclose(model.embed(x), torch.nn.functional.normalize(embedding, dim=1))  # the index's: raw
    loaded, info = load_checkpoint(
        save_checkpoint(tmp_path / "v1.safetensors", model, version="v1", parent_version=None).path
    )
    assert info.config.head_input == "sqrt_l2"
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
