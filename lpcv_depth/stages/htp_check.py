"""Local QNN HTP check: the int8 QDQ model through the Snapdragon 8 Gen 3 NPU's own arithmetic, on the host.

    lpcv-depth htp-check --ptq build/fastdepth/ptq-w8a8
    lpcv-depth htp-check --ptq build/fastdepth/ptq-w8a8 --eval-data ../shared/data/rgbd --max-frames 8
    lpcv-depth htp-check --ptq build/fastdepth/ptq-w8a8 --require-full-htp --max-fscore-drop 1.0  # CI gate
    lpcv-depth htp-check --ptq my_model_qdq.onnx --images calibration_data --fp32 model.onnx

onnxruntime-qnn's Linux x86_64 wheel carries the QNN HTP backend built for x86 (libQnnHtp.so): it
partitions an ONNX model the way the phone's QNN execution provider does, computes with the HTP's
quantized kernels, and compiles a QNN context binary for a given HTP architecture. Reads the ptq
stage's folder and writes to OUT (default <ptq>/htp-check):
  model_ctx.onnx + model_ctx_qnn.bin   the QNN context binary for HTP v75, built here (the hub stage can profile it)
  report.json, report.md, manifest.json
  eval/<model>/                        with --eval-data: the evaluate stage's scores of fp32, int8 CPU, int8 HTP

Op coverage: the model is compiled with CPU fallback disabled; if the HTP refuses ops, they are named
with QNN's reason and the HTP/CPU partition of a fallback-enabled build is reported.
Numerics: HTP-emulated int8 against ONNX Runtime's CPU QDQ, AIMET's simulation and fp32 on the ptq
stage's held-out images, plus the fp32 model on the HTP in fp16 (the NPU's float baseline).

Every time printed here is host EMULATION time on this x86 CPU. It is NOT device latency: the NPU
is orders of magnitude faster. Only an AI Hub profile job measures the phone. More: docs/htp-check.md.
"""

from __future__ import annotations

import collections
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lpcv_depth.backends.qnn import (EMULATION_NOTE, HTP_ARCHS, QDQ_OPS, SM8650, SOC_MODELS, Compiled,
                                     HtpRefusedError, HtpSession, HtpTarget, QnnBackend, compile_for_htp,
                                     compile_fp16, import_qnn, inspect_qdq_model, keep_context, run_killable)
from lpcv_depth.backends.qdq_int4 import INT4_EMULATION_NOTE, int4_weight_count, with_int8_storage
from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.gates import Gate, enforce_gates
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, config_as_dict, read_manifest, sha256_file, write_manifest
from lpcv_depth.options import inherit, option
from lpcv_depth.pins import pinned_version
from lpcv_depth.results import (ContextBinary, Coverage, EmulationTime, EvaluateResults, Fp16Baseline,
                                HtpCheckResults, HtpGroundTruth, OutputComparison, int8_results_type)
from lpcv_depth.stage import (StageDefinition, StageLog, StagingDir, command_line, display_path,
                              remove_stale_partials)
from lpcv_depth.stages.evaluate import EvaluateConfig, evaluate_within
from lpcv_depth.stages.htp_report import op_summary
from lpcv_depth.stages.int8_outputs import HOLDOUT_OUTPUTS, INT8_STAGES, QDQ_ONNX
from lpcv_depth.verify import ParityThresholds, output_fidelity, recorded_sha256
from lpcv_depth.workspace import in_workspace

__all__ = ["HtpCheckConfig", "HtpCheckOutput", "run_htp_check", "HtpRefusedError", "InputChangedError", "STAGE"]

STAGE = "htp-check"
CONTEXT_ONNX = "model_ctx.onnx"
CONTEXT_IO = "float32 image in, float32 depth out (input quantization and output dequantization inside the graph)"
CONTEXT_BUILD_NOTE = "build_s is the host compile (HTP graph prepare) time, not device latency"
# The qai-hub release the note below describes: the one lpcv-depth pins, as major.minor.
QAI_HUB_RELEASE = ".".join((pinned_version("qai-hub") or "").split(".")[:2]) or "(the hub extra's)"
HUB_CONTEXT_NOTE = (f"qai-hub {QAI_HUB_RELEASE} takes a QNN context binary for profile/inference jobs as a .bin file "
                    "(SourceModelType.QNN_CONTEXT_BINARY, devices with framework:qnn), or this folder's "
                    "model_ctx.onnx + model_ctx_qnn.bin as an ONNX model with a precompiled QNN context. "
                    "A context binary only loads on a QNN runtime at least as new as the one that built it "
                    "(qnn_sdk_version here): pick a matching --qairt_version on AI Hub.")
CPU_ISLAND_COST = ("On the phone every HTP/CPU boundary costs a round trip off the NPU, far slower than a model "
                   "fully on the NPU (measured: see docs/htp-check.md).")
