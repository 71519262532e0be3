"""export --onnx: a user's ONNX file taken as it is, or wrapped in the Track 3 pre/post-processing as ONNX ops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from lpcv_depth import cli
from lpcv_depth.errors import ExitCode
from lpcv_depth.images import list_images, load_contract_batch
from lpcv_depth.manifest import sha256_file
from lpcv_depth.models import create_model
from lpcv_depth.models.registry import ModelSpec
from lpcv_depth.models.wrapper import Track3Wrapper
from lpcv_depth.stages.export import ExportConfig, run_export
from lpcv_depth.verify import OrtRunner, sqnr_db

FASTDEPTH_NORMALISATION = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _torch_export(module: nn.Module, path: Path, size: tuple[int, int], *, opset: int = 17, dynamic: bool = False,
                  input_name: str = "x", output_name: str = "y") -> Path:
    """What a team's own training code would write: plain torch.onnx.export, no wrapper."""
    axes = {input_name: {0: "batch", 2: "height", 3: "width"}, output_name: {0: "batch"}} if dynamic else None
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, *size),), str(path), input_names=[input_name],
                      output_names=[output_name], opset_version=opset, dynamo=False, dynamic_axes=axes)
    return path


def _check_batch(folder: Path, count: int = 2) -> np.ndarray:
    return load_contract_batch(list_images(folder)[:count])


def _torch_outputs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i:i + 1])).numpy() for i in range(len(images))])


@pytest.fixture(scope="module")
def fastdepth_torch(fastdepth_tflite):
    return create_model("fastdepth", weights=str(fastdepth_tflite))


@pytest.fixture(scope="module")
def fastdepth_bare(fastdepth_torch, tmp_path_factory) -> Path:
    """FastDepth's backbone alone, as ONNX: normalised (1,3,224,224) in, raw depth out."""
    return _torch_export(fastdepth_torch.backbone, tmp_path_factory.mktemp("bare") / "fastdepth_bare.onnx", (224, 224))


def test_bare_fastdepth_wrapped_in_onnx_matches_the_torch_wrapper(fastdepth_torch, fastdepth_bare, tmp_path,
                                                                   calibration_dir):
    result = run_export(ExportConfig(onnx=fastdepth_bare, wrap=True, **FASTDEPTH_NORMALISATION, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=2))
    images = _check_batch(calibration_dir, 3)
    onnx_wrapped = OrtRunner(result.onnx_path).run(images)
    assert sqnr_db(_torch_outputs(fastdepth_torch, images), onnx_wrapped) >= 60
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["inputs"]["onnx"]["sha256"] == sha256_file(fastdepth_bare)
    assert manifest["config"]["model"] == "fastdepth_bare" and manifest["config"]["wrap"] is True
    assert result.results.model["input_size"] == [224, 224] and result.results.macs > 0
    props = {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}
    assert props["lpcv.contract"] == "lpcvc2025-track3" and props["lpcv.weights_sha256"] == manifest["inputs"]["onnx"]["sha256"]


class _ForeignDepthNet(nn.Module):
    """A network the project did not write: torchvision's ResNet-18 trunk with a 1-channel head, output (B,H,W)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18

        trunk = resnet18(weights=None)
        self.features = nn.Sequential(*list(trunk.children())[:-4])  # stride 8, 128 channels
        self.head = nn.Conv2d(128, 1, 3, padding=1)

    def forward(self, x):
        y = torch.nn.functional.interpolate(self.head(self.features(x)), scale_factor=8.0, mode="bilinear")
        return torch.sigmoid(y)[:, 0]


class _WithChannel(nn.Module):
    """The torch wrapper's backbone must be (B,1,H,W); the ONNX wrapper adds that axis itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:, None]


def _foreign_spec(native_output: str) -> ModelSpec:
    return ModelSpec(name="foreign", build=_ForeignDepthNet, load_weights=lambda *a: None, native_input_size=(64, 64),
                     patch_multiple=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     native_output=native_output, license="test", weight_source="random")


