"""What goes to AI Hub: an export, ptq or htp-check folder, an .onnx, an .aimet folder or a context
binary, turned into what is uploaded and what its device outputs are measured against on the host.

Stage folders are read through their manifests (`Manifest.read`); an unusable argument is a
ConfigError whose hint says what to pass instead. The hub stage resolves its artifact once, in its
first step.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lpcv_depth.errors import ConfigError
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, read_manifest
from lpcv_depth.results import INT8_STAGES, HtpCheckResults, HubInput
from lpcv_depth.stage import command_line

__all__ = ["HubArtifact", "resolve_artifact", "exported_model", "stage_of", "ARTIFACT_HINT", "EXPORT_ONNX",
           "QDQ_ONNX", "AIMET_SUFFIXES"]

EXPORT_ONNX = "model.onnx"
QDQ_ONNX = "model_qdq.onnx"
ARTIFACT_HINT = ("pass build/<model>/export, build/<model>/ptq-<preset> (or qat-<preset>), an htp-check folder, an .onnx, an .aimet "
                 "folder or a .bin")
# What AI Hub takes in an .aimet folder (qai_hub.client._get_model_dir_type; a .bin excludes encodings).
AIMET_SUFFIXES = (".onnx", ".encodings", ".data")


@dataclass(frozen=True)
class HubArtifact:
    """What goes to the hub, and what it is measured against on the host."""

    kind: str  # export | ptq | onnx | aimet | qnn_context_binary
    upload: Path
    precision: str  # fp32 | int8 | unknown
    label: str  # names the output folder: export, ptq-w8a8, model_qdq, ...
    model_name: str | None
    source_dir: Path | None  # the export / ptq / htp-check folder it came from, if any
    host_reference: Path | None  # the ONNX whose ONNX Runtime outputs the device outputs are compared with
    # The ONNX graph that declares what the uploaded model takes and returns (the .onnx itself, or an
    # htp-check context binary's companion EPContext model); None: ask AI Hub after the upload.
    io_onnx: Path | None = None
    qnn_sdk_version: str | None = None  # the QNN that built a local context binary (htp-check manifest)
    preset: str | None = None  # the ptq preset an AIMET artifact was quantized with (its manifest)
    # An htp-check binary of a 4-bit model holds those weights in INT8 storage (docs/htp-check.md, "4-bit weights").
    int4_weights_as_int8: int = 0

    @property
    def compilable(self) -> bool:
        return self.kind != "qnn_context_binary"

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.upload, self.source_dir, self.host_reference) if p is not None]

    def record(self, sha256: str) -> HubInput:
        def text(path: Path | None) -> str | None:
            return None if path is None else os.fspath(path)

        return HubInput(kind=self.kind, upload=os.fspath(self.upload), precision=self.precision, label=self.label,
                        model_name=self.model_name, source_dir=text(self.source_dir),
                        host_reference=text(self.host_reference), sha256=sha256)


def stage_of(folder: Path) -> str | None:
    """Which stage wrote `folder` (None: no readable manifest); to pick the reader, which checks it all."""
    try:
        return read_manifest(folder).get("stage") if (folder / MANIFEST_NAME).is_file() else None
    except (OSError, ValueError):
        return None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _single_aimet_dir(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.aimet") if p.is_dir())
    if len(found) != 1:
        raise ConfigError(f"ptq folder {folder} holds {len(found)} <model>.aimet folders, expected one",
                          hint=f"rerun {command_line('ptq')}; its output has exactly one")
    return found[0]


def _check_aimet_dir(folder: Path) -> None:
    """AI Hub's rule for an .aimet folder, on every entry as qai-hub counts them (hidden files such as
    .DS_Store and subfolders too): exactly one .onnx and one .encodings, at most one .data, nothing else."""
    names = sorted(os.listdir(folder))
    counts = Counter(Path(name).suffix for name in names)
    others = [name for name in names if Path(name).suffix not in AIMET_SUFFIXES]
    if counts[".onnx"] != 1 or counts[".encodings"] != 1 or counts[".data"] > 1 or others:
        extra = f"; remove {', '.join(others)}" if others else ""
        raise ConfigError(f"{folder} is not an AIMET model folder AI Hub accepts: {names}",
                          hint="it must hold exactly one .onnx and one .encodings, optionally one .data, and nothing "
                               "else (AI Hub counts hidden files such as .DS_Store too)" + extra)


def _ptq_label(manifest: Manifest) -> str:
    """ptq-w8a8, qat-w8a8: the stage and its preset (a qat folder's preset is its ptq start's)."""
    return f"{manifest.stage}-{manifest.config.get('preset') or manifest.results.get('preset', 'int8')}"


def _export_artifact(folder: Path) -> HubArtifact:
    manifest = Manifest.read(folder, stage="export", flag="artifact")
    onnx = folder / EXPORT_ONNX
    if not onnx.is_file():
        raise ConfigError(f"export folder {folder} has no {EXPORT_ONNX}", hint=f"rerun {command_line('export')}")
    return HubArtifact("export", onnx, "fp32", "export", manifest.config.get("model"), folder, onnx, io_onnx=onnx)


def _ptq_artifact(folder: Path) -> HubArtifact:
    manifest = Manifest.read(folder, stage=INT8_STAGES, flag="artifact")
    aimet = _single_aimet_dir(folder)
    _check_aimet_dir(aimet)
    return HubArtifact("ptq", aimet, "int8", _ptq_label(manifest), aimet.stem, folder, _existing(folder / QDQ_ONNX),
                       preset=manifest.config.get("preset"))


def _htp_check_artifact(folder: Path) -> HubArtifact:
    """The QNN context binary the local HTP check built, measured against the QDQ model it came from;
    its companion EPContext ONNX declares its I/O, and the manifest the QNN version that built it."""
    manifest = Manifest.read(folder, stage="htp-check", flag="artifact")
    results = manifest.results_as(HtpCheckResults)
    binary = results.context_binary
    if binary is None or not (folder / binary.path).is_file():
        raise ConfigError(f"htp-check folder {folder} holds no QNN context binary",
                          hint=f"rerun {command_line('htp-check')} without --no-context-binary")
    ptq = Path(manifest.config["ptq"])  # a ptq folder, or the QDQ .onnx itself
    qdq = ptq if ptq.suffix == ".onnx" else ptq / QDQ_ONNX
    model_name = next((p.stem for p in ptq.glob("*.aimet")), None) if ptq.is_dir() else None
    return HubArtifact("qnn_context_binary", folder / binary.path, "int8", "htp-check", model_name, folder,
                       _existing(qdq), io_onnx=_existing(folder / binary.onnx) if binary.onnx else None,
                       qnn_sdk_version=binary.qnn_sdk_version or None,
                       int4_weights_as_int8=results.model.get("int4_weights", 0))


def _aimet_artifact(folder: Path) -> HubArtifact:
    _check_aimet_dir(folder)
    in_ptq = stage_of(folder.parent) in INT8_STAGES
    manifest = Manifest.read(folder.parent, stage=INT8_STAGES, flag="artifact") if in_ptq else None
    return HubArtifact("aimet", folder, "int8", _ptq_label(manifest) if manifest else folder.stem, folder.stem,
                       folder.parent if in_ptq else None, _existing(folder.parent / QDQ_ONNX),
                       preset=manifest.config.get("preset") if manifest else None)


def exported_model(folder: Path | None) -> str | None:
    """The --model value of the export behind an export, ptq or htp-check folder, through their manifests."""
    for _ in range(3):  # htp-check -> ptq -> export
        if folder is None or not (folder / MANIFEST_NAME).is_file():
            return None
        manifest = read_manifest(folder)
        stage = manifest.get("stage")
        if stage == "export":
            return manifest.get("config", {}).get("model")
        if stage in INT8_STAGES:
            upstream = (manifest.get("inputs", {}).get("export_manifest") or {}).get("path")
            folder = Path(upstream).parent if upstream else None
        elif stage == "htp-check" and manifest.get("config", {}).get("ptq"):
            ptq = Path(manifest["config"]["ptq"])
            folder = ptq.parent if ptq.suffix == ".onnx" else ptq
        else:
            return None
    return None


def _folder_artifact(path: Path) -> HubArtifact:
    stage = stage_of(path)
    readers = {"export": _export_artifact, "ptq": _ptq_artifact, "qat": _ptq_artifact, "htp-check": _htp_check_artifact}
    if stage in readers:
        return readers[stage](path)
    if path.suffix == ".aimet":
        return _aimet_artifact(path)
    what = f"a {stage!r} stage output" if stage else "not a stage output (no manifest.json)"
    raise ConfigError(f"{path} is {what}: neither an export nor a ptq folder", hint=ARTIFACT_HINT)


def _model_in(folder: Path, stage: str | None) -> str | None:
    """The registered model an export or ptq folder holds (for a bare .onnx taken from one)."""
    if stage == "export":
        return Manifest.read(folder, stage="export", flag="artifact", verify=False).config.get("model")
    if stage in INT8_STAGES:
        return next((p.stem for p in folder.glob("*.aimet")), None)
    return None


def _file_artifact(path: Path) -> HubArtifact:
    if path.suffix == ".onnx":
        stage = stage_of(path.parent)
        quantized = path.name == QDQ_ONNX or stage in INT8_STAGES
        precision = "int8" if quantized else "fp32" if stage == "export" else "unknown"
        label = "export" if stage == "export" and path.name == EXPORT_ONNX else path.stem
        source = path.parent if stage in ("export", *INT8_STAGES) else None
        return HubArtifact("onnx", path, precision, label, _model_in(path.parent, stage), source, path, io_onnx=path)
    if path.suffix == ".bin":
        if stage_of(path.parent) == "htp-check":  # the htp-check's binary, given as a file: its manifest still counts
            built = _htp_check_artifact(path.parent)
            if built.upload.resolve() == path.resolve():
                return dataclasses.replace(built, label=path.stem)
        return HubArtifact("qnn_context_binary", path, "unknown", path.stem, None, None, None)
    raise ConfigError(f"{path} is not a model AI Hub takes here (suffix {path.suffix or 'none'})", hint=ARTIFACT_HINT)


def resolve_artifact(path: Path, reference_onnx: Path | None = None) -> HubArtifact:
    """Turn the user's argument into what to upload and what to compare with; ConfigError if unusable."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"artifact not found: {path}", hint=ARTIFACT_HINT)
    artifact = _folder_artifact(path) if path.is_dir() else _file_artifact(path)
    if reference_onnx is None:
        return artifact
    if not Path(reference_onnx).is_file():
        raise ConfigError(f"--reference-onnx not found: {reference_onnx}",
                          hint="pass the host .onnx file to compare with")
    return dataclasses.replace(artifact, host_reference=Path(reference_onnx))
