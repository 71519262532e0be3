"""RGB-D readers: the shared sets brought to 640x480, the organizers' layout, and broken frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcv_depth.rgbd import DatasetError, FrameError, dataset_files, load_rgbd_dataset

SHARED_SETS = {"hololens_dev": 20, "iphone_lidar": 1, "kinect_home": 5, "tum_desk": 2}


def native_depth_m(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 1000.0


def write_depth(path: Path, depth_mm: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(depth_mm.astype(np.uint16)).save(path)


def write_rgb(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_organizers_set(root: Path, ids=("0000", "0001"), rgb_folder="image") -> Path:
    """A tiny set in the organizers' layout: raw/ uint16 mm and conf/ 0/1/2 at 256x192, plus RGB."""
    rng = np.random.default_rng(1)
    for frame_id in ids:
        depth = rng.integers(500, 4000, (192, 256))
        depth[:10] = 0
        write_depth(root / "raw" / f"{frame_id}.png", depth)
        conf = rng.choice([0, 1, 2], size=(192, 256), p=[0.1, 0.3, 0.6]).astype(np.uint8)
        (root / "conf").mkdir(exist_ok=True)
        Image.fromarray(conf).save(root / "conf" / f"{frame_id}.png")
        write_rgb(root / rgb_folder / f"{frame_id}.jpg", size=(1024, 768))
    return root


def test_shared_root_lists_every_set(rgbd_dir):
    frames = load_rgbd_dataset(rgbd_dir)
    counts = {name: sum(f.set_name == name for f in frames) for name in SHARED_SETS}
    assert counts == SHARED_SETS
    assert all(f.layout == "lpcv" and f.rgb_path and f.depth_path for f in frames)
    files = dataset_files(frames)
    assert len(files) == 2 * len(frames) + 4 and sum(p.name == "meta.json" for p in files) == 4
    assert [f.name for f in load_rgbd_dataset(rgbd_dir / "tum_desk")] == ["tum_desk/desk_1", "tum_desk/desk_2"]


def test_hololens_is_resized_with_k_scaled(rgbd_dir):
    frame = load_rgbd_dataset(rgbd_dir / "hololens_dev")[0]
    gt = frame.load_ground_truth()
    assert gt.depth.shape == (480, 640) and gt.depth.dtype == np.float32 and gt.native_size == (540, 360)
    expected = np.asarray(Image.fromarray(native_depth_m(frame.depth_path)).resize((640, 480), Image.NEAREST))
    np.testing.assert_array_equal(gt.depth, expected)
    meta = json.loads((rgbd_dir / "hololens_dev" / "meta.json").read_text())["intrinsics"]
    assert gt.intrinsics.as_dict() == pytest.approx({"fx": meta["fx"] * 640 / 540, "fy": meta["fy"] * 480 / 360,
                                                     "cx": meta["cx"] * 640 / 540, "cy": meta["cy"] * 480 / 360})
    assert gt.conf is None
    image = frame.load_image()
    assert image.shape == (3, 480, 640) and image.dtype == np.float32


def test_iphone_lidar_depth_is_upsampled_by_nearest(rgbd_dir):
    [frame] = load_rgbd_dataset(rgbd_dir / "iphone_lidar")
    gt = frame.load_ground_truth()
    native = native_depth_m(frame.depth_path)
    assert native.shape == (192, 256) and gt.depth.shape == (480, 640) and gt.native_size == (256, 192)
    assert set(np.unique(gt.depth)) <= set(np.unique(native))  # nearest: no new values
    # Pixel (row 479, col 639) of the 640x480 map lies in native pixel (191, 255).
    assert gt.depth[0, 0] == native[0, 0] and gt.depth[479, 639] == native[191, 255]
    assert gt.intrinsics is None  # meta.json: intrinsics null
    assert frame.load_image().shape == (3, 480, 640)  # from 1920x1440


def test_kinect_is_already_contract_sized(rgbd_dir):
    frame = load_rgbd_dataset(rgbd_dir / "kinect_home")[0]
    gt = frame.load_ground_truth()
    np.testing.assert_array_equal(gt.depth, native_depth_m(frame.depth_path))
    assert gt.intrinsics.as_dict() == {"fx": 518.0, "fy": 519.0, "cx": 325.5, "cy": 253.5}


@pytest.mark.parametrize("rgb_folder", ["image", "rgb"])
def test_organizers_layout(tmp_path, rgb_folder):
    root = make_organizers_set(tmp_path / "track3", rgb_folder=rgb_folder)
    frames = load_rgbd_dataset(root)
    assert [f.frame_id for f in frames] == ["0000", "0001"] and frames[0].layout == "organizers"
    gt = frames[0].load_ground_truth()
    conf_native = np.asarray(Image.open(root / "conf" / "0000.png"))
    assert gt.conf.shape == (480, 640) and gt.conf.dtype == np.uint8
    np.testing.assert_array_equal(gt.conf, np.asarray(Image.fromarray(conf_native).resize((640, 480), Image.NEAREST)))
    depth_native = Image.fromarray(native_depth_m(root / "raw" / "0000.png"))
    np.testing.assert_array_equal(gt.depth, np.asarray(depth_native.resize((640, 480), Image.NEAREST)))
    assert gt.intrinsics is None
    assert frames[1].load_image().shape == (3, 480, 640)
    # A folder holding the set is a root of sets.
    assert [f.name for f in load_rgbd_dataset(tmp_path)] == ["track3/0000", "track3/0001"]


