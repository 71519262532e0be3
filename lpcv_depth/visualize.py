"""Figures, drawn with matplotlib (Agg canvas, imported only when a figure is drawn): side-by-side
depth panels (RGB | GT | prediction | absolute error), predict's rows (RGB | each source | their
difference, with colour bars) and small bar charts.

No figure goes through pyplot: each one is a `matplotlib.figure.Figure` on its own Agg canvas, so
drawing never depends on, or changes, a process-wide backend.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["colorize", "depth_comparison_panel", "sources_panel", "BarPanel", "bar_chart", "COLORMAP",
           "SOURCES_COLORMAP"]

# Dark blue = near / small, dark red = far / large: ordered enough to read depth, and unambiguous
# against the black of invalid pixels.
COLORMAP = "turbo"
_INVALID = (0, 0, 0)
# predict's rows: perceptually uniform (equal steps of depth look like equal steps of colour), near
# bright and far dark; the difference column in its own uniform map, 0 black.
SOURCES_COLORMAP = "magma_r"
DIFF_COLORMAP = "inferno"
_COLOUR_BAR_PX = 34
# Series colours (matplotlib's tab10), indexed by BarPanel.colours.
_BAR_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_LABEL_WIDTH = 12  # characters per line of a bar label; longer ones wrap instead of overlapping
_DPI = 100


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        from lpcv_depth.errors import MissingDependencyError

        raise MissingDependencyError("figures need matplotlib, which is not installed",
                                     hint="pip install -e .  (matplotlib is a base dependency)") from err
    return matplotlib, Figure, FigureCanvasAgg


def colorize(values: np.ndarray, valid: np.ndarray, low: float, high: float, colormap: str = COLORMAP) -> np.ndarray:
    """(H, W, 3) uint8: `values` mapped from [low, high] through `colormap` (turbo), invalid pixels black."""
    matplotlib, _, _ = _matplotlib()
    t = np.clip((np.asarray(values, dtype=np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    rgb = matplotlib.colormaps[colormap](t, bytes=True)[..., :3].copy()
    rgb[~np.asarray(valid, dtype=bool)] = _INVALID
    return rgb


def _render(figure, canvas_type) -> "Image.Image":
    from PIL import Image

    canvas = canvas_type(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def depth_comparison_panel(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray,
                           title: str = "", scale: float = 0.5) -> "Image.Image":
    """One row (a PIL image): RGB, GT depth, prediction, |pred - GT|, each `scale` times the input size.

    image: (3, H, W) RGB in [0, 255]; gt, pred: (H, W) metres on the same scale (pred already
    median-scaled); valid: pixels where GT exists. GT and pred share one colour range (2nd-98th
    percentile of valid GT) so their colours compare directly.
    """
    _, Figure, FigureCanvasAgg = _matplotlib()
    low, high = np.percentile(gt[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    error = np.abs(pred - gt)
    error_high = float(np.percentile(error[valid], 98)) if valid.any() else 1.0
    tiles = [
        ("RGB", np.clip(image, 0, 255).transpose(1, 2, 0).round().astype(np.uint8)),
        (f"GT {low:.1f}-{high:.1f} m", colorize(gt, valid, low, high)),
        ("pred (median-scaled)", colorize(pred, np.ones_like(valid), low, high)),
        (f"|pred-GT| 0-{error_high:.2f} m", colorize(error, valid, 0.0, error_high)),
    ]
    height, width = gt.shape
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    figure = Figure(figsize=(tile_w * len(tiles) / _DPI, tile_h / _DPI), dpi=_DPI)
    for index, (label, pixels) in enumerate(tiles):
        axes = figure.add_axes((index / len(tiles), 0.0, 1.0 / len(tiles), 1.0))
        axes.imshow(pixels, interpolation="antialiased", aspect="auto")
        axes.set_axis_off()
        text = f"{title}  {label}" if index == 0 and title else label
        axes.text(0.01, 0.99, text, transform=axes.transAxes, va="top", ha="left", fontsize=7, color="white",
                  bbox={"facecolor": "black", "edgecolor": "none", "pad": 1.5})
    return _render(figure, FigureCanvasAgg)


def _tile_axes(figure, index: int, count: int, bottom: float, pixels: np.ndarray, label: str):
    axes = figure.add_axes((index / count, bottom, 1.0 / count, 1.0 - bottom))
    axes.imshow(pixels, interpolation="antialiased", aspect="auto")
    axes.set_axis_off()
    axes.text(0.01, 0.99, label, transform=axes.transAxes, va="top", ha="left", fontsize=7, color="white",
              bbox={"facecolor": "black", "edgecolor": "none", "pad": 1.5})
    return axes


def _colour_bar(figure, first: int, last: int, count: int, height: float, colormap: str, low: float,
                high: float) -> None:
    """A horizontal colour bar under tiles first..last (inclusive), in figure fractions."""
    matplotlib, _, _ = _matplotlib()
    margin = 0.08 / count
    axes = figure.add_axes((first / count + margin, height * 0.55, (last - first + 1) / count - 2 * margin,
                            height * 0.3))
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(low, high),
                                            cmap=matplotlib.colormaps[colormap])
    bar = figure.colorbar(mappable, cax=axes, orientation="horizontal")
    bar.ax.tick_params(labelsize=6, length=2, pad=1)


def sources_panel(image: np.ndarray, columns: list[tuple[str, np.ndarray]], low: float, high: float,
                  difference: tuple[str, np.ndarray, float] | None = None, title: str = "",
                  scale: float = 0.5) -> "Image.Image":
    """One row (a PIL image): RGB, each source's (H, W) depth in one colour range [low, high] with one
    colour bar under them all, then the optional (label, |a - b|, top of its range) column with its own
    bar. Every tile is `scale` times the input size; the width is tiles x tile width exactly."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    tiles = [(f"{title}  RGB" if title else "RGB", np.clip(image, 0, 255).transpose(1, 2, 0).round().astype(np.uint8))]
    tiles += [(label, colorize(depth, np.ones(depth.shape, bool), low, high, SOURCES_COLORMAP))
              for label, depth in columns]
    if difference is not None:
        label, values, top = difference
        tiles.append((label, colorize(values, np.ones(values.shape, bool), 0.0, top, DIFF_COLORMAP)))
    height, width = image.shape[1:]
    tile_w, tile_h = max(2, round(width * scale)), max(2, round(height * scale))
    figure = Figure(figsize=(tile_w * len(tiles) / _DPI, (tile_h + _COLOUR_BAR_PX) / _DPI), dpi=_DPI)
    bar = _COLOUR_BAR_PX / (tile_h + _COLOUR_BAR_PX)
    for index, (label, pixels) in enumerate(tiles):
        _tile_axes(figure, index, len(tiles), bar, pixels, label)
    _colour_bar(figure, 1, len(columns), len(tiles), bar, SOURCES_COLORMAP, low, high)
    if difference is not None:
        _colour_bar(figure, len(tiles) - 1, len(tiles) - 1, len(tiles), bar, DIFF_COLORMAP, 0.0, difference[2])
    return _render(figure, FigureCanvasAgg)


