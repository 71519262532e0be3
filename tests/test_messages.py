"""What the user reads when something is wrong: every refusal exits 2 with a `fix:` line, and each
message says what is true of the input (issue 25, defect 7)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lpcv_depth.cli import main
from lpcv_depth.errors import OutputDirError, WeightsError
from lpcv_depth.models.weights import load_torch_checkpoint
from lpcv_depth.results import EvaluateGroup
from tests.conftest import REPO_ROOT


def _fix_lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.strip().startswith("fix:")]


@pytest.mark.parametrize("argv, fix", [
    (["export", "--batch", "0"], "pass --batch 1"),
    (["ptq", "--percentile", "150"], "pass --percentile above 50 and at most 100"),
    (["evaluate", "--model", "fastdepth", "--holes-warning", "-3"], "between 0 and 1"),
])
def test_out_of_range_values_say_which_range_is_valid(argv, fix, rgbd_dir, capsys):
    if argv[0] == "evaluate":
        argv = [*argv, "--data", str(rgbd_dir)]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"{argv[0]}: error: ")
    [line] = _fix_lines(err)
    assert fix in line


def test_a_config_error_without_its_own_hint_points_at_the_stage_help(capsys):
    # ParityThresholds refuses a zero bound without a hint of its own.
    status = main(["export", "--model", "fastdepth", "--weights", "None", "--max-abs-diff", "0"])
    err = capsys.readouterr().err
    assert status == 2 and "max_abs_diff must be > 0" in err
    assert _fix_lines(err) == ["fix: see lpcv-depth export --help for the values each option takes"]


@pytest.mark.parametrize("argv, prog", [
    (["export", "--no-such-flag"], "lpcv-depth export"),
    (["export", "--batch", "x"], "lpcv-depth export"),
    (["export", "--batch"], "lpcv-depth export"),
    (["evaluate", "--model", "fastdepth"], "lpcv-depth evaluate"),  # --data is required
    ([], "lpcv-depth"),
    (["--no-such-flag"], "lpcv-depth"),
])
def test_argparse_errors_exit_2_with_a_fix_line(argv, prog, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"{prog}: error: " in err
    assert _fix_lines(err) == [f"fix: see {prog} --help"]


def test_a_repo_script_names_itself_in_the_fix_line():
    script = REPO_ROOT / "export" / "to_onnx.py"
    done = subprocess.run([sys.executable, str(script), "--batch", "x"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "invalid int value: 'x'" in done.stderr
    assert _fix_lines(done.stderr) == ["fix: see python export/to_onnx.py --help"]


def test_random_bytes_are_not_a_checkpoint_rather_than_python_objects(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    rng = np.random.default_rng(1)
    for _ in range(32):
        weights.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(WeightsError) as excinfo:
            load_torch_checkpoint(weights)
        assert "is not a PyTorch checkpoint" in str(excinfo.value)
        assert "Python objects" not in str(excinfo.value) and "fix:" in str(excinfo.value)
    status = main(["export", "--model", "depth_anything_v2_vits", "--weights", str(weights),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "is not a PyTorch checkpoint" in err and "corrupt, truncated" in err
    assert len(_fix_lines(err)) == 1 and not (tmp_path / "out").exists()


def test_a_checkpoint_with_pickled_objects_is_still_named_so(tmp_path):
    import torch

    for zipped in (True, False):
        path = tmp_path / f"objects-{zipped}.pth"
        torch.save({"a": Path("x")}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(WeightsError, match="holds Python objects besides tensors"):
            load_torch_checkpoint(path)


def _holey_group(ceiling: float) -> EvaluateGroup:
    return EvaluateGroup(frames=20, scored=20, skipped=0, metrics={}, mean_points=1000.0, invalid_share=0.36,
                         ceiling_fscore=ceiling)


def test_the_holes_warning_says_bounded_only_where_the_ceiling_shows_it():
    from lpcv_depth.stages.evaluate import hole_warnings

    def warning(median: str, ceiling: float) -> str:
        [text] = hole_warnings({"hololens": _holey_group(ceiling)}, SimpleNamespace(holes_warning=0.1, median=median))
        assert text.startswith("set hololens: 36% of GT pixels are invalid; ")
        return text

    # --median valid: a perfect dense prediction reaches 100, so the holes bound nothing.
    valid = warning("valid", 100.0)
    assert "bounded" not in valid
    assert "only the 64% of pixels with valid ground truth" in valid and "F@0.1 100.0" in valid
    assert "--median all" in valid
    # --median all: the ceiling is below 100 and the holes do bound the scores.
    official = warning("all", 59.7)
    assert "F@0.1 59.7 under --median all" in official and "bounded by its holes" in official
    assert "--median valid scores against the valid pixels only" in official
    # A low ceiling bounds the scores under either mode.
    assert "bounded by its holes" in warning("valid", 80.0)


@pytest.fixture()
def three_photos(tmp_path, calibration_dir) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(calibration_dir.glob("*.jpg"))[:3]:
        shutil.copy(source, photos)
    return photos


def test_export_out_inside_the_check_images_is_refused(three_photos, capsys):
    from lpcv_depth.stages.export import ExportConfig, run_export

    before = sorted(p.name for p in three_photos.iterdir())
    for out, relation in ((three_photos / "out", "lies inside"), (three_photos, "is")):
        with pytest.raises(OutputDirError, match=f"{relation} this run's input"):
            run_export(ExportConfig(model="fastdepth", weights=None, check_images=three_photos, out=out,
                                    num_check_images=1))
    assert sorted(p.name for p in three_photos.iterdir()) == before
    status = main(["export", "--model", "fastdepth", "--weights", "None", "--check-images", str(three_photos),
                   "--out", str(three_photos / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "lies inside this run's input" in err and len(_fix_lines(err)) == 1


def test_export_ends_without_nanobind_leak_lines(three_photos, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lpcv_depth.cli", "export", "--model", "fastdepth", "--weights",
                           "None", "--check-images", str(three_photos), "--num-check-images", "1",
                           "--out", str(tmp_path / "export")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert "leaked" not in done.stderr and "nanobind" not in done.stderr, done.stderr
