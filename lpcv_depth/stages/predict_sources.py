"""predict's sources: every model the pipeline makes, behind one `predict(image, key)`.

A source is opened in two steps: `identify_sources` reads only what says which model it is (an ONNX
file's metadata, a stage manifest, a --model name), so sources of different models are refused
before anything heavy loads; `Source.open()` then loads it (torch, ONNX Runtime, the HTP emulator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, ContractError, LpcvError
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, sha256_file
from lpcv_depth.stage import command_line

__all__ = ["Source", "identify_sources", "check_same_model", "MixedModelsError", "PREDICTIONS_FOLDER"]

# A hub stage folder keeps the phone's outputs here (stages/hub_inference.py).
PREDICTIONS_FOLDER = "device_outputs"


class MixedModelsError(LpcvError):
    """The sources are not the same model, so their columns would not compare."""


@dataclass
class Source:
    """One column of predict's rows."""

    kind: str  # model | onnx | ptq | htp | predictions
    path: Path | None  # the file or folder it reads (None for --model with downloaded weights)
    label: str
    model: str | None = None  # the model's name as its artifacts record it, None when they do not say
    contract: str | None = None
    output_mode: str | None = None
    record: dict = field(default_factory=dict)  # the manifest's description of this source
    runner: Any = None

    @property
    def identity(self) -> dict:
        return {key: value for key, value in (("model", self.model), ("contract", self.contract),
                                               ("output", self.output_mode)) if value is not None}

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "path": os.fspath(self.path) if self.path else None,
                **self.identity, **self.record}

    def predict(self, image: np.ndarray, key: str) -> np.ndarray:
        """The contract output (1, 1, 480, 640) float32 of one prepared (3, 480, 640) image."""
        output = self.runner(image, key)
        return contract_output(output, f"{self.label} output for {key}")


