"""INT8 post-training quantization with AIMET, verified against the float ONNX on the host.

    lpcv-depth ptq                                      # w8a8 of build/depth_anything_v2_vits/export
    lpcv-depth ptq --preset mixed --fp32 build/fastdepth/export
    lpcv-depth ptq --min-sqnr 25 --max-fscore-drop 1.0  # CI gate: exit 3 if int8 falls short

Reads the export stage's folder (fp32 ONNX + manifest, which says how to rebuild the torch model),
calibrates AIMET's QuantSim on the photos of --calib (default: calibration_data/ of the workspace)
with the HTP V75 (Snapdragon 8 Gen 3) rules, and writes to OUT (default <fp32>/../ptq-<preset>):
  <model>.aimet/          one .onnx + one .encodings: the layout AI Hub takes for AIMET models
  model_qdq.onnx          QuantizeLinear/DequantizeLinear ONNX for ONNX Runtime on the host
  report.json, report.md, report.png, manifest.json
  holdout_outputs.npz     fp32 / AIMET-sim / QDQ outputs on the held-out images checked (for later checks)
  eval/fp32/, eval/int8/  with --eval-data: the evaluate stage's per-frame scores of both models
Every option, and the measurements behind the defaults: docs/ptq.md.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lpcv_depth.calibration import RECOMMENDED_IMAGES, CalibrationSplit, iter_batches, split_calibration_folder
from lpcv_depth.contract import TRACK3
from lpcv_depth.device import DEVICES, resolve_device
from lpcv_depth.errors import ConfigError, ContractError, GateError
from lpcv_depth.gates import enforce_gates
from lpcv_depth.host import keep_freed_memory
from lpcv_depth.manifest import (MANIFEST_NAME, ArtifactMismatchError, Manifest, config_as_dict, read_manifest,
                                 sha256_file)
from lpcv_depth.options import choices_hint, flag_name, inherit, option
from lpcv_depth.results import ExportResults, PtqResults
from lpcv_depth.schema import SchemaError, from_json
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, command_line, display_path
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.export import EXPORTERS, ExportConfig
from lpcv_depth.stages.int8_outputs import (FP32_ONNX, QDQ_ONNX, Artifacts, Progress, aimet_sim_outputs, calibrate,
                                            export_artifacts, manifest_inputs, sizes, write_int8_manifest)
from lpcv_depth.stages.ptq_backend import BACKENDS, backend_for, check_backend_option
from lpcv_depth.stages.ptq_verify import Int8Checks, ptq_gates, score_against_ground_truth, verify_int8
from lpcv_depth.verify import OrtRunner, ParityThresholds, check_output_range, sqnr_db
from lpcv_depth.workspace import build_dir, in_workspace

__all__ = ["PtqConfig", "PtqOutput", "Preset", "PRESETS", "run_ptq", "FloatStart", "prepare_float_model",
           "build_quantsim", "kept_int8_weights", "rebuild_fp32_model", "check_torch_contract", "check_output_contract",
           "score_against_ground_truth", "GateError", "DEFINITION"]

STAGE = "ptq"
DEFAULT_FP32_MODEL = "depth_anything_v2_vits"
DEFAULT_CALIB = Path("calibration_data")
CALIBRATION_SCHEMES = ("min-max", "tf-enhanced", "percentile")
INT8_WEIGHT_CHOICES = ("none", "first", "last", "first-last")
GATE_HINT = ("the artifacts and report were written; try --preset mixed or w8a16, more calibration images, "
             "--calibration-scheme, --adaround or --seq-mse")


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
    "w4a8": Preset(4, 8, False, "per-channel symmetric int4 weights, 8-bit asymmetric activations"),
    "w4a16": Preset(4, 16, False, "per-channel symmetric int4 weights, 16-bit asymmetric activations"),
}


@dataclass(frozen=True)
class PtqConfig:
    calib: Path = option(DEFAULT_CALIB, help="folder of calibration photos (JPG/PNG), relative to the workspace "
                                             "(default: calibration_data)")
    fp32: Path | None = option(None, help="export stage output folder (default: "
                                          f"build/{DEFAULT_FP32_MODEL}/export of the workspace)")
    preset: str = option("w8a8", choices=tuple(PRESETS),
                         help="w8a8, w8a16, mixed (w8a8 with the fragile activations kept at 16 bits), "
                              "w4a8 or w4a16 (int4 weights)")
    # The scheme that scored best on the Track 3 metric is the default (measured: docs/ptq.md).
    calibration_scheme: str = option("tf-enhanced", choices=CALIBRATION_SCHEMES,
                                     help="how activation ranges are calibrated")
    percentile: float = option(99.99, help="the percentile scheme's cut-off, in (50, 100]")
    bn_fold: bool = option(True, help="fold BatchNorm into the conv before it")
    cle: bool = option(True, help="cross-layer equalization of the float model")
    adaround: bool = option(False, help="AdaRound the weights (minutes on CPU)")
    adaround_iterations: int = option(1000, help="AdaRound iterations per layer")
    seq_mse: bool = option(False, help="sequential MSE weight encodings")
    seq_mse_candidates: int = option(20, help="candidate weight ranges SeqMSE scores per layer")
    num_calib: int | None = option(None, help="use only the first N calibration images (default: all)")
    holdout: int = option(8, help="the last N sorted images are held out for verification and never calibrate")
    # A search trial is scored by the evaluate stage on RGB-D frames; its held-out checks only have to
    # catch a broken export, which the first images already do (search sets 2).
    verify_images: int | None = option(None, help="run the int8 checks on at most the first N held-out "
                                                  "images (default: all of --holdout; calibration is the same)")
    min_calib: int = option(32, help="fewer calibration images is an error")
    # Before the contract's per-image normalisation the tail carries absolute depth on one grid for every
    # scene, which 8 bits cannot resolve; its tensors have one channel, so 16 bits cost little (docs/ptq.md).
    output_tail_bits: int = option(16, choices=(8, 16),
                                   help="bits of the activations from the input of the last conv to the output "
                                        "(min-max calibrated); 8 makes every activation int8")
    # Measured on FastDepth: keeping them bought nothing there (docs/ptq.md, "4-bit weights").
    int8_weights: str = option("none", choices=INT8_WEIGHT_CHOICES,
                               help="4-bit presets: the weighted layers whose weights stay int8 (first: the conv "
                                    "on the raw image; last: the layer that writes the depth map)")
    mixed_max_drop: float = option(1.0, help="mixed preset: keep a layer 16-bit if its 8-bit activations cost more "
                                             "SQNR than this, dB")
    mixed_images: int = option(2, help="mixed preset: held-out images the per-layer sensitivity is measured on")
    eval_data: Path | None = option(None, help="RGB-D set(s): fp32 and int8 F-score and abs_rel against ground truth")
    median: str = inherit(EvaluateConfig, "median")
    min_sqnr: float | None = option(None, help="gate: exit 3 if the int8 vs fp32 SQNR is lower, dB")
    max_fscore_drop: float | None = option(None, help="gate: exit 3 if the F-score drops more (vs ground truth with "
                                                      "--eval-data, else vs fp32)")
    # ORT's QDQ kernels against AIMET's simulation of the same encodings: a mismatch means a broken export.
    # Rounding ties break differently and the per-sample max normalisation spreads one step of the max
    # over the whole map, so single pixels may differ by a few steps; SQNR is the real check.
    sim_max_abs_diff: float = option(0.5, help="QDQ ONNX vs AIMET QuantSim: largest absolute difference allowed")
    sim_min_sqnr: float = option(25.0, help="QDQ ONNX vs AIMET QuantSim: lowest SQNR allowed, dB")
    # A sanity figure (HOST_LATENCY_NOTE), so a short median: x86 runs a QDQ ViT slowly (docs/ptq.md).
    # The held-out checks' own runs are timed and count, so it usually costs no extra run.
    latency_runs: int = option(3, help="host ONNX Runtime latency: median of at least N timed runs per model "
                                       "(the held-out checks' runs count); 0 skips it")
    # The TorchScript exporter builds the same int8 graph (AIMET sim, QDQ ONNX Runtime and the HTP emulator
    # give bit-identical outputs) in a third of the dynamo exporter's time (docs/ptq.md, "The exporter").
    exporter: str = inherit(ExportConfig, "exporter", help="TorchScript (legacy) or dynamo exporter of the AI Hub "
                                                           "and QDQ models")
    # Which AIMET flavour quantizes an export made from an ONNX file (docs/ptq.md, "An export made from an
    # ONNX file"); a torch export is always quantized from its torch model with aimet-torch.
    backend: str = option("auto", choices=BACKENDS,
                          help="an ONNX-file export: onnx2torch (then aimet-torch) or aimet-onnx; auto: onnx2torch")
    # Exports, checks and the exact fast CPU kernels (backends/aimet_fast.py) stay on the CPU (docs/ptq.md).
    device: str = option("auto", choices=DEVICES, help="where calibration, AdaRound and SeqMSE run: auto (a CUDA "
                                                       "GPU where torch sees one), cpu or cuda")
    out: Path | None = option(None, help="output folder (default: <fp32>/../ptq-<preset>)")

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}",
                              hint=choices_hint("preset", PRESETS))
        if self.calibration_scheme not in CALIBRATION_SCHEMES:
            raise ConfigError(f"calibration scheme must be one of {CALIBRATION_SCHEMES}, got {self.calibration_scheme!r}",
                              hint=choices_hint("calibration_scheme", CALIBRATION_SCHEMES))
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}",
                              hint="pass --percentile above 50 and at most 100, e.g. 99.99 (the default)")
        for name in ("adaround_iterations", "seq_mse_candidates", "min_calib", "mixed_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}",
                                  hint=f"pass {flag_name(name)} 1 or more")
        if self.latency_runs < 0:
            raise ConfigError(f"latency_runs must be >= 0, got {self.latency_runs}",
                              hint="pass --latency-runs 0 to skip the host latency")
        if self.num_calib is not None and self.num_calib < 1:
            raise ConfigError(f"num_calib must be >= 1, got {self.num_calib}", hint="leave --num-calib out to use all")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}",
                              hint=choices_hint("exporter", EXPORTERS))
        if self.int8_weights not in INT8_WEIGHT_CHOICES:
            raise ConfigError(f"int8_weights must be one of {INT8_WEIGHT_CHOICES}, got {self.int8_weights!r}",
                              hint=choices_hint("int8_weights", INT8_WEIGHT_CHOICES))
        if self.output_tail_bits not in (8, 16):
            raise ConfigError(f"output_tail_bits must be 8 or 16, got {self.output_tail_bits}",
                              hint=choices_hint("output_tail_bits", (8, 16)))
        if self.holdout < 1:
            raise ConfigError("holdout must be >= 1: verification needs images that calibration did not see",
                              hint="pass --holdout 8 (the default) or more")
        if self.verify_images is not None and self.verify_images < 1:
            raise ConfigError(f"verify_images must be >= 1, got {self.verify_images}",
                              hint="leave --verify-images out to check every held-out image")
        if self.max_fscore_drop is not None and self.max_fscore_drop < 0:
            raise ConfigError(f"max_fscore_drop must be >= 0, got {self.max_fscore_drop}",
                              hint="pass --max-fscore-drop as F-score points >= 0, or leave it out for no gate")
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise ConfigError(f"--eval-data folder not found: {self.eval_data}",
                              hint="pass an RGB-D set (rgb/ + depth/) or a folder of sets")
        self.sim_parity  # validates the thresholds
        resolve_device(self.device)
        check_backend_option(self)

    @property
    def preset_spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def fp32_dir(self) -> Path:
        """--fp32, or the default export folder of the workspace (looked up when used, not at import)."""
        return Path(self.fp32) if self.fp32 is not None else build_dir(DEFAULT_FP32_MODEL, "export")

    @property
    def calib_dir(self) -> Path:
        return in_workspace(self.calib)

    @property
    def sim_parity(self) -> ParityThresholds:
        return ParityThresholds(max_abs_diff=self.sim_max_abs_diff, min_sqnr_db=self.sim_min_sqnr)

    @property
    def opset(self) -> int:
        # 16-bit QuantizeLinear and int4 DequantizeLinear need opset 21. 8-bit uses 18, the dynamo exporter's
        # own opset: converted down to 17, ReduceMin's axes become an attribute and AIMET's masked-softmax
        # pattern check fails; aimet-onnx's QDQ export crashes there too.
        preset = self.preset_spec
        wide = preset.activation_bw > 8 or preset.mixed or self.output_tail_bits > 8 or preset.param_bw < 8
        return 21 if wide or self.backend == "aimet-onnx" else 18

    @property
    def destination(self) -> Path:
        return Path(self.out) if self.out is not None else self.fp32_dir.parent / f"ptq-{self.preset}"

    def as_dict(self) -> dict:
        data = config_as_dict(self)
        data["fp32"] = os.fspath(self.fp32_dir)
        data["calib"] = os.fspath(self.calib_dir)
        data["preset_spec"] = asdict(self.preset_spec)
        data["opset"] = self.opset
        return data


@dataclass(frozen=True)
class PtqOutput:
    """What a finished run of the ptq stage hands back: where its output folder is, and what it found."""

    out_dir: Path
    qdq_onnx: Path
    aimet_dir: Path
    manifest_path: Path
    results: PtqResults
    manifest: dict


@dataclass(frozen=True)
class _Inputs:
    """The images of one run: the calibration split, the held-out images the int8 checks run on as
    arrays and tensors, and those the mixed preset's sensitivity is measured on."""

    split: CalibrationSplit
    holdout: np.ndarray
    sensitivity: np.ndarray
    calibration_batches: list
    holdout_batches: list
    dummy: Any


