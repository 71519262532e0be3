"""4-bit weights in a QDQ ONNX model, and the form in which the local HTP emulator computes them right.

The ptq stage's `model_qdq.onnx` of a 4-bit preset stores its weights as INT4 (opset 21), which
ONNX Runtime's CPU kernels run as written. onnxruntime-qnn 2.7.0 (QNN 2.51) does not: it reads a
signed INT4 weight as unsigned (a weight of -1 computes as 15), so the HTP's outputs are unrelated
to the model's, and it refused FastDepth's head conv (a per-tensor INT4 weight with its zero point,
16-bit input) with "Unsupported weight quantization encoding for bias quantization", failing the
whole build (measured:
docs/htp-check.md, "4-bit weights"; `python benchmarks/htp_int4_bench.py`). The same values held in
INT8 storage run right: the HTP then computes an 8-bit-weight op whose weights take only the 16
values of the 4-bit grid, which is the 4-bit model's arithmetic.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["int4_weight_count", "with_int8_storage", "INT4_EMULATION_NOTE"]

INT4_EMULATION_NOTE = (
    "the QDQ model has {count} 4-bit weight tensor(s) (INT4 DequantizeLinear); onnxruntime-qnn {version}'s HTP reads "
    "signed INT4 weights as unsigned (outputs unrelated to the model's) and can refuse a per-tensor INT4 conv weight "
    "('Unsupported weight quantization encoding for bias quantization'), so the check compiles and runs "
    "the same weight values stored as INT8 (the 4-bit model's arithmetic; see docs/htp-check.md, '4-bit weights'). "
    "AI Hub compiles the 4-bit encodings of the .aimet artifact, not this model.")


def _four_bit_types() -> dict[int, int]:
    from onnx import TensorProto

    return {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}


def _four_bit_dequantized(model) -> list:
    """Initializers of 4-bit type that DequantizeLinear nodes read (their data and zero points)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    wide = _four_bit_types()
    names = dict.fromkeys(name for node in model.graph.node if node.op_type == "DequantizeLinear"
                          for name in node.input if name in initializers and initializers[name].data_type in wide)
    return [initializers[name] for name in names]


def int4_weight_count(path: Path) -> int:
    """How many DequantizeLinear nodes of the model dequantize a 4-bit initializer."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    initializers = {tensor.name: tensor.data_type for tensor in model.graph.initializer}
    wide = _four_bit_types()
    return sum(1 for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input
               and initializers.get(node.input[0]) in wide)


def with_int8_storage(source: Path, target: Path) -> int:
    """Write `source` to `target` with every 4-bit initializer that a DequantizeLinear reads stored in
    8 bits (INT4 -> INT8, UINT4 -> UINT8), values unchanged; returns how many tensors were widened."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(source))
    wide = _four_bit_types()
    tensors = _four_bit_dequantized(model)
    for tensor in tensors:
        values = numpy_helper.to_array(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(wide[tensor.data_type])
        tensor.CopyFrom(numpy_helper.from_array(values.astype(dtype), tensor.name))
    onnx.save(model, os.fspath(target))
    return len(tensors)
