"""The evaluate stage: CLI end to end on the shared RGB-D sets, every source kind, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lpcv_depth.cli import main
from lpcv_depth.manifest import Manifest
from lpcv_depth.results import EvaluateResults
from lpcv_depth.rgbd import load_rgbd_dataset
from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate
from lpcv_depth.track3_metric import FSCORE
from lpcv_depth.workspace import ENV_VAR, build_dir
from tests.conftest import REPO_ROOT
from tests.test_rgbd import make_organizers_set


def save_ground_truth_as_predictions(data: Path, folder: Path, nested: bool = False, distort: bool = False) -> None:
    """A perfect 'model' (each frame's own GT), saved as AI Hub outputs are: <id>.npy, (1,1,480,640).

    distort: warp it with a smooth left-to-right ramp, so that it is no longer perfect.
    """
    for frame in load_rgbd_dataset(data):
        target = folder / frame.set_name if nested else folder
        target.mkdir(parents=True, exist_ok=True)
        depth = frame.load_ground_truth().depth
        if distort:
            depth = depth * np.linspace(0.7, 1.3, depth.shape[1], dtype=np.float32)
        np.save(target / f"{frame.frame_id}.npy", depth[None, None])


def test_cli_end_to_end_with_real_fastdepth(rgbd_dir, fastdepth_tflite, tmp_path):
    out = tmp_path / "eval"
    # --threads 1: torch threads contend on a busy shared machine (measured: docs/evaluate.md).
    proc = subprocess.run([sys.executable, "evaluation/score.py", "--model", "fastdepth", "--weights", "default",
                           "--data", str(rgbd_dir), "--out", str(out), "--threads", "1"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert all(line.startswith("evaluate: ") for line in lines)
    assert lines[-1] == "evaluate: next: python export/to_onnx.py --model fastdepth --weights default"
    assert "28 scored, 0 skipped" in proc.stdout and "frame/s" in proc.stderr  # tqdm on stderr

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"hololens_dev", "iphone_lidar", "kinect_home", "tum_desk"}
    assert summary["overall"]["scored"] == 28 and summary["skipped"] == []
    for group in [summary["overall"], *summary["sets"].values()]:
        assert 30 < group["metrics"][FSCORE] <= 100 and 0 < group["metrics"]["abs_rel"] < 1
    with (out / "frames.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 28 and {row["status"] for row in rows} == {"ok"}
    mean_f = np.mean([float(row[FSCORE]) for row in rows])
    assert mean_f == pytest.approx(summary["overall"]["metrics"][FSCORE], abs=1e-3)
    assert "| **all** | 28 | 28 |" in (out / "summary.md").read_text()
    panels = sorted((out / "vis").glob("*.png"))
    assert len(panels) == 4

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["config"]["grid"] == "official"
    assert manifest["inputs"]["data"]["frames"] == 28 and len(manifest["inputs"]["data"]["sha256"]) == 64
    assert manifest["inputs"]["source"]["weights"]["source"] == "file"
    assert manifest["inputs"]["source"]["sha256"] and manifest["inputs"]["metric"]["scipy"]
    assert manifest["inputs"]["metric"]["K"]["fx"] == 1591.1095 and "torch" in manifest["tool_versions"]
    assert {"discover", "hash-inputs", "load-source", "score", "write"} <= set(manifest["timings_s"])
    assert {o["path"] for o in manifest["outputs"]} >= {"frames.csv", "summary.json", "summary.md",
                                                       *(f"vis/{p.name}" for p in panels)}
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no staging leftovers


def test_cli_on_a_predictions_folder_with_a_perfect_and_a_broken_frame(rgbd_dir, tmp_path, capsys):
    predictions = tmp_path / "aihub_outputs"
    save_ground_truth_as_predictions(rgbd_dir / "tum_desk", predictions)
    (predictions / "desk_2.npy").write_bytes(b"not an npy file")
    out = tmp_path / "out"
    assert main(["evaluate", "--predictions", str(predictions), "--data", str(rgbd_dir / "tum_desk"), "--out", str(out),
                 "--num-vis", "1", "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "1 scored, 1 skipped" in stdout and "WARNING skipped tum_desk/desk_2: cannot read prediction" in stdout
    assert stdout.strip().splitlines()[-1] == f"evaluate: next: cat {os.path.relpath(out / 'summary.md')}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["scored"] == 1 and summary["overall"]["skipped"] == 1
    assert summary["overall"]["metrics"][FSCORE] == 100 and summary["overall"]["metrics"]["abs_rel"] == 0
    [skip] = summary["skipped"]
    assert skip["frame"] == "desk_2" and skip["reason"].startswith("cannot read prediction")
    rows = {row["frame"]: row for row in csv.DictReader((out / "frames.csv").open())}
    assert rows["desk_1"]["status"] == "ok" and rows["desk_2"]["status"].startswith("skipped: ")
    assert "Skipped 1 frame(s)" in (out / "summary.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["source"]["kind"] == "predictions" and manifest["inputs"]["source"]["files"] == 2
    results = Manifest.read(out, stage="evaluate").results_as(EvaluateResults)
    assert results.overall.scored == 1 and results.overall.metrics[FSCORE] == 100
    assert [(s.set, s.frame) for s in results.skipped] == [("tum_desk", "desk_2")]
    assert {k: summary[k] for k in ("overall", "sets", "skipped", "metric_time_s", "median", "warnings",
                                    "out_of_contract")} == manifest["results"]


def test_out_never_replaces_an_input(rgbd_dir, tmp_path, capsys):
    predictions = tmp_path / "aihub_outputs"
    save_ground_truth_as_predictions(rgbd_dir / "tum_desk", predictions)
    before = sorted(p.name for p in predictions.iterdir())
    for out in (predictions, predictions / "eval", rgbd_dir / "tum_desk"):
        code, err = run_main(["--predictions", str(predictions), "--data", str(rgbd_dir / "tum_desk"),
                              "--out", str(out)], capsys)
        assert code == 2 and "this run's input" in err and "--out" in err
    assert sorted(p.name for p in predictions.iterdir()) == before


def test_root_of_sets_with_nested_predictions_missing_and_wrong_shape(rgbd_dir, tmp_path):
    predictions = tmp_path / "predictions"
    save_ground_truth_as_predictions(rgbd_dir, predictions, nested=True)
    for path in (predictions / "hololens_dev").glob("*.npy"):
        path.unlink()
    np.save(predictions / "kinect_home" / "home_2.npy", np.zeros((1, 1, 240, 320), np.float32))
    result = run_evaluate(EvaluateConfig(data=rgbd_dir, predictions=predictions, out=tmp_path / "out", num_vis=0,
                                     max_points=20_000, threads=1))
    sets = result.summary["sets"]
    assert sets["hololens_dev"] == {"frames": 20, "scored": 0, "skipped": 20, "metrics": {}, "mean_points": 0.0,
                                    "invalid_share": None, "ceiling_fscore": None, "out_of_contract": 0}
    assert sets["kinect_home"]["scored"] == 4 and sets["kinect_home"]["skipped"] == 1
    assert sets["tum_desk"]["metrics"][FSCORE] == 100 and sets["iphone_lidar"]["mean_points"] == 20_000
    assert result.results.sets["kinect_home"].skipped == 1 and result.results.overall.frames == 28
    reasons = {item["frame"]: item["reason"] for item in result.summary["skipped"]}
    assert "no prediction file holo_00003.npy" in reasons["holo_00003"]
    assert "shape (1, 1, 240, 320)" in reasons["home_2"]
    assert not (result.out_dir / "vis").exists()


def tiny_onnx(path: Path) -> Path:
    """A contract-shaped 'depth model': the channel mean of the image, plus a floor."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 480, 640])
    depth = helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, 480, 640])
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Add", ["mean", "floor"], ["depth"])]
    graph = helper.make_graph(nodes, "tiny", [image], [depth],
                              initializer=[helper.make_tensor("floor", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_source_on_organizers_layout(tmp_path):
    data = make_organizers_set(tmp_path / "track3")
    onnx_path = tiny_onnx(tmp_path / "tiny.onnx")
    config = EvaluateConfig(data=data, onnx=onnx_path, out=tmp_path / "out", num_vis=2, threads=1)
    result = run_evaluate(config)
    assert result.summary["overall"]["scored"] == 2
    assert 0 <= result.summary["overall"]["metrics"][FSCORE] < 100
    conf_2 = [load_rgbd_dataset(data)[i].load_ground_truth().conf for i in (0, 1)]
    assert result.summary["overall"]["mean_points"] == np.mean([(c == 2).sum() for c in conf_2])
    assert result.manifest["inputs"]["source"]["sha256"] and len(list((result.out_dir / "vis").iterdir())) == 2


def test_default_output_folder_names_the_variant(rgbd_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    onnx_path = tiny_onnx(tmp_path / "model.onnx")
    (tmp_path / "fastdepth" / "export").mkdir(parents=True)
    nested = onnx_path.rename(tmp_path / "fastdepth" / "export" / "model.onnx")
    assert EvaluateConfig(data=rgbd_dir, onnx=nested).destination == build_dir("eval", "fastdepth-export")
    assert build_dir("eval", "fastdepth-export") == Path.cwd() / "build/eval/fastdepth-export"
    config = EvaluateConfig(data=rgbd_dir, model="fastdepth", output="disparity", grid="xy", intrinsics="dataset")
    assert config.destination == Path.cwd() / "build/eval/fastdepth-disparity-grid-xy-K-dataset"
    # The workspace, not the current folder, is where outputs go when one is set.
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "workspace"))
    assert config.destination == tmp_path / "workspace/build/eval/fastdepth-disparity-grid-xy-K-dataset"
    assert EvaluateConfig(data=rgbd_dir, onnx=nested, out=tmp_path / "mine").destination == tmp_path / "mine"


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["evaluate", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one source to score, got 0"),
    (["--model", "fastdepth", "--predictions", "."], "got 2: --model, --predictions"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--onnx", "missing.onnx"], "ONNX file not found"),
    (["--model", "fastdepth", "--num-vis", "-1"], "num_vis must be >= 0"),
])
def test_bad_arguments_exit_2(argv, message, rgbd_dir, capsys):
    code, err = run_main([*argv, "--data", str(rgbd_dir)], capsys)
    assert code == 2 and err.startswith("evaluate: error: ") and message in err


def test_bad_data_exits_2_and_writes_nothing(rgbd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(["--model", "fastdepth", "--data", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "data folder not found" in err
    code, err = run_main(["--model", "fastdepth", "--data", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "no RGB-D set found" in err
    code, err = run_main(["--model", "fastdepth", "--data", str(rgbd_dir), "--intrinsics", "dataset",
                          "--out", str(out)], capsys)
    assert code == 2 and "declare no intrinsics: iphone_lidar" in err and "--intrinsics official" in err
    # Every frame unusable: an error, not an empty report.
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    np.save(predictions / "desk_1.npy", np.ones((3, 3)))
    code, err = run_main(["--predictions", str(predictions), "--data", str(rgbd_dir / "tum_desk"),
                          "--out", str(out)], capsys)
    assert code == 2 and "no frame could be scored (2 skipped)" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]


def test_dataset_intrinsics_and_xy_grid(rgbd_dir, tmp_path):
    predictions = tmp_path / "predictions"
    save_ground_truth_as_predictions(rgbd_dir / "tum_desk", predictions, distort=True)
    (predictions / "desk_2.npy").unlink()
    scores = {}
    for grid in ("official", "xy"):
        for intrinsics in ("official", "dataset"):
            result = run_evaluate(EvaluateConfig(data=rgbd_dir / "tum_desk", predictions=predictions, grid=grid,
                                             intrinsics=intrinsics, out=tmp_path / f"{grid}-{intrinsics}",
                                             num_vis=0, threads=1))
            assert result.manifest["config"]["grid"] == grid and result.manifest["config"]["intrinsics"] == intrinsics
            scores[grid, intrinsics] = result.summary["overall"]["metrics"][FSCORE]
    assert len(set(scores.values())) == 4 and all(0 < score < 100 for score in scores.values())


def test_docs_flag_table_matches_the_config():
    from lpcv_depth.options import cli_fields, flag_name

    text = (REPO_ROOT / "docs" / "evaluate.md").read_text()
    table = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `--")}
    assert {flag_name(field.name) for field, _ in cli_fields(EvaluateConfig)} | {"--workspace"} == table


@pytest.mark.parametrize("kind,reason", [("zeros", "constant map"), ("negative", "values outside [0, 1]"),
                                         ("mixed", "values outside [0, 1]")])
def test_out_of_contract_predictions_are_reported_and_gated(kind, reason, rgbd_dir, tmp_path):
    from lpcv_depth.errors import GateError

    predictions = tmp_path / "pred"
    predictions.mkdir()
    ramp = np.linspace(0.1, 1.0, 480 * 640, dtype=np.float32).reshape(1, 1, 480, 640)
    maps = {"zeros": np.zeros_like(ramp), "negative": -ramp, "mixed": ramp - 0.5}
    for frame in ("desk_1", "desk_2"):
        np.save(predictions / f"{frame}.npy", maps[kind])
    data = rgbd_dir / "tum_desk"
    result = run_evaluate(EvaluateConfig(data=data, predictions=predictions, out=tmp_path / "out", num_vis=0,
                                         ceiling=False))
    assert [(item.frame, item.reason.split(":")[0].split(" (")[0]) for item in result.results.out_of_contract] == \
        [("desk_1", reason.split(":")[0]), ("desk_2", reason.split(":")[0])]
    assert result.results.overall.out_of_contract == 2
    text = (tmp_path / "out" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
    assert "break the output contract" in (tmp_path / "out" / "summary.md").read_text()
    rows = list(csv.DictReader((tmp_path / "out" / "frames.csv").open()))
    assert all(row["contract"].startswith(reason.split(":")[0]) for row in rows)
    with pytest.raises(GateError, match="--require-contract"):
        run_evaluate(EvaluateConfig(data=data, predictions=predictions, out=tmp_path / "gated", num_vis=0,
                                    ceiling=False, require_contract=True))
    assert (tmp_path / "gated" / "summary.json").is_file(), "a missed gate still writes the reports"
