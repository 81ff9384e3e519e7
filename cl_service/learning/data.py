"""Training data from a store snapshot: the fixed validation split, decoded images, class-balanced batches.

The validation split is decided by the image's content hash, never stored and never re-drawn: an image
is in validation for every update (so a candidate and the live model are always scored on images neither
was trained on), and identical images sent twice land on the same side (no leak from train to validation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from cl_service.ingest.images import decode_image
from cl_service.learning.model import preprocess
from cl_service.learning.settings import ModelConfig
from replay_store.store import SnapshotRow, Store

VALIDATION_SALT = b"cl-service/validation/v1:"


def _validation_key(sha256: str) -> float:
    """A fixed pseudo-random number in [0, 1) per content hash."""
    digest = hashlib.sha256(VALIDATION_SALT + sha256.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_validation(sha256: str, fraction: float) -> bool:
    """Whether the image with this content hash is drawn for the validation split (before any per-class cap)."""
    return _validation_key(sha256) < fraction


def split_validation(
    rows: Sequence[SnapshotRow], fraction: float, max_per_class: int | None = None
) -> tuple[list[SnapshotRow], list[SnapshotRow]]:
    """(train, validation) of human-labeled rows.

    With `max_per_class`, a class keeps the drawn images with the smallest keys and the rest train: scoring
    stays bounded as history grows, and an image that trained once never returns to validation (new images
    can only push images out of a class's validation set, never pull one back in).
    """
    train: list[SnapshotRow] = []
    drawn: dict[str | None, list[tuple[float, SnapshotRow]]] = {}
    for row in rows:
        key = _validation_key(row.sha256)
        if key < fraction:
            drawn.setdefault(row.label, []).append((key, row))
        else:
            train.append(row)
    validation: list[SnapshotRow] = []
    for members in drawn.values():
        members.sort(key=lambda pair: pair[0])
        keep = len(members) if max_per_class is None else max_per_class
        validation.extend(row for _, row in members[:keep])
        train.extend(row for _, row in members[keep:])
    return train, validation


class ImageTensors:
    """Decodes stored images once per update into uint8 tensors (3, S, S) at the model's input size."""

    def __init__(self, store: Store, config: ModelConfig, *, threads: int = 2) -> None:
        self._store = store
        self._unit = config.model_copy(update={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._threads = max(1, threads)
        self._cache: dict[str, Tensor] = {}

    def load(self, rows: Sequence[SnapshotRow]) -> Tensor:
        """uint8 (N, 3, S, S) for the rows, in order; decodes what is not cached yet."""
        missing = sorted({row.sha256 for row in rows} - self._cache.keys())
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            blobs = self._store.read_blobs(chunk)
            with ThreadPoolExecutor(self._threads) as pool:
                decoded = list(pool.map(self._decode, [blobs[sha] for sha in chunk]))
            self._cache.update(zip(chunk, decoded, strict=True))
        if not rows:
            size = self._unit.image_size
            return torch.empty((0, 3, size, size), dtype=torch.uint8)
        return torch.stack([self._cache[row.sha256] for row in rows])

    def _decode(self, data: bytes) -> Tensor:
        unit = preprocess([decode_image(data)], self._unit)[0]
        return (unit * 255.0).round().clamp(0, 255).to(torch.uint8)

    def normalise(self, unit: Tensor) -> Tensor:
        """A float batch in 0..1 -> the model's normalised input."""
        return (unit - self._mean) / self._std


def to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float32 in 0..1."""
    return images.to(torch.float32) / 255.0


def balanced_batches(
    labels: Sequence[int], batch_size: int, steps: int, generator: torch.Generator, balanced: bool = True
) -> Iterator[Tensor]:
    """`steps` batches of indices drawn with probability inversely proportional to their class's count
    (`balanced=False`: every index equally likely)."""
    if not labels:
        return
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    counts = torch.bincount(targets).to(torch.float64)
    weights = 1.0 / counts[targets] if balanced else torch.ones(len(labels), dtype=torch.float64)
    for _ in range(steps):
        yield torch.multinomial(weights, min(batch_size, len(labels)), replacement=True, generator=generator)
