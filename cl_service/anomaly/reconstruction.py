"""Training the autoencoder and turning its reconstructions into error maps and one score per image.

The score of an image is the largest mean error over any `patch` x `patch` window of its error map: a small
defect raises one window a lot, where a whole-image mean would dilute it. The default error is the squared
Gaussian-blurred residual: fine texture that no small code can reproduce (machining marks, sensor noise) averages
out under the blur, while a structure the code cannot hold (a blob, a crack, a chipped edge) does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor

from cl_service.anomaly.autoencoder import ConvAutoencoder, gaussian_blur, local_mean, ssim_map
from cl_service.anomaly.config import AnomalyConfig

Progress = Callable[[int, int, float], None]  # (epoch done, epochs in all, mean loss of that epoch)
INFERENCE_BATCH = 64


def normalise_intensity(batch: Tensor, mode: str) -> Tensor:
    """Per-image intensity normalisation of (N, 1, H, W) grey values in 0..1, so exposure does not count as error."""
    if mode == "none":
        return batch
    centred = batch - batch.mean(dim=(2, 3), keepdim=True)
    if mode == "centre":
        return centred
    if mode == "standardise":
        return centred / batch.std(dim=(2, 3), keepdim=True).clamp_min(1e-2)
    raise ValueError(f"unknown intensity normalisation {mode!r}")


def build_autoencoder(config: AnomalyConfig) -> ConvAutoencoder:
    return ConvAutoencoder(config.channels, config.latent_channels)


def training_steps(images: int, config: AnomalyConfig, epochs: int) -> tuple[int, int]:
    """(optimiser steps, steps per epoch) for `images` training images."""
    per_epoch = max(1, math.ceil(images / config.batch_size))
    return max(config.min_steps, epochs * per_epoch), per_epoch


def train_autoencoder(
    net: ConvAutoencoder,
    inputs: Tensor,
    config: AnomalyConfig,
    *,
    seed: int,
    epochs: int,
    progress: Progress | None = None,
) -> list[float]:
    """Train `net` in place on normalised (N, 1, S, S) inputs (MSE, Adam, one-cycle); the mean loss of each epoch.

    Batches walk through seeded permutations of the images (repeated when there are fewer images than a batch),
    so every image is seen once per epoch. The net is left in eval mode.
    """
    n = int(inputs.shape[0])
    steps, per_epoch = training_steps(n, config, epochs)
    total_epochs = math.ceil(steps / per_epoch)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    running, counted = 0.0, 0
    net.train()
    for step in range(steps):
        while order.numel() < config.batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        chosen, order = order[: config.batch_size], order[config.batch_size :]
        batch = inputs[chosen]
        if config.flip:
            flipped = torch.rand(batch.shape[0], generator=generator) < 0.5
            batch = torch.where(flipped[:, None, None, None], batch.flip(3), batch)
        loss = F.mse_loss(net(batch), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        counted += 1
        if (step + 1) % per_epoch == 0 or step + 1 == steps:
            losses.append(running / counted)
            running, counted = 0.0, 0
            if progress is not None:
                progress(len(losses), total_epochs, losses[-1])
    net.eval()
    return losses


@torch.no_grad()
def local_error_maps(net: ConvAutoencoder, inputs: Tensor, config: AnomalyConfig) -> Tensor:
    """(N, 1, S, S): the error map averaged over `patch` windows; its maximum is the image's score."""
    net.eval()
    out = []
    for start in range(0, int(inputs.shape[0]), INFERENCE_BATCH):
        x = inputs[start : start + INFERENCE_BATCH]
        out.append(local_mean(pixel_error(x, net(x), config), config.patch))
    return torch.cat(out)


def pixel_error(x: Tensor, reconstruction: Tensor, config: AnomalyConfig) -> Tensor:
    """Per-pixel error of a reconstruction, of the kind `config.error` names."""
    residual = x - reconstruction
    if config.error == "squared":
        return residual**2
    if config.error == "blurred":
        return gaussian_blur(residual, config.error_sigma) ** 2
    data_range = 1.0 if config.intensity != "standardise" else 6.0  # about +-3 standard deviations
    return (1.0 - ssim_map(x, reconstruction, data_range)).clamp_min(0.0)


def max_scores(local_maps: Tensor) -> Tensor:
    """(N,) float64: the largest windowed error of each image."""
    return local_maps.amax(dim=(1, 2, 3)).double()
