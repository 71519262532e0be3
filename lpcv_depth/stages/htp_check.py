"""Local QNN HTP check: the int8 QDQ model through the Snapdragon 8 Gen 3 NPU's own arithmetic, on the host.

    python quantize/htp_check.py --ptq build/fastdepth/ptq-w8a8
    python quantize/htp_check.py --ptq build/fastdepth/ptq-w8a8 --eval-data ../shared/data/rgbd --max-frames 8
    python quantize/htp_check.py --ptq build/fastdepth/ptq-w8a8 --require-full-htp --max-fscore-drop 1.0  # CI gate
    python quantize/htp_check.py --ptq my_model_qdq.onnx --images calibration_data --fp32 model.onnx

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
is orders of magnitude faster. Only an AI Hub profile job measures the phone.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lpcv_depth.errors import ConfigError, ContractError, ExitCode, GateError, LpcvError, MissingDependencyError
from lpcv_depth.stage import StageLog, StagingDir, exit_status
from lpcv_depth.manifest import MANIFEST_NAME, config_as_dict, read_manifest, sha256_file, write_manifest
from lpcv_depth.verify import ParityThresholds, sqnr_db

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE = "htp-check"
QNN_EP = "QNNExecutionProvider"
QNN_INSTALL = 'pip install -e ".[qnn]"   (Linux x86_64 only)'
# Qnn_SocModel ids (QNN SDK "Supported Snapdragon devices"); SM8650 is the Galaxy S24's Snapdragon 8 Gen 3.
SOC_MODELS = {"SM8450": "36", "SM8550": "43", "SM8650": "57", "SM8750": "69"}
SM8650 = SOC_MODELS["SM8650"]
HTP_ARCHS = ("68", "69", "73", "75", "79", "81")
CONTEXT_ONNX = "model_ctx.onnx"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
EMULATION_NOTE = ("host emulation: the QNN HTP backend built for x86 computing the NPU's arithmetic on this CPU. "
                  "These times are NOT device latency; the phone's NPU is far faster. Use an AI Hub profile job "
                  "for latency.")
HUB_CONTEXT_NOTE = ("qai-hub 0.56 takes a QNN context binary for profile/inference jobs as a .bin file "
                    "(SourceModelType.QNN_CONTEXT_BINARY, devices with framework:qnn), or this folder's "
                    "model_ctx.onnx + model_ctx_qnn.bin as an ONNX model with a precompiled QNN context. "
                    "A context binary only loads on a QNN runtime at least as new as the one that built it "
                    "(qnn_sdk_version here): pick a matching --qairt_version on AI Hub.")
# ORT's message when a node lands on the CPU although fallback is disabled.
_FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"
_PHONE_CPU_COST = ("On the phone every HTP/CPU boundary costs a round trip off the NPU: qai-hub-models measured "
                   "Depth-Anything-V2 w8a16 at 303 ms with 42 layers on the CPU, against milliseconds fully on "
                   "the NPU.")


class HtpRefusedError(ContractError):
    """The QNN HTP backend cannot build the model at all (not even with CPU fallback)."""


@dataclass(frozen=True)
class HtpCheckConfig:
    """What to check (a ptq folder or a QDQ .onnx), for which HTP, on which images; validated here."""

    ptq: Path
    soc_model: str = SM8650
    htp_arch: str = "75"
    # Photos for the numerics; default: the ptq stage's held-out images (never seen by calibration).
    images: Path | None = None
    # The float model for the fp32 references and the fp16 HTP baseline; default: the ptq stage's.
    fp32_onnx: Path | None = None
    eval_data: Path | None = None
    # At most this many held-out images, and at most this many RGB-D frames (spread over the sets):
    # the emulation takes seconds to minutes per frame.
    max_frames: int | None = None
    fp16_baseline: bool = True
    context_binary: bool = True
    # HTP-emulated int8 against ONNX Runtime's CPU kernels on the same QDQ graph: the HTP requantizes
    # in its own fixed-point arithmetic, so a few quantization steps apart is normal; past these the
    # HTP computes something else (a warning, and recorded).
    cpu_parity: ParityThresholds = field(default_factory=lambda: ParityThresholds(max_abs_diff=0.25, min_sqnr_db=20.0))
    # F-scores with a model's output as pseudo-GT back-project every pixel (exact, as ptq reports them;
    # seconds per image); N samples a seeded subset of N pixels instead, which changes the score slightly.
    fscore_max_points: int | None = None
    # Gates: exit 3 when missed.
    require_full_htp: bool = False
    max_fscore_drop: float | None = None
    min_sqnr_db: float | None = None
    out_dir: Path | None = None

    def __post_init__(self):
        ptq = Path(self.ptq)
        if ptq.is_dir():
            if not (ptq / MANIFEST_NAME).is_file() or read_manifest(ptq).get("stage") != "ptq":
                raise ConfigError(f"{ptq} is not a ptq stage output (no ptq {MANIFEST_NAME})",
                                  hint="pass the folder python quantize/ptq.py wrote, or a QDQ .onnx file")
            if not (ptq / "model_qdq.onnx").is_file():
                raise ConfigError(f"{ptq} has no model_qdq.onnx", hint="re-run python quantize/ptq.py")
        elif ptq.is_file():
            if ptq.suffix != ".onnx":
                raise ConfigError(f"--ptq {ptq} is neither a ptq folder nor an .onnx file")
            if self.images is None:
                raise ConfigError(f"{ptq.name} is a bare ONNX file: there are no held-out images to check it on",
                                  hint="pass --images FOLDER (photos the model was not calibrated on), or pass "
                                       "the ptq folder instead")
        else:
            raise ConfigError(f"--ptq not found: {ptq}", hint="run python quantize/ptq.py first")
        if not (self.soc_model.isdigit() and int(self.soc_model) > 0):
            raise ConfigError(f"soc_model must be a positive QNN SoC id, got {self.soc_model!r}",
                              hint=f"the Galaxy S24 (SM8650) is {SM8650}; others: {SOC_MODELS}")
        if self.htp_arch not in HTP_ARCHS:
            raise ConfigError(f"htp_arch must be one of {HTP_ARCHS}, got {self.htp_arch!r}",
                              hint="the Snapdragon 8 Gen 3 (Galaxy S24) is 75")
        for name in ("images", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise ConfigError(f"--{name.replace('_', '-')} folder not found: {value}")
        if self.fp32_onnx is not None and not Path(self.fp32_onnx).is_file():
            raise ConfigError(f"--fp32 model not found: {self.fp32_onnx}")
        if self.fscore_max_points is not None and self.fscore_max_points < 100:
            raise ConfigError(f"fscore_max_points must be >= 100 (or None: every pixel), got {self.fscore_max_points}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.max_fscore_drop is not None and self.max_fscore_drop < 0:
            raise ConfigError(f"max_fscore_drop must be >= 0, got {self.max_fscore_drop}")

    @property
    def ptq_dir(self) -> Path | None:
        return Path(self.ptq) if Path(self.ptq).is_dir() else None

    @property
    def qdq_onnx(self) -> Path:
        return self.ptq_dir / "model_qdq.onnx" if self.ptq_dir else Path(self.ptq)

    @property
    def destination(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return (self.ptq_dir or Path(self.ptq).parent) / "htp-check"

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class HtpCheckResult:
    out_dir: Path
    context_onnx: Path | None
    report: dict
    manifest: dict


# ---------------------------------------------------------------------------------------------
# The QNN execution provider


@dataclass(frozen=True)
class QnnBackend:
    """onnxruntime-qnn, registered with ONNX Runtime as a plugin execution provider."""

    devices: tuple
    htp_library: str
    version: str
    qnn_sdk_version: str


_REGISTERED: dict[str, QnnBackend] = {}


def import_qnn() -> QnnBackend:
    """onnxruntime-qnn registered with ONNX Runtime (once per process), or MissingDependencyError
    saying what is missing and how to get it."""
    if QNN_EP in _REGISTERED:
        return _REGISTERED[QNN_EP]
    machine = platform.machine().lower()
    if not (sys.platform.startswith("linux") and machine in ("x86_64", "amd64")):
        raise MissingDependencyError(
            f"the local HTP check needs onnxruntime-qnn's Linux x86_64 wheel, the only build that carries the HTP "
            f"backend compiled for a host CPU (libQnnHtp.so, libHtpPrepare.so); this machine is "
            f"{sys.platform}/{platform.machine()}",
            hint="run this stage on Linux x86_64 (or in a Linux x86_64 container), or skip it and measure on the "
                 "phone with python export/aihub.py")
    try:
        import onnxruntime_qnn
    except ImportError as err:
        raise MissingDependencyError(f"onnxruntime-qnn is not importable: {err}", hint=QNN_INSTALL) from err
    import onnxruntime as ort

    if not hasattr(ort, "register_execution_provider_library"):
        raise MissingDependencyError(f"onnxruntime {ort.__version__} cannot load plugin execution providers "
                                     "(onnxruntime-qnn 2.x is one)", hint='pip install -e .   (onnxruntime==1.32.0)')
    provider_library, htp_library = onnxruntime_qnn.get_library_path(), onnxruntime_qnn.get_qnn_htp_path()
    for path in (provider_library, htp_library):
        if not Path(path).is_file():
            raise MissingDependencyError(f"onnxruntime-qnn is installed but {Path(path).name} is missing from "
                                         f"{Path(path).parent}", hint='pip install --force-reinstall "onnxruntime-qnn==2.7.0"')
    already = any(device.ep_name == QNN_EP for device in ort.get_ep_devices())
    try:
        if not already:
            ort.register_execution_provider_library(QNN_EP, provider_library)
    except Exception as err:  # onnxruntime raises its own exception types for a library it cannot load
        raise MissingDependencyError(f"ONNX Runtime cannot load the QNN execution provider {provider_library}: "
                                     f"{type(err).__name__}: {err}",
                                     hint='pip install --force-reinstall "onnxruntime==1.32.0" "onnxruntime-qnn==2.7.0"') from err
    devices = tuple(device for device in ort.get_ep_devices() if device.ep_name == QNN_EP)
    if not devices:
        raise MissingDependencyError("the QNN execution provider loaded but offers no device to run on",
                                     hint='pip install --force-reinstall "onnxruntime-qnn==2.7.0"')
    info = getattr(onnxruntime_qnn, "build_and_package_info", None)
    backend = QnnBackend(devices=devices, htp_library=htp_library, version=getattr(onnxruntime_qnn, "__version__", "?"),
                         qnn_sdk_version=getattr(info, "qnn_version", "unknown"))
    _REGISTERED[QNN_EP] = backend
    return backend


class HtpSession:
    """An ONNX Runtime session whose QNN partitions run on the HTP backend (emulated on x86 here)."""

    def __init__(self, model_path: Path, backend: QnnBackend, *, soc_model: str, htp_arch: str, cpu_fallback: bool,
                 fp16: bool = False, context_onnx: Path | None = None, verbose: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 0 if verbose else 3
        if not cpu_fallback:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if context_onnx is not None:
            options.add_session_config_entry("ep.context_enable", "1")
            options.add_session_config_entry("ep.context_file_path", os.fspath(context_onnx))
            # 0: the context lives in <name>_qnn.bin beside the ONNX, so its size and hash are visible.
            options.add_session_config_entry("ep.context_embed_mode", "0")
        provider = {"backend_path": backend.htp_library, "soc_model": soc_model, "htp_arch": htp_arch,
                    # Graph input quantization and output dequantization stay inside the QNN graph: the
                    # context takes the contract's float32 image and returns float32 depth.
                    "offload_graph_io_quantization": "0",
                    "enable_htp_fp16_precision": "1" if fp16 else "0"}
        options.add_provider_for_devices(list(backend.devices), provider)
        self.path = Path(model_path)
        self.session = ort.InferenceSession(os.fspath(model_path), options)
        self.input_name = self.session.get_inputs()[0].name
        self.frame_seconds: list[float] = []

    def run(self, images: np.ndarray) -> np.ndarray:
        """One image at a time (the contract's batch is 1); each run's emulation time is kept."""
        outputs = []
        for image in images:
            start = time.perf_counter()
            outputs.append(self.session.run(None, {self.input_name: image[None].astype(np.float32)})[0])
            self.frame_seconds.append(time.perf_counter() - start)
        return np.concatenate(outputs)

    def timing(self) -> dict:
        seconds = self.frame_seconds
        return {"frames": len(seconds), "mean_s_per_frame": float(np.mean(seconds)) if seconds else None,
                "median_s_per_frame": float(np.median(seconds)) if seconds else None, "note": EMULATION_NOTE}


@contextmanager
def native_stderr() -> Iterator[io.StringIO]:
    """Capture what native code (ONNX Runtime, QNN) writes to file descriptor 2; Python's own
    sys.stderr is untouched. The text is in the yielded buffer once the block ends."""
    captured = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read().decode("utf-8", "replace"))


def parse_refusals(log_text: str) -> list[dict]:
    """The nodes QNN refused and why, from ONNX Runtime's verbose log of the QNN EP's GetCapability."""
    refused: dict[str, dict] = {}
    lines = log_text.splitlines()
    for index, line in enumerate(lines):
        if "Validation FAILED" not in line:
            continue
        nodes, reason = [], ""
        for follow in lines[index + 1:index + 64]:
            match = re.match(r"\s*Operator type: (\S+) Node name: (.*?) Node index: (\d+)", follow)
            if match:
                nodes.append(match.groups())
            elif "REASON :" in follow:
                reason = follow.split("REASON :", 1)[1].strip()
                break
        for op_type, name, node_index in nodes:
            refused.setdefault(node_index, {"op_type": op_type, "name": name, "reason": reason})
    return list(refused.values())


# ---------------------------------------------------------------------------------------------
# The model


def inspect_qdq_model(path: Path) -> dict:
    """Op counts and activation bit widths of the QDQ graph; ContractError for a float-only model."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends for a file that is not a model
        raise ContractError(f"{path} is not a readable ONNX model: {type(err).__name__}: {err}") from err
    ops = collections.Counter(node.op_type for node in model.graph.node)
    if not ops["QuantizeLinear"] or not ops["DequantizeLinear"]:
        raise ContractError(
            f"{path.name} is not a QDQ int8 model: it has {ops['QuantizeLinear']} QuantizeLinear and "
            f"{ops['DequantizeLinear']} DequantizeLinear nodes ({sum(ops.values())} nodes, "
            f"{', '.join(f'{op} x{n}' for op, n in ops.most_common(4))})",
            hint="pass the ptq stage's folder (python quantize/ptq.py) or its model_qdq.onnx; a float model goes "
                 "through --fp32 for the fp16 baseline")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    activation_types = collections.Counter()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in initializers:
            activation_types[onnx.helper.tensor_dtype_to_np_dtype(initializers[node.input[2]].data_type).name] += 1
    return {"nodes": sum(ops.values()), "op_types": dict(ops.most_common()),
            "activation_quantize_dtypes": dict(activation_types),
            "opset": max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=None)}


