"""Teacher pseudo-labels: per-class adaptive confidence thresholds, test-time augmentation, FixMatch consistency.

Thresholds follow FreeMatch's self-adaptive thresholding (Wang et al., ICLR 2023, "FreeMatch: Self-adaptive Thresholding
for Semi-supervised Learning", Eqs. 5-8): a global EMA of the teacher's max confidence and a per-class EMA of its mean
probability vector; class c's threshold is `global * ema_c / max_k ema_k`, so a class the teacher rarely predicts with
confidence (a hard or new defect) gets a lower threshold and contributes pseudo-labels, the idea FlexMatch
(Zhang et al., NeurIPS 2021) introduced with curriculum pseudo-labelling. Differences from the paper, for a service:

- the global EMA starts at `base` (FixMatch's fixed 0.95, Sohn et al., NeurIPS 2020), not at 1/C: a pretrained teacher
  in a factory should start conservative, not accept everything until the EMA warms up;
- every threshold is clamped to [floor, ceiling]: never below `floor` (noise), never above `ceiling` (so a class always
  can receive pseudo-labels);
- `momentum` is per *sample*: a batch of n moves the EMAs with `momentum ** n`, so the result hardly depends on how the
  unlabeled pool is cut into batches;
- classes can be added (the head grows); a new class starts at the largest class EMA, i.e. at the global threshold.

FreeMatch's per-class statistic, the mean probability vector, measures how *often* the teacher predicts a class as much
as how *sure* it is; it assumes balanced unlabeled data. On a factory stream where `good` dominates, every defect class
falls to the floor. `per_class="confidence"` replaces it with a per-class EMA of the top confidence of the samples
predicted as that class (each class moved by its own sample count), which does not depend on class frequency; in the
spirit of class-imbalanced SSL thresholds such as Adsh (Guo & Li, ICML 2022). The default stays FreeMatch's.

The labeler only *proposes* labels for unlabeled samples. Precedence (operator > camera > pseudo) is the store's rule: a
pseudo-label never replaces a human label there.

Weak/strong augmentation follow FixMatch: weak = flip + small translation, strong = RandAugment-style photometric and
geometric ops with random magnitudes + Cutout. All randomness comes from a `torch.Generator`, so a seed reproduces them.
Images are float tensors in [0, 1], `(C, H, W)` or `(N, C, H, W)`, with 1 or 3 channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
import torchvision.transforms.v2.functional as TF  # noqa: N812
from torch import Tensor

F64 = npt.NDArray[np.float64]
ImageOp = Callable[[Tensor], Tensor]
PerClass = Literal["probability", "confidence"]

STATE_VERSION = 1
_SUM_TOLERANCE = 1e-3


# -- adaptive thresholds ------------------------------------------------------------------------------------------


class AdaptiveThresholds:
    """Per-class confidence thresholds that follow the teacher's confidence (FreeMatch SAT, clamped; see module doc)."""

    def __init__(
        self,
        classes: Sequence[str],
        base: float = 0.95,
        floor: float = 0.5,
        ceiling: float = 0.99,
        momentum: float = 0.999,
        per_class: PerClass = "probability",
    ) -> None:
        if per_class not in ("probability", "confidence"):
            raise ValueError(f"per_class must be 'probability' or 'confidence', got {per_class!r}")
        if not 0.0 < floor <= ceiling <= 1.0:
            raise ValueError(f"need 0 < floor <= ceiling <= 1, got floor={floor}, ceiling={ceiling}")
        if not 0.0 < base <= 1.0:
            raise ValueError(f"base must be in (0, 1], got {base}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.classes: list[str] = []
        self.base, self.floor, self.ceiling, self.momentum = float(base), float(floor), float(ceiling), float(momentum)
        self.per_class: PerClass = per_class
        self.global_confidence = float(base)
        self.class_ema: F64 = np.zeros(0, dtype=np.float64)
        self.seen = 0
        self.add_classes(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def add_classes(self, names: Sequence[str]) -> None:
        """Append classes (the head grew); old classes keep their state, new ones start at the largest class EMA."""
        names = [str(n) for n in names]
        clash = set(names) & set(self.classes)
        if clash or len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, repeated: {sorted(clash) or names}")
        if not names:
            return
        if self.class_ema.size:
            start = float(self.class_ema.max())
        else:  # FreeMatch starts the mean probability vector uniform; confidences start at `base`
            start = 1.0 / len(names) if self.per_class == "probability" else self.base
        self.classes.extend(names)
        self.class_ema = np.concatenate([self.class_ema, np.full(len(names), start)])

    def update(self, probs: npt.ArrayLike | Tensor) -> None:
        """Move the EMAs towards this batch: global to its mean max-probability, per class to its mean probability
        (or, with `per_class="confidence"`, to the mean top confidence of the samples predicted as that class)."""
        p = as_probabilities(probs, self.num_classes)
        n = p.shape[0]
        if n == 0:
            return
        top = p.max(axis=1)
        keep = self.momentum**n
        self.global_confidence = keep * self.global_confidence + (1.0 - keep) * float(top.mean())
        if self.per_class == "probability":
            self.class_ema = keep * self.class_ema + (1.0 - keep) * p.mean(axis=0)
        else:
            predicted = p.argmax(axis=1)
            counts = np.bincount(predicted, minlength=self.num_classes)
            sums = np.bincount(predicted, weights=top, minlength=self.num_classes)
            hit = counts > 0
            keep_c = self.momentum ** counts[hit]
            self.class_ema[hit] = keep_c * self.class_ema[hit] + (1.0 - keep_c) * sums[hit] / counts[hit]
        self.seen += n

    def thresholds(self) -> F64:
        """`clamp(global * ema_c / max_k ema_k, floor, ceiling)` for each class, in class order."""
        top = float(self.class_ema.max()) if self.class_ema.size else 0.0
        relative = self.class_ema / top if top > 0 else np.ones_like(self.class_ema)
        return np.clip(self.global_confidence * relative, self.floor, self.ceiling)

    def threshold(self, name: str) -> float:
        return float(self.thresholds()[self.classes.index(name)])

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state (plain floats, ints, strings and lists)."""
        return {
            "version": STATE_VERSION,
            "classes": list(self.classes),
            "base": self.base,
            "floor": self.floor,
            "ceiling": self.ceiling,
            "momentum": self.momentum,
            "per_class": self.per_class,
            "global_confidence": self.global_confidence,
            "class_ema": [float(v) for v in self.class_ema],
            "seen": self.seen,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AdaptiveThresholds:
        version = int(state.get("version", -1))
        if version != STATE_VERSION:
            raise ValueError(f"unsupported AdaptiveThresholds state version {version} (expected {STATE_VERSION})")
        thresholds = cls(
            state["classes"],
            base=state["base"],
            floor=state["floor"],
            ceiling=state["ceiling"],
            momentum=state["momentum"],
            per_class=state.get("per_class", "probability"),
        )
        ema = np.asarray(state["class_ema"], dtype=np.float64)
        if ema.shape != (thresholds.num_classes,) or not np.all(np.isfinite(ema)) or np.any(ema < 0):
            raise ValueError("class_ema must hold one non-negative number per class")
        thresholds.class_ema = ema
        thresholds.global_confidence = float(state["global_confidence"])
        thresholds.seen = int(state["seen"])
        return thresholds


def as_probabilities(probs: npt.ArrayLike | Tensor, num_classes: int) -> F64:
    """Check once at the boundary: a finite `(n, num_classes)` array of probability rows, as contiguous float64."""
    if isinstance(probs, Tensor):
        probs = probs.detach().cpu().double().numpy()
    p = np.ascontiguousarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"expected probabilities of shape (n, {num_classes}), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("probabilities must be finite and in [0, 1]")
    if p.shape[0] and np.max(np.abs(p.sum(axis=1) - 1.0)) > _SUM_TOLERANCE:
        raise ValueError("probability rows must sum to 1 (pass softmax outputs, not logits)")
    return p


# -- the labeler ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PseudoLabel:
    """A proposed label for one unlabeled sample, with what it rests on."""

    class_index: int
    class_name: str
    confidence: float
    threshold: float
    teacher_version: str | None = None


class PseudoLabeler:
    """Turns teacher probabilities into pseudo-labels with the adaptive thresholds (updating them as it goes)."""

    def __init__(self, thresholds: AdaptiveThresholds, teacher_version: str | None = None) -> None:
        self.thresholds = thresholds
        self.teacher_version = teacher_version

    def label(self, probs: npt.ArrayLike | Tensor, *, update: bool = True) -> list[PseudoLabel | None]:
        """One entry per row: a `PseudoLabel` where the top probability reaches its class threshold, else None.

        With `update`, the EMAs first take in this batch (FreeMatch order), then the thresholds are applied.
        """
        p = as_probabilities(probs, self.thresholds.num_classes)
        if update:
            self.thresholds.update(p)
        limits = self.thresholds.thresholds()
        best = p.argmax(axis=1)
        confidence = p[np.arange(p.shape[0]), best]
        out: list[PseudoLabel | None] = []
        for index, conf in zip(best.tolist(), confidence.tolist(), strict=True):
            limit = float(limits[index])
            accepted = conf >= limit
            name = self.thresholds.classes[index]
            out.append(PseudoLabel(index, name, float(conf), limit, self.teacher_version) if accepted else None)
        return out


def pseudo_targets(labels: Sequence[PseudoLabel | None]) -> tuple[Tensor, Tensor]:
    """`(targets, mask)` for `fixmatch_loss`: class indices (0 where there is no label) and a bool mask."""
    targets = torch.tensor([lab.class_index if lab is not None else 0 for lab in labels], dtype=torch.long)
    mask = torch.tensor([lab is not None for lab in labels], dtype=torch.bool)
    return targets, mask


def fixmatch_loss(student_logits_strong: Tensor, pseudo_targets: Tensor, mask: Tensor) -> Tensor:
    """FixMatch's unlabeled loss (Sohn et al. 2020, Eq. 4): `mean_i mask_i * CE(logits_i, target_i)`.

    The mean runs over the whole batch, masked-out samples counting as zero (not over the accepted ones only), so the
    loss shrinks when few samples pass the thresholds. `mask` is bool or a float weight per sample; targets where the
    mask is off may hold anything (e.g. -1).
    """
    if student_logits_strong.ndim != 2:
        raise ValueError(f"expected logits of shape (n, classes), got {tuple(student_logits_strong.shape)}")
    n = student_logits_strong.shape[0]
    if pseudo_targets.shape != (n,) or mask.shape != (n,):
        raise ValueError(f"targets and mask must have shape ({n},)")
    if n == 0:
        return student_logits_strong.sum() * 0.0
    weight = mask.to(student_logits_strong.dtype)
    safe_targets = torch.where(mask.bool(), pseudo_targets.long(), torch.zeros_like(pseudo_targets, dtype=torch.long))
    per_sample = F.cross_entropy(student_logits_strong, safe_targets, reduction="none")
    return (per_sample * weight).mean()


# -- test-time augmentation ---------------------------------------------------------------------------------------


def identity(images: Tensor) -> Tensor:
    return images


def hflip(images: Tensor) -> Tensor:
    return images.flip(-1)


def vflip(images: Tensor) -> Tensor:
    return images.flip(-2)


TTA_DEFAULT: tuple[ImageOp, ...] = (identity, hflip, vflip)


@torch.no_grad()
def tta_probs(
    model_fn: Callable[[Tensor], Tensor], batch: Tensor, augmentations: Sequence[ImageOp] = TTA_DEFAULT
) -> Tensor:
    """Mean softmax of `model_fn` (logits) over `augmentations` of `batch` (default: identity, h-flip, v-flip).

    Runs without autograd; put a teacher module in eval mode first (dropout and batch statistics are its own).
    """
    if not augmentations:
        raise ValueError("need at least one augmentation (identity counts)")
    total: Tensor | None = None
    for augment in augmentations:
        probs = torch.softmax(model_fn(augment(batch)).float(), dim=-1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(augmentations)


# -- FixMatch weak / strong augmentation ----------------------------------------------------------------------------


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, high: int) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def _per_image(images: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    if images.ndim == 3:
        return fn(images)
    if images.ndim != 4:
        raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got {tuple(images.shape)}")
    return torch.stack([fn(image) for image in images])


def weak_augment(
    images: Tensor,
    generator: torch.Generator | None = None,
    *,
    translate: float = 0.125,
    vertical_flip: bool = False,
) -> Tensor:
    """FixMatch's weak view: random horizontal (and optionally vertical) flip, shift by up to `translate` of the size.

    The shift pads by reflection, so no black border appears on textured part surfaces.
    """

    def one(image: Tensor) -> Tensor:
        if _uniform(generator) < 0.5:
            image = image.flip(-1)
        if vertical_flip and _uniform(generator) < 0.5:
            image = image.flip(-2)
        height, width = image.shape[-2:]
        pad_h, pad_w = min(round(translate * height), height - 1), min(round(translate * width), width - 1)
        if pad_h == 0 and pad_w == 0:
            return image
        padded: Tensor = TF.pad_image(image, [pad_w, pad_h, pad_w, pad_h], padding_mode="reflect")
        top, left = _randint(generator, 2 * pad_h), _randint(generator, 2 * pad_w)
        return padded[..., top : top + height, left : left + width]

    return _per_image(images, one)


def _signed(m: float, generator: torch.Generator | None) -> float:
    return m if _uniform(generator) < 0.5 else -m


def _strong_ops(generator: torch.Generator | None) -> dict[str, Callable[[Tensor, float], Tensor]]:
    """RandAugment-lite: op(image, magnitude in [0, 1]). Ranges follow FixMatch's RandAugment table, milder geometry."""
    bilinear = TF.InterpolationMode.BILINEAR
    return {
        "identity": lambda x, m: x,
        "autocontrast": lambda x, m: TF.autocontrast_image(x),
        "equalize": lambda x, m: TF.equalize_image(x),
        "brightness": lambda x, m: TF.adjust_brightness_image(x, 1.0 + _signed(0.9 * m, generator)),
        "contrast": lambda x, m: TF.adjust_contrast_image(x, 1.0 + _signed(0.9 * m, generator)),
        "sharpness": lambda x, m: TF.adjust_sharpness_image(x, 1.0 + _signed(0.9 * m, generator)),
        "posterize": lambda x, m: TF.posterize_image(x, 8 - round(4 * m)),
        "solarize": lambda x, m: TF.solarize_image(x, 1.0 - m),
        "rotate": lambda x, m: TF.rotate_image(x, _signed(30.0 * m, generator), interpolation=bilinear),
        "shear": lambda x, m: TF.affine_image(
            x, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(_signed(0.3 * m, generator))), 0.0], interpolation=bilinear
        ),
    }


