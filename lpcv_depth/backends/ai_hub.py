"""The one place that talks to Qualcomm AI Hub (`qai_hub`): a thin client with typed, hinted errors.

`qai_hub` is imported lazily, only here. Every request goes through a `qai_hub.Client` of its own,
which reads client.ini like `qai-hub` does. Tests run that real client against an in-memory hub
behind its REST layer (tests/hub_rest_double.py); a stand-in module object can still be passed as
`module` (it then also plays the client: `module.Client()`).

Before anything touches the network, `preflight()` fails fast and clearly when the package is
missing, client.ini is incomplete, or the hub cannot be reached the way qai-hub will reach it
(directly, or through the proxy `requests` picks from HTTPS_PROXY / NO_PROXY): qai_hub itself
retries a dead connection with back-off, and its job waits have no client-side limit unless asked
for one (how long each of its retry loops can take: docs/hub.md, Preflight).

Errors are classified by type, never by message text: the exception qai-hub raises and what it was
raised from (the HTTP status of its APIException, a requests or botocore connection error, a local
OSError).
"""

from __future__ import annotations

import configparser
import errno
import importlib.metadata
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lpcv_depth.errors import ExitCode, LpcvError, MissingDependencyError
from lpcv_depth.network import unreachable_reason
from lpcv_depth.pins import pinned_version

S24_DEVICE = "Samsung Galaxy S24 (Family)"
DEFAULT_API_URL = "https://workbench.aihub.qualcomm.com"
CONFIGURE_HINT = ("get a token from the Account page of https://workbench.aihub.qualcomm.com, then run "
                  "`qai-hub configure --api_token YOUR_TOKEN` (writes ~/.qai_hub/client.ini)")
PACKAGE = "qai-hub"
# qai_hub reads this variable, else ~/.qai_hub/client.ini; the preflight reads the same file.
CONFIG_ENV = "QAIHUB_CLIENT_INI"
# qai_hub.Client refuses a client.ini without any of these (it then reports the token as missing).
CONFIG_KEYS = ("api_token", "api_url", "web_url")
JOB_KINDS = ("compile", "profile", "inference")
# Consecutive failed status polls tolerated while waiting (a network blip), before giving up.
_MAX_POLL_ERRORS = 3
# A rate-limited submission is retried after these pauses (seconds, doubling), within --timeout;
# the same pauses qai-hub's own retry loop uses (qai_hub.client.Client._api_call_with_retry).
_RATE_LIMIT_PAUSE_S = (20.0, 60.0)
# HTTP statuses that mean the service (or a gateway in front of it) is down, not that the request was wrong.
_UNAVAILABLE_STATUSES = {502, 503, 504}
# qai_hub's APIException status for a client.ini missing api_url / web_url / api_token.
_CONFIG_MISSING_FIELDS = 1000
# errno values of an OSError that is about a local file or disk, not the network.
_LOCAL_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                 errno.EMFILE, errno.ENFILE, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG}
UNAVAILABLE_HINT = ("check the network and proxy settings (HTTPS_PROXY / NO_PROXY); if they work, AI Hub itself may "
                    "be down. Submitted job ids are recorded, so rerunning the same command resumes")


def supported_version() -> str | None:
    """The qai-hub version lpcv-depth's [hub] extra pins; None where lpcv-depth itself is not installed."""
    return pinned_version(PACKAGE)


