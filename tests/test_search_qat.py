"""`lpcv-depth search --qat`: the plan (qat between ptq and every int8 step of a trial), the refusals,
the 4-bit presets, the report; and (slow) one FastDepth trial end to end in this process (no Ray, no
HTP, no hub) with its reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpcv_depth import cli
from lpcv_depth.errors import ConfigError, ExitCode
from lpcv_depth.results import SearchResults, SearchTrial
from lpcv_depth.cache import read_records
from lpcv_depth.runner import check_steps, step_is_current
from lpcv_depth.schema import from_json
from lpcv_depth.stages.search import SearchConfig, plan_trials, up_to_date
from lpcv_depth.stages.search_report import rebuild_commands, report_markdown
from tests.test_search import PTQ_ARGS

# One epoch over 4 photos, as test_qat's SHORT_RUN: enough to run every step of the stage.
QAT_ARGS = "--epochs 1 --num-train 4 --batch-size 2 --lr 1e-4"


def _config(calib: Path, data: Path, **options) -> SearchConfig:
    return SearchConfig(**{"model": "fastdepth", "weights": "None", "calib": calib, "eval_data": data, **options})


def _steps(trial) -> dict:
    return {step.name: step for step in [*trial.local.steps, *(trial.hub.steps if trial.hub else ())]}


def test_qat_is_chained_between_ptq_and_every_int8_step_of_a_trial(calib_subset, rgbd_dir, tmp_path):
    data = rgbd_dir / "kinect_home"
    config = _config(calib_subset, data, preset=("w8a8", "w8a16"), qat=True, qat_args="--epochs 2")
    trials = plan_trials(config, tmp_path, htp=True, hub=True)
    for trial in trials:
        assert [step.name for step in trial.local.steps] == ["ptq", "qat", "eval-int8", "htp-check"]
        steps = _steps(trial)
        check_steps(steps.values())
        ptq, qat = steps["ptq"], steps["qat"]
        assert trial.int8_step is qat and qat.folder == trial.local.folder / "qat"
        assert qat.config.ptq == ptq.folder and qat.config.epochs == 2 and qat.upstream == {"ptq": ptq.folder}
        assert steps["eval-int8"].config.onnx == qat.folder / "model_qdq.onnx"
        assert steps["htp-check"].config.ptq == steps["hub"].config.artifact == qat.folder
        for name in ("eval-int8", "htp-check", "hub"):
            assert steps[name].upstream == {"qat": qat.folder}  # redone whenever qat is
        assert ptq.config.preset == trial.preset
        commands = rebuild_commands(config, trial)
        assert [command.split()[1] for command in commands] == ["export", "evaluate", "ptq", "qat", "evaluate",
                                                                 "htp-check", "hub"]
        assert "--epochs 2" in commands[3] and f"{trial.name}/ptq" in commands[3]

    without = plan_trials(_config(calib_subset, data), tmp_path, htp=True, hub=True)[0]
    steps = _steps(without)
    assert "qat" not in steps and without.int8_step is steps["ptq"]
    assert steps["eval-int8"].config.onnx == steps["ptq"].folder / "model_qdq.onnx"
    assert steps["htp-check"].config.ptq == steps["hub"].config.artifact == steps["ptq"].folder


def test_qat_args_without_qat_or_setting_what_search_wires_are_refused(calib_subset, rgbd_dir, tmp_path, capsys):
    data = rgbd_dir / "kinect_home"
    with pytest.raises(ConfigError, match="--qat-args given without --qat"):
        _config(calib_subset, data, qat_args="--epochs 2")
    with pytest.raises(ConfigError, match="lpcv-depth qat has no option --bogus"):
        _config(calib_subset, data, qat=True, qat_args="--bogus 1")
    trial = plan_trials(_config(calib_subset, data, qat=True, qat_args="--ptq elsewhere"), tmp_path, htp=False,
                        hub=False)[0]
    with pytest.raises(ConfigError, match="wires itself"):
        check_steps(trial.local.steps)

    out = tmp_path / "out"
    argv = ["search", "--model", "fastdepth", "--weights", "None", "--calib", str(calib_subset), "--eval-data",
            str(data), "--ray-address", "none", "--out", str(out)]
    assert cli.main([*argv, "--qat-args", "--epochs 2"]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "--qat-args given without --qat" in err and "fix: add --qat" in err
    assert cli.main([*argv, "--qat", "--qat-args", "--ptq elsewhere"]) == ExitCode.ERROR
    assert "--qat-args sets --ptq" in capsys.readouterr().err
    assert not out.exists()


def test_the_4bit_presets_are_searched_with_and_without_qat(calib_subset, rgbd_dir, tmp_path):
    for qat in (False, True):
        config = _config(calib_subset, rgbd_dir / "kinect_home", preset=("w4a8", "w4a16", "w8a8"), qat=qat)
        trials = plan_trials(config, tmp_path, htp=False, hub=False)
        assert [t.name for t in trials] == ["224x224-w4a8", "224x224-w4a16", "224x224-w8a8"]
        for trial in trials:
            check_steps(trial.local.steps)
            assert _steps(trial)["ptq"].config.preset == trial.preset
            assert trial.int8_step.stage == ("qat" if qat else "ptq")


def test_the_report_says_which_trials_figures_are_qats():
    common = dict(input_size="224x224", preset="w8a8", calibration_scheme="min-max", output_tail_bits=16,
                  status="done", fscore_fp32=62.0, gmacs=0.37, htp_full=True)
    rows = [SearchTrial(trial="a", fscore_int8=62.5, sqnr_db=31.0, int8_stage="qat", ptq_sqnr_db=28.1, **common)]
    results = SearchResults(model="fastdepth", grid={}, budget_ms=33.3, axis="gmacs", chosen="a", trials=rows)
    report = report_markdown(results, "why", [], Path("out"))
    assert "int8 F-score after qat 62.50" in report
    header, _, row = report.split("## Trials")[1].strip().splitlines()[:3]
    assert "| int8 from | ptq SQNR dB |" in header and "| qat | 28.1 |" in row
    plain = SearchResults(model="fastdepth", grid={}, budget_ms=33.3, axis="gmacs", chosen="a",
                          trials=[SearchTrial(trial="a", fscore_int8=62.5, **common)])
    assert "int8 from" not in report_markdown(plain, "why", [], Path("out"))


# A trial's ptq and qat on the real FastDepth take minutes on 2 cores: behind the slow marker, while
# the plan-level tests above run by default.
@pytest.fixture(scope="module")
def searched_with_qat(tmp_path_factory, fastdepth_tflite, calib_subset, rgbd_dir):
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    out = tmp_path_factory.mktemp("search-qat") / "out"
    argv = ["search", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--input-size", "224x224",
            "--calib", str(calib_subset), "--eval-data", str(rgbd_dir / "kinect_home"), f"--ptq-args={PTQ_ARGS}",
            "--qat", f"--qat-args={QAT_ARGS}", "--ray-address", "none", "--htp-check", "off", "--hub", "off",
            "--out", str(out)]
    status = cli.main(argv)
    return {"out": out, "argv": argv, "status": status}


def _results(out: Path) -> SearchResults:
    return from_json(SearchResults, json.loads((out / "results.json").read_text()), where="results.json")


@pytest.mark.slow
def test_a_search_with_qat_scores_the_qat_model(searched_with_qat):
    from lpcv_depth.device import resolve_device
    from lpcv_depth.manifest import Manifest
    from lpcv_depth.results import EvaluateResults, QatResults

    out = searched_with_qat["out"]
    assert searched_with_qat["status"] == ExitCode.OK
    [row] = _results(out).trials
    assert row.status == "done" and row.int8_stage == "qat"
    trial = out / "trials" / row.trial
    assert row.qat_dir == str(trial / "qat") and row.ptq_dir == str(trial / "ptq")
    qat = Manifest.read(trial / "qat", stage="qat").results_as(QatResults)
    assert qat.training.epochs_done == 1 and qat.ptq_int8_vs_fp32 is not None
    assert qat.training.device == resolve_device("auto")  # --device auto in a trial: the GPU where there is one
    assert row.sqnr_db == qat.int8_vs_fp32.sqnr_db and row.ptq_sqnr_db == qat.ptq_int8_vs_fp32.sqnr_db
    evaluated = Manifest.read(trial / "eval-int8", stage="evaluate")
    assert evaluated.config["onnx"] == str(trial / "qat" / "model_qdq.onnx")
    assert row.fscore_int8 == evaluated.results_as(EvaluateResults).overall.metrics["fscore@0.1"]
    table = (out / "report.md").read_text().split("## Trials")[1]
    assert "| int8 from | ptq SQNR dB |" in table and "| qat |" in table
    assert json.loads((out / "manifest.json").read_text())["config"]["qat_args"] == QAT_ARGS


@pytest.mark.slow
def test_a_rerun_reuses_the_qat_and_changed_qat_args_or_force_redo_it(searched_with_qat, fastdepth_tflite,
                                                                      calib_subset, rgbd_dir, capsys):
    out, argv = searched_with_qat["out"], searched_with_qat["argv"]
    capsys.readouterr()
    assert cli.main(argv) == ExitCode.OK
    assert "] reused 224x224-w8a8" in capsys.readouterr().out
    [row] = _results(out).trials
    assert row.reused and row.int8_stage == "qat"

    def trial(**changes):  # the fixture's search as a config, planned without running it
        options = dict(weights=str(fastdepth_tflite), input_size=((224, 224),), ptq_args=PTQ_ARGS, qat=True,
                       qat_args=QAT_ARGS, ray_address="none", htp_check="off", hub="off", out=out)
        config = _config(calib_subset, rgbd_dir / "kinect_home", **(options | changes))
        return plan_trials(config, out, htp=False, hub=False)[0]

    assert up_to_date(trial().local)
    assert not up_to_date(trial(force=True).local)
    changed = trial(qat_args=QAT_ARGS.replace("--lr 1e-4", "--lr 2e-4"))
    records = read_records(changed.local.state_file)
    steps = _steps(changed)
    assert step_is_current(steps["ptq"], records) and not step_is_current(steps["qat"], records)
    assert not up_to_date(changed.local)
