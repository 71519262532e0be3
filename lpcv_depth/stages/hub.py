"""Qualcomm AI Hub: compile for the Galaxy S24, profile it, run it on the phone, share it; one durable record.

    python export/aihub.py build/fastdepth/export build/fastdepth/ptq-w8a8 --eval-data ../shared/data/rgbd
    python export/aihub.py build/fastdepth/ptq-w8a8 --quantize-io --share lowpowervision@gmail.com
    python export/aihub.py build/fastdepth/htp/model.bin --reference-onnx build/fastdepth/ptq-w8a8/model_qdq.onnx

Takes an export folder (fp32 model.onnx), a ptq folder (uploads <model>.aimet/, the layout AI Hub
takes for AIMET int8 models), an .onnx file, an .aimet folder, or a precompiled QNN context binary
(.bin, or the htp-check folder that built one: profiled and run as-is, no compile job). Per artifact, writes OUT (default
build/<model>/hub-<export|ptq-PRESET>-<runtime>):
  hub_jobs.json        every job id the moment it is submitted (what a rerun resumes from)
  compiled/model.*     the compiled model as downloaded
  profile.json         the raw profile; the manifest has its summary (ms, FPS, memory, NPU/GPU/CPU layers)
  device_outputs/      on-device outputs, <set>/<frame id>.npy, (1,1,480,640), scored by evaluation/score.py
  host_outputs/        ONNX Runtime outputs of the same frames, for on-device vs host fidelity
  eval/device, eval/host   with --eval-data: the evaluate stage against ground truth
  manifest.json        written last
Rerunning the same command resumes the recorded jobs (waits, downloads) instead of resubmitting;
--force resubmits. Exit codes: 0 ok, 2 error (message and fix on stderr), 3 a job FAILED on the
hub, 4 timed out waiting (the job keeps running; rerun to resume), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, LpcvError, OutputDirError
from lpcv_depth.backends.ai_hub import (S24_DEVICE, HubClient, HubError, HubJob, HubJobFailedError, HubTimeoutError,
                                   TensorInfo)
from lpcv_depth.stage import StageLog, exit_status
from lpcv_depth.manifest import MANIFEST_NAME, config_as_dict, read_manifest, sha256_file, sha256_of_files, write_manifest

STAGE = "hub"
RUNTIMES = ("qnn_context_binary", "tflite", "qnn_dlc", "onnx")
DEFAULT_PROFILE_OPTIONS = "--max_profiler_iterations 20"  # what the organizers' run_profile.py uses
STATE_NAME = "hub_jobs.json"
TARGET_FPS = 30.0
COMPUTE_UNITS = ("NPU", "GPU", "CPU")
EXIT_JOB_FAILED = 3
EXIT_TIMEOUT = 4


@dataclass(frozen=True)
class HubArtifact:
    """What goes to the hub, and what it is measured against on the host."""

    kind: str  # export | ptq | onnx | aimet | qnn_context_binary
    upload: Path
    precision: str  # fp32 | int8 | unknown
    label: str  # names the output folder: export, ptq-w8a8, model_qdq, ...
    model_name: str | None
    source_dir: Path | None  # the export/ptq stage folder it came from, if any
    host_reference: Path | None  # the ONNX whose ONNX Runtime outputs the device outputs are compared with

    @property
    def compilable(self) -> bool:
        return self.kind != "qnn_context_binary"

    def as_dict(self) -> dict:
        return {key: os.fspath(value) if isinstance(value, Path) else value for key, value in self.__dict__.items()}


def _stage_of(folder: Path) -> str | None:
    return read_manifest(folder).get("stage") if (folder / MANIFEST_NAME).is_file() else None


def _single_aimet_dir(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.aimet") if p.is_dir())
    if len(found) != 1:
        raise ConfigError(f"ptq folder {folder} holds {len(found)} <model>.aimet folders, expected one",
                          hint="rerun python quantize/ptq.py; its output has exactly one")
    return found[0]


def _check_aimet_dir(folder: Path) -> None:
    """AI Hub takes an .aimet folder with exactly one .onnx and one .encodings (and at most one .data)."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    counts = Counter(Path(name).suffix for name in names)
    if counts[".onnx"] != 1 or counts[".encodings"] != 1 or counts[".data"] > 1 or \
            sum(counts.values()) != counts[".onnx"] + counts[".encodings"] + counts[".data"]:
        raise ConfigError(f"{folder} is not an AIMET model folder AI Hub accepts: {sorted(names)}",
                          hint="it must hold exactly one .onnx and one .encodings (and optionally one .data)")


