"""Which torch device a stage trains on: `--device auto|cpu|cuda` (auto = a CUDA GPU where torch sees one)."""

from __future__ import annotations

from lpcv_depth.errors import ConfigError
from lpcv_depth.options import choices_hint

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """"cpu" or "cuda" for a --device value; ConfigError (exit 2) for an unknown one, or for cuda
    where torch sees no GPU (a CPU-only torch build, no driver, CUDA_VISIBLE_DEVICES empty)."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; devices: {', '.join(DEVICES)}", hint=choices_hint("device", DEVICES))
    if name == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise ConfigError("--device cuda, but torch sees no CUDA GPU on this machine "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                          hint="pass --device cpu, or --device auto (a GPU where there is one, else the CPU)")
    return "cuda" if available else "cpu"