# How much closer to fp32 the HTP must be than ONNX Runtime's CPU QDQ before the CPU is blamed for a
# parity miss: a margin above run-to-run noise, not a measurement.
CPU_SUSPECT_MARGIN_DB = 3.0
GATE_HINT = "the report was written; see its coverage section (ops the HTP refuses) and numerics"


class InputChangedError(LpcvError):
    """A file the check reads vanished or became unreadable while it ran."""


@dataclass(frozen=True)
class HtpCheckConfig:
    """What to check (a ptq folder or a QDQ .onnx), for which HTP, on which images; validated here."""

    ptq: Path = option(help="ptq (or qat) stage output folder, or a QDQ .onnx file")
    soc_model: str = option(SM8650, help=f"QNN SoC id (default {SM8650}: SM8650, Snapdragon 8 Gen 3, Galaxy S24)")
    htp_arch: str = option("75", choices=HTP_ARCHS, help="HTP architecture (default 75: 8 Gen 3)")
    images: Path | None = option(None, help="photos for the numerics (default: the ptq stage's held-out images, "
                                            "never seen by calibration)")
    fp32: Path | None = option(None, help="fp32 ONNX file for the fp32 references and the fp16 baseline "
                                          "(default: the ptq stage's)")
    eval_data: Path | None = option(None, help="RGB-D set(s): F-score against ground truth")
    median: str = inherit(EvaluateConfig, "median")
    max_frames: int | None = option(None, help="at most N held-out images and N RGB-D frames (spread over the sets); "
                                               "the emulation takes seconds (FastDepth) to minutes (ViT) per frame")
    fp16_baseline: bool = option(True, help="the fp32 model on the HTP in fp16, the NPU's float baseline")
    numerics: bool = option(True, help="run the int8 model on the emulated HTP and compare its outputs; "
                                       "--no-numerics: coverage and context binary only (what a search needs)")
    context_binary: bool = option(True, help="keep the QNN context binary")
    fscore_max_points: int | None = option(None, help="F-scores against fp32/CPU outputs on N sampled pixels "
                                                      "(faster, slightly different; default: every pixel)")
    # HTP-emulated int8 against ONNX Runtime's CPU kernels on the same QDQ graph: the HTP requantizes in
    # its own fixed-point arithmetic, so a few quantization steps apart is normal; past these the HTP
    # computes something else (a warning, and recorded).
    parity_min_sqnr: float = option(20.0, help="warn when HTP vs CPU int8 SQNR is lower, dB")
    parity_max_abs: float = option(0.25, help="warn when HTP vs CPU int8 max abs diff is larger")
    require_full_htp: bool = option(False, help="gate: exit 3 if any node runs on the CPU")
    max_fscore_drop: float | None = option(None, help="gate: exit 3 if the HTP int8 F-score drops more than this "
                                                      "vs fp32")
    min_sqnr: float | None = option(None, help="gate: exit 3 if HTP int8 vs fp32 SQNR is lower, dB")
    out: Path | None = option(None, help="output folder (default: <ptq>/htp-check, or htp-check/ beside the .onnx)")

    def __post_init__(self):
        object.__setattr__(self, "ptq", Path(self.ptq))
        self._check_target()
        for name in ("images", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} folder not found: {value}")
        if self.fp32 is not None and not Path(self.fp32).is_file():
            raise ConfigError(f"--fp32 model not found: {self.fp32}", hint="pass the fp32 .onnx file")
        if self.fscore_max_points is not None and self.fscore_max_points < 100:
            raise ConfigError(f"fscore_max_points must be >= 100 (or None: every pixel), got {self.fscore_max_points}")
        if not self.numerics and (self.min_sqnr is not None
                                  or (self.max_fscore_drop is not None and self.eval_data is None)):
            raise ConfigError("--no-numerics leaves nothing for --min-sqnr / --max-fscore-drop to check",
                              hint="drop --no-numerics, or the gate (--require-full-htp needs only coverage; "
                                   "--max-fscore-drop works with --eval-data)")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.max_fscore_drop is not None and self.max_fscore_drop < 0:
            raise ConfigError(f"max_fscore_drop must be >= 0, got {self.max_fscore_drop}")
        self.cpu_parity  # validates the thresholds

    def _check_target(self) -> None:
        if not (self.soc_model.isdigit() and int(self.soc_model) > 0):
            raise ConfigError(f"soc_model must be a positive QNN SoC id, got {self.soc_model!r}",
                              hint=f"the Galaxy S24 (SM8650) is {SM8650}; others: {SOC_MODELS}")
        if self.htp_arch not in HTP_ARCHS:
            raise ConfigError(f"htp_arch must be one of {HTP_ARCHS}, got {self.htp_arch!r}",
                              hint="the Snapdragon 8 Gen 3 (Galaxy S24) is 75")

    @property
    def cpu_parity(self) -> ParityThresholds:
        return ParityThresholds(max_abs_diff=self.parity_max_abs, min_sqnr_db=self.parity_min_sqnr)

    @property
    def target(self) -> HtpTarget:
        return HtpTarget(soc_model=self.soc_model, htp_arch=self.htp_arch)

    @property
    def ptq_dir(self) -> Path | None:
        return self.ptq if self.ptq.is_dir() else None

    @property
    def qdq_onnx(self) -> Path:
        return self.ptq_dir / QDQ_ONNX if self.ptq_dir else self.ptq

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        # Inside the ptq folder: a rerun of ptq replaces its folder, and the check of the old model with it.
        return (self.ptq_dir or self.ptq.parent) / "htp-check"

    @property
    def read_paths(self) -> list[Path | None]:
        """What the run reads that --out must never replace: the ptq folder's files rather than the
        folder, so that the default output may live inside it (but --out cannot be the ptq folder)."""
        ptq = ([self.qdq_onnx, self.ptq_dir / MANIFEST_NAME, self.ptq_dir / HOLDOUT_OUTPUTS] if self.ptq_dir
               else [self.ptq])
        return [*ptq, self.images, self.fp32, self.eval_data]

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class HtpCheckOutput:
    """What a finished run of the htp-check stage hands back: where its output folder is, and what it found."""

    out_dir: Path
    context_onnx: Path | None
    results: HtpCheckResults
    manifest: dict
    config: HtpCheckConfig


