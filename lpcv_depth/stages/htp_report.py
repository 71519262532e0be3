"""The HTP check's report: report.json (every figure) and report.md (the tables people read), in the
style of the ptq stage's report."""

from __future__ import annotations

import json
from pathlib import Path

from lpcv_depth.stages.ptq_report import _plain

LABELS = {"fp32": "fp32 (ORT CPU)", "aimet_sim": "AIMET QuantSim", "int8_cpu": "int8 QDQ (ORT CPU)",
          "int8_htp": "int8 (HTP emulation)"}


def write_report(folder: Path, config, results: dict) -> list[Path]:
    json_path = folder / "report.json"
    json_path.write_text(json.dumps({"config": config.as_dict(), **results}, indent=2, default=_plain) + "\n")
    md_path = folder / "report.md"
    md_path.write_text(_markdown(config, results))
    return [json_path, md_path]


def _markdown(config, results: dict) -> str:
    target, qnn, coverage = results["target"], results["qnn"], results["coverage"]
    lines = [f"# HTP check: {Path(config.qdq_onnx).name} on HTP v{target['htp_arch']} ({target['device']})", "",
             f"onnxruntime-qnn {qnn['onnxruntime_qnn']}, QNN SDK {qnn['qnn_sdk_version']}: the HTP backend built "
             "for x86 runs the NPU's own quantized arithmetic on this host.", "",
             f"> **Times here are host emulation, not device latency.** {results['emulation_note']}", ""]
    for warning in results["warnings"]:
        lines += [f"> **WARNING** {warning}", ""]
    lines += ["## Op coverage", "",
              "| | value |", "|---|---|",
              f"| fully on the HTP | {'yes' if coverage['full_htp'] else '**NO**'} |",
              f"| HTP partitions | {coverage['htp_partitions']} |",
              f"| nodes on the HTP | {coverage['htp_nodes']} |",
              f"| nodes on the CPU | {coverage['cpu_nodes']}"
              + (f" ({_ops(coverage['cpu_op_types'])})" if coverage["cpu_nodes"] else "") + " |",
              f"| compile (HTP graph prepare), host | {coverage['build_s']:.1f} s |", ""]
    if coverage["refused"]:
        lines += ["Nodes the HTP refuses (QNN's reason):", "", "| op | node | reason |", "|---|---|---|"]
        lines += [f"| {row['op_type']} | `{row['name']}` | {row['reason']} |" for row in coverage["refused"][:40]]
        lines.append("")
    if "context_binary" in results:
        ctx = results["context_binary"]
        lines += ["## QNN context binary", "",
                  f"`{ctx['path']}` ({ctx['bytes'] / 1e6:.2f} MB) + `{ctx['onnx']}` ({ctx['onnx_bytes'] / 1e3:.0f} KB), "
                  f"HTP v{ctx['htp_arch']}, soc {ctx['soc_model']}, QNN {ctx['qnn_sdk_version']}; built in "
                  f"{ctx['build_s']:.1f} s on the host, reloaded in {ctx['reload_s']:.1f} s. sha256 `{ctx['sha256'][:16]}…`",
                  "", ctx["ai_hub"], ""]
    numerics = results["numerics"]
    images = len(next(iter(numerics.values()))["fscore_per_image"])
    lines += [f"## Numerics on {images} held-out image(s)", "",
              "F-score: Track 3 F@0.1 with the reference as pseudo ground truth (100 = identical geometry).", "",
              "| test vs reference | SQNR | max abs diff | F-score |", "|---|---|---|---|"]
    for name, row in numerics.items():
        test, reference = name.split("_vs_")
        test = "int8_htp" if test == "htp" else test
        lines.append(f"| {LABELS.get(test, test)} vs {LABELS.get(reference, reference)} | {row['sqnr_db']:.2f} dB | "
                     f"{row['max_abs_diff']:.4f} | {row['fscore']:.2f} |")
    lines.append("")
    if "fp16_baseline" in results:
        baseline = results["fp16_baseline"]
        lines += ["## fp32 model on the HTP in fp16 (the NPU's float baseline)", "",
                  f"Fully on the HTP: {'yes' if baseline['full_htp'] else '**no**'}; compile {baseline['build_s']:.1f} s."]
        if "vs_fp32" in baseline:
            row = baseline["vs_fp32"]
            lines.append(f"vs fp32 on the CPU: SQNR {row['sqnr_db']:.2f} dB, max abs {row['max_abs_diff']:.4f}, "
                         f"F-score {row['fscore']:.2f}.")
        lines.append("")
    if "ground_truth" in results:
        gt = results["ground_truth"]
        labels = list(gt["overall"])
        lines += [f"## Against ground truth ({gt['frames']} of {gt['frames_total']} frames)", "",
                  "| set | frames | " + " | ".join(LABELS.get(label, label) for label in labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for set_name, row in gt["sets"].items():
            lines.append(f"| {set_name} | {row['frames']} | "
                         + " | ".join(f"{row[label]:.2f}" if label in row else "-" for label in labels) + " |")
        lines.append(f"| **all** | {gt['frames']} | "
                     + " | ".join(f"{gt['overall'][label]['fscore@0.1']:.2f}" for label in labels) + " |")
        lines.append("")
        if "fscore_drop" in gt:
            lines.append(f"F-score drop of the HTP int8 model vs fp32: **{gt['fscore_drop']:.2f}**; "
                         f"HTP minus CPU int8: {gt['htp_minus_cpu_int8']:+.2f}.")
            lines.append("")
    lines += ["## Host emulation time (not device latency)", "", "| model | frames | mean s/frame |", "|---|---|---|"]
    for name, timing in results["emulation_time"].items():
        lines.append(f"| {name} | {timing['frames']} | {timing['mean_s_per_frame']:.2f} |")
    lines += ["", "The phone's latency comes only from an AI Hub profile job: `python export/aihub.py ...`.", ""]
    return "\n".join(lines)


def _ops(op_types: dict) -> str:
    return ", ".join(f"{op} x{count}" for op, count in op_types.items())
