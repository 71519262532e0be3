"""Where weights come from: a local file, the official Hugging Face checkpoint, or (only when asked
for explicitly with weights=None) random initialisation. Nothing is ever silently substituted."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lpcv_depth.errors import MissingDependencyError, WeightsError
from lpcv_depth.manifest import sha256_file
from lpcv_depth.network import unreachable_reason
from lpcv_depth.models.registry import HubWeights, ModelSpec

_MAX_KEYS_SHOWN = 12


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights inside a built model, recorded in every manifest."""

    source: str  # "random" | "file" | "hf"
    path: str | None = None
    sha256: str | None = None
    url: str | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def as_dict(self) -> dict:
        return asdict(self)


RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: weights=None was requested, so the model is randomly initialised. "
                          "Its outputs are meaningless; use it only to test the pipeline.")


def resolve_weights(spec: ModelSpec, weights: str | os.PathLike | None) -> tuple[Path | None, WeightsInfo]:
    """Turn the user's `weights=` value into a local file (or None for random init)."""
    if weights is None:
        return None, WeightsInfo(source="random")
    if isinstance(weights, str) and weights == "hf":
        if spec.hub_weights is None:
            raise WeightsError(f"model {spec.name!r} has no official Hugging Face checkpoint",
                               hint=f"pass a local file with --weights PATH ({spec.weight_source})")
        path = download_hub_weights(spec.hub_weights)
        return path, WeightsInfo(source="hf", path=os.fspath(path), sha256=sha256_file(path),
                                 url=spec.hub_weights.url)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}",
                           hint=f"check the path, or get the weights from {spec.weight_source}")
    return path, WeightsInfo(source="file", path=os.fspath(path.resolve()), sha256=sha256_file(path))


# How long the Hugging Face Hub gets to answer before the download is given up as offline.
HUB_PROBE_TIMEOUT_S = 5.0


def download_hub_weights(hub: HubWeights) -> Path:
    """The checkpoint from the Hugging Face Hub's cache, downloading it first when the hub answers.

    huggingface_hub retries an unreachable hub with backoff for about 23 s before it gives up; one
    probe decides at once, and a copy already in the cache is still used without the network."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise MissingDependencyError("huggingface_hub is not installed",
                                     hint='pip install "huggingface_hub==2.4.0"') from err
    unreachable = None if constants.is_offline_mode() else unreachable_reason(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
    try:
        # etag_timeout bounds the metadata request so a hub that stops answering fails fast instead of hanging.
        return Path(hf_hub_download(repo_id=hub.repo_id, filename=hub.filename, revision=hub.revision,
                                    etag_timeout=15, local_files_only=unreachable is not None))
    except Exception as err:  # huggingface_hub raises many types for "offline"; all mean the same here
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if unreachable:  # only the cache was asked: say why it did not serve the file
            missing = isinstance(err, LocalEntryNotFoundError)
            why = f"cannot reach {unreachable}, and " + ("it is not in the cache" if missing
                                                         else f"reading the cache failed: {why}")
        raise WeightsError(
            f"could not download {hub.url}: {why}",
            hint=f"you appear to be offline or the hub is unreachable. Download {hub.filename} on a machine "
                 f"with internet from {hub.url} and pass it with --weights PATH") from err


# torch.save's legacy (non-zip) format starts with this pickled magic number.
_LEGACY_CHECKPOINT_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def _is_torch_checkpoint_file(path: Path) -> bool:
    """Whether the file is in one of torch.save's two formats: a zip archive, or the legacy pickle."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_CHECKPOINT_HEAD)) == _LEGACY_CHECKPOINT_HEAD


def load_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a .pth state dict safely (weights_only) and turn every failure into a WeightsError."""
    # Random bytes make the weights-only unpickler fail like a file with pickled objects would:
    # the format is checked first so that such a file is reported for what it is.
    if not _is_torch_checkpoint_file(path):
        raise WeightsError(f"weights file {path} is not a PyTorch checkpoint: neither of torch.save's formats "
                           "(it is corrupt, truncated, or a file of another kind)",
                           hint="pass the model's .pth checkpoint (what torch.save writes); if this is it, "
                                "re-download it and check its sha256 against the source")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler fails on garbage with whatever error the bytes happen to trigger
        if isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower():
            # torch's own message advises weights_only=False, which would run code from an untrusted file.
            raise WeightsError(f"weights file {path} holds Python objects besides tensors, which lpcv-depth does "
                               "not load (unpickling them can run code from the file)",
                               hint="pass a plain state_dict checkpoint; from a trusted source, re-save it with "
                                    "torch.save(model.state_dict(), path)") from err
        raise WeightsError(f"weights file {path} is corrupt or not a PyTorch checkpoint: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                           hint="re-download the checkpoint; check its sha256 against the source") from err
    for wrapper_key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper_key), dict):
            obj = obj[wrapper_key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors",
                           hint="pass the checkpoint file itself (a .pth with the model's state_dict)")
    return obj


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """strict=True loading, but with an error that lists what did not match and how."""
    expected = module.state_dict()
    # Listed in model order, so the first lines name the first layers that do not fit.
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
                more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
                parts.append(f"{len(keys)} {label}: {shown}{more}")
        raise WeightsError(f"checkpoint {source} does not fit this architecture; " + "; ".join(parts),
                           hint="check that the checkpoint matches the model name (e.g. vits vs vitb)")
    module.load_state_dict(state_dict, strict=True)
