"""Qualcomm AI Hub: compile for the Galaxy S24, profile it, run it on the phone, share it; one durable record.

    lpcv-depth hub build/fastdepth/export build/fastdepth/ptq-w8a8 --eval-data ../shared/data/rgbd
    lpcv-depth hub build/fastdepth/ptq-w8a8 --quantize-io --share lowpowervision@gmail.com
    lpcv-depth hub build/fastdepth/htp/model.bin --reference-onnx build/fastdepth/ptq-w8a8/model_qdq.onnx

Takes an export folder (fp32 model.onnx), a ptq folder (uploads <model>.aimet/, the layout AI Hub
takes for AIMET int8 models), an .onnx file, an .aimet folder, or a precompiled QNN context binary
(.bin, or the htp-check folder that built one: profiled and run as-is, no compile job); several
run one after the other with the same flags. Per artifact, writes OUT (default
hub-<export|ptq-PRESET|...>-<runtime> beside the artifact's stage folder):
  hub_jobs.json        every job id the moment it is submitted (what a rerun resumes from)
  compiled/model.*     the compiled model as downloaded
  profile.json         the raw profile; the manifest has its summary (ms, FPS, memory, NPU/GPU/CPU layers)
  device_outputs/      on-device outputs, <set>/<frame id>.npy, (1,1,480,640), scored by lpcv-depth evaluate
  host_outputs/        ONNX Runtime outputs of the same frames, for on-device vs host fidelity
  eval/device, eval/host   with --eval-data: the evaluate stage against ground truth
  manifest.json        written last
Rerunning the same command resumes the recorded jobs (waits, downloads) instead of resubmitting;
--force resubmits. Exit statuses: 0 ok, 2 error (message and fix on stderr), 4 a job FAILED on the
hub, 5 timed out waiting (the job keeps running; rerun to resume), 130 interrupted. docs/hub.md has
the details.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from lpcv_depth.backends.ai_hub import (S24_DEVICE, HubClient, HubError, HubJob, HubJobFailedError, HubNotFoundError,
                                        TensorInfo)
from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, ExitCode, LpcvError, OutputDirError, UnknownModelError
from lpcv_depth.manifest import (MANIFEST_NAME, Manifest, config_as_dict, read_manifest, sha256_file,
                                 sha256_of_files, write_manifest)
from lpcv_depth.options import config_from_args, inherit, option
from lpcv_depth.results import (EvaluateGroup, EvaluateResults, HtpCheckResults, HubCompile, HubContract,
                                HubGroundTruth, HubHostFidelity, HubInference, HubInput, HubJobRecord, HubProfile,
                                HubResults, HubShare)
from lpcv_depth.stage import (StageDefinition, StageLog, command_line, display_path, exit_status,
                              refuse_inputs)
from lpcv_depth.stages.evaluate import EvaluateConfig

__all__ = ["HubConfig", "HubResult", "HubArtifact", "HubState", "run_hub", "resolve_artifact", "summarize_profile",
           "next_command", "STATE_NAME", "RUNTIMES", "DEFINITION"]

STAGE = "hub"
RUNTIMES = ("qnn_context_binary", "tflite", "qnn_dlc", "onnx")
DEFAULT_PROFILE_OPTIONS = "--max_profiler_iterations 20"  # what the organizers' run_profile.py uses
STATE_NAME = "hub_jobs.json"
TARGET_FPS = 30.0
COMPUTE_UNITS = ("NPU", "GPU", "CPU")
EXPORT_ONNX = "model.onnx"
QDQ_ONNX = "model_qdq.onnx"
ARTIFACT_HINT = ("pass build/<model>/export, build/<model>/ptq-<preset>, an htp-check folder, an .onnx, an .aimet "
                 "folder or a .bin")
# What AI Hub takes in an .aimet folder (qai_hub.client._get_model_dir_type; a .bin excludes encodings).
AIMET_SUFFIXES = (".onnx", ".encodings", ".data")
ORGANIZERS = "lowpowervision@gmail.com"


# -- What goes to the hub ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubArtifact:
    """What goes to the hub, and what it is measured against on the host."""

    kind: str  # export | ptq | onnx | aimet | qnn_context_binary
    upload: Path
    precision: str  # fp32 | int8 | unknown
    label: str  # names the output folder: export, ptq-w8a8, model_qdq, ...
    model_name: str | None
    source_dir: Path | None  # the export / ptq / htp-check folder it came from, if any
    host_reference: Path | None  # the ONNX whose ONNX Runtime outputs the device outputs are compared with
    # The ONNX graph that declares what the uploaded model takes and returns (the .onnx itself, or an
    # htp-check context binary's companion EPContext model); None: ask AI Hub after the upload.
    io_onnx: Path | None = None
    qnn_sdk_version: str | None = None  # the QNN that built a local context binary (htp-check manifest)

    @property
    def compilable(self) -> bool:
        return self.kind != "qnn_context_binary"

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.upload, self.source_dir, self.host_reference) if p is not None]

    def record(self, sha256: str) -> HubInput:
        def text(path: Path | None) -> str | None:
            return None if path is None else os.fspath(path)

        return HubInput(kind=self.kind, upload=os.fspath(self.upload), precision=self.precision, label=self.label,
                        model_name=self.model_name, source_dir=text(self.source_dir),
                        host_reference=text(self.host_reference), sha256=sha256)


def _no_artifact_hint() -> str:
    return f"e.g. {command_line(STAGE, 'build/fastdepth/export')}; " + ARTIFACT_HINT


def _stage_of(folder: Path) -> str | None:
    """Which stage wrote `folder` (None: no readable manifest); to pick the reader, which checks it all."""
    try:
        return read_manifest(folder).get("stage") if (folder / MANIFEST_NAME).is_file() else None
    except (OSError, ValueError):
        return None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _single_aimet_dir(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.aimet") if p.is_dir())
    if len(found) != 1:
        raise ConfigError(f"ptq folder {folder} holds {len(found)} <model>.aimet folders, expected one",
                          hint=f"rerun {command_line('ptq')}; its output has exactly one")
    return found[0]


def _check_aimet_dir(folder: Path) -> None:
    """AI Hub's rule for an .aimet folder, on every entry as qai-hub counts them (hidden files such as
    .DS_Store and subfolders too): exactly one .onnx and one .encodings, at most one .data, nothing else."""
    names = sorted(os.listdir(folder))
    counts = Counter(Path(name).suffix for name in names)
    others = [name for name in names if Path(name).suffix not in AIMET_SUFFIXES]
    if counts[".onnx"] != 1 or counts[".encodings"] != 1 or counts[".data"] > 1 or others:
        extra = f"; remove {', '.join(others)}" if others else ""
        raise ConfigError(f"{folder} is not an AIMET model folder AI Hub accepts: {names}",
                          hint="it must hold exactly one .onnx and one .encodings, optionally one .data, and nothing "
                               "else (AI Hub counts hidden files such as .DS_Store too)" + extra)


def _ptq_label(manifest: Manifest) -> str:
    return f"ptq-{manifest.config.get('preset', 'int8')}"


def _export_artifact(folder: Path) -> HubArtifact:
    manifest = Manifest.read(folder, stage="export", flag="artifact")
    onnx = folder / EXPORT_ONNX
    if not onnx.is_file():
        raise ConfigError(f"export folder {folder} has no {EXPORT_ONNX}", hint=f"rerun {command_line('export')}")
    return HubArtifact("export", onnx, "fp32", "export", manifest.config.get("model"), folder, onnx, io_onnx=onnx)


def _ptq_artifact(folder: Path) -> HubArtifact:
    manifest = Manifest.read(folder, stage="ptq", flag="artifact")
    aimet = _single_aimet_dir(folder)
    _check_aimet_dir(aimet)
    return HubArtifact("ptq", aimet, "int8", _ptq_label(manifest), aimet.stem, folder, _existing(folder / QDQ_ONNX))


def _htp_check_artifact(folder: Path) -> HubArtifact:
    """The QNN context binary the local HTP check built, measured against the QDQ model it came from;
    its companion EPContext ONNX declares its I/O, and the manifest the QNN version that built it."""
    manifest = Manifest.read(folder, stage="htp-check", flag="artifact")
    binary = manifest.results_as(HtpCheckResults).context_binary
    if binary is None or not (folder / binary.path).is_file():
        raise ConfigError(f"htp-check folder {folder} holds no QNN context binary",
                          hint=f"rerun {command_line('htp-check')} without --no-context-binary")
    ptq = Path(manifest.config["ptq"])  # a ptq folder, or the QDQ .onnx itself
    qdq = ptq if ptq.suffix == ".onnx" else ptq / QDQ_ONNX
    model_name = next((p.stem for p in ptq.glob("*.aimet")), None) if ptq.is_dir() else None
    return HubArtifact("qnn_context_binary", folder / binary.path, "int8", "htp-check", model_name, folder,
                       _existing(qdq), io_onnx=_existing(folder / binary.onnx) if binary.onnx else None,
                       qnn_sdk_version=binary.qnn_sdk_version or None)


def _aimet_artifact(folder: Path) -> HubArtifact:
    _check_aimet_dir(folder)
    in_ptq = _stage_of(folder.parent) == "ptq"
    label = _ptq_label(Manifest.read(folder.parent, stage="ptq", flag="artifact")) if in_ptq else folder.stem
    return HubArtifact("aimet", folder, "int8", label, folder.stem, folder.parent if in_ptq else None,
                       _existing(folder.parent / QDQ_ONNX))


def exported_model(folder: Path | None) -> str | None:
    """The --model value of the export behind an export, ptq or htp-check folder, through their manifests."""
    for _ in range(3):  # htp-check -> ptq -> export
        if folder is None or not (folder / MANIFEST_NAME).is_file():
            return None
        manifest = read_manifest(folder)
        stage = manifest.get("stage")
        if stage == "export":
            return manifest.get("config", {}).get("model")
        if stage == "ptq":
            upstream = (manifest.get("inputs", {}).get("export_manifest") or {}).get("path")
            folder = Path(upstream).parent if upstream else None
        elif stage == "htp-check" and manifest.get("config", {}).get("ptq"):
            ptq = Path(manifest["config"]["ptq"])
            folder = ptq.parent if ptq.suffix == ".onnx" else ptq
        else:
            return None
    return None


def _folder_artifact(path: Path) -> HubArtifact:
    stage = _stage_of(path)
    readers = {"export": _export_artifact, "ptq": _ptq_artifact, "htp-check": _htp_check_artifact}
    if stage in readers:
        return readers[stage](path)
    if path.suffix == ".aimet":
        return _aimet_artifact(path)
    what = f"a {stage!r} stage output" if stage else "not a stage output (no manifest.json)"
    raise ConfigError(f"{path} is {what}: neither an export nor a ptq folder", hint=ARTIFACT_HINT)


def _model_in(folder: Path, stage: str | None) -> str | None:
    """The registered model an export or ptq folder holds (for a bare .onnx taken from one)."""
    if stage == "export":
        return Manifest.read(folder, stage="export", flag="artifact", verify=False).config.get("model")
    if stage == "ptq":
        return next((p.stem for p in folder.glob("*.aimet")), None)
    return None


def _file_artifact(path: Path) -> HubArtifact:
    if path.suffix == ".onnx":
        stage = _stage_of(path.parent)
        quantized = path.name == QDQ_ONNX or stage == "ptq"
        precision = "int8" if quantized else "fp32" if stage == "export" else "unknown"
        label = "export" if stage == "export" and path.name == EXPORT_ONNX else path.stem
        source = path.parent if stage in ("export", "ptq") else None
        return HubArtifact("onnx", path, precision, label, _model_in(path.parent, stage), source, path, io_onnx=path)
    if path.suffix == ".bin":
        if _stage_of(path.parent) == "htp-check":  # the htp-check's binary, given as a file: its manifest still counts
            built = _htp_check_artifact(path.parent)
            if built.upload.resolve() == path.resolve():
                return dataclasses.replace(built, label=path.stem)
        return HubArtifact("qnn_context_binary", path, "unknown", path.stem, None, None, None)
    raise ConfigError(f"{path} is not a model AI Hub takes here (suffix {path.suffix or 'none'})", hint=ARTIFACT_HINT)


def resolve_artifact(path: Path, reference_onnx: Path | None = None) -> HubArtifact:
    """Turn the user's argument into what to upload and what to compare with; ConfigError if unusable."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"artifact not found: {path}", hint=ARTIFACT_HINT)
    artifact = _folder_artifact(path) if path.is_dir() else _file_artifact(path)
    if reference_onnx is None:
        return artifact
    if not Path(reference_onnx).is_file():
        raise ConfigError(f"--reference-onnx not found: {reference_onnx}",
                          hint="pass the host .onnx file to compare with")
    return dataclasses.replace(artifact, host_reference=Path(reference_onnx))


