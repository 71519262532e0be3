"""`manifest.json`: what a stage built, from what, with which tools, and what it measured.

Every stage output folder ends with one, written last. `Manifest.read(folder, stage=...)` is how a
stage takes another stage's output: it checks that the folder was written by the expected stage,
under a schema this code understands, and that every output file still has the sha256 its manifest
records, before anything is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.files import write_text_atomically
from lpcv_depth.schema import SchemaError, from_json, to_json

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "Manifest", "OutputFile", "ArtifactMismatchError", "write_manifest",
           "read_manifest", "sha256_file", "sha256_of_files", "tool_versions", "source_tree", "config_as_dict"]

MANIFEST_NAME = "manifest.json"
# Bumped whenever a stage's results change shape; docs/results.md describes each version.
SCHEMA_VERSION = 2
_TRACKED_PACKAGES = (
    "lpcv-depth", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxsim", "numpy",
    "aimet-torch", "qai-hub", "onnxruntime-qnn", "ai-edge-litert", "ray",
)
R = TypeVar("R")


class ArtifactMismatchError(LpcvError):
    """A stage output is not what its manifest says it is (file changed, missing, or another stage)."""


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
    commit = source_tree().get("commit")
    if commit:
        versions["lpcv-depth-git"] = commit
    return versions


def source_tree() -> dict[str, str | None]:
    """Where the running lpcv_depth code comes from: its folder and, in a git checkout, the commit."""
    package = Path(__file__).resolve().parent
    repo = package.parent
    info: dict[str, str | None] = {"path": os.fspath(package), "commit": None}
    if not (repo / ".git").exists():
        return info
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return info
    info["commit"] = out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    return info


@dataclass(frozen=True)
class OutputFile:
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    stage: str
    schema_version: int
    created: str
    config: dict
    inputs: dict
    tool_versions: dict
    timings_s: dict
    outputs: list[OutputFile]
    results: dict
    source: dict = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False)

    @classmethod
    def read(cls, folder: str | os.PathLike, *, stage: str | tuple[str, ...] | None = None, flag: str = "",
             verify: bool = True) -> "Manifest":
        """The manifest of `folder`, checked: written by `stage`, a known schema, outputs intact."""
        folder = Path(folder)
        where = f"{flag} {folder}".strip()
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ConfigError(f"{where} is not a stage output (no {MANIFEST_NAME})",
                              hint="pass the folder an lpcv-depth stage wrote")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactMismatchError(f"{path} cannot be read: {err}",
                                        hint="rerun the stage that wrote it") from None
        expected = (stage,) if isinstance(stage, str) else stage
        if expected and data.get("stage") not in expected:
            raise ConfigError(f"{where} holds a {data.get('stage')!r} stage output, not {' or '.join(expected)}",
                              hint=f"pass the folder the {expected[0]} stage wrote")
        version = data.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise ArtifactMismatchError(
                f"{where} was written with manifest schema {version}; this lpcv-depth reads schema {SCHEMA_VERSION}",
                hint=f"rerun the {data.get('stage')} stage with this version to rebuild it")
        data.setdefault("schema_version", version)
        try:
            manifest = from_json(cls, data, where=f"{path}")
        except SchemaError as err:
            raise ArtifactMismatchError(f"{path} does not match the manifest schema: {err}",
                                        hint=f"rerun the {data.get('stage')} stage to rebuild it") from None
        manifest = dataclasses.replace(manifest, folder=folder)
        if verify:
            manifest.verify_outputs()
        return manifest

    def verify_outputs(self, names: list[str] | None = None) -> None:
        """Every recorded output (or the named ones) exists with its recorded size and sha256."""
        assert self.folder is not None
        for output in self.outputs:
            if names is not None and output.path not in names:
                continue
            path = self.folder / output.path
            if not path.is_file():
                raise ArtifactMismatchError(f"{path} is missing, but {self.folder / MANIFEST_NAME} lists it",
                                            hint=f"rerun the {self.stage} stage to rebuild {self.folder}")
            if path.stat().st_size != output.bytes or sha256_file(path) != output.sha256:
                raise ArtifactMismatchError(
                    f"{path} is not the file the {self.stage} stage wrote (its sha256 differs from the manifest's)",
                    hint=f"rerun the {self.stage} stage, or restore the original file")

    def output_sha256(self, name: str) -> str | None:
        return next((o.sha256 for o in self.outputs if o.path == name), None)

    def results_as(self, cls: type[R]) -> R:
        try:
            return from_json(cls, self.results, where=f"{self.stage} results")
        except SchemaError as err:
            raise ArtifactMismatchError(f"the {self.stage} results in {self.folder} do not match {cls.__name__}: {err}",
                                        hint=f"rerun the {self.stage} stage with this version") from None


def config_as_dict(config: Any) -> dict[str, Any]:
    """A stage config dataclass as manifest JSON: paths as strings, plus where the stage writes."""
    data = to_json(config)
    data["destination"] = os.fspath(config.destination)
    return data


def describe_output(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, *, stage: str, config: dict[str, Any], inputs: dict[str, Any],
                   outputs: list[Path], timings: dict[str, float], results: Any) -> Path:
    """Write manifest.json last: its presence marks the folder as a complete stage output."""
    manifest = {
        "stage": stage,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "tool_versions": tool_versions(),
        "timings_s": timings,
        "outputs": [describe_output(path, folder) for path in outputs],
        "results": results,
        "source": source_tree(),
    }
    return write_text_atomically(folder / MANIFEST_NAME, json.dumps(to_json(manifest), indent=2, allow_nan=False) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw manifest JSON, unchecked (for display and tests); stages use `Manifest.read`."""
    return json.loads((Path(folder) / MANIFEST_NAME).read_text())
