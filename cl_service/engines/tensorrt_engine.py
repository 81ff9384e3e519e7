"""TensorRT engines (NVIDIA GPUs): FP16 by default, INT8 with an entropy calibrator over replay exemplars.

Install with `pip install .[gpu]` on a machine with NVIDIA's driver (TensorRT's wheels come from NVIDIA's
index). A plan file is bound to the GPU model and the TensorRT version that built it: both are part of its
file name and recorded beside it, and a plan built elsewhere is rebuilt, never loaded. The builder keeps a
timing cache next to the versions (`trt-timing-<gpu>-<trt>.cache`), so later builds on the same GPU skip
most kernel timing. With `refit=True` an engine whose architecture is unchanged gets the new version's
weights by refitting the previous version's plan; the refitted engine is compared with a fresh build on the
golden batch and discarded (fresh build kept) when they disagree, because refitting can change numerics.

Device buffers are torch CUDA tensors: no extra CUDA binding is needed. Inference is serialised by a lock
(one execution context per engine).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_service.engines.base import Batch, BuildInputs, EngineError, check_batch
from cl_service.engines.export import INPUT, ONNX_FILE, OUTPUT, export_onnx, parity
from cl_service.learning.model import load_checkpoint
from cl_service.learning.repository import CHECKPOINT
from replay_store.files import write_atomically

try:  # an optional extra: the module must import (and say why it cannot run) without it
    import tensorrt as trt
except ImportError:  # pragma: no cover - exercised on machines without TensorRT
    trt = None

MAX_BATCH = 64
OPT_BATCH = 8
WORKSPACE_BYTES = 1 << 30


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _machine_tag() -> str:
    """What a plan is bound to: the GPU model and TensorRT's version (`nvidia-h200-trt10.9.0`)."""
    gpu = _slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "no-gpu"
    version = trt.__version__ if trt is not None else "none"
    return f"{gpu}-trt{version}"


def plan_name(precision: str) -> str:
    return f"tensorrt-{precision}-{_machine_tag()}.plan"


class TensorRTEngine:
    """A deserialised plan with one execution context; `infer` is serialised by a lock."""

    def __init__(self, version_dir: Path, *, name: str = "tensorrt", precision: str = "fp16") -> None:
        if precision not in ("fp16", "int8", "fp32"):
            raise ValueError(f"tensorrt precision must be fp16, int8 or fp32, got {precision!r}")
        self.name = name
        self.version_dir = version_dir
        self.precision = precision
        self._engine: Any = None
        self._context: Any = None
        self._lock = threading.Lock()
        self._image_size = 0
        self._classes = 0

    @staticmethod
    def availability(precision: str = "fp16") -> str | None:
        if trt is None:
            return "TensorRT is not installed (pip install .[gpu] on an NVIDIA machine; its wheels come from NVIDIA)"
        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU and a CUDA build of torch; none is visible"
        return None

    @staticmethod
    def build(version_dir: Path, inputs: BuildInputs, precision: str = "fp16", **options: Any) -> list[Path]:
        plan = version_dir / "engines" / plan_name(precision)
        if plan.is_file():
            return [plan]
        onnx_path = version_dir / ONNX_FILE
        if not onnx_path.is_file():
            model, _ = load_checkpoint(version_dir / CHECKPOINT)
            export_onnx(model, onnx_path)
        cache = Path(options.get("timing_cache") or version_dir.parent / f"trt-timing-{_machine_tag()}.cache")
        data = _build_plan(onnx_path, precision, inputs.calibration, cache, refit=bool(options.get("refit")))
        previous = options.get("refit_from")
        if previous is not None and inputs.golden is not None and inputs.reference_logits is not None:
            data = _prefer_refit(Path(previous), onnx_path, data, inputs, precision)
        plan.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(plan, data)
        write_atomically(
            plan.with_suffix(".json"),
            json.dumps(
                {
                    "tensorrt": trt.__version__,
                    "gpu": torch.cuda.get_device_name(0),
                    "compute_capability": list(torch.cuda.get_device_capability(0)),
                    "precision": precision,
                    "max_batch": MAX_BATCH,
                }
            ).encode(),
        )
        return [plan]

    def load(self) -> None:
        path = self.version_dir / "engines" / plan_name(self.precision)
        if not path.is_file():
            raise EngineError(f"{self.name}: {path} does not exist (build it on this GPU first)")
        self._engine = _deserialise(path.read_bytes())
        self._context = self._engine.create_execution_context()
        shape = self._engine.get_tensor_shape(INPUT)
        self._image_size = int(shape[-1])
        self._classes = int(self._engine.get_tensor_shape(OUTPUT)[-1])

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for n in batch_sizes:
            self.infer(np.zeros((n, 3, self._image_size, self._image_size), dtype=np.float32))

    def infer(self, images: Batch) -> Batch:
        if self._context is None:
            raise EngineError(f"{self.name}: {self.version_dir.name} is not loaded")
        batch = check_batch(images, self._image_size, self.name)
        out: list[Batch] = []
        for start in range(0, len(batch), MAX_BATCH):
            out.append(self._run(batch[start : start + MAX_BATCH]))
        return np.concatenate(out)

    def _run(self, batch: Batch) -> Batch:
        with self._lock:
            device_in = torch.from_numpy(batch).cuda()
            device_out = torch.empty((len(batch), self._classes), dtype=torch.float32, device="cuda")
            stream = torch.cuda.current_stream()
            self._context.set_input_shape(INPUT, tuple(device_in.shape))
            self._context.set_tensor_address(INPUT, device_in.data_ptr())
            self._context.set_tensor_address(OUTPUT, device_out.data_ptr())
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{self.name}: TensorRT execution failed for {self.version_dir.name}")
            stream.synchronize()
            result: Batch = device_out.cpu().numpy()
            return result

    def close(self) -> None:
        with self._lock:
            self._context = None
            self._engine = None

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "tensorrt": trt.__version__ if trt is not None else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "precision": self.precision,
        }


