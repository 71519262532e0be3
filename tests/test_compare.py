"""The fp32 vs int8 comparison: host figures only, then with hub runs from the fake hub, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcv_depth.stages.compare import CompareConfig, compare, find_hub_run, main
from lpcv_depth.stages.hub import HubConfig, run_hub
from lpcv_depth.stages.export import ExportConfig, run_export
from lpcv_depth.errors import ConfigError
from lpcv_depth.backends.ai_hub import HubClient
from lpcv_depth.images import list_images
from lpcv_depth.manifest import read_manifest
from lpcv_depth.track3_metric import FSCORE
from lpcv_depth.verify import sqnr_db
from tests.fake_qai_hub import FakeQaiHub, make_ptq_folder


@pytest.fixture(scope="module")
def host_only(tmp_path_factory, fastdepth_tflite, calibration_dir) -> Path:
    """build/<model>/ as it is after export and ptq: no hub run yet."""
    root = tmp_path_factory.mktemp("fastdepth")
    export_onnx(ExportConfig(model="fastdepth", weights=str(fastdepth_tflite), out_dir=root / "export",
                             check_images=calibration_dir, num_check_images=2))
    make_ptq_folder(root / "export", root / "ptq-w8a8", list_images(calibration_dir)[:2])
    return root


@pytest.fixture(scope="module")
def with_hub(host_only, tmp_path_factory, rgbd_dir) -> Path:
    """The same models after `python export/aihub.py export ptq-w8a8 --eval-data ...` (fake hub)."""
    root = tmp_path_factory.mktemp("with-hub")
    shutil.copytree(host_only / "export", root / "export")
    make_ptq_folder(root / "export", root / "ptq-w8a8", list_images(rgbd_dir / "hololens_dev" / "rgb")[:2])
    client = HubClient(FakeQaiHub(cpu_layers=2), preflight=False)
    for folder in ("export", "ptq-w8a8"):
        run_hub(HubConfig(artifact=root / folder, eval_data=rgbd_dir, max_frames=1, poll_s=0.001, threads=1), client)
    return root


def test_host_only_report_says_so(host_only, capsys):
    result = compare(CompareConfig(fp32=host_only / "export", int8=host_only / "ptq-w8a8"))
    assert result.out_dir == host_only / "compare"
    report = result.report
    assert report["host_only"] is True and report["missing_hub_runs"] == ["fp32", "int8"]
    ptq = read_manifest(host_only / "ptq-w8a8")["results"]
    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]
    assert fp32["host_latency_ms"] == ptq["host_latency_ms"]["fp32"]
    assert int8["host_latency_ms"] == ptq["host_latency_ms"]["int8_qdq"]
    assert fp32["onnx_bytes"] == (host_only / "export" / "model.onnx").stat().st_size
    assert int8["onnx_bytes"] == (host_only / "ptq-w8a8" / "model_qdq.onnx").stat().st_size
    assert report["int8_vs_fp32"]["host_sqnr_db"] == ptq["int8_vs_fp32"]["sqnr_db"]
    assert fp32["device_latency_ms"] is None and report["int8_vs_fp32"]["device"] is None
    markdown = (result.out_dir / "compare.md").read_text()
    assert "Host figures only: no AI Hub run was found" in markdown
    assert "| device latency, S24 (ms) | – | – |" in markdown
    assert json.loads((result.out_dir / "compare.json").read_text()) == report
    assert read_manifest(result.out_dir)["stage"] == "compare"
    with Image.open(result.out_dir / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000
    assert "no AI Hub run for fp32 and int8" in capsys.readouterr().out


def test_report_with_hub_runs_puts_device_figures_side_by_side(with_hub, tmp_path):
    hubs = {name: find_hub_run(with_hub / folder) for name, folder in (("fp32", "export"), ("int8", "ptq-w8a8"))}
    assert hubs == {"fp32": with_hub / "hub-export-qnn_context_binary",
                    "int8": with_hub / "hub-ptq-w8a8-qnn_context_binary"}
    result = compare(CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", out_dir=tmp_path / "cmp"))
    report = result.report
    assert report["host_only"] is False and report["missing_hub_runs"] == []
    for name, hub in hubs.items():
        column, hub_results = report["models"][name], read_manifest(hub)["results"]
        assert column["device_latency_ms"] == hub_results["profile"]["estimated_inference_time_ms"]
        assert column["compile_job_id"] == hub_results["compile"]["job_id"]
        assert column["cpu_layers"] == 2 and column["cpu_fallback"] is True
        assert column["fscore_gt_device"] == hub_results["inference"]["ground_truth"]["device"][FSCORE]
        assert column["meets_target_fps"] == (column["fps"] >= 30)
    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]
    assert report["int8_vs_fp32"]["device_speedup"] == pytest.approx(fp32["device_latency_ms"] / int8["device_latency_ms"])
    # The on-device int8 vs fp32 SQNR is computed from both runs' saved outputs.
    [name] = [p.relative_to(hubs["fp32"] / "device_outputs") for p in (hubs["fp32"] / "device_outputs").rglob("*.npy")]
    expected = sqnr_db(np.load(hubs["fp32"] / "device_outputs" / name), np.load(hubs["int8"] / "device_outputs" / name))
    assert report["int8_vs_fp32"]["device"] == {**report["int8_vs_fp32"]["device"], "frames": 1}
    assert report["int8_vs_fp32"]["device"]["sqnr_db"] == pytest.approx(expected)
    markdown = (result.out_dir / "compare.md").read_text()
    assert "Host figures only" not in markdown and "CPU fallback" in markdown
    assert f"compile job `{fp32['compile_job_id']}`" in markdown
    assert "device FPS (target 30 = 33.3 ms)" in markdown
    assert {entry["path"] for entry in result.manifest["outputs"]} == {"compare.md", "compare.json", "compare.png"}
    assert set(result.manifest["inputs"]) == {"fp32", "int8", "fp32_hub", "int8_hub"}


def test_cli_and_bad_input(with_hub, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--fp32", str(with_hub / "export"), "--int8", str(with_hub / "ptq-w8a8"), "--out", str(out)]) == 0
    assert "compare: next: cat" in capsys.readouterr().out and (out / "compare.md").is_file()
    assert main(["--fp32", str(with_hub / "ptq-w8a8"), "--int8", str(with_hub / "export")]) == 2
    assert "holds a 'ptq' stage output, not 'export'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--int8-hub"):
        CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", int8_hub=with_hub / "export")
    with pytest.raises(ConfigError, match="no manifest.json"):
        CompareConfig(fp32=tmp_path, int8=with_hub / "ptq-w8a8")