# -- Config -----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubConfig:
    artifact: Path | None = option(None, metavar="ARTIFACT",
                                   help="export, ptq or htp-check folder, .onnx, .aimet folder or QNN context binary "
                                        ".bin; the command line also takes several as positional arguments")
    runtime: str = option("qnn_context_binary", choices=RUNTIMES,
                          help="compile target (qnn_context_binary is what the challenge profiles)")
    compile_options: str = option("", help="extra compile options, passed through as written; write "
                                           "--compile-options=\"--x y\" when they start with --")
    quantize_io: bool = option(False, help="add --quantize_io to the compile options of int8 artifacts (uint8 "
                                           "input/output; the stage quantizes inputs and dequantizes outputs); "
                                           "not added for an fp32 model, where it means nothing")
    profile_options: str = option(DEFAULT_PROFILE_OPTIONS, help="profile job options (as the organizers profile)")
    inference_options: str = option("", help="inference job options, passed through as written")
    device: str = option(S24_DEVICE, help="AI Hub device name")
    compile: bool = option(True, help="compile; --no-compile profiles/runs the uploaded ONNX as-is (ONNX Runtime on "
                                      "the phone)")
    profile: bool = option(True, help="submit a profile job")
    inference: bool = option(True, help="run --eval-data or --images on the device")
    eval_data: Path | None = option(None, help="RGB-D set(s) to run on the device and score against ground truth")
    median: str = inherit(EvaluateConfig, "median")
    images: Path | None = option(None, help="plain photos to run on the device (no scoring)")
    max_frames: int | None = option(None, help="send only the first N frames (default: all)")
    model_id: str | None = option(None, help="reuse a model already uploaded to AI Hub (skips the upload)")
    dataset_id: str | None = option(None, help="reuse a dataset already uploaded to AI Hub")
    reference_onnx: Path | None = option(None, help="host ONNX to compare device outputs with (default: the "
                                                    "artifact's own ONNX)")
    share: tuple[str, ...] = option((), repeatable=True, metavar="EMAIL",
                                    help="share the compile job (e.g. lowpowervision@gmail.com); repeatable")
    timeout: float = option(3600.0, help="seconds to wait for each job (and at most for a rate-limited submission)")
    poll: float = option(10.0, help="seconds between status checks")
    force: bool = option(False, help="resubmit jobs even when recorded ones match")
    out: Path | None = option(None, help="output folder (one artifact only; default: hub-<label>-<runtime> beside "
                                         "the artifact's stage folder)")
    threads: int | None = option(None, help="CPU threads for host ONNX Runtime and scoring")
    preflight: bool = option(True, help="before anything is uploaded, check that AI Hub answers, through the proxy "
                                        "that HTTPS_PROXY/NO_PROXY select (as qai-hub will); --no-preflight skips "
                                        "that probe (client.ini is still checked)")

    def __post_init__(self):
        if self.artifact is None:
            raise ConfigError("no artifact to send to AI Hub", hint=_no_artifact_hint())
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if "--target_runtime" in self.compile_options:
            raise ConfigError("give the target runtime with --runtime, not inside the compile options",
                              hint=f"--runtime {{{','.join(RUNTIMES)}}}")
        for email in self.share:
            if "@" not in email or any(c.isspace() for c in email):
                raise ConfigError(f"--share needs an email address, got {email!r}",
                                  hint="e.g. --share lowpowervision@gmail.com")
        self._check_data()
        if not self.timeout > 0 or not self.poll > 0:
            raise ConfigError(f"timeout and poll interval must be > 0, got {self.timeout} and {self.poll}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        artifact = self.artifact_info  # resolves the artifact: an unusable one fails here
        if not self.compile and artifact.kind in ("ptq", "aimet"):
            raise ConfigError("AI Hub cannot run an AIMET model without compiling it", hint="drop --no-compile")

    def _check_data(self) -> None:
        if self.eval_data is not None and self.images is not None:
            raise ConfigError("give --eval-data (RGB-D, scored against ground truth) or --images (photos), not both")
        for name in ("eval_data", "images"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} folder not found: {folder}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")

    @cached_property
    def artifact_info(self) -> HubArtifact:
        return resolve_artifact(Path(self.artifact), self.reference_onnx)

    @property
    def compiles(self) -> bool:
        return self.compile and self.artifact_info.compilable

    @property
    def runtime_label(self) -> str:
        if self.compiles:
            return self.runtime
        return "qnn_context_binary" if self.artifact_info.kind == "qnn_context_binary" else "uncompiled"

    @cached_property
    def model_compile_options(self) -> str:
        """What the model's spec adds to every compile (ModelSpec.hub_compile_options)."""
        name = self.artifact_info.model_name
        if not self.compiles or name is None:
            return ""
        from lpcv_depth.models import get_spec

        # A model given by factory reference is registered under no name: its export's --model finds it.
        for model in dict.fromkeys((name, exported_model(self.artifact_info.source_dir))):
            try:
                return get_spec(model).hub_compile_options if model else ""
            except UnknownModelError:  # an .aimet folder named after an unregistered model
                continue
        return ""

    @property
    def quantize_io_applies(self) -> bool:
        """--quantize-io means something only for a quantized model that is compiled here."""
        return self.quantize_io and self.compiles and self.artifact_info.precision != "fp32"

    @property
    def full_compile_options(self) -> str:
        """The exact options string the compile job gets (and the manifest records)."""
        words = ["--target_runtime", self.runtime, *self.model_compile_options.split(), *self.compile_options.split()]
        if self.quantize_io_applies and "--quantize_io" not in words:
            words.append("--quantize_io")
        return " ".join(words)

    @property
    def qairt_version(self) -> str | None:
        """The QAIRT version jobs that run an uploaded context binary as-is need: the major.minor of the
        QNN that built it (from the htp-check manifest); None when something else is run or it is unknown."""
        artifact = self.artifact_info
        if self.compiles or artifact.kind != "qnn_context_binary" or not artifact.qnn_sdk_version:
            return None
        found = re.match(r"(\d+)\.(\d+)", artifact.qnn_sdk_version)
        return f"{found[1]}.{found[2]}" if found else None

    def device_job_options(self, options: str) -> str:
        """Profile / inference options as submitted: --qairt_version added for a context binary (unless given)."""
        if self.qairt_version is None or "--qairt_version" in options:
            return options
        return " ".join([*options.split(), "--qairt_version", self.qairt_version])

    @property
    def data_folder(self) -> Path | None:
        return Path(self.eval_data) if self.eval_data is not None else Path(self.images) if self.images else None

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        artifact = self.artifact_info
        base = artifact.source_dir.parent if artifact.source_dir is not None else Path(self.artifact).parent
        return base / f"hub-{artifact.label}-{self.runtime_label}"

    @property
    def inputs(self) -> list[Path]:
        """Everything the run reads: --out may not be, hold or lie inside any of them."""
        candidates = (Path(self.artifact), *self.artifact_info.paths, self.eval_data, self.images)
        return [Path(p) for p in candidates if p is not None]

    def as_dict(self) -> dict:
        data = config_as_dict(self)
        data["full_compile_options"] = self.full_compile_options if self.compiles else None
        data["model_compile_options"] = self.model_compile_options
        data["quantize_io_applied"] = self.quantize_io_applies
        return data


@dataclass(frozen=True)
class HubResult:
    out_dir: Path
    manifest_path: Path
    results: HubResults
    manifest: dict

    @property
    def compile_job_id(self) -> str | None:
        return self.results.compile.job_id if self.results.compile is not None else None


# -- The resumable output folder --------------------------------------------------------------------------------------

class HubState:
    """hub_jobs.json: uploads and job ids, rewritten atomically the moment anything is submitted."""

    def __init__(self, path: Path):
        self.path = path
        empty = {"version": 1, "models": {}, "datasets": {}, "jobs": {}, "replaced": [], "shares": {}}
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

    def job_records(self) -> dict[str, HubJobRecord]:
        return {kind: HubJobRecord(job_id=record["job_id"], url=record["url"], status=record["status"])
                for kind, record in self.data["jobs"].items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare_output(config: HubConfig) -> Path:
    """Own the folder, and make sure it does not look finished until this run writes its manifest.

    Unlike a StagingDir the folder is written in place: hub_jobs.json must survive a failed or
    interrupted run, because it is what the rerun resumes from."""
    folder = config.destination.resolve()
    refuse_inputs(folder, config.inputs)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output path {folder} exists and is not a folder", hint="pass a different --out")
    ours = (folder / STATE_NAME).is_file() or _stage_of(folder) == STAGE
    if folder.is_dir() and any(folder.iterdir()) and not ours:
        raise OutputDirError(f"output folder {folder} is not empty and is not an earlier hub stage output",
                             hint="pass an empty or new folder with --out; lpcv-depth only reuses its own outputs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create output folder {folder}: {err.strerror or err}",
                             hint="choose a writable location with --out") from err
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    return folder


# -- One run: what the steps share, and the hub plumbing they use -----------------------------------------------------

@dataclass
class _Run:
    """What the steps of one artifact's run share; every submission lands in hub_jobs.json before
    anything waits on it."""

    config: HubConfig
    client: HubClient
    log: StageLog
    out: Path
    state: HubState
    input_sha256: str
    outputs: list[Path] = field(default_factory=list)
    uploaded: Any = None

    @property
    def artifact(self) -> HubArtifact:
        return self.config.artifact_info

    @property
    def job_name(self) -> str:
        return f"lpcv-{self.artifact.model_name or self.artifact.upload.stem}-{self.artifact.label}"


class _DeviceModel(NamedTuple):
    """The model the device jobs run: the compiled one, or the upload itself when nothing compiles."""

    handle: Any
    key: str  # names it in the profile and inference jobs' keys
    compile_job: HubJob | None
    compile: HubCompile | None
    io: tuple[list[TensorInfo], list[TensorInfo]] | None = None  # the compiled model's, as AI Hub records it


def _upload(run: _Run) -> Any:
    """The uploaded artifact: --model-id, else the upload recorded for this content, else a new upload."""
    if run.uploaded is not None:
        return run.uploaded
    models = run.state.data["models"]
    with run.log.step("upload") as step:
        model_id = run.config.model_id or models.get(run.input_sha256, {}).get("model_id")
        if model_id:
            try:
                run.uploaded = run.client.get_model(model_id)
                step.detail = f"reusing model {model_id}"
            except HubNotFoundError:  # gone from the hub: upload again (any other error surfaces)
                if run.config.model_id:
                    raise
        if run.uploaded is None:
            run.uploaded = run.client.upload_model(run.artifact.upload)
            model_id = str(run.uploaded.model_id)
            models[run.input_sha256] = {"model_id": model_id, "path": os.fspath(run.artifact.upload),
                                        "uploaded": _now()}
            run.state.save()
            step.detail = f"model {model_id}, {run.artifact.upload.name}"
    return run.uploaded


def _submit_or_resume(run: _Run, kind: str, key: dict, submit: Callable[[], HubJob]) -> HubJob:
    """The recorded job for this exact key (resumed), else a fresh submission, recorded at once."""
    record = run.state.job(kind)
    if record is not None and record["key"] == key and not run.config.force:
        job = run.client.get_job(kind, record["job_id"])
        run.log.info(f"{kind}: resuming job {job.job_id} submitted {record['submitted']} "
                     f"(last seen {record['status']}); --force resubmits")
        return job
    job = submit()
    run.state.record_job(kind, key, job)
    run.log.info(f"{kind}: submitted job {job.job_id} {job.url}")
    return job


def _wait(run: _Run, job: HubJob) -> None:
    try:
        state = run.client.wait(job, timeout_s=run.config.timeout, poll_s=run.config.poll, progress=run.log.info)
    except HubJobFailedError as err:
        run.state.record_status(job.kind, "FAILED", err.reason)
        raise
    run.state.record_status(job.kind, state.code)


# -- The steps --------------------------------------------------------------------------------------------------------

def _preflight(config: HubConfig, client: HubClient, log: StageLog) -> None:
    artifact = config.artifact_info
    with log.step("preflight") as step:
        client.preflight(network=config.preflight)
        step.detail = f"{artifact.kind} {artifact.upload.name} ({artifact.precision}) -> {config.device}"
        if not config.preflight:
            step.detail += " (network probe skipped: --no-preflight)"


def _hash_input(config: HubConfig, log: StageLog) -> str:
    path = config.artifact_info.upload
    with log.step("hash-input") as step:
        if path.is_dir():
            digest = sha256_of_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
        else:
            digest = sha256_file(path)
        step.detail = digest[:12]
    return digest


def _note_options(config: HubConfig, log: StageLog) -> None:
    """Say which of the run-wide options this artifact gets, and why not the others."""
    if config.quantize_io and not config.quantize_io_applies:
        why = "a float model has no quantized I/O" if config.compiles else "nothing is compiled"
        log.info(f"--quantize-io not applied to {config.artifact_info.label}: {why}")
    artifact = config.artifact_info
    if config.qairt_version is not None:
        log.info(f"context binary built with QNN {artifact.qnn_sdk_version}: its jobs run on --qairt_version "
                 f"{config.qairt_version} (from the htp-check manifest)")
    elif artifact.kind == "qnn_context_binary" and not config.compiles and \
            "--qairt_version" not in config.profile_options + config.inference_options:
        log.warn(f"no QNN version recorded for {artifact.upload.name}: AI Hub runs it on its default QAIRT, which "
                 "may not load it; add --qairt_version X.Y (the QNN that built it) to --profile-options and "
                 "--inference-options")


def _device_model(run: _Run) -> _DeviceModel:
    if run.config.compiles:
        job, target = _compile_job(run)
        compiled = _download_compiled(run, job, target)
        io = _compiled_io(run, job, target)
        contract = _contract_check(io)
        return _DeviceModel(target, job.job_id, job, dataclasses.replace(compiled, contract=contract), io)
    if run.config.compile and not run.artifact.compilable:
        run.log.info("a precompiled QNN context binary: profiling it as-is, no compile job")
    return _DeviceModel(_upload(run), f"uploaded:{run.input_sha256}", None, None)


def _compile_job(run: _Run) -> tuple[HubJob, Any]:
    config = run.config
    options = config.full_compile_options
    key = {"input_sha256": run.input_sha256, "model_id": config.model_id, "device": config.device, "options": options}
    with run.log.step("compile") as step:
        job = _submit_or_resume(run, "compile", key, lambda: run.client.submit_compile(
            _upload(run), config.device, options, run.job_name, wait_s=config.timeout))
        _wait(run, job)
        target = run.client.target_model(job)
        step.detail = f"job {job.job_id}, {options}"
    return job, target


def _download_compiled(run: _Run, job: HubJob, target: Any) -> HubCompile:
    with run.log.step("download-model") as step:
        folder = run.out / "compiled"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        path = run.client.download_model(target, folder / "model")
        run.outputs.append(path)
        step.artifact = path
    return HubCompile(job_id=job.job_id, url=job.url, options=run.config.full_compile_options,
                      device=run.config.device, target_model_id=str(getattr(target, "model_id", "")),
                      target_model=path.relative_to(run.out).as_posix(), bytes=path.stat().st_size,
                      sha256=sha256_file(path), model_options=run.config.model_compile_options,
                      quantize_io="--quantize_io" in run.config.full_compile_options.split())


def _compiled_io(run: _Run, job: HubJob, target: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The compiled model's inputs and outputs as AI Hub records them; hub errors surface."""
    with run.log.step("compiled-io") as step:
        io = run.client.io_spec(target)
        if io is None:
            raise HubError(f"AI Hub has no input/output spec for the compiled model of job {job.job_id}",
                           hint="rerun the same command (it resumes); open the job page if it persists: " + job.url)
        step.detail = _io_line(io)
    return io


def _share(run: _Run, job: HubJob) -> HubShare:
    """modify_sharing once per job: a rerun finds the share in hub_jobs.json and does not repeat it."""
    emails = list(run.config.share)
    shares = run.state.data["shares"]
    done = shares.get(job.job_id)
    with run.log.step("share") as step:
        if done is not None and set(emails) <= set(done["emails"]):
            step.detail = f"{job.kind} job {job.job_id} already shared with {', '.join(emails)} ({done['at']})"
            return HubShare(job_id=job.job_id, kind=job.kind, emails=emails, at=done["at"], already_shared=True)
        run.client.share(job, emails)
        shares[job.job_id] = {"emails": sorted({*emails, *(done or {}).get("emails", [])}), "at": _now()}
        run.state.save()
        step.detail = f"{job.kind} job {job.job_id} shared with {', '.join(emails)}"
    return HubShare(job_id=job.job_id, kind=job.kind, emails=emails, at=shares[job.job_id]["at"])


def _share_compile_job(run: _Run, model: _DeviceModel) -> HubShare | None:
    if not run.config.share:
        return None
    if model.compile_job is None:
        run.log.warn("no compile job to share: the submission form asks for a compile job id. Sharing the "
                     "profile job instead; compile the ONNX or .aimet model to get a submittable id.")
        return None
    return _share(run, model.compile_job)


def _share_profile_job(run: _Run, model: _DeviceModel, profiled: tuple[HubJob, HubProfile] | None) -> HubShare | None:
    if not run.config.share or model.compile_job is not None or profiled is None:
        return None
    return _share(run, profiled[0])


def _profile(run: _Run, model: _DeviceModel) -> tuple[HubJob, HubProfile] | None:
    config = run.config
    if not config.profile:
        return None
    options = config.device_job_options(config.profile_options)
    key = {"model": model.key, "device": config.device, "options": options}
    with run.log.step("profile") as step:
        job = _submit_or_resume(run, "profile", key, lambda: run.client.submit_profile(
            model.handle, config.device, options, run.job_name, wait_s=config.timeout))
        _wait(run, job)
        profile = run.client.profile(job)
        path = run.out / "profile.json"
        path.write_text(json.dumps(profile, indent=1) + "\n")
        run.outputs.append(path)
        summary = summarize_profile(profile)
        step.detail = _profile_line(job, summary)
        step.artifact = path
    _warn_profile(summary, run.log)
    return job, HubProfile(job_id=job.job_id, url=job.url, options=options, **summary)


def _inference(run: _Run, model: _DeviceModel) -> HubInference | None:
    """The frames through the device, their outputs saved, then measured against the host and GT."""
    config = run.config
    if not config.inference:
        return None
    if config.data_folder is None:
        run.log.info("no --eval-data or --images: skipping the on-device inference step")
        return None
    frames = _load_frames_step(run)
    (inputs, outputs), source = _device_io(run, model)
    data = _device_data(run, frames, inputs[0])
    job, device = _inference_job(run, model, data, outputs[0], len(frames.names))
    _save_device_outputs(run, frames, device)
    vs_host, host = _host_fidelity(run, frames, device)
    ground_truth = _ground_truth(run, frames, host is not None) if frames.frames is not None else None
    return HubInference(job_id=job.job_id, url=job.url, options=config.device_job_options(config.inference_options),
                        dataset_id=_dataset_id(run, data), data=frames.description, input_dtype=data.dtype,
                        outputs="device_outputs", vs_host=vs_host, ground_truth=ground_truth, io_source=source)


def _results(run: _Run, model: _DeviceModel, profiled: tuple[HubJob, HubProfile] | None,
             inference: HubInference | None, shared: HubShare | None) -> HubResults:
    return HubResults(input=run.artifact.record(run.input_sha256), device=run.config.device,
                      runtime=run.config.runtime_label, target_fps=TARGET_FPS, jobs=run.state.job_records(),
                      compile=model.compile, profile=profiled[1] if profiled else None, inference=inference,
                      share=shared, qairt_version=run.config.qairt_version)


def _write(run: _Run, results: HubResults) -> Path:
    artifact = run.artifact
    inputs = {"artifact": {"path": os.fspath(artifact.upload), "sha256": run.input_sha256,
                           "source_manifest": os.fspath(artifact.source_dir / MANIFEST_NAME)
                           if artifact.source_dir else None}}
    if artifact.host_reference is not None:
        inputs["host_reference"] = {"path": os.fspath(artifact.host_reference),
                                    "sha256": sha256_file(artifact.host_reference)}
    outputs = [run.out / STATE_NAME, *(p for p in run.outputs if p.is_file())]
    return write_manifest(run.out, stage=STAGE, config=run.config.as_dict(), inputs=inputs, outputs=outputs,
                          timings=run.log.timings, results=results)


def _report_submission(run: _Run, model: _DeviceModel) -> None:
    """What the submission form needs: the compile job id, whether its model meets the Track 3
    contract, and whether the organizers can see it."""
    if model.compile_job is None:
        return
    job, log = model.compile_job, run.log
    log.info(f"compile job id (the submission form asks for it): {job.job_id}  {job.url}")
    contract = model.compile.contract
    if contract.ok:
        log.info(f"ready to submit: the compiled model's I/O meets the Track 3 contract ({_io_line(model.io)})")
    else:
        log.warn(f"NOT ready to submit: the compiled model's I/O breaks the Track 3 contract: "
                 f"{'; '.join(contract.problems)}")
    record = run.state.data["shares"].get(job.job_id)
    if record is not None:
        log.info(f"compile job {job.job_id} is shared with {', '.join(record['emails'])} (since {record['at']})")
    else:
        log.warn(f"compile job {job.job_id} is not shared: the organizers cannot open it until it is; rerun with "
                 f"--share {ORGANIZERS} (their address; the rerun submits nothing new)")


def run_hub(config: HubConfig, client: HubClient | None = None, log: StageLog | None = None) -> HubResult:
    """Upload, compile, share, profile and run on the device as configured; resumable; manifest last."""
    log = log or StageLog(STAGE)
    client = client or HubClient()
    _preflight(config, client, log)
    out = _prepare_output(config)
    run = _Run(config, client, log, out, HubState(out / STATE_NAME), _hash_input(config, log))
    _note_options(config, log)
    model = _device_model(run)
    shared = _share_compile_job(run, model)
    profiled = _profile(run, model)
    shared = shared or _share_profile_job(run, model, profiled)
    inference = _inference(run, model)
    results = _results(run, model, profiled, inference, shared)
    manifest_path = _write(run, results)
    _report_submission(run, model)
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(out)}")
    return HubResult(out, manifest_path, results, read_manifest(out))


# -- The I/O the device sees, and the Track 3 contract ----------------------------------------------------------------

def _io_line(io: tuple[list[TensorInfo], list[TensorInfo]]) -> str:
    def one(t: TensorInfo) -> str:
        quantized = f" scale {t.scale:g} zero point {t.zero_point:g}" if t.scale is not None else ""
        return f"{t.name} {t.dtype}{list(t.shape) if t.shape else ''}{quantized}"

    return ", ".join(one(t) for t in io[0]) + " -> " + ", ".join(one(t) for t in io[1])


def _tensor_problems(side: str, tensors: list[TensorInfo], spec) -> list[str]:
    """One side of the I/O against the contract: a single tensor, its name and shape, and a float32
    dtype or a quantized one whose scale and zero point cover the contract's value range."""
    if len(tensors) != 1:
        return [f"{len(tensors)} {side}s, the contract has one ({spec.name!r})"]
    tensor, problems = tensors[0], []
    if tensor.name != spec.name:
        problems.append(f"{side} is named {tensor.name!r}, the contract says {spec.name!r}")
    if tensor.shape is not None and tuple(tensor.shape) != spec.concrete_shape(1):
        problems.append(f"{side} shape {tuple(tensor.shape)}, the contract says {spec.concrete_shape(1)}")
    if tensor.dtype.startswith("float"):
        if tensor.dtype != spec.dtype:
            problems.append(f"{side} dtype {tensor.dtype}, the contract says {spec.dtype}")
        return problems
    if tensor.scale is None:
        return [*problems, f"{side} is {tensor.dtype} without a scale and zero point (not quantized I/O)"]
    limits = np.iinfo(np.dtype(tensor.dtype))
    zero = tensor.zero_point or 0.0
    low, high = tensor.scale * (limits.min - zero), tensor.scale * (limits.max - zero)
    want_low, want_high = spec.value_range
    if low > want_low + tensor.scale or high < want_high - tensor.scale:
        problems.append(f"{side} {tensor.dtype} with scale {tensor.scale:g} and zero point {zero:g} covers "
                        f"[{low:g}, {high:g}], the contract's range is [{want_low:g}, {want_high:g}]")
    return problems


def _contract_check(io: tuple[list[TensorInfo], list[TensorInfo]]) -> HubContract:
    problems = _tensor_problems("input", io[0], TRACK3.input) + _tensor_problems("output", io[1], TRACK3.output)
    return HubContract(ok=not problems, problems=problems, inputs=[t.describe() for t in io[0]],
                       outputs=[t.describe() for t in io[1]])


def _graph_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """An ONNX graph's inputs and outputs (a symbolic batch axis counts as 1)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}

    def tensors(values) -> list[TensorInfo]:
        return [TensorInfo(v.name, np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                           tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim))
                for v in values if v.name not in weights]

    return tensors(graph.input), tensors(graph.output)


def _hub_io(run: _Run, model: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The uploaded model's I/O from AI Hub: a model fresh from an upload has none until the hub has
    read the file, so ask again every --poll seconds, within --timeout."""
    started = time.monotonic()
    while (io := run.client.io_spec(model)) is None:
        if time.monotonic() - started >= run.config.timeout:
            raise HubError(f"AI Hub has not read the inputs and outputs of model {model.model_id} within "
                           f"--timeout {run.config.timeout:g}s",
                           hint="rerun later (it resumes); for a context binary, pass its htp-check folder, whose "
                                "companion ONNX declares them")
        time.sleep(run.config.poll)
    return io


def _device_io(run: _Run, model: _DeviceModel) -> tuple[tuple[list[TensorInfo], list[TensorInfo]], str]:
    """What the device jobs' model takes and returns, and where that was read: the compiled model on
    the hub, the artifact's own graph, or the hub's record of the upload."""
    with run.log.step("device-io") as step:
        if model.io is not None:
            io, source = model.io, "the compiled model on AI Hub"
        elif run.artifact.io_onnx is not None:
            io, source = _graph_io(run.artifact.io_onnx), f"the graph of {run.artifact.io_onnx.name}"
        else:
            io, source = _hub_io(run, model.handle), "AI Hub's record of the upload"
        if not io[0] or not io[1]:
            raise HubError(f"the model on the device has {len(io[0])} inputs and {len(io[1])} outputs ({source})",
                           hint="export the model with the Track 3 contract (one input, one output)")
        step.detail = f"{_io_line(io)} (from {source})"
    return io, source


# -- Profile figures --------------------------------------------------------------------------------------------------

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


def _profile_line(job: HubJob, summary: dict) -> str:
    counts = summary["compute_units"]
    return (f"job {job.job_id}: {summary['estimated_inference_time_ms']:.2f} ms = {summary['fps']:.0f} FPS, "
            f"layers NPU {counts['NPU']} / GPU {counts['GPU']} / CPU {counts['CPU']}")


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


# -- On-device inference ----------------------------------------------------------------------------------------------

@dataclass
class _Frames:
    """The images sent to the device: ids, where each output goes, the pixels, and their hash."""

    names: list[tuple[str, str]]  # (set, frame id)
    images: np.ndarray  # (N, 3, 480, 640) float32 in [0, 255]
    sha256: str
    frames: list | None  # rgbd Frames (for ground truth), None for plain photos
    description: dict


class _DeviceData(NamedTuple):
    """The frames as the device's model takes them, and the content key the inference job records
    (the same on every run: it depends on the frames and the model's input, not on the upload)."""

    key: str
    name: str
    dtype: str
    arrays: np.ndarray


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
            raise ConfigError(f"no JPG/PNG images in --images {root}", hint="pass a folder of .jpg/.png photos")
        names = [("images", path.relative_to(root).with_suffix("").as_posix().replace("/", "__")) for path in files]
        images = load_contract_batch(files)
        frames = None
    description = {"path": os.fspath(root.resolve()), "kind": "rgbd" if frames is not None else "images",
                   "frames": len(names), "max_frames": config.max_frames}
    return _Frames(names, images, sha256_of_files(files, root), frames, description)


def _load_frames_step(run: _Run) -> _Frames:
    with run.log.step("load-frames") as step:
        frames = _load_frames(run.config)
        step.detail = f"{len(frames.names)} frames from {run.config.data_folder}"
    return frames


def _to_device(images: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """Contract images in the model's input dtype (quantized when compiled with --quantize_io)."""
    if tensor.dtype.startswith("float"):
        return images.astype(tensor.dtype)
    if tensor.scale is None:
        raise HubError(f"the model's input {tensor.name!r} is {tensor.dtype} without a scale",
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


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _device_data(run: _Run, frames: _Frames, tensor: TensorInfo) -> _DeviceData:
    arrays = _to_device(frames.images, tensor)
    key = _digest({"frames": frames.sha256, "input": tensor.name, "dtype": str(arrays.dtype), "scale": tensor.scale,
                   "zero_point": tensor.zero_point, "ids": frames.names})
    return _DeviceData(key, tensor.name, str(arrays.dtype), arrays)


def _dataset_handle(run: _Run, data: _DeviceData) -> Any:
    """The frames on the hub: --dataset-id, the upload recorded for the same content while the hub
    keeps it, or a new upload. Only needed when an inference job is submitted."""
    datasets = run.state.data["datasets"]
    with run.log.step("dataset") as step:
        dataset_id = run.config.dataset_id or datasets.get(data.key, {}).get("dataset_id")
        dataset = run.client.get_dataset(dataset_id) if dataset_id else None
        if dataset is None and run.config.dataset_id:
            raise HubError(f"dataset {run.config.dataset_id} is gone or expired on AI Hub",
                           hint="drop --dataset-id to upload the frames again (hub datasets expire after 30 days)")
        if dataset is None:
            if dataset_id:
                run.log.info(f"dataset {dataset_id} is gone or expired on AI Hub: uploading the frames again")
            dataset = run.client.upload_dataset({data.name: [array[None] for array in data.arrays]},
                                                name=f"lpcv-{len(data.arrays)}frames")
            dataset_id = str(dataset.dataset_id)
            datasets[data.key] = {"dataset_id": dataset_id, "frames": len(data.arrays), "uploaded": _now()}
            run.state.save()
        step.detail = f"dataset {dataset_id}, {len(data.arrays)} x {tuple(data.arrays.shape[1:])} {data.dtype}"
    return dataset


def _dataset_id(run: _Run, data: _DeviceData) -> str:
    return run.config.dataset_id or run.state.data["datasets"].get(data.key, {}).get("dataset_id", "")


def _inference_job(run: _Run, model: _DeviceModel, data: _DeviceData, tensor: TensorInfo,
                   count: int) -> tuple[HubJob, np.ndarray]:
    config = run.config
    options = config.device_job_options(config.inference_options)
    key = {"model": model.key, "device": config.device, "dataset": data.key, "options": options}
    with run.log.step("inference") as step:
        job = _submit_or_resume(run, "inference", key, lambda: run.client.submit_inference(
            model.handle, config.device, _dataset_handle(run, data), options, run.job_name, wait_s=config.timeout))
        _wait(run, job)
        device = _device_outputs(run.client, job, tensor, count)
        step.detail = f"job {job.job_id}, {len(device)} outputs"
    return job, device


def _device_outputs(client: HubClient, job: HubJob, tensor: TensorInfo, count: int) -> np.ndarray:
    outputs = client.output_data(job)
    name = tensor.name if tensor is not None and tensor.name in outputs else TRACK3.output.name
    if name not in outputs:
        if len(outputs) != 1:
            raise HubError(f"inference job {job.job_id} returned outputs {sorted(outputs)}; none is "
                           f"{TRACK3.output.name!r}", hint="export the model with the contract output name")
        name = next(iter(outputs))
    arrays = outputs[name]
    if len(arrays) != count:
        raise HubError(f"inference job {job.job_id} returned {len(arrays)} outputs for {count} frames",
                       hint="rerun with --force to resubmit the inference job")
    return np.concatenate([_from_device(array, tensor) for array in arrays])


def _save_outputs(folder: Path, names: list[tuple[str, str]], outputs: np.ndarray) -> list[Path]:
    paths = []
    for (set_name, frame_id), output in zip(names, outputs):
        path = folder / set_name / f"{frame_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, output.reshape(TRACK3.output.concrete_shape(1)).astype(np.float32))
        paths.append(path)
    return paths


def _save_device_outputs(run: _Run, frames: _Frames, device: np.ndarray) -> None:
    """device_outputs/ afresh; the host outputs and scores of an earlier run go with it."""
    for folder in ("device_outputs", "host_outputs", "eval"):
        shutil.rmtree(run.out / folder, ignore_errors=True)
    run.outputs += _save_outputs(run.out / "device_outputs", frames.names, device)


def _host_fidelity(run: _Run, frames: _Frames, device: np.ndarray) -> tuple[HubHostFidelity | None, np.ndarray | None]:
    """ONNX Runtime on the host reference, same frames, against the device: SQNR, max abs diff and
    the Track 3 F-score with the host output as the reference."""
    from lpcv_depth.track3_metric import FSCORE, fscore_against_reference
    from lpcv_depth.verify import OrtRunner, sqnr_db

    reference = run.artifact.host_reference
    if reference is None:
        run.log.info("no host reference ONNX (a .bin without --reference-onnx): skipping device vs host")
        return None, None
    with run.log.step("host-reference") as step:
        host = OrtRunner(reference, threads=run.config.threads).run(frames.images)
        run.outputs += _save_outputs(run.out / "host_outputs", frames.names, host)
        step.detail = f"ONNX Runtime on {reference.name}, {len(host)} frames"
    if host.shape != device.shape:
        raise HubError(f"device outputs {device.shape} and host outputs {host.shape} do not line up")
    with run.log.step("device-vs-host") as step:
        per_frame = [fscore_against_reference(d, h, workers=run.config.threads or -1)[FSCORE]
                     for d, h in zip(device, host)]
        fidelity = HubHostFidelity(reference=os.fspath(reference), sqnr_db=sqnr_db(host, device),
                                   max_abs_diff=float(np.max(np.abs(host - device))),
                                   fscore_vs_host=float(np.mean(per_frame)), fscore_vs_host_per_frame=per_frame)
        step.detail = (f"SQNR {fidelity.sqnr_db:.1f} dB, max abs {fidelity.max_abs_diff:.4f}, "
                       f"F-score vs host {fidelity.fscore_vs_host:.1f}")
    return fidelity, host


@contextmanager
def _scored_frames(run: _Run, frames: _Frames) -> Iterator[Path]:
    """The RGB-D folder evaluate should score: --eval-data, or with --max-frames a folder linking
    only the frames sent to the device (removed afterwards)."""
    if run.config.max_frames is None:
        yield Path(run.config.eval_data)
        return
    subset = run.out / ".eval-frames"
    _link_frames(frames.frames, subset)
    try:
        yield subset
    finally:
        shutil.rmtree(subset, ignore_errors=True)


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


def _evaluate(run: _Run, data: Path, label: str) -> EvaluateGroup:
    """The evaluate stage on <label>_outputs/, into eval/<label>/; its overall scores."""
    from lpcv_depth.stages.evaluate import run_evaluate

    folder = run.out / "eval" / label
    run_evaluate(EvaluateConfig(data=data, predictions=run.out / f"{label}_outputs", out=folder, num_vis=2,
                                threads=run.config.threads, median=run.config.median),
                 StageLog(f"{STAGE}/evaluate-{label}"))
    manifest = Manifest.read(folder, stage="evaluate")
    run.outputs += [folder / MANIFEST_NAME, *(folder / output.path for output in manifest.outputs)]
    return manifest.results_as(EvaluateResults).overall


def _ground_truth(run: _Run, frames: _Frames, with_host: bool) -> HubGroundTruth:
    """Device (and host) outputs through the evaluate stage, on exactly the frames sent to the device."""
    from lpcv_depth.track3_metric import FSCORE

    with _scored_frames(run, frames) as data, run.log.step("ground-truth") as step:
        device = _evaluate(run, data, "device")
        host = _evaluate(run, data, "host") if with_host else None
        drop = host.metrics[FSCORE] - device.metrics[FSCORE] if host is not None else None
        step.detail = f"F@0.1 device {device.metrics[FSCORE]:.2f}" + (
            f", host {host.metrics[FSCORE]:.2f}, drop {drop:.2f}" if host is not None else "")
    return HubGroundTruth(frames=device.scored, skipped=device.skipped, device=device.metrics,
                          host=host.metrics if host is not None else None, fscore_drop=drop)


# -- Command line -----------------------------------------------------------------------------------------------------

def next_command(results: list[HubResult]) -> str:
    """After fp32 and int8 runs: the comparison; after one of them: the other one."""
    sources = {r.results.input.kind: r.results.input.source_dir for r in results}
    if "export" in sources and "ptq" in sources:
        return command_line("compare", "--fp32", display_path(sources["export"]),
                            "--int8", display_path(sources["ptq"]))
    if "export" in sources:
        ptq = display_path(Path(sources["export"]).parent / "ptq-w8a8")
        return command_line(STAGE, ptq) + "  (the int8 model from the ptq stage, same flags)"
    if "ptq" in sources:
        fp32 = Manifest.read(sources["ptq"], stage="ptq", verify=False).config.get("fp32")
        return command_line("compare", "--fp32", display_path(fp32) if fp32 else "build/<model>/export",
                            "--int8", display_path(sources["ptq"]))
    return command_line("evaluate", "--predictions", display_path(results[-1].out_dir / "device_outputs"),
                        "--data", "DATA_DIR")


def _artifact_arguments(parser) -> None:
    parser.add_argument("artifacts", type=Path, nargs="*", metavar="ARTIFACT",
                        help="export, ptq or htp-check folder, .onnx, .aimet folder or QNN context binary .bin; "
                             "several run one after the other with the same flags")


def _configs(args) -> list[HubConfig]:
    """One config per artifact, every one checked before anything is uploaded."""
    artifacts = [*args.artifacts, *([args.artifact] if args.artifact is not None else [])]
    if not artifacts:
        raise ConfigError("no artifact to send to AI Hub", hint=_no_artifact_hint())
    if args.out is not None and len(artifacts) > 1:
        raise ConfigError("--out takes one artifact", hint="drop --out to get one folder per artifact")
    return [config_from_args(HubConfig, args, artifact=artifact) for artifact in artifacts]


def _exit_status(err: BaseException, out: Path | None) -> int:
    where = f" in {display_path(out / STATE_NAME)}" if out is not None else ""
    return exit_status(STAGE, err, f"submitted job ids are recorded{where}: rerun the same command to resume")


def _run_artifacts(args) -> int:
    """`lpcv-depth hub A B ...`: each artifact in turn with the same flags and one client."""
    log = StageLog(STAGE)
    out = None
    try:
        configs = _configs(args)
        client = HubClient()
        results = []
        for config in configs:
            out = config.destination
            results.append(run_hub(config, client, log))
    except (LpcvError, KeyboardInterrupt) as err:
        return _exit_status(err, out)
    log.info(f"next: {next_command(results)}")
    return ExitCode.OK


def _run_one(config: HubConfig, log: StageLog | None = None) -> HubResult:
    """The stage as `lpcv-depth run` calls it: one artifact, the real client."""
    return run_hub(config, log=log)


def _next_hint(result: HubResult) -> str:
    return next_command([result])


DEFINITION = StageDefinition(name=STAGE, config=HubConfig, run=_run_one, description=__doc__, next_hint=_next_hint,
                             extra_arguments=_artifact_arguments, before_run=_run_artifacts)
