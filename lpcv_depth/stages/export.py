"""Export a registered depth model to a simplified, verified Track 3 ONNX.

    lpcv-depth export                                    # DA-V2 ViT-S, official weights
    lpcv-depth export --model fastdepth --weights default
    lpcv-depth export --weights None                     # random init, pipeline test only
    lpcv-depth export --model my_net.py:my_net_spec      # your own network (docs/models.md)
    lpcv-depth export --onnx my_net.onnx --wrap --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
                                                         # your own ONNX file (docs/export.md)

Writes OUT/model.onnx and OUT/manifest.json (default OUT: build/<model>/export, <model> the spec's name,
or the ONNX file's name).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lpcv_depth.contract import GELU_MODES, OUTPUT_MODES, TRACK3
from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.images import list_images, load_contract_batch
from lpcv_depth.manifest import Manifest, config_as_dict, read_manifest, sha256_of_files, write_manifest
from lpcv_depth.options import choices_hint, flag_name, inherit, option, parse_size
from lpcv_depth.results import ExportResults
from lpcv_depth.stages.export_onnx import NATIVE_OUTPUTS, format_channels, onnx_model_name, parse_channels, run_onnx_export
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, command_line, display_path
from lpcv_depth.verify import (OrtRunner, ParityThresholds, check_onnx_io, check_output_range, compare_outputs,
                               sqnr_db)
from lpcv_depth.workspace import build_dir, in_workspace

__all__ = ["ExportConfig", "ExportOutput", "run_export", "count_macs", "DEFAULT_MODEL", "weights_path",
           "DEFAULT_CHECK_IMAGES", "ONNX_ONLY_OPTIONS", "OnnxFileOptions"]

STAGE = "export"
DEFAULT_MODEL = "depth_anything_v2_vits"
DEFAULT_CHECK_IMAGES = Path("calibration_data")
EXPORTERS = ("legacy", "dynamo")
# What only an ONNX file's export takes (a registered model's spec says all of it).
ONNX_ONLY_OPTIONS = ("wrap", "mean", "std", "native_input_size", "native_output", "input_name", "output_name")
ONNX_NAME = "model.onnx"


def parse_weights(text: str) -> str | None:
    """--weights: the word None (any case) asks for random init; anything else passes through."""
    return None if text.lower() == "none" else text


def weights_path(weights: str | None) -> Path | None:
    """The local file a --weights value names; None for 'hf', 'default' and random init."""
    return None if weights in (None, "hf", "default") else Path(weights)


@dataclass(frozen=True)
class ExportConfig:
    model: str = option(DEFAULT_MODEL, help="a registered model (--list shows all), or your own network's "
                                            "factory: package.module:factory or path/to/file.py:factory")
    weights: str | None = option("hf", parse=parse_weights,
                                 help="a checkpoint PATH, 'hf' (official download), 'default' (the model's declared "
                                      "default file) or None (random init: pipeline tests only)")
    output: str = option("depth", choices=OUTPUT_MODES,
                         help="depth (what the Track 3 scorer reads) or disparity (the sample solution's output)")
    opset: int = option(17, help="ONNX opset (13..21)")
    batch: int = option(1, help="static batch size")
    input_size: tuple[int, int] | None = option(None, parse=parse_size, metavar="HxW",
                                                help="backbone input size inside the wrapper, multiples of the "
                                                     "patch size (default: the model's native size)")
    gelu: str = option("tanh", choices=GELU_MODES,
                       help="tanh runs on the Snapdragon NPU; exact exports Erf, which QNN HTP rejects")
    exporter: str = option("legacy", choices=EXPORTERS, help="TorchScript (legacy) or dynamo exporter")
    out: Path | None = option(None, help="output folder (default: build/<model>/export)")
    check_images: Path | None = option(None, help="real photos for the contract and parity checks (default: "
                                                  "calibration_data/ of the workspace; synthetic if empty)")
    num_check_images: int = option(4, help="photos used by the contract and parity checks")
    max_abs_diff: float = option(1e-3, help="parity: largest |ONNX Runtime - torch| allowed")
    min_sqnr: float = option(40.0, help="parity: lowest ONNX Runtime vs torch SQNR allowed, dB")
    onnx: Path | None = option(None, help="your own ONNX file instead of --model: taken as it is when it meets the "
                                          "Track 3 contract, else wrapped with --wrap (docs/export.md)")
    wrap: bool = option(False, help="--onnx: add the Track 3 pre- and post-processing (normalise, resize, per-sample "
                                    "depth scaling) around the graph as ONNX ops")
    mean: tuple[float, float, float] | None = option(None, parse=parse_channels, format=format_channels,
                                                     metavar="R,G,B", help="--wrap: the per-channel mean the graph's "
                                                                           "input is normalised with, pixels in [0,1]")
    std: tuple[float, float, float] | None = option(None, parse=parse_channels, format=format_channels,
                                                    metavar="R,G,B", help="--wrap: the per-channel std, pixels in "
                                                                          "[0,1]")
    native_input_size: tuple[int, int] | None = option(None, parse=parse_size, metavar="HxW",
                                                       help="--wrap: the size the graph takes (default: read from the "
                                                            "graph when it is static)")
    native_output: str = option("depth", choices=NATIVE_OUTPUTS, help="--wrap: what the graph outputs")
    input_name: str | None = option(None, help="--onnx: the image input, where the graph has several")
    output_name: str | None = option(None, help="--onnx: the depth output, where the graph has several")

    def __post_init__(self):
        if self.onnx is not None:
            self._check_onnx_options()
        else:
            self._resolve_model()
        if self.output not in OUTPUT_MODES:
            raise ConfigError(f"output must be one of {OUTPUT_MODES}, got {self.output!r}",
                              hint=choices_hint("output", OUTPUT_MODES))
        if self.gelu not in GELU_MODES:
            raise ConfigError(f"gelu must be one of {GELU_MODES}, got {self.gelu!r}",
                              hint=choices_hint("gelu", GELU_MODES))
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}",
                              hint=choices_hint("exporter", EXPORTERS))
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"opset {self.opset} is unsupported", hint="use an opset between 13 and 21 (17 is default)")
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}",
                              hint="pass --batch 1 (the default; the Track 3 contract's batch) or a larger whole "
                                   "number")
        if self.num_check_images < 1:
            raise ConfigError(f"num_check_images must be >= 1, got {self.num_check_images}",
                              hint="pass --num-check-images 1 or more (default 4)")
        self.parity  # validates the thresholds

    def check_onnx_only(self) -> None:
        """--onnx with an option that belongs to a registered model: which one was meant cannot be guessed."""
        if self.model != onnx_model_name(self.onnx):
            raise ConfigError(f"--model {self.model} and --onnx {self.onnx} both name the model",
                              hint="pass either --model or --onnx")
        if self.input_size is not None:
            raise ConfigError("--input-size resizes a registered model; an ONNX file has its own size",
                              hint="leave --input-size out (with --wrap, --native-input-size gives the graph's size)")

    def _resolve_model(self) -> None:
        from lpcv_depth.models import resolve_model

        resolved = resolve_model(self.model)  # unknown names fail here, listing the valid ones
        # Recorded as the reference that finds the model from any folder (a file's path made absolute).
        object.__setattr__(self, "model", resolved.source.reference)
        defaults = {f.name: f.default for f in fields(self)}
        given = [flag_name(name) for name in ONNX_ONLY_OPTIONS if getattr(self, name) != defaults[name]]
        if given:
            raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --onnx FILE only",
                              hint=f"pass --onnx FILE, or leave {', '.join(given)} out")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", resolved.spec.validate_input_size(self.input_size))

    def _check_onnx_options(self) -> None:
        """--onnx: the model is the file (its name names the outputs); --wrap needs the normalisation.
        Options that only a registered model takes are refused when the export runs (check_onnx_only)."""
        if self.model == DEFAULT_MODEL:
            object.__setattr__(self, "model", onnx_model_name(self.onnx))
        object.__setattr__(self, "onnx", Path(self.onnx).absolute())
        if self.wrap and (self.mean is None or self.std is None):
            raise ConfigError("--wrap needs the normalisation the model was trained with",
                              hint="pass --mean R,G,B and --std R,G,B for pixels in [0,1] (ImageNet: --mean "
                                   "0.485,0.456,0.406 --std 0.229,0.224,0.225; RGB/255 alone: --mean 0,0,0 --std 1,1,1)")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"--std must be > 0 per channel, got {format_channels(self.std)}",
                              hint="pass --std R,G,B with three positive numbers")
        if self.native_output not in NATIVE_OUTPUTS:
            raise ConfigError(f"native_output must be one of {NATIVE_OUTPUTS}, got {self.native_output!r}",
                              hint=choices_hint("native_output", NATIVE_OUTPUTS))

    @property
    def parity(self) -> ParityThresholds:
        return ParityThresholds(max_abs_diff=self.max_abs_diff, min_sqnr_db=self.min_sqnr)

    @property
    def weights_file(self) -> Path | None:
        """The local weights file, when --weights names one (--out must never replace it)."""
        return weights_path(self.weights)

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        suffix = "" if self.output == "depth" else f"-{self.output}"
        if self.onnx is not None:
            return build_dir(onnx_model_name(self.onnx), f"export{suffix}")
        from lpcv_depth.models import model_folder_name

        return build_dir(model_folder_name(self.model), f"export{suffix}")

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class OnnxFileOptions:
    """--onnx FILE and the options that go with it, declared as export declares them, for a command
    that passes them on to its export step (run, search): its config derives from this."""

    onnx: Path | None = inherit(ExportConfig, "onnx")
    wrap: bool = inherit(ExportConfig, "wrap")
    mean: tuple[float, float, float] | None = inherit(ExportConfig, "mean")
    std: tuple[float, float, float] | None = inherit(ExportConfig, "std")
    native_input_size: tuple[int, int] | None = inherit(ExportConfig, "native_input_size")
    native_output: str = inherit(ExportConfig, "native_output")
    input_name: str | None = inherit(ExportConfig, "input_name")
    output_name: str | None = inherit(ExportConfig, "output_name")

    def export_config(self, **options) -> ExportConfig:
        """The export these options and `options` make: building it validates them, and the ONNX-only
        options are passed even without --onnx, so that export refuses them there."""
        return ExportConfig(**options, onnx=self.onnx, **{name: getattr(self, name) for name in ONNX_ONLY_OPTIONS})

    def onnx_options(self) -> dict:
        """What export --onnx takes, passed on only with --onnx (a registered model's export is unchanged)."""
        if self.onnx is None:
            return {}
        return {name: getattr(self, name) for name in ("onnx", *ONNX_ONLY_OPTIONS)}

    def model_folder(self, model: str) -> str:
        """The model's folder under build/: the file's stem with --onnx, else the registered model's."""
        if self.onnx is not None:
            return onnx_model_name(self.onnx)
        from lpcv_depth.models import model_folder_name

        return model_folder_name(model)


@dataclass(frozen=True)
class ExportOutput:
    """What a finished run of the export stage hands back: where its output folder is, and what it found."""

    out_dir: Path
    onnx_path: Path
    manifest_path: Path
    results: ExportResults
    manifest: dict


def run_export(config: ExportConfig, log: StageLog | None = None) -> ExportOutput:
    """Build, export, simplify and verify the model; returns the artifact paths and typed results."""
    from lpcv_depth.models import resolve_model

    log = log or StageLog(STAGE)
    if config.onnx is not None:
        return run_onnx_export(config, log)
    photos = check_images_folder(config)
    inputs = [config.weights_file, photos if photos.is_dir() else None]
    with StagingDir(config.destination, stage=STAGE, inputs=inputs) as staging:
        model, loaded = _load_model(config, log)
        images, images_info = _check_inputs(config, log)
        macs = _count_macs_step(model, log)
        onnx_path = staging / ONNX_NAME
        nodes = _export_and_simplify(config, model, loaded["weights"], onnx_path, log)
        contract, ort_outputs = _check_contract(config, onnx_path, images, log)
        parity, gelu_gap = _check_parity(config, model, images, ort_outputs, loaded["gelu_modules"], log)
        results = ExportResults(**loaded, macs=macs, check_images=images_info, **nodes, contract=contract,
                                parity=parity, onnx_bytes=onnx_path.stat().st_size, gelu_tanh_vs_exact=gelu_gap)
        manifest_path = write_manifest(staging.path, stage=STAGE, config=config.as_dict(),
                                       inputs={"weights": loaded["weights"], "check_images": images_info,
                                               "model": resolve_model(config.model).source.as_dict()},
                                       outputs=[onnx_path], timings=log.timings, results=results)
    destination = config.destination
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(destination / ONNX_NAME)}")
    return ExportOutput(destination, destination / ONNX_NAME, destination / manifest_path.name, results,
                        read_manifest(destination))


