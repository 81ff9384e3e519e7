"""The torch module: a small convolutional autoencoder over grey images, and the error maps it is judged by.

Encoder: `len(channels)` stride-2 4x4 convolutions (BatchNorm, ReLU), then a 1x1 convolution to
`latent_channels`: a 128x128 image becomes a (latent_channels, 4, 4) code with five stages. The decoder mirrors
it with stride-2 transposed convolutions and ends linear (inputs are intensity-normalised, not 0..1). The code is
kept small on purpose: what the autoencoder cannot reproduce from it (a blob, a crack, a missing corner that the
training images never showed) is what the error map shows. Fully convolutional: any side divisible by
2 ** len(channels) works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn


class ConvAutoencoder(nn.Module):
    def __init__(self, channels: Sequence[int], latent_channels: int) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels) or latent_channels < 1:
            raise ValueError(f"channels and latent_channels must be positive, got {channels}, {latent_channels}")
        encoder: list[nn.Module] = []
        previous = 1
        for width in channels:
            encoder += [nn.Conv2d(previous, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        encoder.append(nn.Conv2d(previous, latent_channels, 1))
        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, previous, 1), nn.ReLU(inplace=True)]
        for width in list(channels[::-1])[1:]:
            decoder += [
                nn.ConvTranspose2d(previous, width, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        decoder.append(nn.ConvTranspose2d(previous, 1, 4, 2, 1))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.stride = 2 ** len(channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"expected (N, 1, H, W) with H, W divisible by {self.stride}, got {tuple(x.shape)}")
        out: Tensor = self.decoder(self.encoder(x))
        return out


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflect padding (same size); sigma 0 returns x."""
    if sigma <= 0:
        return x
    radius = max(1, round(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def ssim_map(x: Tensor, y: Tensor, data_range: float, sigma: float = 1.5) -> Tensor:
    """Local SSIM of two (N, 1, H, W) batches (Gaussian window, Wang et al. 2004 constants), same size."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    vx = gaussian_blur(x * x, sigma) - mx**2
    vy = gaussian_blur(y * y, sigma) - my**2
    cxy = gaussian_blur(x * y, sigma) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def local_mean(maps: Tensor, patch: int) -> Tensor:
    """Mean of (N, 1, H, W) maps over every patch x patch window (stride 1, reflect padding; same size)."""
    if patch <= 1:
        return maps
    before, after = patch // 2, (patch - 1) // 2
    return F.avg_pool2d(F.pad(maps, (before, after, before, after), mode="reflect"), patch, stride=1)
