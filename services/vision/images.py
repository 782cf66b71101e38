"""Decode an untrusted image: format, size and pixel limits checked before the pixels are decoded.

Pillow reads only the header on open, so a decompression bomb (a small file that claims a huge
canvas) is refused by its claimed size before any memory is spent; a truncated or corrupt file
fails on decode and is refused the same way. Every refusal is a 400 with a reason, never a crash.
"""

from __future__ import annotations

import io
from typing import Final

from PIL import Image, ImageFile

from contracts.errors import invalid

FORMATS: Final = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey picture
Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check off: ours (stricter, with the size) runs before decoding


def decode(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """The image as RGB (first frame; transparency on white), or an invalid_request saying what is wrong."""
    if not data:
        raise invalid("The image is empty", "image")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # UnidentifiedImageError, and whatever a hostile header makes a plugin raise
        raise invalid("The file is not an image we can read: send PNG, JPEG, WebP, GIF, BMP or TIFF", "image") from None
    if image.format not in FORMATS:
        raise invalid(f"Images in {image.format} format are not accepted: send PNG, JPEG, WebP, GIF, BMP or TIFF",
                      "image")
    width, height = image.size
    if width * height > max_pixels:
        raise invalid(f"The image is {width}x{height} pixels ({width * height:,}); the limit is {max_pixels:,}"
                      " (refused before decoding)", "image")
    if min(width, height) < min_side:
        raise invalid(f"The image is {width}x{height} pixels; each side must be at least {min_side}", "image")
    try:
        image.load()
        return _rgb(image)
    except Exception as exc:  # truncated data, a bad checksum, a broken stream
        raise invalid(f"The {image.format} image is truncated or corrupt ({_reason(exc)})", "image") from None


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, "white")
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text[:120] if text else type(exc).__name__
