"""The inputs and outputs the device sees, and the Track 3 contract: the compiled model's I/O checked
against the contract, where the device jobs' I/O is read (the compiled model, the artifact's own
graph, or AI Hub's record of the upload), and contract images to and from the device's dtypes
(quantized with --quantize_io)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from lpcv_depth.backends.ai_hub import HubError, TensorInfo
from lpcv_depth.contract import TRACK3
from lpcv_depth.results import HubContract
from lpcv_depth.stages.hub_jobs import ArtifactRun, DeviceModel

__all__ = ["io_line", "contract_check", "device_io", "to_device", "from_device"]


def io_line(io: tuple[list[TensorInfo], list[TensorInfo]]) -> str:
    def one(t: TensorInfo) -> str:
        quantized = f" scale {t.scale:g} zero point {t.zero_point:g}" if t.scale is not None else ""
        return f"{t.name} {t.dtype}{list(t.shape) if t.shape else ''}{quantized}"

    return ", ".join(one(t) for t in io[0]) + " -> " + ", ".join(one(t) for t in io[1])


def _tensor_problems(side: str, tensors: list[TensorInfo], spec) -> list[str]:
    """One side of the I/O against the contract: a single tensor, its name and shape, and a float32
    dtype or a quantized one whose scale and zero point cover the contract's value range."""
    if len(tensors) != 1:
        return [f"{len(tensors)} {side}s, the contract has one ({spec.name!r})"]
    tensor, problems = tensors[0], []
    if tensor.name != spec.name:
        problems.append(f"{side} is named {tensor.name!r}, the contract says {spec.name!r}")
    if tensor.shape is not None and tuple(tensor.shape) != spec.concrete_shape(1):
        problems.append(f"{side} shape {tuple(tensor.shape)}, the contract says {spec.concrete_shape(1)}")
    if tensor.dtype.startswith("float"):
        if tensor.dtype != spec.dtype:
            problems.append(f"{side} dtype {tensor.dtype}, the contract says {spec.dtype}")
        return problems
    if tensor.scale is None:
        return [*problems, f"{side} is {tensor.dtype} without a scale and zero point (not quantized I/O)"]
    limits = np.iinfo(np.dtype(tensor.dtype))
    zero = tensor.zero_point or 0.0
    low, high = tensor.scale * (limits.min - zero), tensor.scale * (limits.max - zero)
    want_low, want_high = spec.value_range
    if low > want_low + tensor.scale or high < want_high - tensor.scale:
        problems.append(f"{side} {tensor.dtype} with scale {tensor.scale:g} and zero point {zero:g} covers "
                        f"[{low:g}, {high:g}], the contract's range is [{want_low:g}, {want_high:g}]")
    return problems


def contract_check(io: tuple[list[TensorInfo], list[TensorInfo]]) -> HubContract:
    problems = _tensor_problems("input", io[0], TRACK3.input) + _tensor_problems("output", io[1], TRACK3.output)
    return HubContract(ok=not problems, problems=problems, inputs=[t.describe() for t in io[0]],
                       outputs=[t.describe() for t in io[1]])


def _graph_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """An ONNX graph's inputs and outputs (a symbolic batch axis counts as 1)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}

    def tensors(values) -> list[TensorInfo]:
        return [TensorInfo(v.name, np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                           tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim))
                for v in values if v.name not in weights]

    return tensors(graph.input), tensors(graph.output)


def _hub_io(run: ArtifactRun, model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The uploaded model's I/O from AI Hub: a model fresh from an upload has none until the hub has
    read the file, so ask again every --poll seconds, within --timeout."""
    started = time.monotonic()
    while (io := run.client.io_spec(model)) is None:
        if time.monotonic() - started >= run.config.timeout:
            raise HubError(f"AI Hub has not read the inputs and outputs of model {model.model_id} within "
                           f"--timeout {run.config.timeout:g}s",
                           hint="rerun later (it resumes); for a context binary, pass its htp-check folder, whose "
                                "companion ONNX declares them")
        time.sleep(run.config.poll)
    return io


def device_io(run: ArtifactRun, model: DeviceModel) -> tuple[tuple[list[TensorInfo], list[TensorInfo]], str]:
    """What the device jobs' model takes and returns, and where that was read: the compiled model on
    the hub, the artifact's own graph, or the hub's record of the upload."""
    with run.log.step("device-io") as step:
        if model.io is not None:
            io, source = model.io, "the compiled model on AI Hub"
        elif run.artifact.io_onnx is not None:
            io, source = _graph_io(run.artifact.io_onnx), f"the graph of {run.artifact.io_onnx.name}"
        else:
            io, source = _hub_io(run, model.handle), "AI Hub's record of the upload"
        if not io[0] or not io[1]:
            raise HubError(f"the model on the device has {len(io[0])} inputs and {len(io[1])} outputs ({source})",
                           hint="export the model with the Track 3 contract (one input, one output)")
        step.detail = f"{io_line(io)} (from {source})"
    return io, source


def to_device(images: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Contract images in the model's input dtype (quantized when compiled with --quantize_io)."""
    if tensor.dtype.startswith("float"):
        return images.astype(tensor.dtype)
    if tensor.scale is None:
        raise HubError(f"the model's input {tensor.name!r} is {tensor.dtype} without a scale",
                       hint="compile without --quantize_io, or report the model")
    limits = np.iinfo(np.dtype(tensor.dtype))
    quantized = np.round(images / tensor.scale + (tensor.zero_point or 0.0))
    return np.clip(quantized, limits.min, limits.max).astype(tensor.dtype)


def from_device(array: np.ndarray, tensor: TensorInfo | None) -> np.ndarray:
    array = np.asarray(array)
    if tensor is not None and not np.issubdtype(array.dtype, np.floating):
        if tensor.scale is None:
            raise HubError(f"the device output {tensor.name!r} is {array.dtype} without a scale to dequantize it")
        array = (array.astype(np.float32) - (tensor.zero_point or 0.0)) * tensor.scale
    shape = TRACK3.output.concrete_shape(1)
    if array.size != int(np.prod(shape)):
        raise HubError(f"device output has shape {array.shape}; the contract output is {shape}",
                       hint="the compiled model does not keep the Track 3 output; check the compile options")
    return array.astype(np.float32).reshape(shape)
