"""The project as a user gets it: installed without -e and run from another folder, and a fresh
clone running the design card's commands on the shipped calibration photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _tracked_copy(destination: Path) -> Path:
    """The files a fresh clone has: what git tracks, as in the working tree."""
    files = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """`pip install --no-deps .` (a wheel, not editable) into a scratch target that sees the
    dependencies already installed in this environment."""
    source = _tracked_copy(tmp_path_factory.mktemp("src"))
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("LPCV_DEPTH_WORKSPACE", None)
    return {"target": target, "env": env, "script": target / "bin" / "lpcv-depth", "source": source}


def test_only_lpcv_depth_lands_in_site_packages(installed):
    names = {p.name for p in installed["target"].iterdir()}
    packages = {n for n in names if not n.endswith((".dist-info", ".egg-info")) and n != "bin"}
    assert packages == {"lpcv_depth"}, packages
    assert (installed["target"] / "lpcv_depth" / "models" / "fastdepth.py").is_file()
    assert installed["script"].is_file()


def test_installed_cli_writes_into_the_current_folder(installed, tmp_path, fastdepth_tflite, calibration_dir,
                                                      rgbd_dir):
    elsewhere = tmp_path / "my project"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import lpcv_depth, lpcv_depth.models; "
                            "print(lpcv_depth.__file__); print(lpcv_depth.models.__file__)"],
                           cwd=elsewhere, env=installed["env"], capture_output=True, text=True, check=True)
    assert all(line.startswith(str(installed["target"])) for line in where.stdout.split()), where.stdout

    export = subprocess.run([sys.executable, str(installed["script"]), "export", "--model", "fastdepth",
                             "--weights", str(fastdepth_tflite), "--check-images", str(calibration_dir),
                             "--num-check-images", "2"],
                            cwd=elsewhere, env=installed["env"], capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stdout + export.stderr
    onnx_path = elsewhere / "build" / "fastdepth" / "export" / "model.onnx"
    assert onnx_path.is_file()
    assert "next: lpcv-depth ptq --calib calibration_data --fp32 build/fastdepth/export" in export.stdout
    manifest = json.loads((onnx_path.parent / "manifest.json").read_text())
    assert manifest["source"]["path"].startswith(str(installed["target"]))

    evaluate = subprocess.run([sys.executable, str(installed["script"]), "evaluate", "--onnx", str(onnx_path),
                               "--data", str(rgbd_dir / "tum_desk"), "--num-vis", "0"],
                              cwd=elsewhere, env=installed["env"], capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    summaries = list((elsewhere / "build" / "eval").glob("*/summary.json"))
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["overall"]["scored"] == 2
    # Nothing was written next to the installed code, nor into the checkout.
    assert not (installed["target"] / "build").exists()
    assert not any((installed["target"] / "lpcv_depth").rglob("manifest.json"))


def test_workspace_flag_and_variable_move_the_outputs(installed, tmp_path, fastdepth_tflite, calibration_dir):
    workspace = tmp_path / "ws"
    proc = subprocess.run([sys.executable, str(installed["script"]), "export", "--model", "fastdepth",
                           "--weights", str(fastdepth_tflite), "--check-images", str(calibration_dir),
                           "--num-check-images", "1", "--workspace", str(workspace)],
                          cwd=tmp_path, env=installed["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (workspace / "build" / "fastdepth" / "export" / "model.onnx").is_file()
    assert not (tmp_path / "build").exists()


def test_fresh_clone_runs_the_design_card_commands(tmp_path, fastdepth_tflite):
    """`python export/to_onnx.py` then `python quantize/ptq.py --calib calibration_data` in a
    fresh clone: the shipped photos are the calibration set."""
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    clone = _tracked_copy(tmp_path / "clone")
    shipped = sorted(p.name for p in (clone / "calibration_data").glob("*.jpg"))
    assert 48 <= len(shipped) <= 80
    assert (clone / "calibration_data" / "LICENSE").is_file() and (clone / "calibration_data" / "SOURCE.txt").is_file()
    assert sum(p.stat().st_size for p in (clone / "calibration_data").iterdir()) < 5.5e6

    export = subprocess.run([sys.executable, "export/to_onnx.py", "--model", "fastdepth",
                             "--weights", str(fastdepth_tflite)],
                            cwd=clone, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stdout + export.stderr
    assert "next: python quantize/ptq.py --calib calibration_data --fp32 build/fastdepth/export" in export.stdout
    manifest = json.loads((clone / "build/fastdepth/export/manifest.json").read_text())
    assert manifest["results"]["check_images"]["files"] == shipped[:4]

    ptq = subprocess.run([sys.executable, "quantize/ptq.py", "--calib", "calibration_data",
                          "--fp32", "build/fastdepth/export"],
                         cwd=clone, capture_output=True, text=True, timeout=1200)
    assert ptq.returncode == 0, ptq.stdout[-3000:] + ptq.stderr[-3000:]
    ptq_manifest = json.loads((clone / "build/fastdepth/ptq-w8a8/manifest.json").read_text())
    split = ptq_manifest["inputs"]["calibration"]
    assert len(split["calibration_files"]) + len(split["holdout_files"]) == len(shipped)
    assert ptq_manifest["results"]["int8_vs_fp32"]["sqnr_db"] > 10
