"""An ONNX-only export as a torch model for the aimet-torch path (issue #26, route (b): onnx2torch).

onnx2torch turns each ONNX node into a module of its own. AIMET's model preparation traces the model
with torch.fx and turns functional ops into quantizable modules; onnx2torch's modules for the
elementwise ops, clamps, reductions, resizes and constants branch on their inputs in Python, so fx
cannot trace them. They are lowered here to the torch functions they call (the same functions the
torch wrapper calls), after which AIMET prepares the model exactly as it prepares a registered one.
A model with ops that can be neither converted nor prepared is refused, naming them.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from lpcv_depth.errors import ConfigError, MissingDependencyError

__all__ = ["onnx_to_torch", "lower_onnx2torch_modules", "ONNX2TORCH_PIN", "unconvertible_ops"]

ONNX2TORCH_PIN = "onnx2torch==1.5.15"
_INSTALL_HINT = f"pip install -e '.[quant]' (installs {ONNX2TORCH_PIN})"


def _import_onnx2torch():
    try:
        import onnx2torch
    except ImportError:
        raise MissingDependencyError("ptq on an export made from an ONNX file needs onnx2torch",
                                     hint=_INSTALL_HINT) from None
    return onnx2torch


def unconvertible_ops(model) -> list[str]:
    """The op types of `model` (an onnx.ModelProto) onnx2torch has no converter for."""
    _import_onnx2torch()
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    known = {(key.operation_type, key.version) for key in _CONVERTER_REGISTRY}
    missing = set()
    for node in model.graph.node:
        if not any(op == node.op_type and version <= opset for op, version in known):
            missing.add(node.op_type)
    return sorted(missing)


def onnx_to_torch(path: Path, *, name: str, weights: dict):
    """The ONNX model at `path` as a torch GraphModule in eval mode, lowered for AIMET's preparation,
    with the `spec.name`, `spec.prepare_for_quantization` and `weights_info` the ptq stage reads."""
    import onnx

    from lpcv_depth.models.weights import WeightsInfo

    onnx2torch = _import_onnx2torch()
    model_proto = onnx.load(os.fspath(path))
    missing = unconvertible_ops(model_proto)
    if missing:
        raise ConfigError(f"onnx2torch cannot convert the ops {missing} of {path}, so AIMET cannot quantize it",
                          hint="export the model without these ops (or with an opset onnx2torch supports)")
    try:
        module = onnx2torch.convert(model_proto)
    except Exception as err:  # onnx2torch raises NotImplementedError, KeyError, ... per unsupported attribute
        raise ConfigError(f"onnx2torch cannot convert {path}: {type(err).__name__}: {err}",
                          hint="export the model with plainer ops (static shapes, constant resize sizes)") from None
    module = lower_onnx2torch_modules(module).eval()
    _refuse_untraceable(module, path)
    module.spec = SimpleNamespace(name=name, prepare_for_quantization=None)
    module.weights_info = WeightsInfo(**weights)
    return module


def _refuse_untraceable(module, path: Path) -> None:
    """What torch.fx cannot trace AIMET cannot prepare: its ops would stay float, off the phone's NPU."""
    import torch

    try:
        torch.fx.symbolic_trace(module)
    except Exception as err:
        left = sorted({type(m).__name__ for m in module.modules() if type(m).__module__.startswith("onnx2torch")})
        raise ConfigError(f"AIMET cannot prepare {path} for quantization: torch.fx cannot trace onnx2torch's "
                          f"{left} ({type(err).__name__}: {err})",
                          hint="export the model with static shapes and constant shape arguments, and simplify "
                               "it (onnxsim), so these ops have constant inputs") from None


