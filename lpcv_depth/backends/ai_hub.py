"""The one place that talks to Qualcomm AI Hub (`qai_hub`): a thin client with typed, hinted errors.

`qai_hub` is imported lazily, only here. Tests pass an in-memory stand-in for the module
(tests/fake_qai_hub.py), so nothing else in the project knows whether the hub is real.

Before anything touches the network, `preflight()` fails fast and clearly when the package is
missing, no API token is configured, or the hub cannot be reached: qai_hub itself retries a dead
connection with back-off, and its job waits have no client-side limit unless asked for one (how
long that takes: docs/hub.md, Preflight).
"""

from __future__ import annotations

import configparser
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from lpcv_depth.errors import ExitCode, LpcvError, MissingDependencyError

S24_DEVICE = "Samsung Galaxy S24 (Family)"
DEFAULT_API_URL = "https://workbench.aihub.qualcomm.com"
CONFIGURE_HINT = ("get a token from the Account page of https://workbench.aihub.qualcomm.com, then run "
                  "`qai-hub configure --api_token YOUR_TOKEN` (writes ~/.qai_hub/client.ini)")
INSTALL_HINT = 'pip install -e ".[hub]"  (installs qai-hub==0.56.0)'
# qai_hub reads this variable, else ~/.qai_hub/client.ini; the preflight reads the same file.
CONFIG_ENV = "QAIHUB_CLIENT_INI"
JOB_KINDS = ("compile", "profile", "inference")
# Consecutive failed status polls tolerated while waiting (a network blip), before giving up.
_MAX_POLL_ERRORS = 3


class HubError(LpcvError):
    """AI Hub refused a request or answered something unusable."""


class HubAuthError(HubError):
    """No usable API token."""


class HubUnavailableError(HubError):
    """AI Hub cannot be reached (no network, DNS, firewall, or the service is down)."""


class HubJobFailedError(HubError):
    """A job finished on the hub with state FAILED; `reason` is the hub's own explanation."""

    exit_code = ExitCode.HUB_JOB_FAILED
    # What the CLI prints before the message, instead of "error".
    headline = "JOB FAILED"

    def __init__(self, message: str, *, job_id: str, kind: str, reason: str, hint: str | None = None):
        super().__init__(message, hint)
        self.job_id = job_id
        self.kind = kind
        self.reason = reason


class HubTimeoutError(HubError):
    """A job did not finish within the client-side timeout (it may still finish on the hub)."""

    exit_code = ExitCode.HUB_TIMEOUT
    headline = "TIMED OUT"

    def __init__(self, message: str, *, job_id: str, kind: str, hint: str | None = None):
        super().__init__(message, hint)
        self.job_id = job_id
        self.kind = kind


@dataclass(frozen=True)
class HubJob:
    """A submitted job: what it is, its id and web page, and the qai_hub object behind it."""

    kind: str
    job_id: str
    url: str
    handle: Any


@dataclass(frozen=True)
class JobState:
    code: str
    finished: bool
    success: bool
    message: str | None


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model as the hub sees it (quantized I/O carries scale and zero point)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    scale: float | None = None
    zero_point: float | None = None


@dataclass(frozen=True)
class ApiConfig:
    path: Path
    api_url: str


def config_path() -> Path:
    """Where qai_hub reads its token from: $QAIHUB_CLIENT_INI, else ~/.qai_hub/client.ini."""
    return Path(os.path.expanduser(os.environ.get(CONFIG_ENV, "~/.qai_hub/client.ini")))


def read_api_config() -> ApiConfig:
    """The configured token's file and API URL, or HubAuthError saying how to configure one."""
    path = config_path()
    if not path.is_file():
        raise HubAuthError(f"no AI Hub API token: {path} does not exist", hint=CONFIGURE_HINT)
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as err:
        raise HubAuthError(f"cannot parse the AI Hub config {path}: {err}", hint=CONFIGURE_HINT) from err
    if not parser.has_section("api") or not parser["api"].get("api_token", "").strip():
        raise HubAuthError(f"no AI Hub API token in {path} (section [api], key api_token)", hint=CONFIGURE_HINT)
    return ApiConfig(path, parser["api"].get("api_url", DEFAULT_API_URL) or DEFAULT_API_URL)


def probe_reachable(url: str, timeout_s: float) -> None:
    """Open (and close) a TCP connection to the API host within timeout_s, DNS included, or raise.

    Runs in a daemon thread because getaddrinfo ignores socket timeouts; a hung lookup therefore
    costs timeout_s, not minutes.
    """
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: dict[str, BaseException | None] = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome["error"] = None
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        reason = f"no answer within {timeout_s:g}s"
    elif outcome["error"] is not None:
        reason = f"{type(outcome['error']).__name__}: {outcome['error']}"
    else:
        return
    raise HubUnavailableError(f"cannot reach AI Hub at {host}:{port} ({reason})",
                              hint="check the network connection and proxy settings; job ids already submitted "
                                   "are recorded, so rerunning the same command later resumes")