def _htp_check_artifact(folder: Path) -> HubArtifact:
    """The QNN context binary the local HTP check built, measured against the QDQ model it came from."""
    manifest = read_manifest(folder)
    binary = manifest["results"].get("context_binary")
    if not binary or not (folder / binary["path"]).is_file():
        raise ConfigError(f"htp-check folder {folder} holds no QNN context binary",
                          hint="rerun python quantize/htp_check.py without --no-context-binary")
    ptq_dir = Path(manifest["config"]["ptq"])  # a ptq folder, or the QDQ .onnx itself
    qdq = ptq_dir if ptq_dir.suffix == ".onnx" else ptq_dir / "model_qdq.onnx"
    model_name = next((p.stem for p in ptq_dir.glob("*.aimet")), None) if ptq_dir.is_dir() else None
    return HubArtifact("qnn_context_binary", folder / binary["path"], "int8", "htp-check", model_name, folder,
                       qdq if qdq.is_file() else None)


def resolve_artifact(path: Path, reference_onnx: Path | None = None) -> HubArtifact:
    """Turn the user's argument into what to upload and what to compare with; ConfigError if unusable."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"artifact not found: {path}",
                          hint="pass an export folder, a ptq folder, an .onnx, an .aimet folder or a .bin")
    stage = _stage_of(path) if path.is_dir() else None
    if path.is_dir() and stage == "export":
        manifest = read_manifest(path)
        onnx = path / "model.onnx"
        if not onnx.is_file():
            raise ConfigError(f"export folder {path} has no model.onnx", hint="rerun python export/to_onnx.py")
        artifact = HubArtifact("export", onnx, "fp32", "export", manifest["config"].get("model"), path, onnx)
    elif path.is_dir() and stage == "ptq":
        manifest = read_manifest(path)
        aimet = _single_aimet_dir(path)
        _check_aimet_dir(aimet)
        qdq = path / "model_qdq.onnx"
        artifact = HubArtifact("ptq", aimet, "int8", f"ptq-{manifest['config'].get('preset', 'int8')}",
                               aimet.stem, path, qdq if qdq.is_file() else None)
    elif path.is_dir() and stage == "htp-check":
        artifact = _htp_check_artifact(path)
    elif path.is_dir() and path.suffix == ".aimet":
        _check_aimet_dir(path)
        qdq = path.parent / "model_qdq.onnx"
        parent_is_ptq = _stage_of(path.parent) == "ptq"
        label = f"ptq-{read_manifest(path.parent)['config'].get('preset', 'int8')}" if parent_is_ptq else path.stem
        artifact = HubArtifact("aimet", path, "int8", label, path.stem, path.parent if parent_is_ptq else None,
                               qdq if qdq.is_file() else None)
    elif path.is_dir():
        what = f"a {stage!r} stage output" if stage else "not a stage output (no manifest.json)"
        raise ConfigError(f"{path} is {what}: neither an export nor a ptq folder",
                          hint="pass build/<model>/export, build/<model>/ptq-<preset>, an .onnx, an .aimet "
                               "folder or a .bin")
    elif path.suffix == ".onnx":
        stage = _stage_of(path.parent)
        quantized = path.name == "model_qdq.onnx" or stage == "ptq"
        label = "export" if stage == "export" and path.name == "model.onnx" else path.stem
        artifact = HubArtifact("onnx", path, "int8" if quantized else "fp32" if stage == "export" else "unknown",
                               label, None, path.parent if stage in ("export", "ptq") else None, path)
    elif path.suffix == ".bin":
        artifact = HubArtifact("qnn_context_binary", path, "unknown", path.stem, None, None, None)
    else:
        raise ConfigError(f"{path} is not a model AI Hub takes here (suffix {path.suffix or 'none'})",
                          hint="pass an export or ptq folder, an .onnx, an .aimet folder or a QNN context binary .bin")
    if reference_onnx is not None:
        if not Path(reference_onnx).is_file():
            raise ConfigError(f"--reference-onnx not found: {reference_onnx}")
        artifact = HubArtifact(**{**artifact.__dict__, "host_reference": Path(reference_onnx)})
    return artifact


@dataclass(frozen=True)
class HubConfig:
    artifact: Path
    runtime: str = "qnn_context_binary"
    # Passed through to the compile job after --target_runtime, e.g. "--quantize_io".
    compile_options: str = ""
    profile_options: str = DEFAULT_PROFILE_OPTIONS
    inference_options: str = ""
    device: str = S24_DEVICE
    compile: bool = True
    profile: bool = True
    inference: bool = True
    eval_data: Path | None = None
    images: Path | None = None
    max_frames: int | None = None
    # Reuse what is already on the hub instead of uploading it again.
    model_id: str | None = None
    dataset_id: str | None = None
    reference_onnx: Path | None = None
    share: tuple[str, ...] = ()
    timeout_s: float = 3600.0
    poll_s: float = 10.0
    force: bool = False
    out_dir: Path | None = None
    threads: int | None = None
    _artifact: HubArtifact | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if "--target_runtime" in self.compile_options:
            raise ConfigError("give the target runtime with --runtime, not inside the compile options",
                              hint=f"--runtime {{{','.join(RUNTIMES)}}}")
        for email in self.share:
            if "@" not in email or any(c.isspace() for c in email):
                raise ConfigError(f"--share needs an email address, got {email!r}",
                                  hint="e.g. --share lowpowervision@gmail.com")
        if self.eval_data is not None and self.images is not None:
            raise ConfigError("give --eval-data (RGB-D, scored against ground truth) or --images (photos), not both")
        for name in ("eval_data", "images"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} folder not found: {folder}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if not self.timeout_s > 0 or not self.poll_s > 0:
            raise ConfigError(f"timeout and poll interval must be > 0, got {self.timeout_s} and {self.poll_s}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        artifact = resolve_artifact(Path(self.artifact), self.reference_onnx)
        if not self.compile and artifact.kind in ("ptq", "aimet"):
            raise ConfigError("AI Hub cannot run an AIMET model without compiling it", hint="drop --no-compile")
        object.__setattr__(self, "_artifact", artifact)

    @property
    def artifact_info(self) -> HubArtifact:
        assert self._artifact is not None
        return self._artifact

    @property
    def compiles(self) -> bool:
        return self.compile and self.artifact_info.compilable

    @property
    def runtime_label(self) -> str:
        if self.compiles:
            return self.runtime
        return "qnn_context_binary" if self.artifact_info.kind == "qnn_context_binary" else "uncompiled"

    @property
    def full_compile_options(self) -> str:
        """The exact options string the compile job gets (and the manifest records)."""
        return " ".join(f"--target_runtime {self.runtime} {self.compile_options}".split())

    @property
    def data_folder(self) -> Path | None:
        return Path(self.eval_data) if self.eval_data is not None else Path(self.images) if self.images else None

    @property
    def destination(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        artifact = self.artifact_info
        base = artifact.source_dir.parent if artifact.source_dir is not None else Path(self.artifact).parent
        return base / f"hub-{artifact.label}-{self.runtime_label}"

    def as_dict(self) -> dict:
        data = config_as_dict(self)
        data.pop("_artifact", None)
        data["full_compile_options"] = self.full_compile_options if self.compiles else None
        return data


@dataclass(frozen=True)
class HubResult:
    out_dir: Path
    manifest_path: Path
    manifest: dict

    @property
    def compile_job_id(self) -> str | None:
        return self.manifest["results"].get("compile", {}).get("job_id")


class HubState:
    """hub_jobs.json: uploads and job ids, rewritten atomically the moment anything is submitted."""

    def __init__(self, path: Path):
        self.path = path
        empty = {"version": 1, "models": {}, "datasets": {}, "jobs": {}, "replaced": []}
        self.data = {**empty, **json.loads(path.read_text())} if path.is_file() else empty

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def job(self, kind: str) -> dict | None:
        return self.data["jobs"].get(kind)

    def record_job(self, kind: str, key: dict, job: HubJob) -> None:
        previous = self.data["jobs"].get(kind)
        if previous is not None:
            self.data["replaced"].append({"kind": kind, **previous})
        self.data["jobs"][kind] = {"job_id": job.job_id, "url": job.url, "key": key, "submitted": _now(),
                                   "status": "SUBMITTED"}
        self.save()

    def record_status(self, kind: str, code: str, message: str | None = None) -> None:
        self.data["jobs"][kind].update(status=code, failure_reason=message)
        self.save()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare_output(folder: Path) -> None:
    """Own the folder, and make sure it does not look finished until this run writes its manifest."""
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output path {folder} exists and is not a folder", hint="pass a different --out")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / STATE_NAME).exists() \
            and not (folder / MANIFEST_NAME).exists():
        raise OutputDirError(f"output folder {folder} is not empty and is not an earlier hub stage output",
                             hint="pass an empty or new folder with --out; lpcv-depth only reuses its own outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create output folder {folder}: {err.strerror or err}",
                             hint="choose a writable location with --out") from err
    (folder / MANIFEST_NAME).unlink(missing_ok=True)


@dataclass
class _Frames:
    """The images sent to the device: ids, where each output goes, the pixels, and their hash."""

    names: list[tuple[str, str]]  # (set, frame id)
    images: np.ndarray  # (N, 3, 480, 640) float32 in [0, 255]
    sha256: str
    frames: list | None  # rgbd Frames (for ground truth), None for plain photos
    description: dict


def _load_frames(config: HubConfig) -> _Frames:
    from lpcv_depth.images import list_images, load_contract_batch

    if config.eval_data is not None:
        from lpcv_depth.rgbd import load_rgbd_dataset

        frames = load_rgbd_dataset(config.eval_data)[:config.max_frames]
        names = [(frame.set_name, frame.frame_id) for frame in frames]
        images = np.stack([frame.load_image() for frame in frames])
        files = [frame.rgb_path for frame in frames]
        root = Path(config.eval_data)
    else:
        root = Path(config.images)
        files = list_images(root)[:config.max_frames]
        if not files:
            raise ConfigError(f"no JPG/PNG images in --images {root}")
        names = [("images", path.relative_to(root).with_suffix("").as_posix().replace("/", "__")) for path in files]
        images = load_contract_batch(files)
        frames = None
    description = {"path": os.fspath(root.resolve()), "kind": "rgbd" if frames is not None else "images",
                   "frames": len(names), "max_frames": config.max_frames}
    return _Frames(names, images, sha256_of_files(files, root), frames, description)


def _to_device(images: np.ndarray, tensor: TensorInfo | None) -> np.ndarray:
    """Contract images as the compiled model's input dtype (quantized when compiled with --quantize_io)."""
    if tensor is None or tensor.dtype.startswith("float"):
        return images.astype(np.float32)
    if tensor.scale is None:
        raise HubError(f"the compiled model's input {tensor.name!r} is {tensor.dtype} without a scale",
                       hint="compile without --quantize_io, or report the model")
    limits = np.iinfo(np.dtype(tensor.dtype))
    quantized = np.round(images / tensor.scale + (tensor.zero_point or 0.0))
    return np.clip(quantized, limits.min, limits.max).astype(tensor.dtype)


