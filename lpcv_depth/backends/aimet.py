"""Everything that touches AIMET. aimet-torch is imported lazily, so the rest of the project (and
its tests) work without it, and a missing install names the exact command that fixes it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lpcv_depth.errors import MissingDependencyError
from lpcv_depth.verify import sqnr_db

AIMET_INSTALL = 'pip install "aimet-torch==2.42.0"   (or: pip install -e ".[quant]")'
HTP_V75_CONFIG = "htp_quantsim_config_v75.json"


def import_aimet():
    """The aimet_torch modules this stage uses, or a MissingDependencyError with the install command."""
    try:
        import aimet_torch
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as err:
        raise MissingDependencyError(f"aimet-torch is not importable: {err}", hint=AIMET_INSTALL) from err
    return aimet_torch, QuantScheme, QuantizationSimModel


def htp_v75_config_path() -> Path:
    """AIMET's quantizer placement rules for the Snapdragon 8 Gen 3 HTP (V75), shipped with aimet-torch."""
    aimet_torch, _, _ = import_aimet()
    path = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / HTP_V75_CONFIG
    if not path.is_file():
        raise MissingDependencyError(f"AIMET's HTP V75 config {HTP_V75_CONFIG} is missing from {path.parent}",
                                     hint=AIMET_INSTALL)
    return path


def quant_scheme(name: str):
    _, QuantScheme, _ = import_aimet()
    return {"min-max": QuantScheme.post_training_tf, "tf-enhanced": QuantScheme.post_training_tf_enhanced,
            "percentile": QuantScheme.post_training_percentile}[name]


def calibration_analyzers(sim) -> dict[str, int]:
    """How many enabled activation quantizers each calibration method sets, e.g. {"tf-enhanced": 40, "min-max": 13}.

    Not always the chosen scheme: aimet-torch calibrates min-max every quantizer the quantsim config
    constrains (quantsim_config/builder.py, `encoding_min_max_fixed_vals`), and the HTP V75 config pins
    every Relu output's min at 0. That measured better than tf-enhanced on those outputs (docs/ptq.md,
    "Relu outputs stay min-max"), so the report states it instead of undoing it."""
    names = {"MinMaxEncodingAnalyzer": "min-max", "TfEnhancedEncodingAnalyzer": "tf-enhanced",
             "PercentileEncodingAnalyzer": "percentile"}
    counts: dict[str, int] = {}
    for module in sim.model.modules():
        for _, _, quantizer in activation_slots(module):
            analyzer = getattr(quantizer, "encoding_analyzer", None)
            if analyzer is not None:
                # By the AIMET class it behaves as: the exact fast histogram is still tf-enhanced.
                label = next((names[cls.__name__] for cls in type(analyzer).__mro__ if cls.__name__ in names),
                             type(analyzer).__name__)
                counts[label] = counts.get(label, 0) + 1
    return counts


def activation_slots(module) -> Iterator[tuple[str, int, object]]:
    """("input"|"output", index, quantizer) for every enabled activation quantizer of one module."""
    for kind in ("input", "output"):
        for index, quantizer in enumerate(getattr(module, f"{kind}_quantizers", None) or []):
            if quantizer is not None:
                yield kind, index, quantizer


def _execution_order(model, dummy) -> tuple[list[str], list[int]]:
    """The leaf modules in the order one forward pass runs them (hooks), and the positions in that
    order of those holding parameters of their own."""
    import torch

    order: list[str] = []
    leaves = [(name, module) for name, module in model.named_modules() if not list(module.children())]
    hooks = [module.register_forward_hook(lambda _module, _args, _out, name=name: order.append(name))
             for name, module in leaves]
    try:
        with torch.no_grad():
            model(dummy)
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(leaves)
    weighted = [i for i, name in enumerate(order) if next(modules[name].parameters(recurse=False), None) is not None]
    return order, weighted


def output_tail(model, dummy) -> list[str]:
    """Leaf modules from the last weighted layer to the model output, in execution order (one forward
    pass with hooks). After that layer the network only resizes and normalises its answer."""
    order, weighted = _execution_order(model, dummy)
    if not weighted:
        return []
    return list(dict.fromkeys(order[weighted[-1]:]))


