"""Everything that touches onnxruntime-qnn: the QNN HTP backend built for x86, as an ONNX Runtime
execution provider.

onnxruntime-qnn's Linux x86_64 wheel carries the HTP backend compiled for a host CPU (libQnnHtp.so,
libHtpPrepare.so): it partitions an ONNX model the way the phone's QNN execution provider does,
computes with the HTP's quantized kernels, and compiles a QNN context binary for a given HTP
architecture. The wheel is imported lazily; a missing or unusable install is a MissingDependencyError
naming the command that fixes it.
"""

from __future__ import annotations

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
from typing import Any, Callable, Iterator

import numpy as np

from lpcv_depth.errors import ContractError, LpcvError, MissingDependencyError
from lpcv_depth.pins import pinned

__all__ = ["QNN_EP", "QNN_INSTALL", "SOC_MODELS", "SM8650", "HTP_ARCHS", "QDQ_OPS", "EMULATION_NOTE",
           "FALLBACK_REFUSED", "HtpRefusedError", "HtpTarget", "QnnBackend", "import_qnn", "unavailable_reason",
           "HtpSession",
           "native_stderr", "parse_refusals", "inspect_qdq_model", "partition_from_context", "explain_refusals",
           "Compiled", "compile_for_htp", "compile_fp16", "KeptContext", "keep_context", "EmulatorDiedError",
           "run_killable"]

QNN_EP = "QNNExecutionProvider"
QNN_INSTALL = 'pip install -e ".[qnn]"   (Linux x86_64 only)'
_PINNED = f'"{pinned("onnxruntime")}" "{pinned("onnxruntime-qnn")}"'
# Qnn_SocModel ids (QNN SDK "Supported Snapdragon devices"); SM8650 is the Galaxy S24's Snapdragon 8 Gen 3.
SOC_MODELS = {"SM8450": "36", "SM8550": "43", "SM8650": "57", "SM8750": "69"}
SM8650 = SOC_MODELS["SM8650"]
HTP_ARCHS = ("68", "69", "73", "75", "79", "81")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
EMULATION_NOTE = ("host emulation: the QNN HTP backend built for x86 computing the NPU's arithmetic on this CPU. "
                  "These times are NOT device latency; the phone's NPU is far faster. Use an AI Hub profile job "
                  "for latency.")
# ORT's message when a node lands on the CPU although fallback is disabled.
FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"


class HtpRefusedError(ContractError):
    """The QNN HTP backend cannot build the model at all (not even with CPU fallback)."""


@dataclass(frozen=True)
class HtpTarget:
    """The NPU to compile for: a QNN SoC id and an HTP architecture."""

    soc_model: str = SM8650
    htp_arch: str = "75"

    @property
    def device(self) -> str:
        names = {value: key for key, value in SOC_MODELS.items()}
        name = names.get(self.soc_model, f"SoC id {self.soc_model}")
        return f"{name} (Snapdragon 8 Gen 3, Galaxy S24)" if self.soc_model == SM8650 else name

    def describe(self) -> dict:
        return {"soc_model": self.soc_model, "htp_arch": self.htp_arch, "device": self.device}


@dataclass(frozen=True)
class QnnBackend:
    """onnxruntime-qnn, registered with ONNX Runtime as a plugin execution provider."""

    devices: tuple
    htp_library: str
    version: str
    qnn_sdk_version: str

    def describe(self) -> dict:
        return {"onnxruntime_qnn": self.version, "qnn_sdk_version": self.qnn_sdk_version,
                "htp_library": self.htp_library}


_REGISTERED: dict[str, QnnBackend] = {}


