"""ptq's aimet-onnx route (`--backend aimet-onnx`, issue #26 route (a)): the export's model.onnx
quantized with AIMET's ONNX flavour, its QuantSim built on the ONNX graph and calibrated through ONNX
Runtime. The calibration split, the checks, the report, the manifest and the gates are ptq's own; only
the float graph, the QuantSim and the exports differ (lpcv_depth/backends/aimet_onnx.py). What the route
cannot apply is refused before any work (stages/ptq_backend.py). Measured: docs/ptq.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lpcv_depth.host import keep_freed_memory
from lpcv_depth.manifest import Manifest
from lpcv_depth.results import ExportResults, PtqResults
from lpcv_depth.stage import StageLog, StagingDir
from lpcv_depth.stages.int8_outputs import FP32_ONNX, QDQ_ONNX, Artifacts, Progress, sizes
from lpcv_depth.stages.ptq import (STAGE, PtqConfig, PtqOutput, _calibration_data, _Fp32, _Inputs,
                                   check_output_contract, finish, write_outputs)
from lpcv_depth.stages.ptq_verify import verify_int8
from lpcv_depth.verify import OrtRunner, sqnr_db

__all__ = ["run_ptq_aimet_onnx"]

BACKEND = "aimet-onnx"
# ONNX Runtime's CPU provider, whatever --device auto finds (--device cuda is refused: ptq_backend.py).
DEVICE = "cpu"


def run_ptq_aimet_onnx(config: PtqConfig, export: tuple[Manifest, ExportResults], log: StageLog) -> PtqOutput:
    """ptq on an export made from an ONNX file, with aimet-onnx; `export` is the checked export folder."""
    from lpcv_depth.backends import aimet_onnx

    aimet_onnx.import_aimet_onnx()  # before any work: a missing install fails with the command that fixes it
    keep_freed_memory()
    manifest, export_results = export
    inputs = _calibration_data(config, log)
    fp32 = _fp32_reference(config, manifest, export_results, inputs, log)
    techniques: dict = {}
    with StagingDir(config.destination, stage=STAGE, inputs=[config.fp32_dir, config.calib_dir, config.eval_data],
                    scratch=True) as staging:
        sim, analyzers = _quantsim_step(config, fp32, techniques, staging.scratch, log)
        _calibrate_step(sim, inputs, log)
        sim_holdout = _sim_outputs(sim, inputs, fp32, log)
        artifacts = _export_artifacts(sim, staging.path, fp32.name, log)
        checks = verify_int8(config, fp32, artifacts.qdq, sim_holdout, inputs.holdout, log)
        results = PtqResults(model=fp32.name, preset=config.preset, techniques=techniques,
                             fp32_contract=fp32.contract, calibration_analyzers=analyzers, preparation={},
                             qdq_vs_aimet_sim=checks.qdq_vs_aimet_sim, int8_vs_fp32=checks.fidelity,
                             sizes_bytes=sizes(fp32.onnx, artifacts), host_latency_ms=checks.latency,
                             ground_truth=checks.ground_truth, backend=BACKEND, device=DEVICE)
        manifest_path = write_outputs(config, staging.path, manifest, fp32, inputs, artifacts, sim_holdout, checks,
                                      results, log)
    return finish(config, artifacts, manifest_path, results, log)


def _fp32_reference(config: PtqConfig, manifest: Manifest, results: ExportResults, inputs: _Inputs,
                    log: StageLog) -> _Fp32:
    """The fp32 ONNX (sha256-checked with the export) and its outputs on the held-out images: the only
    float model this route has."""
    with log.step("fp32-model") as step:
        onnx_path = config.fp32_dir / FP32_ONNX
        runner = OrtRunner(onnx_path)
        holdout = runner.run(inputs.holdout)
        contract = check_output_contract(holdout, "fp32 ONNX")
        step.detail = f"{results.model['model']} from an ONNX file, quantized with {BACKEND}"
    return _Fp32(name=results.model["model"], model=None, onnx=onnx_path, onnx_sha256=manifest.output_sha256(FP32_ONNX),
                 runner=runner, holdout=holdout, contract=contract, weights=results.weights)


def _quantsim_step(config: PtqConfig, fp32: _Fp32, techniques: dict, scratch: Path, log: StageLog):
    """(sim, the calibration method census): the graph at opset 21 with its shared initializers
    duplicated and BatchNorms folded, the QuantSim with the HTP V75 rules, Relu outputs and the output
    tail set to min-max."""
    from lpcv_depth.backends import aimet_onnx

    preset = config.preset_spec
    with log.step("onnx-graph") as step:
        graph = aimet_onnx.load_for_quantsim(fp32.onnx, bn_fold=config.bn_fold)
        techniques["onnx_graph"] = {"source_opset": graph.source_opset, "opset": aimet_onnx.QDQ_OPSET,
                                    "duplicated_initializers": graph.duplicated_initializers}
        if config.bn_fold:
            techniques["bn_fold"] = {"folded_pairs": graph.folded_batch_norms}
        step.detail = (f"opset {graph.source_opset} -> {aimet_onnx.QDQ_OPSET}, {graph.duplicated_initializers} "
                       f"shared initializers duplicated, {graph.folded_batch_norms} BatchNorm layers folded")
    with log.step("quantsim") as step:
        sim = aimet_onnx.build_quantsim(graph, param_bw=preset.param_bw, activation_bw=preset.activation_bw,
                                        scheme=config.calibration_scheme, workdir=scratch)
        overrides = aimet_onnx.calibrate_min_max(sim, aimet_onnx.output_tail(sim))
        techniques["output_tail"] = {"bits": preset.activation_bw, "quantizers": overrides["output_tail"],
                                     "from": "the last weighted op's output"}
        techniques["relu_outputs_min_max"] = len(overrides["relu_outputs"])
        analyzers = aimet_onnx.calibration_analyzers(sim)
        step.detail = (f"aimet-onnx, HTP V75 config, {config.calibration_scheme}, w{preset.param_bw}"
                       f"a{preset.activation_bw}; activation ranges: "
                       + ", ".join(f"{count} {label}" for label, count in analyzers.items())
                       + f"; output tail min-max ({len(overrides['output_tail'])} activations)")
    return sim, analyzers


def _calibrate_step(sim, inputs: _Inputs, log: StageLog) -> None:
    from lpcv_depth.backends import aimet_onnx

    batches = [batch.numpy() for batch in inputs.calibration_batches]
    with log.step("compute-encodings") as step, Progress(len(batches), f"{STAGE}: calibrating") as tick:
        aimet_onnx.calibrate(sim, batches, tick)
        step.detail = f"{len(batches)} images through ONNX Runtime"


def _sim_outputs(sim, inputs: _Inputs, fp32: _Fp32, log: StageLog) -> np.ndarray:
    from lpcv_depth.backends import aimet_onnx

    with log.step("aimet-sim") as step:
        outputs = aimet_onnx.run_forward(sim, [batch.numpy() for batch in inputs.holdout_batches])
        step.detail = f"SQNR vs fp32 {sqnr_db(fp32.holdout, outputs):.1f} dB on held-out images"
    return outputs


def _export_artifacts(sim, folder: Path, name: str, log: StageLog) -> Artifacts:
    from lpcv_depth.backends import aimet_onnx

    with log.step("export-aimet") as step:
        aimet_dir = folder / f"{name}.aimet"
        aimet_path, encodings = aimet_onnx.export_for_ai_hub(sim, aimet_dir, name)
        step.artifact = aimet_dir
    with log.step("export-qdq") as step:
        qdq = aimet_onnx.export_qdq(sim, folder / QDQ_ONNX)
        step.artifact = qdq
    return Artifacts(aimet_dir=aimet_dir, aimet_onnx=aimet_path, encodings=encodings, qdq=qdq)
