"""Reading RGB images exactly as the Track 3 contract feeds them to a model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import LpcvError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class ImageReadError(LpcvError):
    """An image file could not be decoded."""


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `folder`, sorted by relative path so every run sees the same order."""
    root = Path(folder)
    pattern = "**/*" if recursive else "*"
    files = [p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_contract_image(path: str | os.PathLike, *, upright: bool = True) -> np.ndarray:
    """One image as the contract input: float32 (3, 480, 640), RGB, values in [0, 255].

    Other sizes are resized (bilinear) to 640x480 without cropping; intrinsics must be scaled the
    same way (fx * 640 / W, fy * 480 / H), which is what the RGB-D readers do. `upright` turns a
    photo by its EXIF orientation tag, as a phone's gallery shows it; an RGB-D frame's colour image
    is read as stored (upright=False), because its depth map is aligned with the stored pixels.
    """
    try:
        with Image.open(path) as img:
            return prepare_contract_image(ImageOps.exif_transpose(img) if upright else img, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}",
                             hint="remove or replace the file; only readable JPG/PNG files are accepted") from err


def prepare_contract_image(img: Image.Image, name: str | os.PathLike = "image") -> np.ndarray:
    """A decoded picture (a photo, a video frame) as the contract input: the one preparation every
    stage and `predict` apply, so that what predict shows is what evaluate scores."""
    rgb = _as_rgb8(img, name)
    size = (TRACK3.width, TRACK3.height)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1).copy()


# 16-bit single-channel PNG modes: Pillow's convert("RGB") clips them at 255 (an almost white image).
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _as_rgb8(img: Image.Image, path) -> Image.Image:
    """8-bit RGB with the full range kept: 16-bit grey is scaled by 255/65535, not clipped. (Pillow
    reads 16-bit RGB PNGs as 8-bit RGB already.) Integer or float images of unknown range are refused."""
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.round(grey).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        raise ImageReadError(f"image {path} has {img.mode} pixels (32-bit {'float' if img.mode == 'F' else 'integer'})"
                             ", whose range is unknown",
                             hint="save it as an 8-bit (or 16-bit) RGB or greyscale PNG/JPG")
    return img.convert("RGB")


def load_contract_batch(paths: list[Path]) -> np.ndarray:
    """(N, 3, 480, 640) float32 batch of contract images."""
    return np.stack([load_contract_image(p) for p in paths]) if paths else np.zeros(
        (0, 3, TRACK3.height, TRACK3.width), np.float32)
