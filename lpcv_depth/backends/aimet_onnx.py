"""Everything that touches aimet-onnx (issue #26, route (a)): AIMET's QuantSim built on the ONNX graph
itself and calibrated through ONNX Runtime. aimet-onnx is imported lazily, and a missing install names
the command that fixes it.

What the route needs that aimet-onnx does not do by itself (measured: docs/ptq.md, "The aimet-onnx
route"): shared initializers duplicated before a QDQ export with int32 biases, the graph at opset 21
(the QDQ export crashes at 17, and 16-bit QuantizeLinear needs 21 anyway), Relu outputs and the output
tail calibrated min-max (aimet-onnx applies the chosen scheme to them, aimet-torch does not), int32
biases, and each artifact in one file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lpcv_depth.backends.aimet import export_folder, inline_external_data, keep
from lpcv_depth.errors import MissingDependencyError

__all__ = ["AIMET_ONNX_INSTALL", "import_aimet_onnx", "OnnxGraph", "load_for_quantsim", "build_quantsim",
           "output_tail", "calibrate_min_max", "calibration_analyzers", "calibrate", "run_forward", "export_qdq",
           "export_for_ai_hub"]

AIMET_ONNX_INSTALL = 'pip install "aimet-onnx==2.42.0"   (or: pip install -e ".[quant]")'
HTP_V75 = "htp_v75"
QDQ_OPSET = 21
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCHEME_LABELS = {"min_max": "min-max", "post_training_tf_enhanced": "tf-enhanced"}
_QUANTIZE_OP = "QcQuantizeOp"


def import_aimet_onnx():
    """aimet_onnx's QuantizationSimModel and QuantScheme, or a MissingDependencyError with the install command."""
    try:
        from aimet_onnx.common.defs import QuantScheme
        from aimet_onnx.quantsim import QuantizationSimModel
    except ImportError as err:
        raise MissingDependencyError(f"aimet-onnx is not importable: {err}", hint=AIMET_ONNX_INSTALL) from err
    return QuantizationSimModel, QuantScheme


@contextmanager
def _quiet() -> Iterator[None]:
    """aimet-onnx logs one INFO line per conv (weight scales adjusted against bias overflow)."""
    logger = logging.getLogger("Quant")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class OnnxGraph:
    """The float graph a QuantSim is built on, and what was done to it first."""

    model: object  # onnx.ModelProto
    source_opset: int
    duplicated_initializers: int
    folded_batch_norms: int


