"""Plumbing every stage shares: one log line per step, atomic output folders, and `manifest.json`.

A stage builds its outputs inside a hidden staging folder next to the destination and only moves
them into place, manifest last, once every step has passed. An interrupted or failed run therefore
never leaves a folder that looks like a finished artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from lpcv_depth.errors import GateError, LpcvError, OutputDirError

MANIFEST_NAME = "manifest.json"
# Exit statuses every stage CLI uses.
EXIT_ERROR = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130
_TRACKED_PACKAGES = (
    "lpcv-depth", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxsim", "numpy",
    "aimet-torch", "qai-hub", "onnxruntime-qnn", "ai-edge-litert",
)


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    raise AssertionError("unreachable")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_files(paths: list[Path], root: Path | None = None) -> str:
    """One hash over an ordered file list: names (relative to root) and contents."""
    digest = hashlib.sha256()
    for path in paths:
        name = path.relative_to(root).as_posix() if root else path.name
        digest.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in _TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    commit = _git_commit()
    if commit:
        versions["lpcv-depth-git"] = commit
    return versions


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class StageLog:
    """Prints `stage: step ok 3.1s -> path (33.5 MB)` per step and keeps the timings."""

    def __init__(self, stage: str, stream=None):
        self.stage = stage
        self.stream = stream or sys.stdout
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()

    def info(self, message: str) -> None:
        print(f"{self.stage}: {message}", file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"{self.stage}: WARNING {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator["StepResult"]:
        result = StepResult()
        start = time.perf_counter()
        try:
            yield result
        except BaseException:
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            self.info(f"{name} FAILED after {elapsed:.1f}s")
            raise
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        line = f"{name} ok {elapsed:.1f}s"
        if result.detail:
            line += f" ({result.detail})"
        if result.artifact is not None:
            line += f" -> {result.artifact}"
            if Path(result.artifact).is_file():
                line += f" ({human_size(Path(result.artifact).stat().st_size)})"
        self.info(line)

    @property
    def total_seconds(self) -> float:
        return round(time.perf_counter() - self._started, 3)


@dataclass
class StepResult:
    detail: str = ""
    artifact: str | os.PathLike | None = None


class StagingDir:
    """Write a stage's outputs somewhere hidden, then swap them into `final` in one rename.

    `final` may already hold an earlier run of a stage (it has a manifest.json): it is replaced as
    a whole. Any other non-empty folder is refused, so a typo never deletes a user's files.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final).resolve()
        self.path: Path | None = None

    def __enter__(self) -> Path:
        if self.final.exists() and not self.final.is_dir():
            raise OutputDirError(f"output path {self.final} exists and is not a folder",
                                 hint="pass a different --out")
        if self.final.is_dir() and any(self.final.iterdir()) and not (self.final / MANIFEST_NAME).exists():
            raise OutputDirError(
                f"output folder {self.final} is not empty and is not an earlier lpcv-depth output",
                hint="pass an empty or new folder with --out; lpcv-depth only replaces its own outputs")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            staging = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        except OSError as err:
            raise OutputDirError(f"cannot write to output folder {self.final.parent}: {err.strerror or err}",
                                 hint="choose a writable location with --out") from err
        self.path = staging
        return staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        previous = None
        if self.final.exists():
            previous = self.final.parent / f".{self.final.name}.previous-{os.getpid()}"
            os.replace(self.final, previous)
        os.replace(self.path, self.final)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return False


def config_as_dict(config: Any) -> dict[str, Any]:
    """A stage config dataclass as manifest JSON: paths as strings, plus where the stage writes."""
    from dataclasses import asdict

    data = json.loads(json.dumps(asdict(config), default=_json_default))
    data["destination"] = os.fspath(config.destination)
    return data


def describe_output(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, *, stage: str, config: dict[str, Any], inputs: dict[str, Any],
                   outputs: list[Path], timings: dict[str, float], results: dict[str, Any]) -> Path:
    """Write manifest.json last: its presence marks the folder as a complete stage output."""
    manifest = {
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "tool_versions": tool_versions(),
        "timings_s": timings,
        "outputs": [describe_output(path, folder) for path in outputs],
        "results": results,
    }
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST_NAME).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def exit_status(stage: str, err: BaseException, interrupted: str = "nothing was written") -> int:
    """Print a stage CLI's failure on stderr the one way all stages do, and return its exit status:
    a missed gate 3, any other LpcvError 2 (message plus its fix), Ctrl+C 130. Anything else is a bug
    and is re-raised with its traceback."""
    if isinstance(err, GateError):
        print(f"{stage}: GATE FAILED: {err}", file=sys.stderr)
        return EXIT_GATE
    if isinstance(err, LpcvError):
        print(f"{stage}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(err, KeyboardInterrupt):
        print(f"{stage}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    raise err
