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
import json
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lpcv_depth.backends.ai_hub import S24_DEVICE, HubClient, HubError, HubJob, TensorInfo
from lpcv_depth.errors import ConfigError, LpcvError, OutputDirError, UnknownModelError
from lpcv_depth.manifest import (MANIFEST_NAME, Manifest, read_manifest, sha256_file, sha256_of_files,
                                 write_manifest)
from lpcv_depth.options import config_from_args, inherit, option
from lpcv_depth.results import INT8_STAGES, HubCompile, HubInference, HubProfile, HubResults, HubShare
from lpcv_depth.schema import to_json
from lpcv_depth.stage import StageDefinition, StageLog, command_line, display_path, refuse_inputs
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.hub_artifacts import ARTIFACT_HINT, HubArtifact, exported_model, resolve_artifact, stage_of
from lpcv_depth.stages.hub_device import contract_check, io_line
from lpcv_depth.stages.hub_inference import run_on_device
from lpcv_depth.stages.hub_jobs import (STAGE, STATE_NAME, ArtifactRun, DeviceModel, HubState, now_utc,
                                        submit_or_resume, upload_artifact, wait_for)
from lpcv_depth.stages.hub_report import TARGET_FPS, profile_line, summarize_profile, warn_profile

__all__ = ["HubConfig", "HubPlan", "HubOutput", "HubArtifact", "HubState", "run_hub", "run_in_turn", "resolve_inputs",
           "resolve_artifact", "summarize_profile", "next_command", "STATE_NAME", "RUNTIMES", "DEFINITION"]

RUNTIMES = ("qnn_context_binary", "tflite", "qnn_dlc", "onnx")
DEFAULT_PROFILE_OPTIONS = "--max_profiler_iterations 20"  # what the organizers' run_profile.py uses
ORGANIZERS = "lowpowervision@gmail.com"


def _no_artifact_hint() -> str:
    return f"e.g. {command_line(STAGE, 'build/fastdepth/export')}; " + ARTIFACT_HINT


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
        """Values only: the artifact is resolved (and an unusable one refused) by the run's first step."""
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

    def _check_data(self) -> None:
        if self.eval_data is not None and self.images is not None:
            raise ConfigError("give --eval-data (RGB-D, scored against ground truth) or --images (photos), not both")
        for name in ("eval_data", "images"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} folder not found: {folder}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")

    @property
    def data_folder(self) -> Path | None:
        return Path(self.eval_data) if self.eval_data is not None else Path(self.images) if self.images else None

    @property
    def destination(self) -> Path:
        """--out, else hub-<label>-<runtime> beside the artifact's stage folder; without --out this
        reads the artifact (the run resolves it once, in its first step, and writes where this says)."""
        if self.out is not None:
            return Path(self.out)
        return HubPlan(self, resolve_artifact(Path(self.artifact), self.reference_onnx)).destination