def weighted_layers(model, dummy) -> list[str]:
    """The modules holding weights, in the order a forward pass runs them (each once)."""
    order, weighted = _execution_order(model, dummy)
    return list(dict.fromkeys(order[i] for i in weighted))


def keep_weights_at(sim, layers: list[str], bitwidth: int) -> list[str]:
    """Quantize the weights of `layers` at `bitwidth` instead of the preset's width, before
    calibration; returns the layers changed (those that have a weight quantizer)."""
    modules = dict(sim.model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:  # found on another model object; keeping nothing would go unnoticed
        raise RuntimeError(f"weighted layers {missing} are not in the QuantSim model")
    kept = []
    for name in layers:
        quantizers = getattr(modules[name], "param_quantizers", None)
        if quantizers is not None and "weight" in quantizers and quantizers["weight"] is not None:
            quantizers["weight"].bitwidth = bitwidth
            kept.append(name)
    return kept


def widen_output_tail(sim, tail: list[str], bitwidth: int) -> list[str]:
    """Quantize the activations of `tail` (from output_tail) at `bitwidth` with min-max ranges, before
    calibration. Returns their names.

    The last weighted layer gets its own input quantizer at `bitwidth` (a requantization of the 8-bit
    tensor feeding it): QNN refuses a conv with an 8-bit input and a 16-bit output, and widening
    the producer instead only moves that problem up when the producer is a conv too (DA-V2's head).
    Min-max, whatever the scheme elsewhere: at 16 bits the steps of even the widest calibrated depth
    range are far below what the scorer resolves, so there is no rounding noise to trade for clipping,
    and clipping the far wall flattens real geometry (measured: docs/ptq.md, "The output tail")."""
    from aimet_torch.quantization.affine import QuantizeDequantize
    from aimet_torch.quantization.encoding_analyzer import MinMaxEncodingAnalyzer

    modules = dict(sim.model.named_modules())
    widened = []
    missing = [name for name in tail if name not in modules]
    if missing:  # the tail was found on another model object; widening nothing would go unnoticed
        raise RuntimeError(f"output tail modules {missing} are not in the QuantSim model")
    for position, name in enumerate(tail):
        module = modules[name]
        if position == 0 and getattr(module, "input_quantizers", None) and module.input_quantizers[0] is None:
            module.input_quantizers[0] = QuantizeDequantize((), bitwidth, False, MinMaxEncodingAnalyzer(()))
        for kind, index, quantizer in activation_slots(module):
            quantizer.bitwidth = bitwidth
            quantizer.encoding_analyzer = MinMaxEncodingAnalyzer(quantizer.encoding_analyzer.observer.shape)
            widened.append(f"{name}:{kind}{index}")
    return widened


@dataclass
class Preparation:
    """What AIMET's model preparation did: QuantSim only quantizes nn.Module layers, so functional
    ops (matmul, softmax, residual adds, interpolate, the wrapper's normalisation) must become modules."""

    traced: bool
    modules_added: int = 0
    error: str | None = None


def prepare_for_quantsim(model):
    """The model with its functional ops turned into quantizable modules (torch.fx), or the model
    unchanged plus the reason when it cannot be traced; the caller decides how loudly to say so."""
    import logging

    from aimet_torch.model_preparer import prepare_model

    before = sum(1 for _ in model.modules())
    preparer_log = logging.getLogger("ModelPreparer")
    level = preparer_log.level
    preparer_log.setLevel(logging.WARNING)  # it logs one INFO line per converted op
    try:
        prepared = prepare_model(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not traceable"; the reason is kept
        return model, Preparation(traced=False, error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
    finally:
        preparer_log.setLevel(level)
    return prepared, Preparation(traced=True, modules_added=sum(1 for _ in prepared.modules()) - before)


def has_batch_norm(model) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(module, _BatchNorm) for module in model.modules())


def fold_batch_norms(model, dummy) -> int:
    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    # AIMET traces the whole model to find conv/BN pairs even when there is no BatchNorm (a ViT).
    if not has_batch_norm(model):
        return 0
    return len(fold_all_batch_norms(model, input_shapes=None, dummy_input=dummy))


def cross_layer_equalize(model, dummy) -> None:
    import warnings

    from aimet_torch.cross_layer_equalization import equalize_bn_folded_model, equalize_model

    with warnings.catch_warnings():
        # AIMET warns that conv-ReLU6-conv pairs are not scaled; that is expected and reported as "no pairs".
        warnings.simplefilter("ignore", DeprecationWarning)
        if has_batch_norm(model):
            equalize_model(model, dummy_input=dummy)
        else:
            # equalize_model = fold_all_batch_norms + this; without a BatchNorm the fold finds no pair
            # and changes nothing, but traces the whole model once more to find that out.
            equalize_bn_folded_model(model, None, [], dummy_input=dummy)


def torch_batches(batches: Iterable[np.ndarray]):
    import torch

    return [torch.from_numpy(b) for b in batches]


def run_forward(model, batches, progress: Callable | None = None) -> np.ndarray:
    import torch

    outputs = []
    with torch.no_grad():
        for batch in batches:
            outputs.append(model(batch).cpu().numpy())  # .cpu(): a model on a GPU (ptq --device cuda)
            if progress:
                progress()
    return np.concatenate(outputs)


@dataclass
class Sensitivity:
    """Per-layer activation sensitivity, measured: SQNR of the model with only that layer at 8 bits."""

    baseline_sqnr_db: float
    per_layer_sqnr_db: dict[str, float] = field(default_factory=dict)
    promoted: list[str] = field(default_factory=list)
    threshold_db: float = 0.0


def activation_quantizers(sim, max_bitwidth: int | None = None) -> dict[str, object]:
    """name -> output quantizer of every quantized module that has one (at most `max_bitwidth` bits)."""
    found = {}
    for name, module in sim.model.named_modules():
        quantizers = getattr(module, "output_quantizers", None)
        if quantizers is None:
            continue
        for index, quantizer in enumerate(quantizers):
            if quantizer is not None and (max_bitwidth is None or quantizer.bitwidth <= max_bitwidth):
                found[f"{name}:out{index}" if len(quantizers) > 1 else name] = quantizer
    return found


def promote_sensitive_layers(sim, batches, reference: np.ndarray, *, max_drop_db: float,
                             progress: Callable | None = None) -> Sensitivity:
    """Measured mixed precision: with every activation at 16 bits, put one layer at a time back to
    8 bits and keep at 16 bits the layers whose 8-bit activations cost more than `max_drop_db`.

    The 16-bit baseline isolates each layer's own damage, so a layer is promoted for what it does,
    not for the noise its neighbours feed it.
    """
    # Quantizers already wider than 8 bits (the output tail) were set by rule and stay as they are.
    quantizers = activation_quantizers(sim, max_bitwidth=8)
    for quantizer in quantizers.values():
        quantizer.bitwidth = 16
    baseline = sqnr_db(reference, run_forward(sim.model, batches))
    result = Sensitivity(baseline_sqnr_db=baseline, threshold_db=max_drop_db)
    for name, quantizer in quantizers.items():
        quantizer.bitwidth = 8
        result.per_layer_sqnr_db[name] = sqnr_db(reference, run_forward(sim.model, batches))
        quantizer.bitwidth = 16
        if progress:
            progress()
    for name, quantizer in quantizers.items():
        if baseline - result.per_layer_sqnr_db[name] > max_drop_db:
            result.promoted.append(name)
        else:
            quantizer.bitwidth = 8
    return result


def apply_adaround(model, dummy, batches, *, iterations: int, param_bw: int, scheme, config_file: Path,
                   workdir: Path, device: str = "cpu"):
    """AdaRound the weights on `device` (a resolved --device); returns (adarounded model, on the CPU like
    `model` after the call, and the path of its frozen param encodings)."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters

    from lpcv_depth.device import on_device, to_device

    # AIMET runs AdaRound where the model is, and expects the dummy input there too.
    params = AdaroundParameters(data_loader=to_device(batches, device), num_batches=len(batches),
                                default_num_iterations=iterations, forward_fn=lambda m, batch: m(batch))
    with on_device(model, device):
        adarounded = Adaround.apply_adaround(model, dummy.to(device), params, path=os.fspath(workdir),
                                             filename_prefix="adaround", default_param_bw=param_bw,
                                             default_quant_scheme=scheme, default_config_file=os.fspath(config_file))
    return adarounded.cpu(), workdir / "adaround.encodings"


def apply_seq_mse(sim, batches, candidates: int, device: str = "cpu") -> int:
    """Sequential MSE weight encodings for every Conv2d/Linear, searched on `device` (a resolved --device;
    the sim is back on the CPU after); returns how many layers it optimized.

    aimet-torch 2.42 silently skips layers whose weights have more than 4 bits (its
    SUPPORTED_PARAM_BW), i.e. every layer of our 8-bit presets: `--seq-mse` would be a no-op. The
    search itself (candidate ranges scored by the layer's output MSE) is bit-width agnostic, so the
    limit is lifted for the call; the report's ablation measures what it buys.
    """
    import aimet_torch._base.seq_mse as seq_mse_base
    from aimet_torch.seq_mse import apply_seq_mse as aimet_seq_mse

    from lpcv_depth.device import on_device, to_device

    limit = seq_mse_base.SUPPORTED_PARAM_BW
    seq_mse_base.SUPPORTED_PARAM_BW = 32
    try:
        # AIMET searches where sim.model is (it moves its float copy there).
        with on_device(sim.model, device):
            aimet_seq_mse(sim, to_device(batches, device), num_candidates=candidates,
                          forward_fn=lambda m, batch: m(batch))
    finally:
        seq_mse_base.SUPPORTED_PARAM_BW = limit
    return sum(1 for module in sim.model.modules() if _weight_encoding_frozen(module))


def _weight_encoding_frozen(module) -> bool:
    """SeqMSE freezes the weight encodings it chose (no longer overwritable by compute_encodings)."""
    quantizers = getattr(module, "param_quantizers", None)
    weight = quantizers["weight"] if quantizers is not None and "weight" in quantizers else None
    return weight is not None and not weight.is_overwrite_allowed()


def export_for_ai_hub(sim, dummy, folder: Path, name: str, opset: int, *, dynamo: bool) -> tuple[Path, Path]:
    """ONNX + AIMET .encodings, the layout AI Hub takes for pre-quantized models: a `<name>.aimet`
    folder holding exactly one .onnx and one .encodings (weights kept inside the .onnx). `dynamo`
    picks torch's dynamo exporter over the TorchScript one."""
    with export_folder(folder.parent) as work:
        sim.onnx.export((dummy,), os.fspath(work / f"{name}.onnx"), input_names=["image"], output_names=["depth"],
                        opset_version=opset, dynamo=dynamo)
        if not (work / f"{name}.encodings").is_file():
            raise RuntimeError(f"AIMET did not write {name}.encodings")
        inline_external_data(work / f"{name}.onnx")
        folder.mkdir(parents=True, exist_ok=True)
        return keep(work / f"{name}.onnx", folder), keep(work / f"{name}.encodings", folder)


def export_qdq(sim, dummy, path: Path, opset: int, *, dynamo: bool) -> Path:
    """A QuantizeLinear/DequantizeLinear ONNX that ONNX Runtime runs on the host (`dynamo`: as above)."""
    from aimet_torch.onnx import export as aimet_onnx_export

    with export_folder(path.parent) as work:
        # prequantize_constants stores weights as int8 + DequantizeLinear: a quarter of the float size.
        aimet_onnx_export(sim.model, (dummy,), os.fspath(work / path.name), input_names=["image"],
                          output_names=["depth"], opset_version=opset, dynamo=dynamo, prequantize_constants=True)
        inline_external_data(work / path.name)
        return keep(work / path.name, path.parent)


@contextmanager
def export_folder(parent: Path) -> Iterator[Path]:
    """A folder of its own for one export: the dynamo exporter also leaves files nothing references
    (a `<model>.onnx.data`, one file per lifted tensor of a ViT), which must not sit beside the
    artifacts looking like part of them. Only what `keep` moves out survives."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as work:
        yield Path(work)


def keep(path: Path, folder: Path) -> Path:
    target = folder / path.name
    os.replace(path, target)
    return target


def inline_external_data(path: Path) -> None:
    """Fold the exporter's external weight files back into the .onnx (models here are far below
    protobuf's 2 GB), so each artifact is one self-contained file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = onnx.load(os.fspath(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer if uses_external_data(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    if locations:
        load_external_data_for_model(model, os.fspath(path.parent))
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
        onnx.save(model, os.fspath(path))
