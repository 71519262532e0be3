"""The PTQ report: report.json (every figure), report.md (the table people read) and report.png
(error histogram and one held-out frame side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HOST_LATENCY_NOTE = ("Host latency is ONNX Runtime on this x86 CPU, a sanity figure only: x86 ORT runs QDQ int8 "
                     "slower than fp32. The phone's figure comes from an AI Hub profile job.")


def write_report(folder: Path, config, results: dict, fp32: np.ndarray, int8: np.ndarray) -> list[Path]:
    json_path = folder / "report.json"
    json_path.write_text(json.dumps({"config": config.as_dict(), **results}, indent=2, default=_plain) + "\n")
    md_path = folder / "report.md"
    md_path.write_text(_markdown(config, results))
    png_path = folder / "report.png"
    _figure(png_path, fp32, int8)
    return [json_path, md_path, png_path]


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value).__name__)


def _markdown(config, results: dict) -> str:
    fidelity = results["int8_vs_fp32"]
    sim = results["qdq_vs_aimet_sim"]
    latency = results["host_latency_ms"]
    sizes = results["sizes_bytes"]
    lines = [
        f"# PTQ report: {config.preset} ({config.preset_spec.description})",
        "",
        f"Calibration: {config.calibration_scheme}; techniques: "
        + ", ".join(f"{name}={'on' if getattr(config, name) else 'off'}"
                    for name in ("bn_fold", "cle", "adaround", "seq_mse")),
        "",
        f"## int8 vs fp32 on {fidelity['holdout_images']} held-out images (ONNX Runtime, host)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| SQNR | {fidelity['sqnr_db']:.2f} dB |",
        f"| SQNR after a per-image scale fit (the scorer ignores scale) | {fidelity['sqnr_db_scale_aligned']:.2f} dB |",
        f"| max abs diff | {fidelity['max_abs_diff']:.4f} |",
        f"| Track 3 F-score of int8, fp32 as reference | {fidelity['fscore_vs_fp32']:.2f} |",
        f"| QDQ ONNX vs AIMET QuantSim SQNR | {sim['sqnr_db']:.2f} dB (max abs {sim['max_abs_diff']:.4f}) |",
        "",
    ]
    if "ground_truth" in results:
        gt = results["ground_truth"]
        lines += [f"## Against ground truth ({gt['frames']} frames, {gt['skipped']} skipped)", "",
                  "| model | F-score@0.1 | abs_rel |", "|---|---|---|",
                  f"| fp32 | {gt['fp32']['fscore@0.1']:.2f} | {gt['fp32']['abs_rel']:.4f} |",
                  f"| int8 | {gt['int8']['fscore@0.1']:.2f} | {gt['int8']['abs_rel']:.4f} |",
                  f"| drop | {gt['fscore_drop']:.2f} | |", ""]
    lines += ["## What each technique bought", ""]
    techniques = results.get("techniques", {})
    if techniques.get("layer_scale_fold", {}).get("folded"):
        lines.append(f"- LayerScale fold: {techniques['layer_scale_fold']['folded']} folded into Linear layers (exact).")
    if "bn_fold" in techniques:
        lines.append(f"- BN fold: {techniques['bn_fold']['folded_pairs']} BatchNorm layers folded.")
    if "cle" in techniques:
        lines.append(f"- CLE: float model after vs before, SQNR {techniques['cle']['fp32_sqnr_after_vs_before_db']:.1f} dB "
                     "(high = CLE found little to equalize).")
    if "seq_mse" in techniques:
        lines.append(f"- SeqMSE: weight encodings of {techniques['seq_mse']['layers_optimized']} layers chosen from "
                     f"{techniques['seq_mse']['candidates']} candidate ranges by output MSE.")
    for name, figures in results.get("ablation", {}).items():
        lines.append(f"- {name}: AIMET sim vs fp32 SQNR {figures['sqnr_db_with']:.2f} dB, against "
                     f"{figures['sqnr_db']:.2f} dB with nearest rounding ({figures['gain_db']:+.2f} dB).")
    preparation = results.get("preparation")
    if preparation:
        lines.append(f"- Model preparation (torch.fx): {preparation['modules_added']} functional ops made quantizable."
                     if preparation["traced"] else
                     f"- Model preparation FAILED ({preparation['error']}): functional ops stay float.")
    if "output_tail" in techniques:
        tail = techniques["output_tail"]
        lines.append(f"- Output tail at {tail['bits']} bits, min-max ({len(tail['quantizers'])} activations, from the "
                     f"input of the last conv to the output; `--output-tail-bits 8` for pure int8): "
                     + ", ".join(tail["quantizers"]))
    if results.get("calibration_analyzers"):
        lines.append("- Activation ranges: " + ", ".join(f"{count} {label}" for label, count in
                                                         results["calibration_analyzers"].items())
                     + " (aimet-torch calibrates Relu outputs, which the HTP config pins at min 0, min-max).")
    if "mixed_precision" in results:
        mixed = results["mixed_precision"]
        lines.append(f"- Mixed precision: {len(mixed['kept_16bit'])} of {mixed['activation_quantizers']} activations "
                     f"kept at 16 bits (8-bit cost > {mixed['max_drop_db']} dB each): "
                     + (", ".join(mixed["kept_16bit"][:20]) or "none"))
    lines += ["", "## Host latency and size", "",
              "| | fp32 | int8 QDQ |", "|---|---|---|",
              f"| ORT latency, median of {latency['runs']} | {latency['fp32']:.1f} ms | {latency['int8_qdq']:.1f} ms |",
              f"| ONNX size | {sizes['fp32_onnx'] / 1e6:.1f} MB | {sizes['qdq_onnx'] / 1e6:.1f} MB |", "",
              HOST_LATENCY_NOTE, "", "![errors](report.png)", ""]
    return "\n".join(lines)


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
