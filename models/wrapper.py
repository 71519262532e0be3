"""The Track 3 wrapper: contract in, contract out, whatever the backbone.

Input  (B,3,480,640) RGB float in [0,255]  -> normalise -> resize to the backbone size -> backbone
Output (B,1,480,640) float in [0,1], scaled per sample.

Why output="depth" is the default: the organizers' scorer multiplies the prediction by
median(gt)/median(pred) and back-projects it as metric depth. That is right for a map proportional
to depth and wrong for disparity (inverted ordering), or for a min-max normalised map (the min
offset does not scale away). So a disparity backbone (Depth-Anything-V2) is turned into depth as
1 / (d + floor), with d its disparity min-max normalised per sample and `floor` bounding the far
range to (1+floor)/floor times the near range, and every depth map is divided by its own maximum:
a pure per-sample scale, which the median scaling removes again.

output="disparity" reproduces the published sample solution (min-max normalised disparity), but per
sample: the sample solution normalises over the whole batch, so one image changed another's output.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lpcv_depth.contract import GELU_MODES, OUTPUT_MODES, TRACK3
from lpcv_depth.errors import ConfigError
from lpcv_depth.models.registry import ModelSpec

OutputMode = Literal["depth", "disparity"]
_EPS = 1e-6


# The per-sample statistics below are written so that no arithmetic happens on the statistics
# themselves: int8 quantization puts a quantizer after every add/sub/div, and a quantizer calibrated
# on a handful of per-image maxima clips the larger ones, which rescales (or saturates) a whole map.
# max/min/clamp only select values already on the tensor's quantization grid.


def _per_sample_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(1, 2, 3), keepdim=True).clamp(min=_EPS)


def _per_sample_min_max(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return shifted / _per_sample_max(shifted)


def _per_sample_scale(x: torch.Tensor) -> torch.Tensor:
    return x / _per_sample_max(x)


class Track3Wrapper(nn.Module):
    def __init__(self, backbone: nn.Module, spec: ModelSpec, *, output: OutputMode = "depth",
                 input_size: tuple[int, int] | None = None, disparity_floor: float = 0.05):
        super().__init__()
        if output not in OUTPUT_MODES:
            raise ConfigError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        if not disparity_floor > 0:
            raise ConfigError(f"disparity_floor must be > 0, got {disparity_floor}")
        self.backbone = backbone
        self.spec = spec
        self.output_mode = output
        self.input_size = spec.validate_input_size(input_size or spec.native_input_size)
        self.disparity_floor = float(disparity_floor)
        # Mean/std folded into [0,255] units: one subtract and one divide on the raw pixels.
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # No test on tensor shapes here, so torch.fx (AIMET's model preparation) can trace the wrapper:
        # the input size is static, and the output is always resized (a same-size bilinear resize is exact).
        x = (image - self.pixel_mean) / self.pixel_std
        if self.input_size != (TRACK3.height, TRACK3.width):
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        raw = self.backbone(x)
        raw = F.interpolate(raw, size=(TRACK3.height, TRACK3.width), mode="bilinear", align_corners=False)
        return self._to_output(raw)

    def _to_output(self, raw: torch.Tensor) -> torch.Tensor:
        if self.spec.native_output == "disparity":
            disparity = _per_sample_min_max(raw)
            if self.output_mode == "disparity":
                return disparity
            # 1/(d+floor) divided by its own maximum 1/floor (d's minimum is 0), in one division.
            return self.disparity_floor / (disparity + self.disparity_floor)
        depth = raw.clamp(min=_EPS)
        if self.output_mode == "depth":
            return _per_sample_scale(depth)
        return _per_sample_min_max(1.0 / depth)

    def describe(self) -> dict:
        return {"model": self.spec.name, "output": self.output_mode, "input_size": list(self.input_size),
                "disparity_floor": self.disparity_floor if self.spec.native_output == "disparity" else None,
                "native_output": self.spec.native_output,
                "output_semantics": self.spec.output_semantics or self.spec.native_output,
                "max_depth": self.spec.max_depth}




def set_gelu_approximation(module: nn.Module, mode: str) -> int:
    """Switch every nn.GELU in `module` to exact (erf) or tanh-approximated GELU; returns how many.

    Exact GELU exports as `Erf`, which the QNN HTP backend rejects, so those nodes fall back to
    the CPU; the tanh form runs on the NPU and differs from erf by < 1e-3 absolute per activation.
    """
    if mode not in GELU_MODES:
        raise ConfigError(f"gelu must be one of {GELU_MODES}, got {mode!r}")
    count = 0
    for child in module.modules():
        if isinstance(child, nn.GELU):
            child.approximate = "none" if mode == "exact" else "tanh"
            count += 1
    return count
