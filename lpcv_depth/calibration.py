"""Calibration data as a reader: sorted, deterministic, preprocessed exactly as the contract says,
and hashed so the manifest pins which photos produced the encodings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.images import ImageReadError, list_images, load_contract_image
from lpcv_depth.manifest import sha256_of_files

RECOMMENDED_IMAGES = 100  # the floor for a real run; AIMET suggests 500-1000


class CalibrationDataError(LpcvError):
    """The calibration folder cannot give the images a run needs."""


@dataclass(frozen=True)
class CalibrationSplit:
    """Which files calibrate and which are held out for verification (never both)."""

    root: Path
    calibration: tuple[Path, ...]
    holdout: tuple[Path, ...]

    def describe(self) -> dict:
        return {
            "root": os.fspath(self.root),
            "calibration_count": len(self.calibration),
            "calibration_sha256": sha256_of_files(list(self.calibration), self.root),
            "calibration_files": [p.relative_to(self.root).as_posix() for p in self.calibration],
            "holdout_count": len(self.holdout),
            "holdout_sha256": sha256_of_files(list(self.holdout), self.root) if self.holdout else None,
            "holdout_files": [p.relative_to(self.root).as_posix() for p in self.holdout],
        }


def split_calibration_folder(folder: str | os.PathLike, *, num_calibration: int | None, num_holdout: int,
                             min_images: int) -> CalibrationSplit:
    """Sorted images; the last `num_holdout` are held out, the first `num_calibration` of the rest calibrate."""
    root = Path(folder)
    if not root.is_dir():
        raise CalibrationDataError(f"calibration folder {root} does not exist",
                                   hint="create it and put representative JPG/PNG photos in it (see calibration_data/README.md)")
    if num_holdout < 0 or (num_calibration is not None and num_calibration < 1):
        raise ConfigError("num_calibration must be >= 1 and num_holdout >= 0")
    files = list_images(root)
    if not files:
        raise CalibrationDataError(f"calibration folder {root} holds no JPG/PNG images",
                                   hint=f"add at least {RECOMMENDED_IMAGES} representative photos")
    holdout = files[len(files) - num_holdout:] if num_holdout else []
    pool = files[:len(files) - num_holdout]
    calibration = pool[:num_calibration] if num_calibration else pool
    if len(calibration) < min_images:
        raise CalibrationDataError(
            f"only {len(calibration)} calibration images in {root} ({len(files)} found, {len(holdout)} held out "
            f"for verification); at least {min_images} are required",
            hint=f"add more photos (>= {RECOMMENDED_IMAGES} for a real run), or lower --holdout / --min-calib")
    unreadable = []
    for path in calibration + holdout:
        try:
            load_contract_image(path)
        except ImageReadError as err:
            unreadable.append(f"{path.name} ({str(err).splitlines()[0].split(': ', 1)[-1]})")
    if unreadable:
        raise CalibrationDataError(f"{len(unreadable)} unreadable image(s) in {root}: " + "; ".join(unreadable[:10]),
                                   hint="delete or replace these files; calibration never skips images silently")
    return CalibrationSplit(root, tuple(calibration), tuple(holdout))


def iter_batches(paths: tuple[Path, ...] | list[Path], batch_size: int = 1) -> Iterator[np.ndarray]:
    """Contract-preprocessed (B,3,480,640) float32 batches in file order."""
    for start in range(0, len(paths), batch_size):
        yield np.stack([load_contract_image(p) for p in paths[start:start + batch_size]])
