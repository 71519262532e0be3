"""INT8 post-training quantization with AIMET, verified against the float ONNX on the host.

    python quantize/ptq.py --calib calibration_data                     # w8a8, after export/to_onnx.py
    python quantize/ptq.py --calib calibration_data --preset mixed --fp32 build/fastdepth/export
    python quantize/ptq.py --calib calibration_data --min-sqnr 25 --max-fscore-drop 1.0   # CI gate

Reads the export stage's folder (fp32 ONNX + manifest, which says how to rebuild the torch model),
calibrates AIMET's QuantSim with the HTP V75 (Snapdragon 8 Gen 3) rules, and writes to OUT
(default build/<model>/ptq-<preset>):
  <model>.aimet/          one .onnx + one .encodings: the layout AI Hub takes for AIMET models
  model_qdq.onnx          QuantizeLinear/DequantizeLinear ONNX for ONNX Runtime on the host
  report.json, report.md, report.png, manifest.json
  holdout_outputs.npz     fp32 / AIMET-sim / QDQ outputs on the held-out images (for later checks)
  eval/fp32/, eval/int8/  with --eval-data: the evaluate stage's per-frame scores of both models
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, ContractError, GateError, LpcvError
from lpcv_depth.stage import StageLog, StagingDir, exit_status
from lpcv_depth.manifest import MANIFEST_NAME, config_as_dict, read_manifest, sha256_file, write_manifest
from lpcv_depth.verify import (OrtRunner, ParityThresholds, check_output_range, compare_outputs,
                               scale_aligned_sqnr_db, sqnr_db)
from lpcv_depth.calibration import RECOMMENDED_IMAGES, iter_batches, split_calibration_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE = "ptq"
CALIBRATION_SCHEMES = ("min-max", "tf-enhanced", "percentile")
# fp32 ONNX, AIMET QuantSim and QDQ ONNX outputs on the held-out images, in the manifest's holdout_files order.
HOLDOUT_OUTPUTS = "holdout_outputs.npz"


@dataclass(frozen=True)
class Preset:
    param_bw: int
    activation_bw: int
    mixed: bool
    description: str


PRESETS = {
    "w8a8": Preset(8, 8, False, "per-channel symmetric int8 weights, 8-bit asymmetric activations"),
    "w8a16": Preset(8, 16, False, "per-channel symmetric int8 weights, 16-bit asymmetric activations"),
    "mixed": Preset(8, 8, True, "w8a8, with the activations a measured per-layer sensitivity analysis "
                                "finds fragile kept at 16 bits"),
}


@dataclass(frozen=True)
class PtqConfig:
    calib: Path
    fp32_dir: Path = REPO_ROOT / "build" / "depth_anything_v2_vits" / "export"
    preset: str = "w8a8"
    # tf-enhanced, measured on the real FastDepth w8a8 (benchmarks/ptq_bench.py): F-score drop vs fp32
    # <= 0.49 on every shared RGB-D set, against up to 4.4 with min-max. Its plain SQNR is lower (10 vs
    # 22 dB) because clipping the far depth range rescales the max-normalised map, which the scorer ignores.
    calibration_scheme: str = "tf-enhanced"
    percentile: float = 99.99
    bn_fold: bool = True
    cle: bool = True
    adaround: bool = False
    adaround_iterations: int = 1000
    seq_mse: bool = False
    seq_mse_candidates: int = 20
    num_calibration: int | None = None
    num_holdout: int = 8
    min_calibration: int = 32
    # mixed preset: a layer stays 16-bit when its 8-bit activations alone cost more than this.
    mixed_max_drop_db: float = 1.0
    mixed_images: int = 2
    # Bits of the activations from the last weighted layer to the output (8 or 16). Before the contract's
    # per-image normalisation the depth is absolute: one 8-bit grid over 0..7 m has 2.7 cm steps and
    # clips the far wall of a large room, over 0..36 m its 14 cm steps blur a desk at 1 m. At 16 bits
    # one grid serves both; these tensors have one channel, so the cost on the NPU is small.
    output_tail_bw: int = 16
    eval_data: Path | None = None
    min_sqnr_db: float | None = None
    max_fscore_drop: float | None = None
    # ORT's QDQ kernels against AIMET's simulation of the same encodings: a mismatch means a broken export.
    # Rounding ties break differently, and the per-sample max normalisation spreads one step of the max
    # over the whole map, so single pixels may differ by a few steps; SQNR is the real check.
    sim_parity: ParityThresholds = field(default_factory=lambda: ParityThresholds(max_abs_diff=0.5, min_sqnr_db=25.0))
    latency_runs: int = 10
    out_dir: Path | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        if self.calibration_scheme not in CALIBRATION_SCHEMES:
            raise ConfigError(f"calibration scheme must be one of {CALIBRATION_SCHEMES}, got {self.calibration_scheme!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        for name in ("adaround_iterations", "seq_mse_candidates", "min_calibration", "mixed_images", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_tail_bw not in (8, 16):
            raise ConfigError(f"output_tail_bw must be 8 or 16, got {self.output_tail_bw}")
        if self.num_holdout < 1:
            raise ConfigError("num_holdout must be >= 1: verification needs images that calibration did not see")
        if self.max_fscore_drop is not None and self.max_fscore_drop < 0:
            raise ConfigError(f"max_fscore_drop must be >= 0, got {self.max_fscore_drop}")
        manifest = Path(self.fp32_dir) / MANIFEST_NAME
        if not manifest.is_file():
            raise ConfigError(f"{self.fp32_dir} is not an export stage output (no {MANIFEST_NAME})",
                              hint="run python export/to_onnx.py first, or pass its output folder with --fp32")
        if read_manifest(self.fp32_dir).get("stage") != "export":
            raise ConfigError(f"{self.fp32_dir} holds a {read_manifest(self.fp32_dir).get('stage')!r} output, not an export",
                              hint="pass the export stage's folder (the one with the fp32 model.onnx)")
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise ConfigError(f"--eval-data folder not found: {self.eval_data}")

    @property
    def preset_spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def opset(self) -> int:
        # 16-bit QuantizeLinear needs opset 21. 8-bit uses 18, the dynamo exporter's own opset: converted
        # down to 17, ReduceMin's axes become an attribute and AIMET's masked-softmax pattern check fails.
        return 21 if self.preset_spec.activation_bw > 8 or self.preset_spec.mixed or self.output_tail_bw > 8 else 18

    @property
    def destination(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(self.fp32_dir).parent / f"ptq-{self.preset}"

    def as_dict(self) -> dict:
        data = config_as_dict(self)
        data["preset_spec"] = asdict(self.preset_spec)
        data["opset"] = self.opset
        return data


@dataclass(frozen=True)
class PtqResult:
    out_dir: Path
    qdq_onnx: Path
    aimet_dir: Path
    report: dict
    manifest: dict


def rebuild_fp32_model(fp32_dir: Path):
    """The exact torch model the export stage exported, from its manifest (weights checked by sha256)."""
    from lpcv_depth.models import create_model, set_gelu_approximation

    manifest = read_manifest(fp32_dir)
    config, weights = manifest["config"], manifest["results"]["weights"]
    path = weights.get("path")
    if weights["source"] != "random":
        if not path or not Path(path).is_file():
            raise ConfigError(f"the weights the fp32 model was exported from are gone: {path}",
                              hint="re-run python export/to_onnx.py with --weights pointing at them")
        if sha256_file(path) != weights["sha256"]:
            raise ConfigError(f"weights file {path} changed since export (sha256 differs)",
                              hint="re-run python export/to_onnx.py so the fp32 ONNX and the quantized model match")
    model = create_model(config["model"], weights=path if weights["source"] != "random" else None,
                         output=config["output"], input_size=tuple(manifest["results"]["model"]["input_size"]))
    set_gelu_approximation(model, config["gelu"])
    return model, manifest


def check_torch_contract(model, sample: np.ndarray) -> dict:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(sample[:1])).numpy()
    want = TRACK3.output.concrete_shape(1)
    if out.shape != want:
        raise ContractError(f"torch model output shape {out.shape} does not match the contract {want}")
    return check_output_range(out, TRACK3)


def quantize(config: PtqConfig, log: StageLog | None = None) -> PtqResult:
    """Calibrate, export both int8 artifacts, verify them against fp32 on held-out images, report."""
    import torch

    from lpcv_depth.backends import aimet as aimet_sim

    log = log or StageLog(STAGE)
    aimet_sim.import_aimet()  # before any work: a missing install fails with the command that fixes it
    preset = config.preset_spec
    fp32_onnx = Path(config.fp32_dir) / "model.onnx"
    results: dict = {"preset": config.preset, "techniques": {}}

    with log.step("calibration-data") as step:
        split = split_calibration_folder(config.calib, num_calibration=config.num_calibration,
                                         num_holdout=config.num_holdout, min_images=config.min_calibration)
        holdout = np.concatenate(list(iter_batches(split.holdout)))
        step.detail = f"{len(split.calibration)} calibration + {len(split.holdout)} held-out images"
    if len(split.calibration) < RECOMMENDED_IMAGES:
        log.warn(f"{len(split.calibration)} calibration images; use >= {RECOMMENDED_IMAGES} for a real run")

    with log.step("fp32-model") as step:
        model, export_manifest = rebuild_fp32_model(Path(config.fp32_dir))
        results["fp32_contract"] = check_torch_contract(model, holdout)
        fp32_runner = OrtRunner(fp32_onnx)
        fp32_holdout = fp32_runner.run(holdout)
        step.detail = f"{export_manifest['config']['model']}, weights {model.weights_info.source}"
    weights_info = model_weights_info(model)
    if model.weights_info.is_random:
        log.warn("the fp32 model has RANDOM WEIGHTS: fidelity figures are about the pipeline, not a real model")

    dummy = torch.from_numpy(holdout[:1])
    calibration_batches = aimet_sim.torch_batches(iter_batches(split.calibration))
    config_file = aimet_sim.htp_v75_config_path()
    scheme = aimet_sim.quant_scheme(config.calibration_scheme)
    model = _apply_float_techniques(config, model, dummy, log, results)

    # Found once on the float model; AdaRound keeps the module names.
    tail = aimet_sim.output_tail(model, dummy) if config.output_tail_bw > preset.activation_bw else []

    with StagingDir(config.destination, stage=STAGE, scratch=True) as staging:
        param_encodings = None
        float_model = model
        if config.adaround:
            with log.step("adaround") as step:
                model, param_encodings = aimet_sim.apply_adaround(
                    model, dummy, calibration_batches, iterations=config.adaround_iterations, param_bw=preset.param_bw,
                    scheme=scheme, config_file=config_file, workdir=staging.scratch)
                step.detail = f"{config.adaround_iterations} iterations per layer"

        with log.step("quantsim") as step:
            sim, widened_tail = _quantsim(config, model, dummy, param_encodings, tail)
            step.detail = f"HTP V75 config, {config.calibration_scheme}, w{preset.param_bw}a{preset.activation_bw}"
            results["calibration_analyzers"] = aimet_sim.calibration_analyzers(sim)
            step.detail += "; activation ranges: " + ", ".join(
                f"{count} {label}" for label, count in results["calibration_analyzers"].items())
            if widened_tail:
                results["techniques"]["output_tail"] = {"bits": config.output_tail_bw, "quantizers": widened_tail}
                step.detail += f"; output tail at {config.output_tail_bw} bits ({len(widened_tail)} activations)"

        if config.seq_mse:
            with log.step("seq-mse") as step:
                optimized = aimet_sim.apply_seq_mse(sim, calibration_batches, config.seq_mse_candidates)
                results["techniques"]["seq_mse"] = {"layers_optimized": optimized,
                                                    "candidates": config.seq_mse_candidates}
                step.detail = f"{optimized} layers, {config.seq_mse_candidates} candidate ranges each"
            if not optimized:
                raise RuntimeError("SeqMSE optimized no layer: aimet-torch changed how it selects layers")

        with log.step("compute-encodings") as step:
            _calibrate(sim, calibration_batches)
            step.detail = f"{len(calibration_batches)} images"

        holdout_batches = [torch.from_numpy(holdout[i:i + 1]) for i in range(len(holdout))]
        if config.adaround or config.seq_mse:
            # What the weight-rounding techniques bought: the same sim with nearest rounding, same images.
            applied = " + ".join(name for name, on in (("AdaRound", config.adaround), ("SeqMSE", config.seq_mse)) if on)
            with log.step("rounding-ablation") as step:
                nearest, _ = _quantsim(config, float_model, dummy, None, tail)
                _calibrate(nearest, calibration_batches)
                without = sqnr_db(fp32_holdout, aimet_sim.run_forward(nearest.model, holdout_batches))
                with_ = sqnr_db(fp32_holdout, aimet_sim.run_forward(sim.model, holdout_batches))
                results["ablation"] = {applied: {"sqnr_db": without, "sqnr_db_with": with_, "gain_db": with_ - without}}
                step.detail = f"AIMET sim SQNR {with_:.2f} dB with {applied}, {without:.2f} dB with nearest rounding"
                del nearest

        sensitivity_images = torch.from_numpy(holdout[:config.mixed_images])
        if preset.mixed:
            with log.step("sensitivity") as step:
                # The output tail is 16-bit by rule, not by measurement.
                quantizers = aimet_sim.activation_quantizers(sim, max_bitwidth=8)
                with _progress(len(quantizers), "per-layer sensitivity") as tick:
                    # Sensitivity is measured against the float torch model on held-out images.
                    reference = aimet_sim.run_forward(model, [sensitivity_images])
                    sensitivity = aimet_sim.promote_sensitive_layers(
                        sim, [sensitivity_images], reference, max_drop_db=config.mixed_max_drop_db, progress=tick)
                results["mixed_precision"] = {
                    "baseline_all_16bit_sqnr_db": sensitivity.baseline_sqnr_db,
                    "max_drop_db": sensitivity.threshold_db, "activation_quantizers": len(quantizers),
                    "kept_16bit": sensitivity.promoted,
                    "per_layer_8bit_sqnr_db": sensitivity.per_layer_sqnr_db}
                step.detail = f"{len(sensitivity.promoted)}/{len(quantizers)} activations kept at 16 bits"

        with log.step("aimet-sim") as step:
            sim_holdout = aimet_sim.run_forward(sim.model, holdout_batches)
            step.detail = f"SQNR vs fp32 {sqnr_db(fp32_holdout, sim_holdout):.1f} dB on held-out images"

        name = export_manifest["config"]["model"]
        with log.step("export-aimet") as step:
            aimet_dir = staging.path / f"{name}.aimet"
            aimet_onnx, encodings = aimet_sim.export_for_ai_hub(sim, dummy, aimet_dir, name, config.opset)
            step.artifact = aimet_dir
        with log.step("export-qdq") as step:
            qdq_path = aimet_sim.export_qdq(sim, dummy, staging.path / "model_qdq.onnx", config.opset)
            step.artifact = qdq_path

        verification = verify_int8(config, fp32_runner, fp32_holdout, qdq_path, sim_holdout, holdout, log)
        int8_holdout = verification.pop("int8_holdout")
        results.update(verification)
        results["sizes_bytes"] = {"fp32_onnx": fp32_onnx.stat().st_size, "qdq_onnx": qdq_path.stat().st_size,
                                  "aimet_onnx": aimet_onnx.stat().st_size, "aimet_encodings": encodings.stat().st_size}

        from lpcv_depth.stages.ptq_report import write_report

        with log.step("report") as step:
            report_files = write_report(staging.path, config, results, fp32_holdout, int8_holdout)
            step.artifact = staging.path / "report.md"
        # Later checks (the local HTP check) compare against the same held-out outputs instead of
        # rebuilding AIMET's simulation; the image files are listed in the manifest's calibration split.
        holdout_outputs = staging.path / HOLDOUT_OUTPUTS
        np.savez_compressed(holdout_outputs, fp32=fp32_holdout, aimet_sim=sim_holdout, int8_qdq=int8_holdout)
        inputs = {"fp32_onnx": {"path": os.fspath(fp32_onnx), "sha256": sha256_file(fp32_onnx)},
                  "export_manifest": {"path": os.fspath(Path(config.fp32_dir) / MANIFEST_NAME)},
                  "weights": weights_info, "calibration": split.describe()}
        write_manifest(staging.path, stage=STAGE, config=config.as_dict(), inputs=inputs,
                       outputs=[aimet_onnx, encodings, qdq_path, holdout_outputs, *report_files],
                       timings=log.timings, results=results)
    out = config.destination
    result = PtqResult(out, out / "model_qdq.onnx", out / f"{name}.aimet", results, read_manifest(out))
    log.info(f"ok {log.total_seconds:.1f}s -> {out}")
    _enforce_gates(config, results)
    return result


def _quantsim(config: PtqConfig, model, dummy, param_encodings: Path | None, tail: list[str]):
    """AIMET's QuantSim of `model` with the HTP V75 rules and the output tail widened, optionally with
    frozen (AdaRound) weight encodings; returns the sim and the names of the widened quantizers."""
    from lpcv_depth.backends import aimet as aimet_sim

    _, _, QuantizationSimModel = aimet_sim.import_aimet()
    preset = config.preset_spec
    sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=aimet_sim.quant_scheme(config.calibration_scheme),
                               default_output_bw=preset.activation_bw, default_param_bw=preset.param_bw,
                               config_file=os.fspath(aimet_sim.htp_v75_config_path()))
    widened = aimet_sim.widen_output_tail(sim, tail, config.output_tail_bw)
    if config.calibration_scheme == "percentile":
        sim.set_percentile_value(config.percentile)
    if param_encodings is not None:
        sim.load_encodings(os.fspath(param_encodings), strict=False, partial=True, requires_grad=False,
                           allow_overwrite=False)
    return sim, widened


def _calibrate(sim, batches) -> None:
    from lpcv_depth.backends import aimet as aimet_sim

    with _progress(len(batches), "calibrating") as tick:
        sim.compute_encodings(lambda m: aimet_sim.run_forward(m, batches, tick))


def model_weights_info(model) -> dict:
    info = getattr(model, "weights_info", None)
    return info.as_dict() if info is not None else {}


def _apply_float_techniques(config: PtqConfig, model, dummy, log: StageLog, results: dict):
    """BN fold and CLE change the float model itself; each one's effect on fp32 is recorded."""
    from lpcv_depth.backends import aimet as aimet_sim

    from lpcv_depth.models.depth_anything_v2 import fold_layer_scales

    # Always on: exact, and AIMET cannot wrap a parameter-holding custom module like LayerScale.
    with log.step("layer-scale-fold") as step:
        folded_scales = fold_layer_scales(model)
        results["techniques"]["layer_scale_fold"] = {"folded": folded_scales}
        step.detail = f"{folded_scales} LayerScales folded into their Linear layers"
    with log.step("prepare") as step:
        model, preparation = aimet_sim.prepare_for_quantsim(model)
        results["preparation"] = asdict(preparation)
        step.detail = (f"{preparation.modules_added} functional ops turned into quantizable modules"
                       if preparation.traced else "NOT traceable")
    if not preparation.traced:
        log.warn(f"torch.fx cannot trace this model ({preparation.error}); its functional ops (matmul, add, "
                 "softmax, interpolate, ...) stay unquantized float, which the phone's NPU cannot run in int8. "
                 "Write shape-dependent code without Python control flow on tensor shapes to fix it.")
    if config.bn_fold:
        with log.step("bn-fold") as step:
            folded = aimet_sim.fold_batch_norms(model, dummy)
            results["techniques"]["bn_fold"] = {"folded_pairs": folded}
            step.detail = f"{folded} BatchNorm layers folded" if folded else "no BatchNorm to fold"
    if config.cle:
        with log.step("cle") as step:
            before = aimet_sim.run_forward(model, [dummy])
            aimet_sim.cross_layer_equalize(model, dummy)
            after = aimet_sim.run_forward(model, [dummy])
            change = sqnr_db(before, after)
            results["techniques"]["cle"] = {"fp32_sqnr_after_vs_before_db": change}
            step.detail = ("float model unchanged within precision" if change > 60
                           else f"float model moved: SQNR {change:.1f} dB vs before")
    return model


