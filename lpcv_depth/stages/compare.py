"""fp32 against int8, side by side: phone latency and FPS against the target, memory, NPU/CPU layers,
host latency, sizes, accuracy and the local HTP check, from the export, ptq, htp-check and hub folders.

    lpcv-depth compare --fp32 build/fastdepth/export --int8 build/fastdepth/ptq-w8a8
    lpcv-depth compare --fp32 build/fastdepth/export --int8 build/fastdepth/ptq-w8a8 \\
        --fp32-hub build/fastdepth/hub-export-tflite --int8-hub build/fastdepth/hub-ptq-w8a8-tflite

Hub runs default to the hub-*/ folders whose manifest names an input as theirs (the int8 one: the
ptq folder or its HTP check's context binary; qnn_context_binary first, else the newest); the HTP
check defaults to <int8>/htp-check.
The report shows what exists: without a hub run it holds the host figures (and the HTP check's
emulation figures, when there is one) and says so. Writes OUT/compare.md, compare.json,
compare.png and manifest.json (default OUT: the compare/ folder beside --fp32).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, config_as_dict, read_manifest, sha256_file, write_manifest
from lpcv_depth.options import option
from lpcv_depth.report import cell
from lpcv_depth.results import (INT8_STAGES, CompareColumn, CompareFidelity, CompareResults, ExportResults,
                                HtpCheckResults, HubResults, PtqResults, int8_results_type)
from lpcv_depth.schema import to_json
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, command_line, display_path
from lpcv_depth.stages.compare_report import HTP_NOTE, chart_panels, write_report
from lpcv_depth.track3_metric import FSCORE
from lpcv_depth.verify import output_fidelity, recorded_path, recorded_sha256

__all__ = ["CompareConfig", "CompareInputs", "CompareOutput", "run_compare", "read_inputs", "find_hub_run",
           "chart_panels", "HTP_NOTE"]

STAGE = "compare"
PRECISIONS = ("fp32", "int8")
PREFERRED_RUNTIME = "qnn_context_binary"
FP32_ONNX = "model.onnx"
INT8_ONNX = "model_qdq.onnx"
HTP_CHECK_FOLDER = "htp-check"


@dataclass(frozen=True)
class CompareConfig:
    fp32: Path = option(help="export stage folder (fp32 model.onnx)")
    int8: Path = option(help="ptq or qat stage folder (int8 model_qdq.onnx)")
    fp32_hub: Path | None = option(None, help="hub stage folder of the fp32 model (default: found beside --fp32)")
    int8_hub: Path | None = option(None, help="hub stage folder of the int8 model (default: found beside --int8)")
    htp_check: Path | None = option(None, help="htp-check stage folder of the int8 model (default: <int8>/htp-check "
                                               "when it exists)")
    out: Path | None = option(None, help="output folder (default: the compare/ folder beside --fp32)")
    target_fps: float = option(30.0, help="the FPS the device latency is held against")

    def __post_init__(self):
        if not self.target_fps > 0:
            raise ConfigError(f"target_fps must be > 0, got {self.target_fps}", hint="e.g. --target-fps 30")

    @property
    def destination(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.fp32).parent / "compare"

    @property
    def htp_check_dir(self) -> Path | None:
        if self.htp_check is not None:
            return Path(self.htp_check)
        default = Path(self.int8) / HTP_CHECK_FOLDER
        return default if (default / MANIFEST_NAME).is_file() else None

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class StageRun:
    """Another stage's output folder and its typed results."""

    folder: Path
    manifest: Manifest
    results: object


@dataclass(frozen=True)
class CompareInputs:
    export: StageRun
    ptq: StageRun
    hubs: dict[str, StageRun | None]
    htp: StageRun | None
    # The ptq stage measured exactly this export's model.onnx (so its fp32 figures belong to the fp32 column).
    ptq_fp32_matches: bool
    # The HTP check's fp32 reference is this export's model.onnx.
    htp_fp32_matches: bool

    @property
    def model(self) -> str:
        return self.ptq.results.model

    def folders(self) -> dict[str, Path]:
        found = {"fp32": self.export.folder, "int8": self.ptq.folder}
        found.update({f"{key}_hub": run.folder for key, run in self.hubs.items() if run is not None})
        if self.htp is not None:
            found["htp_check"] = self.htp.folder
        return found


