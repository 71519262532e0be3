"""The fp32 vs int8 comparison: host figures only, with the local HTP check, with hub runs through the
real qai-hub client against the hub double (tests/hub_rest_double.py), refused model pairs and bad
input; and the project's figures (lpcv_depth.visualize)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcv_depth import cli
from lpcv_depth.backends.ai_hub import HubClient
from lpcv_depth.errors import ConfigError
from lpcv_depth.manifest import read_manifest, sha256_file, write_manifest
from lpcv_depth.results import ContextBinary, Coverage, Fp16Baseline, HtpCheckResults, HtpGroundTruth, OutputComparison
from lpcv_depth.stages.compare import HTP_NOTE, CompareConfig, find_hub_run, run_compare
from lpcv_depth.stages.compare_report import _bar_panels
from lpcv_depth.stages.export import ExportConfig, run_export
from lpcv_depth.stages.hub import HubConfig, run_hub
from lpcv_depth.track3_metric import FSCORE
from lpcv_depth.verify import sqnr_db
from lpcv_depth.visualize import BarPanel, bar_chart, colorize, depth_comparison_panel
from tests.hub_rest_double import HubRestDouble


def _copy_models(fastdepth_export: Path, ptq_dir: Path, root: Path) -> Path:
    """build/<model>/ as it is after export and ptq (the real AIMET ptq of conftest), nothing else."""
    shutil.copytree(fastdepth_export, root / "export")
    shutil.copytree(ptq_dir, root / "ptq-w8a8", ignore=shutil.ignore_patterns("htp-check", "hub-*"))
    return root


@pytest.fixture(scope="module")
def host_only(tmp_path_factory, fastdepth_export, fastdepth_w8a8) -> Path:
    return _copy_models(fastdepth_export, fastdepth_w8a8.out_dir, tmp_path_factory.mktemp("fastdepth"))


@contextlib.contextmanager
def _hub_double(client_ini_folder: Path, **knobs) -> Iterator[HubClient]:
    """A client whose requests the hub double answers while the block runs; its client.ini is written
    to client_ini_folder, never read from the user's ~/.qai_hub. Module fixtures use it too, so it
    patches through a MonkeyPatch of its own."""
    double = HubRestDouble(**knobs)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            double.install(monkeypatch)
            monkeypatch.setenv("QAIHUB_CLIENT_INI", str(double.write_client_ini(client_ini_folder)))
            yield HubClient(preflight=False)
    finally:
        double.close()


@pytest.fixture(scope="module")
def with_hub(host_only, tmp_path_factory, rgbd_dir) -> Path:
    """The same models after `lpcv-depth hub --artifact export` and `--artifact ptq-w8a8` (hub double, two
    layers of each model on the CPU)."""
    root = tmp_path_factory.mktemp("with-hub")
    _copy_models(host_only / "export", host_only / "ptq-w8a8", root)
    with _hub_double(tmp_path_factory.mktemp("qai_hub"), cpu_layers=2) as client:
        for folder in ("export", "ptq-w8a8"):
            run_hub(HubConfig(artifact=root / folder, eval_data=rgbd_dir, max_frames=1, poll=0.001, threads=1),
                    client)
    return root


def _assert_no_empty_panel(result) -> list[dict]:
    """compare.json's chart is what compare.png draws: every panel has at least one measured bar."""
    chart = json.loads((result.out_dir / "compare.json").read_text())["chart"]
    assert chart and all(panel["bars"] for panel in chart)
    assert all(value is not None for panel in chart for value in panel["bars"].values())
    assert bar_chart(_bar_panels(result.results.chart), result.out_dir.parent / "redrawn.png") == len(chart)
    return chart


