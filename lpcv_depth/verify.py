"""Verification as its own step: names first, then shapes and dtypes, then numbers.

Every check returns what it measured; a failing check raises a typed error that carries the
measurement and the threshold it missed. Thresholds come from config, never from literals here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lpcv_depth.contract import Contract
from lpcv_depth.errors import ConfigError, ContractError, ParityError
from lpcv_depth.manifest import Manifest
from lpcv_depth.results import OutputComparison

_ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT, without importing onnx for a constant


@dataclass(frozen=True)
class ParityThresholds:
    """How far a runtime may drift from its reference before the stage fails."""

    max_abs_diff: float = 1e-3
    min_sqnr_db: float = 40.0

    def __post_init__(self):
        if not self.max_abs_diff > 0:
            raise ConfigError(f"max_abs_diff must be > 0, got {self.max_abs_diff}")
        if not math.isfinite(self.min_sqnr_db):
            raise ConfigError(f"min_sqnr_db must be finite, got {self.min_sqnr_db}")


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (inf when equal)."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((reference - np.asarray(test, np.float64)) ** 2))
    signal = float(np.sum(reference ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def scale_aligned_sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over samples of the SQNR after the least-squares scale that best maps `test` onto `reference`.

    The Track 3 scorer rescales every prediction by median(gt)/median(pred), so a per-image scale
    error costs nothing there, while plain SQNR counts it fully (and per-sample max normalisation
    turns one clipped pixel into a scale error of the whole map).
    """
    values = []
    for ref, out in zip(np.asarray(reference, np.float64), np.asarray(test, np.float64)):
        energy = float(np.sum(out * out))
        scale = float(np.sum(ref * out)) / energy if energy > 0 else 1.0
        values.append(sqnr_db(ref, out * scale))
    return float(np.mean(values))


def output_fidelity(reference: np.ndarray, test: np.ndarray, *, fscore: bool = True, scale_aligned: bool = False,
                    float64_diff: bool = False, **fscore_options) -> OutputComparison:
    """How closely `test` follows `reference`, image by image stacked along the first axis: SQNR, max
    abs diff and (with `fscore`) the Track 3 F-score@0.1 of each image with its reference as pseudo
    ground truth, averaged; `fscore_options` go to `fscore_against_reference` (max_points, workers).
    With `scale_aligned`, also the SQNR after a per-image scale fit. The max abs diff is taken in the
    arrays' own dtype, or with `float64_diff` of their exact float64 difference (the HTP check's
    record), so every stage keeps the figures it always recorded."""
    difference = (reference.astype(np.float64) - test) if float64_diff else (reference - test)
    per_image = None
    if fscore:
        from lpcv_depth.track3_metric import FSCORE, fscore_against_reference

        per_image = [fscore_against_reference(t, r, **fscore_options)[FSCORE] for t, r in zip(test, reference)]
    return OutputComparison(sqnr_db=sqnr_db(reference, test), max_abs_diff=float(np.max(np.abs(difference))),
                            fscore=float(np.mean(per_image)) if per_image is not None else None,
                            sqnr_db_scale_aligned=scale_aligned_sqnr_db(reference, test) if scale_aligned else None,
                            fscore_per_image=per_image)


def recorded_sha256(manifest: Manifest, name: str) -> str | None:
    """The sha256 a stage recorded for one of its input files (its manifest's `inputs`)."""
    record = manifest.inputs.get(name)
    return record.get("sha256") if isinstance(record, dict) else None


def recorded_path(manifest: Manifest, name: str) -> str | None:
    """The path a stage recorded for one of its input files, as it was written."""
    record = manifest.inputs.get(name)
    return record.get("path") if isinstance(record, dict) else None


def compare_outputs(reference: np.ndarray, test: np.ndarray, thresholds: ParityThresholds,
                    what: str) -> dict[str, float]:
    """Max abs diff and SQNR of `test` vs `reference`; ParityError past the thresholds."""
    if reference.shape != test.shape:
        raise ContractError(f"{what}: output shapes differ: {reference.shape} vs {test.shape}")
    measured = {"max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - test))),
                "sqnr_db": sqnr_db(reference, test)}
    if measured["max_abs_diff"] > thresholds.max_abs_diff or measured["sqnr_db"] < thresholds.min_sqnr_db:
        raise ParityError(
            f"{what}: max abs diff {measured['max_abs_diff']:.3g} (limit {thresholds.max_abs_diff:g}), "
            f"SQNR {measured['sqnr_db']:.1f} dB (minimum {thresholds.min_sqnr_db:g} dB)",
            measured=measured, threshold=asdict(thresholds),
            hint="the exported graph computes something different from the torch model; try another --opset "
                 "or --exporter, or loosen the thresholds only if the difference is understood")
    return measured