STRONG_OPS: tuple[str, ...] = tuple(_strong_ops(None))


def cutout(image: Tensor, size: int, generator: torch.Generator | None = None, fill: float = 0.5) -> Tensor:
    """Fill a `size` x `size` square (clipped at the border) at a random centre with `fill` (DeVries & Taylor, 2017)."""
    height, width = image.shape[-2:]
    if size <= 0:
        return image
    cy, cx = _randint(generator, height - 1), _randint(generator, width - 1)
    y0, y1 = max(cy - size // 2, 0), min(cy + (size + 1) // 2, height)
    x0, x1 = max(cx - size // 2, 0), min(cx + (size + 1) // 2, width)
    out = image.clone()
    out[..., y0:y1, x0:x1] = fill
    return out


def strong_augment(
    images: Tensor,
    generator: torch.Generator | None = None,
    *,
    num_ops: int = 2,
    cutout_max: float = 0.5,
    ops: Sequence[str] = STRONG_OPS,
) -> Tensor:
    """FixMatch's strong view: the weak view, then `num_ops` random ops with random magnitudes, then Cutout.

    Cutout takes a square of side uniform in [0, `cutout_max`] of the shorter side (at least one pixel when > 0).
    """
    table = _strong_ops(generator)
    unknown = [name for name in ops if name not in table]
    if unknown or not ops:
        raise ValueError(f"unknown strong ops {unknown}; choose from {STRONG_OPS}")

    def one(image: Tensor) -> Tensor:
        image = weak_augment(image, generator)
        for _ in range(num_ops):
            name = ops[_randint(generator, len(ops) - 1)]
            image = table[name](image, _uniform(generator)).clamp(0.0, 1.0)
        side = round(_uniform(generator, 0.0, cutout_max) * min(image.shape[-2:]))
        return cutout(image, max(side, 1) if cutout_max > 0 else 0, generator)

    return _per_image(images, one)
