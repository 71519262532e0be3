"""The LPCVC 2025 Track 3 I/O contract, declared once as data.

Everything that needs a name, a shape or a range (the wrapper, the exporter, the verifier, the ONNX
metadata) reads it from here, so the contract cannot drift between stages.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # "B" marks the batch axis; every other axis is static.
    shape: tuple[str | int, ...]
    dtype: str
    value_range: tuple[float, float]
    description: str

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if dim == "B" else int(dim) for dim in self.shape)


@dataclass(frozen=True)
class Contract:
    name: str
    input: TensorSpec
    output: TensorSpec
    height: int
    width: int

    def metadata_props(self) -> dict[str, str]:
        """Key/value strings for ONNX `metadata_props`, so the artifact documents its own contract."""
        return {
            "lpcv.contract": self.name,
            "lpcv.input": json.dumps(asdict(self.input)),
            "lpcv.output": json.dumps(asdict(self.output)),
        }


# What the wrapper may emit: depth (what the Track 3 scorer reads) or min-max disparity (the sample solution).
OUTPUT_MODES: tuple[str, ...] = ("depth", "disparity")
# GELU as exported: tanh runs on the Snapdragon NPU; exact exports Erf, which QNN HTP rejects.
GELU_MODES: tuple[str, ...] = ("exact", "tanh")

TRACK3 = Contract(
    name="lpcvc2025-track3",
    input=TensorSpec(
        name="image",
        shape=("B", 3, 480, 640),
        dtype="float32",
        value_range=(0.0, 255.0),
        description="RGB, NCHW, un-normalized pixel values; the model normalizes internally",
    ),
    output=TensorSpec(
        name="depth",
        shape=("B", 1, 480, 640),
        dtype="float32",
        value_range=(0.0, 1.0),
        description="relative depth (larger = farther), scaled per sample into [0,1]",
    ),
    height=480,
    width=640,
)
