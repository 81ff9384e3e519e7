"""The reference engine: the checkpoint in PyTorch eager mode (CPU, or CUDA when asked and present)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_service.engines.base import Batch, BuildInputs, EngineError, check_batch
from cl_service.learning.model import InspectionModel, load_checkpoint
from cl_service.learning.repository import CHECKPOINT


class TorchEngine:
    """Thread-safe: inference runs under `torch.inference_mode` on a model in eval mode."""

    def __init__(self, version_dir: Path, *, name: str = "torch", device: str = "cpu") -> None:
        self.name = name
        self.version_dir = version_dir
        self.device = torch.device(device)
        self._model: InspectionModel | None = None

    @staticmethod
    def availability(device: str = "cpu") -> str | None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return "torch on CUDA needs an NVIDIA GPU and a CUDA build of torch; none is visible"
        return None

    @staticmethod
    def build(version_dir: Path, inputs: BuildInputs, **options: Any) -> list[Path]:
        path = version_dir / CHECKPOINT
        if not path.is_file():
            raise EngineError(f"torch: {path} does not exist")
        return [path]

    def load(self) -> None:
        model, _ = load_checkpoint(self.version_dir / CHECKPOINT)
        self._model = model.eval().to(self.device)

    @property
    def model(self) -> InspectionModel:
        if self._model is None:
            raise EngineError(f"{self.name}: {self.version_dir.name} is not loaded")
        return self._model

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        size = self.model.config.image_size
        for n in batch_sizes:
            self.infer(np.zeros((n, 3, size, size), dtype=np.float32))

    def infer(self, images: Batch) -> Batch:
        batch = check_batch(images, self.model.config.image_size, self.name)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device))
        out: Batch = logits.float().cpu().numpy()
        return out

    def close(self) -> None:
        self._model = None

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "torch": torch.__version__, "device": str(self.device), "precision": "fp32"}