def verify_int8(config: PtqConfig, fp32_runner: OrtRunner, fp32_holdout: np.ndarray, qdq_path: Path,
                sim_holdout: np.ndarray, holdout: np.ndarray, log: StageLog) -> dict:
    """int8 QDQ against fp32 (both ONNX Runtime) on held-out images, against AIMET's own simulation,
    and optionally both against real ground truth."""
    from lpcv_depth.track3_metric import fscore_against_reference

    results: dict = {}
    with log.step("qdq-vs-aimet-sim") as step:
        int8_runner = OrtRunner(qdq_path)
        int8_holdout = int8_runner.run(holdout)
        results["qdq_vs_aimet_sim"] = compare_outputs(sim_holdout, int8_holdout, config.sim_parity,
                                                      "ONNX Runtime QDQ vs AIMET QuantSim")
        step.detail = f"SQNR {results['qdq_vs_aimet_sim']['sqnr_db']:.1f} dB"
    with log.step("int8-vs-fp32") as step:
        check_output_range(int8_holdout, TRACK3, tolerance=1e-2)
        fidelity = {"sqnr_db": sqnr_db(fp32_holdout, int8_holdout),
                    "sqnr_db_scale_aligned": scale_aligned_sqnr_db(fp32_holdout, int8_holdout),
                    "max_abs_diff": float(np.max(np.abs(fp32_holdout - int8_holdout)))}
        per_frame = [fscore_against_reference(i8, fp) for i8, fp in zip(int8_holdout, fp32_holdout)]
        fidelity["fscore_vs_fp32"] = float(np.mean([row["fscore@0.1"] for row in per_frame]))
        fidelity["fscore_vs_fp32_per_image"] = [row["fscore@0.1"] for row in per_frame]
        fidelity["holdout_images"] = len(holdout)
        results["int8_vs_fp32"] = fidelity
        step.detail = (f"SQNR {fidelity['sqnr_db']:.1f} dB ({fidelity['sqnr_db_scale_aligned']:.1f} dB scale-aligned), "
                       f"max abs {fidelity['max_abs_diff']:.3f}, "
                       f"F-score vs fp32 {fidelity['fscore_vs_fp32']:.1f}")
    if config.eval_data is not None:
        with log.step("ground-truth") as step:
            results["ground_truth"] = _score_against_ground_truth(config, fp32_runner.path, qdq_path,
                                                                  qdq_path.parent / "eval")
            gt = results["ground_truth"]
            step.detail = (f"F-score fp32 {gt['fp32']['fscore@0.1']:.2f} / int8 {gt['int8']['fscore@0.1']:.2f}, "
                           f"drop {gt['fscore_drop']:.2f}")
    with log.step("host-latency") as step:
        results["host_latency_ms"] = {"fp32": fp32_runner.median_latency_ms(holdout[:1], config.latency_runs),
                                      "int8_qdq": int8_runner.median_latency_ms(holdout[:1], config.latency_runs),
                                      "runs": config.latency_runs,
                                      "note": "ONNX Runtime on this x86 host: a sanity figure only. x86 ORT runs QDQ "
                                              "int8 slower than fp32; it says nothing about the phone's NPU."}
        step.detail = (f"fp32 {results['host_latency_ms']['fp32']:.0f} ms, int8 QDQ "
                       f"{results['host_latency_ms']['int8_qdq']:.0f} ms (host ORT, not the phone)")
    results["int8_holdout"] = int8_holdout
    return results


