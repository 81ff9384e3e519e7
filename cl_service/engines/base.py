"""One small protocol for every inference engine, and a registry of engines by name.

An engine serves one model version from that version's folder: `build` makes the artifacts it needs there
(ONNX file, quantized file, TensorRT plan) from the checkpoint, once; an instance then `load`s them,
`warmup`s, answers `infer` and is `close`d. Every engine takes the same input (a float32 batch (N, 3, S, S),
already normalised by the model's config) and returns float32 logits (N, C) in the version's class order.

Engines are imported lazily by name: the service never imports onnxruntime, TensorRT or CUDA code it does
not use, and `availability` says why an engine cannot run on this machine instead of failing on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Batch = npt.NDArray[np.float32]


class EngineError(RuntimeError):
    """An engine could not be built, loaded or run; the message says which engine, which version and why."""


class EngineUnavailableError(EngineError):
    """The engine cannot run on this machine (a missing library or GPU); the message says what is missing."""


@dataclass
class BuildInputs:
    """What building an engine may use besides the version's checkpoint.

    `calibration`: normalised images for INT8 calibration (replay exemplars); `golden`: the batch every engine's
    parity with torch is checked on; `reference_logits`: torch's logits of `golden`.
    """

    calibration: Batch | None = None
    golden: Batch | None = None
    reference_logits: Batch | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded model version that answers `infer`. Not thread-safe unless its class says so."""

    name: str
    version_dir: Path

    def load(self) -> None: ...

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None: ...

    def infer(self, images: Batch) -> Batch: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What the engine is bound to (library versions, precision, device): recorded with the version."""
        ...


@dataclass(frozen=True)
class _Entry:
    module: str
    attribute: str
    options: dict[str, Any]
    summary: str


_REGISTRY: dict[str, _Entry] = {
    "torch": _Entry("cl_service.engines.torch_engine", "TorchEngine", {}, "PyTorch eager (the reference)"),
    "onnxruntime": _Entry(
        "cl_service.engines.onnx_engine", "OnnxRuntimeEngine", {"precision": "fp32"}, "ONNX Runtime FP32"
    ),
    "onnxruntime-int8": _Entry(
        "cl_service.engines.onnx_engine",
        "OnnxRuntimeEngine",
        {"precision": "int8"},
        "ONNX Runtime, static QDQ INT8 calibrated on replay exemplars",
    ),
    "tensorrt": _Entry(
        "cl_service.engines.tensorrt_engine", "TensorRTEngine", {"precision": "fp16"}, "TensorRT FP16 (NVIDIA GPU)"
    ),
    "tensorrt-int8": _Entry(
        "cl_service.engines.tensorrt_engine",
        "TensorRTEngine",
        {"precision": "int8"},
        "TensorRT INT8 with an entropy calibrator (NVIDIA GPU)",
    ),
}


def engine_names() -> list[str]:
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; engines: {', '.join(_REGISTRY)}") from None


def engine_class(name: str) -> Any:
    """The class behind `name`, imported now (ImportError of a missing optional library becomes unavailable)."""
    entry = _entry(name)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        raise EngineUnavailableError(f"engine {name!r} cannot be imported: {exc}") from exc
    return getattr(module, entry.attribute)


def availability(name: str) -> str | None:
    """None when `name` can run here, else the reason it cannot (missing library, no GPU, ...)."""
    try:
        cls = engine_class(name)
    except EngineUnavailableError as exc:
        return str(exc)
    reason: str | None = cls.availability(**_entry(name).options)
    return reason


def available_engines() -> list[str]:
    return [name for name in _REGISTRY if availability(name) is None]


def default_engine() -> str:
    """TensorRT where an NVIDIA GPU and TensorRT are present, else ONNX Runtime."""
    return "tensorrt" if availability("tensorrt") is None else "onnxruntime"


def build_engine(name: str, version_dir: Path, inputs: BuildInputs) -> list[Path]:
    """Make `name`'s artifacts in `version_dir` (once; existing ones are reused). Returns their paths."""
    entry = _entry(name)
    reason = availability(name)
    if reason is not None:
        raise EngineUnavailableError(reason)
    built: list[Path] = engine_class(name).build(version_dir, inputs, **entry.options)
    return built


def open_engine(name: str, version_dir: Path, **options: Any) -> Engine:
    """An unloaded engine of `name` for the version in `version_dir`; call `load` (and `warmup`) before `infer`."""
    entry = _entry(name)
    reason = availability(name)
    if reason is not None:
        raise EngineUnavailableError(reason)
    engine: Engine = engine_class(name)(version_dir, name=name, **{**entry.options, **options})
    return engine


def check_batch(images: Any, image_size: int, engine: str) -> Batch:
    """`images` as a contiguous float32 (N, 3, S, S) array, or a ValueError that says what is wrong."""
    array = np.asarray(images)
    expected = (3, image_size, image_size)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected or array.shape[0] < 1:
        raise ValueError(f"{engine}: expected a batch (N, {', '.join(map(str, expected))}), got {array.shape}")
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{engine}: the batch holds NaN or infinite values")
    return np.ascontiguousarray(array)
