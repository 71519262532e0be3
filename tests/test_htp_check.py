"""The local QNN HTP check: tiny QDQ models through the x86 build of the HTP backend (it runs here,
so these are in the default suite), the refused-op and bad-input paths, and the real FastDepth w8a8."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (the qnn extra, Linux x86_64) is not installed")

from lpcv_depth import cli  # noqa: E402
from lpcv_depth.backends import qnn  # noqa: E402
from lpcv_depth.errors import ConfigError, ContractError, ExitCode, GateError, MissingDependencyError  # noqa: E402
from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check  # noqa: E402

HEIGHT, WIDTH = 480, 640
DOCS = Path(__file__).resolve().parents[1] / "docs" / "htp-check.md"


def main(argv: list[str]) -> int:
    """The stage's command line, in-process."""
    return cli.main(["htp-check", *argv])


def _float_model(path, *, with_erf: bool = False):
    """image (1,3,480,640) in [0,255] -> Conv -> Relu [-> Erf] -> Conv -> Sigmoid -> depth (1,1,480,640):
    smoothing kernels scaled so the sigmoid stays in its linear range (depth-like, never saturated)."""
    rng = np.random.default_rng(0)
    w1 = np.full((8, 3, 3, 3), 1 / (27 * 255), np.float32) * rng.uniform(0.5, 1.5, (8, 1, 1, 1)).astype(np.float32)
    w2 = np.full((1, 8, 3, 3), 1 / 72, np.float32) * rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32)
    initializers = [numpy_helper.from_array(w1 * 4, "w1"), numpy_helper.from_array(np.full(8, -1.0, np.float32), "b1"),
                    numpy_helper.from_array(w2 * 2, "w2")]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1")]
    hidden = "relu1"
    if with_erf:  # exact GELU's Erf: the QNN EP has no Erf
        nodes.append(helper.make_node("Erf", ["relu1"], ["erf1"], name="erf1"))
        hidden = "erf1"
    nodes += [helper.make_node("Conv", [hidden, "w2"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Sigmoid", ["conv2"], ["depth"], name="sigmoid")]
    return _save_model(path, "tiny", nodes, initializers)


def _save_model(path, name, nodes, initializers):
    """The contract's graph (image (1,3,480,640) -> depth (1,1,480,640)) of `nodes`, saved at `path`."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, HEIGHT, WIDTH])],
                              [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, HEIGHT, WIDTH])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _quantize(float_path, qdq_path, images, *, skip=()):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({"image": image[None]} for image in images)

        def get_next(self):
            return next(self.batches, None)

    ops = [op for op in ("Conv", "Relu", "Sigmoid") if op not in skip]
    # 7-bit weights (reduce_range): ONNX Runtime's u8s8 CPU kernels saturate on x86 without VNNI, which
    # would make the CPU reference, not the HTP, the odd one out (docs/htp-check.md, platform caveats).
    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=ops)
    return qdq_path


def _photos(folder, count):
    """Smooth synthetic photos: gradients plus blobs, so depth maps are not noise."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for index in range(count):
        rng = np.random.default_rng(index)
        base = (xx / WIDTH * 120 + yy / HEIGHT * 80)[..., None] + rng.uniform(0, 40, 3)
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        blob = 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 60.0 ** 2))[..., None]
        Image.fromarray(np.clip(base + blob, 0, 255).astype(np.uint8)).save(folder / f"photo_{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float model, its QDQ int8 version, one with an Erf the HTP refuses, and photos."""
    from lpcv_depth.images import list_images, load_contract_image

    root = tmp_path_factory.mktemp("tiny")
    photos = _photos(root / "photos", 6)
    images = [load_contract_image(p) for p in list_images(photos)]
    calibration, held_out = images[:4], root / "held_out"
    held_out.mkdir()
    for path in list_images(photos)[4:]:
        shutil.copy(path, held_out / path.name)
    float_path = _float_model(root / "float.onnx")
    erf_float = _float_model(root / "float_erf.onnx", with_erf=True)
    return {"float": float_path, "qdq": _quantize(float_path, root / "qdq.onnx", calibration),
            "qdq_erf": _quantize(erf_float, root / "qdq_erf.onnx", calibration), "float_erf": erf_float,
            "images": held_out, "root": root}


def test_tiny_qdq_runs_fully_on_the_htp(tiny, tmp_path):
    config = HtpCheckConfig(ptq=tiny["qdq"], images=tiny["images"], fp32=tiny["float"], fscore_max_points=5000,
                            out=tmp_path / "out")
    result = run_htp_check(config)
    report = result.results
    coverage = report.coverage
    assert coverage.full_htp and coverage.cpu_nodes == 0 and coverage.htp_partitions == 1
    assert not coverage.refused and not report.warnings
    # The HTP's fixed-point requantization lands a few steps from ORT's CPU kernels, never far.
    parity = report.numerics["htp_vs_int8_cpu"]
    assert parity.sqnr_db > 25 and parity.max_abs_diff < 0.05
    assert report.numerics["htp_vs_fp32"].sqnr_db > 20
    assert report.fp16_baseline.full_htp and report.fp16_baseline.vs_fp32.sqnr_db > 40
    # The context binary is kept, recorded for the hub stage, and loads again.
    ctx = report.context_binary
    assert (result.out_dir / ctx.path).stat().st_size == ctx.bytes > 0
    assert ctx.htp_arch == "75" and ctx.soc_model == "57" and ctx.build_s > 0
    context_graph = onnx.load(str(result.context_onnx)).graph
    assert [node.op_type for node in context_graph.node] == ["EPContext"]
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["stage"] == "htp-check" and manifest["results"]["context_binary"]["sha256"] == ctx.sha256
    assert {entry["path"] for entry in manifest["outputs"]} >= {"model_ctx.onnx", ctx.path, "report.md", "report.json"}
    markdown = (result.out_dir / "report.md").read_text()
    assert "not device latency" in markdown and "Op coverage" in markdown and "fp16" in markdown
    assert report.emulation_time["int8"].frames == 2
    assert "NOT device latency" in report.emulation_time["int8"].note


def test_refused_op_is_named_and_the_partition_reported(tiny, tmp_path, capsys):
    config = HtpCheckConfig(ptq=tiny["qdq_erf"], images=tiny["images"], fp32=tiny["float_erf"],
                            fp16_baseline=False, fscore_max_points=5000, out=tmp_path / "out")
    report = run_htp_check(config).results
    coverage = report.coverage
    assert not coverage.full_htp
    assert "fallback to CPU EP has been explicitly disabled" in coverage.no_fallback_error
    assert coverage.cpu_op_types["Erf"] == 1 and coverage.htp_partitions == 2
    assert coverage.htp_op_types["Conv"] == 2
    erf = [row for row in coverage.refused if row["op_type"] == "Erf"]
    assert erf and "not supported" in erf[0]["reason"]
    out = capsys.readouterr().out
    # The warning points at the measured cost of CPU islands (303 ms), which lives in the docs page.
    assert "WARNING NOT FULLY ON THE HTP" in out and "Erf" in out and "docs/htp-check.md" in out
    assert "303 ms" in DOCS.read_text()
    # The partitioned model still runs (HTP + CPU) and still matches the CPU within rounding.
    assert report.numerics["htp_vs_int8_cpu"].sqnr_db > 25
    assert "**NO**" in (tmp_path / "out" / "report.md").read_text()


def _drop_input_quantization(qdq_path, out_path):
    """The QDQ model with its input QuantizeLinear/DequantizeLinear removed: the first Conv takes the
    float image with int8 per-channel weights, the pattern the ptq export leaves around FastDepth's
    unquantized Resize outputs."""
    model = onnx.load(str(qdq_path))
    graph = model.graph
    quantize = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    dequantize = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0])
    for node in graph.node:
        node.input[:] = ["image" if name == dequantize.output[0] else name for name in node.input]
    graph.node.remove(quantize)
    graph.node.remove(dequantize)
    onnx.save(model, str(out_path))
    return out_path


