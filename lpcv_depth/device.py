"""Which torch device a stage runs its heavy loops on: `--device auto|cpu|cuda` (auto = a CUDA GPU where
torch sees one), and the moves there and back (qat trains there; ptq calibrates, AdaRounds and runs
SeqMSE there)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from lpcv_depth.errors import ConfigError
from lpcv_depth.options import choices_hint

__all__ = ["DEVICES", "resolve_device", "on_device", "to_device"]

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


@contextmanager
def on_device(module, device: str) -> Iterator[None]:
    """`module` (parameters and buffers, in place) on `device` inside the block, and on the CPU after it,
    however the block ends: exports, checks and the exact CPU kernels of backends/aimet_fast.py run there.
    On the CPU both moves change nothing (same tensors, same versions)."""
    module.to(device)
    try:
        yield
    finally:
        module.cpu()


def to_device(tensors, device: str) -> list:
    """The tensors on `device` (the same tensors where they already are)."""
    return [tensor.to(device) for tensor in tensors]