@dataclass(frozen=True)
class _Fp32:
    """The float model, rebuilt in torch, and its ONNX outputs on the held-out images."""

    name: str
    model: Any
    onnx: Path
    onnx_sha256: str
    runner: OrtRunner
    holdout: np.ndarray
    contract: dict
    weights: dict


@dataclass(frozen=True)
class FloatStart:
    """What a QuantSim is built from: the export stage's manifest, the images, the fp32 references, and
    the float model after its own rewrite, AIMET's preparation, BN fold and CLE (recorded in
    `techniques`), with the names of its output-tail activations."""

    export: Manifest
    inputs: _Inputs
    fp32: _Fp32
    model: Any
    preparation: Any
    tail: list[str]
    techniques: dict
    backend: str


def run_ptq(config: PtqConfig, log: StageLog | None = None) -> PtqOutput:
    """Calibrate, export both int8 artifacts, verify them against fp32 on held-out images, report."""
    from lpcv_depth.backends.aimet_fast import fast_quantize_dequantize

    log = log or StageLog(STAGE)
    export = _read_export(config, log)
    if backend_for(config, export[0]) == "aimet-onnx":
        from lpcv_depth.stages.ptq_onnx import run_ptq_aimet_onnx

        return run_ptq_aimet_onnx(config, export, log)
    device = resolve_device(config.device)
    start = prepare_float_model(config, log, export)
    inputs, fp32, tail, techniques = start.inputs, start.fp32, start.tail, start.techniques
    with StagingDir(config.destination, stage=STAGE, inputs=[config.fp32_dir, config.calib_dir, config.eval_data],
                    scratch=True) as staging, fast_quantize_dequantize():
        sim, sim_source, analyzers = _quantsim_step(config, start.model, inputs, tail, techniques, staging.scratch,
                                                    device, log)
        _seq_mse_step(config, sim, inputs, techniques, device, log)
        _calibrate_step(sim, inputs, device, log)
        ablation = _rounding_ablation(config, start.model, sim, inputs, fp32, tail, device, log)
        mixed = _sensitivity(config, sim, sim_source, inputs, log)
        sim_holdout = aimet_sim_outputs(sim, inputs.holdout_batches, fp32.holdout, log)
        artifacts = export_artifacts(sim, inputs.dummy, staging.path, fp32.name, opset=config.opset,
                                     exporter=config.exporter, log=log)
        checks = verify_int8(config, fp32, artifacts.qdq, sim_holdout, inputs.holdout, log)
        results = PtqResults(model=fp32.name, preset=config.preset, techniques=techniques,
                             fp32_contract=fp32.contract, calibration_analyzers=analyzers,
                             preparation=asdict(start.preparation), qdq_vs_aimet_sim=checks.qdq_vs_aimet_sim,
                             int8_vs_fp32=checks.fidelity, sizes_bytes=sizes(fp32.onnx, artifacts),
                             host_latency_ms=checks.latency, ground_truth=checks.ground_truth, ablation=ablation,
                             mixed_precision=mixed, backend=start.backend, device=device)
        manifest_path = write_outputs(config, staging.path, start.export, fp32, inputs, artifacts, sim_holdout,
                                      checks, results, log)
    return finish(config, artifacts, manifest_path, results, log)


