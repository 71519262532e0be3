from __future__ import annotations

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