def test_unquantized_activation_is_named_as_the_cause(tiny, tmp_path):
    qdq = _drop_input_quantization(tiny["qdq"], tmp_path / "qdq_float_input.onnx")
    report = run_htp_check(HtpCheckConfig(ptq=qdq, images=tiny["images"], max_frames=1, fp16_baseline=False,
                                      context_binary=False, fscore_max_points=5000, out=tmp_path / "out")).results
    coverage = report.coverage
    assert not coverage.full_htp and set(coverage.cpu_op_types) == {"DequantizeLinear"}
    weight_rows = [row for row in coverage.refused if "per-channel" in row["reason"]]
    assert weight_rows and all("graph input 'image'" in row["cause"] for row in weight_rows)
    assert report.context_binary is None and not (tmp_path / "out" / "model_ctx.onnx").exists()


def test_require_full_htp_gate_exits_3_after_writing_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--ptq", str(tiny["qdq_erf"]), "--images", str(tiny["images"]), "--no-fp16-baseline",
                 "--max-frames", "1", "--fscore-max-points", "5000", "--require-full-htp", "--out", str(out)])
    assert code == 3
    assert "GATE FAILED" in capsys.readouterr().err and "Erf" in (out / "report.md").read_text()
    with pytest.raises(GateError):
        run_htp_check(HtpCheckConfig(ptq=tiny["qdq_erf"], images=tiny["images"], fp16_baseline=False, max_frames=1,
                                 fscore_max_points=5000, require_full_htp=True, out=out))