def partition_from_context(context_onnx: Path, model_ops: dict) -> dict:
    """Which nodes the HTP took and which stayed on the CPU, read from the EPContext model: each QNN
    partition became one EPContext node, every node left as it was runs on ONNX Runtime's CPU EP."""
    import onnx

    graph = onnx.load(os.fspath(context_onnx), load_external_data=False).graph
    contexts = [node for node in graph.node if node.op_type == "EPContext"]
    cpu_nodes = [node for node in graph.node if node.op_type != "EPContext"]
    cpu_ops = collections.Counter(node.op_type for node in cpu_nodes)
    htp_ops = {op: count - cpu_ops.get(op, 0) for op, count in model_ops.items() if count - cpu_ops.get(op, 0) > 0}
    return {"full_htp": not cpu_nodes, "htp_partitions": len(contexts),
            "htp_nodes": sum(htp_ops.values()), "htp_op_types": htp_ops,
            "cpu_nodes": len(cpu_nodes), "cpu_op_types": dict(cpu_ops.most_common()),
            "cpu_node_names": [node.name or f"<unnamed {node.op_type}>" for node in cpu_nodes][:200]}


@dataclass
class _Compiled:
    session: HtpSession
    partition: dict
    build_s: float
    refused: list
    error: str | None


def compile_for_htp(qdq: Path, backend: QnnBackend, config: HtpCheckConfig, context_onnx: Path,
                    model_ops: dict) -> _Compiled:
    """Compile with CPU fallback disabled (writing the EPContext model + context binary). If the HTP
    refuses nodes, a verbose throwaway build names them with QNN's reason, and a fallback-enabled
    build gives the HTP/CPU partition and the session that runs the numerics."""
    options = dict(soc_model=config.soc_model, htp_arch=config.htp_arch)
    start = time.perf_counter()
    try:
        # ONNX Runtime prints each refusal as an error line; the stage reports them itself.
        with native_stderr() as native_log:
            session = HtpSession(qdq, backend, cpu_fallback=False, context_onnx=context_onnx, **options)
        return _Compiled(session, partition_from_context(context_onnx, model_ops), time.perf_counter() - start, [], None)
    except Exception as err:  # onnxruntime's Fail / RuntimeException carry the reason in the message only
        if _FALLBACK_REFUSED not in str(err):
            raise HtpRefusedError(f"the QNN HTP backend cannot compile {qdq.name}: {type(err).__name__}: {err}"
                                  + _log_tail(native_log.getvalue()),
                                  hint="the QNN lines above name the op, shape or quantization encoding the HTP "
                                       "backend cannot build") from err
        no_fallback_error = str(err).strip()
    for stale in context_onnx.parent.glob(f"{context_onnx.stem}*"):
        stale.unlink()
    with native_stderr() as verbose_log:
        try:
            HtpSession(qdq, backend, cpu_fallback=True, verbose=True, **options)
        except Exception:  # the build below raises it again, with the reason
            pass
    refused = explain_refusals(qdq, parse_refusals(verbose_log.getvalue()))
    start = time.perf_counter()
    try:
        with native_stderr() as native_log:
            session = HtpSession(qdq, backend, cpu_fallback=True, context_onnx=context_onnx, **options)
    except Exception as err:  # as above
        raise HtpRefusedError(f"the QNN HTP backend cannot compile {qdq.name} even with CPU fallback: "
                              f"{type(err).__name__}: {err}" + _log_tail(native_log.getvalue()),
                              hint="the op or encoding named above can neither run on the HTP nor be handed to "
                                   "the CPU") from err
    build_s = time.perf_counter() - start
    return _Compiled(session, partition_from_context(context_onnx, model_ops), build_s, refused, no_fallback_error)


