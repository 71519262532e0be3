"""Images as the contract reads them: 16-bit PNGs keep their range instead of saturating."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lpcv_depth.calibration import iter_batches, split_calibration_folder
from lpcv_depth.images import ImageReadError, load_contract_image


def write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG (grey or RGB) written byte by byte: Pillow cannot write 16-bit RGB itself."""
    height, width = array.shape[:2]
    colour_type = 0 if array.ndim == 2 else 2
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.fixture()
def gradient16() -> np.ndarray:
    ramp = np.linspace(0, 65535, 640)[None, :].repeat(480, axis=0)
    return np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 32768)], axis=-1).astype(np.uint16)


def test_sixteen_bit_grey_and_rgb_keep_their_range(tmp_path, gradient16):
    write_png16(tmp_path / "grey16.png", gradient16[..., 0])
    write_png16(tmp_path / "rgb16.png", gradient16)
    grey = load_contract_image(tmp_path / "grey16.png")
    rgb = load_contract_image(tmp_path / "rgb16.png")
    expected = gradient16[..., 0] / 257.0
    for image in (grey[0], rgb[0]):
        assert np.abs(image - expected).max() <= 1.0
    assert (grey >= 254.5).mean() < 0.01, "16-bit grey must not saturate to white"
    assert np.abs(rgb[2] - 128).max() <= 1.0
    np.testing.assert_array_equal(grey[0], grey[1])


def test_calibration_and_rgbd_paths_read_sixteen_bit_the_same_way(tmp_path, gradient16):
    folder = tmp_path / "calib"
    folder.mkdir()
    for index in range(3):
        write_png16(folder / f"img{index}.png", gradient16[..., 0])
    split = split_calibration_folder(folder, num_calibration=None, num_holdout=1, min_images=1)
    batch = next(iter(iter_batches(split.calibration)))
    assert abs(float(batch.mean()) - 127.5) < 2.0

    from lpcv_depth.rgbd import load_rgbd_dataset

    dataset = tmp_path / "set"
    (dataset / "rgb").mkdir(parents=True)
    (dataset / "depth").mkdir()
    (dataset / "meta.json").write_text('{"source": "test", "intrinsics": null}')
    write_png16(dataset / "rgb" / "f0.png", gradient16)
    Image.fromarray(np.full((480, 640), 1500, np.uint16)).save(dataset / "depth" / "f0.png")
    [frame] = load_rgbd_dataset(dataset)
    np.testing.assert_allclose(frame.load_image(), load_contract_image(dataset / "rgb" / "f0.png"))
    assert abs(float(frame.load_image()[0].mean()) - 127.5) < 2.0


def test_unknown_range_images_are_refused(tmp_path):
    Image.fromarray(np.ones((48, 64), np.float32)).save(tmp_path / "float.tiff")
    path = tmp_path / "float.png"
    (tmp_path / "float.tiff").rename(path)
    with pytest.raises(ImageReadError, match="range is unknown") as excinfo:
        load_contract_image(path)
    assert "fix:" in str(excinfo.value)


def test_a_phone_photo_is_read_upright_and_an_rgbd_frame_as_stored(tmp_path):
    # A phone stores a portrait photo as landscape pixels plus EXIF orientation 6 (turn 90 degrees clockwise).
    stored = np.zeros((480, 640, 3), np.uint8)
    stored[:, :320] = 255  # the left half is white as stored; upright, the top half is
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(photo, exif=exif.tobytes(), quality=95)

    upright = load_contract_image(photo)
    assert upright.shape == (3, 480, 640)
    assert upright[:, :200].mean() > 200 and upright[:, 280:].mean() < 50

    as_stored = load_contract_image(photo, upright=False)
    assert as_stored[:, :, :300].mean() > 200 and as_stored[:, :, 340:].mean() < 50

    from lpcv_depth.rgbd import load_rgbd_dataset

    dataset = tmp_path / "set"
    (dataset / "rgb").mkdir(parents=True)
    (dataset / "depth").mkdir()
    (dataset / "meta.json").write_text('{"source": "test", "intrinsics": null}')
    Image.fromarray(stored).save(dataset / "rgb" / "f0.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(np.full((480, 640), 1500, np.uint16)).save(dataset / "depth" / "f0.png")
    [frame] = load_rgbd_dataset(dataset)
    np.testing.assert_array_equal(frame.load_image(), load_contract_image(dataset / "rgb" / "f0.jpg", upright=False))
