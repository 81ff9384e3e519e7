"""Running class statistics of frozen features, and the linear discriminant head they give.

With the backbone frozen, what a class looks like in feature space is summed up by its count, its feature sum and
(shared by all classes) the scatter of the features: each adds up image by image, in any order, so an update folds in
its new images and keeps no image, and an old class's statistics never change when new classes arrive (nothing to
forget). The head is linear discriminant analysis with a shared covariance shrunk towards its mean variance:

    S = (sum of x x^T - sum over classes of n_c mu_c mu_c^T) / (N - C),  S' = (1 - s) S + s * mean(diag S) * I
    w_c = S'^-1 mu_c,  b_c = -mu_c . w_c / 2

which fits into the model's `nn.Linear` head (rows in class order), so engines and serving do not change.

Measured after the fact on the bench's splits with the pretrained tf_efficientnet_lite0 at 96x96 (docs/learning.md,
"Tried"): xsdd 98.0% with all labels, magnetic_tile 97.5% (five defects) and 96.8% (with `free`), shrinkage 0.1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_NEVER = -1e4  # the bias of a class without images: its output never wins


class ClassStatistics:
    """Counts, feature sums and the summed outer product of features, per class (float64)."""

    def __init__(self, dim: int, classes: Sequence[str] = ()) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.classes: list[str] = []
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.sums = torch.zeros((0, dim), dtype=torch.float64)
        self.scatter = torch.zeros((dim, dim), dtype=torch.float64)
        self.add_classes(classes)

    def add_classes(self, names: Sequence[str]) -> None:
        """Append classes (in order) with no images yet; the known ones keep their index."""
        if isinstance(names, str):
            raise TypeError(f"pass a list of class names, not the string {names!r}")
        repeated = [name for name in names if name in self.classes or list(names).count(name) > 1]
        if repeated:
            raise ValueError(f"classes {sorted(set(repeated))} are already known or given twice")
        n = len(names)
        self.classes += list(names)
        self.counts = torch.cat([self.counts, torch.zeros(n, dtype=torch.float64)])
        self.sums = torch.cat([self.sums, torch.zeros((n, self.dim), dtype=torch.float64)])

    def fold(self, features: Tensor, targets: Tensor) -> None:
        """Add images: `features` (N, dim) of the frozen backbone, `targets` (N,) class indices."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(features.shape)}")
        if targets.shape != (features.shape[0],):
            raise ValueError(f"{features.shape[0]} feature rows but targets of shape {tuple(targets.shape)}")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= len(self.classes)):
            raise ValueError(f"targets must be class indices in 0..{len(self.classes) - 1}")
        x = features.detach().to(torch.float64)
        self.counts += torch.bincount(targets, minlength=len(self.classes)).to(torch.float64)
        self.sums.index_add_(0, targets, x)
        self.scatter += x.T @ x

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def head(self, shrinkage: float = 0.1) -> tuple[Tensor, Tensor]:
        """(weight (C, dim), bias (C,)) as float32; a class without images gets a zero row and a bias it never wins
        with. Needs images of at least two classes."""
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        seen = self.counts > 0
        if int(seen.sum()) < 2:
            raise ValueError("a discriminant head needs images of at least two classes")
        means = torch.zeros_like(self.sums)
        means[seen] = self.sums[seen] / self.counts[seen, None]
        between = (means[seen].T * self.counts[seen]) @ means[seen]
        within = (self.scatter - between) / max(1.0, self.total - int(seen.sum()))
        within = (within + within.T) / 2
        level = float(within.diagonal().mean().clamp_min(1e-12))
        covariance = (1.0 - shrinkage) * within + shrinkage * level * torch.eye(self.dim, dtype=torch.float64)
        weight = torch.linalg.solve(covariance, means.T).T
        bias = -0.5 * (weight * means).sum(dim=1)
        weight[~seen] = 0.0
        bias[~seen] = _NEVER
        return weight.to(torch.float32), bias.to(torch.float32)

    def save(self, path: str | Path) -> None:
        """One safetensors file: the three tensors, the class list in its metadata."""
        from safetensors.torch import save_file

        tensors = {"counts": self.counts, "sums": self.sums.contiguous(), "scatter": self.scatter.contiguous()}
        save_file(tensors, str(path), metadata={"class_statistics": json.dumps({"classes": self.classes})})

    @classmethod
    def load(cls, path: str | Path) -> ClassStatistics:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if "class_statistics" not in meta:
                raise ValueError(f"{path} holds no class statistics")
            classes = json.loads(meta["class_statistics"])["classes"]
            tensors = {key: handle.get_tensor(key) for key in ("counts", "sums", "scatter")}
        dim = tensors["scatter"].shape[0]
        if tensors["sums"].shape != (len(classes), dim) or tensors["counts"].shape != (len(classes),):
            raise ValueError(f"{path}: tensor shapes do not match {len(classes)} classes of dimension {dim}")
        stats = cls(dim)
        stats.classes = list(classes)
        stats.counts, stats.sums, stats.scatter = tensors["counts"], tensors["sums"], tensors["scatter"]
        return stats


def save_features(path: str | Path, hashes: Sequence[str], features: Tensor) -> None:
    """Frozen-backbone features (N, dim) of images named by content hash, in one safetensors file."""
    from safetensors.torch import save_file

    if features.ndim != 2 or features.shape[0] != len(hashes):
        raise ValueError(f"{len(hashes)} hashes but features of shape {tuple(features.shape)}")
    tensors = {"features": features.detach().to(torch.float32).contiguous()}
    save_file(tensors, str(path), metadata={"sha256": json.dumps(list(hashes))})


def load_features(path: str | Path, dim: int) -> dict[str, Tensor]:
    """What `save_features` wrote, by hash; {} when the file is missing, unreadable or of another dimension (the
    features are then computed again: a cache, never the only copy of anything)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            hashes = json.loads((handle.metadata() or {})["sha256"])
            features = handle.get_tensor("features")
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - any damage: recompute rather than fail the update
        log.warning("ignoring the feature cache %s: %s", path, exc)
        return {}
    if features.shape != (len(hashes), dim):
        log.warning(
            "ignoring the feature cache %s: shape %s, expected (%d, %d)", path, tuple(features.shape), len(hashes), dim
        )
        return {}
    return dict(zip(hashes, features, strict=True))