@dataclass(frozen=True)
class BarPanel:
    """One small bar chart: labelled values (None: not measured, left out), and an optional reference line."""

    title: str
    bars: list[tuple[str, float | None]]
    line: tuple[float, str] | None = None
    fmt: str = "{:.1f}"
    # Palette index per bar (default: by position), so one series keeps one colour across panels.
    colours: tuple[int, ...] | None = None

    @property
    def measured(self) -> list[tuple[str, float, int]]:
        """(label, value, colour index) of the bars that have a value."""
        colours = self.colours or tuple(range(len(self.bars)))
        return [(label, value, colour) for (label, value), colour in zip(self.bars, colours) if value is not None]


def bar_chart(panels: list[BarPanel], path: str | os.PathLike, title: str = "", columns: int = 4,
              panel_size: tuple[float, float] = (3.2, 2.4)) -> int:
    """Save `panels` as one PNG grid; a panel without any measured bar is left out, not drawn empty.
    Returns how many panels were drawn."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    drawn = [panel for panel in panels if panel.measured]
    columns = max(1, min(columns, len(drawn)))
    rows = max(1, -(-len(drawn) // columns))
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + (0.4 if title else 0)), dpi=_DPI,
                    layout="constrained")
    if title:
        figure.suptitle(title, fontsize=10)
    for index, panel in enumerate(drawn):
        _draw_bar_panel(figure.add_subplot(rows, columns, index + 1), panel)
    FigureCanvasAgg(figure).print_png(os.fspath(path))
    return len(drawn)


def _draw_bar_panel(axes, panel: BarPanel) -> None:
    bars = panel.measured
    positions = range(len(bars))
    drawn = axes.bar(positions, [max(value, 0.0) for _, value, _ in bars],
                     color=[_BAR_COLOURS[colour % len(_BAR_COLOURS)] for _, _, colour in bars], width=0.6)
    axes.bar_label(drawn, labels=[panel.fmt.format(value) for _, value, _ in bars], fontsize=7)
    axes.set_xticks(list(positions), [textwrap.fill(label, _LABEL_WIDTH) for label, _, _ in bars], fontsize=7)
    axes.set_title(panel.title, fontsize=8)
    axes.tick_params(axis="y", labelsize=7)
    axes.margins(y=0.2)
    axes.set_xlim(-0.75, max(len(bars), 2) - 0.25)  # a lone bar keeps the width it has beside another
    if panel.line is not None:
        value, label = panel.line
        axes.axhline(value, color="tab:red", linestyle="--", linewidth=1.2)
        axes.annotate(label, (0.98, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                      fontsize=7, color="tab:red")