def _score_against_ground_truth(config: PtqConfig, fp32_onnx: Path, qdq_path: Path, folder: Path) -> dict:
    """Both ONNX models through the evaluate stage, so PTQ scores frames exactly as `evaluation/score.py`
    does (same metric, same skipping of bad frames); each one's per-frame CSV lands in `folder`."""
    from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate

    summary: dict = {}
    for label, onnx_path in (("fp32", fp32_onnx), ("int8", qdq_path)):
        overall = run_evaluate(EvaluateConfig(data=Path(config.eval_data), onnx=onnx_path, out=folder / label,
                                          num_vis=0), StageLog(f"{STAGE}/evaluate-{label}")).summary["overall"]
        if not overall["scored"]:
            raise ConfigError(f"no usable RGB-D frames in --eval-data {config.eval_data} "
                              f"({overall['skipped']} skipped)")
        summary[label] = overall["metrics"]
    summary["frames"] = overall["scored"]
    summary["skipped"] = overall["skipped"]
    summary["fscore_drop"] = summary["fp32"]["fscore@0.1"] - summary["int8"]["fscore@0.1"]
    return summary


def _enforce_gates(config: PtqConfig, results: dict) -> None:
    fidelity = results["int8_vs_fp32"]
    failures = []
    if config.min_sqnr_db is not None and fidelity["sqnr_db"] < config.min_sqnr_db:
        failures.append(f"SQNR {fidelity['sqnr_db']:.2f} dB < --min-sqnr {config.min_sqnr_db:g}")
    if config.max_fscore_drop is not None:
        if "ground_truth" in results:
            drop, what = results["ground_truth"]["fscore_drop"], "F-score drop vs GT"
        else:
            drop, what = 100.0 - fidelity["fscore_vs_fp32"], "F-score drop vs fp32"
        if drop > config.max_fscore_drop:
            failures.append(f"{what} {drop:.2f} > --max-fscore-drop {config.max_fscore_drop:g}")
    if failures:
        raise GateError("int8 model falls short: " + "; ".join(failures),
                        hint="the artifacts and report were written; try --preset mixed or w8a16, more calibration "
                             "images, --calibration-scheme, --adaround or --seq-mse")