def installed_version() -> str | None:
    """The qai-hub version installed here; None where it is not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _install_hint() -> str:
    pinned = supported_version()
    return 'pip install -e ".[hub]"' + (f"  (installs {PACKAGE}=={pinned})" if pinned else "")


def _versions_line() -> str:
    """For a bug report: the qai-hub version that ran and the one the [hub] extra pins."""
    return (f"{PACKAGE} {installed_version() or 'not installed'}, "
            f"the [hub] extra pins {supported_version() or 'an unknown version (lpcv-depth is not installed)'}")


class HubError(LpcvError):
    """AI Hub refused a request or answered something unusable."""


class HubAuthError(HubError):
    """No usable API token (client.ini missing or incomplete, or the token rejected)."""


class HubUnavailableError(HubError):
    """AI Hub or its file storage cannot be reached (no network, DNS, proxy, firewall, or the service is down)."""


class HubRateLimitedError(HubError):
    """AI Hub kept answering 429 Too Many Requests."""


class HubNotFoundError(HubError):
    """AI Hub has no model, dataset or job with that id (or it is not visible to this token)."""


class HubLocalError(HubError):
    """A local file or disk problem while talking to AI Hub (missing file, permissions, disk full)."""


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

    def describe(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape) if self.shape else None,
                "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class ApiConfig:
    path: Path
    api_url: str
    web_url: str


def config_path() -> Path:
    """Where qai_hub reads its token from: $QAIHUB_CLIENT_INI, else ~/.qai_hub/client.ini."""
    return Path(os.path.expanduser(os.environ.get(CONFIG_ENV, "~/.qai_hub/client.ini")))


def read_api_config() -> ApiConfig:
    """The configured token's file and URLs, or HubAuthError saying how to configure them.

    Requires what qai_hub.Client requires: [api] api_token, api_url and web_url."""
    path = config_path()
    if not path.is_file():
        raise HubAuthError(f"no AI Hub API token: {path} does not exist", hint=CONFIGURE_HINT)
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as err:
        raise HubAuthError(f"cannot parse the AI Hub config {path}: {err}", hint=CONFIGURE_HINT) from err
    section = parser["api"] if parser.has_section("api") else {}
    missing = [key for key in CONFIG_KEYS if not str(section.get(key, "")).strip()]
    if missing:
        what = "no AI Hub API token" if "api_token" in missing else "an incomplete AI Hub config"
        raise HubAuthError(f"{what} in {path}: section [api] lacks {', '.join(missing)} (qai-hub needs "
                           f"{', '.join(CONFIG_KEYS)})", hint=CONFIGURE_HINT + "; it writes all three keys")
    return ApiConfig(path, section["api_url"].strip(), section["web_url"].strip())


# -- Reachability, the way qai-hub's requests sessions will connect ------------------------------------------------

def probe_reachable(url: str, timeout_s: float) -> None:
    """Reach the API host within timeout_s, through the proxy requests would use, DNS included, or raise
    HubUnavailableError (lpcv_depth.network.unreachable_reason says how it is tried)."""
    reason = unreachable_reason(url, timeout_s)
    if reason is not None:
        raise HubUnavailableError(f"cannot reach AI Hub at {reason}",
                                  hint=UNAVAILABLE_HINT + "; --no-preflight skips this check")


# -- Classifying what qai-hub raises -------------------------------------------------------------------------------

def _chain(err: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from or during (qai-hub re-raises with `from None`,
    which hides but keeps __context__)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status_codes(err: BaseException) -> set[int]:
    """HTTP (and qai-hub's own) status codes of the APIExceptions behind `err`."""
    return {code for e in _chain(err) if isinstance(code := getattr(e, "status_code", None), int)}


def _connection_types() -> tuple[type, ...]:
    """Exception types that mean 'could not talk to the server': requests', botocore's, the socket's."""
    types: list[type] = [ConnectionError, socket.timeout, socket.gaierror]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                  requests.exceptions.ChunkedEncodingError, requests.exceptions.RetryError]
    except ImportError:
        pass
    try:
        import botocore.exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    return tuple(types)


def _is_local(err: BaseException) -> bool:
    return isinstance(err, OSError) and not isinstance(err, _connection_types()) and err.errno in _LOCAL_ERRNOS