@dataclass(frozen=True)
class CompareOutput:
    """What a finished run of the compare stage hands back: where its output folder is, and what it found."""

    out_dir: Path
    manifest_path: Path
    results: CompareResults
    manifest: dict

    @property
    def report(self) -> dict:
        """The results as compare.json holds them."""
        return to_json(self.results)


def run_compare(config: CompareConfig, log: StageLog | None = None) -> CompareOutput:
    """Gather both models' figures, write the table, the JSON, the chart and the manifest."""
    log = log or StageLog(STAGE)
    inputs = _read_inputs_step(config, log)
    columns = _columns_step(config, inputs, log)
    fidelity = _fidelity_step(inputs, columns, log)
    results = _results(config, inputs, columns, fidelity)
    with StagingDir(config.destination, stage=STAGE, inputs=list(inputs.folders().values())) as staging:
        outputs = _write_report_step(staging.path, results, log)
        manifest_path = write_manifest(staging.path, stage=STAGE, config=config.as_dict(),
                                       inputs=_inputs_record(inputs), outputs=outputs, timings=log.timings,
                                       results=results)
    destination = config.destination
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(destination)}")
    return CompareOutput(destination, destination / manifest_path.name, results, read_manifest(destination))


# ----------------------------------------------------------------------------------------- inputs

def read_inputs(config: CompareConfig, verify: bool = True) -> CompareInputs:
    """Every input folder through its manifest and typed results; refuses folders of different models."""
    export = _read(config.fp32, "export", "--fp32", ExportResults, verify)
    ptq = _read(config.int8, INT8_STAGES, "--int8", None, verify)
    ptq_fp32_matches = _check_pair(config, export, ptq)
    hubs = {precision: _hub_run(config, precision, ptq.results.model, verify) for precision in PRECISIONS}
    htp = None
    if config.htp_check_dir is not None:
        htp = _read(config.htp_check_dir, "htp-check", "--htp-check", HtpCheckResults, verify)
        _check_htp(config, htp, ptq)
    export_sha = export.manifest.output_sha256(FP32_ONNX)
    htp_fp32_matches = htp is not None and recorded_sha256(htp.manifest, "fp32_onnx") == export_sha
    return CompareInputs(export, ptq, hubs, htp, ptq_fp32_matches, htp_fp32_matches)


def _read(folder: Path, stage: str | tuple[str, ...], flag: str, results_type: type | None, verify: bool) -> StageRun:
    """`results_type` None: an int8 folder, typed by the stage that wrote it (ptq or qat)."""
    manifest = Manifest.read(folder, stage=stage, flag=flag, verify=verify)
    return StageRun(Path(folder), manifest, manifest.results_as(results_type or int8_results_type(manifest.stage)))


def _export_model_name(export: StageRun) -> str:
    return export.results.model["model"]


def _check_pair(config: CompareConfig, export: StageRun, ptq: StageRun) -> bool:
    """The ptq folder must have quantized this very export; returns whether its fp32 record says so."""
    export_sha = export.manifest.output_sha256(FP32_ONNX)
    ptq_fp32_sha = recorded_sha256(ptq.manifest, "fp32_onnx")
    names = (_export_model_name(export), ptq.results.model)
    if names[0] == names[1] and ptq_fp32_sha in (None, export_sha):
        return ptq_fp32_sha is not None
    quantized = recorded_path(ptq.manifest, "fp32_onnx")
    raise ConfigError(
        f"--int8 {config.int8} was not quantized from --fp32 {config.fp32}: the ptq stage read a {names[1]} model "
        f"(sha256 {str(ptq_fp32_sha)[:12]}), the export holds {names[0]} (sha256 {str(export_sha)[:12]})",
        hint=(f"pass the export folder the ptq stage read ({Path(quantized).parent})" if quantized else
              "pass the export folder the ptq stage read") + f", or rerun {command_line('ptq', '--fp32', config.fp32)}")


