"""Side-by-side depth panels with PIL only: RGB | GT | prediction | absolute error."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Anchors of a turbo-like map (dark blue = near / small, dark red = far / large): perceptually
# ordered enough to read depth, and unambiguous against the black used for invalid pixels.
_ANCHORS = np.array([(48, 18, 59), (70, 134, 251), (27, 229, 181), (164, 252, 60), (251, 185, 56),
                     (228, 72, 18), (122, 4, 3)], dtype=np.float64)
_INVALID = (0, 0, 0)


def colorize(values: np.ndarray, valid: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W, 3) uint8: `values` mapped from [low, high] through the colormap, invalid pixels black."""
    t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lower = np.minimum(t.astype(int), len(_ANCHORS) - 2)
    frac = (t - lower)[..., None]
    rgb = _ANCHORS[lower] * (1 - frac) + _ANCHORS[lower + 1] * frac
    rgb[~valid] = _INVALID
    return rgb.round().astype(np.uint8)


def depth_comparison_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray,
                           title: str = "", scale: float = 0.5) -> Image.Image:
    """One row: RGB, GT depth, prediction, |pred - GT|, each `scale` times the input size.

    image: (3, H, W) RGB in [0, 255]; gt, pred: (H, W) metres on the same scale (pred already
    median-scaled); valid: pixels where GT exists. GT and pred share one colour range (2nd-98th
    percentile of valid GT) so their colours compare directly.
    """
    low, high = np.percentile(gt[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    error = np.abs(pred - gt)
    error_high = float(np.percentile(error[valid], 98)) if valid.any() else 1.0
    everywhere = np.ones_like(valid)
    tiles = [
        ("RGB", np.clip(image, 0, 255).transpose(1, 2, 0).round().astype(np.uint8)),
        (f"GT {low:.1f}-{high:.1f} m", colorize(gt, valid, low, high)),
        ("pred (median-scaled)", colorize(pred, everywhere, low, high)),
        (f"|pred-GT| 0-{error_high:.2f} m", colorize(error, valid, 0.0, error_high)),
    ]
    height, width = gt.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    panel = Image.new("RGB", (size[0] * len(tiles), size[1]))
    draw = ImageDraw.Draw(panel)
    for index, (label, pixels) in enumerate(tiles):
        x = index * size[0]
        panel.paste(Image.fromarray(pixels).resize(size, Image.BILINEAR), (x, 0))
        text = f"{title}  {label}" if index == 0 and title else label
        draw.rectangle((x, 0, x + 7 * len(text) + 6, 14), fill=(0, 0, 0))
        draw.text((x + 3, 1), text, fill=(255, 255, 255))
    return panel