def import_qnn() -> QnnBackend:
    """onnxruntime-qnn registered with ONNX Runtime (once per process), or MissingDependencyError
    saying what is missing and how to get it."""
    if QNN_EP in _REGISTERED:
        return _REGISTERED[QNN_EP]
    _require_linux_x86()
    try:
        import onnxruntime_qnn
    except ImportError as err:
        raise MissingDependencyError(f"onnxruntime-qnn is not importable: {err}", hint=QNN_INSTALL) from err
    import onnxruntime as ort

    if not hasattr(ort, "register_execution_provider_library"):
        raise MissingDependencyError(f"onnxruntime {ort.__version__} cannot load plugin execution providers "
                                     "(onnxruntime-qnn 2.x is one)", hint=f'pip install -e .   ({pinned("onnxruntime")})')
    provider_library, htp_library = onnxruntime_qnn.get_library_path(), onnxruntime_qnn.get_qnn_htp_path()
    for path in (provider_library, htp_library):
        if not Path(path).is_file():
            raise MissingDependencyError(f"onnxruntime-qnn is installed but {Path(path).name} is missing from "
                                         f"{Path(path).parent}", hint=f'pip install --force-reinstall "{pinned("onnxruntime-qnn")}"')
    devices = _register(ort, provider_library)
    info = getattr(onnxruntime_qnn, "build_and_package_info", None)
    backend = QnnBackend(devices=devices, htp_library=htp_library, version=getattr(onnxruntime_qnn, "__version__", "?"),
                         qnn_sdk_version=getattr(info, "qnn_version", "unknown"))
    _REGISTERED[QNN_EP] = backend
    return backend


def unavailable_reason() -> str | None:
    """Why the local HTP check cannot run here (the first line of the error), or None when it can."""
    try:
        import_qnn()
    except MissingDependencyError as err:
        return str(err).splitlines()[0]
    return None


def _require_linux_x86() -> None:
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        return
    raise MissingDependencyError(
        f"the local HTP check needs onnxruntime-qnn's Linux x86_64 wheel, the only build that carries the HTP "
        f"backend compiled for a host CPU (libQnnHtp.so, libHtpPrepare.so); this machine is "
        f"{sys.platform}/{platform.machine()}",
        hint="run this stage on Linux x86_64 (or in a Linux x86_64 container), or skip it and measure on the "
             "phone through AI Hub (lpcv-depth hub, or python export/aihub.py)")


def _register(ort, provider_library: str) -> tuple:
    """Register the plugin execution provider (unless this process already did) and return its devices."""
    already = any(device.ep_name == QNN_EP for device in ort.get_ep_devices())
    try:
        if not already:
            ort.register_execution_provider_library(QNN_EP, provider_library)
    except Exception as err:  # onnxruntime raises its own exception types for a library it cannot load
        raise MissingDependencyError(f"ONNX Runtime cannot load the QNN execution provider {provider_library}: "
                                     f"{type(err).__name__}: {err}",
                                     hint=f"pip install --force-reinstall {_PINNED}") from err
    devices = tuple(device for device in ort.get_ep_devices() if device.ep_name == QNN_EP)
    if not devices:
        raise MissingDependencyError("the QNN execution provider loaded but offers no device to run on",
                                     hint=f'pip install --force-reinstall "{pinned("onnxruntime-qnn")}"')
    return devices