def _check_htp(config: CompareConfig, htp: StageRun, ptq: StageRun) -> None:
    checked, quantized = recorded_sha256(htp.manifest, "qdq_onnx"), ptq.manifest.output_sha256(INT8_ONNX)
    if checked != quantized:
        raise ConfigError(f"--htp-check {htp.folder} checked another int8 model than --int8 {config.int8}'s "
                          f"{INT8_ONNX} (sha256 {str(checked)[:12]} vs {str(quantized)[:12]})",
                          hint=f"rerun {command_line('htp-check', '--ptq', config.int8)}, or pass that int8 "
                               f"model's htp-check folder with --htp-check")


def _hub_run(config: CompareConfig, precision: str, model: str, verify: bool) -> StageRun | None:
    flag = f"--{precision}-hub"
    # The int8 model also reaches the phone as the context binary its HTP check built.
    sources = (config.fp32,) if precision == "fp32" else (config.int8, config.htp_check_dir)
    folder = getattr(config, f"{precision}_hub") or find_hub_run(*sources)
    if folder is None:
        return None
    run = _read(folder, "hub", flag, HubResults, verify)
    uploaded = run.results.input
    if uploaded.precision not in (precision, "unknown") or uploaded.model_name not in (None, model):
        raise ConfigError(f"{flag} {folder} ran a {uploaded.precision} {uploaded.model_name} model, not the "
                          f"{precision} {model} of --{precision}",
                          hint=f"pass the hub run of --{precision} {getattr(config, precision)}, or leave {flag} out")
    return run


def find_hub_run(*sources: Path | None) -> Path | None:
    """The hub stage output that took one of `sources` as input, from the hub-*/ folders beside them
    (where the hub stage writes): qnn_context_binary first, else the newest."""
    targets = {Path(source).resolve() for source in sources if source is not None}
    candidates = sorted({folder for target in targets for folder in target.parent.glob("hub-*")})
    found = []
    for folder in candidates:
        try:
            manifest = Manifest.read(folder, stage="hub", verify=False)
            uploaded = manifest.results_as(HubResults)
        except LpcvError:
            continue  # not a hub run this version reads: only an explicit --*-hub may name it
        source = uploaded.input.source_dir
        if source and Path(source).resolve() in targets:
            found.append((uploaded.runtime == PREFERRED_RUNTIME, manifest.created, folder))
    return max(found)[2] if found else None


def _read_inputs_step(config: CompareConfig, log: StageLog) -> CompareInputs:
    with log.step("read-inputs") as step:
        inputs = read_inputs(config)
        found = [f"{key} hub run: {display_path(run.folder) if run else 'none'}" for key, run in inputs.hubs.items()]
        found.append(f"HTP check: {display_path(inputs.htp.folder) if inputs.htp else 'none'}")
        step.detail = ", ".join(found)
    missing = [key for key, run in inputs.hubs.items() if run is None]
    if missing:
        log.warn(f"no AI Hub run for {' and '.join(missing)}: its device figures are left out (host figures "
                 f"only). Run {command_line('hub')} on it first.")
    if not inputs.ptq_fp32_matches:
        log.warn(f"the ptq manifest of {config.int8} records no fp32 model hash: its fp32 figures are left out")
    return inputs


# ---------------------------------------------------------------------------------------- columns

def _columns_step(config: CompareConfig, inputs: CompareInputs, log: StageLog) -> dict[str, CompareColumn]:
    with log.step("columns") as step:
        columns = {precision: _column(precision, config, inputs) for precision in PRECISIONS}
        step.detail = ", ".join(f"{key}: {sum(v is not None for v in to_json(column).values())} figures"
                                for key, column in columns.items())
    return columns


def _column(precision: str, config: CompareConfig, inputs: CompareInputs) -> CompareColumn:
    """One model's figures, each from that model's own folders; None wherever nothing measured it."""
    own = inputs.export if precision == "fp32" else inputs.ptq
    hub = inputs.hubs[precision]
    figures = {**_host_figures(precision, inputs), **_hub_figures(hub, config.target_fps),
               **_htp_figures(precision, inputs)}
    return CompareColumn(source=os.fspath(own.folder), hub_run=os.fspath(hub.folder) if hub else None, **figures)