def _log_tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.splitlines() if "LIBNATIVE" not in line and line.strip()][-lines:]
    return ("\n  native log:\n    " + "\n    ".join(kept)) if kept else ""


def explain_refusals(qdq: Path, refused: list[dict]) -> list[dict]:
    """Add the likely cause to refused weight DequantizeLinear nodes: their consumer's activation input
    has no QuantizeLinear/DequantizeLinear, so the op cannot run as an int8 op and its per-channel
    weights cannot be dequantized on the HTP on their own."""
    if not any(row["op_type"] == "DequantizeLinear" for row in refused):
        return refused
    import onnx

    graph = onnx.load(os.fspath(qdq), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    by_name = {node.name: node for node in graph.node if node.name}
    for row in refused:
        node = by_name.get(row["name"])
        if row["op_type"] != "DequantizeLinear" or node is None:
            continue
        for consumer in consumers[node.output[0]]:
            activation = consumer.input[0] if consumer.input else ""
            source = producers.get(activation)
            if activation not in node.output and (source is None or source.op_type != "DequantizeLinear"):
                origin = f"{source.op_type} {source.name!r}" if source else f"graph input {activation!r}"
                row["cause"] = (f"{consumer.op_type} {consumer.name!r} takes an unquantized activation from {origin} "
                                "(no QuantizeLinear/DequantizeLinear on it), so it cannot run as an int8 op")
    return refused


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Inputs:
    images: np.ndarray
    fp32_onnx: Path | None
    reference: dict  # name -> outputs on `images` (fp32, aimet_sim, int8_qdq) when the ptq stage saved them
    description: dict


def _resolve(path_text: str) -> Path:
    """A path from a manifest: absolute or relative to the working directory, else to the repository."""
    path = Path(path_text)
    for candidate in (path, REPO_ROOT / path):
        if candidate.exists():
            return candidate
    return path


def load_inputs(config: HtpCheckConfig) -> _Inputs:
    from lpcv_depth.images import list_images, load_contract_image

    ptq_dir = config.ptq_dir
    manifest = read_manifest(ptq_dir) if ptq_dir else None
    fp32_onnx = Path(config.fp32_onnx) if config.fp32_onnx else None
    if fp32_onnx is None and manifest is not None:
        fp32_onnx = _resolve(manifest["inputs"]["fp32_onnx"]["path"])
        if not fp32_onnx.is_file():
            raise ConfigError(f"the ptq stage's fp32 model is gone: {fp32_onnx}",
                              hint="pass it with --fp32, or re-run python export/to_onnx.py")
    reference: dict = {}
    if config.images is not None:
        files = list_images(config.images)
        if not files:
            raise ConfigError(f"no images in {config.images}", hint="pass a folder of JPG/PNG photos")
        root = Path(config.images)
    else:
        split = manifest["inputs"]["calibration"]
        root = _resolve(split["root"])
        files = [root / name for name in split["holdout_files"]]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"the ptq stage's held-out images are gone from {root}: {', '.join(missing[:3])}",
                              hint="pass --images FOLDER with photos the model was not calibrated on")
        saved = ptq_dir / "holdout_outputs.npz"
        if saved.is_file():
            with np.load(saved) as arrays:
                reference = {name: arrays[name] for name in arrays.files}
    count = min(len(files), config.max_frames or len(files))
    files = files[:count]
    reference = {name: outputs[:count] for name, outputs in reference.items()}
    images = np.stack([load_contract_image(path) for path in files])
    description = {"root": os.fspath(root), "files": [Path(f).relative_to(root).as_posix() for f in files],
                   "source": "--images" if config.images else "ptq held-out split"}
    return _Inputs(images, fp32_onnx, reference, description)


