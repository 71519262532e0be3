"""The hub stage's plumbing: hub_jobs.json (uploads, job ids and shares, rewritten the moment
anything is submitted: what a rerun resumes from), what the steps of one artifact's run share, and
the submit-or-resume and wait that every job goes through."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from lpcv_depth.backends.ai_hub import HubClient, HubJob, HubJobFailedError, HubNotFoundError, TensorInfo
from lpcv_depth.files import write_text_atomically
from lpcv_depth.results import HubCompile, HubJobRecord
from lpcv_depth.stage import StageLog

if TYPE_CHECKING:
    from lpcv_depth.stages.hub import HubConfig, HubPlan
    from lpcv_depth.stages.hub_artifacts import HubArtifact

__all__ = ["HubState", "ArtifactRun", "DeviceModel", "upload_artifact", "submit_or_resume", "wait_for", "now_utc",
           "STAGE", "STATE_NAME"]

STAGE = "hub"
STATE_NAME = "hub_jobs.json"


class HubState:
    """hub_jobs.json: uploads and job ids, rewritten atomically the moment anything is submitted."""

    def __init__(self, path: Path):
        self.path = path
        empty = {"version": 1, "models": {}, "datasets": {}, "jobs": {}, "replaced": [], "shares": {}}
        self.data = {**empty, **json.loads(path.read_text())} if path.is_file() else empty

    def save(self) -> None:
        write_text_atomically(self.path, json.dumps(self.data, indent=2) + "\n")

    def job(self, kind: str) -> dict | None:
        return self.data["jobs"].get(kind)

    def record_job(self, kind: str, key: dict, job: HubJob) -> None:
        previous = self.data["jobs"].get(kind)
        if previous is not None:
            self.data["replaced"].append({"kind": kind, **previous})
        self.data["jobs"][kind] = {"job_id": job.job_id, "url": job.url, "key": key, "submitted": now_utc(),
                                   "status": "SUBMITTED"}
        self.save()

    def record_status(self, kind: str, code: str, message: str | None = None) -> None:
        self.data["jobs"][kind].update(status=code, failure_reason=message)
        self.save()

    def job_records(self) -> dict[str, HubJobRecord]:
        return {kind: HubJobRecord(job_id=record["job_id"], url=record["url"], status=record["status"])
                for kind, record in self.data["jobs"].items()}


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ArtifactRun:
    """What the steps of one artifact's run share; every submission lands in hub_jobs.json before
    anything waits on it."""

    plan: HubPlan
    client: HubClient
    log: StageLog
    out: Path
    state: HubState
    input_sha256: str
    outputs: list[Path] = field(default_factory=list)
    uploaded: Any = None

    @property
    def config(self) -> HubConfig:
        return self.plan.config

    @property
    def artifact(self) -> HubArtifact:
        return self.plan.artifact

    @property
    def job_name(self) -> str:
        return f"lpcv-{self.artifact.model_name or self.artifact.upload.stem}-{self.artifact.label}"


class DeviceModel(NamedTuple):
    """The model the device jobs run: the compiled one, or the upload itself when nothing compiles."""

    handle: Any
    key: str  # names it in the profile and inference jobs' keys
    compile_job: HubJob | None
    compile: HubCompile | None
    io: tuple[list[TensorInfo], list[TensorInfo]] | None = None  # the compiled model's, as AI Hub records it


def upload_artifact(run: ArtifactRun) -> Any:
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
                                        "uploaded": now_utc()}
            run.state.save()
            step.detail = f"model {model_id}, {run.artifact.upload.name}"
    return run.uploaded


def submit_or_resume(run: ArtifactRun, kind: str, key: dict, submit: Callable[[], HubJob]) -> HubJob:
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


def wait_for(run: ArtifactRun, job: HubJob) -> None:
    try:
        state = run.client.wait(job, timeout_s=run.config.timeout, poll_s=run.config.poll, progress=run.log.info)
    except HubJobFailedError as err:
        run.state.record_status(job.kind, "FAILED", err.reason)
        raise
    run.state.record_status(job.kind, state.code)