def _host_figures(precision: str, inputs: CompareInputs) -> dict:
    """ONNX size from the model's own folder; host latency and GT scores from the ptq stage, which
    measured both models (its fp32 only counts when it is this export's model.onnx)."""
    ptq: PtqResults = inputs.ptq.results
    int8 = precision == "int8"
    if int8:
        figures = {"onnx_bytes": ptq.sizes_bytes.qdq_onnx,
                   "aimet_bytes": ptq.sizes_bytes.aimet_onnx + ptq.sizes_bytes.aimet_encodings}
    else:
        figures = {"onnx_bytes": inputs.export.results.onnx_bytes}
    if not int8 and not inputs.ptq_fp32_matches:
        return figures
    latency, truth = ptq.host_latency_ms, ptq.ground_truth
    metrics = (truth.int8 if int8 else truth.fp32) if truth else {}
    figures.update(host_latency_ms=(latency.int8_qdq if int8 else latency.fp32) if latency else None,
                   fscore_gt_host=metrics.get(FSCORE), abs_rel_gt_host=metrics.get("abs_rel"))
    return figures


def _hub_figures(hub: StageRun | None, target_fps: float) -> dict:
    if hub is None:
        return {}
    results: HubResults = hub.results
    figures = {"runtime": results.runtime}
    if results.compile is not None:
        figures.update(compile_job_id=results.compile.job_id, compiled_bytes=results.compile.bytes)
    profile = results.profile
    if profile is not None:
        units = profile.compute_units
        peak = profile.peak_memory_bytes
        figures.update(profile_job_id=profile.job_id, device_latency_ms=profile.estimated_inference_time_ms,
                       fps=profile.fps, meets_target_fps=profile.fps >= target_fps, layers=profile.layers,
                       npu_layers=units.get("NPU"), gpu_layers=units.get("GPU"), cpu_layers=units.get("CPU"),
                       peak_memory_mb=[v / 1e6 for v in peak] if peak else None, cpu_fallback=profile.cpu_fallback)
    inference = results.inference
    if inference is not None and inference.ground_truth is not None:
        truth = inference.ground_truth
        figures.update(fscore_gt_device=truth.device.get(FSCORE), abs_rel_gt_device=truth.device.get("abs_rel"),
                       gt_frames_device=truth.frames)
    if inference is not None and inference.vs_host is not None:
        figures["device_vs_host_sqnr_db"] = inference.vs_host.sqnr_db
    return figures


def _htp_figures(precision: str, inputs: CompareInputs) -> dict:
    """The local HTP check: the int8 model's coverage, scores and context binary; the fp32 model's
    fp16 coverage and CPU score, when the check's fp32 reference is this export's model."""
    if inputs.htp is None:
        return {}
    htp: HtpCheckResults = inputs.htp.results
    truth = htp.ground_truth
    if precision == "fp32":
        if not inputs.htp_fp32_matches:
            return {}
        fp32_gt = truth.overall.get("fp32", {}).get(FSCORE) if truth else None
        return {"htp_full": htp.fp16_baseline.full_htp if htp.fp16_baseline else None, "htp_fscore_gt": fp32_gt,
                "htp_gt_frames": truth.frames if fp32_gt is not None else None}
    vs_fp32 = htp.numerics.get("htp_vs_fp32") if inputs.htp_fp32_matches else None
    return {"htp_full": htp.coverage.full_htp, "htp_nodes": htp.coverage.htp_nodes,
            "htp_cpu_nodes": htp.coverage.cpu_nodes,
            "htp_fscore_gt": truth.overall.get("int8_htp", {}).get(FSCORE) if truth else None,
            "htp_gt_frames": truth.frames if truth else None,
            "htp_fscore_vs_fp32": vs_fp32.fscore if vs_fp32 else None,
            "context_binary_bytes": htp.context_binary.bytes if htp.context_binary else None}


# ------------------------------------------------------------------------------- int8 against fp32