def _from_device(array: np.ndarray, tensor: TensorInfo | None) -> np.ndarray:
    array = np.asarray(array)
    if tensor is not None and not np.issubdtype(array.dtype, np.floating):
        if tensor.scale is None:
            raise HubError(f"the device output {tensor.name!r} is {array.dtype} without a scale to dequantize it")
        array = (array.astype(np.float32) - (tensor.zero_point or 0.0)) * tensor.scale
    shape = TRACK3.output.concrete_shape(1)
    if array.size != int(np.prod(shape)):
        raise HubError(f"device output has shape {array.shape}; the contract output is {shape}",
                       hint="the compiled model does not keep the Track 3 output; check the compile options")
    return array.astype(np.float32).reshape(shape)


def summarize_profile(profile: dict) -> dict:
    """The figures the challenge cares about, from download_profile()'s dict (times in us, memory in bytes)."""
    summary = profile.get("execution_summary", {})
    layers = profile.get("execution_detail", [])
    estimated_us = summary.get("estimated_inference_time")
    if not estimated_us:
        raise HubError("the profile has no estimated_inference_time", hint="open the profile job's page on AI Hub")
    ms = estimated_us / 1000.0
    peak = summary.get("inference_memory_peak_range") or [summary.get("estimated_inference_peak_memory")] * 2
    units = Counter(str(layer.get("compute_unit", "UNSPECIFIED")).upper() for layer in layers)
    counts = {unit: units.get(unit, 0) for unit in COMPUTE_UNITS}
    counts.update({unit: n for unit, n in units.items() if unit not in COMPUTE_UNITS})
    off_npu = Counter(layer.get("type", "?") for layer in layers if str(layer.get("compute_unit")).upper() == "CPU")
    result = {
        "estimated_inference_time_ms": ms,
        "fps": 1000.0 / ms,
        "meets_target_fps": 1000.0 / ms >= TARGET_FPS,
        "target_fps": TARGET_FPS,
        "peak_memory_bytes": [int(v) for v in peak] if peak[0] is not None else None,
        "layers": len(layers),
        "compute_units": counts,
        "cpu_fallback": counts["CPU"] > 0,
        "cpu_layer_types": dict(off_npu.most_common()),
        "first_load_time_ms": (summary.get("first_load_time") or 0) / 1000.0 or None,
        "warm_load_time_ms": (summary.get("warm_load_time") or 0) / 1000.0 or None,
    }
    times = summary.get("all_inference_times") or []
    if times:
        result["inference_times_ms"] = {"runs": len(times), "min": min(times) / 1000.0,
                                        "median": float(np.median(times)) / 1000.0, "max": max(times) / 1000.0}
    return result