def test_float_model_is_refused_as_not_qdq(tiny, tmp_path, capsys):
    with pytest.raises(ContractError, match="not a QDQ int8 model"):
        run_htp_check(HtpCheckConfig(ptq=tiny["float"], images=tiny["images"], out=tmp_path / "out"))
    code = main(["--ptq", str(tiny["float"]), "--images", str(tiny["images"]), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "not a QDQ int8 model" in err and "fix:" in err
    assert not (tmp_path / "out").exists(), "nothing is written for a refused input"


def test_config_is_validated(tiny, tmp_path):
    with pytest.raises(ConfigError, match="htp_arch"):
        HtpCheckConfig(ptq=tiny["qdq"], images=tiny["images"], htp_arch="74")
    with pytest.raises(ConfigError, match="soc_model"):
        HtpCheckConfig(ptq=tiny["qdq"], images=tiny["images"], soc_model="SM8650")
    with pytest.raises(ConfigError, match="max_frames"):
        HtpCheckConfig(ptq=tiny["qdq"], images=tiny["images"], max_frames=0)


def test_the_ptq_input_is_checked_in_the_first_step(tiny, tmp_path, capsys):
    """The config validates values only; --ptq (folder or file, its manifest) is read once, by the run,
    before anything is compiled or written."""
    with pytest.raises(ConfigError, match="no held-out images"):
        run_htp_check(HtpCheckConfig(ptq=tiny["qdq"]))
    with pytest.raises(ConfigError, match="not found"):
        run_htp_check(HtpCheckConfig(ptq=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a ptq stage output"):
        run_htp_check(HtpCheckConfig(ptq=tiny["root"]))
    assert "inputs FAILED" in capsys.readouterr().out and not list(tmp_path.iterdir())


def _tiny_ptq_folder(tiny, folder, fp32):
    """A ptq stage folder around the tiny QDQ model whose manifest records `fp32` as the model it quantized."""
    from lpcv_depth.manifest import sha256_file, write_manifest
    from lpcv_depth.results import Fidelity, PtqResults, PtqSizes

    folder.mkdir()
    qdq = folder / "model_qdq.onnx"
    shutil.copy(tiny["qdq"], qdq)
    results = PtqResults(model="tiny", preset="w8a8", techniques={}, fp32_contract={}, calibration_analyzers={},
                         preparation={}, qdq_vs_aimet_sim={}, int8_vs_fp32=Fidelity(30.0, 30.0, 0.01, 99.0, [99.0], 1),
                         sizes_bytes=PtqSizes(fp32_onnx=1, qdq_onnx=1, aimet_onnx=1, aimet_encodings=1),
                         host_latency_ms=None)
    write_manifest(folder, stage="ptq", config={}, inputs={"fp32_onnx": {"path": str(fp32), "sha256": sha256_file(fp32)}},
                   outputs=[qdq], timings={}, results=results)
    return folder


def test_an_export_replaced_after_ptq_is_refused(tiny, tmp_path, capsys, monkeypatch):
    """Another model's export in place of the one ptq quantized: its fp16 baseline would read as if the HTP
    broke this model, so the check refuses rather than report it."""
    from lpcv_depth.manifest import Manifest

    fp32 = tmp_path / "export" / "model.onnx"
    fp32.parent.mkdir()
    shutil.copy(tiny["float"], fp32)
    ptq = _tiny_ptq_folder(tiny, tmp_path / "ptq", fp32)
    shutil.copy(tiny["float_erf"], fp32)
    with monkeypatch.context() as patched:  # the config validates values only: the run's first step reads ptq
        patched.setattr(Manifest, "read", classmethod(lambda *args, **kwargs: pytest.fail("the config read a manifest")))
        HtpCheckConfig(ptq=ptq, images=tiny["images"])
    code = main(["--ptq", str(ptq), "--images", str(tiny["images"]), "--max-frames", "1", "--fscore-max-points", "5000"])
    err = capsys.readouterr().err
    assert code == 2 and "is not the model ptq quantized" in err and "fix:" in err and "--fp32" in err
    assert not (ptq / "htp-check").exists()
    shutil.copy(tiny["float"], fp32)  # the model ptq quantized, back in place: checked
    assert main(["--ptq", str(ptq), "--images", str(tiny["images"]), "--max-frames", "1", "--no-fp16-baseline",
                 "--no-context-binary", "--fscore-max-points", "5000"]) == 0


def test_a_file_that_is_no_model_is_refused_with_a_fix(tiny, tmp_path, capsys):
    junk = tmp_path / "random.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    for argv, says in ((["--images", str(tiny["images"])], "not a readable ONNX model"),
                       ([], "no held-out images")):
        assert main(["--ptq", str(junk), *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and "fix:" in err
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    assert main(["--ptq", str(text)]) == 2
    err = capsys.readouterr().err
    assert "neither a ptq folder nor an .onnx file" in err and "fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.txt", "random.onnx"]


def _deep_float_model(path, channels: int = 32, layers: int = 24):
    """image -> Conv -> Relu, `layers` times channels->channels 3x3 Conv -> Relu, -> Conv -> Sigmoid -> depth: a
    model whose one 640x480 frame keeps the HTP emulator in a single native call for tens of seconds."""
    rng = np.random.default_rng(0)

    def weights(name, out_channels, in_channels, gain=1.0):
        scale = rng.uniform(0.5, 1.5, (out_channels, 1, 1, 1)) * gain / (9 * in_channels)
        return numpy_helper.from_array((np.ones((out_channels, in_channels, 3, 3)) * scale).astype(np.float32), name)

    initializers = [weights("w0", channels, 3, gain=4 / 255)]
    nodes, hidden = [], "image"
    for index in range(layers + 1):
        if index:
            initializers.append(weights(f"w{index}", channels, channels))
        nodes += [helper.make_node("Conv", [hidden, f"w{index}"], [f"conv{index}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"])]
        hidden = f"relu{index}"
    initializers.append(weights("w_out", 1, channels))
    nodes += [helper.make_node("Conv", [hidden, "w_out"], ["conv_out"], pads=[1, 1, 1, 1]),
              helper.make_node("Sigmoid", ["conv_out"], ["depth"])]
    return _save_model(path, "deep", nodes, initializers)


def test_an_interrupt_during_the_emulation_stops_the_check_at_once(tiny, tmp_path_factory, tmp_path):
    """Ctrl+C or SIGTERM while the emulator is inside one frame: the check ends within a second or two (it
    waited for the frame to finish, tens of seconds, then for the QNN backend's teardown), exit 130 / 143,
    and leaves no output folder and no hidden partial folder."""
    from lpcv_depth.images import list_images, load_contract_image

    models = tmp_path_factory.mktemp("deep")
    calibration = [load_contract_image(list_images(tiny["images"])[0])]
    qdq = _quantize(_deep_float_model(models / "deep.onnx"), models / "deep_qdq.onnx", calibration)
    for sent, status in ((signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)):
        # A shell's background job starts with SIGINT ignored; the check gets it as a terminal would send it.
        proc = subprocess.Popen([sys.executable, "-m", "lpcv_depth.cli", "htp-check", "--ptq", str(qdq), "--images",
                                 str(tiny["images"]), "--max-frames", "1", "--no-fp16-baseline", "--out",
                                 str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in proc.stdout:
            if "context-binary ok" in line:
                break
        time.sleep(1.0)  # into the first frame's emulation
        start = time.monotonic()
        proc.send_signal(sent)
        _, err = proc.communicate(timeout=300)
        stopped_s = time.monotonic() - start
        assert proc.returncode == status, err
        assert stopped_s < 8, f"{sent.name}: the check took {stopped_s:.1f}s to stop"
        assert ("interrupted" if sent == signal.SIGINT else "terminated") in err
        assert list(tmp_path.iterdir()) == [], "nothing is left behind"


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path, tiny):
    monkeypatch.setattr(qnn, "_REGISTERED", {})
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        qnn.import_qnn()
    assert 'pip install -e ".[qnn]"' in str(err.value) and "Linux x86_64" in str(err.value)
    code = main(["--ptq", str(tiny["qdq"]), "--images", str(tiny["images"]), "--out", str(tmp_path / "out")])
    assert code == 2


def test_missing_htp_library_is_named(monkeypatch):
    import onnxruntime_qnn

    monkeypatch.setattr(qnn, "_REGISTERED", {})
    monkeypatch.setattr(onnxruntime_qnn, "get_qnn_htp_path", lambda: "/nowhere/libQnnHtp.so")
    with pytest.raises(MissingDependencyError, match="libQnnHtp.so is missing"):
        qnn.import_qnn()


def test_other_platforms_are_told_why(monkeypatch):
    monkeypatch.setattr(qnn, "_REGISTERED", {})
    monkeypatch.setattr(qnn.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(qnn.sys, "platform", "darwin")
    with pytest.raises(MissingDependencyError, match="Linux x86_64 wheel") as err:
        qnn.import_qnn()
    assert "darwin/arm64" in str(err.value) and "aihub" in str(err.value)


def test_tool_versions_in_hints_are_the_pinned_ones():
    import tomllib

    from lpcv_depth.backends.ray_cluster import RAY_INSTALL
    from lpcv_depth.stages.htp_check import HUB_CONTEXT_NOTE

    project = tomllib.loads((DOCS.parents[1] / "pyproject.toml").read_text())["project"]
    pins = {spec.split(";")[0].strip() for specs in [project["dependencies"], *project["optional-dependencies"].values()]
            for spec in specs}
    for name in ("onnxruntime", "onnxruntime-qnn"):
        assert next(pin for pin in pins if pin.startswith(f"{name}==")) in qnn._PINNED
    assert next(pin for pin in pins if pin.startswith("ray==")) in RAY_INSTALL
    qai_hub = next(pin for pin in pins if pin.startswith("qai-hub==")).split("==")[1]
    assert HUB_CONTEXT_NOTE.startswith(f"qai-hub {'.'.join(qai_hub.split('.')[:2])} takes")


def test_docs_flag_table_lists_every_option():
    from lpcv_depth.options import cli_fields, flag_name

    table = DOCS.read_text().split("## Options", 1)[1].split("\n## ", 1)[0]
    flags = {line.split("|")[1].strip().strip("`").split(" / ")[0] for line in table.splitlines()
             if line.startswith("| `--")}
    assert {flag_name(field.name) for field, _ in cli_fields(HtpCheckConfig)} <= flags


def test_out_may_not_replace_the_ptq_folder(tiny, tmp_path):
    """The default output lives inside the ptq folder, but --out can never be the ptq folder or hold it."""
    from lpcv_depth.errors import OutputDirError

    qdq = tmp_path / "model" / "qdq.onnx"
    qdq.parent.mkdir()
    shutil.copy(tiny["qdq"], qdq)
    config = HtpCheckConfig(ptq=qdq, images=tiny["images"])
    assert config.destination == qdq.parent / "htp-check"
    for out in (qdq.parent, tmp_path):
        with pytest.raises(OutputDirError, match="input"):
            run_htp_check(HtpCheckConfig(ptq=qdq, images=tiny["images"], max_frames=1, fp16_baseline=False, out=out))
    assert qdq.is_file()


# ---------------------------------------------------------------------------------------------
# FastDepth, real weights, real AIMET w8a8


@pytest.fixture
def fastdepth_ptq_dir(fastdepth_w8a8):
    return fastdepth_w8a8.out_dir  # conftest: the FastDepth w8a8 PTQ shared with test_ptq.py


# The quick ptq's encodings follow the instruction set PyTorch calibrates with, so each host checks a
# slightly different int8 model; the bound sits below the spread measured across instruction sets, with
# a margin (docs/htp-check.md, "Which CPU reference"). The CPU reference itself is the same on every x86 CPU.
HTP_PARITY_MIN_SQNR_DB = 22.0


def _fastdepth_assertions(report):
    # The HTP's fixed-point arithmetic stays near ORT's CPU Q/DQ and AIMET's simulation (measured
    # with the 16-bit and the 8-bit output tail: docs/htp-check.md); lower means an op computes
    # something else on the NPU.
    assert report.numerics["htp_vs_int8_cpu"].sqnr_db > HTP_PARITY_MIN_SQNR_DB
    assert report.numerics["htp_vs_aimet_sim"].sqnr_db > HTP_PARITY_MIN_SQNR_DB
    assert report.numerics["htp_vs_fp32"].fscore >= 99.0
    gt = report.ground_truth
    assert gt.fscore_drop <= 1.0, f"HTP int8 loses {gt.fscore_drop:.2f} F-score points vs fp32"


def test_fastdepth_w8a8_on_the_htp_one_set(fastdepth_ptq_dir, rgbd_dir):
    """Default suite: 2 held-out images and 2 frames of one set (time per frame: docs/htp-check.md)."""
    config = HtpCheckConfig(ptq=fastdepth_ptq_dir, eval_data=rgbd_dir / "kinect_home", max_frames=2,
                            fp16_baseline=False)
    report = run_htp_check(config).results
    coverage = report.coverage
    assert coverage.full_htp, f"on the CPU: {coverage.cpu_op_types}; refused: {coverage.refused}"
    assert coverage.htp_partitions == 1 and report.context_binary.bytes > 1e6
    _fastdepth_assertions(report)
    assert report.ground_truth.frames == 2


@pytest.mark.slow
def test_fastdepth_w8a8_on_the_htp_all_rgbd_sets(fastdepth_ptq_dir, rgbd_dir):
    """Every shared RGB-D frame (28) and the fp16 baseline (its run time: docs/htp-check.md)."""
    report = run_htp_check(HtpCheckConfig(ptq=fastdepth_ptq_dir, eval_data=rgbd_dir,
                                      out=fastdepth_ptq_dir / "htp-all")).results
    _fastdepth_assertions(report)
    assert report.ground_truth.frames == 28 and len(report.ground_truth.sets) == 4
    assert report.fp16_baseline.full_htp and report.fp16_baseline.vs_fp32.sqnr_db > 40
    # The target, per set (negative: int8 scored higher); measured per set in docs/htp-check.md.
    for set_name, scores in report.ground_truth.sets.items():
        drop = scores["fp32"] - scores["int8_htp"]
        assert drop <= 1.0, f"{set_name}: HTP int8 loses {drop:.2f} F-score points vs fp32"


def test_saved_outputs_are_used_only_when_they_cover_every_checked_image(tmp_path):
    """ptq --verify-images N saves outputs for its first N held-out images; an HTP check of more
    images computes every reference itself rather than pairing images with the wrong outputs."""
    import types

    from lpcv_depth.stages.htp_check import _saved_outputs

    outputs = {name: np.full((2, 1, 4, 4), index, np.float32) for index, name in enumerate(("fp32", "aimet_sim"))}
    np.savez(tmp_path / "holdout_outputs.npz", **outputs)
    ptq = types.SimpleNamespace(folder=tmp_path)
    assert _saved_outputs(ptq, 3) == {}
    saved = _saved_outputs(ptq, 1)
    assert set(saved) == {"fp32", "aimet_sim"} and all(np.array_equal(saved[n], outputs[n][:1]) for n in outputs)


# ---------------------------------------------------------------------------------------------
# 4-bit weights


def _int4_conv(path):
    """x -> Q/DQ (uint8) -> Conv with per-channel INT4 weights (-8..7, many negative) -> Q/DQ -> y, opset 21."""
    rng = np.random.default_rng(0)
    weights = rng.integers(-8, 8, (16, 8, 3, 3)).astype(np.int8)
    scale = np.full(16, 0.02, np.float32)
    initializers = [numpy_helper.from_array(np.array(4 / 255, np.float32), "s"),
                    numpy_helper.from_array(np.array(128, np.uint8), "zp"),
                    helper.make_tensor("w_q", TensorProto.INT4, weights.shape, weights.flatten().tolist()),
                    numpy_helper.from_array(scale, "w_s")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_the_emulator_misreads_int4_weights_and_computes_their_int8_storage_right(tmp_path):
    """Why htp-check compiles 4-bit weights as INT8 storage (docs/htp-check.md, "4-bit weights"); if a newer
    onnxruntime-qnn computes INT4 right, this fails and the widening can go."""
    import onnxruntime as ort

    from lpcv_depth.backends.qdq_int4 import int4_weight_count, with_int8_storage

    int4 = _int4_conv(tmp_path / "int4.onnx")
    int8 = tmp_path / "int8_storage.onnx"
    assert int4_weight_count(int4) == 1 and with_int8_storage(int4, int8) == 1 and int4_weight_count(int8) == 0
    x = np.random.default_rng(1).uniform(-2, 2, (1, 8, 16, 16)).astype(np.float32)
    options = ort.SessionOptions()  # basic optimizations: Q/DQ stay separate, as the stages' CPU reference runs
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    cpu, widened_cpu = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                        for path in (int4, int8))
    assert np.array_equal(cpu, widened_cpu), "the widened model must be the same model"
    backend, target = qnn.import_qnn(), qnn.HtpTarget(soc_model=qnn.SM8650, htp_arch="75")
    step = 4 / 255
    with qnn.native_stderr():
        misread = qnn.HtpSession(int4, backend, target, cpu_fallback=False).run(x)
        right = qnn.HtpSession(int8, backend, target, cpu_fallback=False).run(x)
    # Measured: INT4 off by the whole output range; INT8 storage within 2 steps (the HTP's own rounding).
    assert np.abs(misread - cpu).max() > 50 * step
    assert np.abs(right - cpu).max() <= 4 * step


def test_fastdepth_w4a8_runs_fully_on_the_htp(fastdepth_w4a8, tmp_path):
    """The w4a8 PTQ (conftest, shared with test_ptq.py): coverage, and the HTP near ONNX Runtime's CPU
    QDQ on one held-out image (measured 28 dB on the full ptq: docs/htp-check.md)."""
    report = run_htp_check(HtpCheckConfig(ptq=fastdepth_w4a8.out_dir, max_frames=1, fp16_baseline=False,
                                          out=tmp_path / "htp")).results
    coverage = report.coverage
    assert coverage.full_htp, f"on the CPU: {coverage.cpu_op_types}; refused: {coverage.refused}"
    assert report.model["int4_weights"] == 38 and report.model["int4_weights_compiled_as"].startswith("int8 storage")
    assert any("reads signed INT4 weights as unsigned" in warning for warning in report.warnings)
    assert report.numerics["htp_vs_int8_cpu"].sqnr_db > 20.0
