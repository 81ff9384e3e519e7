"""What builds and trains an anomaly model: plain pydantic, recorded with every saved model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AnomalyConfig(BaseModel):
    """Autoencoder shape and training, the error and its pooling, the feature score and the combination.

    The defaults are what `bench/unknown_defect.py` measured best on magnetic_tile (docs/anomaly.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(128, ge=16, le=1024, description="Grey square side the autoencoder sees.")
    channels: tuple[int, ...] = Field((16, 32, 64, 64, 64), min_length=1, max_length=8)
    latent_channels: int = Field(2, ge=1, description="Channels of the code (side = image_size / 2**stages).")
    intensity: Literal["standardise", "centre", "none"] = Field(
        "standardise", description="Per-image intensity normalisation before the autoencoder."
    )
    epochs: int = Field(6, ge=1, description="Passes over the training images.")
    min_steps: int = Field(300, ge=0, description="At least this many optimiser steps, however few the images.")
    batch_size: int = Field(16, ge=2)
    lr: float = Field(2e-3, gt=0, description="Peak Adam learning rate (one-cycle schedule).")
    flip: bool = Field(True, description="Random horizontal flips while training.")
    error: Literal["blurred", "squared", "ssim"] = Field(
        "blurred", description="Error map: squared Gaussian-blurred residual, squared residual, or 1 - SSIM."
    )
    error_sigma: float = Field(8.0, ge=0, description="Blur of the residual (pixels at image_size), for 'blurred'.")
    patch: int = Field(16, ge=1, description="Side of the window the error is averaged over; the score is the max.")
    neighbours: int = Field(5, ge=1, description="Exemplars averaged in the feature score (k of k-NN).")
    combine: Literal["max", "sum"] = Field("sum", description="How the standardised scores are combined.")
    standardise_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Share of the calibration images that fix the scores' scales; the rest, the threshold.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AnomalyConfig:
        stride = 2 ** len(self.channels)
        if self.image_size % stride:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**len(channels) = {stride}")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.patch > self.image_size:
            raise ValueError(f"patch {self.patch} is larger than image_size {self.image_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnomalyConfig:
        return cls.model_validate(dict(data))