class HubClient:
    """The handful of AI Hub operations the hub stage needs.

    module: a `qai_hub`-like module object; None imports the real package on first use.
    preflight: check the token file and reachability before the first request.
    """

    def __init__(self, module: Any = None, *, preflight: bool = True, connect_timeout_s: float = 10.0):
        self._module = module
        self.check_before_use = preflight
        self.connect_timeout_s = connect_timeout_s
        self._checked = False

    @property
    def hub(self) -> Any:
        if self._module is None:
            try:
                import qai_hub
            except ImportError as err:
                raise MissingDependencyError(f"the AI Hub client package is not installed ({err})",
                                             hint=INSTALL_HINT) from err
            self._module = qai_hub
        return self._module

    def preflight(self) -> None:
        """Fail now, with the fix, on a missing package, token or network; a no-op after success."""
        self.hub  # noqa: B018 - the import is the check
        if self.check_before_use and not self._checked:
            config = read_api_config()
            probe_reachable(config.api_url, self.connect_timeout_s)
        self._checked = True

    # Models and datasets

    def upload_model(self, path: Path) -> Any:
        return self._call("upload the model", self.hub.upload_model, os.fspath(path))

    def get_model(self, model_id: str) -> Any:
        return self._call(f"look up model {model_id}", self.hub.get_model, model_id)

    def upload_dataset(self, entries: dict[str, list], name: str) -> Any:
        return self._call("upload the dataset", self.hub.upload_dataset, entries, name=name)

    def get_dataset(self, dataset_id: str) -> Any | None:
        """The dataset, or None when it is gone or expired (hub datasets live 30 days)."""
        try:
            dataset = self._call(f"look up dataset {dataset_id}", self.hub.get_dataset, dataset_id)
        except HubUnavailableError:
            raise
        except HubError:
            return None
        expired = getattr(dataset, "is_expired", None)
        return None if callable(expired) and expired() else dataset

    def io_spec(self, model: Any) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
        """A compiled model's inputs and outputs (names, dtypes, quantization), None if unknown."""
        try:
            specs = [self._call("read the model's I/O", lambda attr=attr: getattr(model, attr))
                     for attr in ("input_spec", "output_spec")]
        except (HubError, AttributeError):
            return None
        found = []
        for spec in specs:
            if not spec:
                return None
            tensors = next(iter(spec.values()))  # single-graph models keep their tensors under one key
            found.append([TensorInfo(t.name, str(t.dtype), tuple(t.shape) if t.shape else None,
                                     getattr(t, "scale", None), getattr(t, "zero_point", None)) for t in tensors])
        return found[0], found[1]

    # Jobs

    def device(self, name: str) -> Any:
        return self.hub.Device(name)

    def submit_compile(self, model: Any, device: str, options: str, name: str) -> HubJob:
        handle = self._call("submit the compile job", self.hub.submit_compile_job, model=model,
                            device=self.device(device), name=name, options=options)
        return self._job("compile", handle)

    def submit_profile(self, model: Any, device: str, options: str, name: str) -> HubJob:
        # qai-hub 0.56 deprecates submit_profile_job: a profile job is an inference job with profiling on.
        handle = self._call("submit the profile job", self.hub.submit_inference_job, model=model,
                            device=self.device(device), inputs=None, name=name, options=options, profile=True)
        return self._job("profile", handle)

    def submit_inference(self, model: Any, device: str, dataset: Any, options: str, name: str) -> HubJob:
        handle = self._call("submit the inference job", self.hub.submit_inference_job, model=model,
                            device=self.device(device), inputs=dataset, name=name, options=options, profile=False)
        return self._job("inference", handle)

    def get_job(self, kind: str, job_id: str) -> HubJob:
        return self._job(kind, self._call(f"look up {kind} job {job_id}", self.hub.get_job, job_id))

    def state(self, job: HubJob) -> JobState:
        status = self._call(f"get the status of {job.kind} job {job.job_id}", job.handle.get_status)
        return JobState(code=str(status.code), finished=bool(status.finished), success=bool(status.success),
                        message=status.message or None)

    def wait(self, job: HubJob, *, timeout_s: float, poll_s: float,
             progress: Callable[[str], None] | None = None, heartbeat_s: float = 60.0) -> JobState:
        """Poll until the job finishes; one progress line per state change (and every heartbeat_s).

        Raises HubJobFailedError (with the hub's reason) on FAILED, HubTimeoutError past timeout_s.
        """
        started = time.monotonic()
        last_code, last_line, errors = None, started, 0
        while True:
            try:
                state = self.state(job)
                errors = 0
            except HubUnavailableError:
                errors += 1
                if errors >= _MAX_POLL_ERRORS:
                    raise
                state = None
            elapsed = time.monotonic() - started
            if state is not None and progress is not None and (
                    state.code != last_code or time.monotonic() - last_line >= heartbeat_s):
                progress(f"{job.kind} job {job.job_id} {state.code} ({_clock(elapsed)})")
                last_code, last_line = state.code, time.monotonic()
            if state is not None and state.finished:
                if not state.success:
                    reason = state.message or "no reason given"
                    raise HubJobFailedError(
                        f"{job.kind} job {job.job_id} FAILED on AI Hub: {reason} ({job.url})",
                        job_id=job.job_id, kind=job.kind, reason=reason,
                        hint="fix what the hub reports (the job page has the full log), then rerun with --force "
                             "to resubmit; without --force the rerun reports this same failed job")
                return state
            if elapsed >= timeout_s:
                raise HubTimeoutError(
                    f"{job.kind} job {job.job_id} still {state.code if state else 'unknown'} after "
                    f"{_clock(elapsed)} (--timeout {timeout_s:g}s); it keeps running on the hub: {job.url}",
                    job_id=job.job_id, kind=job.kind,
                    hint="rerun the same command later: it resumes this job instead of resubmitting; "
                         "or raise --timeout")
            time.sleep(min(poll_s, timeout_s - elapsed))

    def target_model(self, job: HubJob) -> Any:
        model = self._call(f"get the compiled model of job {job.job_id}", job.handle.get_target_model)
        if model is None:
            raise HubError(f"compile job {job.job_id} has no target model", hint="open the job page: " + job.url)
        return model

    def download_model(self, model: Any, path: Path) -> Path:
        """Download to `path`; the hub appends the runtime's extension, so the real path is returned."""
        return Path(self._call("download the compiled model", model.download, os.fspath(path)))

    def profile(self, job: HubJob) -> dict:
        profile = self._call(f"download the profile of job {job.job_id}", job.handle.download_profile)
        if not isinstance(profile, dict) or "execution_summary" not in profile:
            raise HubError(f"profile job {job.job_id} returned no profile", hint="open the job page: " + job.url)
        return profile

    def output_data(self, job: HubJob) -> dict[str, list]:
        outputs = self._call(f"download the outputs of job {job.job_id}", job.handle.download_output_data)
        if not outputs:
            raise HubError(f"inference job {job.job_id} returned no output data",
                           hint="the job ran without inputs; open the job page: " + job.url)
        return outputs

    def share(self, job: HubJob, emails: list[str]) -> None:
        self._call(f"share job {job.job_id}", job.handle.modify_sharing, add_emails=list(emails))

    # Plumbing

    def _job(self, kind: str, handle: Any) -> HubJob:
        if isinstance(handle, list):  # one job per device; the stage submits for exactly one
            handle = handle[0]
        return HubJob(kind, str(handle.job_id), str(getattr(handle, "url", "")), handle)

    def _call(self, what: str, function: Callable, *args, **kwargs) -> Any:
        self.preflight()
        try:
            return function(*args, **kwargs)
        except LpcvError:
            raise
        except Exception as err:  # qai_hub raises its own types, requests' and builtins: translate them all
            raise self._translate(what, err) from err

    def _translate(self, what: str, err: Exception) -> LpcvError:
        hub = self._module
        text = " ".join(str(err).split())
        user_error = getattr(hub, "UserError", ())
        internal_error = getattr(hub, "InternalError", ())
        if isinstance(err, user_error) and any(key in text for key in ("configuration", "API token", "authenticate")):
            return HubAuthError(f"AI Hub rejected the credentials while trying to {what}: {text}", hint=CONFIGURE_HINT)
        if isinstance(err, internal_error) or isinstance(err, (ConnectionError, OSError)) or \
                type(err).__module__.startswith(("requests", "urllib3")):
            return HubUnavailableError(f"AI Hub unavailable while trying to {what}: {text}",
                                       hint="check the network (if it works, AI Hub itself may be down); submitted "
                                            "job ids are recorded, so rerunning the same command resumes")
        if isinstance(err, user_error):
            return HubError(f"AI Hub refused to {what}: {text}",
                            hint="fix the input the hub names; a job id it cannot find needs --force to resubmit")
        return HubError(f"unexpected {type(err).__name__} while trying to {what}: {text}",
                        hint="rerun; if it persists, report it with the qai-hub version (0.56.0 is supported)")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