def _warn_profile(summary: dict, log: StageLog) -> None:
    counts = summary["compute_units"]
    if summary["cpu_fallback"]:
        types = ", ".join(f"{name} x{n}" for name, n in summary["cpu_layer_types"].items())
        bar = "!" * 78
        log.warn(bar)
        log.warn(f"CPU FALLBACK: {counts['CPU']} of {summary['layers']} layers run on the CPU, not the NPU ({types}).")
        log.warn("Every frame then crosses between NPU and CPU: latency suffers and the model is not fully "
                 "accelerated. Replace or re-export those ops (see profile.json, execution_detail).")
        log.warn(bar)
    if counts["GPU"]:
        log.warn(f"{counts['GPU']} of {summary['layers']} layers run on the GPU, not the NPU")
    if not summary["meets_target_fps"]:
        log.warn(f"{summary['fps']:.1f} FPS on the device is below the {TARGET_FPS:g} FPS target "
                 f"({summary['estimated_inference_time_ms']:.1f} ms > {1000 / TARGET_FPS:.1f} ms)")


class _Run:
    """One artifact through the hub; every submission lands in hub_jobs.json before anything waits on it."""

    def __init__(self, config: HubConfig, client: HubClient, log: StageLog):
        self.config = config
        self.client = client
        self.log = log
        self.artifact = config.artifact_info
        self.out = config.destination.resolve()
        self.state = HubState(self.out / STATE_NAME)
        self.input_sha256: str | None = None
        self._source_model = None
        self.outputs: list[Path] = [self.out / STATE_NAME]

    def source_model(self):
        """The uploaded artifact: --model-id, else the upload recorded for this content, else a new upload."""
        if self._source_model is not None:
            return self._source_model
        models = self.state.data["models"]
        with self.log.step("upload") as step:
            model_id = self.config.model_id or models.get(self.input_sha256, {}).get("model_id")
            if model_id:
                try:
                    self._source_model = self.client.get_model(model_id)
                    step.detail = f"reusing model {model_id}"
                except HubError:
                    if self.config.model_id:
                        raise
            if self._source_model is None:
                self._source_model = self.client.upload_model(self.artifact.upload)
                model_id = str(self._source_model.model_id)
                models[self.input_sha256] = {"model_id": model_id, "path": os.fspath(self.artifact.upload),
                                             "uploaded": _now()}
                self.state.save()
                step.detail = f"model {model_id}, {self.artifact.upload.name}"
        return self._source_model

    def job(self, kind: str, key: dict, submit) -> HubJob:
        """The recorded job for this exact key (resumed), else a fresh submission, recorded at once."""
        record = self.state.job(kind)
        if record is not None and record["key"] == key and not self.config.force:
            job = self.client.get_job(kind, record["job_id"])
            self.log.info(f"{kind}: resuming job {job.job_id} submitted {record['submitted']} "
                          f"(last seen {record['status']}); --force resubmits")
            return job
        job = submit()
        self.state.record_job(kind, key, job)
        self.log.info(f"{kind}: submitted job {job.job_id} {job.url}")
        return job

    def wait(self, job: HubJob) -> None:
        try:
            state = self.client.wait(job, timeout_s=self.config.timeout_s, poll_s=self.config.poll_s,
                                     progress=self.log.info)
        except HubJobFailedError as err:
            self.state.record_status(job.kind, "FAILED", err.reason)
            raise
        self.state.record_status(job.kind, state.code)

    def compile(self, results: dict):
        config = self.config
        key = {"input_sha256": self.input_sha256, "model_id": config.model_id, "device": config.device,
               "options": config.full_compile_options}
        with self.log.step("compile") as step:
            job = self.job("compile", key, lambda: self.client.submit_compile(
                self.source_model(), config.device, config.full_compile_options, self._job_name()))
            self.wait(job)
            target = self.client.target_model(job)
            step.detail = f"job {job.job_id}, {config.full_compile_options}"
        with self.log.step("download-model") as step:
            folder = self.out / "compiled"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            path = self.client.download_model(target, folder / "model")
            self.outputs.append(path)
            step.artifact = path
        results["compile"] = {"job_id": job.job_id, "url": job.url, "options": config.full_compile_options,
                              "device": config.device, "target_model_id": str(getattr(target, "model_id", "")),
                              "target_model": path.relative_to(self.out).as_posix(), "bytes": path.stat().st_size,
                              "sha256": sha256_file(path)}
        return job, target

    def share(self, job: HubJob, results: dict) -> None:
        with self.log.step("share") as step:
            self.client.share(job, list(self.config.share))
            step.detail = f"{job.kind} job {job.job_id} shared with {', '.join(self.config.share)}"
        results["share"] = {"job_id": job.job_id, "kind": job.kind, "emails": list(self.config.share), "at": _now()}

    def profile(self, model, model_key: str, results: dict) -> HubJob:
        config = self.config
        key = {"model": model_key, "device": config.device, "options": config.profile_options}
        with self.log.step("profile") as step:
            job = self.job("profile", key, lambda: self.client.submit_profile(
                model, config.device, config.profile_options, self._job_name()))
            self.wait(job)
            profile = self.client.profile(job)
            path = self.out / "profile.json"
            path.write_text(json.dumps(profile, indent=1) + "\n")
            self.outputs.append(path)
            summary = summarize_profile(profile)
            counts = summary["compute_units"]
            step.detail = (f"job {job.job_id}: {summary['estimated_inference_time_ms']:.2f} ms = "
                           f"{summary['fps']:.0f} FPS, layers NPU {counts['NPU']} / GPU {counts['GPU']} / "
                           f"CPU {counts['CPU']}")
            step.artifact = path
        _warn_profile(summary, self.log)
        results["profile"] = {"job_id": job.job_id, "url": job.url, "options": config.profile_options, **summary}
        return job

    def inference(self, model, model_key: str, results: dict) -> HubJob:
        config = self.config
        with self.log.step("load-frames") as step:
            frames = _load_frames(config)
            step.detail = f"{len(frames.names)} frames from {config.data_folder}"
        spec = self.client.io_spec(model)
        input_tensor = spec[0][0] if spec else None
        output_tensor = spec[1][0] if spec else None
        input_name = input_tensor.name if input_tensor else TRACK3.input.name
        with self.log.step("dataset") as step:
            device_inputs = _to_device(frames.images, input_tensor)
            dataset_key = _digest({"frames": frames.sha256, "input": input_name, "dtype": str(device_inputs.dtype),
                                   "ids": frames.names})
            dataset, dataset_id = self._dataset(dataset_key, input_name, device_inputs)
            step.detail = f"dataset {dataset_id}, {len(frames.names)} x {tuple(device_inputs.shape[1:])} " \
                          f"{device_inputs.dtype}"
        key = {"model": model_key, "device": config.device, "dataset": dataset_key, "options": config.inference_options}
        with self.log.step("inference") as step:
            job = self.job("inference", key, lambda: self.client.submit_inference(
                model, config.device, dataset, config.inference_options, self._job_name()))
            self.wait(job)
            device = self._device_outputs(job, output_tensor, len(frames.names))
            step.detail = f"job {job.job_id}, {len(device)} outputs"
        for folder in ("device_outputs", "host_outputs", "eval"):
            shutil.rmtree(self.out / folder, ignore_errors=True)
        self.outputs += _save_outputs(self.out / "device_outputs", frames.names, device)
        step_results = {"job_id": job.job_id, "url": job.url, "options": config.inference_options,
                        "dataset_id": dataset_id, "data": frames.description, "input_dtype": str(device_inputs.dtype),
                        "outputs": "device_outputs"}
        host = self._host_fidelity(frames, device, step_results)
        if frames.frames is not None:
            self._ground_truth(frames, host is not None, step_results)
        results["inference"] = step_results
        return job

    def _dataset(self, key: str, input_name: str, device_inputs: np.ndarray):
        datasets = self.state.data["datasets"]
        dataset_id = self.config.dataset_id or datasets.get(key, {}).get("dataset_id")
        dataset = self.client.get_dataset(dataset_id) if dataset_id else None
        if dataset is None:
            if self.config.dataset_id:
                raise HubError(f"dataset {self.config.dataset_id} is gone or expired on AI Hub",
                               hint="drop --dataset-id to upload the frames again (hub datasets expire after 30 days)")
            dataset = self.client.upload_dataset({input_name: [image[None] for image in device_inputs]},
                                                 name=f"lpcv-{len(device_inputs)}frames")
            dataset_id = str(dataset.dataset_id)
            datasets[key] = {"dataset_id": dataset_id, "frames": len(device_inputs), "uploaded": _now()}
            self.state.save()
        return dataset, str(dataset_id)

    def _device_outputs(self, job: HubJob, tensor: TensorInfo | None, count: int) -> np.ndarray:
        outputs = self.client.output_data(job)
        name = tensor.name if tensor is not None and tensor.name in outputs else TRACK3.output.name
        if name not in outputs:
            if len(outputs) != 1:
                raise HubError(f"inference job {job.job_id} returned outputs {sorted(outputs)}; none is "
                               f"{TRACK3.output.name!r}", hint="export the model with the contract output name")
            name = next(iter(outputs))
        arrays = outputs[name]
        if len(arrays) != count:
            raise HubError(f"inference job {job.job_id} returned {len(arrays)} outputs for {count} frames")
        return np.concatenate([_from_device(array, tensor) for array in arrays])

    def _host_fidelity(self, frames: _Frames, device: np.ndarray, results: dict) -> np.ndarray | None:
        from lpcv_depth.track3_metric import FSCORE, fscore_against_reference
        from lpcv_depth.verify import OrtRunner, sqnr_db

        reference = self.artifact.host_reference
        if reference is None:
            self.log.info("no host reference ONNX (a .bin without --reference-onnx): skipping device vs host")
            return None
        with self.log.step("host-reference") as step:
            host = OrtRunner(reference, threads=self.config.threads).run(frames.images)
            self.outputs += _save_outputs(self.out / "host_outputs", frames.names, host)
            step.detail = f"ONNX Runtime on {reference.name}, {len(host)} frames"
        if host.shape != device.shape:
            raise HubError(f"device outputs {device.shape} and host outputs {host.shape} do not line up")
        with self.log.step("device-vs-host") as step:
            per_frame = [fscore_against_reference(d, h, workers=self.config.threads or -1)[FSCORE]
                         for d, h in zip(device, host)]
            fidelity = {"reference": os.fspath(reference), "sqnr_db": sqnr_db(host, device),
                        "max_abs_diff": float(np.max(np.abs(host - device))),
                        "fscore_vs_host": float(np.mean(per_frame)), "fscore_vs_host_per_frame": per_frame}
            results["vs_host"] = fidelity
            step.detail = (f"SQNR {fidelity['sqnr_db']:.1f} dB, max abs {fidelity['max_abs_diff']:.4f}, "
                           f"F-score vs host {fidelity['fscore_vs_host']:.1f}")
        return host

    def _ground_truth(self, frames: _Frames, with_host: bool, results: dict) -> None:
        """Both output folders through the evaluate stage, on exactly the frames sent to the device."""
        from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate
        from lpcv_depth.track3_metric import FSCORE

        data = Path(self.config.eval_data)
        subset = None
        if self.config.max_frames is not None:
            subset = self.out / ".eval-frames"
            _link_frames(frames.frames, subset)
            data = subset
        gt: dict = {}
        try:
            with self.log.step("ground-truth") as step:
                for label in ("device", "host") if with_host else ("device",):
                    evaluation = run_evaluate(EvaluateConfig(data=data, predictions=self.out / f"{label}_outputs",
                                                         out=self.out / "eval" / label, num_vis=2,
                                                         threads=self.config.threads),
                                          StageLog(f"{STAGE}/evaluate-{label}"))
                    overall = evaluation.summary["overall"]
                    gt[label] = overall["metrics"]
                    gt["frames"], gt["skipped"] = overall["scored"], overall["skipped"]
                    self.outputs += [evaluation.out_dir / "summary.json", evaluation.out_dir / "frames.csv"]
                if with_host:
                    gt["fscore_drop"] = gt["host"][FSCORE] - gt["device"][FSCORE]
                step.detail = f"F@0.1 device {gt['device'][FSCORE]:.2f}" + (
                    f", host {gt['host'][FSCORE]:.2f}, drop {gt['fscore_drop']:.2f}" if with_host else "")
        finally:
            if subset is not None:
                shutil.rmtree(subset, ignore_errors=True)
        results["ground_truth"] = gt

    def _job_name(self) -> str:
        artifact = self.artifact
        return f"lpcv-{artifact.model_name or artifact.upload.stem}-{artifact.label}"


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _save_outputs(folder: Path, names: list[tuple[str, str]], outputs: np.ndarray) -> list[Path]:
    paths = []
    for (set_name, frame_id), output in zip(names, outputs):
        path = folder / set_name / f"{frame_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, output.reshape(TRACK3.output.concrete_shape(1)).astype(np.float32))
        paths.append(path)
    return paths


