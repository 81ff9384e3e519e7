"""Heatmaps for alerts: an error map, upsampled to the image, coloured and laid over it, as PNG bytes.

The colour scale is fixed by calibration, not per image (`AnomalyModel.heatmaps` maps the windowed error to
0..1 between two levels of known images' scores). Colour fades in with the value (its opacity grows with it), so
ordinary regions show the plain image.
matplotlib (for the colormap) is imported on the first heatmap, not with this module.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from cl_service.anomaly.images import resize

COLORMAP = "turbo"  # blue (low) -> green -> red (high); perceptually ordered, unlike jet
LUT_SIZE = 256


def render_heatmap(
    grey: npt.NDArray[np.float32],
    heat: npt.NDArray[np.float32],
    *,
    max_side: int = 512,
    opacity: float = 0.7,
) -> bytes:
    """PNG (RGB) of `heat` (any size, values 0..1, clipped) over the grey image (H x W, 0..1), `opacity` at heat 1.

    The output has the image's size, scaled down so that its longer side is at most `max_side`.
    """
    if grey.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"grey image and heat map must be 2-D, got {grey.shape} and {heat.shape}")
    height, width = output_size(grey.shape[0], grey.shape[1], max_side)
    base = resize(torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32)), height, width).numpy()
    hot = resize(torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32)), height, width).numpy()
    levels = np.clip(np.rint(np.clip(hot, 0.0, 1.0) * (LUT_SIZE - 1)), 0, LUT_SIZE - 1).astype(np.intp)
    colour = _lookup_table()[levels]
    alpha = opacity * np.clip(hot, 0.0, 1.0)[:, :, None]
    blended = (1.0 - alpha) * np.clip(base, 0.0, 1.0)[:, :, None] + alpha * colour
    pixels = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def output_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled down to fit `max_side` on the longer side, keeping the aspect ratio."""
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    factor = min(1.0, max_side / max(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


@lru_cache(maxsize=1)
def _lookup_table() -> npt.NDArray[np.float64]:
    from matplotlib import colormaps  # lazily: matplotlib is only needed once a heatmap is drawn

    table = colormaps[COLORMAP](np.linspace(0.0, 1.0, LUT_SIZE))[:, :3]
    return np.asarray(table, dtype=np.float64)
