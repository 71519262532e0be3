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


# --- where run meets the user's folders: everything is checked before the first stage -----------------

def _run_argv(tmp_path, fastdepth_tflite, calib, out, *extra) -> list[str]:
    return ["run", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib),
            "--htp-check", "off", "--hub", "off", "--out", str(out), *extra]


def _tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_refuses_a_users_folder_and_leaves_it_as_it_was(tmp_path, fastdepth_tflite, calib_subset, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pipeline.json").write_text("my own pipeline notes\n")
    (mine / "summary.md").write_text("# my summary\n")
    before = _tree(mine)
    assert cli.main(_run_argv(tmp_path, fastdepth_tflite, calib_subset, mine)) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "is not empty and is not an earlier lpcv-depth run" in err and "fix:" in err
    assert _tree(mine) == before

    # A run folder of another model is refused too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "pipeline.json").write_text(json.dumps({"command": "run", "model": "depth_anything_v2_vits",
                                                     "stages": {}}))
    assert cli.main(_run_argv(tmp_path, fastdepth_tflite, calib_subset, other)) == ExitCode.ERROR
    assert "holds a run of depth_anything_v2_vits, not fastdepth" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["calib", "inside calib", "holds calib"])
def test_run_whose_out_is_an_input_writes_nothing(where, tmp_path, fastdepth_tflite, calib_subset, capsys):
    calib = tmp_path / "photos" / "calib"
    shutil.copytree(calib_subset, calib)
    before = _tree(tmp_path / "photos")
    out = {"calib": calib, "inside calib": calib / "run", "holds calib": tmp_path / "photos"}[where]
    assert cli.main(_run_argv(tmp_path, fastdepth_tflite, calib, out)) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "would replace the input" in err and "fix:" in err
    assert _tree(tmp_path / "photos") == before


def test_run_with_a_bad_stage_option_fails_before_the_first_stage(tmp_path, fastdepth_tflite, calib_subset, capsys):
    out = tmp_path / "run"
    for bad, message in (("--num-calib 0", "num_calib must be >= 1"),
                         ("--holdout '4", "cannot be split into arguments"),
                         ("--preset w8a16", "--ptq-args sets --preset")):
        assert cli.main(_run_argv(tmp_path, fastdepth_tflite, calib_subset, out, f"--ptq-args={bad}")) == ExitCode.ERROR
        err = capsys.readouterr().err
        assert message in err and "fix:" in err, err
        assert not out.exists()
    assert cli.main(_run_argv(tmp_path, fastdepth_tflite, calib_subset, out,
                              "--export-args=--batch 0")) == ExitCode.ERROR
    assert "batch must be >= 1" in capsys.readouterr().err and not out.exists()


def test_run_in_a_workspace_it_cannot_write_exits_2_naming_it(tmp_path, fastdepth_tflite, calib_subset, capsys,
                                                                monkeypatch):
    from lpcv_depth import workspace

    monkeypatch.setattr(workspace, "_from_flag", {"value": False})
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    monkeypatch.setenv(workspace.ENV_VAR, str(a_file))
    argv = ["run", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib_subset),
            "--htp-check", "off", "--hub", "off"]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert f"$LPCV_DEPTH_WORKSPACE={a_file}" in err and "is not a folder" in err and "fix:" in err

    # A workspace that cannot be written (read-only for this user; root ignores chmod, so the
    # operating system's answer is given directly).
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setenv(workspace.ENV_VAR, str(read_only))
    real_mkdir = type(read_only).mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if read_only in self.absolute().parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(read_only), "mkdir", refusing_mkdir)
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and "Permission denied" in err
    assert f"from $LPCV_DEPTH_WORKSPACE={read_only}" in err and "fix:" in err
    assert list(read_only.iterdir()) == []

    # --out below a file: the operating system's NotADirectoryError, as exit 2 with a fix.
    monkeypatch.delenv(workspace.ENV_VAR)
    assert cli.main([*argv, "--out", str(a_file / "run")]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and "fix:" in err