def _link_frames(frames: list, folder: Path) -> None:
    """A folder of sets holding only `frames` (links to their files), so evaluate scores just those."""
    shutil.rmtree(folder, ignore_errors=True)
    for frame in frames:
        for source in [*frame.files, frame.set_dir / "meta.json"]:
            if not source.is_file():
                continue
            target = folder / frame.set_name / source.relative_to(frame.set_dir)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(source.resolve())
            except OSError:
                shutil.copy(source, target)


def _input_hash(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return sha256_of_files(files, path)
    return sha256_file(path)


def run_hub(config: HubConfig, client: HubClient | None = None, log: StageLog | None = None) -> HubResult:
    """Upload, compile, share, profile and run on the device as configured; resumable; manifest last."""
    log = log or StageLog(STAGE)
    client = client or HubClient()
    run = _Run(config, client, log)
    artifact = run.artifact
    with log.step("preflight") as step:
        client.preflight()
        step.detail = f"{artifact.kind} {artifact.upload.name} ({artifact.precision}) -> {config.device}"
    _prepare_output(run.out)
    with log.step("hash-input") as step:
        run.input_sha256 = _input_hash(artifact.upload)
        step.detail = run.input_sha256[:12]

    results: dict = {"input": {**artifact.as_dict(), "sha256": run.input_sha256}, "device": config.device,
                     "runtime": config.runtime_label, "target_fps": TARGET_FPS}
    if config.compiles:
        compile_job, device_model = run.compile(results)
        model_key = compile_job.job_id
    else:
        if config.compile and not artifact.compilable:
            log.info("a precompiled QNN context binary: profiling it as-is, no compile job")
        compile_job, device_model = None, run.source_model()
        model_key = f"uploaded:{run.input_sha256}"

    if config.share:
        if compile_job is None:
            log.warn("no compile job to share: the submission form asks for a compile job id. Sharing the "
                     "profile job instead; compile the ONNX or .aimet model to get a submittable id.")
        else:
            run.share(compile_job, results)
    profile_job = run.profile(device_model, model_key, results) if config.profile else None
    if config.share and compile_job is None and profile_job is not None:
        run.share(profile_job, results)
    if config.inference and config.data_folder is not None:
        run.inference(device_model, model_key, results)
    elif config.inference:
        log.info("no --eval-data or --images: skipping the on-device inference step")

    results["jobs"] = {kind: {key: record[key] for key in ("job_id", "url", "status")}
                       for kind, record in run.state.data["jobs"].items()}
    inputs = {"artifact": {"path": os.fspath(artifact.upload), "sha256": run.input_sha256,
                           "source_manifest": os.fspath(artifact.source_dir / MANIFEST_NAME)
                           if artifact.source_dir else None}}
    if artifact.host_reference is not None:
        inputs["host_reference"] = {"path": os.fspath(artifact.host_reference),
                                    "sha256": sha256_file(artifact.host_reference)}
    manifest_path = write_manifest(run.out, stage=STAGE, config=config.as_dict(), inputs=inputs,
                                   outputs=[p for p in run.outputs if p.is_file()], timings=log.timings,
                                   results=results)
    if compile_job is not None:
        log.info(f"compile job id (the submission form asks for it): {compile_job.job_id}  {compile_job.url}")
    log.info(f"ok {log.total_seconds:.1f}s -> {run.out}")
    return HubResult(run.out, manifest_path, read_manifest(run.out))


def next_command(results: list[HubResult]) -> str:
    """After fp32 and int8 runs: the comparison; after one of them: the other one."""
    stages = {r.manifest["results"]["input"]["kind"]: r.manifest["results"]["input"]["source_dir"] for r in results}
    if "export" in stages and "ptq" in stages:
        return (f"python evaluation/compare.py --fp32 {os.path.relpath(stages['export'])} "
                f"--int8 {os.path.relpath(stages['ptq'])}")
    if "export" in stages:
        ptq = os.path.relpath(Path(stages["export"]).parent / "ptq-w8a8")
        return f"python export/aihub.py {ptq}  (the int8 model from quantize/ptq.py, same flags)"
    if "ptq" in stages:
        fp32 = read_manifest(stages["ptq"])["config"].get("fp32_dir", "build/<model>/export")
        return f"python evaluation/compare.py --fp32 {fp32} --int8 {os.path.relpath(stages['ptq'])}"
    return f"python evaluation/score.py --predictions {os.path.relpath(results[-1].out_dir / 'device_outputs')} " \
           "--data DATA_DIR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python export/aihub.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+",
                        help="export folder, ptq folder, .onnx, .aimet folder or QNN context binary .bin; "
                             "several run one after the other with the same flags")
    parser.add_argument("--runtime", default="qnn_context_binary", choices=RUNTIMES,
                        help="compile target (default qnn_context_binary, what the challenge profiles)")
    parser.add_argument("--compile-options", default="",
                        help="extra compile options, passed through as written; write --compile-options=\"--x y\" "
                             "when they start with --")
    parser.add_argument("--quantize-io", action="store_true",
                        help="add --quantize_io to the compile options (uint8 input/output for int8 models)")
    parser.add_argument("--profile-options", default=DEFAULT_PROFILE_OPTIONS,
                        help=f"profile job options (default {DEFAULT_PROFILE_OPTIONS!r}, as the organizers profile)")
    parser.add_argument("--inference-options", default="")
    parser.add_argument("--device", default=S24_DEVICE, help=f"AI Hub device name (default {S24_DEVICE!r})")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="profile/run the uploaded ONNX as-is (ONNX Runtime on the phone)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-inference", dest="inference", action="store_false")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="RGB-D set(s) to run on the device and score against ground truth")
    parser.add_argument("--images", type=Path, default=None, help="plain photos to run on the device (no scoring)")
    parser.add_argument("--max-frames", type=int, default=None, help="send only the first N frames")
    parser.add_argument("--model-id", default=None, help="reuse a model already uploaded to AI Hub (skips upload)")
    parser.add_argument("--dataset-id", default=None, help="reuse a dataset already uploaded to AI Hub")
    parser.add_argument("--reference-onnx", type=Path, default=None,
                        help="host ONNX to compare device outputs with (default: the artifact's own ONNX)")
    parser.add_argument("--share", action="append", default=[], metavar="EMAIL",
                        help="share the compile job (e.g. lowpowervision@gmail.com); repeatable")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each job (default 3600)")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")
    parser.add_argument("--force", action="store_true", help="resubmit jobs even when recorded ones match")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (one artifact only; default build/<model>/hub-<label>-<runtime>)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for host ONNX Runtime and scoring")
    return parser


