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
    module.spec = SimpleNamespace(name=name, prepare_for_quantization=None)
    module.weights_info = WeightsInfo(**weights)
    return module


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
