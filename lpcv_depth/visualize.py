"""PIL-only figures: side-by-side depth panels (RGB | GT | prediction | absolute error) and small bar charts."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class BarPanel:
    """One small bar chart: labelled values (None: not measured), and an optional reference line."""

    title: str
    bars: list[tuple[str, float | None]]
    line: tuple[float, str] | None = None
    fmt: str = "{:.1f}"
    # Palette index per bar (default: by position), so one series keeps one colour across panels.
    colours: tuple[int, ...] | None = None


_BAR_COLOURS = ((68, 119, 170), (238, 119, 51), (34, 136, 51), (204, 51, 17))


def bar_chart(panels: list[BarPanel], title: str = "", columns: int = 3,
              panel_size: tuple[int, int] = (320, 230)) -> Image.Image:
    """Panels of side-by-side bars on a white canvas, PIL only; bars keep their colour by position."""
    width, height = panel_size
    rows = -(-len(panels) // columns)
    top = 24 if title else 0
    canvas = Image.new("RGB", (width * columns, height * rows + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 6), title, fill=(0, 0, 0))
    for index, panel in enumerate(panels):
        x0, y0 = (index % columns) * width, top + (index // columns) * height
        _draw_bar_panel(draw, panel, x0, y0, width, height)
    return canvas


def _draw_bar_panel(draw: ImageDraw.ImageDraw, panel: BarPanel, x0: int, y0: int, width: int, height: int) -> None:
    draw.rectangle((x0 + 2, y0 + 2, x0 + width - 3, y0 + height - 3), outline=(200, 200, 200))
    draw.text((x0 + 8, y0 + 6), panel.title, fill=(0, 0, 0))
    plot_top, plot_bottom = y0 + 34, y0 + height - 30
    left, right = x0 + 12, x0 + width - 12
    values = [value for _, value in panel.bars if value is not None]
    scale_max = max(values + ([panel.line[0]] if panel.line else []) + [1e-9]) * 1.15
    slot = (right - left) / max(len(panel.bars), 1)
    for position, (label, value) in enumerate(panel.bars):
        bx0 = left + position * slot + slot * 0.2
        bx1 = left + (position + 1) * slot - slot * 0.2
        if value is None:
            draw.text((bx0, plot_bottom - 14), "n/a", fill=(120, 120, 120))
        else:
            bar_top = plot_bottom - (plot_bottom - plot_top) * max(value, 0.0) / scale_max
            colour = panel.colours[position] if panel.colours else position
            draw.rectangle((bx0, bar_top, bx1, plot_bottom), fill=_BAR_COLOURS[colour % len(_BAR_COLOURS)])
            draw.text((bx0, bar_top - 12), panel.fmt.format(value), fill=(0, 0, 0))
        draw.text((bx0, plot_bottom + 4), label, fill=(0, 0, 0))
    draw.line((left, plot_bottom, right, plot_bottom), fill=(0, 0, 0))
    if panel.line is not None:
        value, label = panel.line
        y = plot_bottom - (plot_bottom - plot_top) * value / scale_max
        for dash in range(int(left), int(right), 10):
            draw.line((dash, y, min(dash + 5, right), y), fill=(200, 0, 0), width=2)
        draw.text((right - 7 * len(label) - 2, y - 13), label, fill=(200, 0, 0))
