"""`lpcv-depth run`: the whole pipeline, skipping what is up to date and redoing what changed."""

from __future__ import annotations

import json
import shutil

import pytest

from lpcv_depth import cli
from lpcv_depth.errors import ExitCode

# Keeps the PTQ quick (as the conftest's PTQ fixture does): few held-out images, no CLE.
PTQ_ARGS = "--holdout 4 --min-calib 8 --no-cle --latency-runs 1"


def _statuses(out) -> dict[str, str]:
    lines = (out / "summary.md").read_text().splitlines()
    rows = [line.split("|")[1:3] for line in lines if line.startswith("| ") and not line.startswith("| stage")]
    return {stage.strip(): status.strip().split(" (")[0] for stage, status in rows}


def test_run_skips_up_to_date_stages_and_redoes_what_changed(tmp_path, fastdepth_tflite, calib_subset, capsys):
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    calib = tmp_path / "calib"
    shutil.copytree(calib_subset, calib)
    out = tmp_path / "run"
    argv = ["run", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib),
            "--htp-check", "off", "--hub", "off", f"--ptq-args={PTQ_ARGS}", "--out", str(out)]

    assert cli.main(argv) == ExitCode.OK
    first = capsys.readouterr().out
    assert _statuses(out) == {"export": "ran", "ptq": "ran", "htp-check": "skipped", "hub": "skipped",
                              "compare": "ran"}
    for stage in ("export", "ptq", "compare"):
        assert f"run: [{('export', 'ptq', 'htp-check', 'hub', 'compare').index(stage) + 1}/5] {stage} ok" in first
    assert "htp-check skipped: --htp-check off" in first
    assert (out / "ptq-w8a8" / "manifest.json").is_file() and (out / "compare" / "compare.md").is_file()
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert set(state) == {"export", "ptq", "compare"}

    assert cli.main(argv) == ExitCode.OK
    second = capsys.readouterr().out
    assert _statuses(out) == {"export": "up to date", "ptq": "up to date", "htp-check": "skipped",
                              "hub": "skipped", "compare": "up to date"}
    assert "ptq: calibrating" not in second and "export: torch.onnx.export" not in second

    # A calibration photo changes (not one the export checks): ptq and what follows are redone.
    last = sorted(calib.glob("*.jpg"))[-1]
    shutil.copy(sorted(calib.glob("*.jpg"))[0], last)
    assert cli.main(argv) == ExitCode.OK
    capsys.readouterr()
    assert _statuses(out) == {"export": "up to date", "ptq": "ran", "htp-check": "skipped", "hub": "skipped",
                              "compare": "ran"}

    # --force redoes one stage even though nothing changed.
    assert cli.main([*argv, "--force", "compare"]) == ExitCode.OK
    capsys.readouterr()
    assert _statuses(out) == {"export": "up to date", "ptq": "up to date", "htp-check": "skipped",
                              "hub": "skipped", "compare": "ran"}

    # A stage output changed by hand is not up to date any more.
    (out / "compare" / "compare.md").write_text("edited")
    assert cli.main(argv) == ExitCode.OK
    capsys.readouterr()
    assert _statuses(out)["compare"] == "ran" and _statuses(out)["ptq"] == "up to date"


def test_run_refuses_wired_options_and_a_missing_calibration_folder(tmp_path, capsys):
    base = ["run", "--model", "fastdepth", "--weights", "None", "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--calib", str(tmp_path / "nope")]) == ExitCode.ERROR
    assert "--calib folder not found" in capsys.readouterr().err
    calib = tmp_path / "calib"
    calib.mkdir()
    assert cli.main([*base, "--calib", str(calib), "--htp-check", "off", "--hub", "off",
                     "--export-args=--out elsewhere"]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "--export-args sets --out" in err and "fix:" in err
    assert cli.main([*base, "--calib", str(calib), "--ptq-args=--no-such-flag"]) == ExitCode.ERROR
    assert "--ptq-args" in capsys.readouterr().err