def write_outputs(config: PtqConfig, folder: Path, export: Manifest, fp32: _Fp32, inputs: _Inputs,
                  artifacts: Artifacts, sim_holdout: np.ndarray, checks: Int8Checks, results: PtqResults,
                  log: StageLog) -> Path:
    """The report, the held-out outputs and the manifest, last (whichever AIMET route made the artifacts)."""
    report_files = _report(config, folder, results, fp32, checks, log)
    record = manifest_inputs(export, fp32.onnx, fp32.onnx_sha256, fp32.weights, inputs.split)
    return write_int8_manifest(folder, stage=STAGE, config=config.as_dict(), inputs=record, artifacts=artifacts,
                               holdout=(fp32.holdout, sim_holdout, checks.int8_holdout), report_files=report_files,
                               results=results, log=log)


def finish(config: PtqConfig, artifacts: Artifacts, manifest_path: Path, results: PtqResults,
           log: StageLog) -> PtqOutput:
    """The finished folder's PtqOutput, once it is in place; then the gates (exit 3)."""
    out = config.destination
    result = PtqOutput(out, out / QDQ_ONNX, out / artifacts.aimet_dir.name, out / manifest_path.name, results,
                       read_manifest(out))
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(out)}; report: {display_path(out / 'report.md')}")
    enforce_gates(ptq_gates(config, results), subject="int8 model", hint=GATE_HINT)
    return result