@dataclass(frozen=True)
class HubPlan:
    """A config with its artifact resolved: what is sent, how it is compiled and run, where it is
    written. Built by the run's first step (resolve_inputs)."""

    config: HubConfig
    artifact: HubArtifact

    def check(self) -> None:
        """What the config and the artifact cannot do together."""
        if not self.config.compile and self.artifact.kind in ("ptq", "aimet"):
            raise ConfigError("AI Hub cannot run an AIMET model without compiling it", hint="drop --no-compile")

    @property
    def compiles(self) -> bool:
        return self.config.compile and self.artifact.compilable

    @property
    def runtime_label(self) -> str:
        if self.compiles:
            return self.config.runtime
        return "qnn_context_binary" if self.artifact.kind == "qnn_context_binary" else "uncompiled"

    @cached_property
    def model_compile_options(self) -> str:
        """What the model's spec adds to the compile of this artifact (ModelSpec.hub_options_for its preset)."""
        name = self.artifact.model_name
        if not self.compiles or name is None:
            return ""
        from lpcv_depth.models import get_spec

        # A model given by factory reference is registered under no name: its export's --model finds it.
        for model in dict.fromkeys((name, exported_model(self.artifact.source_dir))):
            try:
                return get_spec(model).hub_options_for(self.artifact.preset) if model else ""
            except UnknownModelError:  # an .aimet folder named after an unregistered model
                continue
        return ""

    @property
    def quantize_io_applies(self) -> bool:
        """--quantize-io means something only for a quantized model that is compiled here."""
        return self.config.quantize_io and self.compiles and self.artifact.precision != "fp32"

    @property
    def full_compile_options(self) -> str:
        """The exact options string the compile job gets (and the manifest records)."""
        words = ["--target_runtime", self.config.runtime, *self.model_compile_options.split(),
                 *self.config.compile_options.split()]
        if self.quantize_io_applies and "--quantize_io" not in words:
            words.append("--quantize_io")
        return " ".join(words)

    @property
    def qairt_version(self) -> str | None:
        """The QAIRT version jobs that run an uploaded context binary as-is need: the major.minor of the
        QNN that built it (from the htp-check manifest); None when something else is run or it is unknown."""
        artifact = self.artifact
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
    def destination(self) -> Path:
        if self.config.out is not None:
            return Path(self.config.out)
        artifact = self.artifact
        base = artifact.source_dir.parent if artifact.source_dir is not None else Path(self.config.artifact).parent
        return base / f"hub-{artifact.label}-{self.runtime_label}"

    @property
    def inputs(self) -> list[Path]:
        """Everything the run reads: --out may not be, hold or lie inside any of them."""
        candidates = (Path(self.config.artifact), *self.artifact.paths, self.config.eval_data, self.config.images)
        return [Path(p) for p in candidates if p is not None]

    def as_dict(self) -> dict:
        """The manifest's config: the options as given, where the run writes, and what they came to."""
        data = to_json(self.config)
        data["destination"] = os.fspath(self.destination)
        data["full_compile_options"] = self.full_compile_options if self.compiles else None
        data["model_compile_options"] = self.model_compile_options
        data["quantize_io_applied"] = self.quantize_io_applies
        return data


@dataclass(frozen=True)
class HubOutput:
    """What a finished run of the hub stage hands back: where its output folder is, and what it found."""

    out_dir: Path
    manifest_path: Path
    results: HubResults
    manifest: dict

    @property
    def compile_job_id(self) -> str | None:
        return self.results.compile.job_id if self.results.compile is not None else None


# -- The steps --------------------------------------------------------------------------------------------------------

def resolve_inputs(config: HubConfig, log: StageLog) -> tuple[HubPlan, str]:
    """The stage's first step: the artifact resolved once (ConfigError, exit 2, if it is unusable)
    and the upload hashed (what hub_jobs.json keys the upload and the compile job by)."""
    plan = HubPlan(config, resolve_artifact(Path(config.artifact), config.reference_onnx))
    plan.check()
    return plan, _hash_input(plan.artifact.upload, log)


def _hash_input(path: Path, log: StageLog) -> str:
    with log.step("hash-input") as step:
        if path.is_dir():
            digest = sha256_of_files(sorted(p for p in path.rglob("*") if p.is_file()), path)
        else:
            digest = sha256_file(path)
        step.detail = digest[:12]
    return digest


def _preflight(plan: HubPlan, client: HubClient, log: StageLog) -> None:
    config, artifact = plan.config, plan.artifact
    with log.step("preflight") as step:
        client.preflight(network=config.preflight)
        step.detail = f"{artifact.kind} {artifact.upload.name} ({artifact.precision}) -> {config.device}"
        if not config.preflight:
            step.detail += " (network probe skipped: --no-preflight)"


def _prepare_output(plan: HubPlan) -> Path:
    """Own the folder, and make sure it does not look finished until this run writes its manifest.

    Unlike a StagingDir the folder is written in place: hub_jobs.json must survive a failed or
    interrupted run, because it is what the rerun resumes from."""
    folder = plan.destination.resolve()
    refuse_inputs(folder, plan.inputs)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output path {folder} exists and is not a folder", hint="pass a different --out")
    ours = (folder / STATE_NAME).is_file() or stage_of(folder) == STAGE
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