# ---------------------------------------------------------------------------------------------
# The stage


def check_htp(config: HtpCheckConfig, log: StageLog | None = None) -> HtpCheckResult:
    """Coverage, numerics, context binary and fp16 baseline of the int8 model on the emulated HTP."""
    from lpcv_depth.contract import TRACK3
    from lpcv_depth.verify import OrtRunner, check_output_range

    log = log or StageLog(STAGE)
    log.info("every time below is host EMULATION time on this x86 CPU, not device latency")
    results: dict = {"target": {"soc_model": config.soc_model, "htp_arch": config.htp_arch,
                                "device": _device_name(config.soc_model)},
                     "emulation_note": EMULATION_NOTE, "warnings": []}
    with log.step("load-qnn") as step:
        backend = import_qnn()
        results["qnn"] = {"onnxruntime_qnn": backend.version, "qnn_sdk_version": backend.qnn_sdk_version,
                          "htp_library": backend.htp_library}
        step.detail = (f"onnxruntime-qnn {backend.version} (QNN {backend.qnn_sdk_version}), HTP v{config.htp_arch}, "
                       f"soc {config.soc_model} ({results['target']['device']})")
    qdq = config.qdq_onnx
    with log.step("inspect") as step:
        model_info = inspect_qdq_model(qdq)
        results["model"] = model_info
        step.detail = (f"{model_info['nodes']} nodes, {model_info['op_types'].get('QuantizeLinear', 0)} Q / "
                       f"{model_info['op_types'].get('DequantizeLinear', 0)} DQ, activations "
                       f"{', '.join(model_info['activation_quantize_dtypes']) or '?'}")
    with log.step("inputs") as step:
        inputs = load_inputs(config)
        # Hashed now, before minutes of emulation: the manifest pins what was checked even if an
        # upstream stage rewrites its folder meanwhile.
        inputs_record = {"qdq_onnx": {"path": os.fspath(qdq), "sha256": sha256_file(qdq)},
                         "images": inputs.description}
        if inputs.fp32_onnx is not None:
            inputs_record["fp32_onnx"] = {"path": os.fspath(inputs.fp32_onnx), "sha256": sha256_file(inputs.fp32_onnx)}
        if config.ptq_dir:
            inputs_record["ptq_manifest"] = {"path": os.fspath(config.ptq_dir / MANIFEST_NAME)}
        step.detail = f"{len(inputs.images)} image(s) ({inputs.description['source']})"

    with StagingDir(config.destination, stage=STAGE, scratch=True) as staging:
        context_onnx = staging.scratch / CONTEXT_ONNX
        with log.step("compile") as step:
            compiled = compile_for_htp(qdq, backend, config, context_onnx, model_info["op_types"])
            partition = compiled.partition
            results["coverage"] = {**partition, "refused": compiled.refused,
                                   "no_fallback_error": compiled.error, "build_s": compiled.build_s}
            step.detail = (f"all {model_info['nodes']} nodes on the HTP" if partition["full_htp"] else
                           f"HTP {partition['htp_nodes']} nodes in {partition['htp_partitions']} partition(s), "
                           f"CPU {partition['cpu_nodes']}: " + _op_summary(partition["cpu_op_types"]))
            step.detail += f"; built in {compiled.build_s:.1f}s"
        if not partition["full_htp"]:
            message = (f"NOT FULLY ON THE HTP: with CPU fallback disabled the build fails; QNN refuses "
                       f"{_refused_summary(compiled.refused, partition)}. {partition['cpu_nodes']} node(s) run on the CPU "
                       f"({_op_summary(partition['cpu_op_types'])}) between {partition['htp_partitions']} HTP "
                       f"partition(s). {_PHONE_CPU_COST}")
            results["warnings"].append(message)
            log.warn(message)
            for row in compiled.refused[:10]:
                log.warn(f"  refused {row['op_type']} {row['name']!r}: {row['reason']}"
                         + (f"; cause: {row['cause']}" if "cause" in row else ""))
        if config.context_binary:
            with log.step("context-binary") as step:
                results["context_binary"] = _keep_context(context_onnx, staging.path, backend, config,
                                                          compiled, partition)
                step.artifact = staging.path / CONTEXT_ONNX
                step.detail = (f"{results['context_binary']['bytes'] / 1e6:.1f} MB QNN context for HTP "
                               f"v{config.htp_arch}, built in {compiled.build_s:.1f}s, reloads in "
                               f"{results['context_binary']['reload_s']:.2f}s")

        with log.step("htp-int8") as step:
            htp_int8 = compiled.session.run(inputs.images)
            check_output_range(htp_int8, TRACK3, tolerance=1e-2)
            results["emulation_time"] = {"int8": compiled.session.timing()}
            step.detail = (f"{len(htp_int8)} image(s), {results['emulation_time']['int8']['mean_s_per_frame']:.1f} "
                           "s/frame host emulation (not device latency)")
        with log.step("cpu-references") as step:
            references = _references(inputs, qdq, OrtRunner)
            step.detail = ", ".join(f"{name}: {source}" for name, source in references["sources"].items())
        with log.step("numerics") as step:
            results["numerics"] = _numerics(htp_int8, references["outputs"], config.fscore_max_points)
            parity = results["numerics"]["htp_vs_int8_cpu"]
            step.detail = "; ".join(f"vs {name.removeprefix('htp_vs_')} SQNR {row['sqnr_db']:.1f} dB, "
                                    f"max abs {row['max_abs_diff']:.3f}"
                                    for name, row in results["numerics"].items() if name.startswith("htp_vs_"))
            if (parity["sqnr_db"] < config.cpu_parity.min_sqnr_db
                    or parity["max_abs_diff"] > config.cpu_parity.max_abs_diff):
                message = (f"HTP int8 differs from ONNX Runtime's CPU QDQ by more than the HTP's own rounding: SQNR "
                           f"{parity['sqnr_db']:.1f} dB (expected >= {config.cpu_parity.min_sqnr_db:g}), max abs "
                           f"{parity['max_abs_diff']:.3f} (expected <= {config.cpu_parity.max_abs_diff:g}); an op "
                           "computes differently on the NPU")
                results["warnings"].append(message)
                log.warn(message)
        if config.fp16_baseline:
            if inputs.fp32_onnx is None:
                log.info("fp16-baseline skipped: no fp32 model (pass --fp32)")
            else:
                with log.step("fp16-baseline") as step:
                    results["fp16_baseline"] = _fp16_baseline(inputs, backend, config, references["outputs"].get("fp32"))
                    results["emulation_time"]["fp16"] = results["fp16_baseline"].pop("timing")
                    baseline = results["fp16_baseline"]
                    step.detail = (("all on the HTP" if baseline["full_htp"] else "NOT fully on the HTP")
                                   + (f", vs fp32 SQNR {baseline['vs_fp32']['sqnr_db']:.1f} dB" if "vs_fp32" in baseline
                                      else "")
                                   + f", {results['emulation_time']['fp16']['mean_s_per_frame']:.1f} s/frame emulation")
        if config.eval_data is not None:
            with log.step("ground-truth") as step:
                results["ground_truth"] = _score_ground_truth(config, compiled.session, qdq, inputs.fp32_onnx,
                                                              staging, OrtRunner)
                gt = results["ground_truth"]
                step.detail = (f"{gt['frames']} frames: F-score " + ", ".join(
                    f"{label} {row['fscore@0.1']:.2f}" for label, row in gt["overall"].items())
                    + (f"; HTP drop vs fp32 {gt['fscore_drop']:.2f}" if "fscore_drop" in gt else ""))

        from lpcv_depth.stages.htp_report import write_report

        with log.step("report") as step:
            report_files = write_report(staging.path, config, results)
            step.artifact = staging.path / "report.md"
        outputs = [*sorted(p for p in staging.path.rglob("*") if p.is_file()
                           and p.name not in {"report.json", "report.md"}), *report_files]
        write_manifest(staging.path, stage=STAGE, config=config.as_dict(), inputs=inputs_record,
                       outputs=outputs, timings=log.timings, results=results)
    out = config.destination
    log.info(f"ok {log.total_seconds:.1f}s -> {out}")
    result = HtpCheckResult(out, out / CONTEXT_ONNX if config.context_binary else None, results, read_manifest(out))
    _enforce_gates(config, results)
    return result


