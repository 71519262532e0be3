from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def calibration_dir() -> Path:
    return shared_path("data", "calibration_indoor")


@pytest.fixture(scope="session")
def rgbd_dir() -> Path:
    return shared_path("data", "rgbd")


@pytest.fixture(scope="session")
def fastdepth_tflite() -> Path:
    return shared_path("weights", "fastdepth", "fast_depth_224.tflite")


@pytest.fixture(scope="session")
def fastdepth_export(tmp_path_factory, fastdepth_tflite, calibration_dir) -> Path:
    """The real FastDepth exported once per test run (PTQ and the HTP check build on it)."""
    from lpcv_depth.stages.export import ExportConfig, run_export

    out = tmp_path_factory.mktemp("fd") / "export"
    run_export(ExportConfig(model="fastdepth", weights=str(fastdepth_tflite), out=out,
                             check_images=calibration_dir, num_check_images=2))
    return out


@pytest.fixture(scope="session")
def calib_subset(tmp_path_factory, calibration_dir) -> Path:
    # Every 6th frame of the walk-through: 16 consecutive frames see too narrow a range of depths
    # (measured: 8 dB SQNR and a 6-point F-score drop vs 28 dB with spread-out frames).
    folder = tmp_path_factory.mktemp("calib")
    for path in sorted(calibration_dir.glob("*.jpg"))[::6][:20]:
        shutil.copy(path, folder / path.name)
    return folder


def fastdepth_ptq_config(fp32: Path, calib: Path, out: Path, **overrides):
    """PTQ settings that keep the default suite quick: 16 calibration + 4 held-out images, no CLE; on
    the CPU, where the suite's figures and bit-for-bit comparisons were measured (auto would take a GPU)."""
    from lpcv_depth.stages.ptq import PtqConfig

    options = dict(calib=calib, fp32=fp32, holdout=4, min_calib=8, cle=False, latency_runs=2, device="cpu", out=out)
    options.update(overrides)
    return PtqConfig(**options)


@pytest.fixture(scope="session")
def fastdepth_w8a8(fastdepth_export, calib_subset, tmp_path_factory, rgbd_dir):
    """FastDepth w8a8 through AIMET once per test run, scored on one RGB-D set."""
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    from lpcv_depth.stages.ptq import run_ptq

    out = tmp_path_factory.mktemp("ptq") / "w8a8"
    return run_ptq(fastdepth_ptq_config(fastdepth_export, calib_subset, out, eval_data=rgbd_dir / "kinect_home"))


@pytest.fixture(scope="session")
def fastdepth_w4a8(fastdepth_export, calib_subset, tmp_path_factory):
    """FastDepth w4a8 through AIMET once per test run, shared by the PTQ and HTP checks of 4-bit weights."""
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    from lpcv_depth.stages.ptq import run_ptq

    out = tmp_path_factory.mktemp("ptq") / "w4a8"
    return run_ptq(fastdepth_ptq_config(fastdepth_export, calib_subset, out, preset="w4a8", latency_runs=0))
