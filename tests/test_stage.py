"""Output safety shared by every stage: StagingDir, manifests, signals."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpcv_depth.errors import ExitCode, OutputDirError
from lpcv_depth.manifest import ArtifactMismatchError, Manifest, write_manifest
from lpcv_depth.stage import StagingDir, remove_stale_partials
from tests.conftest import REPO_ROOT


def _finish(staging: StagingDir, stage: str = "export", name: str = "model.onnx") -> None:
    (staging / name).write_text("artifact")
    write_manifest(staging.path, stage=stage, config={}, inputs={}, outputs=[staging / name], timings={},
                   results={})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_out_equal_to_an_input_is_refused_and_the_input_survives(tmp_path):
    model_dir = tmp_path / "export"
    with StagingDir(model_dir, stage="export") as staging:
        _finish(staging)
    for out in (model_dir, model_dir / "inner", tmp_path):
        with pytest.raises(OutputDirError, match="this run's input") as excinfo:
            with StagingDir(out, stage="ptq", inputs=[model_dir]):
                pass
        assert str(model_dir) in str(excinfo.value) and "fix:" in str(excinfo.value)
    assert (model_dir / "model.onnx").read_text() == "artifact"


def test_only_an_output_of_the_same_stage_is_replaced(tmp_path):
    folder = tmp_path / "out"
    with StagingDir(folder, stage="export") as staging:
        _finish(staging)
    with pytest.raises(OutputDirError, match="holds a 'export' stage output, not an earlier 'evaluate' run"):
        with StagingDir(folder, stage="evaluate"):
            pass
    assert (folder / "model.onnx").is_file()
    with StagingDir(folder, stage="export") as staging:
        _finish(staging, name="other.onnx")
    assert not (folder / "model.onnx").exists() and (folder / "other.onnx").is_file()


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    final = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".out.partial-{dead}", tmp_path / f".out.scratch-{dead}"]
    kept = [tmp_path / f".out.partial-{alive}", tmp_path / f".other.partial-{dead}"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "big.bin").write_bytes(b"x" * 100)
    with StagingDir(final, stage="export") as staging:
        _finish(staging)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert remove_stale_partials(final) == []


def test_failed_final_rename_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    final = tmp_path / "out"
    real_replace = os.replace

    def refuse(src, dst):
        if Path(dst) == final.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputDirError, match="cannot move the finished output") as excinfo:
        with StagingDir(final, stage="export") as staging:
            _finish(staging)
    assert "fix:" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writer_retry_once(tmp_path, monkeypatch):
    final = tmp_path / "out"
    real_replace = os.replace
    calls = {"n": 0}

    def busy_once(src, dst):
        if Path(dst) == final.resolve() and ".partial-" in str(src) and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy_once)
    with StagingDir(final, stage="export") as staging:
        _finish(staging)
    assert (final / "model.onnx").is_file() and calls["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_manifest_read_refuses_a_changed_output(tmp_path):
    folder = tmp_path / "export"
    with StagingDir(folder, stage="export") as staging:
        _finish(staging)
    assert Manifest.read(folder, stage="export").output_sha256("model.onnx")
    (folder / "model.onnx").write_text("another model")
    with pytest.raises(ArtifactMismatchError, match="sha256 differs"):
        Manifest.read(folder, stage="export")
    (folder / "model.onnx").unlink()
    with pytest.raises(ArtifactMismatchError, match="missing"):
        Manifest.read(folder, stage="export")


def test_manifest_is_valid_json_without_nan(tmp_path):
    with StagingDir(tmp_path / "o", stage="evaluate") as staging:
        (staging / "a.txt").write_text("a")
        write_manifest(staging.path, stage="evaluate", config={}, inputs={}, outputs=[staging / "a.txt"],
                       timings={}, results={"fscore": float("nan"), "ok": float("inf")})
    data = json.loads((tmp_path / "o" / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["results"] == {"fscore": None, "ok": None}


def test_sigterm_exits_143_and_leaves_nothing(tmp_path, fastdepth_tflite):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "export/to_onnx.py", "--model", "fastdepth", "--weights",
                             str(fastdepth_tflite), "--out", str(out)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.TERMINATED, err
    assert "terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_first_line_names_the_running_source_tree_and_a_foreign_script_warns(tmp_path, fastdepth_tflite):
    import lpcv_depth

    package = Path(lpcv_depth.__file__).resolve().parent
    here = subprocess.run([sys.executable, "export/to_onnx.py", "--model", "nope"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "WARNING" not in here.stderr
    other = tmp_path / "other-clone"
    (other / "export").mkdir(parents=True)
    (other / "export" / "to_onnx.py").write_text((REPO_ROOT / "export" / "to_onnx.py").read_text())
    proc = subprocess.run([sys.executable, "export/to_onnx.py", "--model", "fastdepth", "--weights",
                           str(fastdepth_tflite), "--num-check-images", "1"], cwd=other,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"runs the lpcv_depth installed from {package}" in proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"export: lpcv-depth {lpcv_depth.__version__} from {package}")
    manifest = json.loads((other / "build/fastdepth/export/manifest.json").read_text())
    assert manifest["source"]["path"] == str(package)


def test_error_texts_are_clean(tmp_path):
    import torch

    from lpcv_depth.errors import UnknownModelError, WeightsError
    from lpcv_depth.models import get_spec
    from lpcv_depth.models.weights import load_torch_checkpoint

    with pytest.raises(UnknownModelError) as excinfo:
        get_spec("nope")
    assert str(excinfo.value).startswith("unknown model 'nope'")
    path = tmp_path / "pickled.pth"
    torch.save({"a": Path("x")}, path)
    with pytest.raises(WeightsError) as excinfo:
        load_torch_checkpoint(path)
    assert "weights_only" not in str(excinfo.value) and "fix:" in str(excinfo.value)


def test_a_missing_fp32_model_is_a_clear_error_not_a_traceback(fastdepth_export, calib_subset, tmp_path, capsys):
    from lpcv_depth import cli

    broken = tmp_path / "export"
    shutil.copytree(fastdepth_export, broken)
    (broken / "model.onnx").unlink()
    status = cli.main(["ptq", "--calib", str(calib_subset), "--fp32", str(broken), "--out", str(tmp_path / "ptq")])
    err = capsys.readouterr().err
    assert status == ExitCode.ERROR, err
    assert "model.onnx is missing" in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "ptq").exists()


def test_hints_quote_paths_with_spaces():
    from lpcv_depth.stage import command_line

    assert command_line("ptq", "--fp32", "my models/export") == "lpcv-depth ptq --fp32 'my models/export'"


def test_export_checks_out_before_loading_the_model_and_check_images_gets_a_fix(tmp_path):
    from lpcv_depth.errors import ConfigError
    from lpcv_depth.stages.export import ExportConfig, run_export

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # The weights do not exist either: the --out problem must be the one reported, before any loading.
    with pytest.raises(OutputDirError, match="cannot write|not a folder"):
        run_export(ExportConfig(model="fastdepth", weights=str(tmp_path / "missing.tflite"), out=blocker / "sub"))
    with pytest.raises(ConfigError, match="no JPG/PNG images") as excinfo:
        run_export(ExportConfig(model="fastdepth", weights=None, out=tmp_path / "o",
                                check_images=tmp_path / "nonexistent"))
    assert "fix:" in str(excinfo.value)
