"""Image validation: what the service accepts as a camera image, checked before anything is stored.

The header is read first, so that the size and pixel caps are enforced before any pixel is decoded
(decompression bombs never get decoded). The image is then checked to be complete: a truncated or
corrupt file is refused here, not discovered later by the trainer. Most formats are decoded once; JPEGs
at reduced scale (libjpeg still reads every entropy-coded block, so truncation is still caught). Plain
PNGs (non-interlaced, one frame, no palette), the common camera format, are checked without unfiltering
the pixels: every chunk's CRC, the zlib stream up to the declared size and every row's filter byte;
what this accepts, Pillow's decoder decodes (a test holds it to that), at about half the cost.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from cl_service.errors import ServiceError, invalid

# Pillow format name -> the name the service stores.
SUPPORTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about an encoded image."""

    image_format: str
    width: int
    height: int
    mode: str
    sha256: str
    frames: int = 1


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Validate an encoded image and describe it; raise ServiceError(INVALID_ARGUMENT) when it is bad."""
    if not data:
        raise invalid("IMAGE_EMPTY", "the image field is empty; send the encoded image bytes")
    if len(data) > max_bytes:
        raise invalid(
            "IMAGE_TOO_LARGE", f"the image has {len(data):,} bytes; this server accepts at most {max_bytes:,}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hostile files make Pillow warn about tags; we judge by errors
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
    except UnidentifiedImageError:
        raise _unsupported_or_undecodable(data) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise invalid(
            "IMAGE_TOO_MANY_PIXELS", f"the image declares too many pixels ({exc}); at most {max_pixels:,} are accepted"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise invalid("IMAGE_UNDECODABLE", f"the image header cannot be read: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise invalid("IMAGE_EMPTY", f"the image is {width}x{height} pixels; it must have at least one")
        if width * height > max_pixels:
            raise invalid(
                "IMAGE_TOO_MANY_PIXELS",
                f"the image is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are accepted",
            )
        image_format = SUPPORTED_FORMATS[image.format or ""]
        try:
            frames = int(getattr(image, "n_frames", 1))  # walks the frame directory: corrupt ones fail here
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad image
            raise invalid("IMAGE_UNDECODABLE", f"the image's frames cannot be read: {exc}") from None
        mode = image.mode
        if not (image.format == "PNG" and frames == 1 and _check_plain_png(data)):
            _decode_fully(image, width, height)
    return ImageInfo(image_format, width, height, mode, hashlib.sha256(data).hexdigest(), frames)


def decode_checked(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """`inspect_image`'s checks, then the decoded image (first frame) for classification."""
    inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return decode_image(data)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF, WebP; first frame); ValueError when they are not one.
    Bytes from outside go through `inspect_image` first (size caps, decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as exc:  # any decoder failure means bad bytes
        raise ValueError(f"the image cannot be decoded: {exc}") from exc
    return image


def pil_array(image: Image.Image) -> npt.NDArray[Any]:
    array: npt.NDArray[Any]
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16)
    elif image.mode == "I":  # 32-bit integer greyscale: how Pillow may open 16-bit files
        array = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    elif image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    else:
        array = np.asarray(image.convert("L" if image.mode in ("1", "L", "LA", "La") else "RGB"))
    return array


def unit_values(array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Pixels of a uint8, uint16 or float (finite, 0..1) array as float32 in 0..1; ValueError for anything else."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(array.dtype, np.floating):
        unit = np.array(array, dtype=np.float32)
        if not np.isfinite(unit).all():
            raise ValueError("a float image holds NaN or infinite values; it must hold finite values in 0..1")
        if unit.size and (unit.min() < 0.0 or unit.max() > 1.0):
            raise ValueError(f"a float image must hold finite values in 0..1, got {unit.min():g}..{unit.max():g}")
        return unit
    raise ValueError(f"image arrays must be uint8, uint16 or floats in 0..1, got {array.dtype}")


def _decode_fully(image: Image.Image, width: int, height: int) -> None:
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except OSError as exc:
        text = str(exc)
        reason = "IMAGE_TRUNCATED" if "truncated" in text or "broken data stream" in text else "IMAGE_UNDECODABLE"
        raise invalid(reason, f"the image cannot be decoded completely: {text}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise invalid("IMAGE_UNDECODABLE", f"the image cannot be decoded: {exc}") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette images: Pillow)


def _check_plain_png(data: bytes) -> bool:
    """Check a plain PNG completely without unfiltering its pixels; False when it is not a plain PNG.

    Raises ServiceError for a truncated or corrupt file.
    """
    view = memoryview(data)
    position, header, idat = len(PNG_SIGNATURE), b"", []
    while True:
        if position + 8 > len(data):
            raise invalid("IMAGE_TRUNCATED", "the PNG file ends before its IEND chunk (truncated)")
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 8 + length
        if end + 4 > len(data):
            raise invalid("IMAGE_TRUNCATED", f"the PNG file ends inside its {kind!r} chunk (truncated)")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[position + 4 : end]) != crc:
            raise invalid("IMAGE_UNDECODABLE", f"the PNG chunk {kind!r} at byte {position} is corrupt (bad CRC)")
        if kind == b"IHDR":
            header = data[position + 8 : end]
        elif kind == b"IDAT":
            idat.append(view[position + 8 : end])
        elif kind == b"IEND":
            break
        position = end + 4
    if len(header) != 13:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if interlace != 0 or colour not in _PNG_CHANNELS:
        return False
    row = 1 + (width * _PNG_CHANNELS[colour] * depth + 7) // 8
    expected = row * height
    inflater, parts, produced = zlib.decompressobj(), [], 0
    try:
        for chunk in idat:  # never past the declared size: data beyond it is ignored (as Pillow does), not inflated
            if inflater.eof or produced >= expected:
                break
            parts.append(inflater.decompress(chunk, expected - produced))
            produced += len(parts[-1])
    except zlib.error as exc:
        raise invalid("IMAGE_UNDECODABLE", f"the PNG pixel data cannot be decompressed: {exc}") from None
    if produced < expected:
        if inflater.eof:
            raise invalid("IMAGE_UNDECODABLE", f"the PNG holds {produced:,} bytes of pixel data, not {expected:,}")
        raise invalid("IMAGE_TRUNCATED", "the PNG pixel data stops before its end (truncated)")
    pixels = b"".join(parts)
    if max(pixels[::row]) > 4:
        raise invalid("IMAGE_UNDECODABLE", "the PNG pixel data has a row with an unknown filter type")
    return True


MAGIC_NUMBERS = (
    (PNG_SIGNATURE, "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _unsupported_or_undecodable(data: bytes) -> ServiceError:
    """Tell a broken supported file, a known-but-unsupported format (GIF, ...) and non-images apart."""
    looks_like = next((name for magic, name in MAGIC_NUMBERS if data.startswith(magic)), None)
    if looks_like is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        looks_like = "WebP"
    if looks_like is not None:
        return invalid(
            "IMAGE_UNDECODABLE",
            f"the bytes start like a {looks_like} file but its header cannot be read (truncated or corrupt)",
        )
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format or "unknown"
    except Exception:  # noqa: BLE001 - not an image at all
        return invalid(
            "IMAGE_UNDECODABLE",
            "the bytes are not an image in a supported format (PNG, JPEG, BMP, TIFF, WebP)",
        )
    return invalid(
        "IMAGE_FORMAT_UNSUPPORTED",
        f"{found} images are not accepted; send PNG, JPEG, BMP, TIFF or WebP",
    )
