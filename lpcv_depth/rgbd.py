"""RGB-D evaluation sets, read in two layouts and brought to the 640x480 Track 3 contract.

lpcv layout (../shared/data/rgbd/<set>/):
    meta.json        intrinsics of the stored RGB (or null), sensor, licence
    rgb/<id>.jpg     any size
    depth/<id>.png   uint16 millimetres, 0 = invalid, any size of the same aspect as the RGB

organizers' layout (the LPCVC 2025 Track 3 ground truth):
    raw/<id>.png     uint16 millimetres at 256x192
    conf/<id>.png    ARKit confidence 0/1/2, same size
    rgb/<id>.* or image/<id>.*   the RGB images (optional meta.json as above)

`load_rgbd_dataset` accepts one set folder or a folder of sets. Listing never reads pixels; each
frame is read on demand, and everything wrong with one frame (missing or unreadable file, 8-bit
depth, no valid pixel, ...) raises FrameError, so a caller can skip that frame and say why.

Bringing a frame to the contract: the RGB is resized bilinearly (lpcv_depth.images), the GT and
confidence by nearest neighbour (as the organizers do), and K is scaled by 640/W and 480/H.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import LpcvError
from lpcv_depth.images import ImageReadError, list_images, load_contract_image
from lpcv_depth.track3_metric import Intrinsics

CONTRACT_SIZE = (TRACK3.width, TRACK3.height)
LAYOUTS = ("lpcv", "organizers")
ORGANIZERS_RGB_FOLDERS = ("rgb", "image", "images")
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")
_CONF_VALUES = (0, 1, 2)
# RGB and depth are resized independently, which only keeps them aligned if both cover the same view.
_ASPECT_TOLERANCE = 0.01
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)


class DatasetError(LpcvError):
    """A dataset folder cannot be used at all (not a set, no frames, broken meta.json)."""


class FrameError(LpcvError):
    """One frame cannot be used; the rest of the set can."""


@dataclass(frozen=True)
class GroundTruth:
    """A frame's ground truth at the contract size."""

    depth: np.ndarray  # (480, 640) float32 metres, 0 = invalid
    conf: np.ndarray | None  # (480, 640) uint8 in {0, 1, 2}, or None when the set has no confidence maps
    intrinsics: Intrinsics | None  # K of the 640x480 image, None when the set declares none
    native_size: tuple[int, int]  # (W, H) of the stored depth


@dataclass(frozen=True)
class Frame:
    """One RGB-D frame as listed; `load_image` and `load_ground_truth` read it."""

    set_name: str
    set_dir: Path
    frame_id: str
    layout: str
    rgb_path: Path | None
    depth_path: Path | None
    conf_path: Path | None
    intrinsics: Intrinsics | None  # K of the stored RGB

    @property
    def name(self) -> str:
        return f"{self.set_name}/{self.frame_id}"

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.rgb_path, self.depth_path, self.conf_path) if p is not None]

    def load_image(self) -> np.ndarray:
        """The RGB as the contract input: float32 (3, 480, 640) in [0, 255]."""
        try:
            return load_contract_image(self._require(self.rgb_path, "RGB image"), upright=False)
        except ImageReadError as err:
            raise FrameError(f"{self.name}: {err}") from err

    def load_ground_truth(self) -> GroundTruth:
        """Depth (metres) and confidence, nearest-resized to 640x480, and K scaled to match."""
        depth_path = self._require(self.depth_path, "depth")
        depth, mode, native_size = _read_png(depth_path, self.name, "depth")
        if mode not in _DEPTH_MODES:
            raise FrameError(f"{self.name}: depth {depth_path.name} is a {_describe_mode(mode)} image; "
                             "depth must be a single-channel 16-bit PNG in millimetres (0 = invalid)",
                             hint="re-save the depth as uint16 millimetres; 8-bit depth loses the metric scale")
        depth = depth.astype(np.float64)
        if depth.min() < 0 or depth.max() > np.iinfo(np.uint16).max:
            raise FrameError(f"{self.name}: depth values {depth.min():g}..{depth.max():g} are not uint16 millimetres")
        if not (depth > 0).any():
            raise FrameError(f"{self.name}: depth {depth_path.name} has no valid pixel (all zeros)")

        rgb_size = self._rgb_size()
        if abs(math.log((native_size[0] / native_size[1]) / (rgb_size[0] / rgb_size[1]))) > _ASPECT_TOLERANCE:
            raise FrameError(f"{self.name}: depth is {native_size[0]}x{native_size[1]} but the RGB is "
                             f"{rgb_size[0]}x{rgb_size[1]}; different aspect ratios cannot be aligned by resizing")
        conf = self._load_conf(native_size)
        return GroundTruth(
            depth=_resize_nearest((depth / 1000.0).astype(np.float32)),
            conf=None if conf is None else _resize_nearest(conf),
            intrinsics=None if self.intrinsics is None else self.intrinsics.scaled(rgb_size, CONTRACT_SIZE),
            native_size=native_size)

    def _load_conf(self, depth_size: tuple[int, int]) -> np.ndarray | None:
        if self.layout != "organizers":
            return None
        path = self._require(self.conf_path, "confidence map")
        conf, mode, size = _read_png(path, self.name, "confidence map")
        if conf.ndim != 2 or size != depth_size:
            raise FrameError(f"{self.name}: confidence map {path.name} is {size[0]}x{size[1]} "
                             f"{_describe_mode(mode)}; expected single-channel {depth_size[0]}x{depth_size[1]} "
                             "like the depth")
        if not np.isin(conf, _CONF_VALUES).all():
            raise FrameError(f"{self.name}: confidence map {path.name} has values {np.unique(conf)[:8].tolist()}; "
                             f"expected only {list(_CONF_VALUES)}")
        if not (conf >= 1).any():
            raise FrameError(f"{self.name}: confidence map {path.name} has no pixel with confidence >= 1")
        return conf.astype(np.uint8)

    def _rgb_size(self) -> tuple[int, int]:
        path = self._require(self.rgb_path, "RGB image")
        try:
            with Image.open(path) as image:
                return image.size
        except _READ_ERRORS as err:
            raise FrameError(f"{self.name}: cannot read RGB image {path}: {err}") from err

    def _require(self, path: Path | None, what: str) -> Path:
        if path is None:
            raise FrameError(f"{self.name}: no {what} file for this frame",
                             hint="every frame needs an RGB image, a depth PNG (and a conf PNG in the organizers' "
                                  "layout) with the same file name stem")
        return path


