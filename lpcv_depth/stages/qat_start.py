"""qat's starting point: the QuantSim a ptq folder was built from, rebuilt and checked.

The ptq folder keeps AI Hub's export of its QuantSim: an ONNX whose weights keep their torch names,
and a .encodings whose weight encodings do too but whose activation encodings are keyed by ONNX
tensor names, which a torch QuantSim cannot take back. So the sim is rebuilt the way ptq built it
(its recorded config, the same float model and images), the weights and weight encodings are loaded
from the folder (which carries AdaRound and SeqMSE over), the activations are calibrated again on the
same calibration photos (deterministic), the mixed preset's 16-bit choices are applied from its
results, and the rebuilt sim must reproduce the held-out outputs the ptq run saved."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lpcv_depth.errors import ConfigError
from lpcv_depth.manifest import MANIFEST_NAME, ArtifactMismatchError, Manifest
from lpcv_depth.results import PtqResults
from lpcv_depth.schema import SchemaError, from_json
from lpcv_depth.stage import StageLog, command_line, display_path
from lpcv_depth.stages.int8_outputs import FP32_ONNX, HOLDOUT_OUTPUTS, calibrate
from lpcv_depth.stages.ptq import FloatStart, PtqConfig, build_quantsim
from lpcv_depth.verify import sqnr_db

__all__ = ["PtqFolder", "read_ptq_folder", "check_same_images", "rebuild_quantsim", "REPRODUCED_MIN_SQNR_DB"]

STAGE = "qat"
# The rebuilt sim against the outputs ptq saved must differ from them far less than ptq's sim differs
# from fp32, and never needs to be closer than REPRODUCED_MIN_SQNR_DB. Encodings computed again from
# the same float model give the same numbers bit for bit with the same torch thread count; another
# count sums in another order, which flips a few 4-bit weight roundings, and AdaRound/SeqMSE weights
# and encodings read back from AI Hub's .encodings are close but not bit-exact (docs/qat.md).
REPRODUCED_MIN_SQNR_DB = 60.0
REPRODUCED_LOADED_MARGIN_DB = 20.0
# Fields of ptq's manifest config that it derives rather than takes as options.
_DERIVED = ("destination", "preset_spec", "opset")


@dataclass(frozen=True)
class PtqFolder:
    folder: Path
    manifest: Manifest
    config: PtqConfig
    results: PtqResults


def read_ptq_folder(folder: Path, log: StageLog) -> PtqFolder:
    """The ptq folder through its manifest (outputs hashed), its config typed, and its export checked:
    the fp32 model it quantized must be the one its export folder holds now."""
    redo = command_line("ptq", "--fp32", "EXPORT", "--out", display_path(folder))
    with log.step("read-ptq") as step:
        manifest = Manifest.read(folder, stage="ptq", flag="--ptq")
        try:
            # The rebuild calibrates on the CPU wherever ptq did, so a folder made with --device cuda
            # is read on a machine without a GPU too (PtqConfig refuses cuda there).
            config = from_json(PtqConfig, {k: v for k, v in manifest.config.items() if k not in _DERIVED}
                               | {"device": "cpu"}, where="ptq config")
        except SchemaError as err:
            raise ArtifactMismatchError(f"the ptq config in {folder} cannot be read: {err}",
                                        hint=f"rerun {redo} with this version") from None
        results = manifest.results_as(PtqResults)
        if results.backend == "aimet-onnx":
            # aimet-onnx's QuantSim is an ONNX Runtime session: there is no torch model to fine-tune.
            raise ConfigError(f"{folder} was quantized with aimet-onnx, and qat fine-tunes aimet-torch's QuantSim",
                              hint=command_line("ptq", "--backend", "onnx2torch", "--fp32", display_path(config.fp32_dir))
                              + " (the default route), then qat on that folder")
        _check_export_unchanged(manifest, config, redo)
        step.detail = f"{config.preset}, export {display_path(config.fp32_dir)} unchanged"
    return PtqFolder(folder, manifest, config, results)


def _check_export_unchanged(ptq: Manifest, config: PtqConfig, redo: str) -> None:
    export_dir = config.fp32_dir
    if not (export_dir / MANIFEST_NAME).is_file():
        raise ArtifactMismatchError(f"the export folder {export_dir} that {ptq.folder} was quantized from is gone",
                                    hint=f"re-export the model, then rerun {redo}")
    export = Manifest.read(export_dir, stage="export", flag="the ptq folder's export")
    recorded = (ptq.inputs.get("fp32_onnx") or {}).get("sha256")
    if recorded != export.output_sha256(FP32_ONNX):
        raise ArtifactMismatchError(
            f"{export_dir / FP32_ONNX} changed since {ptq.folder} was quantized from it (sha256 differs from the "
            "ptq manifest's)", hint=f"rerun {redo} on the new export, then qat on that folder")


def check_same_images(ptq: PtqFolder, start: FloatStart) -> None:
    """The calibration and held-out photos are the ones the ptq run used (same files, same bytes)."""
    recorded, now = ptq.manifest.inputs.get("calibration") or {}, start.inputs.split.describe()
    for key in ("calibration_sha256", "holdout_sha256"):
        if recorded.get(key) != now[key]:
            raise ArtifactMismatchError(
                f"the photos in {now['root']} are not the ones {ptq.folder} was calibrated and checked on "
                f"({key.split('_')[0]} files or contents differ)",
                hint=f"restore the photos, or rerun {command_line('ptq')} on them and qat on its output")


def rebuild_quantsim(ptq: PtqFolder, start: FloatStart, scratch: Path, log: StageLog) -> tuple[Any, dict]:
    """(ptq's QuantSim, rebuilt; how its held-out outputs compare with those ptq saved: SQNR, None
    when identical, and the largest absolute difference)."""
    from lpcv_depth.backends import aimet as aimet_sim

    aimet_dir = next(ptq.folder.glob("*.aimet"))
    with log.step("quantsim") as step:
        if _weights_from_folder(ptq.config):
            loaded = _load_weights(start.model, next(aimet_dir.glob("*.onnx")))
            encodings = _torch_param_encodings(next(aimet_dir.glob("*.encodings")), scratch / "param.encodings")
            step.detail = f"{loaded} weights and their encodings from {display_path(aimet_dir)}"
        else:
            # Without AdaRound or SeqMSE ptq's weight encodings follow from its float model, which
            # prepare_float_model rebuilt: computing them again reproduces them exactly, while reading
            # them back from AI Hub's .encodings does not (scale/offset round trip; docs/qat.md).
            encodings = None
            step.detail = "weights and their encodings as ptq computed them (no AdaRound or SeqMSE)"
        sim, _ = build_quantsim(ptq.config, start.model, start.inputs.dummy, start.tail, param_encodings=encodings)
    with log.step("compute-encodings") as step:
        calibrate(sim, start.inputs.calibration_batches, STAGE)
        kept = _apply_mixed_precision(sim, ptq.results)
        step.detail = f"activations on {len(start.inputs.calibration_batches)} images"
        if kept:
            step.detail += f"; {kept} kept at 16 bits as ptq measured"
    with log.step("reproduce-ptq") as step:
        holdout_outputs = np.load(ptq.folder / HOLDOUT_OUTPUTS)
        saved = holdout_outputs["aimet_sim"]
        rebuilt = aimet_sim.run_forward(sim.model, start.inputs.holdout_batches[:len(saved)])
        reproduced = sqnr_db(saved, rebuilt)
        step.detail = f"held-out outputs vs ptq's saved ones: SQNR {reproduced:.1f} dB"
    floor = _reproduction_floor(holdout_outputs["fp32"], saved)
    if reproduced < floor:
        raise ArtifactMismatchError(
            f"the QuantSim rebuilt from {ptq.folder} does not reproduce its held-out outputs (SQNR {reproduced:.1f} "
            f"dB < {floor:.1f} dB): it was written by another lpcv-depth or aimet-torch version",
            hint=f"rerun {command_line('ptq')} with this version, then qat on its output")
    identical = not np.isfinite(reproduced)
    return sim, {"sqnr_db": None if identical else reproduced, "max_abs_diff": float(np.abs(saved - rebuilt).max())}


def _reproduction_floor(fp32: np.ndarray, saved: np.ndarray) -> float:
    return min(REPRODUCED_MIN_SQNR_DB, sqnr_db(fp32[:len(saved)], saved) + REPRODUCED_LOADED_MARGIN_DB)


def _weights_from_folder(config: PtqConfig) -> bool:
    """Whether ptq's weights or weight encodings came from more than its float model (AdaRound, SeqMSE)."""
    return bool(config.adaround or config.seq_mse)


