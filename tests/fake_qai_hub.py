"""An in-memory stand-in for the `qai_hub` module (0.56 surface), friendlier than the real client.

The hub stage's own tests (tests/test_aihub.py) no longer use it: they run the real qai-hub client
against tests/hub_rest_double.py, which reproduces what this fake leaves out (empty specs right after
an upload, "" status messages, 429 retry loops, S3 failures, dtype checks, expiring datasets, older
profile schemas). It stays for tests of other stages that only need a hub run's outputs quickly
(tests/test_compare.py), and for the helpers at the end (ptq-like and htp-check-like folders, client.ini).

It implements what lpcv_depth/backends/ai_hub.py uses, with the real module's names and behaviour:
jobs move through the real states one status poll at a time (CREATED -> OPTIMIZING_MODEL for a
compile, CREATED -> PROVISIONING_DEVICE -> MEASURING_PERFORMANCE / RUNNING_INFERENCE for a device
job) and end SUCCESS or FAILED with a reason; the profile is shaped like `download_profile()`'s
(execution_summary in microseconds and bytes, execution_detail with a compute_unit per layer);
inference outputs are computed from the inputs by running the uploaded ONNX with ONNX Runtime,
through the precision the device would use (fp16 for float models, 8-bit output steps for AIMET
models), so fidelity figures downstream are real measurements.

Knobs for failure cases: `token=False` (no client.ini), `network=False` (connection refused),
`fail[kind] = reason` (the next job of that kind fails on the hub), `polls_per_state[kind]` (slow
jobs), `interrupt_at[kind] = n` (Ctrl+C during the n-th status poll), `cpu_layers` (CPU fallback).

Also: helpers that build a ptq-stage-like folder without AIMET (ONNX Runtime's own static QDQ
quantizer makes the host int8 model), so hub and compare tests need no slow calibration, and an
htp-check-like folder holding a QNN context binary, without onnxruntime-qnn.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tests.hub_rest_double import cached_session

API_URL = "https://workbench.aihub.qualcomm.com"
DEVICES = ("Samsung Galaxy S24 (Family)", "Samsung Galaxy S23 (Family)", "Snapdragon 8 Elite QRD")
RUNTIME_EXTENSIONS = {"qnn_context_binary": ".bin", "tflite": ".tflite", "qnn_dlc": ".dlc", "onnx": ".onnx.zip"}
IN_PROGRESS = {"compile": ("CREATED", "OPTIMIZING_MODEL"),
               "profile": ("CREATED", "PROVISIONING_DEVICE", "MEASURING_PERFORMANCE"),
               "inference": ("CREATED", "PROVISIONING_DEVICE", "RUNNING_INFERENCE")}


class Error(Exception):
    pass


class UserError(Error):
    pass


class InternalError(Error):
    pass


class RateLimitedError(Error):
    pass


class _Status(Exception):
    """What the real client's errors are raised from: an APIException with an HTTP status."""

    def __init__(self, status_code: int):
        super().__init__(f"status {status_code}")
        self.status_code = status_code


def _raise(error: Exception, cause: Exception):
    """Raise `error` with `cause` as its hidden context, as qai-hub does (`raise ... from None`)."""
    try:
        raise cause
    except Exception:
        raise error from None


class TensorSpec(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...] | None = None
    scale: float | None = None
    zero_point: float | None = None


@dataclass
class Device:
    name: str = ""
    os: str = ""
    attributes: str | list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobStatus:
    code: str
    message: str | None = None

    @property
    def success(self) -> bool:
        return self.code == "SUCCESS"

    @property
    def failure(self) -> bool:
        return self.code == "FAILED"

    @property
    def finished(self) -> bool:
        return self.code in ("SUCCESS", "FAILED")

    @property
    def pending(self) -> bool:
        return self.code == "CREATED"

    @property
    def running(self) -> bool:
        return not self.finished and not self.pending


