"""Decoding one image file into the 8-bit RGB picture that timm's transforms expect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

# Modes that hold more than 8 bits (16-bit X-rays, float TIFFs).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale is replicated to three channels. Images deeper than 8 bits are
    scaled per image from their own min..max to 0..255: 12-bit data stored in
    16-bit containers (common for X-rays) would otherwise come out almost black.
    """
    if image.mode in _WIDE_MODES:
        arr = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(arr)  # a NaN or Inf pixel (float TIFFs) must not turn the whole image black
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        arr = np.where(finite, arr, lo)
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path``, honour its EXIF orientation and return 8-bit RGB."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # returns a loaded copy
        return to_rgb(image)


def check_readable(path: str | Path) -> str | None:
    """``None`` when ``path`` decodes fully, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
