"""The PTQ report: report.json (every figure), report.md (the tables people read) and report.png
(error histogram and one held-out frame side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lpcv_depth.report import NOT_MEASURED, markdown_table
from lpcv_depth.results import PtqResults
from lpcv_depth.schema import to_json

__all__ = ["write_report", "HOST_LATENCY_NOTE"]

HOST_LATENCY_NOTE = ("Host latency is ONNX Runtime on this x86 CPU, a sanity figure only: x86 ORT runs QDQ int8 "
                     "slower than fp32. The phone's figure comes from an AI Hub profile job.")
TECHNIQUE_FLAGS = ("bn_fold", "cle", "adaround", "seq_mse")
# At most this many names of the activations the mixed preset kept at 16 bits are listed.
MAX_LISTED_LAYERS = 20


def write_report(folder: Path, config, results: PtqResults, fp32: np.ndarray, int8: np.ndarray, *,
                 record: dict | None = None, title: str = "PTQ report", sections: tuple[str, ...] = ()) -> list[Path]:
    """`config` is the ptq config the int8 model was calibrated with; qat passes its own config as
    `record` (report.json's "config") and its training as extra `sections` after the fidelity table."""
    json_path = folder / "report.json"
    json_path.write_text(json.dumps({"config": record if record is not None else config.as_dict(),
                                     **to_json(results)}, indent=2, allow_nan=False) + "\n")
    md_path = folder / "report.md"
    md_path.write_text(markdown(config, results, title, sections))
    png_path = folder / "report.png"
    _figure(png_path, fp32, int8)
    return [json_path, md_path, png_path]


def _plain(value):
    """json.dumps `default=` for paths and numpy scalars (the HTP check's report uses it too)."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value).__name__)


def markdown(config, results: PtqResults, title: str = "PTQ report", extra: tuple[str, ...] = ()) -> str:
    techniques = ", ".join(f"{name}={'on' if getattr(config, name) else 'off'}" for name in TECHNIQUE_FLAGS)
    sections = [f"# {title}: {config.preset} ({config.preset_spec.description})\n",
                f"Calibration: {config.calibration_scheme} on {results.device}; techniques: {techniques}; "
                f"AIMET route: {results.backend}\n",
                _fidelity_section(results), *extra]
    if results.ground_truth is not None:
        sections.append(_ground_truth_section(results))
    sections += ["## What each technique bought\n", "\n".join(_technique_lines(results)) + "\n",
                 _host_section(results), HOST_LATENCY_NOTE + "\n", "![errors](report.png)\n"]
    return "\n".join(sections)


def _fidelity_section(results: PtqResults) -> str:
    fidelity, sim = results.int8_vs_fp32, results.qdq_vs_aimet_sim
    rows = [("SQNR", f"{fidelity.sqnr_db:.2f} dB"),
            ("SQNR after a per-image scale fit (the scorer ignores scale)", f"{fidelity.sqnr_db_scale_aligned:.2f} dB"),
            ("max abs diff", f"{fidelity.max_abs_diff:.4f}"),
            ("Track 3 F-score of int8, fp32 as reference", f"{fidelity.fscore_vs_fp32:.2f}"),
            ("QDQ ONNX vs AIMET QuantSim SQNR", f"{sim['sqnr_db']:.2f} dB (max abs {sim['max_abs_diff']:.4f})")]
    return (f"## int8 vs fp32 on {fidelity.holdout_images} held-out images (ONNX Runtime, host)\n\n"
            + markdown_table(["metric", "value"], rows))


def _ground_truth_section(results: PtqResults) -> str:
    gt = results.ground_truth
    rows = [(label, f"{metrics['fscore@0.1']:.2f}", f"{metrics['abs_rel']:.4f}")
            for label, metrics in (("fp32", gt.fp32), ("int8", gt.int8))]
    rows.append(("drop", f"{gt.fscore_drop:.2f}", ""))
    return (f"## Against ground truth ({gt.frames} frames, {gt.skipped} skipped)\n\n"
            + markdown_table(["model", "F-score@0.1", "abs_rel"], rows, align="lrr"))


def _technique_lines(results: PtqResults) -> list[str]:
    techniques = results.techniques
    lines = []
    if techniques.get("layer_scale_fold", {}).get("folded"):
        lines.append(f"- LayerScale fold: {techniques['layer_scale_fold']['folded']} folded into Linear layers (exact).")
    if "onnx_graph" in techniques:
        graph = techniques["onnx_graph"]
        lines.append(f"- ONNX graph: opset {graph['source_opset']} converted to {graph['opset']}, "
                     f"{graph['duplicated_initializers']} shared initializers duplicated (int32 biases need their own).")
    if "bn_fold" in techniques:
        lines.append(f"- BN fold: {techniques['bn_fold']['folded_pairs']} BatchNorm layers folded.")
    if "cle" in techniques:
        lines.append(f"- CLE: float model after vs before, SQNR {techniques['cle']['fp32_sqnr_after_vs_before_db']:.1f} "
                     "dB (high = CLE found little to equalize).")
    if "seq_mse" in techniques:
        lines.append(f"- SeqMSE: weight encodings of {techniques['seq_mse']['layers_optimized']} layers chosen from "
                     f"{techniques['seq_mse']['candidates']} candidate ranges by output MSE.")
    for name, figures in (results.ablation or {}).items():
        lines.append(f"- {name}: AIMET sim vs fp32 SQNR {figures['sqnr_db_with']:.2f} dB, against "
                     f"{figures['sqnr_db']:.2f} dB with nearest rounding ({figures['gain_db']:+.2f} dB).")
    return lines + _preparation_lines(results)


def _preparation_lines(results: PtqResults) -> list[str]:
    """Model preparation, the output tail, the calibration methods and the mixed-precision choice."""
    lines = []
    preparation = results.preparation
    if preparation:
        lines.append(f"- Model preparation (torch.fx): {preparation['modules_added']} functional ops made quantizable."
                     if preparation["traced"] else
                     f"- Model preparation FAILED ({preparation['error']}): functional ops stay float.")
    if "output_tail" in results.techniques:
        tail = results.techniques["output_tail"]
        start = tail.get("from", "the input of the last conv")
        lines.append(f"- Output tail at {tail['bits']} bits, min-max ({len(tail['quantizers'])} activations, from "
                     f"{start} to the output; `--output-tail-bits 8` for pure int8): "
                     + ", ".join(tail["quantizers"]))
    if "weights_kept_8bit" in results.techniques:
        kept = results.techniques["weights_kept_8bit"]
        lines.append(f"- Weights kept int8 in this 4-bit preset ({kept['rule']}): " + ", ".join(kept["layers"]))
    if results.calibration_analyzers:
        lines.append("- Activation ranges: " + ", ".join(f"{count} {label}" for label, count in
                                                         results.calibration_analyzers.items())
                     + " (aimet-torch calibrates Relu outputs, which the HTP config pins at min 0, min-max).")
    mixed = results.mixed_precision
    if mixed is not None:
        lines.append(f"- Mixed precision: {len(mixed['kept_16bit'])} of {mixed['activation_quantizers']} activations "
                     f"kept at 16 bits (8-bit cost > {mixed['max_drop_db']} dB each): "
                     + (", ".join(mixed["kept_16bit"][:MAX_LISTED_LAYERS]) or "none"))
    return lines


def _host_section(results: PtqResults) -> str:
    latency, sizes = results.host_latency_ms, results.sizes_bytes
    if latency is None:
        timing = ("ORT latency", NOT_MEASURED, NOT_MEASURED)
    else:
        timing = (f"ORT latency, median of {latency.runs}", f"{latency.fp32:.1f} ms", f"{latency.int8_qdq:.1f} ms")
    rows = [timing,
            ("ONNX size", f"{sizes.fp32_onnx / 1e6:.1f} MB", f"{sizes.qdq_onnx / 1e6:.1f} MB")]
    return "## Host latency and size\n\n" + markdown_table(["", "fp32", "int8 QDQ"], rows, align="lrr")


def _figure(path: Path, fp32: np.ndarray, int8: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    error = (int8 - fp32).ravel()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].hist(error, bins=101, color="#4477aa")
    axes[0].set_yscale("log")
    axes[0].set_title("int8 - fp32 (all held-out pixels)")
    for ax, data, title in ((axes[1], fp32[0, 0], "fp32"), (axes[2], int8[0, 0], "int8 QDQ")):
        ax.imshow(data, cmap="magma_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    image = axes[3].imshow(np.abs(int8[0, 0] - fp32[0, 0]), cmap="viridis")
    axes[3].set_title("|int8 - fp32|, first held-out image")
    axes[3].axis("off")
    fig.colorbar(image, ax=axes[3], fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