@dataclass(frozen=True)
class _Inputs:
    """What the numerics run on: the images, the float model and the ptq stage's saved outputs."""

    images: np.ndarray
    fp32_onnx: Path | None
    reference: dict  # name -> outputs on `images` (fp32, aimet_sim, int8_qdq) when the ptq stage saved them
    record: dict  # the manifest's `inputs`

    @property
    def paths(self) -> list[Path | None]:
        """Read paths found through the ptq manifest: the fp32 model and the images' folder."""
        return [self.fp32_onnx, Path(self.record["images"]["root"])]


# ---------------------------------------------------------------------------------------------
# The stage


def run_htp_check(config: HtpCheckConfig, log: StageLog | None = None) -> HtpCheckOutput:
    """Coverage, numerics, context binary and fp16 baseline of the int8 model on the emulated HTP, in a
    child process that an interrupt kills at once (the emulation's native calls run for seconds)."""
    log = log or StageLog(STAGE)
    return run_killable(_check, log, config, on_kill=functools.partial(_clean_after_kill, config.destination))


def _clean_after_kill(destination: Path, pid: int) -> None:
    """Remove what a killed check left beside `destination`; killed between the two renames that swap
    a finished check in, the earlier check goes back in place."""
    destination = destination.resolve()
    previous = destination.parent / f".{destination.name}.previous-{pid}"
    if previous.is_dir() and not destination.exists():
        os.replace(previous, destination)
    remove_stale_partials(destination)


def _check(config: HtpCheckConfig, log: StageLog) -> HtpCheckOutput:
    log.info("every time below is host EMULATION time on this x86 CPU, not device latency")
    warnings: list[str] = []
    with _inputs_stay_readable():
        inputs = _load_inputs(config, log)
        backend = _load_qnn(config, log)
        model = _inspect(config.qdq_onnx, log)
        with StagingDir(config.destination, stage=STAGE, inputs=[*config.read_paths, *inputs.paths],
                        scratch=True) as staging:
            compiled, coverage = _compile(config, backend, model, staging.scratch / CONTEXT_ONNX, log, warnings)
            context = _keep_context(config, backend, compiled, staging, log) if config.context_binary else None
            if config.numerics:
                htp_int8, int8_time = _run_int8(compiled.session, inputs.images, log)
                references = _cpu_references(config, inputs, log)
                numerics = _numerics(config, htp_int8, references, log, warnings)
            else:
                int8_time, references, numerics = None, {}, {}
                log.info("numerics skipped (--no-numerics): coverage and context binary only")
            fp16, fp16_time = _fp16_baseline(config, backend, inputs, references.get("fp32"), log)
            ground_truth = _ground_truth(config, compiled.session, inputs, staging, log) if config.eval_data else None
            results = HtpCheckResults(
                target=config.target.describe(), emulation_note=EMULATION_NOTE, warnings=warnings,
                qnn=backend.describe(), model=model, coverage=coverage, numerics=numerics, context_binary=context,
                emulation_time={**({"int8": int8_time} if int8_time else {}), **({"fp16": fp16_time} if fp16_time else {})},
                fp16_baseline=fp16, ground_truth=ground_truth)
            _write_outputs(config, results, inputs, staging, log)
    out = config.destination
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(out)} (report: {display_path(out / 'report.md')}); "
             "device latency: only an AI Hub profile job measures it")
    result = HtpCheckOutput(out, out / CONTEXT_ONNX if context else None, results, read_manifest(out), config)
    enforce_gates(_gates(config, results), subject="HTP check", hint=GATE_HINT)
    return result