def check_onnx_io(model, contract: Contract, batch: int) -> dict[str, object]:
    """Names, then shapes, then dtypes of an ONNX model's graph inputs and outputs."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    outputs = list(graph.output)
    found = {"inputs": [v.name for v in inputs], "outputs": [v.name for v in outputs]}
    expected = {"inputs": [contract.input.name], "outputs": [contract.output.name]}
    if found != expected:
        raise ContractError(f"ONNX I/O names {found} do not match the contract {expected}",
                            hint="export with input name 'image' and output name 'depth'")
    for value, spec in ((inputs[0], contract.input), (outputs[0], contract.output)):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
        want = list(spec.concrete_shape(batch))
        if dims != want:
            raise ContractError(f"ONNX {spec.name!r} has shape {dims}, the contract needs {want}",
                                hint="export with static shapes at the contract size")
        if tensor_type.elem_type != _ONNX_FLOAT:
            raise ContractError(f"ONNX {spec.name!r} has element type {tensor_type.elem_type}, the contract needs float32")
    return {"input": contract.input.name, "output": contract.output.name, "batch": batch}


def check_output_range(outputs: np.ndarray, contract: Contract, tolerance: float = 1e-5) -> dict[str, float]:
    """The contract's value range on real outputs, per sample."""
    low, high = contract.output.value_range
    measured = {"min": float(np.min(outputs)), "max": float(np.max(outputs))}
    if not np.all(np.isfinite(outputs)):
        raise ContractError("model output contains NaN or Inf", hint="check the model's numerics and weights")
    if measured["min"] < low - tolerance or measured["max"] > high + tolerance:
        raise ContractError(f"model output range [{measured['min']:.4g}, {measured['max']:.4g}] is outside "
                            f"the contract range [{low}, {high}]")
    return measured


def has_qdq_nodes(model_path: str | os.PathLike) -> bool:
    import onnx

    graph = onnx.load(os.fspath(model_path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


class OrtRunner:
    """An ONNX Runtime CPU session fed in contract-sized batches.

    A QDQ (int8) model runs with basic graph optimizations only: at the default level ONNX Runtime
    fuses Q/DQ pairs into u8s8 integer kernels, whose intermediate sums saturate on x86 CPUs without
    VNNI (an AMD EPYC with AVX2 only, say; measured in docs/ptq.md). Kept as separate ops, Q/DQ
    compute what AIMET simulates and the phone's HTP runs, on any CPU.
    """

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # ONNX Runtime's pool ignores OMP_NUM_THREADS; a search trial sets it to its CPU share.
        omp_threads = os.environ.get("OMP_NUM_THREADS", "")
        threads = threads or (int(omp_threads) if omp_threads.isdigit() else None)
        if threads:
            options.intra_op_num_threads = threads
        self.exact_qdq = has_qdq_nodes(model_path)
        if self.exact_qdq:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.path = Path(model_path)
        self.session = ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.batch = int(self.session.get_inputs()[0].shape[0])
        self.batch_ms: list[float] = []  # wall time of every session run, in order

    def median_latency_ms(self, image: np.ndarray, runs: int) -> float:
        """Median wall time of one batch over at least `runs` timed runs. Every batch this session
        already ran counts except its first (the warm-up, which allocates); only the shortfall is
        run, on `image`."""
        while len(self.timed_ms) < runs:
            self.run(image)
        return float(np.median(self.timed_ms))

    @property
    def timed_ms(self) -> list[float]:
        """The session's run times that count as latency: all but the first (the warm-up)."""
        return self.batch_ms[1:]

    def run(self, images: np.ndarray) -> np.ndarray:
        """Run all `images` (N,3,H,W), padding the last batch by repetition to the static batch size."""
        results = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            real = len(chunk)
            if real < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - real, axis=0)])
            feed = {self.input_name: chunk.astype(np.float32)}
            start_time = time.perf_counter()
            output = self.session.run(None, feed)[0]
            self.batch_ms.append((time.perf_counter() - start_time) * 1000)
            results.append(output[:real])
        return np.concatenate(results)