class HtpSession:
    """An ONNX Runtime session whose QNN partitions run on the HTP backend (emulated on x86 here)."""

    def __init__(self, model_path: Path, backend: QnnBackend, target: HtpTarget, *, cpu_fallback: bool,
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
        provider = {"backend_path": backend.htp_library, "soc_model": target.soc_model, "htp_arch": target.htp_arch,
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


def _log_tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.splitlines() if "LIBNATIVE" not in line and line.strip()][-lines:]
    return ("\n  native log:\n    " + "\n    ".join(kept)) if kept else ""


# ---------------------------------------------------------------------------------------------
# Reading the model and the partition


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


def inspect_qdq_model(path: Path) -> dict:
    """Op counts and activation bit widths of the QDQ graph; ContractError for a float-only model."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends for a file that is not a model
        raise ContractError(f"{path} is not a readable ONNX model: {type(err).__name__}: {err}",
                            hint="pass the ptq stage's folder (lpcv-depth ptq) or its model_qdq.onnx, an int8 QDQ "
                                 "ONNX file; check that the file was copied whole") from err
    ops = collections.Counter(node.op_type for node in model.graph.node)
    if not ops["QuantizeLinear"] or not ops["DequantizeLinear"]:
        raise ContractError(
            f"{path.name} is not a QDQ int8 model: it has {ops['QuantizeLinear']} QuantizeLinear and "
            f"{ops['DequantizeLinear']} DequantizeLinear nodes ({sum(ops.values())} nodes, "
            f"{', '.join(f'{op} x{n}' for op, n in ops.most_common(4))})",
            hint="pass the ptq stage's folder (lpcv-depth ptq) or its model_qdq.onnx; a float model goes "
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
# Compiling


@dataclass
class Compiled:
    """A compiled session, the HTP/CPU partition of its graph, and why nodes were refused."""

    session: HtpSession
    partition: dict
    build_s: float
    refused: list = field(default_factory=list)
    # ORT's error of the build with CPU fallback disabled, when it failed.
    error: str | None = None


def compile_for_htp(qdq: Path, backend: QnnBackend, target: HtpTarget, context_onnx: Path,
                    model_ops: dict) -> Compiled:
    """Compile with CPU fallback disabled (writing the EPContext model + context binary). If the HTP
    refuses nodes, a verbose throwaway build names them with QNN's reason, and a fallback-enabled
    build gives the HTP/CPU partition and the session that runs the numerics."""
    start = time.perf_counter()
    try:
        # ONNX Runtime prints each refusal as an error line; the stage reports them itself.
        with native_stderr() as native_log:
            session = HtpSession(qdq, backend, target, cpu_fallback=False, context_onnx=context_onnx)
        return Compiled(session, partition_from_context(context_onnx, model_ops), time.perf_counter() - start)
    except Exception as err:  # onnxruntime's Fail / RuntimeException carry the reason in the message only
        if FALLBACK_REFUSED not in str(err):
            raise HtpRefusedError(f"the QNN HTP backend cannot compile {qdq.name}: {type(err).__name__}: {err}"
                                  + _log_tail(native_log.getvalue()),
                                  hint="the QNN lines above name the op, shape or quantization encoding the HTP "
                                       "backend cannot build") from err
        no_fallback_error = str(err).strip()
    for stale in context_onnx.parent.glob(f"{context_onnx.stem}*"):
        stale.unlink()
    refused = explain_refusals(qdq, _refusals(qdq, backend, target))
    start = time.perf_counter()
    try:
        with native_stderr() as native_log:
            session = HtpSession(qdq, backend, target, cpu_fallback=True, context_onnx=context_onnx)
    except Exception as err:  # as above
        raise HtpRefusedError(f"the QNN HTP backend cannot compile {qdq.name} even with CPU fallback: "
                              f"{type(err).__name__}: {err}" + _log_tail(native_log.getvalue()),
                              hint="the op or encoding named above can neither run on the HTP nor be handed to "
                                   "the CPU") from err
    build_s = time.perf_counter() - start
    return Compiled(session, partition_from_context(context_onnx, model_ops), build_s, refused, no_fallback_error)


def _refusals(model: Path, backend: QnnBackend, target: HtpTarget) -> list[dict]:
    """A verbose throwaway build: ONNX Runtime's log names every node QNN refuses, with the reason."""
    with native_stderr() as verbose_log:
        try:
            HtpSession(model, backend, target, cpu_fallback=True, verbose=True)
        except Exception:  # the caller's build raises it again, with the reason
            pass
    return parse_refusals(verbose_log.getvalue())


def compile_fp16(model: Path, backend: QnnBackend, target: HtpTarget, *, hint: str | None = None) -> Compiled:
    """A float model on the HTP in fp16: fully on the HTP if it can be, else with CPU fallback
    (`Compiled.partition` then only says `full_htp`)."""
    start = time.perf_counter()
    try:
        with native_stderr():
            session, full = HtpSession(model, backend, target, cpu_fallback=False, fp16=True), True
    except Exception as err:  # onnxruntime's own exception types
        if FALLBACK_REFUSED not in str(err):
            raise HtpRefusedError(f"the QNN HTP backend cannot compile {Path(model).name} in fp16: {err}",
                                  hint=hint) from err
        with native_stderr():
            session, full = HtpSession(model, backend, target, cpu_fallback=True, fp16=True), False
    return Compiled(session, {"full_htp": full}, time.perf_counter() - start)


@dataclass(frozen=True)
class KeptContext:
    """The EPContext model and its QNN context binary, moved into an output folder and reloaded once."""

    onnx: Path
    binary: Path
    reload_s: float


def keep_context(context_onnx: Path, folder: Path, backend: QnnBackend, target: HtpTarget, *,
                 full_htp: bool) -> KeptContext:
    """Move the EPContext model and its context binary into `folder` and prove they load."""
    kept = []
    for path in sorted(context_onnx.parent.glob(f"{context_onnx.stem}*")):
        destination = folder / path.name
        shutil.move(os.fspath(path), destination)
        kept.append(destination)
    onnx_path = folder / context_onnx.name
    binaries = [p for p in kept if p.suffix == ".bin"]
    if not onnx_path.is_file() or not binaries:
        raise HtpRefusedError(f"the QNN EP wrote no context binary ({', '.join(p.name for p in kept) or 'nothing'})",
                              hint="check that the model has at least one node the HTP accepts")
    start = time.perf_counter()
    # A fresh session from the EPContext model deserializes the binary: the artifact loads on its own.
    HtpSession(onnx_path, backend, target, cpu_fallback=not full_htp)
    return KeptContext(onnx_path, binaries[0], time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# A process the caller can stop at once


class EmulatorDiedError(LpcvError):
    """The process that ran the HTP emulation ended without a result (killed, or a native crash)."""


class _PipeStream:
    """A text stream whose writes reach the parent process (the child's log lines, in order)."""

    def __init__(self, connection):
        self.connection = connection

    def write(self, text: str) -> int:
        self.connection.send(("log", text))
        return len(text)

    def flush(self) -> None:
        pass


def run_killable(function: Callable[..., Any], log, *args, on_kill: Callable[[int], None]) -> Any:
    """`function(*args, log)` in a forked child process; its log lines reach `log` here, its result or
    its error comes back as if it ran here.

    ONNX Runtime's QNN calls (compile, session run) are native calls that return to Python only when
    done, seconds to minutes per frame, so Ctrl+C or SIGTERM in the process running them waits that
    long. Here the parent only waits: on an interrupt it kills the child at once, calls
    `on_kill(child_pid)` to remove what the child left, and lets the interrupt go on. The child ignores
    SIGINT (a terminal sends it to the whole process group) and dies with its parent."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, os.getpid(), function, log, args), daemon=True)
    for stream in (sys.stdout, sys.stderr, log.stream):
        stream.flush()  # else the child would print what is buffered here a second time
    child.start()
    sender.close()
    finished = False
    try:
        while not finished:
            try:
                kind, *payload = receiver.recv()
            except EOFError:
                child.join()
                raise EmulatorDiedError(f"the HTP emulation process ended without a result (exit status "
                                        f"{child.exitcode})",
                                        hint="run the check again; if it ends the same way, run it with "
                                             "--max-frames 1 and report the native log above") from None
            if kind == "log":
                log.stream.write(payload[0])
                log.stream.flush()
                continue
            finished = True
            log.timings.update(payload[1])
            if kind == "error":
                raise _rebuilt(*payload[0])
            return payload[0]
    finally:
        receiver.close()
        if not finished:
            child.kill()
        child.join()
        if not finished:
            on_kill(child.pid)


def _child_main(connection, parent_pid: int, function: Callable[..., Any], log, args: tuple) -> None:
    import pickle
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    log.stream = _PipeStream(connection)
    try:
        message = ("result", function(*args, log), log.timings)
    except BaseException as err:  # every error goes to the parent, which raises it
        state = (type(err), err.args, dict(err.__dict__), traceback.format_exc())
        try:
            pickle.dumps(state)
        except Exception:  # an error carrying something unpicklable: its type and text still go
            state = (RuntimeError, (f"{type(err).__name__}: {err}",), {}, state[3])
        message = ("error", state, log.timings)
    connection.send(message)
    connection.close()


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG), so that a parent killed
    outright leaves no emulation running on its own."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


class _ChildTraceback(Exception):
    """Where an unexpected error was raised, in the child process."""


def _rebuilt(kind: type, args: tuple, attributes: dict, child_traceback: str) -> BaseException:
    """The child's error, as the same type with the same message and attributes (an LpcvError's hint)."""
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(attributes)
    if not isinstance(error, LpcvError):
        error.__cause__ = _ChildTraceback(child_traceback)
    return error