@contextmanager
def _inputs_stay_readable() -> Iterator[None]:
    """The emulation runs for minutes; an input rewritten meanwhile is a clear error, not a traceback."""
    try:
        yield
    except OSError as err:
        raise InputChangedError(f"a file could not be read or written during the check: {err}",
                                hint="an input file vanished or became unreadable during the run (did another stage "
                                     "rewrite the ptq folder?); run the check again") from err


def _load_qnn(config: HtpCheckConfig, log: StageLog) -> QnnBackend:
    with log.step("load-qnn") as step:
        backend = import_qnn()
        step.detail = (f"onnxruntime-qnn {backend.version} (QNN {backend.qnn_sdk_version}), HTP v{config.htp_arch}, "
                       f"soc {config.soc_model} ({config.target.device})")
    return backend


def _inspect(qdq: Path, log: StageLog) -> dict:
    with log.step("inspect") as step:
        model = inspect_qdq_model(qdq)
        ops = model["op_types"]
        step.detail = (f"{model['nodes']} nodes, {ops.get('QuantizeLinear', 0)} Q / {ops.get('DequantizeLinear', 0)} "
                       f"DQ, activations {', '.join(model['activation_quantize_dtypes']) or '?'}")
    return model


# ---------------------------------------------------------------------------------------------
# Inputs


def _check_ptq_input(config: HtpCheckConfig) -> Manifest | None:
    """--ptq as the stage reads it: a ptq folder (its manifest, read once, and its QDQ model, hashed)
    or a bare QDQ .onnx with --images; the ptq manifest, or None for a bare file."""
    ptq = config.ptq
    if ptq.is_dir():
        if not (ptq / MANIFEST_NAME).is_file():
            raise ConfigError(f"--ptq {ptq} is not a ptq stage output (no ptq {MANIFEST_NAME})",
                              hint=f"pass the folder {command_line('ptq')} wrote, or a QDQ .onnx file")
        manifest = Manifest.read(ptq, stage=INT8_STAGES, flag="--ptq", verify=False)
        if not (ptq / QDQ_ONNX).is_file():
            raise ConfigError(f"{ptq} has no {QDQ_ONNX}", hint=f"rerun {command_line('ptq')}")
        manifest.verify_outputs()
        return manifest
    if ptq.is_file():
        if ptq.suffix != ".onnx":
            raise ConfigError(f"--ptq {ptq} is neither a ptq folder nor an .onnx file",
                              hint=f"pass the folder {command_line('ptq')} wrote, or its {QDQ_ONNX}")
        if config.images is None:
            raise ConfigError(f"{ptq.name} is a bare ONNX file: there are no held-out images to check it on",
                              hint="pass --images FOLDER (photos the model was not calibrated on), or pass "
                                   "the ptq folder instead")
        return None
    raise ConfigError(f"--ptq not found: {ptq}", hint=f"run {command_line('ptq')} first")


def _load_inputs(config: HtpCheckConfig, log: StageLog) -> _Inputs:
    """The images, the float model and the ptq stage's saved outputs, hashed now, before minutes of
    emulation: the manifest pins what was checked even if an upstream stage rewrites its folder meanwhile."""
    from lpcv_depth.images import load_contract_image

    with log.step("inputs") as step:
        ptq = _check_ptq_input(config)
        ptq_results = ptq.results_as(int8_results_type(ptq.stage)) if ptq is not None else None
        fp32_onnx = Path(config.fp32) if config.fp32 else _ptq_fp32_model(ptq)
        root, files, source = _image_files(config, ptq)
        count = min(len(files), config.max_frames or len(files))
        files = files[:count]
        reference = _saved_outputs(ptq, count) if config.images is None else {}
        images = np.stack([load_contract_image(path) for path in files])
        description = {"root": os.fspath(root), "files": [Path(f).relative_to(root).as_posix() for f in files],
                       "source": source}
        record = {"qdq_onnx": {"path": os.fspath(config.qdq_onnx), "sha256": sha256_file(config.qdq_onnx)},
                  "images": description}
        if fp32_onnx is not None:
            record["fp32_onnx"] = {"path": os.fspath(fp32_onnx), "sha256": sha256_file(fp32_onnx)}
            if config.fp32 is None:
                _check_fp32_is_the_quantized_one(config, ptq, fp32_onnx, record["fp32_onnx"]["sha256"])
        if ptq_results is not None:
            record["ptq_manifest"] = {"path": os.fspath(config.ptq_dir / MANIFEST_NAME), "model": ptq_results.model,
                                      "preset": ptq_results.preset}
        step.detail = f"{len(images)} image(s) ({source})"
    return _Inputs(images, fp32_onnx, reference, record)