def test_host_only_report_says_so(host_only, capsys):
    result = run_compare(CompareConfig(fp32=host_only / "export", int8=host_only / "ptq-w8a8"))
    assert result.out_dir == host_only / "compare"
    report = result.report
    assert report["host_only"] is True and report["missing_hub_runs"] == ["fp32", "int8"]
    ptq = read_manifest(host_only / "ptq-w8a8")["results"]
    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]
    assert fp32["host_latency_ms"] == ptq["host_latency_ms"]["fp32"]
    assert int8["host_latency_ms"] == ptq["host_latency_ms"]["int8_qdq"]
    assert fp32["fscore_gt_host"] == ptq["ground_truth"]["fp32"][FSCORE]
    assert int8["fscore_gt_host"] == ptq["ground_truth"]["int8"][FSCORE]
    assert fp32["onnx_bytes"] == (host_only / "export" / "model.onnx").stat().st_size
    assert int8["onnx_bytes"] == (host_only / "ptq-w8a8" / "model_qdq.onnx").stat().st_size
    assert report["int8_vs_fp32"]["host_sqnr_db"] == ptq["int8_vs_fp32"]["sqnr_db"]
    assert report["int8_vs_fp32"]["host_sqnr_db_scale_aligned"] == ptq["int8_vs_fp32"]["sqnr_db_scale_aligned"]
    assert fp32["device_latency_ms"] is None and report["int8_vs_fp32"]["device"] is None
    assert report["htp_check"] is None and fp32["htp_full"] is None and int8["htp_nodes"] is None
    markdown = (result.out_dir / "compare.md").read_text()
    assert "Host figures only: no AI Hub run was found" in markdown
    # Offline, the rows and panels nothing measured are left out, not shown empty.
    assert "device latency" not in markdown and "on device" not in markdown and "| – | – |" not in markdown
    assert f"| {ptq['int8_vs_fp32']['sqnr_db']:.2f} (scale-aligned {ptq['int8_vs_fp32']['sqnr_db_scale_aligned']:.2f}) |" \
        in markdown
    assert HTP_NOTE not in markdown
    chart = _assert_no_empty_panel(result)
    titles = [panel["title"] for panel in chart]
    assert titles == ["host ORT latency, x86 (ms)", "ONNX size (MB)", "F-score@0.1 vs GT, host",
                      "int8 vs fp32 SQNR (dB)", "int8 F-score@0.1, fp32 as GT"]
    assert chart[3]["bars"] == {"host": pytest.approx(ptq["int8_vs_fp32"]["sqnr_db"]),
                                "host, scale-aligned": pytest.approx(ptq["int8_vs_fp32"]["sqnr_db_scale_aligned"])}
    assert json.loads((result.out_dir / "compare.json").read_text()) == report
    assert read_manifest(result.out_dir)["stage"] == "compare"
    with Image.open(result.out_dir / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000
    assert "no AI Hub run for fp32 and int8" in capsys.readouterr().out


def _fake_htp_check(ptq: Path, export: Path, *, full: bool = True, qdq_sha256: str | None = None) -> Path:
    """An htp-check folder as the stage writes it (results from HtpCheckResults), without QNN."""
    folder = ptq / "htp-check"
    folder.mkdir()
    binary = folder / "model_ctx_qnn.bin"
    binary.write_bytes(b"\0" * 123_456)
    vs_fp32 = OutputComparison(sqnr_db=21.5, max_abs_diff=0.1, fscore=93.25)
    results = HtpCheckResults(
        target={"soc_model": "57", "htp_arch": "75"}, emulation_note=HTP_NOTE, warnings=[], qnn={}, model={},
        coverage=Coverage(full_htp=full, htp_partitions=1 if full else 2, htp_nodes=120 if full else 110,
                          htp_op_types={}, cpu_nodes=0 if full else 10, cpu_op_types={} if full else {"Erf": 10},
                          cpu_node_names=[], refused=[], no_fallback_error=None, build_s=1.0),
        emulation_time={}, numerics={"htp_vs_fp32": vs_fp32},
        context_binary=ContextBinary(onnx="model_ctx.onnx", path=binary.name, bytes=binary.stat().st_size,
                                     onnx_bytes=1, sha256=sha256_file(binary), build_s=1.0, reload_s=0.1,
                                     htp_arch="75", soc_model="57", qnn_sdk_version="2", full_htp=full,
                                     htp_partitions=1, io="float32", build_note="", ai_hub=""),
        fp16_baseline=Fp16Baseline(full_htp=True, build_s=1.0),
        ground_truth=HtpGroundTruth(frames_selected=4, frames_total=28, frames=4,
                                    overall={"fp32": {FSCORE: 80.5}, "int8_cpu": {FSCORE: 79.0},
                                             "int8_htp": {FSCORE: 78.75}},
                                    sets={}, htp_minus_cpu_int8=-0.25, emulation_s_per_frame=2.0, fscore_drop=1.75))
    inputs = {"qdq_onnx": {"path": str(ptq / "model_qdq.onnx"),
                           "sha256": qdq_sha256 or sha256_file(ptq / "model_qdq.onnx")},
              "fp32_onnx": {"path": str(export / "model.onnx"), "sha256": sha256_file(export / "model.onnx")}}
    write_manifest(folder, stage="htp-check", config={"ptq": str(ptq)}, inputs=inputs, outputs=[binary], timings={}, results=results)
    return folder


def test_offline_report_shows_the_local_htp_check(host_only, tmp_path):
    root = _copy_models(host_only / "export", host_only / "ptq-w8a8", tmp_path)
    htp = _fake_htp_check(root / "ptq-w8a8", root / "export", full=False)
    result = run_compare(CompareConfig(fp32=root / "export", int8=root / "ptq-w8a8"))  # htp-check found inside
    report = result.report
    assert report["htp_check"] == str(htp) and report["htp_check_note"] == HTP_NOTE
    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]
    assert (int8["htp_full"], int8["htp_nodes"], int8["htp_cpu_nodes"]) == (False, 110, 10)
    assert int8["htp_fscore_gt"] == 78.75 and fp32["htp_fscore_gt"] == 80.5 and int8["htp_gt_frames"] == 4
    assert int8["htp_fscore_vs_fp32"] == 93.25 and report["int8_vs_fp32"]["htp_sqnr_db"] == 21.5
    assert int8["context_binary_bytes"] == 123_456 and fp32["htp_full"] is True  # fp32: the fp16 baseline
    assert fp32["device_latency_ms"] is None
    markdown = (result.out_dir / "compare.md").read_text()
    assert f"## {HTP_NOTE}" in markdown and "| not full: 10 nodes on the CPU |" in markdown
    assert "| nodes on the HTP / on the CPU | – | 110 / 10 |" in markdown
    assert "| F-score@0.1 vs GT, 4 frames (fp32: ORT CPU, int8: HTP) | 80.50 | 78.75 | -1.75 |" in markdown
    assert "| QNN context binary, built on the host (MB) | – | 0.12 |" in markdown
    assert "device latency, S24" not in markdown and "on device" not in markdown
    chart = _assert_no_empty_panel(result)
    htp_panels = {panel["title"].split("\n")[0]: panel["bars"] for panel in chart if HTP_NOTE in panel["title"]}
    assert htp_panels["int8 nodes on the HTP / CPU"] == {"HTP": 110, "CPU": 10}
    assert htp_panels["F-score@0.1 vs GT, HTP check frames"] == {"fp32 CPU": 80.5, "int8 HTP": 78.75}
    assert htp_panels["QNN context binary (MB)"] == {"int8": pytest.approx(0.123456)}
    assert htp_panels["int8 vs fp32 SQNR (dB)"]["HTP emulation"] == 21.5
    assert htp_panels["int8 F-score@0.1, fp32 as GT"]["HTP emulation"] == 93.25
    assert set(result.manifest["inputs"]) == {"fp32", "int8", "htp_check"}