def _logger() -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _deserialise(data: bytes) -> Any:
    engine = trt.Runtime(_logger()).deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError("TensorRT could not deserialise the plan (built by another TensorRT version or GPU?)")
    return engine


def _build_plan(onnx_path: Path, precision: str, calibration: Batch | None, cache_path: Path, *, refit: bool) -> bytes:
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    size = int(network.get_input(0).shape[-1])
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (1, 3, size, size), (OPT_BATCH, 3, size, size), (MAX_BATCH, 3, size, size))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibration is None or not len(calibration):
            raise EngineError("TensorRT INT8 needs calibration images (replay exemplars)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _Calibrator(calibration)
        config.set_calibration_profile(profile)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialised = builder.build_serialized_network(network, config)
    if serialised is None:
        raise EngineError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialised)


def _prefer_refit(previous_plan: Path, onnx_path: Path, fresh: bytes, inputs: BuildInputs, precision: str) -> bytes:
    """The previous version's plan refitted with this version's weights, when it agrees with a fresh build on the
    golden batch as closely as the fresh build agrees with torch; else the fresh build."""
    assert inputs.golden is not None and inputs.reference_logits is not None
    if not previous_plan.is_file():
        return fresh
    engine = _deserialise(previous_plan.read_bytes())
    refitter = trt.Refitter(engine, _logger())
    parser_refitter = trt.OnnxParserRefitter(refitter, _logger())
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        return fresh  # a changed architecture (new classes change the head's shape) cannot be refitted
    refitted = bytes(engine.serialize())
    golden, classes = inputs.golden, inputs.reference_logits.shape[1]
    check = parity(
        "tensorrt-refit", _run_plan(fresh, golden, classes), _run_plan(refitted, golden, classes), precision=precision
    )
    return refitted if check.passed else fresh


def _run_plan(data: bytes, images: Batch, classes: int) -> Batch:
    runner = TensorRTEngine(Path())
    runner._engine = _deserialise(data)
    runner._context = runner._engine.create_execution_context()
    runner._image_size, runner._classes = int(images.shape[-1]), classes
    return runner.infer(images)


class _Calibrator(trt.IInt8EntropyCalibrator2 if trt is not None else object):  # type: ignore[misc]
    """Feeds normalised calibration images to TensorRT's INT8 calibration, a batch at a time."""

    def __init__(self, images: Batch, batch_size: int = 16) -> None:
        super().__init__()
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._batch_size = batch_size
        self._next = 0
        self._device: torch.Tensor | None = None

    def get_batch_size(self) -> int:
        return self._batch_size

    def get_batch(self, names: list[str]) -> list[int] | None:
        if self._next + self._batch_size > len(self._images):
            return None
        chunk = self._images[self._next : self._next + self._batch_size]
        self._next += self._batch_size
        self._device = torch.from_numpy(chunk).cuda()
        return [int(self._device.data_ptr())]

    def read_calibration_cache(self) -> None:
        return None

    def write_calibration_cache(self, cache: Any) -> None:
        return None