def prepare_float_model(config: PtqConfig, log: StageLog,
                        export: tuple[Manifest, ExportResults] | None = None) -> FloatStart:
    """run_ptq's steps up to the QuantSim: the export checked against its manifest (unless `export`
    already is), the calibration and held-out images, the fp32 references, and the float techniques
    applied to the torch model."""
    from lpcv_depth.backends import aimet as aimet_sim

    aimet_sim.import_aimet()  # before any work: a missing install fails with the command that fixes it
    keep_freed_memory()
    export, export_results = export or _read_export(config, log)
    inputs = _calibration_data(config, log)
    fp32 = _fp32_model(config, export, export_results, inputs, log)
    techniques: dict = {}
    model, preparation = _float_techniques(config, fp32.model, inputs.dummy, techniques, log)
    return FloatStart(export=export, inputs=inputs, fp32=fp32, model=model, preparation=preparation,
                      tail=_output_tail(config, model, inputs.dummy), techniques=techniques,
                      backend=backend_for(config, export))


# --- inputs -------------------------------------------------------------------------------------

def _read_export(config: PtqConfig, log: StageLog) -> tuple[Manifest, ExportResults]:
    """The export stage's folder, its model.onnx checked against the sha256 its manifest records."""
    folder = config.fp32_dir
    if not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(f"--fp32 {folder} is not an export stage output (no {MANIFEST_NAME})",
                          hint=f"run {command_line('export')} first, or pass its output folder with --fp32")
    with log.step("read-export") as step:
        manifest = Manifest.read(folder, stage="export", flag="--fp32")
        results = manifest.results_as(ExportResults)
        step.detail = f"{display_path(folder / FP32_ONNX)} matches its manifest"
    return manifest, results


