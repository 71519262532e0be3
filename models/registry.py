"""The model registry: every model the pipeline knows, with the metadata that lives beside it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from torch import nn

from lpcv_depth.errors import ConfigError

# AI Hub takes an AIMET model's bit widths from its .encodings (4 for the weights of the 4-bit presets);
# --quantize_full_type names the preset for whatever the encodings leave out, as qai-hub-models compiles
# its own precompiled AIMET models (docs/hub.md, "4-bit weights").
PRESET_HUB_COMPILE_OPTIONS = {"w4a8": "--quantize_full_type w4a8", "w4a16": "--quantize_full_type w4a16"}

NativeOutput = Literal["depth", "disparity"]


@dataclass(frozen=True)
class HubWeights:
    """An official checkpoint on the Hugging Face Hub."""

    repo_id: str
    filename: str
    revision: str = "main"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a backbone, declared once, next to its code.

    build:        returns the randomly initialised backbone; it maps a normalised (B,3,h,w) tensor
                  to a (B,1,h',w') map of `native_output` (any h',w': the wrapper resizes).
    load_weights: fills a built backbone from a local file; must raise WeightsError on any mismatch.
    prepare_for_quantization: the model's own float rewrite before PTQ (DA-V2 folds its LayerScales),
                  called with the wrapped model; returns what it changed, for the PTQ report.
    hub_compile_options: AI Hub compile options this model needs beyond the hub stage's own.
    hub_preset_compile_options: more AI Hub compile options for the AIMET artifact of one ptq preset
                  (preset -> options); by default the 4-bit presets name their type (see
                  PRESET_HUB_COMPILE_OPTIONS). `hub_options_for(preset)` gives what a compile gets.
    """

    name: str
    build: Callable[[], nn.Module]
    load_weights: Callable[[nn.Module, Path], None]
    native_input_size: tuple[int, int]
    patch_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_output: NativeOutput
    license: str
    weight_source: str
    hub_weights: HubWeights | None = None
    default_weights: str | None = "hf"
    description: str = ""
    # A metric model's output ceiling in metres (DA-V2 metric heads: sigmoid * max_depth), else None.
    max_depth: float | None = None
    # What the backbone's output means, in words: "relative disparity", "metric depth in metres, 0..20".
    output_semantics: str = ""
    prepare_for_quantization: Callable[[nn.Module], dict] | None = None
    hub_compile_options: str = ""
    hub_preset_compile_options: dict[str, str] = field(default_factory=lambda: dict(PRESET_HUB_COMPILE_OPTIONS))
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.native_output not in ("depth", "disparity"):
            raise ConfigError(f"{self.name}: native_output must be 'depth' or 'disparity', got {self.native_output!r}")
        height, width = self.native_input_size
        if height % self.patch_multiple or width % self.patch_multiple:
            raise ConfigError(f"{self.name}: native_input_size {self.native_input_size} is not a multiple "
                              f"of patch_multiple {self.patch_multiple}")

    def validate_input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        height, width = (int(v) for v in size)
        if height <= 0 or width <= 0 or height % self.patch_multiple or width % self.patch_multiple:
            raise ConfigError(
                f"{self.name}: input size {height}x{width} must be positive multiples of {self.patch_multiple}",
                hint=f"e.g. {self.native_input_size[0]}x{self.native_input_size[1]} (the native size)")
        return height, width

    def hub_options_for(self, preset: str | None) -> str:
        """The model's AI Hub compile options for an artifact of `preset` (None: not a ptq artifact)."""
        return " ".join(part for part in (self.hub_compile_options,
                                          self.hub_preset_compile_options.get(preset or "", "")) if part)

    def metadata(self) -> dict:
        """JSON-friendly description for manifests and `--list`."""
        return {
            "name": self.name,
            "native_input_size": list(self.native_input_size),
            "patch_multiple": self.patch_multiple,
            "mean": list(self.mean),
            "std": list(self.std),
            "native_output": self.native_output,
            "license": self.license,
            "weight_source": self.weight_source,
            "hub_weights": self.hub_weights.url if self.hub_weights else None,
            "default_weights": self.default_weights,
            "description": self.description,
            "max_depth": self.max_depth,
            "output_semantics": self.output_semantics or self.native_output,
            "hub_compile_options": self.hub_compile_options,
            "hub_preset_compile_options": dict(self.hub_preset_compile_options),
        }


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Make a model available to `create_model` and every stage. One call per model."""
    if spec.name in _REGISTRY and not replace:
        raise ConfigError(f"model {spec.name!r} is already registered", hint="pick another name or pass replace=True")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec a --model value names: a registered name, a factory reference (`package.module:factory`,
    `path/to/file.py:factory`) or a plugin's entry point (lpcv_depth.models.sources)."""
    from lpcv_depth.models.sources import resolve_model

    return resolve_model(name).spec


def canonical_model(name: str) -> str:
    """The --model value that names the same model from any folder (a file reference's path made
    absolute): what configs and manifests record."""
    from lpcv_depth.models.sources import resolve_model

    return resolve_model(name).source.reference


def model_folder_name(name: str) -> str:
    """The folder name of a model's outputs (build/<name>/): its spec's name, never a reference's path."""
    return get_spec(name).name


def resolve_default_weights(spec: ModelSpec) -> str | None:
    """The model's default weights; a relative path is looked up in the workspace (lpcv_depth.workspace)."""
    from lpcv_depth.workspace import in_workspace

    default = spec.default_weights
    if default is None or default == "hf":
        return default
    return os.fspath(in_workspace(default))