class Model:
    def __init__(self, hub: "FakeQaiHub", model_type: str, onnx_path: Path | None, *, quantized: bool = False,
                 quantize_io: bool = False, runtime: str | None = None, payload: bytes = b""):
        self._hub = hub
        self.model_id = hub._new_id("m")
        self.model_type = model_type
        self.onnx_path = onnx_path
        self.quantized = quantized
        self.quantize_io = quantize_io
        self.runtime = runtime
        self.payload = payload
        self.name = onnx_path.stem if onnx_path else "model"

    @property
    def input_spec(self):
        self._hub._api()
        if self.quantize_io:  # camera pixels 0..255 are exactly uint8 with scale 1
            return {None: [TensorSpec("image", "uint8", (1, 3, 480, 640), 1.0, 0.0)]}
        return {None: [TensorSpec("image", "float32", (1, 3, 480, 640))]}

    @property
    def output_spec(self):
        self._hub._api()
        if self.quantize_io:
            return {None: [TensorSpec(self._hub.output_name, "uint8", (1, 1, 480, 640), 1 / 255, 0.0)]}
        return {None: [TensorSpec(self._hub.output_name, "float32", (1, 1, 480, 640))]}

    def download(self, filename: str, timeout: int | None = None) -> str:
        self._hub._api()
        extension = RUNTIME_EXTENSIONS.get(self.runtime or "", ".bin")
        path = filename if filename.endswith(extension) else filename + extension
        Path(path).write_bytes(self.payload)
        return path

    def forward(self, image: np.ndarray) -> np.ndarray:
        """What the phone would compute for one (1,3,480,640) float input."""
        if self.onnx_path is None:  # an opaque context binary: a deterministic stand-in from the pixels
            gray = image.mean(axis=1, keepdims=True)
            return (gray / max(float(gray.max()), 1e-6)).astype(np.float32)
        output = self._hub._session(self.onnx_path).run(None, {"image": image.astype(np.float32)})[0]
        if self.quantized:
            return np.round(output * 255) / 255  # 8-bit output steps
        return output.astype(np.float16).astype(np.float32)  # HTP runs float models in fp16


class Dataset:
    def __init__(self, hub: "FakeQaiHub", data: dict[str, list[np.ndarray]], name: str | None):
        self._hub = hub
        self.dataset_id = hub._new_id("d")
        self.name = name or "dataset"
        self.data = {key: [np.array(a) for a in value] for key, value in data.items()}
        self.expired = False

    def is_expired(self) -> bool:
        return self.expired

    def download(self, filename: str | None = None):
        self._hub._api()
        return self.data


class Job:
    def __init__(self, hub: "FakeQaiHub", kind: str, model: Model, options: str, *, target: Model | None = None,
                 inputs: Dataset | None = None):
        self._hub = hub
        self.kind = kind
        self.job_id = hub._new_id("j")
        self.url = f"{API_URL}/jobs/{self.job_id}/"
        self.model = model
        self.options = options
        self.target = target
        self.inputs = inputs
        self.polls = 0
        self.failure_reason = hub.fail.pop(kind, None)
        self.shared_with: list[str] = []

    def get_status(self) -> JobStatus:
        self._hub._api()
        self.polls += 1
        self._hub.polls[self.kind] += 1
        if self._hub.interrupt_at.get(self.kind) == self.polls:
            raise KeyboardInterrupt
        states = IN_PROGRESS[self.kind]
        index = (self.polls - 1) // self._hub.polls_per_state.get(self.kind, 1)
        if index < len(states):
            return JobStatus(states[index])
        if self.failure_reason:
            return JobStatus("FAILED", self.failure_reason)
        return JobStatus("SUCCESS")

    def _finished_ok(self) -> bool:
        """Whether the job has (been seen to have) succeeded: results exist only after that."""
        in_progress = len(IN_PROGRESS[self.kind]) * self._hub.polls_per_state.get(self.kind, 1)
        return self.polls > in_progress and not self.failure_reason

    def get_target_model(self) -> Model | None:
        self._hub._api()
        return self.target if self._finished_ok() else None

    def download_profile(self) -> dict:
        self._hub._api()
        return self._hub._profile(self) if self._finished_ok() else {}

    def download_output_data(self):
        self._hub._api()
        if not self._finished_ok() or self.inputs is None:
            return None
        [images] = self.inputs.data.values()
        outputs = []
        for image in images:
            if self.model.quantize_io:
                image = image.astype(np.float32)  # scale 1, zero point 0
            output = self.model.forward(image)
            if self.model.quantize_io:
                output = np.clip(np.round(output * 255), 0, 255).astype(np.uint8)
            outputs.append(output)
        return {self._hub.output_name: outputs}

    def modify_sharing(self, add_emails: list[str] | None = None, delete_emails: list[str] | None = None) -> None:
        self._hub._api()
        if not add_emails and not delete_emails:
            raise UserError("Either add_emails or delete_emails must be specified and non-empty")
        if not isinstance(add_emails or [], list):
            raise UserError("add_emails and delete_emails must both be lists")
        self.shared_with.extend(add_emails or [])