def test_organizers_layout_without_rgb_or_conf_folder(tmp_path):
    root = make_organizers_set(tmp_path / "set")
    (root / "image").rename(root / "photos")
    with pytest.raises(DatasetError, match="no folder of RGB images") as excinfo:
        load_rgbd_dataset(root)
    assert "rgb" in str(excinfo.value)
    (root / "photos").rename(root / "rgb")
    for path in (root / "conf").iterdir():
        path.unlink()
    (root / "conf").rmdir()
    with pytest.raises(DatasetError, match="no conf/"):
        load_rgbd_dataset(root)


def test_organizers_frame_without_conf_or_with_bad_conf(tmp_path):
    root = make_organizers_set(tmp_path / "set")
    (root / "conf" / "0000.png").unlink()
    Image.fromarray(np.full((192, 256), 5, np.uint8)).save(root / "conf" / "0001.png")
    first, second = load_rgbd_dataset(root)
    with pytest.raises(FrameError, match="no confidence map"):
        first.load_ground_truth()
    with pytest.raises(FrameError, match=r"values \[5\]"):
        second.load_ground_truth()


def make_lpcv_set(root: Path, ids=("a",), intrinsics=None) -> Path:
    for frame_id in ids:
        write_rgb(root / "rgb" / f"{frame_id}.jpg")
        write_depth(root / "depth" / f"{frame_id}.png", np.full((48, 64), 1500))
    (root / "meta.json").write_text(json.dumps({"intrinsics": intrinsics}))
    return root


def test_broken_frames_raise_frame_errors(tmp_path):
    root = make_lpcv_set(tmp_path / "set", ids=("ok", "eight_bit", "garbage", "zeros", "no_depth", "aspect",
                                                 "bad_rgb"))
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(root / "depth" / "eight_bit.png")
    (root / "depth" / "garbage.png").write_bytes(b"not a png at all")
    write_depth(root / "depth" / "zeros.png", np.zeros((48, 64)))
    (root / "depth" / "no_depth.png").unlink()
    write_depth(root / "depth" / "aspect.png", np.full((64, 64), 1500))
    (root / "rgb" / "bad_rgb.jpg").write_bytes(b"\xff\xd8 truncated")
    write_rgb(root / "rgb" / "no_rgb.jpg")
    (root / "rgb" / "no_rgb.jpg").unlink()
    write_depth(root / "depth" / "no_rgb.png", np.full((48, 64), 1500))
    frames = {f.frame_id: f for f in load_rgbd_dataset(root)}

    assert frames["ok"].load_ground_truth().depth.max() == pytest.approx(1.5)
    expected = {"eight_bit": "8-bit grayscale image; depth must be a single-channel 16-bit PNG",
                "garbage": "cannot read depth", "zeros": "no valid pixel", "no_depth": "no depth file",
                "aspect": "different aspect ratios", "bad_rgb": "cannot read RGB image", "no_rgb": "no RGB image file"}
    for frame_id, message in expected.items():
        with pytest.raises(FrameError, match=message) as excinfo:
            frames[frame_id].load_ground_truth()
        assert str(excinfo.value).startswith(f"set/{frame_id}: ")
    with pytest.raises(FrameError, match="cannot read image"):
        frames["bad_rgb"].load_image()


def test_unusable_dataset_folders(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_rgbd_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no RGB-D set found"):
        load_rgbd_dataset(tmp_path / "empty")
    root = make_lpcv_set(tmp_path / "bad_meta")
    (root / "meta.json").write_text('{"intrinsics": {"fx": 500}}')
    with pytest.raises(DatasetError, match="malformed"):
        load_rgbd_dataset(root)
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed"):
        load_rgbd_dataset(root)
    (root / "meta.json").unlink()  # optional: without it the set has no intrinsics
    assert load_rgbd_dataset(root)[0].intrinsics is None
    for path in (root / "rgb").iterdir():
        path.unlink()
    (root / "rgb").rmdir()
    with pytest.raises(DatasetError, match="no rgb/ folder"):
        load_rgbd_dataset(root)


def test_intrinsics_from_meta_scale_with_the_rgb(tmp_path):
    root = make_lpcv_set(tmp_path / "set", intrinsics={"fx": 50.0, "fy": 52.0, "cx": 32.0, "cy": 24.0})
    [frame] = load_rgbd_dataset(root)
    assert frame.load_ground_truth().intrinsics.as_dict() == {"fx": 500.0, "fy": 520.0, "cx": 320.0, "cy": 240.0}