def _calibration_data(config: PtqConfig, log: StageLog) -> _Inputs:
    import torch

    with log.step("calibration-data") as step:
        split = split_calibration_folder(config.calib_dir, num_calibration=config.num_calib,
                                         num_holdout=config.holdout, min_images=config.min_calib)
        held_out = np.concatenate(list(iter_batches(split.holdout)))
        holdout = held_out[:config.verify_images]
        step.detail = f"{len(split.calibration)} calibration + {len(split.holdout)} held-out images"
        if len(holdout) < len(held_out):
            step.detail += f" (int8 checks on the first {len(holdout)})"
    if len(split.calibration) < RECOMMENDED_IMAGES:
        log.warn(f"{len(split.calibration)} calibration images; use >= {RECOMMENDED_IMAGES} for a real run")
    return _Inputs(split=split, holdout=holdout, sensitivity=held_out[:config.mixed_images],
                   calibration_batches=[torch.from_numpy(b) for b in iter_batches(split.calibration)],
                   holdout_batches=[torch.from_numpy(holdout[i:i + 1]) for i in range(len(holdout))],
                   dummy=torch.from_numpy(holdout[:1]))


def _exported_config(manifest: Manifest):
    """The export stage's config, typed (model, output mode, GELU mode as it was exported)."""
    fields = {key: value for key, value in manifest.config.items() if key != "destination"}
    try:
        return from_json(ExportConfig, fields, where="export config")
    except (SchemaError, ConfigError) as err:
        raise ArtifactMismatchError(f"the export config in {manifest.folder} cannot be read: {err}",
                                    hint=f"rerun {command_line('export')} with this version") from None