def _fidelity_step(inputs: CompareInputs, columns: dict[str, CompareColumn], log: StageLog) -> CompareFidelity:
    with log.step("int8-vs-fp32") as step:
        fidelity = _fidelity(inputs, columns)
        step.detail = (f"host SQNR {fidelity.host_sqnr_db:.1f} dB (scale-aligned "
                       f"{cell(fidelity.host_sqnr_db_scale_aligned)} dB)")
        if fidelity.device:
            step.detail += (f", on-device SQNR {fidelity.device['sqnr_db']:.1f} dB over "
                            f"{fidelity.device['frames']} frames")
    return fidelity


def _fidelity(inputs: CompareInputs, columns: dict[str, CompareColumn]) -> CompareFidelity:
    host = inputs.ptq.results.int8_vs_fp32
    hubs = inputs.hubs
    device = _device_int8_vs_fp32(*(hubs[p].folder if hubs[p] else None for p in PRECISIONS))
    fp32_ms, int8_ms = columns["fp32"].device_latency_ms, columns["int8"].device_latency_ms
    htp_vs_fp32 = inputs.htp.results.numerics.get("htp_vs_fp32") if inputs.htp_fp32_matches else None
    return CompareFidelity(host_sqnr_db=host.sqnr_db, host_sqnr_db_scale_aligned=host.sqnr_db_scale_aligned,
                           host_fscore_vs_fp32=host.fscore_vs_fp32, host_holdout_images=host.holdout_images,
                           device=device, device_speedup=fp32_ms / int8_ms if fp32_ms and int8_ms else None,
                           htp_sqnr_db=htp_vs_fp32.sqnr_db if htp_vs_fp32 else None,
                           htp_fscore_vs_fp32=htp_vs_fp32.fscore if htp_vs_fp32 else None)


def _device_int8_vs_fp32(fp32_hub: Path | None, int8_hub: Path | None) -> dict | None:
    """SQNR of the phone's int8 outputs against the phone's fp32 outputs, on the frames both runs have."""
    if fp32_hub is None or int8_hub is None:
        return None
    folders = [Path(hub) / "device_outputs" for hub in (fp32_hub, int8_hub)]
    if not all(folder.is_dir() for folder in folders):
        return None
    common = sorted({p.relative_to(folders[0]) for p in folders[0].rglob("*.npy")}
                    & {p.relative_to(folders[1]) for p in folders[1].rglob("*.npy")})
    if not common:
        return None
    fp32 = np.stack([np.load(folders[0] / name) for name in common])
    int8 = np.stack([np.load(folders[1] / name) for name in common])
    measured = output_fidelity(fp32, int8, fscore=False)
    return {"sqnr_db": measured.sqnr_db, "max_abs_diff": measured.max_abs_diff, "frames": len(common)}


def _results(config: CompareConfig, inputs: CompareInputs, columns: dict[str, CompareColumn],
             fidelity: CompareFidelity) -> CompareResults:
    missing = [key for key, run in inputs.hubs.items() if run is None]
    results = CompareResults(model=inputs.model, target_fps=config.target_fps, host_only=len(missing) == 2,
                             missing_hub_runs=missing, models=columns, int8_vs_fp32=fidelity,
                             htp_check=os.fspath(inputs.htp.folder) if inputs.htp else None,
                             htp_check_note=HTP_NOTE if inputs.htp else None)
    return dataclasses.replace(results, chart=chart_panels(results))


# ----------------------------------------------------------------------------------------- outputs

def _write_report_step(folder: Path, results: CompareResults, log: StageLog) -> list[Path]:
    with log.step("write") as step:
        paths, drawn = write_report(folder, results)
        step.detail = f"{', '.join(path.name for path in paths)} ({drawn} panels)"
    return paths


def _inputs_record(inputs: CompareInputs) -> dict:
    return {key: {"path": os.fspath(folder), "manifest_sha256": sha256_file(Path(folder) / MANIFEST_NAME)}
            for key, folder in inputs.folders().items()}


def _next_hint(result: CompareOutput) -> str:
    return f"cat {shlex.quote(display_path(result.out_dir / 'compare.md'))}"


DEFINITION = StageDefinition(name=STAGE, config=CompareConfig, run=run_compare, description=__doc__,
                             next_hint=_next_hint)