def load_for_quantsim(path: Path, *, bn_fold: bool) -> OnnxGraph:
    """The ONNX model at `path` at opset 21, each shared initializer duplicated (an int32 bias shared by
    two nodes cannot take two scales), and optionally its BatchNorms folded into the convs before them."""
    import onnx
    from onnx import version_converter

    import_aimet_onnx()
    from aimet_onnx.utils import duplicate_shared_initializers

    model = onnx.load(os.fspath(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_OPSET:
        model = version_converter.convert_version(model, QDQ_OPSET)
    duplicated = duplicate_shared_initializers(model.graph)
    folded = 0
    if bn_fold and any(node.op_type == "BatchNormalization" for node in model.graph.node):
        from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

        with _quiet():
            folded = len(fold_all_batch_norms_to_weight(model)[0])
    return OnnxGraph(model=model, source_opset=opset, duplicated_initializers=duplicated, folded_batch_norms=folded)


def build_quantsim(graph: OnnxGraph, *, param_bw: int, activation_bw: int, scheme: str, workdir: Path):
    """aimet-onnx's QuantSim of the graph with the HTP V75 rules (ONNX Runtime on the CPU)."""
    QuantizationSimModel, QuantScheme = import_aimet_onnx()
    schemes = {"min-max": QuantScheme.min_max, "tf-enhanced": QuantScheme.post_training_tf_enhanced}
    with _quiet():
        return QuantizationSimModel(graph.model, param_type=f"int{param_bw}", activation_type=f"int{activation_bw}",
                                    quant_scheme=schemes[scheme], config_file=HTP_V75, path=os.fspath(workdir))


def _graph_links(sim):
    graph = sim.model.model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return graph, producers, consumers


def _activation_quantizers(sim) -> dict[str, object]:
    """tensor name -> its enabled activation quantizer."""
    return {name: sim.qc_quantize_op_dict[name] for name in sim.activation_names
            if name in sim.qc_quantize_op_dict and sim.qc_quantize_op_dict[name].enabled}


def output_tail(sim) -> list[str]:
    """The quantized tensors from the last weighted op's output to the model output: after that op the
    network only resizes and normalises its answer. aimet-onnx quantizes tensors, not a consumer's
    input, so the torch path's requantized input of the last conv has no equivalent here."""
    graph, _, consumers = _graph_links(sim)
    initializers = {tensor.name for tensor in graph.initializer}
    weighted = [node for node in graph.node if node.op_type in WEIGHTED_OPS
                and any(_source(name, graph) in initializers for name in node.input[1:])]
    if not weighted:
        return []
    reached, stack = [], [weighted[-1].output[0]]
    while stack:
        name = stack.pop()
        if name in reached:
            continue
        reached.append(name)
        for node in consumers.get(name, []):
            stack.extend(node.output)
    quantized = _activation_quantizers(sim)
    return [name for name in reached if name in quantized]


def _source(name: str, graph) -> str:
    """A weight reaches its op through its QcQuantizeOp: the name of the tensor before it."""
    for node in graph.node:
        if node.op_type == _QUANTIZE_OP and name in node.output:
            return node.input[0]
    return name


def calibrate_min_max(sim, tail: list[str]) -> dict[str, list[str]]:
    """Relu outputs and the output tail calibrated min-max, whatever the scheme elsewhere: aimet-torch
    calibrates Relu outputs (which the HTP config pins at min 0) min-max, and the tail carries absolute
    depth, where tf-enhanced clips the per-image maximum (measured: docs/ptq.md). Returns the names."""
    _, QuantScheme = import_aimet_onnx()
    _, producers, _ = _graph_links(sim)
    quantized = _activation_quantizers(sim)
    relu = [name for name in quantized if getattr(producers.get(name), "op_type", None) == "Relu" and name not in tail]
    for name in (*relu, *tail):
        if quantized[name].quant_scheme != QuantScheme.min_max:
            quantized[name].set_quant_scheme(QuantScheme.min_max)
    return {"relu_outputs": relu, "output_tail": tail}


def calibration_analyzers(sim) -> dict[str, int]:
    """How many enabled activation quantizers each calibration method sets (as aimet.calibration_analyzers)."""
    counts = Counter(SCHEME_LABELS.get(q.quant_scheme.name, q.quant_scheme.name)
                     for q in _activation_quantizers(sim).values())
    return dict(counts.most_common())


def calibrate(sim, batches, progress: Callable | None = None) -> None:
    """compute_encodings through the sim's ONNX Runtime session, one image per run."""
    input_name = sim.session.get_inputs()[0].name

    def forward(session):
        for batch in batches:
            session.run(None, {input_name: np.asarray(batch)})
            if progress:
                progress()

    with _quiet():
        sim.compute_encodings(forward)


def run_forward(sim, batches) -> np.ndarray:
    input_name = sim.session.get_inputs()[0].name
    return np.concatenate([sim.session.run(None, {input_name: np.asarray(batch)})[0] for batch in batches])


def export_qdq(sim, path: Path) -> Path:
    """QuantizeLinear/DequantizeLinear ONNX for ONNX Runtime and the HTP check: int32 biases (else they
    stay float), weights stored int8, one file."""
    import onnx

    with _quiet():
        model = sim.to_onnx_qdq(export_int32_bias=True, prequantize_constants=True)
    with export_folder(path.parent) as work:
        onnx.save(model, os.fspath(work / path.name))
        return keep(work / path.name, path.parent)


def export_for_ai_hub(sim, folder: Path, name: str) -> tuple[Path, Path]:
    """ONNX + AIMET .encodings in a `<name>.aimet` folder (AI Hub's layout), int32 bias encodings,
    weights inside the .onnx."""
    with export_folder(folder.parent) as work, _quiet():
        sim.export(os.fspath(work), name, export_int32_bias=True)
        if not (work / f"{name}.encodings").is_file():
            raise RuntimeError(f"aimet-onnx did not write {name}.encodings")
        inline_external_data(work / f"{name}.onnx")
        folder.mkdir(parents=True, exist_ok=True)
        return keep(work / f"{name}.onnx", folder), keep(work / f"{name}.encodings", folder)