def test_each_input_folder_is_read_once_by_the_run(host_only, tmp_path, monkeypatch):
    """The config validates values only; the run reads every input folder's manifest once, in read-inputs."""
    from lpcv_depth.manifest import Manifest

    reads, read = [], Manifest.read.__func__

    def counted(cls, folder, **options):
        reads.append(Path(folder))
        return read(cls, folder, **options)

    monkeypatch.setattr(Manifest, "read", classmethod(counted))
    config = CompareConfig(fp32=host_only / "export", int8=host_only / "ptq-w8a8", out=tmp_path / "cmp")
    assert reads == []
    run_compare(config)
    assert sorted(reads) == [host_only / "export", host_only / "ptq-w8a8"]


def test_an_htp_check_of_another_int8_model_is_refused(host_only, tmp_path):
    root = _copy_models(host_only / "export", host_only / "ptq-w8a8", tmp_path)
    _fake_htp_check(root / "ptq-w8a8", root / "export", qdq_sha256="0" * 64)
    with pytest.raises(ConfigError, match="checked another int8 model") as caught:
        run_compare(CompareConfig(fp32=root / "export", int8=root / "ptq-w8a8"))
    assert "lpcv-depth htp-check --ptq" in caught.value.hint


def test_another_models_export_is_refused(host_only, tmp_path, calibration_dir):
    """A DA-V2 export (random weights, small input) paired with the FastDepth ptq; then a FastDepth export
    of other weights: same model name, another model.onnx."""
    common = dict(weights=None, check_images=calibration_dir, num_check_images=1)
    davs = run_export(ExportConfig(model="depth_anything_v2_vits", input_size=(70, 98), out=tmp_path / "davs",
                                   **common)).out_dir
    with pytest.raises(ConfigError, match="was not quantized from") as caught:
        run_compare(CompareConfig(fp32=davs, int8=host_only / "ptq-w8a8", out=tmp_path / "cmp-davs"))
    assert "fastdepth" in str(caught.value) and "depth_anything_v2_vits" in str(caught.value)
    assert str(host_only / "ptq-w8a8") in str(caught.value) and "export folder the ptq stage read" in caught.value.hint
    random_fastdepth = run_export(ExportConfig(model="fastdepth", out=tmp_path / "fd-random", **common)).out_dir
    with pytest.raises(ConfigError, match="was not quantized from"):
        run_compare(CompareConfig(fp32=random_fastdepth, int8=host_only / "ptq-w8a8", out=tmp_path / "cmp-random"))
    assert cli.main(["compare", "--fp32", str(davs), "--int8", str(host_only / "ptq-w8a8"),
                     "--out", str(tmp_path / "cmp")]) == 2
    assert not (tmp_path / "cmp").exists()