@pytest.mark.parametrize("native_output,output", [("disparity", "depth"), ("depth", "depth"), ("depth", "disparity"),
                                                  ("disparity", "disparity")])
def test_a_foreign_network_from_opset_11_with_dynamic_axes_matches_its_torch_wrapper(native_output, output, tmp_path,
                                                                                      calibration_dir):
    torch.manual_seed(0)
    net = _ForeignDepthNet().eval()
    spec = _foreign_spec(native_output)
    path = _torch_export(net, tmp_path / "foreign.onnx", (64, 64), opset=11, dynamic=True)
    result = run_export(ExportConfig(onnx=path, wrap=True, mean=spec.mean, std=spec.std, native_input_size=(64, 64),
                                     native_output=native_output, output=output, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=2))
    images = _check_batch(calibration_dir)
    reference = _torch_outputs(Track3Wrapper(_WithChannel(net), spec, output=output).eval(), images)
    assert sqnr_db(reference, OrtRunner(result.onnx_path).run(images)) >= 60
    assert result.manifest["inputs"]["onnx"]["opset"] == 11


def test_a_model_in_the_contract_is_taken_as_it_is(tmp_path, calibration_dir):
    model = create_model("fastdepth", weights=None)
    path = tmp_path / "contract.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 480, 640),), str(path), input_names=["image"],
                      output_names=["depth"], opset_version=17, dynamo=False)
    result = run_export(ExportConfig(onnx=path, out=tmp_path / "e", check_images=calibration_dir, num_check_images=2))
    images = _check_batch(calibration_dir)
    assert sqnr_db(_torch_outputs(model, images), OrtRunner(result.onnx_path).run(images)) >= 60
    assert result.results.model["wrapped"] is False


def test_external_data_is_read_and_hashed(fastdepth_bare, tmp_path, calibration_dir):
    path = tmp_path / "split.onnx"
    onnx.save(onnx.load(str(fastdepth_bare)), str(path), save_as_external_data=True, location="split.weights")
    result = run_export(ExportConfig(onnx=path, wrap=True, **FASTDEPTH_NORMALISATION, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=1))
    assert result.manifest["inputs"]["onnx"]["external_data"] == {"split.weights": sha256_file(tmp_path / "split.weights")}
    (tmp_path / "split.weights").unlink()
    with pytest.raises(Exception, match="not beside it"):
        run_export(ExportConfig(onnx=path, wrap=True, **FASTDEPTH_NORMALISATION, out=tmp_path / "f",
                                check_images=calibration_dir, num_check_images=1))


# --- refusals: exit 2 with a fix: line ------------------------------------------------------------

