"""An in-memory Qualcomm AI Hub behind qai-hub 0.56's REST layer, so tests run the *real* client.

`HubRestDouble.install(monkeypatch)` replaces the functions of `qai_hub.public_rest_api` that talk
HTTP to AI Hub with answers from memory, built from the real protobuf messages
(`qai_hub.public_api_pb2`). Everything above them is qai-hub's own code: `qai_hub.Client` reading
client.ini, device lookup and framework attribute checks, model-type detection and the .aimet
folder rule, dataset dtype checks, h5 files, zipped directory models, job objects and their state
mapping, `Job.wait`, profile parsing. File transfers go through qai-hub's S3 path
(`s3_transfer.upload_file` / `download_file`: botocore and s3transfer with real requests), answered by
a `before-send` hook on the botocore client, so the bytes really travel (aws-chunked upload
encoding included).

What the real service does and a friendlier fake would not, reproduced here:
  - a model straight after upload has empty input/output specs (the client builds it from the upload
    response); `get_model` returns the server's spec, after `spec_settle_polls` lookups;
  - `JobStatus.message` is "" (protobuf strings are never None);
  - QUANTIZING_MODEL and LINKING_MODELS exist (`extra_states[kind]` puts them in a job's path);
  - the client's `download_*` wait for the job (results exist only once it has finished);
  - datasets expire (`expire(dataset_id)`), float64 arrays are refused by the client;
  - HTTP 429 (`outage(function, "429", times)`): the client turns it into RateLimitedError; its own
    retry loop (submit_inference_job(retry=True), a multi-device compile) retries for up to 10 minutes;
  - S3 down (`s3_down = True`): botocore's EndpointConnectionError after its own retries;
  - profiles in the older schema (`profile_version=(0, 0)`), without per-layer timings
    (`layer_timings=False`) or without memory ranges (`profile_memory=False`: None in the dict);
  - an inference job whose inputs do not match the model's input spec FAILS on the hub;
  - a QNN context binary built with a newer QNN than the job's runtime FAILS to load
    (`binary_qnn_version`; `--qairt_version` in the job options picks the runtime).

Sleeps in qai_hub.client and botocore are instant (recorded in `slept`), so retry loops run in
milliseconds. `calls` lists every REST function answered, in order, for counting.

The double also listens on a local TCP port (`api_url`), so the stage's preflight, a real TCP
probe, finds "AI Hub" reachable; nothing else ever connects there (HTTP sessions are disabled).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import socket
import tempfile
import threading
import time
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

WEB_URL = "https://workbench.aihub.qualcomm.com"
S24 = "Samsung Galaxy S24 (Family)"
DEVICES = {
    S24: ("14", ["chipset:qualcomm-snapdragon-8gen3", "format:phone", "framework:onnx", "framework:qnn",
                 "framework:tflite", "os:android", "vendor:samsung"]),
    "Samsung Galaxy S23 (Family)": ("13", ["chipset:qualcomm-snapdragon-8gen2", "format:phone", "framework:onnx",
                                           "framework:qnn", "framework:tflite", "os:android", "vendor:samsung"]),
}
RUNTIMES = {"qnn_context_binary": ("MODEL_TYPE_QNN_CONTEXT_BINARY", ".bin"), "tflite": ("MODEL_TYPE_TFLITE", ".tflite"),
            "qnn_dlc": ("MODEL_TYPE_QNN_DLC", ".dlc"), "onnx": ("MODEL_TYPE_ONNX", ".onnx.zip")}
IN_PROGRESS = {"compile": ("CREATED", "OPTIMIZING_MODEL"),
               "profile": ("CREATED", "PROVISIONING_DEVICE", "MEASURING_PERFORMANCE"),
               "inference": ("CREATED", "PROVISIONING_DEVICE", "RUNNING_INFERENCE")}
DEFAULT_QAIRT = "2.37"
BUCKET = "qai-hub-double"
REGION = "us-west-2"
DATASET_DAYS = 30
# Every function of qai_hub.public_rest_api the double answers; the others raise if reached.
# Ids are unique across doubles, so a folder written against one double never resumes another's jobs.
_SERIAL = itertools.count(1)
ANSWERED = ("get_device_list", "get_framework_list", "create_compile_job", "create_inference_job", "get_job",
            "get_job_results", "modify_sharing", "get_sharing", "_create_model", "_get_transfer_response",
            "_confirm_model_upload", "_create_dataset", "_confirm_dataset_credentials_upload", "get_model",
            "get_dataset")


def _pb():
    from qai_hub import public_api_pb2

    return public_api_pb2


def _timestamp(seconds: float):
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=int(seconds))


@dataclass
class Tensor:
    """A tensor as the server describes it (scale and zero point for quantized I/O)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float | None = None
    zero_point: float | None = None