def _note_options(plan: HubPlan, log: StageLog) -> None:
    """Say which of the run-wide options this artifact gets, and why not the others."""
    config, artifact = plan.config, plan.artifact
    if config.quantize_io and not plan.quantize_io_applies:
        why = "a float model has no quantized I/O" if plan.compiles else "nothing is compiled"
        log.info(f"--quantize-io not applied to {artifact.label}: {why}")
    if artifact.int4_weights_as_int8:
        log.warn(f"{artifact.upload.name} holds the {artifact.int4_weights_as_int8} 4-bit weights of its model in INT8 "
                 "storage (htp-check's emulator form): its profile measures 8-bit-weight kernels. For the 4-bit "
                 "model on the phone, send the ptq folder (its .aimet encodings)")
    if plan.qairt_version is not None:
        log.info(f"context binary built with QNN {artifact.qnn_sdk_version}: its jobs run on --qairt_version "
                 f"{plan.qairt_version} (from the htp-check manifest)")
    elif artifact.kind == "qnn_context_binary" and not plan.compiles and \
            "--qairt_version" not in config.profile_options + config.inference_options:
        log.warn(f"no QNN version recorded for {artifact.upload.name}: AI Hub runs it on its default QAIRT, which "
                 "may not load it; add --qairt_version X.Y (the QNN that built it) to --profile-options and "
                 "--inference-options")


def _device_model(run: ArtifactRun) -> DeviceModel:
    if run.plan.compiles:
        job, target = _compile_job(run)
        compiled = _download_compiled(run, job, target)
        io = _compiled_io(run, job, target)
        contract = contract_check(io)
        return DeviceModel(target, job.job_id, job, dataclasses.replace(compiled, contract=contract), io)
    if run.config.compile and not run.artifact.compilable:
        run.log.info("a precompiled QNN context binary: profiling it as-is, no compile job")
    return DeviceModel(upload_artifact(run), f"uploaded:{run.input_sha256}", None, None)


def _compile_job(run: ArtifactRun) -> tuple[HubJob, Any]:
    config = run.config
    options = run.plan.full_compile_options
    key = {"input_sha256": run.input_sha256, "model_id": config.model_id, "device": config.device, "options": options}
    with run.log.step("compile") as step:
        job = submit_or_resume(run, "compile", key, lambda: run.client.submit_compile(
            upload_artifact(run), config.device, options, run.job_name, wait_s=config.timeout))
        wait_for(run, job)
        target = run.client.target_model(job)
        step.detail = f"job {job.job_id}, {options}"
    return job, target


def _download_compiled(run: ArtifactRun, job: HubJob, target: Any) -> HubCompile:
    with run.log.step("download-model") as step:
        folder = run.out / "compiled"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        path = run.client.download_model(target, folder / "model")
        run.outputs.append(path)
        step.artifact = path
    return HubCompile(job_id=job.job_id, url=job.url, options=run.plan.full_compile_options,
                      device=run.config.device, target_model_id=str(getattr(target, "model_id", "")),
                      target_model=path.relative_to(run.out).as_posix(), bytes=path.stat().st_size,
                      sha256=sha256_file(path), model_options=run.plan.model_compile_options,
                      quantize_io="--quantize_io" in run.plan.full_compile_options.split())


def _compiled_io(run: ArtifactRun, job: HubJob, target: Any) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The compiled model's inputs and outputs as AI Hub records them; hub errors surface."""
    with run.log.step("compiled-io") as step:
        io = run.client.io_spec(target)
        if io is None:
            raise HubError(f"AI Hub has no input/output spec for the compiled model of job {job.job_id}",
                           hint="rerun the same command (it resumes); open the job page if it persists: " + job.url)
        step.detail = io_line(io)
    return io


def _share(run: ArtifactRun, job: HubJob) -> HubShare:
    """modify_sharing once per job: a rerun finds the share in hub_jobs.json and does not repeat it."""
    emails = list(run.config.share)
    shares = run.state.data["shares"]
    done = shares.get(job.job_id)
    with run.log.step("share") as step:
        if done is not None and set(emails) <= set(done["emails"]):
            step.detail = f"{job.kind} job {job.job_id} already shared with {', '.join(emails)} ({done['at']})"
            return HubShare(job_id=job.job_id, kind=job.kind, emails=emails, at=done["at"], already_shared=True)
        run.client.share(job, emails)
        shares[job.job_id] = {"emails": sorted({*emails, *(done or {}).get("emails", [])}), "at": now_utc()}
        run.state.save()
        step.detail = f"{job.kind} job {job.job_id} shared with {', '.join(emails)}"
    return HubShare(job_id=job.job_id, kind=job.kind, emails=emails, at=shares[job.job_id]["at"])


def _share_compile_job(run: ArtifactRun, model: DeviceModel) -> HubShare | None:
    if not run.config.share:
        return None
    if model.compile_job is None:
        run.log.warn("no compile job to share: the submission form asks for a compile job id. Sharing the "
                     "profile job instead; compile the ONNX or .aimet model to get a submittable id.")
        return None
    return _share(run, model.compile_job)