def _graph_file(path: Path, nodes, inputs, outputs, *, initializers=(), opset: int = 17, domains=()) -> Path:
    graph = helper.make_graph(nodes, "user", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _image(name="x", elem=TensorProto.FLOAT, shape=(1, 3, 32, 32)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _depth(name="y", shape=(1, 1, 32, 32)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _channel_mean(x="x", y="y"):
    return helper.make_node("ReduceMean", [x], [y], axes=[1], keepdims=1)


def _several_outputs(path: Path) -> Path:
    return _graph_file(path, [_channel_mean(), helper.make_node("Relu", ["y"], ["z"])], [_image()],
                       [_depth(), _depth("z")])


def _int_input(path: Path) -> Path:
    return _graph_file(path, [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), _channel_mean("f")],
                       [_image(elem=TensorProto.UINT8)], [_depth()])


def _rank_three_input(path: Path) -> Path:
    return _graph_file(path, [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [_image(shape=(3, 32, 32))],
                       [_depth(shape=(1, 3, 32, 32))],
                       initializers=[onnx.numpy_helper.from_array(np.array([0], np.int64), "axes")])


def _custom_op(path: Path) -> Path:
    return _graph_file(path, [helper.make_node("DepthMagic", ["x"], ["y"], domain="com.example")], [_image()],
                       [_depth()], domains=["com.example"])


def _truncated(path: Path) -> Path:
    _several_outputs(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _constant_output(path: Path) -> Path:
    zero = onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")
    return _graph_file(path, [_channel_mean("x", "m"), helper.make_node("Mul", ["m", "zero"], ["y"])], [_image()],
                       [_depth()], initializers=[zero])


def _not_in_contract(path: Path) -> Path:
    return _graph_file(path, [_channel_mean()], [_image()], [_depth()])


@pytest.mark.parametrize("make,wrap,expected", [
    (_several_outputs, True, "pass --output-name NAME"),
    (_int_input, True, "not float32"),
    (_rank_three_input, True, "has rank 3"),
    (_custom_op, True, "custom-domain ops ['com.example::DepthMagic']"),
    (_truncated, True, "truncated or not ONNX"),
    (_constant_output, True, "constant on check image"),
    (_not_in_contract, False, "pass --wrap with --mean"),
])
def test_bad_onnx_files_are_refused_with_a_fix(make, wrap, expected, tmp_path, calibration_dir, capsys):
    path = make(tmp_path / "user.onnx")
    argv = ["export", "--onnx", str(path), "--out", str(tmp_path / "e"), "--check-images", str(calibration_dir),
            "--num-check-images", "1"]
    if wrap:
        argv += ["--wrap", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert expected in err and "fix:" in err
    assert not (tmp_path / "e").exists()


def test_several_outputs_export_with_output_name(tmp_path, calibration_dir):
    path = _several_outputs(tmp_path / "user.onnx")
    result = run_export(ExportConfig(onnx=path, wrap=True, mean=(0.5,) * 3, std=(0.25,) * 3, output_name="z",
                                     out=tmp_path / "e", check_images=calibration_dir, num_check_images=1))
    assert [o.name for o in onnx.load(str(result.onnx_path)).graph.output] == ["depth"]


def test_wrap_without_normalisation_is_refused(tmp_path):
    with pytest.raises(Exception, match="--wrap needs the normalisation"):
        ExportConfig(onnx=tmp_path / "m.onnx", wrap=True)


# --- ptq on an ONNX-only export (onnx2torch, then the aimet-torch path unchanged) -------------------

@pytest.fixture(scope="module")
def bare_fastdepth_run(fastdepth_bare, calib_subset, rgbd_dir, tmp_path_factory) -> tuple[Path, int]:
    """run --onnx on the bare FastDepth: export (wrapped), ptq through onnx2torch, compare."""
    pytest.importorskip("onnx2torch", reason="onnx2torch (the quant extra) is not installed")
    from tests.test_pipeline import PTQ_ARGS

    out = tmp_path_factory.mktemp("onnx-run") / "run"
    argv = ["run", "--onnx", str(fastdepth_bare), "--wrap", "--mean", "0,0,0", "--std", "1,1,1",
            "--calib", str(calib_subset), "--eval-data", str(rgbd_dir / "kinect_home"), "--htp-check", "off",
            "--hub", "off", f"--ptq-args={PTQ_ARGS}", "--out", str(out)]
    return out, cli.main(argv)


def test_bare_fastdepth_runs_end_to_end_and_its_int8_scores_as_the_torch_path(bare_fastdepth_run, fastdepth_w8a8):
    """run --onnx: export (wrapped), ptq through onnx2torch, compare; the int8 model as good as the torch path's."""
    from lpcv_depth.manifest import Manifest
    from lpcv_depth.results import PtqResults

    out, status = bare_fastdepth_run
    assert status == ExitCode.OK
    assert (out / "compare" / "compare.md").is_file()
    ptq = Manifest.read(out / "ptq-w8a8", stage="ptq")
    onnx_route, torch_route = ptq.results_as(PtqResults), fastdepth_w8a8.results
    assert onnx_route.model == "fastdepth_bare"
    assert onnx_route.preparation["traced"] and onnx_route.techniques.keys() == torch_route.techniques.keys()
    tails = [route.techniques["output_tail"] for route in (onnx_route, torch_route)]
    assert [(t["bits"], len(t["quantizers"])) for t in tails] == [(16, 4), (16, 4)]
    assert any((out / "ptq-w8a8").glob("*.aimet/*.encodings")) and (out / "ptq-w8a8" / "model_qdq.onnx").is_file()
    assert abs(onnx_route.ground_truth.int8["fscore@0.1"] - torch_route.ground_truth.int8["fscore@0.1"]) <= 0.1
    assert abs(onnx_route.int8_vs_fp32.sqnr_db - torch_route.int8_vs_fp32.sqnr_db) <= 0.5


def test_the_onnx_routes_int8_fastdepth_is_fully_on_the_htp(bare_fastdepth_run, tmp_path):
    """htp-check's compile (CPU fallback disabled) of the QDQ model that ptq made through onnx2torch."""
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (the qnn extra, Linux x86_64) is not installed")
    from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check

    out, status = bare_fastdepth_run
    assert status == ExitCode.OK
    coverage = run_htp_check(HtpCheckConfig(ptq=out / "ptq-w8a8", numerics=False, fp16_baseline=False,
                                            out=tmp_path / "htp")).results.coverage
    assert coverage.full_htp and coverage.cpu_nodes == 0 and coverage.htp_nodes > 0


def test_search_on_an_onnx_file_runs_its_one_size_and_rebuilds_from_the_file(fastdepth_bare, calib_subset, rgbd_dir,
                                                                            tmp_path):
    """search --onnx: one trial at the file's own size, scored at int8; its rebuild commands export the same file."""
    pytest.importorskip("onnx2torch", reason="onnx2torch (the quant extra) is not installed")
    from lpcv_depth.options import config_from_args
    from lpcv_depth.results import SearchResults
    from lpcv_depth.schema import from_json
    from lpcv_depth.stages.search import SearchConfig, plan_trials
    from lpcv_depth.stages.search_report import rebuild_commands
    from tests.test_search import PTQ_ARGS  # test_pipeline's sets --latency-runs, which search wires itself

    out = tmp_path / "search"
    argv = ["search", "--onnx", str(fastdepth_bare), "--wrap", "--mean", "0,0,0", "--std", "1,1,1",
            "--calib", str(calib_subset), "--eval-data", str(rgbd_dir / "kinect_home"), "--preset", "w8a8",
            "--ray-address", "none", "--htp-check", "off", "--hub", "off", f"--ptq-args={PTQ_ARGS}", "--out", str(out)]
    assert cli.main(argv) == ExitCode.OK
    results = from_json(SearchResults, json.loads((out / "results.json").read_text()), where="results.json")
    assert results.model == "fastdepth_bare" and results.grid["input_size"] == ["224x224"]
    [trial] = results.trials
    assert trial.trial == "224x224-w8a8" and trial.status == "done" and trial.fscore_int8 is not None
    export = json.loads((out / "exports" / "224x224" / "export" / "manifest.json").read_text())
    assert export["inputs"]["onnx"]["sha256"] == sha256_file(fastdepth_bare) and export["config"]["wrap"] is True
    searched = json.loads((out / "manifest.json").read_text())["inputs"]["onnx"]
    assert searched["sha256"] == export["inputs"]["onnx"]["sha256"] and searched["path"] == str(fastdepth_bare.resolve())

    config = SearchConfig(onnx=fastdepth_bare, wrap=True, mean=(0.0,) * 3, std=(1.0,) * 3, calib=calib_subset,
                          eval_data=rgbd_dir / "kinect_home")
    assert config.destination.parts[-2:] == ("fastdepth_bare", "search")
    [planned] = plan_trials(config, out, htp=False, hub=False)
    export_command = rebuild_commands(config, planned)[0].split()
    assert export_command[:2] == ["lpcv-depth", "export"]
    rebuilt = config_from_args(ExportConfig, cli.build_parser("export").parse_args(export_command[2:]))
    assert rebuilt.onnx == fastdepth_bare and rebuilt.wrap and rebuilt.input_size is None


def test_the_search_manifest_records_the_onnx_files_sha256_and_its_external_data(fastdepth_bare, calib_subset,
                                                                                 rgbd_dir, tmp_path):
    """As export --onnx records it: what was searched is named by content, external data files included."""
    from onnx.external_data_helper import convert_model_to_external_data

    from lpcv_depth.stages.search import SearchConfig, _manifest_inputs

    split = tmp_path / "split.onnx"
    model = onnx.load(str(fastdepth_bare))
    convert_model_to_external_data(model, location="split.onnx.data", size_threshold=0)
    onnx.save(model, str(split))
    for path, data in ((fastdepth_bare, {}), (split, {"split.onnx.data": sha256_file(tmp_path / "split.onnx.data")})):
        config = SearchConfig(onnx=path, wrap=True, mean=(0.0,) * 3, std=(1.0,) * 3, calib=calib_subset,
                              eval_data=rgbd_dir / "kinect_home")
        record = _manifest_inputs(config)["onnx"]
        assert record == {"path": str(path.resolve()), "sha256": sha256_file(path), "external_data": data}
    assert "onnx" not in _manifest_inputs(SearchConfig(model="fastdepth", calib=calib_subset,
                                                       eval_data=rgbd_dir / "kinect_home"))


def test_search_refuses_input_size_with_an_onnx_file(fastdepth_bare, calib_subset, rgbd_dir, tmp_path, capsys):
    argv = ["search", "--onnx", str(fastdepth_bare), "--wrap", "--mean", "0,0,0", "--std", "1,1,1",
            "--input-size", "224x224", "--calib", str(calib_subset), "--eval-data", str(rgbd_dir / "kinect_home"),
            "--out", str(tmp_path / "search")]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "an ONNX file is searched at its own size" in err and "fix: leave --input-size out" in err
    assert not (tmp_path / "search").exists()


def test_ptq_refuses_an_onnx_op_that_onnx2torch_cannot_convert(calib_subset, tmp_path, capsys):
    pytest.importorskip("onnx2torch", reason="onnx2torch (the quant extra) is not installed")
    path = _graph_file(tmp_path / "lp.onnx", [helper.make_node("LpNormalization", ["x"], ["n"], axis=1),
                                              _channel_mean("n")], [_image()], [_depth()])
    export = run_export(ExportConfig(onnx=path, wrap=True, mean=(0.5,) * 3, std=(0.25,) * 3, out=tmp_path / "e",
                                     check_images=calib_subset, num_check_images=1))
    argv = ["ptq", "--fp32", str(export.out_dir), "--calib", str(calib_subset), "--holdout", "4", "--min-calib", "8",
            "--out", str(tmp_path / "ptq")]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "onnx2torch cannot convert the ops ['LpNormalization']" in err and "fix:" in err


def test_an_onnx_file_edited_in_place_makes_its_export_out_of_date(tmp_path):
    """run's up-to-date check: the same --onnx path with other content is another model."""
    from lpcv_depth.cache import stage_fingerprint

    path = _not_in_contract(tmp_path / "user.onnx")
    config = ExportConfig(onnx=path, out=tmp_path / "e")
    before = stage_fingerprint("export", config, {})
    _several_outputs(path)
    assert stage_fingerprint("export", config, {}) != before


def test_the_export_script_takes_an_onnx_file(tmp_path, calibration_dir):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    path = _several_outputs(tmp_path / "user.onnx")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "export" / "to_onnx.py"), "--onnx", str(path), "--wrap",
                           "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--output-name", "z", "--out",
                           str(tmp_path / "e"), "--check-images", str(calibration_dir), "--num-check-images", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("export: next: python quantize/ptq.py")
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["inputs"]["onnx"]["sha256"] == sha256_file(path)


def test_a_model_over_the_protobuf_limit_is_kept_with_external_data(fastdepth_bare, tmp_path, calibration_dir,
                                                                     monkeypatch):
    from lpcv_depth.manifest import Manifest
    from lpcv_depth.stages import export_onnx

    monkeypatch.setattr(export_onnx, "_PROTO_LIMIT", 1000)  # stands for 2 GB: FastDepth is 5 MB
    result = run_export(ExportConfig(onnx=fastdepth_bare, wrap=True, **FASTDEPTH_NORMALISATION, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=1))
    assert (tmp_path / "e" / "model.onnx.data").is_file()
    assert result.results.nodes_simplified == result.results.nodes_exported  # onnxsim cannot read it: unsimplified
    assert "model.onnx.data" in {o.path for o in Manifest.read(tmp_path / "e", stage="export").outputs}


@pytest.mark.parametrize("command", ["export", "run"])
def test_wrap_options_without_onnx_are_refused(command, capsys):
    argv = [command, "--model", "fastdepth", "--weights", "None", "--wrap", "--mean", "0,0,0", "--std", "1,1,1"]
    assert cli.main(argv) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "--wrap, --mean, --std apply to --onnx FILE only" in err and "fix:" in err


def test_a_bare_graph_whose_own_io_is_called_image_and_depth_is_wrapped(tmp_path, calibration_dir):
    torch.manual_seed(0)
    net = _ForeignDepthNet().eval()
    path = _torch_export(net, tmp_path / "named.onnx", (64, 64), opset=11, input_name="image", output_name="depth")
    spec = _foreign_spec("depth")
    result = run_export(ExportConfig(onnx=path, wrap=True, mean=spec.mean, std=spec.std, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=2))
    images = _check_batch(calibration_dir)
    reference = _torch_outputs(Track3Wrapper(_WithChannel(net), spec).eval(), images)
    assert sqnr_db(reference, OrtRunner(result.onnx_path).run(images)) >= 60


class _TransformerOps(nn.Module):
    """The ops a ViT exports: reshape, transpose, matmul, erf, concat, slice and gather."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), tokens], dim=1)
        attention = torch.softmax(tokens @ tokens.transpose(1, 2), dim=-1) @ tokens
        patches = torch.nn.functional.gelu(attention)[:, 1:, :]
        depth = patches[:, :, 0] + patches[:, :, 1:3].mean(-1)
        return depth.reshape(x.shape[0], 1, 8, 8)


def test_transformer_ops_are_lowered_for_aimet_and_dynamic_shape_ops_are_refused(tmp_path, calibration_dir):
    pytest.importorskip("onnx2torch", reason="onnx2torch (the quant extra) is not installed")
    from lpcv_depth.backends.onnx_torch import onnx_to_torch
    from lpcv_depth.errors import ConfigError

    torch.manual_seed(0)
    path = _torch_export(_TransformerOps(), tmp_path / "vit_ops.onnx", (32, 32))
    with pytest.raises(ConfigError, match=r"torch.fx cannot trace onnx2torch's \[.*'OnnxShape'"):
        onnx_to_torch(path, name="vit_ops", weights={"source": "onnx"})  # x.shape[0], before onnxsim
    export = run_export(ExportConfig(onnx=path, wrap=True, mean=(0.5,) * 3, std=(0.25,) * 3, out=tmp_path / "e",
                                     check_images=calibration_dir, num_check_images=1))
    module = onnx_to_torch(export.onnx_path, name="vit_ops", weights={"source": "onnx"})
    assert not [m for m in module.modules() if type(m).__module__.startswith("onnx2torch")]
    images = _check_batch(calibration_dir, 1)
    with torch.no_grad():
        converted = module(torch.from_numpy(images)).numpy()
    assert sqnr_db(OrtRunner(export.onnx_path).run(images), converted) >= 60