class FakeQaiHub:
    """The module object: pass it as HubClient(module=FakeQaiHub(...), preflight=False)."""

    Error = Error
    UserError = UserError
    InternalError = InternalError
    RateLimitedError = RateLimitedError
    Device = Device
    __version__ = "0.56.0-fake"

    def __init__(self, *, token: bool = True, network: bool = True, cpu_layers: int = 0,
                 output_name: str = "depth", seed: int = 0):
        self.token = token
        self.network = network
        self.cpu_layers = cpu_layers
        self.output_name = output_name
        self.fail: dict[str, str] = {}
        self.polls_per_state: dict[str, int] = {}
        self.interrupt_at: dict[str, int] = {}
        self.polls = {kind: 0 for kind in IN_PROGRESS}
        self.jobs: dict[str, Job] = {}
        self.models: dict[str, Model] = {}
        self.datasets: dict[str, Dataset] = {}
        self.submitted: list[tuple[str, str, str]] = []  # (kind, job id, options)
        self.uploads: list[str] = []  # model ids, in upload order
        self._rng = random.Random(seed)
        self._sessions: dict[Path, object] = {}

    # The module's functions (a qai_hub.Client has the same methods: this object plays both)

    def Client(self) -> "FakeQaiHub":  # noqa: N802 - qai_hub.Client
        return self

    def upload_model(self, model, name: str | None = None, project=None) -> Model:
        self._api()
        path = Path(model)
        if path.is_dir() and path.suffix == ".aimet":
            onnx_files = list(path.glob("*.onnx"))
            if len(onnx_files) != 1 or len(list(path.glob("*.encodings"))) != 1:
                raise UserError(f"Model directory '{path}' must contain exactly one .onnx file.")
            uploaded = Model(self, "AIMET_ONNX", onnx_files[0], quantized=True)
        elif path.suffix == ".onnx" and path.is_file():
            uploaded = Model(self, "ONNX", path)
        elif path.suffix == ".bin" and path.is_file():
            uploaded = Model(self, "QNN_CONTEXT_BINARY", None, runtime="qnn_context_binary",
                             payload=path.read_bytes())
        else:
            raise UserError(f"Unsupported model type for '{model}'.")
        self.models[uploaded.model_id] = uploaded
        self.uploads.append(uploaded.model_id)
        return uploaded

    def get_model(self, model_id: str) -> Model:
        self._api()
        if model_id not in self.models:
            _raise(UserError(f"Model ID '{model_id}' could not be found."), _Status(404))
        return self.models[model_id]

    def upload_dataset(self, data, name: str | None = None, project=None) -> Dataset:
        self._api()
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise UserError("All features must have the same number of samples")
        dataset = Dataset(self, data, name)
        self.datasets[dataset.dataset_id] = dataset
        return dataset

    def get_dataset(self, dataset_id: str) -> Dataset:
        self._api()
        if dataset_id not in self.datasets:
            _raise(UserError(f"Dataset ID '{dataset_id}' could not be found."), _Status(404))
        return self.datasets[dataset_id]

    def submit_compile_job(self, model, device, name=None, input_specs=None, options="", single_compile=True,
                           calibration_data=None, retry=True, project=None) -> Job:
        self._api()
        self._check_device(device)
        runtime = _option(options, "--target_runtime") or "tflite"
        if runtime not in RUNTIME_EXTENSIONS:
            raise UserError(f"Invalid value for --target_runtime: {runtime}")
        source = model if isinstance(model, Model) else self.upload_model(model)
        target = Model(self, runtime.upper(), source.onnx_path, quantized=source.quantized,
                       quantize_io="--quantize_io" in options.split() and source.quantized, runtime=runtime,
                       payload=b"compiled:" + runtime.encode() + b":" + source.model_id.encode())
        self.models[target.model_id] = target
        return self._register(Job(self, "compile", source, options, target=target))

    def submit_profile_job(self, model, device, name=None, options="", retry=True, project=None) -> Job:
        return self.submit_inference_job(model, device, inputs=None, name=name, options=options, profile=True)

    def submit_inference_job(self, model, device, inputs=None, name=None, options="", retry=True, profile=True,
                             project=None) -> Job:
        self._api()
        self._check_device(device)
        if inputs is None and not profile:
            raise UserError("Inference requires inputs. Either supply `inputs`, or set `profile=True`")
        if not isinstance(model, Model):
            raise UserError("the fake hub takes uploaded or compiled Model objects only")
        if model.model_type == "AIMET_ONNX":
            raise UserError("Inference cannot be run on the supplied model type until is has been compiled.")
        if inputs is not None and not isinstance(inputs, Dataset):
            inputs = self.upload_dataset(inputs)
        return self._register(Job(self, "profile" if profile else "inference", model, options, inputs=inputs))

    def get_job(self, job_id: str) -> Job:
        self._api()
        if job_id not in self.jobs:
            _raise(UserError(f"Job ID '{job_id}' could not be found. It may not exist or you may not have "
                             "permission to view it."), _Status(404))
        return self.jobs[job_id]

    # Internals

    def _api(self) -> None:
        """What every request meets first in the real client: the config file, then the network."""
        if not self.token:
            _raise(UserError("Failed to load client configuration file.\n| ~/.qai_hub/client.ini not found. |"),
                   FileNotFoundError("~/.qai_hub/client.ini not found"))
        if not self.network:
            _raise(InternalError("Internal API failure.\n| Could not connect to Qualcomm AI Hub. |"),
                   ConnectionRefusedError("Connection refused"))

    def _check_device(self, device) -> None:
        devices = device if isinstance(device, list) else [device]
        for dev in devices:
            if dev.name not in DEVICES:
                raise UserError(f"{dev} is not available.")

    def _register(self, job: Job) -> Job:
        self.jobs[job.job_id] = job
        self.submitted.append((job.kind, job.job_id, job.options))
        return job

    def _new_id(self, prefix: str) -> str:
        return prefix + "".join(self._rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))

    def _session(self, path: Path):
        return cached_session(self._sessions, path)

    def _profile(self, job: Job) -> dict:
        """download_profile()'s layout; figures derived from the model so fp32 and int8 differ as they would."""
        model = job.model
        if model.onnx_path is not None:
            import onnx

            graph = onnx.load(os.fspath(model.onnx_path), load_external_data=False).graph
            layers = [(node.name or f"{node.op_type}_{i}", node.op_type) for i, node in enumerate(graph.node)
                      if node.op_type not in ("QuantizeLinear", "DequantizeLinear")]
            size = model.onnx_path.stat().st_size
        else:
            layers = [(f"layer_{i}", "Conv2d") for i in range(12)]
            size = len(model.payload) * 1000
        per_layer_us = max(1, int(size / 1000 / len(layers) * (0.6 if model.quantized else 2.0)))
        iterations = int(_option(job.options, "--max_profiler_iterations") or 100)
        detail = []
        for index, (name, op_type) in enumerate(layers):
            unit = "CPU" if index >= len(layers) - self.cpu_layers else "NPU"
            detail.append({"name": name, "type": op_type, "compute_unit": unit,
                           "execution_time": per_layer_us * (20 if unit == "CPU" else 1), "execution_cycles": 0})
        total_us = sum(layer["execution_time"] for layer in detail)
        times = [int(total_us * (1 + 0.02 * ((i * 7) % 5 - 2))) for i in range(iterations)]
        peak = (size * 2, size * 3)
        summary = {
            "estimated_inference_time": int(np.min(times)), "estimated_inference_peak_memory": peak[1],
            "first_load_time": 150_000, "first_load_peak_memory": size * 4,
            "warm_load_time": 40_000, "warm_load_peak_memory": size * 3, "compile_time": 0, "compile_peak_memory": 0,
        }
        for stage in ("compile", "first_load", "warm_load", "inference"):
            summary[f"{stage}_memory_increase_range"] = (peak[0] // 2, peak[1] // 2)
            summary[f"{stage}_memory_peak_range"] = peak
        summary["all_inference_times"] = times
        return {"execution_summary": summary, "execution_detail": detail}


def _option(options: str, flag: str) -> str | None:
    words = options.split()
    for word, value in itertools.zip_longest(words, words[1:]):
        if word == flag:
            return value
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def write_client_ini(folder: Path, *, token: str | None = "fake-token", api_url: str = API_URL) -> Path:
    """A ~/.qai_hub/client.ini as `qai-hub configure` writes it (token None: the key is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "client.ini"
    lines = ["[api]", f"api_url = {api_url}", f"web_url = {api_url}", "verbose = True"]
    if token is not None:
        lines.insert(1, f"api_token = {token}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_ptq_folder(export_dir: Path, out: Path, calibration: list[Path], *, eval_metrics: dict | None = None) -> Path:
    """A folder laid out like quantize/ptq.py's, without AIMET: `<model>.aimet/` (the float ONNX plus an
    encodings file), a real int8 `model_qdq.onnx` from ONNX Runtime's static quantizer, measured
    int8-vs-fp32 figures, and manifest.json last."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from lpcv_depth.images import load_contract_batch
    from lpcv_depth.stage import StageLog
    from lpcv_depth.manifest import read_manifest, sha256_file, write_manifest
    from lpcv_depth.verify import OrtRunner, sqnr_db

    export = read_manifest(export_dir)
    name = export["config"]["model"]
    images = load_contract_batch(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    out.mkdir(parents=True)
    aimet = out / f"{name}.aimet"
    aimet.mkdir()
    fp32_onnx = export_dir / "model.onnx"
    shutil.copy(fp32_onnx, aimet / f"{name}.onnx")
    (aimet / f"{name}.encodings").write_text(json.dumps({"activation_encodings": {}, "param_encodings": {}}))
    qdq = out / "model_qdq.onnx"
    quantize_static(os.fspath(fp32_onnx), os.fspath(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    fp32_runner, int8_runner = OrtRunner(fp32_onnx, threads=1), OrtRunner(qdq, threads=1)
    fp32_out, int8_out = fp32_runner.run(images), int8_runner.run(images)
    results = {
        "preset": "w8a8",
        "int8_vs_fp32": {"sqnr_db": sqnr_db(fp32_out, int8_out),
                         "max_abs_diff": float(np.max(np.abs(fp32_out - int8_out))), "holdout_images": len(images)},
        "host_latency_ms": {"fp32": fp32_runner.median_latency_ms(images[:1], 2),
                            "int8_qdq": int8_runner.median_latency_ms(images[:1], 2), "runs": 2},
        "sizes_bytes": {"fp32_onnx": fp32_onnx.stat().st_size, "qdq_onnx": qdq.stat().st_size,
                        "aimet_onnx": (aimet / f"{name}.onnx").stat().st_size,
                        "aimet_encodings": (aimet / f"{name}.encodings").stat().st_size},
    }
    if eval_metrics is not None:
        results["ground_truth"] = eval_metrics
    np.savez_compressed(out / "holdout_outputs.npz", fp32=fp32_out, int8_qdq=int8_out)
    config = {"fp32": os.fspath(export_dir), "preset": "w8a8", "destination": os.fspath(out)}
    inputs = {"fp32_onnx": {"path": os.fspath(fp32_onnx), "sha256": sha256_file(fp32_onnx)}}
    write_manifest(out, stage="ptq", config=config, inputs=inputs,
                   outputs=[aimet / f"{name}.onnx", aimet / f"{name}.encodings", qdq],
                   timings=StageLog("ptq").timings, results=results)
    return out


def make_htp_check_folder(ptq_dir: Path, out: Path, binary: bytes = b"QNN context binary" * 100, *,
                          qnn_sdk_version: str = "2.51.0", companion_io: tuple | None = None) -> Path:
    """A folder laid out like the htp-check stage's, without onnxruntime-qnn: a stand-in context binary
    and a manifest whose typed results (HtpCheckResults) describe it. The binary is not listed among
    the manifest's outputs, so a test may delete it and see the hub stage's own check.

    companion_io: ((input name, dtype), (output name, dtype)) writes model_ctx.onnx, the EPContext
    model htp-check keeps beside the binary, whose graph declares the binary's I/O."""
    from lpcv_depth.manifest import sha256_file, write_manifest
    from lpcv_depth.results import ContextBinary, Coverage, HtpCheckResults

    out.mkdir(parents=True)
    path = out / "model_ctx_qnn.bin"
    path.write_bytes(binary)
    if companion_io is not None:
        _write_context_onnx(out / "model_ctx.onnx", path.name, *companion_io)
    coverage = Coverage(full_htp=True, htp_partitions=1, htp_nodes=1, htp_op_types={"Conv": 1}, cpu_nodes=0,
                        cpu_op_types={}, cpu_node_names=[], refused=[], no_fallback_error=None, build_s=0.0)
    context = ContextBinary(onnx="model_ctx.onnx", path=path.name, bytes=path.stat().st_size, onnx_bytes=0,
                            sha256=sha256_file(path), build_s=0.0, reload_s=0.0, htp_arch="75", soc_model="57",
                            qnn_sdk_version=qnn_sdk_version, full_htp=True, htp_partitions=1,
                            io="float32 in, float32 out",
                            build_note="fake", ai_hub="fake")
    results = HtpCheckResults(target={"htp_arch": "75", "soc_model": "57"}, emulation_note="fake", warnings=[],
                              qnn={}, model={}, coverage=coverage, emulation_time={}, numerics={},
                              context_binary=context)
    write_manifest(out, stage="htp-check", config={"ptq": os.fspath(ptq_dir), "destination": os.fspath(out)},
                   inputs={}, outputs=[], timings={}, results=results)
    return out


def _write_context_onnx(path: Path, binary: str, image: tuple[str, str], depth: tuple[str, str]) -> None:
    """An EPContext wrapper like onnxruntime-qnn writes: one node pointing at the context binary; its
    graph inputs and outputs are the binary's."""
    import onnx
    from onnx import helper

    types = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}
    node = helper.make_node("EPContext", [image[0]], [depth[0]], domain="com.microsoft", embed_mode=0,
                            ep_cache_context=binary, source="QNN")
    graph = helper.make_graph([node], "ctx",
                              [helper.make_tensor_value_info(image[0], types[image[1]], [1, 3, 480, 640])],
                              [helper.make_tensor_value_info(depth[0], types[depth[1]], [1, 1, 480, 640])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