class HubClient:
    """The handful of AI Hub operations the hub stage needs.

    module: a `qai_hub`-like module object; None imports the real package on first use.
    preflight: check client.ini and reachability before the first request (False: neither).
    """

    def __init__(self, module: Any = None, *, preflight: bool = True, connect_timeout_s: float = 10.0):
        self._module = module
        self._api = None
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
                                             hint=_install_hint()) from err
            self._module = qai_hub
        return self._module

    @property
    def api(self) -> Any:
        """The qai_hub.Client every request goes through (it reads client.ini on first use)."""
        if self._api is None:
            self._api = self.hub.Client()
        return self._api

    def preflight(self, network: bool = True) -> None:
        """Fail now, with the fix, on a missing package, client.ini or network; a no-op after success.

        network=False (--no-preflight) skips the reachability probe, never the client.ini check."""
        self.hub  # noqa: B018 - the import is the check
        if self.check_before_use and not self._checked:
            config = read_api_config()
            if network:
                probe_reachable(config.api_url, self.connect_timeout_s)
        self._checked = True

    # Models and datasets

    def upload_model(self, path: Path) -> Any:
        return self._call("upload the model", self.api.upload_model, os.fspath(path))

    def get_model(self, model_id: str) -> Any:
        return self._call(f"look up model {model_id}", self.api.get_model, model_id)

    def upload_dataset(self, entries: dict[str, list], name: str) -> Any:
        return self._call("upload the dataset", self.api.upload_dataset, entries, name=name)

    def get_dataset(self, dataset_id: str) -> Any | None:
        """The dataset, or None when it is gone or expired (hub datasets live 30 days)."""
        try:
            dataset = self._call(f"look up dataset {dataset_id}", self.api.get_dataset, dataset_id)
        except HubNotFoundError:
            return None
        expired = getattr(dataset, "is_expired", None)
        return None if callable(expired) and expired() else dataset

    def io_spec(self, model: Any) -> tuple[list[TensorInfo], list[TensorInfo]] | None:
        """A model's inputs and outputs as the hub records them (get_model: a model object fresh from
        an upload has empty specs); None while the hub has none. Hub errors propagate."""
        record = self.get_model(str(model.model_id))
        specs = [getattr(record, "input_spec", None), getattr(record, "output_spec", None)]
        if not all(specs):
            return None
        found = []
        for spec in specs:
            tensors = next(iter(spec.values()))  # single-graph models keep their tensors under one key
            found.append([TensorInfo(t.name, str(t.dtype), tuple(t.shape) if t.shape else None,
                                     getattr(t, "scale", None), getattr(t, "zero_point", None)) for t in tensors])
        return found[0], found[1]

    # Jobs

    def device(self, name: str) -> Any:
        return self.hub.Device(name)

    def submit_compile(self, model: Any, device: str, options: str, name: str, *, wait_s: float = 0.0) -> HubJob:
        handle = self._submit("submit the compile job", self.api.submit_compile_job, wait_s, model=model,
                              device=self.device(device), name=name, options=options)
        return self._job("compile", handle)

    def submit_profile(self, model: Any, device: str, options: str, name: str, *, wait_s: float = 0.0) -> HubJob:
        # qai-hub 0.56 deprecates submit_profile_job: a profile job is an inference job with profiling on.
        handle = self._submit("submit the profile job", self.api.submit_inference_job, wait_s, model=model,
                              device=self.device(device), inputs=None, name=name, options=options, profile=True)
        return self._job("profile", handle)

    def submit_inference(self, model: Any, device: str, dataset: Any, options: str, name: str, *,
                         wait_s: float = 0.0) -> HubJob:
        handle = self._submit("submit the inference job", self.api.submit_inference_job, wait_s, model=model,
                              device=self.device(device), inputs=dataset, name=name, options=options, profile=False)
        return self._job("inference", handle)

    def get_job(self, kind: str, job_id: str) -> HubJob:
        return self._job(kind, self._call(f"look up {kind} job {job_id}", self.api.get_job, job_id))

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
            except (HubUnavailableError, HubRateLimitedError):
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
                return self._finished(job, state)
            if elapsed >= timeout_s:
                raise HubTimeoutError(
                    f"{job.kind} job {job.job_id} still {state.code if state else 'unknown'} after "
                    f"{_clock(elapsed)} (--timeout {timeout_s:g}s); it keeps running on the hub: {job.url}",
                    job_id=job.job_id, kind=job.kind,
                    hint="rerun the same command later: it resumes this job instead of resubmitting; "
                         "or raise --timeout")
            time.sleep(min(poll_s, timeout_s - elapsed))

    @staticmethod
    def _finished(job: HubJob, state: JobState) -> JobState:
        if state.success:
            return state
        reason = state.message or "no reason given"
        raise HubJobFailedError(
            f"{job.kind} job {job.job_id} FAILED on AI Hub: {reason} ({job.url})",
            job_id=job.job_id, kind=job.kind, reason=reason,
            hint="fix what the hub reports (the job page has the full log), then rerun with --force "
                 "to resubmit; without --force the rerun reports this same failed job")

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

    def _submit(self, what: str, function: Callable, wait_s: float, **kwargs) -> Any:
        """Submit with qai-hub's own rate-limit loop off (it would wait up to 10 minutes), and retry
        a 429 here instead, within wait_s (--timeout)."""
        waited, pause = 0.0, _RATE_LIMIT_PAUSE_S[0]
        while True:
            try:
                return self._call(what, function, retry=False, **kwargs)
            except HubRateLimitedError as err:
                if waited + pause > wait_s:
                    raise HubRateLimitedError(
                        f"AI Hub rate limited the request to {what} (HTTP 429) and still did after "
                        f"{waited:g}s of retrying within --timeout {wait_s:g}s",
                        hint="wait a few minutes and rerun the same command (it resumes); AI Hub limits how "
                             "many requests and jobs an account may make at once") from err
                time.sleep(pause)
                waited += pause
                pause = min(pause * 2, _RATE_LIMIT_PAUSE_S[1])

    def _call(self, what: str, function: Callable, *args, **kwargs) -> Any:
        self.preflight()
        try:
            return function(*args, **kwargs)
        except LpcvError:
            raise
        except Exception as err:  # qai_hub raises its own types, requests', botocore's and builtins: classify them
            raise self._translate(what, err) from err

    def _hub_type(self, name: str) -> type | tuple:
        """One of qai-hub's exception classes (RateLimitedError lives in qai_hub.client only)."""
        hub = self._module
        found = getattr(hub, name, None) or getattr(getattr(hub, "client", None), name, None)
        return found if isinstance(found, type) else ()

    def _translate(self, what: str, err: Exception) -> LpcvError:
        text = " ".join(str(err).split())
        codes = _status_codes(err)
        user_error, internal_error = self._hub_type("UserError"), self._hub_type("InternalError")
        if isinstance(err, self._hub_type("RateLimitedError")) or 429 in codes:
            return HubRateLimitedError(f"AI Hub rate limited the request to {what} (HTTP 429): {text}",
                                       hint="wait a few minutes and rerun the same command (it resumes)")
        if isinstance(err, user_error) and (codes & {401, _CONFIG_MISSING_FIELDS} or
                                            any(isinstance(e, FileNotFoundError) for e in _chain(err))):
            return HubAuthError(f"AI Hub rejected the credentials while trying to {what}: {text}", hint=CONFIGURE_HINT)
        if codes & _UNAVAILABLE_STATUSES or any(isinstance(e, _connection_types()) for e in _chain(err)):
            return HubUnavailableError(f"AI Hub unavailable while trying to {what}: {text}", hint=UNAVAILABLE_HINT)
        if isinstance(err, user_error) and 404 in codes:
            return HubNotFoundError(f"AI Hub could not find what was asked for while trying to {what}: {text}",
                                    hint="a job or model id it cannot find needs --force to resubmit")
        if isinstance(err, internal_error):
            return HubError(f"AI Hub reported an internal error while trying to {what}: {text}",
                            hint="rerun later (it resumes); if it persists, contact ai-hub-support@qti.qualcomm.com")
        if isinstance(err, user_error):
            return HubError(f"AI Hub refused to {what}: {text}", hint="fix the input the hub names")
        if _is_local(err):
            return HubLocalError(f"a local file problem while trying to {what}: {text}",
                                 hint="check the path, its permissions and the free disk space (the network is "
                                      "not the problem); then rerun the same command (it resumes)")
        return HubError(f"unexpected {type(err).__name__} while trying to {what}: {text}",
                        hint=f"rerun; if it persists, report it with the qai-hub version ({_versions_line()})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