def _load_weights(model, onnx_path: Path) -> int:
    """The weights of the ptq sim (AdaRounded, CLE'd as ptq left them) from AI Hub's ONNX, where an
    initializer carries a torch parameter's name and shape; returns how many were loaded."""
    import onnx
    import torch
    from onnx import numpy_helper

    parameters = dict(model.named_parameters())
    loaded = 0
    with torch.no_grad():
        for tensor in onnx.load(str(onnx_path)).graph.initializer:
            target = parameters.get(tensor.name)
            if target is not None and tuple(tensor.dims) == tuple(target.shape):
                target.copy_(torch.from_numpy(numpy_helper.to_array(tensor).copy()))
                loaded += 1
    return loaded


def _torch_param_encodings(aimet_encodings: Path, path: Path) -> Path:
    """AI Hub's .encodings (format 1.0.0: a list of entries with per-channel scale and offset) as
    aimet-torch's load_encodings takes weight encodings: per parameter name, one entry per channel."""
    data = json.loads(aimet_encodings.read_text())
    entries = data.get("param_encodings", {})
    if isinstance(entries, list):
        entries = {entry["name"]: _per_channel(entry) for entry in entries}
    path.write_text(json.dumps({"version": "0.6.1", "param_encodings": entries, "activation_encodings": {}}))
    return path


def _per_channel(entry: dict) -> list[dict]:
    bits = entry["bw"]
    channels = []
    for scale, offset in zip(entry["scale"], entry["offset"]):
        low = scale * offset
        channels.append({"bitwidth": bits, "dtype": "int", "is_symmetric": str(entry["is_sym"]), "scale": scale,
                         "offset": offset, "min": low, "max": low + scale * (2 ** bits - 1)})
    return channels


def _apply_mixed_precision(sim, results: PtqResults) -> int:
    """The mixed preset's measured choice, from ptq's results rather than measured again."""
    from lpcv_depth.backends import aimet as aimet_sim

    if results.mixed_precision is None:
        return 0
    quantizers = aimet_sim.activation_quantizers(sim, max_bitwidth=8)
    for name in results.mixed_precision["kept_16bit"]:
        quantizers[name].bitwidth = 16
    return len(results.mixed_precision["kept_16bit"])