class _progress:
    """A tqdm bar on stderr for the long loops (calibration, sensitivity)."""

    def __init__(self, total: int, what: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{STAGE}: {what}", unit="it", leave=False, file=sys.stderr)

    def __enter__(self):
        return lambda: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python quantize/ptq.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=Path, required=True, help="folder of calibration photos (JPG/PNG)")
    parser.add_argument("--fp32", type=Path, default=PtqConfig.fp32_dir,
                        help="export stage output folder (default build/depth_anything_v2_vits/export)")
    parser.add_argument("--preset", default="w8a8", choices=tuple(PRESETS))
    parser.add_argument("--calibration-scheme", default=PtqConfig.calibration_scheme, choices=CALIBRATION_SCHEMES)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--no-bn-fold", dest="bn_fold", action="store_false")
    parser.add_argument("--no-cle", dest="cle", action="store_false")
    parser.add_argument("--adaround", action="store_true", help="AdaRound the weights (minutes on CPU)")
    parser.add_argument("--adaround-iterations", type=int, default=1000)
    parser.add_argument("--seq-mse", action="store_true", help="sequential MSE weight encodings")
    parser.add_argument("--seq-mse-candidates", type=int, default=PtqConfig.seq_mse_candidates,
                        help="candidate weight ranges SeqMSE scores per layer")
    parser.add_argument("--num-calib", type=int, default=None, help="use only the first N calibration images")
    parser.add_argument("--holdout", type=int, default=8, help="last N images are held out for verification")
    parser.add_argument("--min-calib", type=int, default=32, help="fewer calibration images is an error")
    parser.add_argument("--output-tail-bits", type=int, choices=(8, 16), default=16,
                        help="bits of the activations after the last conv (the absolute depth before the per-image "
                             "normalisation; default 16; 8: every activation int8)")
    parser.add_argument("--mixed-max-drop", type=float, default=1.0,
                        help="mixed preset: keep a layer 16-bit if its 8-bit activations cost more SQNR (dB)")
    parser.add_argument("--eval-data", type=Path, default=None, help="RGB-D set(s) for F-score/abs_rel vs GT")
    parser.add_argument("--min-sqnr", type=float, default=None, help="gate: exit 3 if int8 vs fp32 SQNR is lower")
    parser.add_argument("--max-fscore-drop", type=float, default=None, help="gate: exit 3 if F-score drops more")
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <fp32>/../ptq-<preset>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = StageLog(STAGE)
    try:
        config = PtqConfig(calib=args.calib, fp32_dir=args.fp32, preset=args.preset,
                           calibration_scheme=args.calibration_scheme, percentile=args.percentile,
                           bn_fold=args.bn_fold, cle=args.cle, adaround=args.adaround,
                           adaround_iterations=args.adaround_iterations, seq_mse=args.seq_mse,
                           seq_mse_candidates=args.seq_mse_candidates,
                           num_calibration=args.num_calib, num_holdout=args.holdout, min_calibration=args.min_calib,
                           mixed_max_drop_db=args.mixed_max_drop, output_tail_bw=args.output_tail_bits, eval_data=args.eval_data,
                           min_sqnr_db=args.min_sqnr, max_fscore_drop=args.max_fscore_drop,
                           latency_runs=args.latency_runs, out_dir=args.out)
        result = quantize(config, log)
    except (LpcvError, KeyboardInterrupt) as err:
        return exit_status(STAGE, err)
    log.info(f"report: {os.path.relpath(result.out_dir / 'report.md')}")
    log.info(f"next: python quantize/htp_check.py --ptq {os.path.relpath(result.out_dir)}   "
             f"(then: python export/aihub.py {os.path.relpath(result.out_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