def _load_model(config: ExportConfig, log: StageLog):
    from lpcv_depth.models import create_model, set_gelu_approximation

    with log.step("load-model") as step:
        model = create_model(config.model, weights=config.weights, output=config.output, input_size=config.input_size)
        gelu_count = set_gelu_approximation(model, config.gelu)
        info = model.weights_info
        params = sum(p.numel() for p in model.parameters())
        step.detail = f"{config.model}, {params / 1e6:.1f}M params, weights: {info.source}"
    if info.is_random:
        log.warn("RANDOM WEIGHTS (weights=None): the exported model is for pipeline tests only")
    loaded = {"params": params, "weights": info.as_dict(), "gelu_modules": gelu_count, "model": model.describe(),
              "spec": model.spec.metadata()}
    return model, loaded


def check_images_folder(config: ExportConfig) -> Path:
    """The photos the contract and parity checks read: --check-images, else the workspace's calibration_data/."""
    return in_workspace(config.check_images or DEFAULT_CHECK_IMAGES)


def _check_inputs(config: ExportConfig, log: StageLog) -> tuple[np.ndarray, dict]:
    """Real images for the contract and parity checks, or a labelled synthetic fallback."""
    folder = check_images_folder(config)
    paths = list_images(folder)[: config.num_check_images] if folder.is_dir() else []
    if config.check_images is not None and not paths:
        raise ConfigError(f"no JPG/PNG images found in --check-images {config.check_images}",
                          hint="pass a folder of .jpg/.png photos, or leave --check-images out")
    if paths:
        return load_contract_batch(paths), {"source": os.fspath(folder), "files": [p.name for p in paths],
                                            "sha256": sha256_of_files(paths, folder)}
    log.warn("no real images to check against (calibration_data/ is empty): using synthetic images. "
             "Pass --check-images DIR for a check on real photos.")
    return synthetic_images(config.num_check_images), {"source": "synthetic", "files": [], "sha256": None}