def _share_profile_job(run: ArtifactRun, model: DeviceModel,
                       profiled: tuple[HubJob, HubProfile] | None) -> HubShare | None:
    if not run.config.share or model.compile_job is not None or profiled is None:
        return None
    return _share(run, profiled[0])


def _profile(run: ArtifactRun, model: DeviceModel) -> tuple[HubJob, HubProfile] | None:
    config = run.config
    if not config.profile:
        return None
    options = run.plan.device_job_options(config.profile_options)
    key = {"model": model.key, "device": config.device, "options": options}
    with run.log.step("profile") as step:
        job = submit_or_resume(run, "profile", key, lambda: run.client.submit_profile(
            model.handle, config.device, options, run.job_name, wait_s=config.timeout))
        wait_for(run, job)
        profile = run.client.profile(job)
        path = run.out / "profile.json"
        path.write_text(json.dumps(profile, indent=1) + "\n")
        run.outputs.append(path)
        summary = summarize_profile(profile)
        step.detail = profile_line(job, summary)
        step.artifact = path
    warn_profile(summary, run.log)
    return job, HubProfile(job_id=job.job_id, url=job.url, options=options, **summary)


def _results(run: ArtifactRun, model: DeviceModel, profiled: tuple[HubJob, HubProfile] | None,
             inference: HubInference | None, shared: HubShare | None) -> HubResults:
    return HubResults(input=run.artifact.record(run.input_sha256), device=run.config.device,
                      runtime=run.plan.runtime_label, target_fps=TARGET_FPS, jobs=run.state.job_records(),
                      compile=model.compile, profile=profiled[1] if profiled else None, inference=inference,
                      share=shared, qairt_version=run.plan.qairt_version)


def _write(run: ArtifactRun, results: HubResults) -> Path:
    artifact = run.artifact
    inputs = {"artifact": {"path": os.fspath(artifact.upload), "sha256": run.input_sha256,
                           "source_manifest": os.fspath(artifact.source_dir / MANIFEST_NAME)
                           if artifact.source_dir else None}}
    if artifact.host_reference is not None:
        inputs["host_reference"] = {"path": os.fspath(artifact.host_reference),
                                    "sha256": sha256_file(artifact.host_reference)}
    outputs = [run.out / STATE_NAME, *(p for p in run.outputs if p.is_file())]
    return write_manifest(run.out, stage=STAGE, config=run.plan.as_dict(), inputs=inputs, outputs=outputs,
                          timings=run.log.timings, results=results)


def _report_submission(run: ArtifactRun, model: DeviceModel) -> None:
    """What the submission form needs: the compile job id, whether its model meets the Track 3
    contract, and whether the organizers can see it."""
    if model.compile_job is None:
        return
    job, log = model.compile_job, run.log
    log.info(f"compile job id (the submission form asks for it): {job.job_id}  {job.url}")
    contract = model.compile.contract
    if contract.ok:
        log.info(f"ready to submit: the compiled model's I/O meets the Track 3 contract ({io_line(model.io)})")
    else:
        log.warn(f"NOT ready to submit: the compiled model's I/O breaks the Track 3 contract: "
                 f"{'; '.join(contract.problems)}")
    record = run.state.data["shares"].get(job.job_id)
    if record is not None:
        log.info(f"compile job {job.job_id} is shared with {', '.join(record['emails'])} (since {record['at']})")
    else:
        log.warn(f"compile job {job.job_id} is not shared: the organizers cannot open it until it is; rerun with "
                 f"--share {ORGANIZERS} (their address; the rerun submits nothing new)")


def run_hub(config: HubConfig, client: HubClient | None = None, log: StageLog | None = None) -> HubOutput:
    """Upload, compile, share, profile and run on the device as configured; resumable; manifest last."""
    log = log or StageLog(STAGE)
    plan, input_sha256 = resolve_inputs(config, log)
    return _run_plan(plan, input_sha256, client or HubClient(), log)


