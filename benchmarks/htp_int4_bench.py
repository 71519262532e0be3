"""What the local HTP emulator (onnxruntime-qnn, HTP v75) does with 4-bit weights in a QDQ model.

    python benchmarks/htp_int4_bench.py

One QDQ Conv (8 -> N channels, 3x3, bias) per form: activations uint8 or uint16; weights INT4, or
the same 4-bit values stored as INT8 (what htp-check compiles), or full-range INT8; per-channel or
per-tensor; N = 16 or 1 (a depth head). Each is compiled with CPU fallback disabled and run on one
random input. Prints per form: refused (QNN's reason) or the largest |HTP - ONNX Runtime CPU| in
output quantization steps, and, for INT4 weights, the same against a reference that reads every
weight as its unsigned nibble (q & 0xF). The figures are in docs/htp-check.md ("4-bit weights").
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from lpcv_depth.backends.qnn import SM8650, HtpSession, HtpTarget, import_qnn, native_stderr, parse_refusals
from lpcv_depth.report import markdown_table

IN_CHANNELS, SIZE = 8, 16


def conv_model(path: Path, activation_bits: int, weights: str, per_channel: bool, out_channels: int,
               nibble: bool = False) -> None:
    """x -> Q/DQ -> Conv(W, b) -> Q/DQ -> y, with W dequantized from `weights` (int4, int8-4bit, int8);
    `nibble` stores each 4-bit weight as its unsigned nibble (the emulator's reading, for the reference)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (out_channels, IN_CHANNELS, 3, 3)).astype(np.float32)
    top = 127 if weights == "int8" else 7
    peak = np.abs(weight).reshape(out_channels, -1).max(1)
    scale = (peak / top).astype(np.float32) if per_channel else np.array(peak.max() / top, np.float32)
    shaped = scale[:, None, None, None] if per_channel else scale
    values = np.clip(np.round(weight / shaped), -top - 1, top).astype(np.int8)
    if nibble:
        values = (values & 0xF).astype(np.int8)
    stored = (helper.make_tensor("w_q", TensorProto.INT4, values.shape, values.flatten().tolist())
              if weights == "int4" else numpy_helper.from_array(values, "w_q"))
    act_type, act_max = (np.uint8, 255) if activation_bits == 8 else (np.uint16, 65535)
    step = np.float32(4.0 / act_max)
    bias_scale = (step * scale).astype(np.float32)
    bias = np.round(rng.uniform(-0.1, 0.1, out_channels) / bias_scale).astype(np.int32)
    axis = {"axis": 0} if per_channel else {}
    initializers = [numpy_helper.from_array(np.array(step), "s"), numpy_helper.from_array(np.array(act_max // 2, act_type), "zp"),
                    stored, numpy_helper.from_array(scale, "w_s"), numpy_helper.from_array(bias, "b_q"),
                    numpy_helper.from_array(bias_scale, "b_s")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["wd"], **axis),
             helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["bd"], **axis),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN_CHANNELS, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, SIZE, SIZE])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def cpu(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def probe(folder: Path, backend, target, activation_bits: int, weights: str, per_channel: bool, channels: int) -> dict:
    path = folder / f"a{activation_bits}-{weights}-{'pc' if per_channel else 'pt'}-{channels}.onnx"
    conv_model(path, activation_bits, weights, per_channel, channels)
    x = np.random.default_rng(1).uniform(-2, 2, (1, IN_CHANNELS, SIZE, SIZE)).astype(np.float32)
    row = {"activations": f"uint{activation_bits}", "weights": weights,
           "granularity": "per-channel" if per_channel else "per-tensor", "out_channels": channels}
    with native_stderr() as log:
        try:
            htp = HtpSession(path, backend, target, cpu_fallback=False, verbose=True).run(x)
        except Exception as err:  # noqa: BLE001 - the refusal is the result
            reasons = sorted({r["reason"] for r in parse_refusals(log.getvalue())})
            return {**row, "htp": "refused", "reason": "; ".join(reasons) or str(err).splitlines()[0][:200]}
    step = 4.0 / (255 if activation_bits == 8 else 65535)
    row.update(htp="ok", max_steps_vs_cpu=round(float(np.abs(htp - cpu(path, x)).max() / step), 1))
    if weights == "int4":
        unsigned = folder / f"{path.stem}-nibbles.onnx"
        conv_model(unsigned, activation_bits, "int8-4bit", per_channel, channels, nibble=True)
        row["max_steps_vs_unsigned_nibbles"] = round(float(np.abs(htp - cpu(unsigned, x)).max() / step), 1)
    return row


def main() -> int:
    backend, target = import_qnn(), HtpTarget(soc_model=SM8650, htp_arch="75")
    with tempfile.TemporaryDirectory() as work:
        rows = [probe(Path(work), backend, target, bits, weights, per_channel, channels)
                for bits in (8, 16) for weights in ("int4", "int8-4bit", "int8")
                for per_channel in (True, False) for channels in (16, 1)]
    print(json.dumps({"qnn": backend.describe(), "forms": rows}, indent=1))
    print(markdown_table(["activations", "weights", "granularity", "out ch", "HTP", "max |HTP - CPU| (steps)",
                          "max |HTP - unsigned nibbles| (steps)"],
                         [[r["activations"], r["weights"], r["granularity"], str(r["out_channels"]), r["htp"],
                           r.get("max_steps_vs_cpu", r.get("reason")), r.get("max_steps_vs_unsigned_nibbles", "-")]
                          for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
