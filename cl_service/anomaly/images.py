"""Images in, one grey square batch out: what the autoencoder sees, checked once at the boundary.

Accepted: a sequence of images, each a numpy array (HxW, or HxWxC with C = 1, 3 or 4; uint8, uint16 or floats in
0..1), a torch tensor (HxW or CxHxW; uint8 or floats in 0..1), a PIL image or encoded image bytes; or a whole
batch as one numpy array (NxHxW or NxHxWxC) or tensor (NxHxW or NxCxHxW). Colour becomes luma (ITU-R 601),
alpha is dropped, and every image is resized to SxS (bilinear, antialiased, whole frame: the aspect ratio is not
kept, as in the classifier's `preprocess`). Anything else raises ValueError naming the image and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from PIL import Image
from torch import Tensor

from cl_service.ingest.images import decode_image, pil_array, unit_values

ImageLike = npt.NDArray[Any] | Tensor | Image.Image | bytes
ImageBatch = Sequence[ImageLike] | npt.NDArray[Any] | Tensor

MIN_SIDE = 8  # smaller images are almost surely a mistake (a flattened array, a thumbnail of nothing)
_LUMA = (0.299, 0.587, 0.114)


def image_list(images: ImageBatch) -> list[ImageLike]:
    """The images of a batch as a list (a 3-D or 4-D array/tensor is split along its first axis)."""
    if isinstance(images, np.ndarray | Tensor):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"a batch given as one array must be NxHxW or NxHxWxC (numpy) / NxCxHxW (torch), "
                f"got shape {tuple(images.shape)}; pass a single image as a list of one"
            )
        items: list[ImageLike] = list(images)
    elif isinstance(images, bytes | str | Image.Image):
        raise ValueError("pass a sequence of images (a list of one for a single image)")
    elif isinstance(images, Sequence):
        items = list(images)
    else:
        raise ValueError(f"images must be a sequence of images or one batch array, got {type(images).__name__}")
    if not items:
        raise ValueError("no images given; at least one is needed")
    return items


def grey_unit(image: ImageLike, index: int = 0) -> npt.NDArray[np.float32]:
    """One image as an HxW float32 array of grey values in 0..1."""
    try:
        array = _as_array(image)
        return _grey(array)
    except ValueError as exc:
        raise ValueError(f"image {index}: {exc}") from exc


def grey_batch(images: ImageBatch, size: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """(N, 1, size, size) float32 grey values in 0..1, contiguous, and each image's original (height, width)."""
    items = image_list(images)
    batch = torch.empty((len(items), 1, size, size), dtype=torch.float32)
    shapes: list[tuple[int, int]] = []
    for i, image in enumerate(items):
        grey = grey_unit(image, i)
        shapes.append((int(grey.shape[0]), int(grey.shape[1])))
        batch[i, 0] = resize(torch.from_numpy(grey), size, size)
    return batch.contiguous(), shapes


def resize(grey: Tensor, height: int, width: int) -> Tensor:
    """An HxW tensor resized (bilinear; antialiased when shrinking)."""
    if tuple(grey.shape) == (height, width):
        return grey
    return F.interpolate(grey[None, None], size=(height, width), mode="bilinear", antialias=True)[0, 0]


def _as_array(image: ImageLike) -> npt.NDArray[Any]:
    if isinstance(image, bytes):
        image = decode_image(image)
    if isinstance(image, Image.Image):
        return pil_array(image)
    if isinstance(image, Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3:  # C x H x W -> H x W x C
            if tensor.shape[0] not in (1, 3, 4):
                raise ValueError(f"a tensor image must be HxW or CxHxW with C = 1, 3 or 4, got {tuple(tensor.shape)}")
            tensor = tensor.permute(1, 2, 0)
        if tensor.dtype == torch.bfloat16 or tensor.dtype == torch.float16:
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    if isinstance(image, np.ndarray):
        return image
    raise ValueError(f"an image must be a numpy array, a tensor, a PIL image or bytes, got {type(image).__name__}")


def _grey(array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        pass
    elif array.ndim != 2:
        raise ValueError(f"an image array must be HxW or HxWxC with C = 1, 3 or 4, got shape {array.shape}")
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(f"an image must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {array.shape[:2]}")
    unit = unit_values(array)
    if unit.ndim == 3:
        if unit.shape[2] == 1:
            unit = unit[:, :, 0]
        else:
            r, g, b = _LUMA
            unit = r * unit[:, :, 0] + g * unit[:, :, 1] + b * unit[:, :, 2]
    return np.ascontiguousarray(unit, dtype=np.float32)
