"""Which AIMET route ptq takes (`--backend`): a torch export is quantized from its torch model with
aimet-torch; an export made from an ONNX file either through onnx2torch and the same aimet-torch path
(route (b), `auto`) or with aimet-onnx on the ONNX graph itself (route (a)). Measured: docs/ptq.md,
"Two routes measured"."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lpcv_depth.errors import ConfigError
from lpcv_depth.options import choices_hint

if TYPE_CHECKING:
    from lpcv_depth.manifest import Manifest

__all__ = ["BACKENDS", "backend_for", "check_backend_option", "aimet_onnx_conflicts"]

BACKENDS = ("auto", "onnx2torch", "aimet-onnx")
# onnx2torch keeps everything the torch path has (the 16-bit tail, CLE, AdaRound, SeqMSE, mixed) at the
# same fidelity; aimet-onnx calibrates faster on some models but cannot apply all of it (docs/ptq.md).
AUTO_FOR_ONNX = "onnx2torch"


def backend_for(config, export: Manifest) -> str:
    """The route for this export: "aimet-torch" (a torch export), "onnx2torch" or "aimet-onnx"."""
    if "onnx" not in export.inputs:
        if config.backend != "auto":
            raise ConfigError(f"--backend {config.backend} quantizes an export made from an ONNX file; "
                              f"{export.folder} was exported from a torch model, which aimet-torch quantizes itself",
                              hint="leave --backend out (auto), or export the model's ONNX file with "
                                   "lpcv-depth export --onnx FILE and quantize that")
        return "aimet-torch"
    return AUTO_FOR_ONNX if config.backend == "auto" else config.backend


def aimet_onnx_conflicts(config) -> list[tuple[str, str, str]]:
    """(what, why, the flag that avoids it) for each setting the aimet-onnx route cannot apply."""
    conflicts = []
    if config.preset_spec.mixed:
        conflicts.append(("--preset mixed", "its per-layer sensitivity runs on aimet-torch's quantizers",
                          "--preset w8a8"))
    if config.output_tail_bits > config.preset_spec.activation_bw:
        conflicts.append((f"--output-tail-bits {config.output_tail_bits}",
                          "aimet-onnx quantizes tensors, so it cannot requantize only the last conv's input, and "
                          "every 16-bit variant tried left a node the HTP refuses; its 8-bit min-max tail runs "
                          "fully on the HTP at equal F-score", "--output-tail-bits 8"))
    if config.cle:
        conflicts.append(("CLE", "aimet-onnx 2.42's equalize_model fails on opset 11+ Clip and rewrites ReLU6 "
                                 "clips to Relu", "--no-cle"))
    if config.adaround:
        conflicts.append(("--adaround", "not wired to aimet-onnx's AdaRound on this route", "--no-adaround"))
    if config.seq_mse:
        conflicts.append(("--seq-mse", "not wired to aimet-onnx's SeqMSE on this route", "--no-seq-mse"))
    if config.calibration_scheme == "percentile":
        conflicts.append(("--calibration-scheme percentile", "aimet-onnx 2.42's QuantSim has no percentile setting",
                          "--calibration-scheme tf-enhanced"))
    if config.device == "cuda":
        conflicts.append(("--device cuda", "it calibrates through ONNX Runtime's CPU provider (onnxruntime-gpu is "
                                           "not among lpcv-depth's dependencies)", "--device cpu"))
    if config.exporter != "legacy":
        conflicts.append((f"--exporter {config.exporter}", "aimet-onnx exports the ONNX graph itself, no torch "
                                                           "exporter runs", "--exporter legacy"))
    return conflicts


def check_backend_option(config) -> None:
    """PtqConfig's --backend: a known value, and for aimet-onnx a ConfigError naming every setting of
    `config` the route cannot apply, with one fix line."""
    if config.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {config.backend!r}",
                          hint=choices_hint("backend", BACKENDS))
    conflicts = aimet_onnx_conflicts(config) if config.backend == "aimet-onnx" else []
    if conflicts:
        reasons = "; ".join(f"{what} ({why})" for what, why, _ in conflicts)
        flags = " ".join(flag for _, _, flag in conflicts)
        raise ConfigError(f"--backend aimet-onnx cannot apply {reasons}",
                          hint=f"pass {flags}, or --backend onnx2torch, which applies all of them")