def synthetic_images(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, TRACK3.width, dtype=np.float32)[None, None, :]
    images = np.clip(ramp + rng.normal(0, 20, (count, 3, TRACK3.height, TRACK3.width)), 0, 255)
    return images.astype(np.float32)


def count_macs(model, batch: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, *TRACK3.input.shape[1:]))
    return counter.get_total_flops() // 2


def _count_macs_step(model, log: StageLog) -> int:
    with log.step("macs") as step:
        macs = count_macs(model, 1)
        step.detail = f"{macs / 1e9:.2f} GMACs per image"
    return macs


def _torch_forward(model, images: np.ndarray, batch: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i:i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def _export_and_simplify(config: ExportConfig, model, weights: dict, onnx_path: Path, log: StageLog) -> dict:
    """torch.onnx.export, onnxsim, the contract as ONNX metadata, onnx.checker."""
    import onnx
    import torch

    raw_path = onnx_path.with_name("model.raw.onnx")
    dummy = torch.zeros(config.batch, *TRACK3.input.shape[1:])
    with log.step("torch.onnx.export") as step, tracer_warnings_silenced():
        torch.onnx.export(model, (dummy,), os.fspath(raw_path), input_names=[TRACK3.input.name],
                          output_names=[TRACK3.output.name], opset_version=config.opset,
                          dynamo=config.exporter == "dynamo", do_constant_folding=True)
        raw = onnx.load(os.fspath(raw_path))
        step.detail = f"{config.exporter}, opset {config.opset}, {len(raw.graph.node)} nodes"
    with log.step("onnxsim") as step:
        simplified = _simplify(raw)
        step.detail = f"{len(raw.graph.node)} -> {len(simplified.graph.node)} nodes"
    onnx.helper.set_model_props(simplified, _onnx_metadata(config, model, weights))
    onnx.save(simplified, os.fspath(onnx_path))
    raw_path.unlink()
    with log.step("onnx.checker"):
        onnx.checker.check_model(os.fspath(onnx_path), full_check=True)
    return {"nodes_exported": len(raw.graph.node), "nodes_simplified": len(simplified.graph.node),
            "op_histogram": op_histogram(simplified)}


def _onnx_metadata(config: ExportConfig, model, weights: dict) -> dict[str, str]:
    """The contract and the model's identity, stored in the ONNX itself."""
    # The spec's name, not the reference: a file reference's absolute path has no place in an uploaded model.
    return {**TRACK3.metadata_props(), "lpcv.model": model.spec.name, "lpcv.output_mode": config.output,
            "lpcv.weights_source": weights["source"], "lpcv.weights_sha256": weights.get("sha256") or "",
            "lpcv.gelu": config.gelu, "lpcv.backbone_input_size": "x".join(map(str, model.input_size)),
            "lpcv.native_output": model.spec.output_semantics or model.spec.native_output,
            "lpcv.max_depth": "" if model.spec.max_depth is None else f"{model.spec.max_depth:g}"}


def _check_contract(config: ExportConfig, onnx_path: Path, images: np.ndarray, log: StageLog):
    """Names and shapes from the graph, then the output range on real images."""
    import onnx

    with log.step("contract") as step:
        contract = check_onnx_io(onnx.load(os.fspath(onnx_path), load_external_data=False), TRACK3, config.batch)
        ort_outputs = OrtRunner(onnx_path).run(images)
        contract["output_range"] = check_output_range(ort_outputs, TRACK3)
        step.detail = (f"names/shapes/dtype ok, range [{contract['output_range']['min']:.3f}, "
                       f"{contract['output_range']['max']:.3f}] on {len(images)} images")
    return contract, ort_outputs


def _check_parity(config: ExportConfig, model, images: np.ndarray, ort_outputs: np.ndarray, gelu_modules: int,
                  log: StageLog) -> tuple[dict, dict | None]:
    """ONNX Runtime against torch, and how far the exported tanh GELU is from the exact one."""
    from lpcv_depth.models import set_gelu_approximation

    with log.step("parity") as step:
        torch_outputs = _torch_forward(model, images, config.batch)
        parity = compare_outputs(torch_outputs, ort_outputs, config.parity, "onnxruntime vs torch")
        step.detail = f"max abs diff {parity['max_abs_diff']:.2e}, SQNR {parity['sqnr_db']:.1f} dB"
    if config.gelu == "exact" or not gelu_modules:
        return parity, None
    set_gelu_approximation(model, "exact")
    exact = _torch_forward(model, images, config.batch)
    return parity, {"max_abs_diff": float(np.max(np.abs(exact - torch_outputs))),
                    "sqnr_db": sqnr_db(exact, torch_outputs)}


def _simplify(model):
    from onnxsim import onnx_simplifier, simplify

    try:
        simplified, ok = simplify(model)
    finally:
        # onnxsim caches its native model executor for the whole process. The CLI freezes the heap as it
        # exits (cli._before_exit), so a cached executor would outlive the interpreter's teardown and
        # nanobind would print ~20 "leaked" lines on every export's stderr.
        onnx_simplifier._model_executor = None
    if not ok:
        raise LpcvError("onnxsim could not validate the simplified model",
                        hint="re-run with another --opset or report the model; the unsimplified graph is not kept")
    return simplified


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@contextmanager
def tracer_warnings_silenced():
    """torch.onnx emits TracerWarnings for every shape-dependent `if`; with static shapes they are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_export(folder: str | os.PathLike, flag: str = "--fp32") -> tuple[Manifest, ExportResults]:
    """An export stage output, checked against its manifest (model.onnx's sha256 included)."""
    manifest = Manifest.read(folder, stage=STAGE, flag=flag)
    return manifest, manifest.results_as(ExportResults)


def _list_arguments(parser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="list every model (built in, from plugin packages, and --model's factory) with where "
                             "it comes from, and exit")


def _list_models(args) -> int | None:
    """Every model with where it comes from; a plugin that cannot be loaded is reported, with its fix,
    and the others are still listed."""
    if not args.list:
        return None
    import sys

    from lpcv_depth.models.sources import is_reference, model_sources, resolve_model

    listed, problems = model_sources()
    if is_reference(args.model):
        resolved = resolve_model(args.model)
        listed.append((resolved.spec, resolved.source))
    for spec, source in listed:
        print(f"{spec.name:40s} {source.describe():28s} {spec.license:14s} {spec.description}")
    for problem in problems:
        print(f"{STAGE}: WARNING {problem}", file=sys.stderr)
    return 0


def _next_hint(result: ExportOutput) -> str:
    return command_line("ptq", "--calib", "calibration_data", "--fp32", display_path(result.out_dir))


DEFINITION = StageDefinition(name=STAGE, config=ExportConfig, run=run_export, description=__doc__,
                             next_hint=_next_hint, extra_arguments=_list_arguments, before_run=_list_models)