FLOAT_IO = ([Tensor("image", "float32", (1, 3, 480, 640))], [Tensor("depth", "float32", (1, 1, 480, 640))])
QUANTIZED_IO = ([Tensor("image", "uint8", (1, 3, 480, 640), 1.0, 0.0)],
                [Tensor("depth", "uint8", (1, 1, 480, 640), 1 / 255, 0.0)])


@dataclass
class ServerModel:
    model_id: str
    name: str
    model_type: str  # a ModelType enum name
    is_directory: bool
    created: float
    key: str
    uploaded: bool = False
    producer_id: str = ""
    inputs: list[Tensor] | None = None
    outputs: list[Tensor] | None = None
    onnx: Path | None = None  # the ONNX graph the "device" runs (None: an opaque context binary)
    quantized: bool = False
    quantize_io: bool = False
    settle: int = 0  # get_model lookups still answered with an empty spec
    filename: str = ""
    runtime: str = ""  # a compiled model's target runtime


@dataclass
class ServerDataset:
    dataset_id: str
    name: str
    created: float
    expires: float
    key: str
    entries: dict | None = None


@dataclass
class ServerJob:
    job_id: str
    kind: str  # compile | profile | inference
    name: str
    options: str
    model_id: str
    device: str
    created: float
    states: tuple[str, ...]
    dataset_id: str = ""
    target_id: str = ""
    failure: str = ""
    polls: int = 0
    output_dataset_id: str = ""
    shared_with: list[str] = field(default_factory=list)