def _device_name(soc_model: str) -> str:
    names = {value: key for key, value in SOC_MODELS.items()}
    name = names.get(soc_model, f"SoC id {soc_model}")
    return f"{name} (Snapdragon 8 Gen 3, Galaxy S24)" if soc_model == SM8650 else name


def _refused_summary(refused: list[dict], partition: dict) -> str:
    """The ops QNN itself refuses; the Quantize/Dequantize nodes around them only follow them to the CPU."""
    counts = collections.Counter(row["op_type"] for row in refused) or collections.Counter(partition["cpu_op_types"])
    compute = {op: n for op, n in counts.items() if op not in QDQ_OPS}
    summary = _op_summary(compute or dict(counts))
    if compute and len(compute) < len(counts):
        summary += " (with the QuantizeLinear/DequantizeLinear around them)"
    return summary


def _op_summary(op_types: dict) -> str:
    return ", ".join(f"{op} x{count}" for op, count in op_types.items()) or "none"


def _keep_context(context_onnx: Path, folder: Path, backend: QnnBackend, config: HtpCheckConfig,
                  compiled: _Compiled, partition: dict) -> dict:
    """Move the EPContext model and its context binary into the output and prove they load."""
    kept = []
    for path in sorted(context_onnx.parent.glob(f"{context_onnx.stem}*")):
        target = folder / path.name
        shutil.move(os.fspath(path), target)
        kept.append(target)
    onnx_path = folder / CONTEXT_ONNX
    binaries = [p for p in kept if p.suffix == ".bin"]
    if not onnx_path.is_file() or not binaries:
        raise HtpRefusedError(f"the QNN EP wrote no context binary ({', '.join(p.name for p in kept) or 'nothing'})",
                              hint="check that the model has at least one node the HTP accepts")
    start = time.perf_counter()
    # A fresh session from the EPContext model deserializes the binary: the artifact loads on its own.
    HtpSession(onnx_path, backend, soc_model=config.soc_model, htp_arch=config.htp_arch,
               cpu_fallback=not partition["full_htp"])
    reload_s = time.perf_counter() - start
    binary = binaries[0]
    return {"onnx": onnx_path.name, "path": binary.name, "bytes": binary.stat().st_size,
            "onnx_bytes": onnx_path.stat().st_size,
            "sha256": sha256_file(binary), "build_s": compiled.build_s, "reload_s": reload_s,
            "htp_arch": config.htp_arch, "soc_model": config.soc_model, "qnn_sdk_version": backend.qnn_sdk_version,
            "full_htp": partition["full_htp"], "htp_partitions": partition["htp_partitions"],
            "io": "float32 image in, float32 depth out (input quantization and output dequantization inside the graph)",
            "build_note": "build_s is the host compile (HTP graph prepare) time, not device latency",
            "ai_hub": HUB_CONTEXT_NOTE}


