from __future__ import annotations

import shutil

import numpy as np
import pytest

from lpcv_depth.images import load_contract_image
from lpcv_depth.calibration import CalibrationDataError, iter_batches, split_calibration_folder


def _copy(calibration_dir, target, count, start=0):
    target.mkdir(exist_ok=True)
    for path in sorted(calibration_dir.glob("*.jpg"))[start:start + count]:
        shutil.copy(path, target / path.name)
    return target


def test_split_is_sorted_disjoint_and_hashed(calibration_dir, tmp_path):
    folder = _copy(calibration_dir, tmp_path / "calib", 12)
    (folder / "sub").mkdir()
    shutil.copy(folder / "holo_00003.jpg", folder / "sub" / "a_first.png")
    split = split_calibration_folder(folder, num_calibration=None, num_holdout=3, min_images=4)
    names = [p.relative_to(folder).as_posix() for p in split.calibration + split.holdout]
    assert names == sorted(names) and len(names) == 13
    assert not set(split.calibration) & set(split.holdout)
    original = split.describe()["calibration_sha256"]
    again = split_calibration_folder(folder, num_calibration=None, num_holdout=3, min_images=4)
    assert again.describe()["calibration_sha256"] == original
    (split.calibration[0]).write_bytes(split.holdout[0].read_bytes())
    changed = split_calibration_folder(folder, num_calibration=None, num_holdout=3, min_images=4)
    assert changed.describe()["calibration_sha256"] != original


def test_batches_follow_the_contract(calibration_dir, tmp_path):
    folder = _copy(calibration_dir, tmp_path / "calib", 3)
    png = folder / "z_big.png"
    from PIL import Image

    Image.open(sorted(folder.glob("*.jpg"))[0]).resize((1280, 720)).save(png)
    split = split_calibration_folder(folder, num_calibration=None, num_holdout=1, min_images=3)
    batches = list(iter_batches(split.calibration, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 480, 640), (1, 3, 480, 640)]
    assert all(b.dtype == np.float32 and b.min() >= 0 and b.max() <= 255 and b.max() > 1 for b in batches)
    np.testing.assert_array_equal(batches[0][0], load_contract_image(split.calibration[0]))


def test_too_few_images_is_an_error_with_a_fix(calibration_dir, tmp_path):
    folder = _copy(calibration_dir, tmp_path / "calib", 10)
    with pytest.raises(CalibrationDataError, match="only 8 calibration images") as excinfo:
        split_calibration_folder(folder, num_calibration=None, num_holdout=2, min_images=32)
    assert "add more photos" in str(excinfo.value)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(CalibrationDataError, match="holds no JPG/PNG images"):
        split_calibration_folder(tmp_path / "empty", num_calibration=None, num_holdout=1, min_images=1)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        split_calibration_folder(tmp_path / "nope", num_calibration=None, num_holdout=1, min_images=1)


def test_corrupt_files_are_named(calibration_dir, tmp_path):
    folder = _copy(calibration_dir, tmp_path / "calib", 6)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "half.png").write_bytes((folder / "holo_00003.jpg").read_bytes()[:100])
    with pytest.raises(CalibrationDataError) as excinfo:
        split_calibration_folder(folder, num_calibration=None, num_holdout=1, min_images=2)
    assert "2 unreadable" in str(excinfo.value) and "broken.jpg" in str(excinfo.value) and "half.png" in str(excinfo.value)