def _run_plan(plan: HubPlan, input_sha256: str, client: HubClient, log: StageLog) -> HubOutput:
    _preflight(plan, client, log)
    out = _prepare_output(plan)
    run = ArtifactRun(plan, client, log, out, HubState(out / STATE_NAME), input_sha256)
    _note_options(plan, log)
    model = _device_model(run)
    shared = _share_compile_job(run, model)
    profiled = _profile(run, model)
    shared = shared or _share_profile_job(run, model, profiled)
    inference = run_on_device(run, model)
    results = _results(run, model, profiled, inference, shared)
    manifest_path = _write(run, results)
    _report_submission(run, model)
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(out)}")
    return HubOutput(out, manifest_path, results, read_manifest(out))


def run_in_turn(configs: tuple[HubConfig, ...], log: StageLog | None = None) -> tuple[HubOutput, ...]:
    """Several artifacts one after the other with the same flags and one client; every artifact is
    resolved before anything is uploaded."""
    log = log or StageLog(STAGE)
    resolved = [resolve_inputs(config, log) for config in configs]
    client = HubClient()
    return tuple(_run_plan(plan, input_sha256, client, log) for plan, input_sha256 in resolved)


def next_command(results: list[HubOutput]) -> str:
    """After fp32 and int8 runs: the comparison; after one of them: the other one."""
    sources = {r.results.input.kind: r.results.input.source_dir for r in results}
    if "export" in sources and "ptq" in sources:
        return command_line("compare", "--fp32", display_path(sources["export"]),
                            "--int8", display_path(sources["ptq"]))
    if "export" in sources:
        ptq = display_path(Path(sources["export"]).parent / "ptq-w8a8")
        return command_line(STAGE, ptq) + "  (the int8 model from the ptq stage, same flags)"
    if "ptq" in sources:
        int8 = Manifest.read(sources["ptq"], stage=INT8_STAGES, verify=False)
        export_manifest = (int8.inputs.get("export_manifest") or {}).get("path")  # qat records its export there
        fp32 = int8.config.get("fp32") or (Path(export_manifest).parent if export_manifest else None)
        return command_line("compare", "--fp32", display_path(fp32) if fp32 else "build/<model>/export",
                            "--int8", display_path(sources["ptq"]))
    return command_line("evaluate", "--predictions", display_path(results[-1].out_dir / "device_outputs"),
                        "--data", "DATA_DIR")


# -- Command line -----------------------------------------------------------------------------------------------------

def _artifact_arguments(parser) -> None:
    parser.add_argument("artifacts", type=Path, nargs="*", metavar="ARTIFACT",
                        help="export, ptq or htp-check folder, .onnx, .aimet folder or QNN context binary .bin; "
                             "several run one after the other with the same flags")


def _config_from_args(args) -> HubConfig | tuple[HubConfig, ...]:
    """`lpcv-depth hub A B ...`: one config per artifact, every one checked before anything runs."""
    artifacts = [*args.artifacts, *([args.artifact] if args.artifact is not None else [])]
    if not artifacts:
        raise ConfigError("no artifact to send to AI Hub", hint=_no_artifact_hint())
    if args.out is not None and len(artifacts) > 1:
        raise ConfigError("--out takes one artifact", hint="drop --out to get one folder per artifact")
    configs = tuple(config_from_args(HubConfig, args, artifact=artifact) for artifact in artifacts)
    return configs[0] if len(configs) == 1 else configs


def _run(config: HubConfig | tuple[HubConfig, ...], log: StageLog | None = None) -> HubOutput | tuple[HubOutput, ...]:
    """The stage as the CLI, `lpcv-depth run` and `search` call it: one artifact, or several in turn."""
    return run_in_turn(config, log) if isinstance(config, tuple) else run_hub(config, log=log)


def _next_hint(result: HubOutput | tuple[HubOutput, ...]) -> str:
    return next_command(list(result) if isinstance(result, tuple) else [result])


def _interrupted(config: HubConfig | tuple[HubConfig, ...]) -> str:
    """After Ctrl+C or SIGTERM: where the submitted job ids are, which the rerun resumes from."""
    try:
        where = ", ".join(display_path(c.destination / STATE_NAME)
                          for c in (config if isinstance(config, tuple) else (config,)))
    except LpcvError:  # an artifact that no longer resolves: nothing was submitted for it
        where = ""
    return f"submitted job ids are recorded{' in ' + where if where else ''}: rerun the same command to resume"


DEFINITION = StageDefinition(name=STAGE, config=HubConfig, run=_run, description=__doc__, next_hint=_next_hint,
                             extra_arguments=_artifact_arguments, config_from_args=_config_from_args,
                             interrupted=_interrupted)
