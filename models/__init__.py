"""Model registry: `create_model(name, weights=...)` returns a Track 3-wrapped torch module."""

from __future__ import annotations

import logging
import os

import torch

from lpcv_depth.errors import WeightsError
from lpcv_depth.models.registry import (HubWeights, ModelSpec, canonical_model, get_spec, list_models, model_folder_name,
                                        register_model, resolve_default_weights)
from lpcv_depth.models.sources import ModelSource, resolve_model
from lpcv_depth.models.weights import RANDOM_WEIGHTS_WARNING, WeightsInfo, resolve_weights
from lpcv_depth.models.wrapper import GELU_MODES, OUTPUT_MODES, Track3Wrapper, set_gelu_approximation

# Importing the model modules registers them.
from lpcv_depth.models import depth_anything_v2 as _depth_anything_v2  # noqa: E402,F401
from lpcv_depth.models import fastdepth as _fastdepth  # noqa: E402,F401

log = logging.getLogger("lpcv_depth.models")

__all__ = ["create_model", "list_models", "register_model", "get_spec", "resolve_model", "canonical_model",
           "model_folder_name", "ModelSpec", "ModelSource", "HubWeights", "Track3Wrapper", "WeightsInfo", "OUTPUT_MODES",
           "GELU_MODES", "set_gelu_approximation"]


def create_model(name: str, *, weights: str | os.PathLike | None, output: str = "depth",
                 input_size: tuple[int, int] | None = None, seed: int = 0, **wrapper_options) -> Track3Wrapper:
    """Build a model wrapped to the Track 3 contract, in eval mode.

    name:    a registered name, a factory reference (package.module:factory, path/to/file.py:factory)
             or a plugin's model (lpcv_depth.models.sources).

    weights: a local file path, "hf" for the official Hugging Face checkpoint, "default" for the
    model's declared default, or None for random initialisation (never chosen implicitly).
    seed:    makes random initialisation reproducible; the global RNG state is left untouched.
    """
    spec = get_spec(name)
    if isinstance(weights, str) and weights == "default":
        weights = resolve_default_weights(spec)
        if weights is None:
            raise WeightsError(f"model {name!r} declares no default weights", hint="pass weights=PATH")
    path, info = resolve_weights(spec, weights)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = spec.build()
    if path is None:
        log.warning("%s: %s", spec.name, RANDOM_WEIGHTS_WARNING)
    else:
        spec.load_weights(backbone, path)
    model = Track3Wrapper(backbone, spec, output=output, input_size=input_size, **wrapper_options)
    model.weights_info = info
    return model.eval()