def rebuild_fp32_model(manifest: Manifest, results: ExportResults):
    """The exact torch model the export stage exported, from its manifest (weights checked by sha256);
    for an export made from an ONNX file, its model.onnx converted to torch (onnx2torch)."""
    from lpcv_depth.models import create_model, set_gelu_approximation

    if "onnx" in manifest.inputs:
        from lpcv_depth.backends.onnx_torch import onnx_to_torch

        # model.onnx itself was checked against the manifest's sha256 when the export was read.
        return onnx_to_torch(manifest.folder / FP32_ONNX, name=results.model["model"], weights=results.weights)
    from lpcv_depth.models.sources import check_model_files
    from lpcv_depth.models.weights import WeightsInfo

    # Before the config is read back: reading it loads the model's file, which must be the exported one.
    check_model_files(manifest.inputs.get("model"), redo=command_line("export", "--model", manifest.config["model"]))
    exported = _exported_config(manifest)
    weights = from_json(WeightsInfo, results.weights, where="export results.weights")
    redo = command_line("export", "--model", exported.model, "--weights", "PATH")
    if not weights.is_random:
        if not weights.path or not Path(weights.path).is_file():
            raise ConfigError(f"the weights the fp32 model was exported from are gone: {weights.path}",
                              hint=f"re-run {redo} with --weights pointing at them")
        if sha256_file(weights.path) != weights.sha256:
            raise ConfigError(f"weights file {weights.path} changed since export (sha256 differs)",
                              hint=f"re-run {redo} so the fp32 ONNX and the quantized model match")
    model = create_model(exported.model, weights=None if weights.is_random else weights.path, output=exported.output,
                         input_size=tuple(results.model["input_size"]))
    set_gelu_approximation(model, exported.gelu)
    return model


def check_torch_contract(model, sample: np.ndarray) -> dict:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(sample[:1])).numpy()
    return check_output_contract(out, "torch model")


def check_output_contract(output: np.ndarray, what: str) -> dict:
    """ContractError unless `output` (the outputs of len(output) images; `what` made them, e.g. "fp32 ONNX")
    has the contract's shape; then the contract's range checks (verify.check_output_range)."""
    want = TRACK3.output.concrete_shape(len(output) if output.ndim else 1)
    if output.shape != want:
        raise ContractError(f"{what} output shape {output.shape} does not match the contract {want}")
    return check_output_range(output, TRACK3)


def _fp32_model(config: PtqConfig, export: Manifest, results: ExportResults, inputs: _Inputs, log: StageLog) -> _Fp32:
    with log.step("fp32-model") as step:
        model = rebuild_fp32_model(export, results)
        contract = check_torch_contract(model, inputs.holdout)
        onnx_path = config.fp32_dir / FP32_ONNX
        runner = OrtRunner(onnx_path)
        holdout = runner.run(inputs.holdout)
        step.detail = f"{model.spec.name}, weights {model.weights_info.source}"
    if model.weights_info.is_random:
        log.warn("the fp32 model has RANDOM WEIGHTS: fidelity figures are about the pipeline, not a real model")
    return _Fp32(name=model.spec.name, model=model, onnx=onnx_path, onnx_sha256=export.output_sha256(FP32_ONNX),
                 runner=runner, holdout=holdout, contract=contract, weights=model.weights_info.as_dict())


# --- float model ----------------------------------------------------------------------------------

def _float_techniques(config: PtqConfig, model, dummy, techniques: dict, log: StageLog):
    """The model's own rewrite, AIMET's preparation, BN fold and CLE: each changes the float model
    itself and is recorded in `techniques`."""
    from lpcv_depth.backends import aimet as aimet_sim

    _model_rewrite(model, techniques, log)
    with log.step("prepare") as step:
        model, preparation = aimet_sim.prepare_for_quantsim(model)
        step.detail = (f"{preparation.modules_added} functional ops turned into quantizable modules"
                       if preparation.traced else "NOT traceable")
    if not preparation.traced:
        log.warn(f"torch.fx cannot trace this model ({preparation.error}); its functional ops (matmul, add, "
                 "softmax, interpolate, ...) stay unquantized float, which the phone's NPU cannot run in int8. "
                 "Write shape-dependent code without Python control flow on tensor shapes to fix it.")
    if config.bn_fold:
        with log.step("bn-fold") as step:
            folded = aimet_sim.fold_batch_norms(model, dummy)
            techniques["bn_fold"] = {"folded_pairs": folded}
            step.detail = f"{folded} BatchNorm layers folded" if folded else "no BatchNorm to fold"
    if config.cle:
        with log.step("cle") as step:
            change = _cross_layer_equalize(model, dummy)
            techniques["cle"] = {"fp32_sqnr_after_vs_before_db": change}
            step.detail = ("float model unchanged within precision" if change > 60
                           else f"float model moved: SQNR {change:.1f} dB vs before")
    return model, preparation


def _model_rewrite(model, techniques: dict, log: StageLog) -> None:
    """The model's own float rewrite before PTQ (ModelSpec.prepare_for_quantization), when it has one:
    always on, because it is exact and AIMET cannot wrap what it removes (e.g. DA-V2's LayerScales)."""
    prepare = model.spec.prepare_for_quantization
    if prepare is None:
        return
    with log.step("model-rewrite") as step:
        changes = prepare(model)
        techniques.update(changes)
        step.detail = "; ".join(f"{name}: {value}" for name, value in changes.items())


