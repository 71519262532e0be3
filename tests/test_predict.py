"""lpcv-depth predict: photos and videos through any source, pictures laid out as documented, bad input
refused with exit 2. Sources are a tiny random ONNX model in the Track 3 contract and its int8 QDQ
twin (ONNX Runtime's static quantizer), so the file runs in seconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lpcv_depth import cli
from lpcv_depth.contract import TRACK3
from lpcv_depth.manifest import write_manifest
from tests.stage_folders import make_ptq_folder

TILE_W, TILE_H, BAR_H = TRACK3.width // 2, TRACK3.height // 2, 34


def _tiny_onnx(path: Path, model: str = "tiny", seed: int = 0) -> Path:
    """A 1x1 convolution and a sigmoid: (1,3,480,640) image in, (1,1,480,640) depth in (0,1) out,
    with the contract and the model name in its metadata as the export stage writes them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array((rng.normal(size=(1, 3, 1, 1)) / 255).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(1, np.float32), "b")
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["depth"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 480, 640])],
                              [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, 480, 640])],
                              initializer=[weight, bias])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(proto, {**TRACK3.metadata_props(), "lpcv.model": model, "lpcv.output_mode": "depth"})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, os.fspath(path))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory, calibration_dir) -> Path:
    """Three real photos, one of them turned to portrait (another size and orientation)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    files = sorted(calibration_dir.glob("*.jpg"))[:3]
    for path in files[:2]:
        shutil.copy(path, folder / path.name)
    with Image.open(files[2]) as image:
        image.transpose(Image.Transpose.ROTATE_90).resize((300, 410)).save(folder / "portrait.jpg")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos) -> dict[str, Path]:
    """The tiny model as an export folder (model.onnx + manifest) and a ptq folder with its QDQ model."""
    root = tmp_path_factory.mktemp("tiny")
    export = root / "export"
    onnx_path = _tiny_onnx(export / "model.onnx")
    write_manifest(export, stage="export", config={"model": "tiny"}, inputs={}, outputs=[onnx_path], timings={},
                   results={})
    ptq = make_ptq_folder(export, root / "ptq-w8a8", sorted(photos.glob("*.jpg"))[:2])
    return {"onnx": onnx_path, "ptq": ptq}


def _predict(*args) -> int:
    return cli.main(["predict", *map(os.fspath, args)])


def test_qdq_npy_equals_onnx_runtime_on_the_prepared_input(tiny, photos, tmp_path):
    """The saved .npy of the ptq source is ONNX Runtime's output of its QDQ model on the image as
    images.load_contract_image prepares it (the portrait photo: resized to 640x480 as every stage does)."""
    from lpcv_depth.images import load_contract_image
    from lpcv_depth.verify import OrtRunner

    out = tmp_path / "out"
    assert _predict(photos / "portrait.jpg", "--ptq", tiny["ptq"], "--save-npy", "--out", out) == 0
    saved = np.load(out / "npy" / "ptq" / "portrait.npy")
    expected = OrtRunner(tiny["ptq"] / "model_qdq.onnx").run(load_contract_image(photos / "portrait.jpg")[None])
    assert saved.shape == (1, 1, 480, 640) and saved.dtype == np.float32
    np.testing.assert_array_equal(saved, expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "predict" and manifest["results"]["sources"][0]["kind"] == "ptq"
    assert manifest["results"]["sources"][0]["model"] == "tiny"


def test_two_sources_add_the_difference_column(tiny, photos, tmp_path):
    from PIL import Image

    out = tmp_path / "two"
    assert _predict(photos, "--onnx", tiny["onnx"], "--ptq", tiny["ptq"], "--out", out) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(p.stem for p in photos.glob("*.jpg"))
    with Image.open(pngs[0]) as picture:
        # RGB | onnx | ptq | |onnx - ptq|
        assert picture.size == (4 * TILE_W, TILE_H + BAR_H)
        pixels = np.asarray(picture.convert("RGB"))
    diff_tile = pixels[:TILE_H, 3 * TILE_W:].astype(int)
    depth_tile = pixels[:TILE_H, TILE_W:2 * TILE_W].astype(int)
    assert diff_tile.std() > 0 and not np.array_equal(diff_tile, depth_tile)
    results = json.loads((out / "manifest.json").read_text())["results"]
    assert results["difference"] is True and results["frames"] == 3 and results["host_fps"] > 0


def test_one_and_three_sources_have_no_difference_column(tiny, photos, tmp_path):
    from PIL import Image

    photo = sorted(photos.glob("*.jpg"))[0]
    assert _predict(photo, "--onnx", tiny["onnx"], "--out", tmp_path / "one") == 0
    assert _predict(photo, "--onnx", tiny["onnx"], "--onnx", tiny["onnx"], "--ptq", tiny["ptq"],
                    "--out", tmp_path / "three") == 0
    with Image.open(tmp_path / "one" / f"{photo.stem}.png") as one, \
            Image.open(tmp_path / "three" / f"{photo.stem}.png") as three:
        assert one.size[0] == 2 * TILE_W and three.size[0] == 4 * TILE_W


def _write_video(path: Path, frames: int, size=(96, 64)) -> Path:
    from lpcv_depth.video import VideoWriter

    rng = np.random.default_rng(1)
    with VideoWriter(path, 10) as video:
        for _ in range(frames):
            video.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return path


def test_video_gives_the_expected_frames_as_pngs_and_mp4(tiny, tmp_path):
    from lpcv_depth.video import count_frames, probe_video

    video = _write_video(tmp_path / "clip.mp4", 9)
    out = tmp_path / "video"
    # frames 0, 3, 6 of 9 with --every 3; --max-frames 2 keeps 0 and 3
    assert _predict(video, "--onnx", tiny["onnx"], "--every", "3", "--max-frames", "2", "--out", out) == 0
    assert sorted(p.name for p in (out / "clip").glob("*.png")) == ["000000.png", "000003.png"]
    assert count_frames(out / "clip.mp4") == 2
    info = probe_video(out / "clip.mp4")
    assert (info.width, info.height) == (2 * TILE_W, TILE_H + BAR_H)
    assert _predict(video, "--onnx", tiny["onnx"], "--every", "2", "--out", tmp_path / "all") == 0
    assert len(list((tmp_path / "all" / "clip").glob("*.png"))) == count_frames(tmp_path / "all" / "clip.mp4") == 5


def _depth_tile(png: Path, column: int) -> np.ndarray:
    """A depth tile's pixels below its label."""
    from PIL import Image

    with Image.open(png) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    return pixels[TILE_H // 4:TILE_H, column * TILE_W:(column + 1) * TILE_W]


def test_saved_predictions_are_a_source(tiny, photos, tmp_path):
    """--save-npy writes one folder per source that --predictions reads back (photos and video frames
    alike): the same depth, pixel for pixel."""
    photo = sorted(photos.glob("*.jpg"))[0]
    video = _write_video(tmp_path / "clip.mp4", 3)
    first = tmp_path / "first"
    assert _predict(photo, video, "--onnx", tiny["onnx"], "--save-npy", "--out", first) == 0
    assert sorted(p.name for p in (first / "npy" / "onnx").iterdir()) == [
        "clip__000000.npy", "clip__000001.npy", "clip__000002.npy", f"{photo.stem}.npy"]
    again = tmp_path / "again"
    assert _predict(photo, video, "--predictions", first / "npy" / "onnx", "--out", again) == 0
    for name in (f"{photo.stem}.png", "clip/000002.png"):
        np.testing.assert_array_equal(_depth_tile(first / name, 1), _depth_tile(again / name, 1))


def test_a_hub_folder_is_read_through_its_device_outputs(tiny, photos, tmp_path, capsys):
    """A hub stage folder stands for its device_outputs/, named as hub_inference names --images photos."""
    from lpcv_depth.images import load_contract_image
    from lpcv_depth.verify import OrtRunner

    hub = tmp_path / "hub-ptq"
    saved = hub / "device_outputs" / "images"
    saved.mkdir(parents=True)
    files = sorted(photos.glob("*.jpg"))
    runner = OrtRunner(tiny["onnx"])
    for path in files:
        np.save(saved / f"{path.stem}.npy", runner.run(load_contract_image(path)[None]) * 0.5)
    write_manifest(hub, stage="hub", config={}, inputs={}, outputs=[], timings={}, results={})
    out = tmp_path / "out"
    assert _predict(photos, "--onnx", tiny["onnx"], "--predictions", hub, "--out", out) == 0
    # Half the ONNX output is the same depth after median scaling: the difference column is black.
    name = f"{files[0].stem}.png"
    np.testing.assert_array_equal(_depth_tile(out / name, 1), _depth_tile(out / name, 2))
    assert _depth_tile(out / name, 3).max() <= 8
    (saved / name.replace(".png", ".npy")).unlink()
    err = _refused(capsys, photos, "--onnx", tiny["onnx"], "--predictions", hub, "--out", tmp_path / "o")
    assert f"{files[0].stem}.npy" in err


def test_htp_source_runs_the_qdq_model_on_the_emulator(tiny, photos, tmp_path):
    """--htp: the ptq folder's QDQ model on the local HTP emulator (in a child process), a few
    quantization steps from ONNX Runtime's CPU run of the same model."""
    from lpcv_depth.backends.qnn import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    photo = sorted(photos.glob("*.jpg"))[0]
    out = tmp_path / "htp"
    assert _predict(photo, "--ptq", tiny["ptq"], "--htp", tiny["ptq"], "--save-npy", "--out", out) == 0
    cpu, htp = (np.load(out / "npy" / kind / f"{photo.stem}.npy") for kind in ("ptq", "htp"))
    assert htp.shape == (1, 1, 480, 640) and np.isfinite(htp).all()
    # The tiny model's output step is 1/255: the HTP requantizes in its own arithmetic, a few steps off.
    assert np.abs(cpu - htp).max() < 0.05 and htp.std() > 0
    results = json.loads((out / "manifest.json").read_text())["results"]
    assert [s["kind"] for s in results["sources"]] == ["ptq", "htp"] and results["difference"] is True


def _refused(capsys, *args) -> str:
    assert _predict(*args) == 2
    err = capsys.readouterr().err
    assert "fix:" in err
    return err


def test_unreadable_or_truncated_image_is_refused(tiny, photos, tmp_path, capsys):
    data = sorted(photos.glob("*.jpg"))[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])
    assert "cut.jpg" in _refused(capsys, tmp_path / "cut.jpg", "--onnx", tiny["onnx"], "--out", tmp_path / "o1")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    assert "junk.png" in _refused(capsys, tmp_path / "junk.png", "--onnx", tiny["onnx"], "--out", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unsupported_video_codec_is_refused(tiny, tmp_path, capsys):
    """An AVI whose codec tag no FFmpeg decoder knows (an MPEG-4 stream relabelled)."""
    import av

    path = tmp_path / "clip.avi"
    container = av.open(os.fspath(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for _ in range(3):
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = path.read_bytes()
    assert b"FMP4" in data
    (tmp_path / "odd.avi").write_bytes(data.replace(b"FMP4", b"QZ9X"))
    err = _refused(capsys, tmp_path / "odd.avi", "--onnx", tiny["onnx"], "--out", tmp_path / "o")
    assert "codec" in err and "libx264" in err


def test_empty_folder_and_empty_glob_are_refused(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    assert "holds no JPG/PNG" in _refused(capsys, tmp_path / "empty", "--onnx", tiny["onnx"])
    assert "matches no photo" in _refused(capsys, tmp_path / "empty" / "*.jpg", "--onnx", tiny["onnx"])


def test_sources_of_different_models_are_refused(tiny, photos, tmp_path, capsys):
    other = _tiny_onnx(tmp_path / "other" / "model.onnx", model="other", seed=1)
    err = _refused(capsys, photos, "--onnx", tiny["onnx"], "--onnx", other, "--out", tmp_path / "o")
    assert "different models" in err and "other" in err
    err = _refused(capsys, photos, "--ptq", tiny["ptq"], "--model", "fastdepth", "--weights", "None",
                   "--out", tmp_path / "o")
    assert "fastdepth" in err and "tiny" in err


def test_out_inside_an_input_is_refused(tiny, photos, tmp_path, capsys):
    copy = tmp_path / "mine"
    shutil.copytree(photos, copy)
    err = _refused(capsys, copy, "--onnx", tiny["onnx"], "--out", copy / "depth")
    assert "lies inside" in err
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in photos.iterdir())


def test_htp_without_onnxruntime_qnn_names_the_install(tiny, photos, tmp_path, capsys, monkeypatch):
    """Where onnxruntime-qnn cannot be imported, --htp exits 2 with the install command."""
    import builtins

    real_import = builtins.__import__

    def no_qnn(name, *args, **kwargs):
        if name == "onnxruntime_qnn":
            raise ImportError("No module named 'onnxruntime_qnn'")
        return real_import(name, *args, **kwargs)

    from lpcv_depth.backends import qnn

    monkeypatch.setattr(qnn, "_REGISTERED", {})
    monkeypatch.setattr(builtins, "__import__", no_qnn)
    err = _refused(capsys, sorted(photos.glob("*.jpg"))[0], "--htp", tiny["ptq"], "--out", tmp_path / "o")
    assert '.[qnn]' in err


def test_torch_source_is_the_wrapped_model_on_the_prepared_input(photos, fastdepth_tflite, tmp_path):
    """--model with FastDepth's real weights: the .npy is create_model's output on the prepared photo."""
    import torch

    from lpcv_depth.images import load_contract_image
    from lpcv_depth.models import create_model

    photo = photos / "portrait.jpg"
    out = tmp_path / "torch"
    assert _predict(photo, "--model", "fastdepth", "--weights", fastdepth_tflite, "--save-npy", "--threads", "1",
                    "--out", out) == 0
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1: the same summation order, the same float32 result
    try:
        with torch.no_grad():
            expected = create_model("fastdepth", weights=str(fastdepth_tflite))(
                torch.from_numpy(load_contract_image(photo)[None])).numpy()
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(np.load(out / "npy" / "model" / "portrait.npy"), expected)
    assert json.loads((out / "manifest.json").read_text())["results"]["sources"][0]["model"] == "fastdepth"


def test_a_video_without_the_video_extra_names_the_install(tiny, tmp_path, capsys, monkeypatch):
    import builtins

    video = _write_video(tmp_path / "clip.mp4", 2)
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    assert "pip install -e '.[video]'" in _refused(capsys, video, "--onnx", tiny["onnx"], "--out", tmp_path / "o")


def test_a_glob_writes_under_the_workspace_build_folder(tiny, photos, tmp_path, monkeypatch):
    """Without --out: build/predict/<name> of the workspace, <name> from the first INPUT (a glob: its folder)."""
    from lpcv_depth.workspace import ENV_VAR

    workspace = tmp_path / "ws"
    workspace.mkdir()
    monkeypatch.setenv(ENV_VAR, os.fspath(workspace))  # --workspace would set it for the rest of the session
    assert _predict(photos / "*.jpg", "--onnx", tiny["onnx"]) == 0
    out = workspace / "build" / "predict" / photos.name
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(p.stem for p in photos.glob("*.jpg"))
    assert _predict(photos / "portrait.jpg", "--onnx", tiny["onnx"], "--name", "mine") == 0
    assert (workspace / "build" / "predict" / "mine" / "portrait.png").is_file()