def _references(inputs: _Inputs, qdq: Path, runner_type) -> dict:
    """fp32 / AIMET-sim / int8-CPU outputs on the images: the ptq stage's saved ones, else computed
    here with ONNX Runtime on the CPU (AIMET's simulation is only available from a ptq folder)."""
    outputs = {"fp32": inputs.reference.get("fp32"), "aimet_sim": inputs.reference.get("aimet_sim"),
               "int8_cpu": inputs.reference.get("int8_qdq")}
    sources = {name: "ptq holdout_outputs.npz" for name, value in outputs.items() if value is not None}
    if outputs["int8_cpu"] is None:
        outputs["int8_cpu"] = runner_type(qdq).run(inputs.images)
        sources["int8_cpu"] = "ONNX Runtime CPU"
    if outputs["fp32"] is None and inputs.fp32_onnx is not None:
        outputs["fp32"] = runner_type(inputs.fp32_onnx).run(inputs.images)
        sources["fp32"] = "ONNX Runtime CPU"
    return {"outputs": {name: value for name, value in outputs.items() if value is not None}, "sources": sources}


def _compare(test: np.ndarray, reference: np.ndarray, max_points: int | None) -> dict:
    from lpcv_depth.track3_metric import fscore_against_reference

    per_image = [fscore_against_reference(t, r, max_points=max_points)["fscore@0.1"] for t, r in zip(test, reference)]
    return {"sqnr_db": sqnr_db(reference, test), "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - test))),
            "fscore": float(np.mean(per_image)), "fscore_per_image": per_image}