def test_report_with_hub_runs_puts_device_figures_side_by_side(with_hub, tmp_path):
    hubs = {name: find_hub_run(with_hub / folder) for name, folder in (("fp32", "export"), ("int8", "ptq-w8a8"))}
    assert hubs == {"fp32": with_hub / "hub-export-qnn_context_binary",
                    "int8": with_hub / "hub-ptq-w8a8-qnn_context_binary"}
    result = run_compare(CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", out=tmp_path / "cmp"))
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
    chart = _assert_no_empty_panel(result)
    assert {"device latency, S24 (ms)", "device FPS", "layers: NPU and CPU"} <= {panel["title"] for panel in chart}
    assert {entry["path"] for entry in result.manifest["outputs"]} == {"compare.md", "compare.json", "compare.png"}
    assert set(result.manifest["inputs"]) == {"fp32", "int8", "fp32_hub", "int8_hub"}


def test_cli_and_bad_input(with_hub, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["compare", "--fp32", str(with_hub / "export"), "--int8", str(with_hub / "ptq-w8a8"),
                     "--out", str(out)]) == 0
    assert "compare: next: cat" in capsys.readouterr().out and (out / "compare.md").is_file()
    assert cli.main(["compare", "--fp32", str(with_hub / "ptq-w8a8"), "--int8", str(with_hub / "export")]) == 2
    assert "holds a 'ptq' stage output, not export" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--int8-hub"):
        run_compare(CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", int8_hub=with_hub / "export",
                                  out=tmp_path / "bad"))
    with pytest.raises(ConfigError, match="--fp32-hub .* ran a int8"):
        run_compare(CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", out=tmp_path / "bad",
                                  fp32_hub=with_hub / "hub-ptq-w8a8-qnn_context_binary"))
    with pytest.raises(ConfigError, match="no manifest.json"):
        run_compare(CompareConfig(fp32=tmp_path, int8=with_hub / "ptq-w8a8", out=tmp_path / "bad"))
    with pytest.raises(ConfigError, match="target_fps"):
        CompareConfig(fp32=with_hub / "export", int8=with_hub / "ptq-w8a8", target_fps=0)