def lower_onnx2torch_modules(module):
    """Replace onnx2torch's elementwise, clip, reduce, resize and constant modules by the torch calls
    they make, so torch.fx (and so AIMET's preparation) traces the model."""
    import torch

    graph = module.graph
    modules = dict(module.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        lowered = _lowered_call(module, modules, node)
        if lowered is None:
            continue
        with graph.inserting_before(node):
            if lowered[0] == "get_attr":
                replacement = graph.get_attr(lowered[1])
            else:
                replacement = graph.call_function(lowered[1], lowered[2], lowered[3])
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    assert isinstance(module, torch.fx.GraphModule)
    return module


def _constant(module, node):
    """The value of an fx node that is a constant: an initializer (get_attr) or an OnnxConstant."""
    if node is None:
        return None
    if node.op == "get_attr":
        value = module
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    if node.op == "call_module" and type(module.get_submodule(node.target)).__name__ == "OnnxConstant":
        return module.get_submodule(node.target).value
    raise ConfigError("an ONNX Resize has sizes or scales computed in the graph; AIMET needs them constant",
                      hint="export the model with static shapes (no dynamic axes) and simplify it")


def _lowered_call(module, modules, node):
    import torch
    import torch.nn.functional as F

    submodule = modules[node.target]
    kind = type(submodule).__name__
    args = node.args
    if kind == "OnnxConstant":
        value = submodule.value
        if not isinstance(value, torch.Tensor):
            return None
        name = f"lowered_constant_{node.name}"
        module.register_buffer(name, value.clone())
        return ("get_attr", name)
    if kind == "OnnxBinaryMathOperation" and not (submodule.broadcast == 1 and submodule.axis is not None):
        # onnx2torch's Div picks integer or float division at run time; the export's static shapes leave
        # no integer arithmetic after onnxsim, so a Div here is a float division.
        function = submodule.math_op_function
        return ("call", torch.div if function.__name__ == "_onnx_div" else function, tuple(args), {})
    if kind == "OnnxClip":
        return ("call", torch.clamp, (args[0],), {"min": submodule.min_val, "max": submodule.max_val})
    if kind == "OnnxReduceStaticAxes" and submodule.axes:
        functions = {"ReduceMax": torch.amax, "ReduceMin": torch.amin, "ReduceMean": torch.mean,
                     "ReduceSum": torch.sum}
        function = functions.get(submodule.operation_type)
        if function is None:
            return None
        return ("call", function, (args[0],), {"dim": tuple(submodule.axes), "keepdim": submodule.keepdims})
    if kind == "OnnxResize":
        return _lowered_resize(module, submodule, node, F)
    return _lowered_tensor_op(module, kind, submodule, node)


def _lowered_tensor_op(module, kind: str, submodule, node):
    """The shape and matmul ops of a transformer (DA-V2's ViT), where their shapes and indices are constant."""
    import operator

    import torch

    args = node.args
    simple = {"OnnxMatMul": torch.matmul, "OnnxErf": torch.erf}
    if kind in simple:
        return ("call", simple[kind], tuple(args), {})
    if kind == "OnnxTranspose" and submodule.perm is not None:
        return ("call", torch.permute, (args[0], tuple(submodule.perm)), {})
    if kind == "OnnxConcat":
        return ("call", torch.cat, (list(args),), {"dim": submodule.axis})
    if kind == "OnnxReshape":
        shape = _constant_or_none(module, args[1])
        if shape is None or bool((shape == 0).any()):
            return None
        return ("call", torch.reshape, (args[0], tuple(int(v) for v in shape.tolist())), {})
    if kind == "OnnxGather":
        indices = _constant_or_none(module, args[1])
        if indices is None or indices.dim() > 1 or submodule._axis < 0:
            return None
        index = int(indices) if indices.dim() == 0 else [int(v) for v in indices.tolist()]
        return ("call", operator.getitem, (args[0], (slice(None),) * submodule._axis + (index,)), {})
    if kind == "OnnxSlice":
        return _lowered_slice(module, node)
    return None


def _lowered_slice(module, node):
    import operator

    inputs = dict(zip(("input_tensor", "starts", "ends", "axes", "steps"), node.args)) | dict(node.kwargs)
    values = {name: _constant_or_none(module, inputs.get(name)) for name in ("starts", "ends", "axes", "steps")}
    if values["starts"] is None or values["ends"] is None:
        return None
    starts, ends = values["starts"].tolist(), values["ends"].tolist()
    axes = values["axes"].tolist() if values["axes"] is not None else list(range(len(starts)))
    steps = values["steps"].tolist() if values["steps"] is not None else [1] * len(starts)
    if min(axes) < 0 or min(steps) < 1:
        return None
    index = [slice(None)] * (max(axes) + 1)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[axis] = slice(int(start), int(end), int(step))
    return ("call", operator.getitem, (inputs["input_tensor"], tuple(index)), {})


def _constant_or_none(module, node):
    if node is None or not hasattr(node, "op"):
        return None
    try:
        return _constant(module, node)
    except ConfigError:
        return None


def _lowered_resize(module, submodule, node, F):
    modes = {"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}
    # onnx2torch passes the optional inputs it was given by keyword.
    inputs = dict(zip(("input_tensor", "roi", "scales", "sizes"), node.args)) | dict(node.kwargs)
    x, scales, sizes = inputs["input_tensor"], inputs.get("scales"), inputs.get("sizes")
    sizes_value = _constant(module, sizes) if sizes is not None else None
    scales_value = _constant(module, scales) if scales is not None else None
    kwargs = {"mode": modes.get(submodule.onnx_mode, submodule.onnx_mode), "align_corners": submodule.align_corners}
    if sizes_value is not None and sizes_value.numel():
        kwargs["size"] = tuple(int(v) for v in sizes_value.tolist()[2:])
    elif scales_value is not None and scales_value.numel():
        kwargs["scale_factor"] = tuple(float(v) for v in scales_value.tolist()[2:])
    else:
        return None
    if kwargs["mode"] == "nearest":
        kwargs.pop("align_corners")
    return ("call", F.interpolate, (x,), kwargs)