def _numerics(htp_int8: np.ndarray, references: dict, max_points: int | None) -> dict:
    """HTP int8 against every reference (F-score: the reference as pseudo-GT), plus CPU int8 vs fp32
    so the HTP's own cost is visible."""
    numerics = {f"htp_vs_{name}": _compare(htp_int8, outputs, max_points) for name, outputs in references.items()}
    if "fp32" in references:
        numerics["int8_cpu_vs_fp32"] = _compare(references["int8_cpu"], references["fp32"], max_points)
    return numerics


def _fp16_baseline(inputs: _Inputs, backend: QnnBackend, config: HtpCheckConfig, fp32: np.ndarray | None) -> dict:
    """The float model on the HTP with fp16 precision: what the NPU would run without quantization."""
    options = dict(soc_model=config.soc_model, htp_arch=config.htp_arch, fp16=True)
    start = time.perf_counter()
    try:
        with native_stderr():
            session, full = HtpSession(inputs.fp32_onnx, backend, cpu_fallback=False, **options), True
    except Exception as err:  # onnxruntime's own exception types
        if _FALLBACK_REFUSED not in str(err):
            raise HtpRefusedError(f"the QNN HTP backend cannot compile the fp32 model in fp16: {err}",
                                  hint="run with --no-fp16-baseline to check the int8 model alone") from err
        with native_stderr():
            session, full = HtpSession(inputs.fp32_onnx, backend, cpu_fallback=True, **options), False
    build_s = time.perf_counter() - start
    outputs = session.run(inputs.images)
    baseline = {"full_htp": full, "build_s": build_s, "timing": session.timing()}
    if fp32 is not None:
        baseline["vs_fp32"] = _compare(outputs, fp32, config.fscore_max_points)
    return baseline


def _spread(count: int, limit: int | None) -> list[int]:
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def _score_ground_truth(config: HtpCheckConfig, htp_session: HtpSession, qdq: Path, fp32_onnx: Path | None,
                        staging: StagingDir, runner_type) -> dict:
    """fp32 (CPU), int8 (CPU QDQ) and int8 (HTP) on the RGB-D frames, scored by the evaluate stage
    from saved predictions, so the metric and the frame skipping are exactly evaluation/score.py's."""
    from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate
    from lpcv_depth.rgbd import FrameError, load_rgbd_dataset

    frames = load_rgbd_dataset(config.eval_data)
    chosen = [frames[i] for i in _spread(len(frames), config.max_frames)]
    runners = {"int8_htp": htp_session.run, "int8_cpu": runner_type(qdq).run}
    if fp32_onnx is not None:
        runners["fp32"] = runner_type(fp32_onnx).run
    predictions = staging.scratch / "predictions"
    unreadable = []
    for frame in chosen:
        try:
            image = frame.load_image()[None]
        except FrameError as err:
            unreadable.append(str(err))
            continue
        for label, run in runners.items():
            path = predictions / label / frame.set_name / f"{frame.frame_id}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, run(image))
    summary: dict = {"frames_selected": len(chosen), "frames_total": len(frames), "overall": {}, "sets": {}}
    for label in runners:
        if not (predictions / label).is_dir():
            raise ConfigError(f"no readable RGB-D frame in --eval-data {config.eval_data}: {'; '.join(unreadable[:3])}")
        quiet = StageLog(f"{STAGE}/evaluate-{label}", stream=io.StringIO())
        result = run_evaluate(EvaluateConfig(data=Path(config.eval_data), predictions=predictions / label,
                                         out=staging.path / "eval" / label, num_vis=0), quiet)
        overall = result.summary["overall"]
        summary["overall"][label] = overall["metrics"]
        summary["frames"] = overall["scored"]
        for set_name, group in result.summary["sets"].items():
            if group["scored"]:
                summary["sets"].setdefault(set_name, {"frames": group["scored"]})[label] = group["metrics"]["fscore@0.1"]
    if "fp32" in summary["overall"]:
        summary["fscore_drop"] = summary["overall"]["fp32"]["fscore@0.1"] - summary["overall"]["int8_htp"]["fscore@0.1"]
    summary["htp_minus_cpu_int8"] = (summary["overall"]["int8_htp"]["fscore@0.1"]
                                     - summary["overall"]["int8_cpu"]["fscore@0.1"])
    summary["emulation_s_per_frame"] = float(np.mean(htp_session.frame_seconds[-len(chosen):]))
    return summary


