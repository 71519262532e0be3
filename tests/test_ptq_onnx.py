"""ptq --backend aimet-onnx (issue #26 route (a)): an ONNX-file export quantized with aimet-onnx, its
folder taken by htp-check, hub (the in-memory AI Hub) and compare; what the route cannot apply, and a
torch export, refused with a fix line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lpcv_depth import cli
from lpcv_depth.errors import ConfigError, ExitCode
from lpcv_depth.manifest import Manifest
from lpcv_depth.results import PtqResults
from lpcv_depth.stages.export import ExportConfig, run_export
from lpcv_depth.stages.ptq import PtqConfig, run_ptq
from tests.test_onnx_import import _ForeignDepthNet, _torch_export

ROUTE = dict(backend="aimet-onnx", cle=False, output_tail_bits=8)


def _ptq_config(fp32: Path, calib: Path, out: Path, **overrides) -> PtqConfig:
    options = dict(calib=calib, fp32=fp32, holdout=4, min_calib=8, latency_runs=1, out=out, **ROUTE)
    return PtqConfig(**(options | overrides))


@pytest.mark.parametrize("flags,named,fix", [
    ([], ["--output-tail-bits 16", "CLE"], "fix: pass --output-tail-bits 8 --no-cle, or --backend onnx2torch"),
    (["--no-cle", "--output-tail-bits", "8", "--adaround"], ["--adaround"], "fix: pass --no-adaround"),
    (["--no-cle", "--output-tail-bits", "8", "--seq-mse", "--calibration-scheme", "percentile"],
     ["--seq-mse", "--calibration-scheme percentile"], "fix: pass --no-seq-mse --calibration-scheme tf-enhanced"),
    (["--no-cle", "--preset", "mixed"], ["--preset mixed", "its per-layer sensitivity"], "fix: pass --preset w8a8"),
])
def test_what_the_aimet_onnx_route_cannot_apply_is_refused_before_any_work(flags, named, fix, tmp_path, capsys):
    argv = ["ptq", "--backend", "aimet-onnx", *flags, "--fp32", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "--backend aimet-onnx cannot apply" in err and all(name in err for name in named) and fix in err
    assert not (tmp_path / "q").exists()


def test_the_aimet_onnx_route_refuses_cuda_and_runs_auto_on_the_cpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    argv = ["ptq", "--backend", "aimet-onnx", "--no-cle", "--output-tail-bits", "8", "--device", "cuda",
            "--fp32", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "cannot apply --device cuda (it calibrates through ONNX Runtime's CPU provider" in err
    assert "fix: pass --device cpu, or --backend onnx2torch" in err and not (tmp_path / "q").exists()
    assert PtqConfig(device="auto", **ROUTE).device == "auto"


def test_w8a16_keeps_its_16_bit_tail_on_the_aimet_onnx_route():
    """With 16-bit activations the tail is 16-bit anyway: nothing to refuse."""
    config = PtqConfig(preset="w8a16", **ROUTE | {"output_tail_bits": 16})
    assert config.opset == 21 and config.backend == "aimet-onnx"
    with pytest.raises(ConfigError, match="backend must be one of"):
        PtqConfig(backend="aimet")


@pytest.mark.parametrize("backend", ["aimet-onnx", "onnx2torch"])
def test_a_torch_export_refuses_the_onnx_routes(backend, fastdepth_export, calib_subset, tmp_path, capsys):
    argv = ["ptq", "--backend", backend, "--no-cle", "--output-tail-bits", "8", "--fp32", str(fastdepth_export),
            "--calib", str(calib_subset), "--out", str(tmp_path / "q")]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "was exported from a torch model" in err and "fix: leave --backend out (auto)" in err
    assert not (tmp_path / "q").exists()


# --- route (a) on the bare FastDepth, wrapped -----------------------------------------------------------

@pytest.fixture(scope="module")
def bare_fastdepth_export(calib_subset, fastdepth_tflite, tmp_path_factory) -> Path:
    from lpcv_depth.models import create_model

    model = create_model("fastdepth", weights=str(fastdepth_tflite))
    folder = tmp_path_factory.mktemp("aimet-onnx")
    bare = _torch_export(model.backbone, folder / "fastdepth_bare.onnx", (224, 224))
    return run_export(ExportConfig(onnx=bare, wrap=True, mean=(0.0,) * 3, std=(1.0,) * 3, out=folder / "export",
                                   check_images=calib_subset, num_check_images=2)).out_dir


@pytest.fixture(scope="module")
def aimet_onnx_fastdepth(bare_fastdepth_export, calib_subset, rgbd_dir, tmp_path_factory):
    pytest.importorskip("aimet_onnx", reason="aimet-onnx (the quant extra) is not installed")
    out = tmp_path_factory.mktemp("aimet-onnx-ptq") / "ptq-w8a8"
    return run_ptq(_ptq_config(bare_fastdepth_export, calib_subset, out, eval_data=rgbd_dir / "kinect_home"))


def test_aimet_onnx_quantizes_the_wrapped_bare_fastdepth_as_well_as_the_torch_path(aimet_onnx_fastdepth,
                                                                                   fastdepth_w8a8):
    result, torch_route = aimet_onnx_fastdepth.results, fastdepth_w8a8.results
    assert result.backend == "aimet-onnx" and torch_route.backend == "aimet-torch"
    assert result.device == "cpu" and aimet_onnx_fastdepth.manifest["config"]["device"] == "auto"
    assert Manifest.read(aimet_onnx_fastdepth.out_dir, stage="ptq").results_as(PtqResults).backend == "aimet-onnx"
    graph = result.techniques["onnx_graph"]
    assert graph["source_opset"] == 17 and graph["opset"] == 21
    tail = result.techniques["output_tail"]
    assert tail["bits"] == 8 and "depth" in tail["quantizers"] and len(tail["quantizers"]) >= 4
    assert result.calibration_analyzers["min-max"] >= len(tail["quantizers"]) + 10  # and the Relu outputs
    assert result.qdq_vs_aimet_sim["sqnr_db"] >= 25
    # Measured with these settings (kinect_home, 5 frames): aimet-onnx int8 F 65.59 against the torch path's
    # 65.06 (its 16-bit tail), fp32 65.18; scale-aligned SQNR 28.9 dB against 30.5, F vs fp32 99.0 against
    # 99.4. Bounds: about three times those gaps.
    assert abs(result.ground_truth.int8["fscore@0.1"] - torch_route.ground_truth.int8["fscore@0.1"]) <= 1.5
    assert result.int8_vs_fp32.sqnr_db_scale_aligned >= torch_route.int8_vs_fp32.sqnr_db_scale_aligned - 4
    assert result.int8_vs_fp32.fscore_vs_fp32 >= 93
    aimet = aimet_onnx_fastdepth.aimet_dir
    assert sorted(p.suffix for p in aimet.iterdir()) == [".encodings", ".onnx"]  # one file each, no external data


def test_the_aimet_onnx_int8_model_has_int32_biases_and_runs_fully_on_the_htp(aimet_onnx_fastdepth, tmp_path):
    import onnx

    qdq = onnx.load(str(aimet_onnx_fastdepth.qdq_onnx))
    producers = {out: node for node in qdq.graph.node for out in node.output}
    initializers = {tensor.name: tensor for tensor in qdq.graph.initializer}
    biases = [producers[node.input[2]] for node in qdq.graph.node if node.op_type == "Conv" and len(node.input) > 2]
    assert biases and all(node.op_type == "DequantizeLinear" for node in biases)
    assert all(initializers[node.input[0]].data_type == onnx.TensorProto.INT32 for node in biases)
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (the qnn extra, Linux x86_64) is not installed")
    from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check

    htp = run_htp_check(HtpCheckConfig(ptq=aimet_onnx_fastdepth.out_dir, numerics=False, fp16_baseline=False,
                                       out=tmp_path / "htp")).results.coverage
    assert htp.full_htp and htp.cpu_nodes == 0 and htp.htp_nodes > 0


def test_compare_and_the_hub_take_the_aimet_onnx_folder(aimet_onnx_fastdepth, bare_fastdepth_export, calib_subset,
                                                        tmp_path, monkeypatch):
    from lpcv_depth.stages.compare import CompareConfig, run_compare
    from lpcv_depth.stages.hub import HubConfig, run_hub
    from tests.hub_rest_double import HubRestDouble
    from tests.test_aihub import PROXY_VARIABLES

    compared = run_compare(CompareConfig(fp32=bare_fastdepth_export, int8=aimet_onnx_fastdepth.out_dir,
                                         out=tmp_path / "compare"))
    assert (compared.out_dir / "compare.md").is_file()
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hub = HubRestDouble().install(monkeypatch)
    try:
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(hub.write_client_ini(tmp_path / "qai_hub")))
        result = run_hub(HubConfig(artifact=aimet_onnx_fastdepth.out_dir, out=tmp_path / "hub", images=calib_subset,
                                   max_frames=1, poll=0.001, timeout=30.0, threads=1))
        uploaded = hub.models[hub.uploads[0]]
    finally:
        hub.close()
    assert uploaded.model_type == "MODEL_TYPE_AIMET_ONNX" and uploaded.onnx.parent.name == "fastdepth_bare.aimet"
    assert result.manifest["results"]["input"]["precision"] == "int8"


# --- a network the project did not write ----------------------------------------------------------------

def test_qat_refuses_an_aimet_onnx_folder_naming_the_route_it_can_fine_tune(aimet_onnx_fastdepth, tmp_path, capsys):
    out = tmp_path / "qat"
    assert cli.main(["qat", "--ptq", str(aimet_onnx_fastdepth.out_dir), "--out", str(out)]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "quantized with aimet-onnx" in err and "fix:" in err and "--backend onnx2torch" in err
    assert not out.exists()


def test_aimet_onnx_quantizes_a_torchvision_network_exported_by_plain_torch_onnx_export(calib_subset, tmp_path):
    """ResNet-18's trunk with a 1-channel head, random weights, exported by plain torch.onnx.export (opset 11,
    dynamic axes), wrapped by export --onnx, then ptq with aimet-onnx: a graph this project never shaped."""
    pytest.importorskip("aimet_onnx", reason="aimet-onnx (the quant extra) is not installed")
    torch.manual_seed(0)
    path = _torch_export(_ForeignDepthNet(), tmp_path / "foreign.onnx", (64, 64), opset=11, dynamic=True)
    export = run_export(ExportConfig(onnx=path, wrap=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                     native_input_size=(64, 64), native_output="disparity", out=tmp_path / "e",
                                     check_images=calib_subset, num_check_images=1))
    # Random weights give a flat map, on which ONNX Runtime's integer kernels and AIMET's float simulation
    # differ by a step more often than on a trained model: measured 25.3 dB QDQ vs sim (FastDepth: 29.8).
    result = run_ptq(_ptq_config(export.out_dir, calib_subset, tmp_path / "q", latency_runs=0, sim_min_sqnr=20.0))
    assert export.manifest["inputs"]["onnx"]["opset"] == 11 and result.results.backend == "aimet-onnx"
    graph = result.results.techniques["onnx_graph"]
    assert (graph["source_opset"], graph["opset"]) == (17, 21)
    assert result.results.techniques["bn_fold"] == {"folded_pairs": 0}  # torch.onnx.export folds eval-mode BN
    # Measured: 27.0 dB scale-aligned, F-score vs fp32 97.6 on the 4 held-out photos. Bounds with margin.
    assert result.results.int8_vs_fp32.sqnr_db_scale_aligned >= 20
    assert result.results.int8_vs_fp32.fscore_vs_fp32 >= 90
    saved = np.load(result.out_dir / "holdout_outputs.npz")
    assert saved["int8_qdq"].shape == saved["fp32"].shape == (4, 1, 480, 640)


@pytest.mark.slow
def test_run_takes_the_aimet_onnx_route_end_to_end(bare_fastdepth_export, calib_subset, rgbd_dir, tmp_path):
    """run --onnx ... --ptq-args "--backend aimet-onnx ...": export, ptq, htp-check (where the qnn extra is),
    compare; about 90 s on a loaded 2-core host, hence slow."""
    pytest.importorskip("aimet_onnx", reason="aimet-onnx (the quant extra) is not installed")
    bare = Path(Manifest.read(bare_fastdepth_export, stage="export").inputs["onnx"]["path"])
    out = tmp_path / "run"
    argv = ["run", "--onnx", str(bare), "--wrap", "--mean", "0,0,0", "--std", "1,1,1", "--calib", str(calib_subset),
            "--eval-data", str(rgbd_dir / "kinect_home"), "--hub", "off",
            "--ptq-args=--holdout 4 --min-calib 8 --latency-runs 1 --backend aimet-onnx --no-cle --output-tail-bits 8",
            "--out", str(out)]
    assert cli.main(argv) == ExitCode.OK
    assert Manifest.read(out / "ptq-w8a8", stage="ptq").results_as(PtqResults).backend == "aimet-onnx"
    assert (out / "compare" / "compare.md").is_file()
