"""What the int8 stages (ptq, qat) write and how they drive AIMET's QuantSim the same way: the two
exports of one QuantSim (AI Hub's ONNX + .encodings, the host's QDQ ONNX), their sizes, the held-out
outputs later checks compare against, calibration with its progress bar, and the manifest's record
of the fp32 model and images. One module, so a fix to an artifact lands in both stages."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lpcv_depth.manifest import MANIFEST_NAME, Manifest, write_manifest
from lpcv_depth.results import INT8_STAGES, PtqSizes
from lpcv_depth.stage import StageLog
from lpcv_depth.stages.export import tracer_warnings_silenced

__all__ = ["INT8_STAGES", "FP32_ONNX", "QDQ_ONNX", "HOLDOUT_OUTPUTS", "Artifacts", "export_artifacts", "sizes",
           "save_holdout_outputs", "manifest_inputs", "write_int8_manifest", "calibrate", "aimet_sim_outputs",
           "Progress"]

FP32_ONNX = "model.onnx"
QDQ_ONNX = "model_qdq.onnx"
# fp32 ONNX, AIMET QuantSim and QDQ ONNX outputs on the held-out images, in the manifest's holdout_files order.
HOLDOUT_OUTPUTS = "holdout_outputs.npz"


@dataclass(frozen=True)
class Artifacts:
    aimet_dir: Path
    aimet_onnx: Path
    encodings: Path
    qdq: Path


def export_artifacts(sim, dummy, folder: Path, name: str, *, opset: int, exporter: str, log: StageLog) -> Artifacts:
    """`<name>.aimet/` (one .onnx + one .encodings, AI Hub's layout) and model_qdq.onnx from one QuantSim."""
    from lpcv_depth.backends import aimet as aimet_sim

    dynamo = exporter == "dynamo"
    with log.step("export-aimet") as step, tracer_warnings_silenced():
        aimet_dir = folder / f"{name}.aimet"
        aimet_onnx, encodings = aimet_sim.export_for_ai_hub(sim, dummy, aimet_dir, name, opset, dynamo=dynamo)
        step.artifact = aimet_dir
    with log.step("export-qdq") as step, tracer_warnings_silenced():
        qdq = aimet_sim.export_qdq(sim, dummy, folder / QDQ_ONNX, opset, dynamo=dynamo)
        step.artifact = qdq
    return Artifacts(aimet_dir=aimet_dir, aimet_onnx=aimet_onnx, encodings=encodings, qdq=qdq)


def sizes(fp32_onnx: Path, artifacts: Artifacts) -> PtqSizes:
    return PtqSizes(fp32_onnx=fp32_onnx.stat().st_size, qdq_onnx=artifacts.qdq.stat().st_size,
                    aimet_onnx=artifacts.aimet_onnx.stat().st_size, aimet_encodings=artifacts.encodings.stat().st_size)


def save_holdout_outputs(folder: Path, fp32: np.ndarray, sim_holdout: np.ndarray, int8_qdq: np.ndarray) -> Path:
    """Later checks (the local HTP check) compare against the same held-out outputs instead of
    rebuilding AIMET's simulation; the image files are listed in the manifest's calibration split."""
    path = folder / HOLDOUT_OUTPUTS
    np.savez_compressed(path, fp32=fp32, aimet_sim=sim_holdout, int8_qdq=int8_qdq)
    return path


def write_int8_manifest(folder: Path, *, stage: str, config: dict, inputs: dict, artifacts: Artifacts,
                        holdout: tuple[np.ndarray, np.ndarray, np.ndarray], report_files: list[Path], results: Any,
                        log: StageLog) -> Path:
    """The held-out outputs (fp32, AIMET sim, QDQ) and the manifest, last, listing every artifact of an
    int8 folder: what ptq and qat write alike, whatever else each records in `inputs` and its report."""
    holdout_outputs = save_holdout_outputs(folder, *holdout)
    return write_manifest(folder, stage=stage, config=config, inputs=inputs,
                          outputs=[artifacts.aimet_onnx, artifacts.encodings, artifacts.qdq, holdout_outputs,
                                   *report_files], timings=log.timings, results=results)


def manifest_inputs(export: Manifest, fp32_onnx: Path, fp32_sha256: str, weights: dict, split: Any) -> dict:
    """The manifest's record of the fp32 model, its export and the images (ptq's layout; qat adds its own)."""
    return {"fp32_onnx": {"path": os.fspath(fp32_onnx), "sha256": fp32_sha256},
            "export_manifest": {"path": os.fspath(Path(export.folder) / MANIFEST_NAME)},
            "weights": weights, "calibration": split.describe()}


def calibrate(sim, batches, stage: str, device: str = "cpu") -> None:
    """AIMET's compute_encodings over `batches` on `device` (a resolved --device; the sim is back on the
    CPU after), with a progress bar and without AIMET's activation copies."""
    from lpcv_depth.backends import aimet as aimet_sim
    from lpcv_depth.backends.aimet_fast import calibration_without_output_copies
    from lpcv_depth.device import on_device, to_device

    with (Progress(len(batches), f"{stage}: calibrating") as tick, calibration_without_output_copies(sim),
          on_device(sim.model, device)):
        batches = to_device(batches, device)
        sim.compute_encodings(lambda m: aimet_sim.run_forward(m, batches, tick))


def aimet_sim_outputs(sim, holdout_batches: list, fp32_holdout: np.ndarray, log: StageLog) -> np.ndarray:
    """The AIMET sim's outputs on the held-out images (the `aimet-sim` step), its SQNR vs fp32 on the step line."""
    from lpcv_depth.backends import aimet as aimet_sim
    from lpcv_depth.verify import sqnr_db

    with log.step("aimet-sim") as step:
        outputs = aimet_sim.run_forward(sim.model, holdout_batches)
        step.detail = f"SQNR vs fp32 {sqnr_db(fp32_holdout, outputs):.1f} dB on held-out images"
    return outputs


class Progress:
    """A tqdm bar on stderr for the long loops (calibration, sensitivity, training): `with Progress(n,
    "ptq: calibrating") as tick: ... tick()`; `tick.show(loss=...)` puts figures beside it."""

    def __init__(self, total: int, description: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit="it", leave=False, file=sys.stderr)

    def __enter__(self) -> "Progress":
        return self

    def __call__(self) -> None:
        self.bar.update(1)

    def show(self, **figures) -> None:
        self.bar.set_postfix(**figures)

    def __exit__(self, *exc):
        self.bar.close()
        return False
