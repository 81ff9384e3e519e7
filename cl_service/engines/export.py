"""ONNX export of a model version and the parity check every engine passes before it may go live."""

from __future__ import annotations

import math
import warnings
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_service.engines.base import Batch, EngineError
from cl_service.learning.model import InspectionModel
from replay_store.files import write_atomically

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT = "images"
OUTPUT = "logits"


def export_onnx(model: InspectionModel, path: Path, *, opset: int = OPSET) -> Path:
    """Write `model` (eval mode, logits only) as one self-contained ONNX file with a dynamic batch axis.

    Uses the TorchScript-based exporter: the model is a plain feed-forward CNN, and the torch.export-based
    exporter needs onnxscript, which this service does not otherwise depend on. The file is checked by
    `onnx.checker` and replaced atomically, so a reader never sees half a file.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be 17 or newer, got {opset}")
    model = model.eval()
    size = model.config.image_size
    example = torch.zeros((2, 3, size, size), dtype=torch.float32)
    scratch = path.with_name(f".{path.name}.export")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(
            _LogitsOnly(static_padding(model, size)),
            (example,),
            str(scratch),
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            dynamo=False,
        )
    try:
        proto = onnx.load(str(scratch))
        onnx.checker.check_model(proto, full_check=True)
        proto.doc_string = f"cl-service model, classes: {', '.join(model.classes)}"
        for key, value in (("classes", "\n".join(model.classes)), ("image_size", str(size))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        write_atomically(path, proto.SerializeToString())
    finally:
        scratch.unlink(missing_ok=True)
    return path


def static_padding(model: InspectionModel, image_size: int) -> InspectionModel:
    """A copy of `model` in which TensorFlow-style 'same' convolutions (timm's Conv2dSame, in the tf_* backbones)
    pad by constants computed for `image_size` instead of from the input's shape at run time.

    Traced as is, each of them becomes a chain of Shape/Gather/Div/Ceil/Mul/Sub ops feeding a Pad: noise for
    every runtime, and fatal for static INT8 quantization, which quantizes that arithmetic and so computes
    wrong paddings. The input size is fixed by the model's config, so the paddings are constants.
    """
    copy = deepcopy(model).eval()
    same = [(name, m) for name, m in copy.named_modules() if type(m).__name__ == "Conv2dSame"]
    if not same:
        return copy
    sizes: dict[str, tuple[int, int]] = {}

    def recorder(name: str) -> Any:
        def record(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes[name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        return record

    hooks = [module.register_forward_pre_hook(recorder(name)) for name, module in same]
    with torch.no_grad():
        copy(torch.zeros((1, 3, image_size, image_size)))
    for hook in hooks:
        hook.remove()
    for name, module in same:
        pads: list[int] = []
        for size, kernel, stride, dilation in reversed(
            list(zip(sizes[name], module.kernel_size, module.stride, module.dilation, strict=True))
        ):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        conv = torch.nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=0,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
        )
        conv.load_state_dict(module.state_dict())
        parent_name, _, child = name.rpartition(".")
        parent = copy.get_submodule(parent_name) if parent_name else copy
        left, right, top, bottom = pads
        setattr(parent, child, torch.nn.Sequential(torch.nn.ZeroPad2d((left, right, top, bottom)), conv))
    return copy


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: InspectionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.head(self.model.head_features(self.model.backbone(images)))
        return logits


@dataclass(frozen=True)
class Parity:
    """How closely an engine's logits follow torch's on the golden batch."""

    engine: str
    images: int
    max_abs_diff: float
    top1_agreement: float
    max_abs_allowed: float
    min_top1_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.max_abs_allowed and self.top1_agreement >= self.min_top1_agreement

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity of {self.engine} {verdict} on {self.images} images: max |diff| {self.max_abs_diff:.2e} "
            f"(allowed {self.max_abs_allowed:.2e}), top-1 agreement {self.top1_agreement:.1%} "
            f"(required {self.min_top1_agreement:.1%})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# Full precision engines must match torch closely; reduced precision ones are judged on top-1 agreement
# (and INT8 also on validation accuracy, where it is built).
TOLERANCES = {"fp32": (1e-3, 1.0), "fp16": (5e-2, 0.99), "int8": (float("inf"), 0.99)}
# float32 rounding grows with the logits: a head whose logits reach hundreds (a discriminant head) differs from
# torch by more than 1e-3 in the last digits. The allowed difference grows by this share of the largest |logit|.
RELATIVE_TOLERANCE = 1e-5


def parity(engine: str, reference: Batch, logits: Batch, *, precision: str = "fp32") -> Parity:
    """Compare an engine's logits with torch's on the same images."""
    if reference.shape != logits.shape:
        raise EngineError(f"{engine}: logits of shape {logits.shape}, torch gave {reference.shape}")
    max_abs, min_top1 = TOLERANCES[precision]
    max_abs += RELATIVE_TOLERANCE * float(np.abs(reference).max(initial=0.0))
    finite = bool(np.isfinite(logits).all())
    diff = float(np.abs(reference - logits).max()) if finite else float("inf")
    agree = float((reference.argmax(axis=1) == logits.argmax(axis=1)).mean()) if finite else 0.0
    return Parity(engine, len(reference), diff, agree, max_abs, min_top1)


def torch_logits(model: InspectionModel, images: Batch, batch_size: int = 64) -> Batch:
    """The reference: torch eager logits (float32) of a normalised batch."""
    model = model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))).numpy())
    return np.concatenate(out).astype(np.float32)