def _enforce_gates(config: HtpCheckConfig, results: dict) -> None:
    failures = []
    coverage = results["coverage"]
    if config.require_full_htp and not coverage["full_htp"]:
        failures.append(f"{coverage['cpu_nodes']} node(s) run on the CPU ({_op_summary(coverage['cpu_op_types'])}) "
                        "and --require-full-htp is set")
    fp32_row = results["numerics"].get("htp_vs_fp32")
    if config.min_sqnr_db is not None and fp32_row is not None and fp32_row["sqnr_db"] < config.min_sqnr_db:
        failures.append(f"HTP int8 vs fp32 SQNR {fp32_row['sqnr_db']:.2f} dB < --min-sqnr {config.min_sqnr_db:g}")
    if config.max_fscore_drop is not None:
        if "fscore_drop" in results.get("ground_truth", {}):
            drop, what = results["ground_truth"]["fscore_drop"], "HTP F-score drop vs fp32 on ground truth"
        elif fp32_row is not None:
            drop, what = 100.0 - fp32_row["fscore"], "HTP F-score drop with fp32 as reference"
        else:
            drop, what = None, ""
        if drop is not None and drop > config.max_fscore_drop:
            failures.append(f"{what} {drop:.2f} > --max-fscore-drop {config.max_fscore_drop:g}")
    if failures:
        raise GateError("HTP check falls short: " + "; ".join(failures),
                        hint="the report was written; see its coverage section (ops the HTP refuses) and numerics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python quantize/htp_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptq", type=Path, required=True, help="ptq stage output folder, or a QDQ .onnx file")
    parser.add_argument("--soc-model", default=SM8650,
                        help=f"QNN SoC id (default {SM8650}: SM8650, Snapdragon 8 Gen 3, Galaxy S24)")
    parser.add_argument("--htp-arch", default="75", choices=HTP_ARCHS, help="HTP architecture (default 75: 8 Gen 3)")
    parser.add_argument("--images", type=Path, default=None,
                        help="photos for the numerics (default: the ptq stage's held-out images)")
    parser.add_argument("--fp32", type=Path, default=None, help="fp32 ONNX (default: the ptq stage's)")
    parser.add_argument("--eval-data", type=Path, default=None, help="RGB-D set(s): F-score against ground truth")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="at most N held-out images and N RGB-D frames (spread over the sets); the emulation "
                             "takes seconds (FastDepth) to minutes (ViT) per frame")
    parser.add_argument("--no-fp16-baseline", dest="fp16_baseline", action="store_false",
                        help="skip the fp32 model on the HTP in fp16")
    parser.add_argument("--no-context-binary", dest="context_binary", action="store_false",
                        help="do not keep the QNN context binary")
    parser.add_argument("--fscore-max-points", type=int, default=None,
                        help="F-scores against fp32/CPU outputs on N sampled pixels (faster; default: every pixel)")
    parser.add_argument("--parity-min-sqnr", type=float, default=20.0,
                        help="warn when HTP vs CPU int8 SQNR is lower (dB, default 20)")
    parser.add_argument("--parity-max-abs", type=float, default=0.25,
                        help="warn when HTP vs CPU int8 max abs diff is larger (default 0.25)")
    parser.add_argument("--require-full-htp", action="store_true", help="gate: exit 3 if any node runs on the CPU")
    parser.add_argument("--max-fscore-drop", type=float, default=None,
                        help="gate: exit 3 if the HTP int8 F-score drops more than this vs fp32")
    parser.add_argument("--min-sqnr", type=float, default=None, help="gate: exit 3 if HTP int8 vs fp32 SQNR is lower")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <ptq>/htp-check)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = StageLog(STAGE)
    try:
        config = HtpCheckConfig(ptq=args.ptq, soc_model=args.soc_model, htp_arch=args.htp_arch, images=args.images,
                                fp32_onnx=args.fp32, eval_data=args.eval_data, max_frames=args.max_frames,
                                fp16_baseline=args.fp16_baseline, context_binary=args.context_binary,
                                fscore_max_points=args.fscore_max_points,
                                cpu_parity=ParityThresholds(max_abs_diff=args.parity_max_abs,
                                                            min_sqnr_db=args.parity_min_sqnr),
                                require_full_htp=args.require_full_htp, max_fscore_drop=args.max_fscore_drop,
                                min_sqnr_db=args.min_sqnr, out_dir=args.out)
        result = check_htp(config, log)
    except OSError as err:
        print(f"{STAGE}: error: {err}\n  fix: an input file vanished or became unreadable during the run (did another "
              "stage rewrite the ptq folder?); run the check again", file=sys.stderr)
        return ExitCode.ERROR
    except (LpcvError, KeyboardInterrupt) as err:
        return exit_status(STAGE, err)
    log.info(f"report: {os.path.relpath(result.out_dir / 'report.md')}")
    target = config.ptq_dir or config.qdq_onnx
    log.info(f"next: python export/aihub.py {os.path.relpath(target)}   (device latency: only AI Hub measures it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