def main(argv: list[str] | None = None, client: HubClient | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = StageLog(STAGE)
    out = None
    try:
        if args.out is not None and len(args.artifacts) > 1:
            raise ConfigError("--out takes one artifact; drop --out to get one folder per artifact")
        compile_options = " ".join([args.compile_options] + (["--quantize_io"] if args.quantize_io else []))
        configs = [HubConfig(artifact=artifact, runtime=args.runtime, compile_options=compile_options.strip(),
                             profile_options=args.profile_options, inference_options=args.inference_options,
                             device=args.device, compile=args.compile, profile=args.profile,
                             inference=args.inference, eval_data=args.eval_data, images=args.images,
                             max_frames=args.max_frames, model_id=args.model_id, dataset_id=args.dataset_id,
                             reference_onnx=args.reference_onnx, share=tuple(args.share), timeout_s=args.timeout,
                             poll_s=args.poll, force=args.force, out_dir=args.out, threads=args.threads)
                   for artifact in args.artifacts]
        client = client or HubClient()
        results = []
        for config in configs:
            out = config.destination
            results.append(run_hub(config, client, log))
    except HubJobFailedError as err:
        print(f"{STAGE}: JOB FAILED: {err}", file=sys.stderr)
        return EXIT_JOB_FAILED
    except HubTimeoutError as err:
        print(f"{STAGE}: TIMED OUT: {err}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (LpcvError, KeyboardInterrupt) as err:
        where = f" in {os.path.relpath(out / STATE_NAME)}" if out is not None else ""
        return exit_status(STAGE, err, f"submitted job ids are recorded{where}: rerun the same command to resume")
    log.info(f"next: {next_command(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
