"""The HTP check's report: report.json (every figure) and report.md (the tables people read), in the
style of the ptq stage's report."""

from __future__ import annotations

import json
from pathlib import Path

from lpcv_depth.report import cell, markdown_table
from lpcv_depth.schema import to_json

__all__ = ["write_report", "op_summary", "LABELS"]

LABELS = {"fp32": "fp32 (ORT CPU)", "aimet_sim": "AIMET QuantSim", "int8_cpu": "int8 QDQ (ORT CPU)",
          "int8_htp": "int8 (HTP emulation)"}


def op_summary(op_types: dict[str, int]) -> str:
    """`Erf x1, DequantizeLinear x2`: op types with their node counts, or `none`."""
    return ", ".join(f"{op} x{count}" for op, count in op_types.items()) or "none"


def write_report(folder: Path, config, results) -> list[Path]:
    """report.json and report.md of an HtpCheckResults; returns both paths."""
    json_path = folder / "report.json"
    json_path.write_text(json.dumps({"config": config.as_dict(), **to_json(results)}, indent=2, allow_nan=False)
                         + "\n")
    md_path = folder / "report.md"
    sections = [_header(config, results), _coverage(results.coverage), _context_binary(results.context_binary),
                _numerics(results.numerics), _fp16_baseline(results.fp16_baseline), _ground_truth(results.ground_truth),
                _emulation_time(config, results.emulation_time)]
    md_path.write_text("\n".join(section.strip() + "\n" for section in sections if section))
    return [json_path, md_path]


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _header(config, results) -> str:
    target, qnn = results.target, results.qnn
    lines = [f"# HTP check: {Path(config.qdq_onnx).name} on HTP v{target['htp_arch']} ({target['device']})", "",
             f"onnxruntime-qnn {qnn['onnxruntime_qnn']}, QNN SDK {qnn['qnn_sdk_version']}: the HTP backend built "
             "for x86 runs the NPU's own quantized arithmetic on this host.", "",
             f"> **Times here are host emulation, not device latency.** {results.emulation_note}", ""]
    for warning in results.warnings:
        lines += [f"> **WARNING** {warning}", ""]
    return "\n".join(lines)


def _coverage(coverage) -> str:
    cpu = str(coverage.cpu_nodes) + (f" ({op_summary(coverage.cpu_op_types)})" if coverage.cpu_nodes else "")
    rows = [("fully on the HTP", "yes" if coverage.full_htp else "**NO**"),
            ("HTP partitions", str(coverage.htp_partitions)),
            ("nodes on the HTP", str(coverage.htp_nodes)),
            ("nodes on the CPU", cpu),
            ("compile (HTP graph prepare), host", f"{coverage.build_s:.1f} s")]
    text = "## Op coverage\n\n" + markdown_table(["", "value"], rows) + "\n"
    if coverage.refused:
        refused = [(row["op_type"], f"`{row['name']}`", _escape(row["reason"])) for row in coverage.refused[:40]]
        text += "Nodes the HTP refuses (QNN's reason):\n\n" + markdown_table(["op", "node", "reason"], refused) + "\n"
    return text


def _context_binary(context) -> str:
    if context is None:
        return ""
    return ("## QNN context binary\n\n"
            f"`{context.path}` ({context.bytes / 1e6:.2f} MB) + `{context.onnx}` ({context.onnx_bytes / 1e3:.0f} KB), "
            f"HTP v{context.htp_arch}, soc {context.soc_model}, QNN {context.qnn_sdk_version}; built in "
            f"{context.build_s:.1f} s on the host, reloaded in {context.reload_s:.1f} s. "
            f"sha256 `{context.sha256[:16]}…`\n\n{context.ai_hub}\n")


def _numerics(numerics: dict) -> str:
    if not numerics:
        return "## Numerics\n\nNot run (--no-numerics): coverage and the context binary only.\n"
    images = len(next(iter(numerics.values())).fscore_per_image or [])
    rows = []
    for name, row in numerics.items():
        test, reference = name.split("_vs_")
        test = "int8_htp" if test == "htp" else test
        rows.append((f"{LABELS.get(test, test)} vs {LABELS.get(reference, reference)}", f"{row.sqnr_db:.2f} dB",
                     cell(row.max_abs_diff, "{:.4f}"), cell(row.fscore, "{:.2f}")))
    return (f"## Numerics on {images} held-out image(s)\n\n"
            "F-score: Track 3 F@0.1 with the reference as pseudo ground truth (100 = identical geometry).\n\n"
            + markdown_table(["test vs reference", "SQNR", "max abs diff", "F-score"], rows, align="lrrr"))


def _fp16_baseline(baseline) -> str:
    if baseline is None:
        return ""
    text = ("## fp32 model on the HTP in fp16 (the NPU's float baseline)\n\n"
            f"Fully on the HTP: {'yes' if baseline.full_htp else '**no**'}; compile {baseline.build_s:.1f} s.\n")
    if baseline.vs_fp32 is not None:
        row = baseline.vs_fp32
        text += (f"vs fp32 on the CPU: SQNR {row.sqnr_db:.2f} dB, max abs {row.max_abs_diff:.4f}, "
                 f"F-score {row.fscore:.2f}.\n")
    return text


def _ground_truth(gt) -> str:
    if gt is None:
        return ""
    labels = list(gt.overall)
    rows = [(set_name, str(row["frames"]), *(cell(row.get(label), "{:.2f}") for label in labels))
            for set_name, row in gt.sets.items()]
    rows.append(("**all**", str(gt.frames), *(cell(gt.overall[label]["fscore@0.1"], "{:.2f}") for label in labels)))
    text = (f"## Against ground truth ({gt.frames} of {gt.frames_total} frames)\n\n"
            + markdown_table(["set", "frames", *(LABELS.get(label, label) for label in labels)], rows,
                             align="lr" + "r" * len(labels)) + "\n")
    if gt.fscore_drop is not None:
        text += (f"F-score drop of the HTP int8 model vs fp32: **{gt.fscore_drop:.2f}**; "
                 f"HTP minus CPU int8: {gt.htp_minus_cpu_int8:+.2f}.\n")
    return text


def _emulation_time(config, emulation_time: dict) -> str:
    from lpcv_depth.stage import command_line

    if not emulation_time:
        return ""
    rows = [(name, str(timing.frames), cell(timing.mean_s_per_frame, "{:.2f}")) for name, timing in emulation_time.items()]
    return ("## Host emulation time (not device latency)\n\n"
            + markdown_table(["model", "frames", "mean s/frame"], rows, align="lrr")
            + f"\nThe phone's latency comes only from an AI Hub profile job: `{command_line('hub', config.ptq)}`.\n")