def test_colorize_uses_matplotlib_turbo_and_blacks_out_invalid_pixels():
    import matplotlib

    turbo = matplotlib.colormaps["turbo"]
    values = np.array([[0.0, 5.0, 10.0, 20.0]])
    rgb = colorize(values, np.array([[True, True, True, False]]), 0.0, 10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    for index, t in enumerate((0.0, 0.5, 1.0)):
        assert tuple(rgb[0, index]) == tuple(turbo(t, bytes=True)[:3])
    assert tuple(rgb[0, 3]) == (0, 0, 0)


def test_depth_comparison_panel_is_four_tiles_of_the_scaled_size():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 6.0, (48, 64))
    valid = gt > 1.0
    panel = depth_comparison_panel(rng.uniform(0, 255, (3, 48, 64)), gt, gt * 1.05, valid, title="set/frame",
                                   scale=0.5)
    assert isinstance(panel, Image.Image) and panel.mode == "RGB" and panel.size == (4 * 32, 24)
    pixels = np.asarray(panel)
    assert pixels[:, 32:].std() > 0  # the depth tiles are drawn, not blank


def test_bar_chart_leaves_out_panels_and_bars_without_values(tmp_path):
    panels = [BarPanel("measured", [("fp32", 2.0), ("int8", None)], line=(1.0, "30 FPS")),
              BarPanel("nothing measured", [("fp32", None), ("int8", None)]),
              BarPanel("both", [("fp32", 1.0), ("int8", 3.0)], colours=(0, 1))]
    assert [panel.measured for panel in panels] == [[("fp32", 2.0, 0)], [], [("fp32", 1.0, 0), ("int8", 3.0, 1)]]
    assert bar_chart(panels, tmp_path / "chart.png", title="t") == 2
    with Image.open(tmp_path / "chart.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]


def test_docs_flag_table_matches_the_config():
    from lpcv_depth.options import cli_fields, flag_name

    text = (Path(__file__).resolve().parents[1] / "docs" / "compare.md").read_text()
    table = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `--")}
    assert {flag_name(field.name) for field, _ in cli_fields(CompareConfig)} == table


def test_the_int8_hub_run_of_the_htp_checks_context_binary_is_found(host_only, tmp_path, rgbd_dir):
    root = _copy_models(host_only / "export", host_only / "ptq-w8a8", tmp_path)
    htp = _fake_htp_check(root / "ptq-w8a8", root / "export")
    with _hub_double(tmp_path / "qai_hub") as client:
        hub = run_hub(HubConfig(artifact=htp, eval_data=rgbd_dir, max_frames=1, poll=0.001, threads=1),
                      client).out_dir
    assert find_hub_run(root / "ptq-w8a8", htp) == hub and find_hub_run(root / "ptq-w8a8") is None
    result = run_compare(CompareConfig(fp32=root / "export", int8=root / "ptq-w8a8"))
    assert result.report["missing_hub_runs"] == ["fp32"] and result.report["models"]["int8"]["hub_run"] == str(hub)
    assert result.report["models"]["int8"]["runtime"] == "qnn_context_binary"
    assert "**No AI Hub run for fp32**" in (result.out_dir / "compare.md").read_text()