def _cross_layer_equalize(model, dummy) -> float:
    """CLE in place; returns the float model's SQNR after against before (high: it changed little)."""
    from lpcv_depth.backends import aimet as aimet_sim

    before = aimet_sim.run_forward(model, [dummy])
    aimet_sim.cross_layer_equalize(model, dummy)
    return sqnr_db(before, aimet_sim.run_forward(model, [dummy]))


def _output_tail(config: PtqConfig, model, dummy) -> list[str]:
    """Found once on the float model (AdaRound keeps the module names); empty when the tail stays at the
    preset's activation width."""
    from lpcv_depth.backends import aimet as aimet_sim

    return aimet_sim.output_tail(model, dummy) if config.output_tail_bits > config.preset_spec.activation_bw else []


# --- quantsim -------------------------------------------------------------------------------------

def build_quantsim(config: PtqConfig, model, dummy, tail: list[str], param_encodings: Path | None = None):
    """AIMET's QuantSim of `model` with the HTP V75 rules and the output tail widened, optionally with
    frozen (AdaRound) weight encodings; returns the sim and the names of the widened quantizers."""
    from lpcv_depth.backends import aimet as aimet_sim
    from lpcv_depth.backends.aimet_fast import use_fast_histograms

    _, _, QuantizationSimModel = aimet_sim.import_aimet()
    preset = config.preset_spec
    kept = kept_int8_weights(config, model, dummy)
    sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=aimet_sim.quant_scheme(config.calibration_scheme),
                               default_output_bw=preset.activation_bw, default_param_bw=preset.param_bw,
                               config_file=os.fspath(aimet_sim.htp_v75_config_path()))
    widened = aimet_sim.widen_output_tail(sim, tail, config.output_tail_bits)
    aimet_sim.keep_weights_at(sim, kept, 8)
    use_fast_histograms(sim)
    if config.calibration_scheme == "percentile":
        sim.set_percentile_value(config.percentile)
    if param_encodings is not None:
        sim.load_encodings(os.fspath(param_encodings), strict=False, partial=True, requires_grad=False,
                           allow_overwrite=False)
    return sim, widened


def kept_int8_weights(config: PtqConfig, model, dummy) -> list[str]:
    """The weighted layers (module names) whose weights stay int8 in a 4-bit preset (--int8-weights)."""
    from lpcv_depth.backends import aimet as aimet_sim

    if config.preset_spec.param_bw >= 8 or config.int8_weights == "none":
        return []
    layers = aimet_sim.weighted_layers(model, dummy)
    ends = {"first": layers[:1], "last": layers[-1:], "first-last": layers[:1] + layers[-1:]}[config.int8_weights]
    return list(dict.fromkeys(ends))


def _quantsim_step(config: PtqConfig, model, inputs: _Inputs, tail: list[str], techniques: dict, scratch: Path,
                   device: str, log: StageLog):
    """(sim, the torch model it wraps: AdaRounded with --adaround, the calibration method census)."""
    from lpcv_depth.backends import aimet as aimet_sim

    preset = config.preset_spec
    param_encodings = None
    if config.adaround:
        with log.step("adaround") as step:
            model, param_encodings = aimet_sim.apply_adaround(
                model, inputs.dummy, inputs.calibration_batches, iterations=config.adaround_iterations,
                param_bw=preset.param_bw, scheme=aimet_sim.quant_scheme(config.calibration_scheme),
                config_file=aimet_sim.htp_v75_config_path(), workdir=scratch, device=device)
            step.detail = f"{config.adaround_iterations} iterations per layer on {device}"
    with log.step("quantsim") as step:
        sim, widened = build_quantsim(config, model, inputs.dummy, tail, param_encodings)
        analyzers = aimet_sim.calibration_analyzers(sim)
        step.detail = (f"HTP V75 config, {config.calibration_scheme}, w{preset.param_bw}a{preset.activation_bw}; "
                       "activation ranges: " + ", ".join(f"{count} {label}" for label, count in analyzers.items()))
        kept = kept_int8_weights(config, model, inputs.dummy)
        if kept:
            techniques["weights_kept_8bit"] = {"layers": kept, "rule": f"--int8-weights {config.int8_weights}"}
            step.detail += f"; weights kept int8: {', '.join(kept)}"
        if widened:
            techniques["output_tail"] = {"bits": config.output_tail_bits, "quantizers": widened}
            step.detail += f"; output tail at {config.output_tail_bits} bits ({len(widened)} activations)"
    return sim, model, analyzers