def _resolve(path_text: str) -> Path:
    """A path a manifest recorded: as written (relative to the current folder), else in the workspace."""
    path = Path(path_text)
    return next((candidate for candidate in (path, in_workspace(path)) if candidate.exists()), path)


def _ptq_fp32_model(ptq: Manifest | None) -> Path | None:
    if ptq is None:
        return None
    fp32_onnx = _resolve(ptq.inputs["fp32_onnx"]["path"])
    if not fp32_onnx.is_file():
        raise ConfigError(f"the ptq stage's fp32 model is gone: {fp32_onnx}",
                          hint=f"pass it with --fp32, or rerun {command_line('export')}")
    return fp32_onnx


def _check_fp32_is_the_quantized_one(config: HtpCheckConfig, ptq: Manifest, fp32_onnx: Path, sha256: str) -> None:
    """The fp32 model found through the ptq manifest must be the one ptq quantized: another model's
    fp16 baseline and fp32 references would read as if the HTP broke this one."""
    quantized = recorded_sha256(ptq, "fp32_onnx")
    if quantized is not None and quantized != sha256:
        raise ConfigError(
            f"the fp32 model the ptq manifest of {config.ptq} names, {fp32_onnx}, is not the model ptq quantized "
            f"(sha256 {sha256[:12]}, ptq recorded {quantized[:12]}): its export folder was replaced or rebuilt",
            hint=f"pass the fp32 model ptq quantized with --fp32, or rerun "
                 f"{command_line('ptq', '--fp32', fp32_onnx.parent)} on this export")


