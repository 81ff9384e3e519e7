"""ONNX Runtime engines: FP32 from the exported file, and static QDQ INT8 calibrated on replay exemplars.

The CUDA execution provider is used when onnxruntime-gpu is installed and a GPU is visible; the CPU provider
otherwise. INT8 is built only where it keeps top-1 agreement with FP32 on the golden batch (99% by default;
`BuildInputs.options["min_int8_agreement"]` sets another floor, 0.0 turns the check off, as the inference benchmark
does to measure a refused model); the validation-accuracy check comes on top, where the version is published.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cl_service.engines.base import Batch, BuildInputs, EngineError, check_batch
from cl_service.engines.export import INPUT, ONNX_FILE, OUTPUT, export_onnx
from cl_service.learning.model import load_checkpoint
from cl_service.learning.repository import CHECKPOINT
from replay_store.files import write_atomically

INT8_FILE = "model.int8.onnx"
FILES = {"fp32": ONNX_FILE, "int8": INT8_FILE}
MIN_INT8_AGREEMENT = 0.99


class OnnxRuntimeEngine:
    """Thread-safe: ONNX Runtime sessions may run concurrently."""

    def __init__(
        self,
        version_dir: Path,
        *,
        name: str = "onnxruntime",
        precision: str = "fp32",
        threads: int = 0,
        providers: Sequence[str] | None = None,
    ) -> None:
        if precision not in FILES:
            raise ValueError(f"onnxruntime precision must be one of {', '.join(FILES)}, got {precision!r}")
        self.name = name
        self.version_dir = version_dir
        self.precision = precision
        self.threads = threads
        self.providers = list(providers) if providers else _providers()
        self._session: ort.InferenceSession | None = None
        self._image_size = 0

    @staticmethod
    def availability(precision: str = "fp32") -> str | None:
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPU execution provider"
        return None

    @staticmethod
    def build(version_dir: Path, inputs: BuildInputs, precision: str = "fp32", **options: Any) -> list[Path]:
        fp32 = version_dir / ONNX_FILE
        if not fp32.is_file():
            model, _ = load_checkpoint(version_dir / CHECKPOINT)
            export_onnx(model, fp32)
        if precision == "fp32":
            return [fp32]
        int8 = version_dir / INT8_FILE
        if not int8.is_file():
            if inputs.calibration is None or not len(inputs.calibration):
                raise EngineError(f"onnxruntime-int8 of {version_dir.name}: no calibration images (replay exemplars)")
            floor = _min_int8_agreement(inputs)
            data = quantize_int8(fp32, inputs.calibration)
            if inputs.golden is not None and len(inputs.golden) and floor > 0.0:
                agreement = _agreement(fp32, data, inputs.golden)
                if agreement < floor:
                    raise EngineError(
                        f"onnxruntime-int8 of {version_dir.name} rejected: top-1 agreement with FP32 {agreement:.1%} "
                        f"on {len(inputs.golden)} golden images < {floor:.0%}"
                    )
            write_atomically(int8, data)
        return [int8]

    def load(self) -> None:
        path = self.version_dir / FILES[self.precision]
        if not path.is_file():
            raise EngineError(f"{self.name}: {path} does not exist (build the engine first)")
        try:
            self._session = _session(path.read_bytes(), self.providers, self.threads)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise EngineError(f"{self.name}: cannot load {path}: {exc}") from exc
        shape = self._session.get_inputs()[0].shape
        self._image_size = int(shape[-1])

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise EngineError(f"{self.name}: {self.version_dir.name} is not loaded")
        return self._session

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for n in batch_sizes:
            self.infer(np.zeros((n, 3, self._image_size, self._image_size), dtype=np.float32))

    def infer(self, images: Batch) -> Batch:
        session = self.session
        batch = check_batch(images, self._image_size, self.name)
        out: Batch = session.run([OUTPUT], {INPUT: batch})[0]
        return out

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        providers = self._session.get_providers() if self._session else self.providers
        return {
            "engine": self.name,
            "onnxruntime": ort.__version__,
            "providers": providers,
            "precision": self.precision,
        }


def _min_int8_agreement(inputs: BuildInputs) -> float:
    """The INT8 build's floor on top-1 agreement with FP32: `inputs.options["min_int8_agreement"]`, else
    MIN_INT8_AGREEMENT (read at build time). A file built under a lower floor is reused by later builds as is."""
    if "min_int8_agreement" not in inputs.options:
        return MIN_INT8_AGREEMENT
    value = inputs.options["min_int8_agreement"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise EngineError(f"onnxruntime-int8: min_int8_agreement must be a number in [0, 1], got {value!r}")
    return float(value)


def _providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session(model: bytes, providers: Sequence[str], threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a normalised batch."""

    def __init__(self, images: Batch, batch_size: int = 32) -> None:
        self._batches: Iterator[Batch] = (
            np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)
            for i in range(0, len(images), batch_size)
        )

    def get_next(self) -> dict[str, Batch] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize_int8(fp32: Path, calibration: Batch) -> bytes:
    """Static QDQ quantization (per-channel INT8 weights, UINT8 activations, min-max calibration on
    `calibration`) of the FP32 file, after onnxruntime's recommended pre-processing (shape inference and
    graph optimisation). Returns the quantized model's bytes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cl-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return quantized.read_bytes()


def _agreement(fp32: Path, int8: bytes, golden: Batch) -> float:
    cpu = ["CPUExecutionProvider"]
    reference = _session(fp32.read_bytes(), cpu, 0).run([OUTPUT], {INPUT: golden})[0]
    quantized = _session(int8, cpu, 0).run([OUTPUT], {INPUT: golden})[0]
    return float((reference.argmax(axis=1) == quantized.argmax(axis=1)).mean())