def _seq_mse_step(config: PtqConfig, sim, inputs: _Inputs, techniques: dict, device: str, log: StageLog) -> None:
    from lpcv_depth.backends import aimet as aimet_sim

    if not config.seq_mse:
        return
    with log.step("seq-mse") as step:
        optimized = aimet_sim.apply_seq_mse(sim, inputs.calibration_batches, config.seq_mse_candidates, device)
        techniques["seq_mse"] = {"layers_optimized": optimized, "candidates": config.seq_mse_candidates}
        step.detail = f"{optimized} layers, {config.seq_mse_candidates} candidate ranges each, on {device}"
    if not optimized:
        raise RuntimeError("SeqMSE optimized no layer: aimet-torch changed how it selects layers")


def _calibrate_step(sim, inputs: _Inputs, device: str, log: StageLog) -> None:
    with log.step("compute-encodings") as step:
        calibrate(sim, inputs.calibration_batches, STAGE, device)
        step.detail = f"{len(inputs.calibration_batches)} images on {device}"


def _rounding_ablation(config: PtqConfig, float_model, sim, inputs: _Inputs, fp32: _Fp32, tail: list[str],
                       device: str, log: StageLog) -> dict | None:
    """What the weight-rounding techniques bought: the same sim with nearest rounding, same images."""
    from lpcv_depth.backends import aimet as aimet_sim

    applied = " + ".join(name for name, on in (("AdaRound", config.adaround), ("SeqMSE", config.seq_mse)) if on)
    if not applied:
        return None
    with log.step("rounding-ablation") as step:
        nearest, _ = build_quantsim(config, float_model, inputs.dummy, tail)
        calibrate(nearest, inputs.calibration_batches, STAGE, device)
        without = sqnr_db(fp32.holdout, aimet_sim.run_forward(nearest.model, inputs.holdout_batches))
        with_ = sqnr_db(fp32.holdout, aimet_sim.run_forward(sim.model, inputs.holdout_batches))
        step.detail = f"AIMET sim SQNR {with_:.2f} dB with {applied}, {without:.2f} dB with nearest rounding"
    return {applied: {"sqnr_db": without, "sqnr_db_with": with_, "gain_db": with_ - without}}


def _sensitivity(config: PtqConfig, sim, reference_model, inputs: _Inputs, log: StageLog) -> dict | None:
    """The mixed preset: per-layer sensitivity against the float torch model on held-out images; the
    activations whose 8 bits cost more than --mixed-max-drop stay at 16. The output tail is 16-bit by
    rule, not by measurement, so it is not measured."""
    import torch

    from lpcv_depth.backends import aimet as aimet_sim

    if not config.preset_spec.mixed:
        return None
    images = torch.from_numpy(inputs.sensitivity)
    with log.step("sensitivity") as step:
        quantizers = aimet_sim.activation_quantizers(sim, max_bitwidth=8)
        with Progress(len(quantizers), f"{STAGE}: per-layer sensitivity") as tick:
            reference = aimet_sim.run_forward(reference_model, [images])
            sensitivity = aimet_sim.promote_sensitive_layers(sim, [images], reference,
                                                             max_drop_db=config.mixed_max_drop, progress=tick)
        step.detail = f"{len(sensitivity.promoted)}/{len(quantizers)} activations kept at 16 bits"
    return {"baseline_all_16bit_sqnr_db": sensitivity.baseline_sqnr_db, "max_drop_db": sensitivity.threshold_db,
            "activation_quantizers": len(quantizers), "kept_16bit": sensitivity.promoted,
            "per_layer_8bit_sqnr_db": sensitivity.per_layer_sqnr_db}


# --- outputs --------------------------------------------------------------------------------------

def _report(config: PtqConfig, folder: Path, results: PtqResults, fp32: _Fp32, checks: Int8Checks,
            log: StageLog) -> list[Path]:
    from lpcv_depth.stages.ptq_report import write_report

    with log.step("report") as step:
        files = write_report(folder, config, results, fp32.holdout, checks.int8_holdout)
        step.artifact = folder / "report.md"
    return files


def _next_hint(result: PtqOutput) -> str:
    folder = display_path(result.out_dir)
    return f"{command_line('htp-check', '--ptq', folder)}   (then: {command_line('hub', folder)})"


DEFINITION = StageDefinition(name=STAGE, config=PtqConfig, run=run_ptq, description=__doc__, next_hint=_next_hint)
