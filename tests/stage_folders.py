"""Stage folders and files the tests build without the heavy tools: a ptq-like folder without AIMET
(ONNX Runtime's own static QDQ quantizer makes the host int8 model), so hub and compare tests need no
slow calibration; an htp-check-like folder holding a QNN context binary, without onnxruntime-qnn; and
an AI Hub client.ini."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

API_URL = "https://workbench.aihub.qualcomm.com"


def write_client_ini(folder: Path, *, token: str | None = "fake-token", api_url: str = API_URL) -> Path:
    """A ~/.qai_hub/client.ini as `qai-hub configure` writes it (token None: the key is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "client.ini"
    lines = ["[api]", f"api_url = {api_url}", f"web_url = {api_url}", "verbose = True"]
    if token is not None:
        lines.insert(1, f"api_token = {token}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_ptq_folder(export_dir: Path, out: Path, calibration: list[Path], *, eval_metrics: dict | None = None,
                    preset: str = "w8a8") -> Path:
    """A folder laid out like quantize/ptq.py's, without AIMET: `<model>.aimet/` (the float ONNX plus an
    encodings file), a real int8 `model_qdq.onnx` from ONNX Runtime's static quantizer, measured
    int8-vs-fp32 figures, and manifest.json last."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from lpcv_depth.images import load_contract_batch
    from lpcv_depth.stage import StageLog
    from lpcv_depth.manifest import read_manifest, sha256_file, write_manifest
    from lpcv_depth.verify import OrtRunner, sqnr_db

    export = read_manifest(export_dir)
    name = export["config"]["model"]
    images = load_contract_batch(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    out.mkdir(parents=True)
    aimet = out / f"{name}.aimet"
    aimet.mkdir()
    fp32_onnx = export_dir / "model.onnx"
    shutil.copy(fp32_onnx, aimet / f"{name}.onnx")
    (aimet / f"{name}.encodings").write_text(json.dumps({"activation_encodings": {}, "param_encodings": {}}))
    qdq = out / "model_qdq.onnx"
    quantize_static(os.fspath(fp32_onnx), os.fspath(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    fp32_runner, int8_runner = OrtRunner(fp32_onnx, threads=1), OrtRunner(qdq, threads=1)
    fp32_out, int8_out = fp32_runner.run(images), int8_runner.run(images)
    results = {
        "preset": preset,
        "int8_vs_fp32": {"sqnr_db": sqnr_db(fp32_out, int8_out),
                         "max_abs_diff": float(np.max(np.abs(fp32_out - int8_out))), "holdout_images": len(images)},
        "host_latency_ms": {"fp32": fp32_runner.median_latency_ms(images[:1], 2),
                            "int8_qdq": int8_runner.median_latency_ms(images[:1], 2), "runs": 2},
        "sizes_bytes": {"fp32_onnx": fp32_onnx.stat().st_size, "qdq_onnx": qdq.stat().st_size,
                        "aimet_onnx": (aimet / f"{name}.onnx").stat().st_size,
                        "aimet_encodings": (aimet / f"{name}.encodings").stat().st_size},
    }
    if eval_metrics is not None:
        results["ground_truth"] = eval_metrics
    np.savez_compressed(out / "holdout_outputs.npz", fp32=fp32_out, int8_qdq=int8_out)
    config = {"fp32": os.fspath(export_dir), "preset": preset, "destination": os.fspath(out)}
    inputs = {"fp32_onnx": {"path": os.fspath(fp32_onnx), "sha256": sha256_file(fp32_onnx)}}
    write_manifest(out, stage="ptq", config=config, inputs=inputs,
                   outputs=[aimet / f"{name}.onnx", aimet / f"{name}.encodings", qdq],
                   timings=StageLog("ptq").timings, results=results)
    return out


def make_htp_check_folder(ptq_dir: Path, out: Path, binary: bytes = b"QNN context binary" * 100, *,
                          qnn_sdk_version: str = "2.51.0", companion_io: tuple | None = None,
                          model: dict | None = None) -> Path:
    """A folder laid out like the htp-check stage's, without onnxruntime-qnn: a stand-in context binary
    and a manifest whose typed results (HtpCheckResults) describe it. The binary is not listed among
    the manifest's outputs, so a test may delete it and see the hub stage's own check.

    companion_io: ((input name, dtype), (output name, dtype)) writes model_ctx.onnx, the EPContext
    model htp-check keeps beside the binary, whose graph declares the binary's I/O."""
    from lpcv_depth.manifest import sha256_file, write_manifest
    from lpcv_depth.results import ContextBinary, Coverage, HtpCheckResults

    out.mkdir(parents=True)
    path = out / "model_ctx_qnn.bin"
    path.write_bytes(binary)
    if companion_io is not None:
        _write_context_onnx(out / "model_ctx.onnx", path.name, *companion_io)
    coverage = Coverage(full_htp=True, htp_partitions=1, htp_nodes=1, htp_op_types={"Conv": 1}, cpu_nodes=0,
                        cpu_op_types={}, cpu_node_names=[], refused=[], no_fallback_error=None, build_s=0.0)
    context = ContextBinary(onnx="model_ctx.onnx", path=path.name, bytes=path.stat().st_size, onnx_bytes=0,
                            sha256=sha256_file(path), build_s=0.0, reload_s=0.0, htp_arch="75", soc_model="57",
                            qnn_sdk_version=qnn_sdk_version, full_htp=True, htp_partitions=1,
                            io="float32 in, float32 out",
                            build_note="fake", ai_hub="fake")
    results = HtpCheckResults(target={"htp_arch": "75", "soc_model": "57"}, emulation_note="fake", warnings=[],
                              qnn={}, model=model or {}, coverage=coverage, emulation_time={}, numerics={},
                              context_binary=context)
    write_manifest(out, stage="htp-check", config={"ptq": os.fspath(ptq_dir), "destination": os.fspath(out)},
                   inputs={}, outputs=[], timings={}, results=results)
    return out


def _write_context_onnx(path: Path, binary: str, image: tuple[str, str], depth: tuple[str, str]) -> None:
    """An EPContext wrapper like onnxruntime-qnn writes: one node pointing at the context binary; its
    graph inputs and outputs are the binary's."""
    import onnx
    from onnx import helper

    types = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}
    node = helper.make_node("EPContext", [image[0]], [depth[0]], domain="com.microsoft", embed_mode=0,
                            ep_cache_context=binary, source="QNN")
    graph = helper.make_graph([node], "ctx",
                              [helper.make_tensor_value_info(image[0], types[image[1]], [1, 3, 480, 640])],
                              [helper.make_tensor_value_info(depth[0], types[depth[1]], [1, 1, 480, 640])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