def contract_output(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    shape = TRACK3.output.concrete_shape(1)
    if array.size != int(np.prod(shape)) or not np.issubdtype(array.dtype, np.number):
        raise ContractError(f"{what} has shape {array.shape} and dtype {array.dtype}; the contract output is "
                            f"float32 {shape}", hint="pass a model or predictions that follow the Track 3 contract")
    array = array.reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ContractError(f"{what} contains NaN or Inf", hint="check the model on this input")
    return array


# ---------------------------------------------------------------------------------------------
# Identities: read without loading a model


def _onnx_identity(path: Path) -> dict:
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others for a file that is not a model
        raise ContractError(f"{path} is not a readable ONNX model: {type(err).__name__}: {err}",
                            hint=f"pass an ONNX file written by {command_line('export')} or {command_line('ptq')}") from err
    props = {prop.key: prop.value for prop in proto.metadata_props}
    return {"model": props.get("lpcv.model") or None, "contract": props.get("lpcv.contract") or None,
            "output_mode": props.get("lpcv.output_mode") or None}


def _ptq_folder(folder: Path, flag: str) -> tuple[Manifest, Path]:
    """A ptq (or qat) stage output, its outputs' hashes checked, and its QDQ model."""
    from lpcv_depth.stages.int8_outputs import INT8_STAGES, QDQ_ONNX

    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is not a folder", hint=f"pass the folder {command_line('ptq')} wrote")
    manifest = Manifest.read(folder, stage=INT8_STAGES, flag=flag)
    qdq = folder / QDQ_ONNX
    if not qdq.is_file():
        raise ConfigError(f"{folder} has no {QDQ_ONNX}", hint=f"rerun {command_line('ptq')}")
    return manifest, qdq


def _model_source(model: str, weights: str | None, output: str) -> Source:
    from lpcv_depth.models import get_spec
    from lpcv_depth.stages.export import weights_path

    name = get_spec(model).name
    return Source("model", weights_path(weights), f"torch {name}", model=name, contract=TRACK3.name, output_mode=output,
                  record={"reference": model, "weights": weights})


def _onnx_source(path: Path) -> Source:
    if not path.is_file():
        raise ConfigError(f"--onnx file not found: {path}", hint="pass an .onnx file")
    quantized = _has_qdq(path)
    label = f"onnx {'int8 ' if quantized else ''}{_short(path)}"
    return Source("onnx", path, label, **_onnx_identity(path), record={"sha256": sha256_file(path), "qdq": quantized})


def _ptq_source(folder: Path, kind: str) -> Source:
    flag = f"--{kind}"
    manifest, qdq = _ptq_folder(folder, flag)
    identity = _onnx_identity(qdq)
    identity["model"] = manifest.results.get("model") or identity["model"]
    label = f"{'HTP' if kind == 'htp' else 'ptq'} int8 {_short(folder)}"
    return Source(kind, folder, label, **identity,
                  record={"qdq_onnx": os.fspath(qdq), "sha256": manifest.output_sha256(qdq.name) or sha256_file(qdq),
                          "preset": manifest.results.get("preset") or manifest.config.get("preset")})


def _predictions_source(folder: Path) -> Source:
    if not folder.is_dir():
        raise ConfigError(f"--predictions folder not found: {folder}",
                          hint="pass a folder of <photo name>.npy files, or a hub stage output folder")
    identity: dict = {}
    if (folder / MANIFEST_NAME).is_file():
        manifest = Manifest.read(folder, stage="hub", flag="--predictions")
        identity["model"] = (manifest.results.get("input") or {}).get("model")
        folder = folder / PREDICTIONS_FOLDER
        if not folder.is_dir():
            raise ConfigError(f"the hub output {folder.parent} has no {PREDICTIONS_FOLDER}/ (no on-device inference)",
                              hint=f"rerun {command_line('hub')} with --images or --eval-data")
    files = sorted(folder.rglob("*.npy"))
    if not files:
        raise ConfigError(f"no .npy files in --predictions {folder}",
                          hint="save one (1, 1, 480, 640) array per photo as <photo name>.npy")
    return Source("predictions", folder, f"saved {_short(folder)}", **identity, record={"files": len(files)})


def identify_sources(config) -> list[Source]:
    """Every source of a PredictConfig, in column order: --model, --onnx, --ptq, --htp, --predictions."""
    sources = [_model_source(config.model, config.weights, config.output)] if config.model else []
    sources += [_onnx_source(Path(path)) for path in config.onnx]
    sources += [_ptq_source(Path(path), "ptq") for path in config.ptq]
    sources += [_ptq_source(Path(path), "htp") for path in config.htp]
    sources += [_predictions_source(Path(path)) for path in config.predictions]
    _unique_labels(sources)
    return sources


def check_same_model(sources: list[Source]) -> None:
    """Columns side by side must show one model: two sources whose artifacts name different models,
    contracts or output modes are refused (a source that does not say is taken as it is)."""
    for key in ("model", "contract", "output"):
        named = {source.label: source.identity[key] for source in sources if key in source.identity}
        if len(set(named.values())) > 1:
            listing = ", ".join(f"{label}: {value}" for label, value in named.items())
            raise MixedModelsError(f"the sources are of different models ({key} differs: {listing}); their "
                                   "columns would not compare",
                                   hint="pass sources of one model (its export, its ptq folder, its hub outputs), "
                                        "or run predict once per model")


def _unique_labels(sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        count = seen[source.label] = seen.get(source.label, 0) + 1
        if count > 1:
            source.label = f"{source.label} ({count})"


def _short(path: Path) -> str:
    """A path as its last two parts: enough to tell build/x/export/model.onnx from build/x/ptq-w8a8."""
    parts = Path(path).resolve().parts
    return "/".join(parts[-2:])


def _has_qdq(path: Path) -> bool:
    from lpcv_depth.verify import has_qdq_nodes

    return has_qdq_nodes(path)


# ---------------------------------------------------------------------------------------------
# Loading


def open_sources(sources: list[Source], config, log) -> None:
    """Load every source's runtime (torch, ONNX Runtime, the HTP emulator): `source.runner` set."""
    for source in sources:
        with log.step(f"load-{source.kind}") as step:
            source.runner = _OPENERS[source.kind](source, config, log)
            step.detail = source.label


def _open_model(source: Source, config, log):
    import torch

    from lpcv_depth.models import create_model

    model = create_model(config.model, weights=config.weights, output=config.output)
    info = model.weights_info
    if info.is_random:
        log.warn("RANDOM WEIGHTS (weights=None): the pictures show an untrained model")
    source.record.update({"weights": info.as_dict(), "sha256": info.sha256})

    def run(image: np.ndarray, key: str) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(config.threads or previous)
        try:
            with torch.no_grad():
                return model(torch.from_numpy(image[None])).numpy()
        finally:
            torch.set_num_threads(previous)

    return run


def _ort_runner(path: Path, config):
    from lpcv_depth.verify import OrtRunner

    try:
        runner = OrtRunner(path, threads=config.threads)
    except Exception as err:  # onnxruntime raises its own exception types for unloadable files
        raise ContractError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: {err}",
                            hint=f"pass an ONNX file written by {command_line('export')} or {command_line('ptq')}") from err
    return lambda image, key: runner.run(image[None])


def _open_onnx(source: Source, config, log):
    return _ort_runner(source.path, config)


def _open_ptq(source: Source, config, log):
    return _ort_runner(Path(source.record["qdq_onnx"]), config)


def _open_htp(source: Source, config, log):
    from lpcv_depth.backends.qnn import HtpSession, HtpTarget, import_qnn, native_stderr

    backend = import_qnn()
    target = HtpTarget(soc_model=config.soc_model, htp_arch=config.htp_arch)
    with native_stderr():
        session = HtpSession(Path(source.record["qdq_onnx"]), backend, target, cpu_fallback=True)
    source.record.update({"qnn": backend.describe(), "target": target.describe()})
    return lambda image, key: session.run(image[None])


def _open_predictions(source: Source, config, log):
    folder = source.path
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.npy")):
        by_stem.setdefault(path.stem, []).append(path)

    def run(image: np.ndarray, key: str) -> np.ndarray:
        # hub_inference names a photo <relative path with / as __>.npy, under a set folder ("images").
        found = by_stem.get(key.replace("/", "__"), [])
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)}"
            raise ConfigError(f"{problem} prediction file {key.replace('/', '__')}.npy in {folder}"
                              + (f": {', '.join(os.fspath(p) for p in found[:3])}" if found else ""),
                              hint="save one (1, 1, 480, 640) array per input photo, named after the photo "
                                   "(as the hub stage's device_outputs/ are), or leave that photo out")
        try:
            return np.load(found[0], allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ContractError(f"cannot read prediction {found[0]}: {err}",
                                hint="replace the file with a (1, 1, 480, 640) float32 .npy") from err

    return run


_OPENERS = {"model": _open_model, "onnx": _open_onnx, "ptq": _open_ptq, "htp": _open_htp,
            "predictions": _open_predictions}
