"""FastDepth (Wofk et al., ICRA 2019) rebuilt in PyTorch from the openmv full-integer TFLite file.

The TFLite graph is the NetAdapt-pruned "MobileNet-NNConv5(depthwise), additive skips" variant:
a MobileNetV1 encoder with pruned widths (ReLU6), a decoder of five depthwise 5x5 + pointwise 1x1
stages (ReLU), each followed by a 2x nearest upsample, three of them summed with encoder features,
and a 1x1 head with ReLU that outputs metric depth in metres. BatchNorm is already folded into
the TFLite convolution weights and biases.

All TFLite convolutions are VALID, fed by explicit symmetric ZeroPadding2D (k // 2 on every side),
so PyTorch's symmetric `padding=k // 2` reproduces them exactly; there is no TF "SAME" asymmetry.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tflite
import torch
import torch.nn.functional as F
from torch import nn

from lpcv_depth.errors import WeightsError
from lpcv_depth.models.registry import ModelSpec, register_model
from lpcv_depth.models.weights import load_state_dict_strict

ENCODER_WIDTHS = (16, 56, 88, 120, 144, 256, 408, 376, 272, 288, 296, 328, 480, 512)
ENCODER_STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
DECODER_WIDTHS = (200, 256, 120, 56, 16)
# Decoder stage -> encoder block whose output is added after that stage's upsample
# (the paper's x3 at 1/8, x2 at 1/4 and x1 at 1/2 resolution).
SKIPS = {1: 4, 2: 2, 3: 0}


class ConvAct(nn.Module):
    """Conv (BN folded) + ReLU/ReLU6, matching one TFLite CONV_2D / DEPTHWISE_CONV_2D with fused activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 depthwise: bool = False, relu6: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=in_channels if depthwise else 1)
        self.act = nn.ReLU6() if relu6 else nn.ReLU()

    @property
    def depthwise(self) -> bool:
        return self.conv.groups > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Separable(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 relu6: bool = False):
        super().__init__()
        self.depthwise = ConvAct(in_channels, in_channels, kernel_size, stride=stride, depthwise=True, relu6=relu6)
        self.pointwise = ConvAct(in_channels, out_channels, 1, relu6=relu6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class FastDepth(nn.Module):
    """(B,3,H,W) RGB in [0,1] -> (B,1,H,W) metric depth in metres; H and W multiples of 32."""

    def __init__(self):
        super().__init__()
        self.stem = ConvAct(3, ENCODER_WIDTHS[0], 3, stride=ENCODER_STRIDES[0], relu6=True)
        self.blocks = nn.ModuleList(
            Separable(cin, cout, 3, stride=stride, relu6=True)
            for cin, cout, stride in zip(ENCODER_WIDTHS, ENCODER_WIDTHS[1:], ENCODER_STRIDES[1:]))
        self.decoder = nn.ModuleList(
            Separable(cin, cout, 5) for cin, cout in zip(ENCODER_WIDTHS[-1:] + DECODER_WIDTHS, DECODER_WIDTHS))
        self.head = ConvAct(DECODER_WIDTHS[-1], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        for index, stage in enumerate(self.decoder):
            x = F.interpolate(stage(x), scale_factor=2.0, mode="nearest")
            if index in SKIPS:
                x = x + features[SKIPS[index]]
        return self.head(x)

    def conv_layers(self) -> list[tuple[str, ConvAct]]:
        """Every conv in execution order, which is also the TFLite operator order."""
        layers = [("stem", self.stem)]
        for prefix, stages in (("blocks", self.blocks), ("decoder", self.decoder)):
            for index, stage in enumerate(stages):
                layers += [(f"{prefix}.{index}.depthwise", stage.depthwise),
                           (f"{prefix}.{index}.pointwise", stage.pointwise)]
        return layers + [("head", self.head)]


# ---------------------------------------------------------------------------------------------
# TFLite loading

_OP_NAMES = {code: name for name, code in vars(tflite.BuiltinOperator).items() if not name.startswith("_")}
_ACTIVATIONS = {tflite.ActivationFunctionType.NONE: "none", tflite.ActivationFunctionType.RELU: "relu",
                tflite.ActivationFunctionType.RELU6: "relu6"}
_DTYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.INT8: np.int8,
           tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT32: np.int32, tflite.TensorType.INT64: np.int64}
_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
_KNOWN_OPS = frozenset(_CONV_OPS + ("PAD", "ADD", "RESIZE_NEAREST_NEIGHBOR", "QUANTIZE", "DEQUANTIZE"))
_HINT_FILE = ("pass the FastDepth full-integer TFLite file (fast_depth_224.tflite, sha256 e8957602...) from "
              "../shared/weights/fastdepth/, or re-download it from openmv/openmv PR #2876")


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: type | None
    data: bytes
    scales: np.ndarray | None
    zero_points: np.ndarray | None
    quantized_dimension: int


@dataclass
class _Op:
    index: int
    name: str
    inputs: list[int]
    outputs: list[int]
    options: dict


def _read_options(op, name: str) -> dict:
    table = op.BuiltinOptions()
    if name in _CONV_OPS:
        opts = tflite.Conv2DOptions() if name == "CONV_2D" else tflite.DepthwiseConv2DOptions()
        opts.Init(table.Bytes, table.Pos)
        return {"padding": opts.Padding(), "stride": (opts.StrideH(), opts.StrideW()),
                "dilation": (opts.DilationHFactor(), opts.DilationWFactor()),
                "activation": opts.FusedActivationFunction()}
    if name == "ADD":
        opts = tflite.AddOptions()
        opts.Init(table.Bytes, table.Pos)
        return {"activation": opts.FusedActivationFunction()}
    if name == "RESIZE_NEAREST_NEIGHBOR":
        opts = tflite.ResizeNearestNeighborOptions()
        opts.Init(table.Bytes, table.Pos)
        return {"align_corners": bool(opts.AlignCorners())}
    return {}


def _read_graph(path: Path) -> tuple[list[_Tensor], list[_Op], list[int]]:
    """Everything that touches the flatbuffer, turned into plain data, so that any corruption
    surfaces here as one WeightsError instead of later as garbage weights."""
    try:
        buf = path.read_bytes()
    except OSError as err:
        raise WeightsError(f"cannot read FastDepth weights {path}: {err}", hint=_HINT_FILE) from err
    if len(buf) < 8 or not tflite.Model.ModelBufferHasIdentifier(buf, 0):
        raise WeightsError(f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier)", hint=_HINT_FILE)
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() != 1:
            raise WeightsError(f"{path} has {model.SubgraphsLength()} subgraphs; FastDepth has exactly one",
                               hint=_HINT_FILE)
        graph = model.Subgraphs(0)
        tensors = []
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            buffer = model.Buffers(tensor.Buffer())
            quant = tensor.Quantization()
            has_scales = quant is not None and quant.ScaleLength() > 0
            tensors.append(_Tensor(
                name=(tensor.Name() or b"").decode(),
                shape=tuple(int(v) for v in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else (),
                dtype=_DTYPES.get(tensor.Type()),
                data=buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b"",
                scales=quant.ScaleAsNumpy().astype(np.float64) if has_scales else None,
                zero_points=quant.ZeroPointAsNumpy().astype(np.int64) if has_scales and quant.ZeroPointLength()
                else None,
                quantized_dimension=quant.QuantizedDimension() if has_scales else 0))
        inputs = [int(i) for i in graph.InputsAsNumpy()] if graph.InputsLength() else []
        ops = []
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
            ops.append(_Op(k, name, [int(i) for i in op.InputsAsNumpy()], [int(i) for i in op.OutputsAsNumpy()],
                           _read_options(op, name)))
    except (IndexError, ValueError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} ({len(buf)} bytes) is a corrupt or truncated TFLite file: "
                           f"{type(err).__name__}: {err}",
                           hint=_HINT_FILE) from err
    referenced = inputs + [i for op in ops for i in op.inputs + op.outputs]
    if any(not -1 <= i < len(tensors) for i in referenced):
        raise WeightsError(f"{path} is a corrupt TFLite file: an operator refers to a tensor that does not exist",
                           hint=_HINT_FILE)
    return tensors, ops, inputs


def _along_axis(params: np.ndarray, tensor: _Tensor) -> np.ndarray:
    """Per-axis quant params broadcast along quantized_dimension; per-tensor ones (length 1) everywhere."""
    shape = [1] * len(tensor.shape)
    if params.size > 1:
        shape[tensor.quantized_dimension] = params.size
    return params.reshape(shape)


def _dequantize(tensor: _Tensor, what: str) -> np.ndarray:
    if tensor.dtype is None or not tensor.data:
        raise WeightsError(f"{what} (tensor {tensor.name!r}) is not a constant int8/int32/float32 tensor",
                           hint=_HINT_FILE)
    count = int(np.prod(tensor.shape))
    if len(tensor.data) != count * np.dtype(tensor.dtype).itemsize:
        raise WeightsError(f"{what} (tensor {tensor.name!r}) holds {len(tensor.data)} bytes, expected "
                           f"{count} x {np.dtype(tensor.dtype).name}; the file is corrupt", hint=_HINT_FILE)
    values = np.frombuffer(tensor.data, dtype=tensor.dtype).reshape(tensor.shape).astype(np.float64)
    if tensor.dtype is np.float32:
        return values.astype(np.float32)
    if tensor.scales is None:
        raise WeightsError(f"{what} (tensor {tensor.name!r}) is integer but has no quantization scale",
                           hint=_HINT_FILE)
    scales = _along_axis(tensor.scales, tensor)
    zero_points = _along_axis(tensor.zero_points if tensor.zero_points is not None else np.zeros(1), tensor)
    return ((values - zero_points) * scales).astype(np.float32)


def _padding_before(op: _Op, tensors: list[_Tensor], producers: dict[int, _Op]) -> str:
    """The zero padding a conv applies, as '(top, bottom, left, right)', or 'SAME' for TF's
    input-size dependent (possibly asymmetric) padding."""
    if op.options["padding"] == tflite.Padding.SAME and tensors[op.inputs[1]].shape[1:3] != (1, 1):
        return "SAME"
    pad_op = producers.get(op.inputs[0])
    if pad_op is None or pad_op.name != "PAD":
        return str((0, 0, 0, 0))
    if len(pad_op.inputs) < 2 or pad_op.inputs[1] < 0:
        return "PAD without paddings"
    paddings = tensors[pad_op.inputs[1]]
    pads = np.frombuffer(paddings.data, dtype=paddings.dtype or np.int32)
    if pads.size != 8 or pads[[0, 1, 6, 7]].any():
        return f"PAD {pads.tolist()}"
    return str(tuple(int(v) for v in pads[2:6]))


def _signature(kind: str, kernel: tuple[int, int], stride: tuple[int, int], pad: str, act: str) -> str:
    return f"{kind} {kernel[0]}x{kernel[1]} stride {stride[0]}x{stride[1]} pad {pad} {act}"


def _structure_error(path: Path, message: str) -> WeightsError:
    return WeightsError(f"{path}: TFLite graph does not match the FastDepth architecture: {message}",
                        hint="this loader reads only the pruned FastDepth (MobileNetV1 + NNConv5 depthwise, "
                             "additive skips) TFLite graph; " + _HINT_FILE)


def load_fastdepth_tflite(module: FastDepth, path: Path) -> None:
    """Dequantize the TFLite weights into `module`, matching layers by graph structure, not tensor names."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"FastDepth weights file not found: {path}", hint=_HINT_FILE)
    tensors, ops, inputs = _read_graph(path)
    _check_input_range(path, tensors, inputs)
    unknown = sorted({op.name for op in ops} - _KNOWN_OPS)
    if unknown:
        raise _structure_error(path, f"unexpected operators {unknown}")
    producers = {out: op for op in ops for out in op.outputs}

    layers = module.conv_layers()
    conv_ops = [op for op in ops if op.name in _CONV_OPS]
    if len(conv_ops) != len(layers):
        raise _structure_error(path, f"{len(conv_ops)} convolutions, expected {len(layers)}")

    state_dict: dict[str, torch.Tensor] = {}
    layer_of_output: dict[int, str] = {}
    for (name, layer), op in zip(layers, conv_ops):
        if len(op.inputs) < 3 or min(op.inputs[:3]) < 0:
            raise _structure_error(path, f"operator {op.index} ({name}) lacks its weight or bias")
        weight = tensors[op.inputs[1]]
        kernel = weight.shape[1:3] if len(weight.shape) == 4 else (0, 0)
        found = _signature(op.name, kernel, op.options["stride"], _padding_before(op, tensors, producers),
                           _ACTIVATIONS.get(op.options["activation"], str(op.options["activation"])))
        if op.options["dilation"] != (1, 1):
            found += f" dilation {op.options['dilation']}"
        conv = layer.conv
        expected = _signature("DEPTHWISE_CONV_2D" if layer.depthwise else "CONV_2D", conv.kernel_size, conv.stride,
                              str((conv.padding[0],) * 2 + (conv.padding[1],) * 2),
                              "relu6" if isinstance(layer.act, nn.ReLU6) else "relu")
        if found != expected:
            raise _structure_error(path, f"operator {op.index} is '{found}', but layer {name} is '{expected}'")
        w = _dequantize(weight, f"{name} weight")
        # TFLite conv weights are OHWI, depthwise 1HWC; PyTorch wants OIHW and (C,1,H,W).
        w = w.transpose(3, 0, 1, 2) if layer.depthwise else w.transpose(0, 3, 1, 2)
        state_dict[f"{name}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        state_dict[f"{name}.conv.bias"] = torch.from_numpy(_dequantize(tensors[op.inputs[2]], f"{name} bias"))
        layer_of_output[op.outputs[0]] = name

    _check_decoder(path, module, ops, producers, layer_of_output)
    load_state_dict_strict(module, state_dict, source=str(path))


def _check_input_range(path: Path, tensors: list[_Tensor], inputs: list[int]) -> None:
    """FastDepth takes RGB/255 (the spec's mean 0, std 1); a quantized input must decode to exactly [0, 1]."""
    if len(inputs) != 1 or inputs[0] < 0:
        raise _structure_error(path, f"{len(inputs)} graph inputs, expected one image")
    image = tensors[inputs[0]]
    if image.dtype in (np.uint8, np.int8) and image.scales is not None and image.zero_points is not None:
        info = np.iinfo(image.dtype)
        low, high = ((np.array([info.min, info.max]) - image.zero_points[0]) * image.scales[0]).tolist()
        if abs(low) > 1e-6 or abs(high - 1.0) > 1e-4:
            raise _structure_error(path, f"input {image.name!r} decodes to [{low:.4g}, {high:.4g}], "
                                         "but FastDepth here expects RGB scaled to [0, 1]")


def _check_decoder(path: Path, module: FastDepth, ops: list[_Op], producers: dict[int, _Op],
                   layer_of_output: dict[int, str]) -> None:
    """Every upsample must be a plain 2x nearest, and each skip ADD must join the same decoder stage
    and encoder block as FastDepth.forward does."""
    resizes = [op for op in ops if op.name == "RESIZE_NEAREST_NEIGHBOR"]
    if len(resizes) != len(module.decoder) or any(op.options["align_corners"] for op in resizes):
        raise _structure_error(path, f"{len(resizes)} nearest-neighbour resizes (align_corners "
                                     f"{[op.options['align_corners'] for op in resizes]}), expected "
                                     f"{len(module.decoder)} without align_corners")
    found = []
    for add in (op for op in ops if op.name == "ADD"):
        sources = []
        for tensor in add.inputs:
            producer = producers.get(tensor)
            if producer is not None and producer.name == "RESIZE_NEAREST_NEIGHBOR":
                sources.append(layer_of_output.get(producer.inputs[0], "?") + " (upsampled)")
            else:
                sources.append(layer_of_output.get(tensor, "?"))
        found.append((sorted(sources), _ACTIVATIONS.get(add.options["activation"], "?")))
    expected = [(sorted([f"decoder.{stage}.pointwise (upsampled)", f"blocks.{block}.pointwise"]), "none")
                for stage, block in SKIPS.items()]
    if sorted(found) != sorted(expected):
        raise _structure_error(path, f"skip connections {found}, expected {expected}")


SPEC = register_model(ModelSpec(
    name="fastdepth", build=FastDepth, load_weights=load_fastdepth_tflite,
    native_input_size=(224, 224), patch_multiple=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    native_output="depth", license="MIT (dwofk/fast-depth; TFLite from openmv/openmv, see PROVENANCE)",
    weight_source="openmv/openmv lib/models/fast_depth_224.tflite (PR #2876), sha256 e8957602...; "
                  "local copy in ../shared/weights/fastdepth/",
    hub_weights=None, default_weights="../shared/weights/fastdepth/fast_depth_224.tflite",
    description="FastDepth: MobileNetV1 + NNConv5 depthwise decoder, NYU-trained, metric depth"))