class HubRestDouble:
    """The service: models, datasets, jobs and an S3 bucket in memory. Knobs are plain attributes."""

    def __init__(self, *, cpu_layers: int = 0, binary_io=FLOAT_IO, binary_qnn_version: str | None = None,
                 qairt_versions=("2.37", "2.51"), spec_settle_polls: int = 0, quantize_io_scales=(1.0, 1 / 255),
                 profile_version: tuple[int, int] = (1, 2), profile_memory: bool = True, layer_timings: bool = True):
        self.cpu_layers = cpu_layers
        self.binary_io = binary_io  # what an uploaded context binary takes and returns
        self.quantize_io_scales = quantize_io_scales  # input and output scale --quantize_io gives
        self.binary_qnn_version = binary_qnn_version
        self.qairt_versions = qairt_versions
        self.spec_settle_polls = spec_settle_polls
        self.profile_version = profile_version
        self.profile_memory = profile_memory
        self.layer_timings = layer_timings
        self.fail: dict[str, str] = {}  # kind -> reason: the next job of that kind FAILS
        self.polls_per_state: dict[str, int] = {}
        self.extra_states: dict[str, tuple[str, ...]] = {}
        self.interrupt_at: dict[str, int] = {}  # kind -> n: Ctrl+C during the n-th status request
        self.network = True
        self.token_valid = True
        self.s3_down: bool | str = False  # True, or "PUT" / "GET" / "HEAD": only those requests fail
        self.calls: list[str] = []
        self.s3_requests: list[tuple[str, str]] = []
        self.slept: list[float] = []
        self.models: dict[str, ServerModel] = {}
        self.datasets: dict[str, ServerDataset] = {}
        self.jobs: dict[str, ServerJob] = {}
        self.bucket: dict[str, bytes] = {}
        self._outages: list[list] = []  # [function, kind, times left]
        self._tmp = tempfile.TemporaryDirectory(prefix="hub-double-")
        self._lock = threading.RLock()
        self._sessions: dict[Path, object] = {}
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.api_url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"

    # -- Set-up ---------------------------------------------------------------------------------------------------

    def install(self, monkeypatch) -> "HubRestDouble":
        """Answer qai_hub's REST functions from here; no HTTP session can be opened meanwhile."""
        import botocore.endpoint
        from qai_hub import api_utils, client, public_rest_api, s3_transfer

        for name in ANSWERED:
            monkeypatch.setattr(public_rest_api, name, self._answer(name, getattr(self, name)))
        for module in (public_rest_api, api_utils):
            for name in ("create_session", "create_external_session"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, _no_http)
        instant = types.SimpleNamespace(sleep=self.slept.append)
        monkeypatch.setattr(client, "time", instant)
        monkeypatch.setattr(botocore.endpoint, "time", instant)
        build = s3_transfer._build_client

        def build_client(credentials):
            s3 = build(credentials)
            s3.meta.events.register("before-send.s3", self._s3)
            return s3

        monkeypatch.setattr(s3_transfer, "_build_client", build_client)
        return self

    def close(self) -> None:
        self._listener.close()
        self._tmp.cleanup()

    def write_client_ini(self, folder: Path, **keys) -> Path:
        """client.ini as `qai-hub configure` writes it, pointing at this double."""
        values = {"api_token": "double-token", "api_url": self.api_url, "web_url": WEB_URL, "verbose": "True"}
        values.update(keys)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "client.ini"
        path.write_text("[api]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
        return path

    # -- Knobs ----------------------------------------------------------------------------------------------------

    def outage(self, function: str, kind: str, times: int = 1) -> None:
        """The next `times` calls of a REST function fail: "429", "503", "500" or "down" (no connection)."""
        self._outages.append([function, kind, times])

    def expire(self, dataset_id: str) -> None:
        self.datasets[dataset_id].expires = time.time() - 60

    # -- Views for assertions -------------------------------------------------------------------------------------

    @property
    def submitted(self) -> list[tuple[str, str, str]]:
        """(kind, job id, options) of every job, in submission order."""
        return [(job.kind, job.job_id, job.options) for job in self.jobs.values()]

    @property
    def uploads(self) -> list[str]:
        """Ids of the models uploaded by the user (not compile targets), in order."""
        return [m.model_id for m in self.models.values() if not m.producer_id and m.uploaded]

    def count(self, function: str) -> int:
        return self.calls.count(function)

    # -- Plumbing -------------------------------------------------------------------------------------------------

    def _answer(self, name: str, function):
        def rest(config, *args, **kwargs):
            # A server handles each request whole: clients in several threads (search's concurrent
            # hub profiles) must not interleave inside the double's bookkeeping.
            with self._lock:
                self.calls.append(name)
                self._trouble(name, config)
                return function(config, *args, **kwargs)

        rest.__name__ = name
        return rest

    def _trouble(self, name: str, config) -> None:
        from qai_hub.public_rest_api import APIException

        url = _url(config, name)
        for outage in self._outages:
            if outage[0] == name and outage[2] > 0:
                outage[2] -= 1
                kind = outage[1]
                if kind == "down":
                    raise _connection_error(url)
                raise APIException(None if kind != "429" else '{"detail": "Request was throttled."}',
                                   status_code=int(kind), url=url)
        if not self.network:
            raise _connection_error(url)
        if not self.token_valid:
            raise APIException(status_code=401, url=url)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(_SERIAL):07d}x"

    def _missing(self, config, what: str, obj_id: str):
        from qai_hub.public_rest_api import APIException

        return APIException(f"{what} ID '{obj_id}' could not be found. It may not exist or you may not have "
                            "permission to view it.", status_code=404, url=_url(config, what))

    def _refuse(self, config, message: str):
        from qai_hub.public_rest_api import APIException

        return APIException(f'{{"detail": "{message}"}}', status_code=400, url=_url(config, "refused"))

    # -- Devices --------------------------------------------------------------------------------------------------

    def get_device_list(self, config, name="", os="", attributes=None, select=False):
        pb = _pb()
        found = [pb.Device(name=device, os=version, attributes=attrs) for device, (version, attrs) in DEVICES.items()
                 if (not name or name == device) and set(attributes or []) <= set(attrs)]
        found = found[:1] if select else found
        return pb.DeviceList(devices=found, total_query_count=len(found))

    def get_framework_list(self, config):
        pb = _pb()
        return pb.FrameworkList(frameworks=[pb.Framework(name="QAIRT", api_version=v, full_version=v + ".0",
                                                         api_tags=["default"] if v == DEFAULT_QAIRT else [])
                                            for v in self.qairt_versions])

    # -- Models ---------------------------------------------------------------------------------------------------

    def _create_model(self, config, model_pb, verbose=None, project_id=None):
        model_id = self._new_id("m")
        self.models[model_id] = ServerModel(model_id, model_pb.name, _pb().ModelType.Name(model_pb.model_type),
                                            model_pb.is_directory, time.time(), f"models/{model_id}/upload",
                                            settle=self.spec_settle_polls)
        return _pb().CreateUpdateResponse(id=model_id, creation_time=_timestamp(time.time()))

    def _confirm_model_upload(self, config, model_id):
        model = self.models.get(model_id)
        if model is None or model.key not in self.bucket:
            raise self._refuse(config, f"No upload found for model {model_id}")
        self._read_model(model, self.bucket[model.key])
        model.uploaded = True
        return _pb().CreateUpdateResponse(id=model_id)

    def _read_model(self, model: ServerModel, data: bytes) -> None:
        """What the server learns from the file: the graph and its I/O (a context binary: `binary_io`)."""
        folder = Path(self._tmp.name) / model.model_id
        folder.mkdir()
        if model.model_type == "MODEL_TYPE_QNN_CONTEXT_BINARY":
            model.inputs, model.outputs = ([_copy(t) for t in tensors] for tensors in self.binary_io)
            return
        if model.is_directory:
            zipfile.ZipFile(io.BytesIO(data)).extractall(folder)
            [model.onnx] = folder.rglob("*.onnx")
        else:
            model.onnx = folder / "model.onnx"
            model.onnx.write_bytes(data)
        model.quantized = model.model_type == "MODEL_TYPE_AIMET_ONNX"
        model.inputs, model.outputs = _onnx_io(model.onnx)

    def get_model(self, config, model_id):
        model = self.models.get(model_id)
        if model is None:
            raise self._missing(config, "Model", model_id)
        message = self._model_pb(model)
        model.settle = max(model.settle - 1, 0)
        return message

    def _model_pb(self, model: ServerModel):
        pb = _pb()
        ready = model.settle == 0 and self._produced(model)
        message = pb.Model(model_id=model.model_id, name=model.name, creation_time=_timestamp(model.created),
                           model_type=pb.ModelType.Value(model.model_type), is_directory=model.is_directory,
                           file_upload_complete=model.uploaded, producer_id=model.producer_id)
        if ready and model.inputs is not None:
            message.input_spec.CopyFrom(_tensor_list(model.inputs))
            message.output_spec.CopyFrom(_tensor_list(model.outputs))
        return message

    def _produced(self, model: ServerModel) -> bool:
        job = self.jobs.get(model.producer_id)
        return job is None or self._state(job) == "SUCCESS"

    # -- Datasets -------------------------------------------------------------------------------------------------

    def _create_dataset(self, config, name, permanent=False, project_id=None, verbose=None):
        dataset_id = self._new_id("d")
        now = time.time()
        self.datasets[dataset_id] = ServerDataset(dataset_id, name, now, now + DATASET_DAYS * 86400,
                                                  f"datasets/{dataset_id}/data.h5")
        return _pb().CreateUpdateResponse(id=dataset_id, creation_time=_timestamp(now),
                                          expiration_time=_timestamp(now + DATASET_DAYS * 86400))

    def _confirm_dataset_credentials_upload(self, config, dataset_id):
        import h5py
        from qai_hub.util.dataset_entries_converters import h5_to_dataset_entries

        dataset = self.datasets[dataset_id]
        with h5py.File(io.BytesIO(self.bucket[dataset.key]), "r") as h5f:
            dataset.entries = h5_to_dataset_entries(h5f)
        return _pb().CreateUpdateResponse(id=dataset_id)

    def get_dataset(self, config, dataset_id):
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise self._missing(config, "Dataset", dataset_id)
        return self._dataset_pb(dataset)

    def _dataset_pb(self, dataset: ServerDataset):
        return _pb().Dataset(dataset_id=dataset.dataset_id, name=dataset.name,
                             creation_time=_timestamp(dataset.created), expiration_time=_timestamp(dataset.expires),
                             file_upload_complete=True)

    def _add_dataset(self, name: str, entries: dict) -> str:
        """A dataset the server writes itself (a job's outputs), h5 in the bucket like any other."""
        import h5py
        from qai_hub.util.dataset_entries_converters import dataset_entries_to_h5

        response = self._create_dataset(None, name)
        dataset = self.datasets[response.id]
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5f:
            dataset_entries_to_h5(entries, h5f)
        self.bucket[dataset.key] = buffer.getvalue()
        dataset.entries = entries
        return dataset.dataset_id

    # -- Transfers ------------------------------------------------------------------------------------------------

    def _get_transfer_response(self, config, *path, response_type, use_acceleration, file_size=None):
        pb = _pb()
        kind, obj_id, action = path
        if kind == "models" and action == "multipart_upload":
            model = self._model(config, obj_id)
            return pb.FileUploadResponse(credentials=_credentials(model.key))
        if kind == "datasets" and action == "upload_url":
            return pb.FileUploadResponse(credentials=_credentials(self._dataset(config, obj_id).key))
        if kind == "models" and action == "download":
            model = self._model(config, obj_id)
            if model.producer_id and self._produced(model):
                self.bucket.setdefault(model.key, f"compiled:{model.runtime}:{model.producer_id}".encode())
            if model.key not in self.bucket:
                raise self._refuse(config, f"Model {obj_id} is not ready for download")
            return pb.FileDownloadResponse(credentials=_credentials(model.key, model.filename or model.name))
        if kind == "datasets" and action == "download_data":
            return pb.FileDownloadResponse(credentials=_credentials(self._dataset(config, obj_id).key, "dataset.h5"))
        raise AssertionError(f"hub_rest_double: no transfer {path}")

    def _model(self, config, model_id: str) -> ServerModel:
        if model_id not in self.models:
            raise self._missing(config, "Model", model_id)
        return self.models[model_id]

    def _dataset(self, config, dataset_id: str) -> ServerDataset:
        if dataset_id not in self.datasets:
            raise self._missing(config, "Dataset", dataset_id)
        return self.datasets[dataset_id]

    def _s3(self, request, **kwargs):
        """botocore's before-send hook: the bucket answers PUT, HEAD and GET (or S3 is unreachable)."""
        from botocore.awsrequest import AWSResponse
        from botocore.exceptions import EndpointConnectionError

        url = urlparse(request.url)
        key = unquote(url.path.lstrip("/"))
        self.s3_requests.append((request.method, key))
        if self.s3_down is True or self.s3_down == request.method:
            raise EndpointConnectionError(endpoint_url=request.url)
        if request.method == "PUT":
            body = request.body.read() if hasattr(request.body, "read") else bytes(request.body or b"")
            encoding = request.headers.get("Content-Encoding", b"")
            self.bucket[key] = _dechunk(body) if b"aws-chunked" in _bytes(encoding) else body
            return AWSResponse(request.url, 200, {"ETag": '"double"'}, _Raw(b""))
        if key not in self.bucket:
            return AWSResponse(request.url, 404, {}, _Raw(b""))
        data = self.bucket[key]
        body = data if request.method == "GET" else b""
        return AWSResponse(request.url, 200, {"Content-Length": str(len(data))}, _Raw(body))

    # -- Jobs -----------------------------------------------------------------------------------------------------

    def create_compile_job(self, config, compile_job_pb, project_id=None):
        source = self.models.get(compile_job_pb.model.model_id)
        if source is None or not source.uploaded:
            raise self._refuse(config, f"Model {compile_job_pb.model.model_id} is not uploaded")
        runtime = _option(compile_job_pb.options, "--target_runtime") or "tflite"
        if runtime not in RUNTIMES:
            raise self._refuse(config, f"Invalid value for --target_runtime: {runtime}")
        job = self._new_job(config, "compile", compile_job_pb.name, compile_job_pb.options, source,
                            compile_job_pb.devices.devices[0].name)
        job.target_id = self._target(source, job, runtime).model_id
        return _pb().CreateUpdateResponse(id=job.job_id, creation_time=_timestamp(job.created))

    def _target(self, source: ServerModel, job: ServerJob, runtime: str) -> ServerModel:
        """The compiled model, seeded at submission (seed_target_model=true): its spec once the job is done."""
        model_type, extension = RUNTIMES[runtime]
        target = ServerModel(self._new_id("m"), f"{source.name}", model_type, runtime == "onnx", time.time(),
                             f"models/{job.job_id}/target{extension}", uploaded=True, producer_id=job.job_id,
                             onnx=source.onnx, quantized=source.quantized,
                             filename=f"job_{job.job_id}_optimized_{runtime}{extension}", runtime=runtime)
        target.quantize_io = "--quantize_io" in job.options.split() and source.quantized
        scale_in, scale_out = self.quantize_io_scales
        target.inputs = [_quantized(t, scale_in) if target.quantize_io else _copy(t) for t in source.inputs]
        target.outputs = [_quantized(t, scale_out) if target.quantize_io else _copy(t) for t in source.outputs]
        self.models[target.model_id] = target
        return target

    def create_inference_job(self, config, inference_job_pb, project_id=None):
        model = self.models.get(inference_job_pb.model.model_id)
        if model is None or not model.uploaded:
            raise self._refuse(config, f"Model {inference_job_pb.model.model_id} is not uploaded")
        dataset_id = inference_job_pb.dataset.dataset_id
        if dataset_id and (dataset_id not in self.datasets or self.datasets[dataset_id].expires < time.time()):
            raise self._refuse(config, f"Dataset {dataset_id} has expired")
        profiling = inference_job_pb.is_profiling_on
        job = self._new_job(config, "profile" if profiling else "inference", inference_job_pb.name,
                            inference_job_pb.options, model, inference_job_pb.device.name)
        job.dataset_id = dataset_id
        job.failure = job.failure or self._load_failure(model, job) or self._input_failure(model, job)
        return _pb().CreateUpdateResponse(id=job.job_id, creation_time=_timestamp(job.created))

    def _new_job(self, config, kind: str, name: str, options: str, model: ServerModel, device: str) -> ServerJob:
        if device not in DEVICES:
            raise self._refuse(config, f"Device {device} is not available")
        qairt = _option(options, "--qairt_version")
        if qairt is not None and qairt not in self.qairt_versions:
            raise self._refuse(config, f"--qairt_version {qairt} is not available; choose one of "
                                       f"{', '.join(self.qairt_versions)}")
        states = IN_PROGRESS[kind][:1] + self.extra_states.get(kind, ()) + IN_PROGRESS[kind][1:]
        job = ServerJob(self._new_id("j"), kind, name, options, model.model_id, device, time.time(), states,
                        failure=self.fail.pop(kind, ""))
        self.jobs[job.job_id] = job
        return job

    def _load_failure(self, model: ServerModel, job: ServerJob) -> str:
        """A context binary needs a runtime at least as new as the QNN that built it."""
        if model.model_type != "MODEL_TYPE_QNN_CONTEXT_BINARY" or model.producer_id or not self.binary_qnn_version:
            return ""
        runtime = _option(job.options, "--qairt_version") or DEFAULT_QAIRT
        if _version(runtime) >= _version(self.binary_qnn_version):
            return ""
        return (f"Failed to load the QNN context binary: it was generated with QNN {self.binary_qnn_version}, the "
                f"job's runtime is QAIRT {runtime}. Pass --qairt_version {self.binary_qnn_version} in the job options.")

    def _input_failure(self, model: ServerModel, job: ServerJob) -> str:
        if not job.dataset_id:
            return ""
        entries = self.datasets[job.dataset_id].entries or {}
        expected = [(t.name, t.dtype, tuple(t.shape)) for t in model.inputs or []]
        given = [(name, str(arrays[0].dtype), tuple(arrays[0].shape)) for name, arrays in entries.items()]
        if expected == given:
            return ""
        return f"Input specification mismatch: the model takes {expected}, the dataset holds {given}."

    def get_job(self, config, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise self._missing(config, "Job", job_id)
        job.polls += 1
        if self.interrupt_at.get(job.kind) == job.polls:
            raise KeyboardInterrupt
        return self._job_pb(job)

    def _state(self, job: ServerJob) -> str:
        index = max(job.polls - 1, 0) // self.polls_per_state.get(job.kind, 1)
        if index < len(job.states):
            return job.states[index]
        return "FAILED" if job.failure else "SUCCESS"

    def _job_pb(self, job: ServerJob):
        pb = _pb()
        state = self._state(job)
        code = pb.JobState.Value("JOB_STATE_DONE" if state == "SUCCESS" else f"JOB_STATE_{state}")
        reason = job.failure if state == "FAILED" else ""
        version, attributes = DEVICES[job.device]
        device = pb.Device(name=job.device, os=version, attributes=attributes)
        model = self._model_pb(self.models[job.model_id])
        common = dict(name=job.name, options=job.options, job_state=code, failure_reason=reason,
                      creation_time=_timestamp(job.created), model=model, device=device)
        if job.kind == "compile":
            compiled = pb.CompileJob(compile_job_id=job.job_id, devices=pb.DeviceList(devices=[device]), **common)
            compiled.target_model.CopyFrom(self._model_pb(self.models[job.target_id]))
            return pb.Job(compile_job=compiled, hub_version="double")
        inference = pb.InferenceJob(inference_job_id=job.job_id, is_profiling_on=job.kind == "profile", **common)
        if job.dataset_id:
            inference.dataset.CopyFrom(self._dataset_pb(self.datasets[job.dataset_id]))
        return pb.Job(inference_job=inference, hub_version="double")

    def get_job_results(self, config, job_id):
        pb = _pb()
        job = self.jobs.get(job_id)
        if job is None or self._state(job) != "SUCCESS":
            raise self._missing(config, "Job", job_id)  # results exist only for a finished job
        if job.kind == "compile":
            return pb.JobResult(compile_job_result=pb.CompileJobResult(compile_job_id=job_id))
        result = pb.InferenceJobResult(inference_job_id=job_id)
        if job.kind == "profile":
            result.detail.CopyFrom(self._profile(job))
        else:
            job.output_dataset_id = job.output_dataset_id or self._add_dataset(f"{job.name}-outputs", self._run(job))
            result.output_dataset_id = job.output_dataset_id
        return pb.JobResult(inference_job_result=result)

    # -- Sharing --------------------------------------------------------------------------------------------------

    def modify_sharing(self, config, entity_id, entity_type, add_emails, delete_emails):
        job = self.jobs.get(entity_id)
        if job is None:
            raise self._missing(config, "Job", entity_id)
        job.shared_with = [e for e in job.shared_with if e not in delete_emails]
        job.shared_with += [e for e in add_emails if e not in job.shared_with]
        return _pb().CreateUpdateResponse(id=entity_id)

    def get_sharing(self, config, entity_id, entity_type):
        return _pb().SharedAccess(email=self.jobs[entity_id].shared_with)

    # -- What the phone computes ----------------------------------------------------------------------------------

    def _run(self, job: ServerJob) -> dict:
        model = self.models[job.model_id]
        [arrays] = self.datasets[job.dataset_id].entries.values()
        [source_in], [source_out] = model.inputs, model.outputs
        outputs = []
        for array in arrays:
            image = _dequantize(array, source_in)
            depth = self._forward(model, image)
            outputs.append(_quantize(depth, source_out))
        return {source_out.name: outputs}

    def _forward(self, model: ServerModel, image: np.ndarray) -> np.ndarray:
        """One (1,3,480,640) float input through the precision the device would use."""
        if model.onnx is None:  # an opaque context binary: a deterministic stand-in from the pixels
            gray = image.mean(axis=1, keepdims=True)
            return (gray / max(float(gray.max()), 1e-6)).astype(np.float32)
        session = self._session(model.onnx)
        output = session.run(None, {session.get_inputs()[0].name: image.astype(np.float32)})[0]
        if model.quantized:
            return np.round(output * 255) / 255  # 8-bit output steps
        return output.astype(np.float16).astype(np.float32)  # HTP runs float models in fp16

    def _session(self, path: Path):
        return cached_session(self._sessions, path)

    def _profile(self, job: ServerJob):
        """ProfileDetail as the service sends it; figures derived from the model so fp32 and int8 differ."""
        pb = _pb()
        model = self.models[job.model_id]
        layers, size = _layers(model.onnx, len(self.bucket.get(model.key, b"")))
        per_layer_us = max(1, int(size / 1000 / len(layers) * (0.6 if model.quantized else 2.0)))
        iterations = int(_option(job.options, "--max_profiler_iterations") or 100)
        detail = pb.ProfileDetail(major_version=self.profile_version[0], minor_version=self.profile_version[1])
        total = 0
        for index, (name, op_type) in enumerate(layers):
            unit = "CPU" if index >= len(layers) - self.cpu_layers else "NPU"
            layer = pb.LayerDetail(name=name, layer_type_name=op_type,
                                   compute_unit=pb.ComputeUnit.Value(f"COMPUTE_UNIT_{unit}"))
            micros = per_layer_us * (20 if unit == "CPU" else 1)
            total += micros
            if self.layer_timings:
                layer.execution_time = micros
                layer.execution_cycles = micros * 1000
            detail.layer_details.append(layer)
        times = [int(total * (1 + 0.02 * ((i * 7) % 5 - 2))) for i in range(iterations)]
        self._fill_summary(detail, min(times), times, (size * 2, size * 3))
        return detail

    def _fill_summary(self, detail, estimated_us: int, times: list[int], peak: tuple[int, int]) -> None:
        if self.profile_version[0] != 1:  # the older schema: one time, one memory figure
            detail.execution_time, detail.load_time, detail.peak_memory_usage = estimated_us, 150_000, peak[1]
            return
        detail.execution_time, detail.after_execution_peak_memory = estimated_us, peak[1]
        detail.cold_load_time, detail.warm_load_time = 150_000, 40_000
        detail.after_cold_load_peak_memory, detail.after_warm_load_peak_memory = peak[1] * 4 // 3, peak[1]
        if self.profile_memory and self.profile_version[1] >= 1:
            for usage in (detail.compile_memory, detail.cold_load_memory, detail.warm_load_memory,
                          detail.execution_memory):
                usage.increase.lower, usage.increase.upper = peak[0] // 2, peak[1] // 2
                usage.peak.lower, usage.peak.upper = peak
        if self.profile_version[1] >= 2:
            detail.all_execution_times.extend(times)
            detail.all_cold_load_times.append(150_000)
            detail.all_warm_load_times.append(40_000)


# -- Helpers ----------------------------------------------------------------------------------------------------------

class _Raw:
    """The urllib3 response body botocore reads (stream() for the payload, read() for streaming GETs)."""

    def __init__(self, data: bytes):
        self._body = io.BytesIO(data)

    def stream(self, amt: int = 1024, decode_content=None):
        while chunk := self._body.read(amt):
            yield chunk

    def read(self, amt: int | None = None, decode_content=None) -> bytes:
        return self._body.read() if amt is None else self._body.read(amt)

    def close(self) -> None:
        pass


def _no_http(*args, **kwargs):
    raise AssertionError("hub_rest_double: a REST function the double does not answer tried to open an HTTP session")


def _url(config, name: str) -> str:
    base = config.api_url if config is not None else "https://127.0.0.1"
    return f"{base.rstrip('/')}/api/v1/{name.strip('_')}/"


def _connection_error(url: str):
    """What requests raises when the connection fails after urllib3's retries."""
    import requests

    request = requests.Request("GET", url).prepare()
    return requests.exceptions.ConnectionError(
        f"HTTPSConnectionPool: Max retries exceeded with url: {urlparse(url).path} (Caused by NewConnectionError("
        "'Failed to establish a new connection: [Errno 111] Connection refused'))", request=request)


def _credentials(key: str, filename: str = ""):
    return _pb().S3Credentials(access_key_id="ASIADOUBLE", secret_access_key="secret", session_token="session",
                               bucket=BUCKET, key=key, region=REGION, filename=filename or Path(key).name)


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _dechunk(data: bytes) -> bytes:
    """The payload of an aws-chunked body (botocore sends one with a trailing checksum)."""
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def _option(options: str, flag: str) -> str | None:
    words = options.split()
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _copy(tensor: Tensor) -> Tensor:
    return Tensor(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.scale, tensor.zero_point)


def _quantized(tensor: Tensor, scale: float) -> Tensor:
    """--quantize_io: uint8 I/O with the given scale and zero point 0."""
    return Tensor(tensor.name, "uint8", tuple(tensor.shape), scale, 0.0)


def _dequantize(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    if tensor.scale is None:
        return array.astype(np.float32)
    return ((array.astype(np.float32) - (tensor.zero_point or 0.0)) * tensor.scale).astype(np.float32)


def _quantize(array: np.ndarray, tensor: Tensor) -> np.ndarray:
    if tensor.scale is None:
        return array.astype(tensor.dtype)
    limits = np.iinfo(np.dtype(tensor.dtype))
    values = np.round(array / tensor.scale + (tensor.zero_point or 0.0))
    return np.clip(values, limits.min, limits.max).astype(tensor.dtype)


def _tensor_list(tensors: list[Tensor]):
    pb = _pb()
    from qai_hub import api_utils

    types_ = []
    for tensor in tensors:
        tensor_type = pb.TensorType(shape=list(tensor.shape), dtype=api_utils.get_type_value_from_str(tensor.dtype))
        if tensor.scale is not None:
            tensor_type.scale = tensor.scale
            tensor_type.zero_point = tensor.zero_point or 0.0
        types_.append(pb.NamedTensorType(name=tensor.name, tensor_type=tensor_type))
    return pb.NamedTensorTypeList(types=types_)


def _onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's inputs and outputs as the hub reports them (a symbolic batch becomes 1)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def tensors(values) -> list[Tensor]:
        return [Tensor(v.name, np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                       tuple(d.dim_value or 1 for d in v.type.tensor_type.shape.dim))
                for v in values if v.name not in initializers]

    return tensors(graph.input), tensors(graph.output)


def _layers(onnx_path: Path | None, size: int) -> tuple[list[tuple[str, str]], int]:
    if onnx_path is None:
        return [(f"layer_{i}", "Conv2d") for i in range(12)], max(size, 1) * 1000
    import onnx

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    layers = [(node.name or f"{node.op_type}_{i}", node.op_type) for i, node in enumerate(graph.node)
              if node.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    return layers, onnx_path.stat().st_size


def cached_session(sessions: dict, path: Path):
    """One single-threaded ONNX Runtime session per model file: how the doubles 'run' a model."""
    if path not in sessions:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[path] = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    return sessions[path]