def load_rgbd_dataset(path: str | os.PathLike) -> list[Frame]:
    """Every frame of one set folder, or of every set in a folder of sets, in a stable order."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}", hint="pass a set folder or a folder of sets")
    if _is_set(root):
        set_dirs = [root]
    else:
        set_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_set(d))
    if not set_dirs:
        raise DatasetError(f"no RGB-D set found in {root}",
                           hint="a set holds rgb/ + depth/ (lpcv layout) or raw/ + conf/ + rgb/ or image/ "
                                "(organizers' layout); a root holds such sets as subfolders")
    return [frame for set_dir in set_dirs for frame in _list_set(set_dir)]


def dataset_files(frames: list[Frame]) -> list[Path]:
    """Every file the frames are read from, meta.json included, in a stable order (for hashing)."""
    metas = {frame.set_dir / "meta.json" for frame in frames}
    files = {path for frame in frames for path in frame.files} | {path for path in metas if path.is_file()}
    return sorted(files)


def _is_set(folder: Path) -> bool:
    return (folder / "depth").is_dir() or (folder / "raw").is_dir()


def _list_set(folder: Path) -> list[Frame]:
    intrinsics = _read_intrinsics(folder)
    if (folder / "raw").is_dir():
        layout, depth_dir, conf_dir = "organizers", folder / "raw", folder / "conf"
        if not conf_dir.is_dir():
            raise DatasetError(f"{folder} has raw/ but no conf/ folder",
                               hint="the organizers' layout keeps the confidence maps in conf/<id>.png beside raw/")
        rgb_dir = next((folder / name for name in ORGANIZERS_RGB_FOLDERS if (folder / name).is_dir()), None)
        if rgb_dir is None:
            raise DatasetError(f"{folder} has raw/ and conf/ but no folder of RGB images",
                               hint=f"put the RGB images, named like raw/<id>.png, in {folder / 'rgb'} "
                                    f"(or one of {', '.join(ORGANIZERS_RGB_FOLDERS)})")
    else:
        layout, depth_dir, conf_dir, rgb_dir = "lpcv", folder / "depth", None, folder / "rgb"
        if not rgb_dir.is_dir():
            raise DatasetError(f"{folder} has depth/ but no rgb/ folder", hint="put the RGB images in rgb/<id>.jpg")
    rgb = {p.stem: p for p in list_images(rgb_dir, recursive=False)}
    depth = {p.stem: p for p in sorted(depth_dir.glob("*.png"))}
    conf = {p.stem: p for p in sorted(conf_dir.glob("*.png"))} if conf_dir else {}
    ids = sorted(set(rgb) | set(depth))
    if not ids:
        raise DatasetError(f"set {folder} has no frames", hint=f"expected images in {rgb_dir} and {depth_dir}")
    return [Frame(set_name=folder.name, set_dir=folder, frame_id=frame_id, layout=layout, rgb_path=rgb.get(frame_id),
                  depth_path=depth.get(frame_id), conf_path=conf.get(frame_id), intrinsics=intrinsics)
            for frame_id in ids]


def _read_intrinsics(folder: Path) -> Intrinsics | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        values = meta.get("intrinsics")
        return None if values is None else Intrinsics(*(float(values[k]) for k in ("fx", "fy", "cx", "cy")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise DatasetError(f"{meta_path} is unreadable or malformed: {type(err).__name__}: {err}",
                           hint='meta.json needs "intrinsics": {"fx", "fy", "cx", "cy"} (pixels of the stored RGB) '
                                "or null") from err


def _read_png(path: Path, frame: str, what: str) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Pixels, PIL mode and (W, H) of an image file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image), image.mode, image.size
    except _READ_ERRORS as err:
        raise FrameError(f"{frame}: cannot read {what} {path}: {err}") from err


def _describe_mode(mode: str) -> str:
    return {"L": "8-bit grayscale", "P": "8-bit palette", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
            "1": "1-bit", "F": "32-bit float"}.get(mode, f"PIL mode {mode}")


def _resize_nearest(array: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resize to 640x480 with PIL, the organizers' resize of the GT."""
    if array.shape[::-1] == CONTRACT_SIZE:
        return array
    return np.asarray(Image.fromarray(array).resize(CONTRACT_SIZE, Image.NEAREST))