def _image_files(config: HtpCheckConfig, ptq: Manifest | None) -> tuple[Path, list[Path], str]:
    """(root, files, source): --images, else the ptq stage's held-out split."""
    from lpcv_depth.images import list_images

    if config.images is not None:
        files = list_images(config.images)
        if not files:
            raise ConfigError(f"no images in {config.images}", hint="pass a folder of JPG/PNG photos")
        return Path(config.images), files, "--images"
    split = ptq.inputs["calibration"]
    root = _resolve(split["root"])
    files = [root / name for name in split["holdout_files"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"the ptq stage's held-out images are gone from {root}: {', '.join(missing[:3])}",
                          hint="pass --images FOLDER with photos the model was not calibrated on")
    return root, files, "ptq held-out split"


def _saved_outputs(ptq: Manifest, count: int) -> dict:
    """fp32 / AIMET-sim / QDQ outputs the ptq stage saved on its first held-out images (hash-checked);
    none where it checked fewer than `count` (ptq --verify-images), so all are computed here alike."""
    saved = ptq.folder / HOLDOUT_OUTPUTS
    if not saved.is_file():
        return {}
    with np.load(saved) as arrays:
        if any(len(arrays[name]) < count for name in arrays.files):
            return {}
        return {name: arrays[name][:count] for name in arrays.files}


# ---------------------------------------------------------------------------------------------
# Coverage and the context binary


def _compile(config: HtpCheckConfig, backend: QnnBackend, model: dict, context_onnx: Path, log: StageLog,
             warnings: list[str]) -> tuple[Compiled, Coverage]:
    emulated = _emulated_model(config.qdq_onnx, backend, model, context_onnx.parent, log, warnings)
    with log.step("compile") as step:
        compiled = compile_for_htp(emulated, backend, config.target, context_onnx, model["op_types"])
        coverage = Coverage(**compiled.partition, refused=compiled.refused, no_fallback_error=compiled.error,
                            build_s=compiled.build_s)
        step.detail = (f"all {model['nodes']} nodes on the HTP" if coverage.full_htp else
                       f"HTP {coverage.htp_nodes} nodes in {coverage.htp_partitions} partition(s), "
                       f"CPU {coverage.cpu_nodes}: " + op_summary(coverage.cpu_op_types))
        step.detail += f"; built in {compiled.build_s:.1f}s"
    if not coverage.full_htp:
        _warn(log, warnings, f"NOT FULLY ON THE HTP: with CPU fallback disabled the build fails; QNN refuses "
                             f"{_refused_summary(coverage)}. {coverage.cpu_nodes} node(s) run on the CPU "
                             f"({op_summary(coverage.cpu_op_types)}) between {coverage.htp_partitions} HTP "
                             f"partition(s). {CPU_ISLAND_COST}")
        for row in coverage.refused[:10]:
            log.warn(f"  refused {row['op_type']} {row['name']!r}: {row['reason']}"
                     + (f"; cause: {row['cause']}" if "cause" in row else ""))
    return compiled, coverage


def _emulated_model(qdq: Path, backend: QnnBackend, model: dict, scratch: Path, log: StageLog,
                    warnings: list[str]) -> Path:
    """The QDQ model the emulator compiles: as written, or with 4-bit weights held in INT8 storage,
    which the emulator computes right (backends/qdq_int4.py); `model` records which."""
    count = int4_weight_count(qdq)
    model["int4_weights"] = count
    if not count:
        return qdq
    with log.step("int4-storage") as step:
        emulated = scratch / f"{qdq.stem}_int8_storage.onnx"
        widened = with_int8_storage(qdq, emulated)
        model["int4_weights_compiled_as"] = "int8 storage, 4-bit values"
        step.detail = f"{count} 4-bit weights, {widened} tensors stored as INT8 for the emulator"
    _warn(log, warnings, INT4_EMULATION_NOTE.format(count=count, version=backend.version))
    return emulated


def _warn(log: StageLog, warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warn(message)


def _refused_summary(coverage: Coverage) -> str:
    """The ops QNN itself refuses; the Quantize/Dequantize nodes around them only follow them to the CPU."""
    counts = (collections.Counter(row["op_type"] for row in coverage.refused)
              or collections.Counter(coverage.cpu_op_types))
    compute = {op: n for op, n in counts.items() if op not in QDQ_OPS}
    summary = op_summary(compute or dict(counts))
    if compute and len(compute) < len(counts):
        summary += " (with the QuantizeLinear/DequantizeLinear around them)"
    return summary


def _keep_context(config: HtpCheckConfig, backend: QnnBackend, compiled: Compiled, staging: StagingDir,
                  log: StageLog) -> ContextBinary:
    """The EPContext model and its context binary, moved into the output and reloaded once."""
    with log.step("context-binary") as step:
        partition = compiled.partition
        kept = keep_context(staging.scratch / CONTEXT_ONNX, staging.path, backend, config.target,
                            full_htp=partition["full_htp"])
        context = ContextBinary(
            onnx=kept.onnx.name, path=kept.binary.name, bytes=kept.binary.stat().st_size,
            onnx_bytes=kept.onnx.stat().st_size, sha256=sha256_file(kept.binary), build_s=compiled.build_s,
            reload_s=kept.reload_s, htp_arch=config.htp_arch, soc_model=config.soc_model,
            qnn_sdk_version=backend.qnn_sdk_version, full_htp=partition["full_htp"],
            htp_partitions=partition["htp_partitions"], io=CONTEXT_IO, build_note=CONTEXT_BUILD_NOTE,
            ai_hub=HUB_CONTEXT_NOTE)
        step.artifact = kept.onnx
        step.detail = (f"{context.bytes / 1e6:.1f} MB QNN context for HTP v{config.htp_arch}, built in "
                       f"{compiled.build_s:.1f}s, reloads in {context.reload_s:.2f}s")
    return context


# ---------------------------------------------------------------------------------------------
# Numerics


def _run_int8(session: HtpSession, images: np.ndarray, log: StageLog) -> tuple[np.ndarray, EmulationTime]:
    from lpcv_depth.contract import TRACK3
    from lpcv_depth.verify import check_output_range

    with log.step("htp-int8") as step:
        outputs = session.run(images)
        check_output_range(outputs, TRACK3, tolerance=1e-2)
        timing = EmulationTime(**session.timing())
        step.detail = (f"{len(outputs)} image(s), {timing.mean_s_per_frame:.1f} s/frame host emulation "
                       "(not device latency)")
    return outputs, timing


def _cpu_references(config: HtpCheckConfig, inputs: _Inputs, log: StageLog) -> dict[str, np.ndarray]:
    """fp32 / AIMET-sim / int8-CPU outputs on the images: the ptq stage's saved ones, else computed
    here with ONNX Runtime on the CPU (AIMET's simulation is only available from a ptq folder)."""
    from lpcv_depth.verify import OrtRunner

    with log.step("cpu-references") as step:
        saved = inputs.reference
        outputs = {"fp32": saved.get("fp32"), "aimet_sim": saved.get("aimet_sim"), "int8_cpu": saved.get("int8_qdq")}
        sources = {name: "ptq holdout_outputs.npz" for name, value in outputs.items() if value is not None}
        if outputs["int8_cpu"] is None:
            outputs["int8_cpu"], sources["int8_cpu"] = OrtRunner(config.qdq_onnx).run(inputs.images), "ONNX Runtime CPU"
        if outputs["fp32"] is None and inputs.fp32_onnx is not None:
            outputs["fp32"], sources["fp32"] = OrtRunner(inputs.fp32_onnx).run(inputs.images), "ONNX Runtime CPU"
        step.detail = ", ".join(f"{name}: {source}" for name, source in sources.items())
    return {name: value for name, value in outputs.items() if value is not None}


def _compare(test: np.ndarray, reference: np.ndarray, max_points: int | None) -> OutputComparison:
    """SQNR, max abs diff and the Track 3 F-score of `test` with `reference` as pseudo ground truth."""
    return output_fidelity(reference, test, float64_diff=True, max_points=max_points)


def _numerics(config: HtpCheckConfig, htp_int8: np.ndarray, references: dict[str, np.ndarray], log: StageLog,
              warnings: list[str]) -> dict[str, OutputComparison]:
    """HTP int8 against every reference, plus CPU int8 vs fp32 so the HTP's own cost is visible."""
    with log.step("numerics") as step:
        numerics = {f"htp_vs_{name}": _compare(htp_int8, outputs, config.fscore_max_points)
                    for name, outputs in references.items()}
        if "fp32" in references:
            numerics["int8_cpu_vs_fp32"] = _compare(references["int8_cpu"], references["fp32"], config.fscore_max_points)
        step.detail = "; ".join(f"vs {name.removeprefix('htp_vs_')} SQNR {row.sqnr_db:.1f} dB, "
                                f"max abs {row.max_abs_diff:.3f}"
                                for name, row in numerics.items() if name.startswith("htp_vs_"))
    parity, limits = numerics["htp_vs_int8_cpu"], config.cpu_parity
    if parity.sqnr_db < limits.min_sqnr_db or parity.max_abs_diff > limits.max_abs_diff:
        _warn(log, warnings, f"HTP int8 differs from ONNX Runtime's CPU QDQ by more than the HTP's own rounding: "
                             f"SQNR {parity.sqnr_db:.1f} dB (expected >= {limits.min_sqnr_db:g}), max abs "
                             f"{parity.max_abs_diff:.3f} (expected <= {limits.max_abs_diff:g}); "
                             + _parity_suspect(numerics))
    return numerics


def _parity_suspect(numerics: dict[str, OutputComparison]) -> str:
    """Which side of a parity miss to suspect: the NPU, unless the CPU is the one further from fp32
    (ONNX Runtime's u8s8 kernels saturate on x86 CPUs without VNNI)."""
    htp, cpu = numerics.get("htp_vs_fp32"), numerics.get("int8_cpu_vs_fp32")
    if htp is not None and cpu is not None and htp.sqnr_db > cpu.sqnr_db + CPU_SUSPECT_MARGIN_DB:
        return (f"the CPU reference is the one further from fp32 ({cpu.sqnr_db:.1f} dB against the HTP's "
                f"{htp.sqnr_db:.1f} dB): ONNX Runtime's own int8 kernels are suspect on this host (x86 without VNNI "
                "saturates u8s8 sums; see docs/htp-check.md)")
    return "an op computes differently on the NPU"


def _fp16_baseline(config: HtpCheckConfig, backend: QnnBackend, inputs: _Inputs, fp32: np.ndarray | None,
                   log: StageLog) -> tuple[Fp16Baseline | None, EmulationTime | None]:
    """The float model on the HTP with fp16 precision: what the NPU would run without quantization."""
    if not config.fp16_baseline:
        return None, None
    if inputs.fp32_onnx is None:
        log.info("fp16-baseline skipped: no fp32 model (pass --fp32)")
        return None, None
    with log.step("fp16-baseline") as step:
        compiled = compile_fp16(inputs.fp32_onnx, backend, config.target,
                                hint="run with --no-fp16-baseline to check the int8 model alone")
        outputs = compiled.session.run(inputs.images)
        vs_fp32 = _compare(outputs, fp32, config.fscore_max_points) if fp32 is not None else None
        baseline = Fp16Baseline(full_htp=compiled.partition["full_htp"], build_s=compiled.build_s, vs_fp32=vs_fp32)
        timing = EmulationTime(**compiled.session.timing())
        step.detail = (("all on the HTP" if baseline.full_htp else "NOT fully on the HTP")
                       + (f", vs fp32 SQNR {vs_fp32.sqnr_db:.1f} dB" if vs_fp32 else "")
                       + f", {timing.mean_s_per_frame:.1f} s/frame emulation")
    return baseline, timing


# ---------------------------------------------------------------------------------------------
# Ground truth


def _spread(count: int, limit: int | None) -> list[int]:
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def _ground_truth(config: HtpCheckConfig, session: HtpSession, inputs: _Inputs, staging: StagingDir,
                  log: StageLog) -> HtpGroundTruth:
    """fp32 (CPU), int8 (CPU QDQ) and int8 (HTP) on the RGB-D frames, scored by the evaluate stage
    from saved predictions, so the metric and the frame skipping are exactly the evaluate stage's."""
    from lpcv_depth.rgbd import load_rgbd_dataset
    from lpcv_depth.verify import OrtRunner

    with log.step("ground-truth") as step:
        frames = load_rgbd_dataset(config.eval_data)
        chosen = [frames[i] for i in _spread(len(frames), config.max_frames)]
        runners = {"int8_htp": session.run, "int8_cpu": OrtRunner(config.qdq_onnx).run}
        if inputs.fp32_onnx is not None:
            runners["fp32"] = OrtRunner(inputs.fp32_onnx).run
        predictions = staging.scratch / "predictions"
        _save_predictions(config, chosen, runners, predictions)
        scores = {label: evaluate_within(STAGE, label, config.eval_data, staging.path / "eval" / label, quiet=True,
                                         predictions=predictions / label, median=config.median).results
                  for label in runners}
        ground_truth = _summarise_ground_truth(scores, len(chosen), len(frames), session.frame_seconds[-len(chosen):])
        step.detail = (f"{ground_truth.frames} frames: F-score " + ", ".join(
            f"{label} {row['fscore@0.1']:.2f}" for label, row in ground_truth.overall.items())
            + (f"; HTP drop vs fp32 {ground_truth.fscore_drop:.2f}" if ground_truth.fscore_drop is not None else ""))
    return ground_truth


def _save_predictions(config: HtpCheckConfig, frames: list, runners: dict[str, Callable], folder: Path) -> None:
    """<folder>/<label>/<set>/<frame>.npy for every readable frame and every model."""
    from lpcv_depth.rgbd import FrameError

    unreadable = []
    for frame in frames:
        try:
            image = frame.load_image()[None]
        except FrameError as err:
            unreadable.append(str(err))
            continue
        for label, run in runners.items():
            path = folder / label / frame.set_name / f"{frame.frame_id}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, run(image))
    if not folder.is_dir():
        raise ConfigError(f"no readable RGB-D frame in --eval-data {config.eval_data}: {'; '.join(unreadable[:3])}")


def _summarise_ground_truth(scores: dict[str, EvaluateResults], selected: int, total: int,
                            seconds: list[float]) -> HtpGroundTruth:
    overall = {label: result.overall.metrics for label, result in scores.items()}
    sets: dict[str, dict] = {}
    for label, result in scores.items():
        for set_name, group in result.sets.items():
            if group.scored:
                sets.setdefault(set_name, {"frames": group.scored})[label] = group.metrics["fscore@0.1"]
    fscore = {label: metrics["fscore@0.1"] for label, metrics in overall.items()}
    return HtpGroundTruth(frames_selected=selected, frames_total=total, frames=scores["int8_htp"].overall.scored,
                          overall=overall, sets=sets, htp_minus_cpu_int8=fscore["int8_htp"] - fscore["int8_cpu"],
                          emulation_s_per_frame=float(np.mean(seconds)),
                          fscore_drop=fscore["fp32"] - fscore["int8_htp"] if "fp32" in fscore else None)


# ---------------------------------------------------------------------------------------------
# Outputs and gates


def _write_outputs(config: HtpCheckConfig, results: HtpCheckResults, inputs: _Inputs, staging: StagingDir,
                   log: StageLog) -> None:
    from lpcv_depth.stages.htp_report import write_report

    with log.step("report") as step:
        report_files = write_report(staging.path, config, results)
        step.artifact = staging.path / "report.md"
    outputs = [*sorted(p for p in staging.path.rglob("*") if p.is_file() and p not in report_files), *report_files]
    write_manifest(staging.path, stage=STAGE, config=config.as_dict(), inputs=inputs.record, outputs=outputs,
                   timings=log.timings, results=results)


def _fscore_drop(results: HtpCheckResults) -> tuple[float | None, str]:
    """The HTP's F-score drop vs fp32: on ground truth when scored, else with fp32 as the reference."""
    if results.ground_truth is not None and results.ground_truth.fscore_drop is not None:
        return results.ground_truth.fscore_drop, "HTP F-score drop vs fp32 on ground truth"
    fp32_row = results.numerics.get("htp_vs_fp32")
    if fp32_row is not None:
        return 100.0 - fp32_row.fscore, "HTP F-score drop with fp32 as reference"
    return None, "HTP F-score drop"


def _gates(config: HtpCheckConfig, results: HtpCheckResults) -> list[Gate]:
    coverage = results.coverage
    fp32_row = results.numerics.get("htp_vs_fp32")
    drop, drop_what = _fscore_drop(results)
    return [Gate("--require-full-htp", f"{coverage.cpu_nodes} node(s) run on the CPU "
                                       f"({op_summary(coverage.cpu_op_types)})",
                 coverage.full_htp, config.require_full_htp, kind="true"),
            Gate("--min-sqnr", "HTP int8 vs fp32 SQNR", fp32_row.sqnr_db if fp32_row else None, config.min_sqnr,
                 unit=" dB"),
            Gate("--max-fscore-drop", drop_what, drop, config.max_fscore_drop, kind="at_most")]


def _next_hint(result: HtpCheckOutput) -> str:
    return command_line("hub", display_path(result.config.ptq))


DEFINITION = StageDefinition(name=STAGE, config=HtpCheckConfig, run=run_htp_check, description=__doc__,
                             next_hint=_next_hint)
