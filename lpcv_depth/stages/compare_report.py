"""The comparison's report: compare.md (one table of what was measured, then the local HTP check),
compare.json (every figure) and compare.png (one bar panel per measured figure)."""

from __future__ import annotations

import json
from pathlib import Path

from lpcv_depth.report import NOT_MEASURED, cell, markdown_table
from lpcv_depth.results import CompareColumn, ComparePanel, CompareResults
from lpcv_depth.schema import to_json

__all__ = ["write_report", "compare_markdown", "chart_panels", "HTP_NOTE", "REPORT_FILES"]

HTP_NOTE = "HTP emulation (host), not device latency"
REPORT_FILES = ("compare.md", "compare.json", "compare.png")


def write_report(folder: Path, results: CompareResults) -> tuple[list[Path], int]:
    """The three report files in `folder`, and how many chart panels were drawn."""
    from lpcv_depth.visualize import bar_chart

    paths = [folder / name for name in REPORT_FILES]
    paths[0].write_text(compare_markdown(results))
    paths[1].write_text(json.dumps(to_json(results), indent=2, allow_nan=False) + "\n")
    drawn = bar_chart(_bar_panels(results.chart), paths[2], title=_chart_title(results))
    return paths, drawn


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _row(label: str, fp32, int8, pattern: str = "{:.1f}", versus: str = "") -> tuple | None:
    """A table row, or None when neither model has the figure (the row is left out)."""
    if fp32 is None and int8 is None:
        return (label, "", "", versus) if versus else None
    return label, cell(fp32, pattern), cell(int8, pattern), versus


def _delta(fp32: float | None, int8: float | None) -> str:
    return "" if fp32 is None or int8 is None else f"{int8 - fp32:+.2f}"


def _ratio(fp32: float | None, int8: float | None, word: str) -> str:
    return f"{fp32 / int8:.1f}x {word}" if fp32 and int8 else ""


def _fps_cell(column: CompareColumn, target: float) -> str | None:
    if column.fps is None:
        return None
    return f"{column.fps:.1f} {'✓' if column.fps >= target else '✗ below target'}"


def _layers_cell(column: CompareColumn) -> str | None:
    if column.npu_layers is None:
        return None
    text = f"{column.npu_layers} / {cell(column.gpu_layers, '{}')} / {cell(column.cpu_layers, '{}')}"
    return text + (" ⚠ CPU fallback" if column.cpu_fallback else "")


def _memory_cell(column: CompareColumn) -> str | None:
    peak = column.peak_memory_mb
    return f"{peak[0]:.1f} – {peak[1]:.1f}" if peak else None


def _device_rows(results: CompareResults) -> list:
    fp32, int8 = results.models["fp32"], results.models["int8"]
    speedup = results.int8_vs_fp32.device_speedup
    target = results.target_fps
    return [
        _row("device latency, S24 (ms)", fp32.device_latency_ms, int8.device_latency_ms, "{:.2f}",
             f"{speedup:.2f}x faster" if speedup else ""),
        _row(f"device FPS (target {target:g} = {1000.0 / target:.1f} ms)", _fps_cell(fp32, target),
             _fps_cell(int8, target)),
        _row("peak memory, inference (MB)", _memory_cell(fp32), _memory_cell(int8)),
        _row("layers NPU / GPU / CPU", _layers_cell(fp32), _layers_cell(int8)),
    ]


def _host_rows(results: CompareResults) -> list:
    fp32, int8 = results.models["fp32"], results.models["int8"]
    return [
        # The int8 column always takes the ptq stage's figure, so none means ptq skipped it (--latency-runs 0).
        _row("host ORT latency, x86 (ms)", *((fp32.host_latency_ms, int8.host_latency_ms)
                                              if int8.host_latency_ms is not None else (NOT_MEASURED, NOT_MEASURED))),
        _row("ONNX size (MB; int8: QDQ)", _mb(fp32.onnx_bytes), _mb(int8.onnx_bytes), "{:.2f}",
             _ratio(fp32.onnx_bytes, int8.onnx_bytes, "smaller")),
        _row("compiled model (MB)", _mb(fp32.compiled_bytes), _mb(int8.compiled_bytes), "{:.2f}",
             _ratio(fp32.compiled_bytes, int8.compiled_bytes, "smaller")),
        _row("F-score@0.1 vs GT, host", fp32.fscore_gt_host, int8.fscore_gt_host, "{:.2f}",
             _delta(fp32.fscore_gt_host, int8.fscore_gt_host)),
        _row("abs_rel vs GT, host", fp32.abs_rel_gt_host, int8.abs_rel_gt_host, "{:.4f}"),
        _row("F-score@0.1 vs GT, on device", fp32.fscore_gt_device, int8.fscore_gt_device, "{:.2f}",
             _delta(fp32.fscore_gt_device, int8.fscore_gt_device)),
        _row("abs_rel vs GT, on device", fp32.abs_rel_gt_device, int8.abs_rel_gt_device, "{:.4f}"),
        _row("device vs host SQNR (dB)", fp32.device_vs_host_sqnr_db, int8.device_vs_host_sqnr_db),
    ]


def _fidelity_rows(results: CompareResults) -> list:
    fidelity = results.int8_vs_fp32
    device = fidelity.device
    host = f"{cell(fidelity.host_sqnr_db, '{:.2f}')} (scale-aligned {cell(fidelity.host_sqnr_db_scale_aligned, '{:.2f}')})"
    rows = [_row("int8 vs fp32 SQNR, host (dB)", None, None, versus=host)]
    if fidelity.host_fscore_vs_fp32 is not None:
        rows.append(_row("int8 F-score@0.1 with fp32 as GT, host", None, None,
                         versus=f"{fidelity.host_fscore_vs_fp32:.2f}"))
    if device:
        rows.append(_row("int8 vs fp32 SQNR, on device (dB)", None, None,
                         versus=f"{device['sqnr_db']:.2f} ({device['frames']} frames)"))
    return rows


def _htp_rows(results: CompareResults) -> list:
    fp32, int8 = results.models["fp32"], results.models["int8"]
    fidelity = results.int8_vs_fp32
    frames = int8.htp_gt_frames or fp32.htp_gt_frames

    def coverage(column: CompareColumn) -> str | None:
        if column.htp_full is None:
            return None
        if column.htp_nodes is None:
            return "full (fp16)" if column.htp_full else "not full (fp16)"
        return "full" if column.htp_full else f"not full: {column.htp_cpu_nodes} nodes on the CPU"

    return [
        _row("NPU coverage (fp32: in fp16)", coverage(fp32), coverage(int8)),
        _row("nodes on the HTP / on the CPU", None,
             None if int8.htp_nodes is None else f"{int8.htp_nodes} / {int8.htp_cpu_nodes}"),
        _row(f"F-score@0.1 vs GT, {frames} frames (fp32: ORT CPU, int8: HTP)", fp32.htp_fscore_gt,
             int8.htp_fscore_gt, "{:.2f}", _delta(fp32.htp_fscore_gt, int8.htp_fscore_gt)),
        _row("int8 on the HTP vs fp32: SQNR (dB), F-score@0.1 with fp32 as GT", None, None,
             versus="" if fidelity.htp_sqnr_db is None else
             f"{fidelity.htp_sqnr_db:.2f} dB, F-score {cell(fidelity.htp_fscore_vs_fp32, '{:.2f}')}"),
        _row("QNN context binary, built on the host (MB)", None, _mb(int8.context_binary_bytes), "{:.2f}"),
    ]


def _table(rows: list) -> str:
    rows = [row for row in rows if row is not None]
    return markdown_table(["", "fp32", "int8", "int8 vs fp32"], rows, align="lrrl") if rows else ""


def compare_markdown(results: CompareResults) -> str:
    """compare.md: one table of what was measured (rows nothing measured are left out), then the HTP check."""
    lines = [f"# fp32 vs int8: {results.model}", ""]
    if results.host_only:
        lines += ["**Host figures only: no AI Hub run was found for either model**, so there are no device rows. "
                  "Run `lpcv-depth hub` on both folders, then this command again.", ""]
    elif results.missing_hub_runs:
        lines += [f"**No AI Hub run for {' and '.join(results.missing_hub_runs)}**: its device cells are empty.", ""]
    lines += [_table(_device_rows(results) + _host_rows(results) + _fidelity_rows(results)), _notes(results)]
    if results.htp_check is not None:
        lines += [f"## {HTP_NOTE}", "", _table(_htp_rows(results)),
                  f"From the local HTP check `{results.htp_check}`: the QNN HTP backend for x86 runs the int8 model "
                  "with the NPU's own arithmetic on this host. It measures coverage and numerics, never speed: only "
                  "an AI Hub profile job measures the phone.", ""]
    lines += ["![fp32 vs int8](compare.png)", ""]
    return "\n".join(lines)


def _notes(results: CompareResults) -> str:
    text = "Host latency is ONNX Runtime on x86, a sanity figure only. Host accuracy is the ptq stage's --eval-data scoring."
    if not results.host_only:
        text = ("Device figures come from AI Hub profile jobs on the Samsung Galaxy S24 (Family) "
                "(--max_profiler_iterations 20, as the organizers profile); " + text[0].lower() + text[1:-1]
                + ", device accuracy the hub stage's; the two may cover different frames.")
    lines = [text, ""]
    for name, column in results.models.items():
        if column.cpu_fallback:
            lines.append(f"- ⚠ **{name}: {column.cpu_layers} layers fall back to the CPU** "
                         f"(see {column.hub_run}/profile.json).")
        if column.compile_job_id:
            lines.append(f"- {name}: compile job `{column.compile_job_id}` ({column.runtime}), "
                         f"profile job `{column.profile_job_id}`; hub run `{column.hub_run}`.")
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------ chart

def _panel(title: str, bars: list[tuple[str, float | None]], fmt: str = "{:.1f}",
           line: tuple[float, str] | None = None) -> ComparePanel | None:
    """A chart panel of the measured bars only; None when nothing was measured (the panel is left out)."""
    measured = {label: float(value) for label, value in bars if value is not None}
    if not measured:
        return None
    return ComparePanel(title, measured, fmt, *(line or (None, None)))


def chart_panels(results: CompareResults) -> list[ComparePanel]:
    """What compare.png draws: one panel per figure that at least one model has."""
    fp32, int8 = results.models["fp32"], results.models["int8"]
    fidelity = results.int8_vs_fp32
    target, target_label = results.target_fps, f"{results.target_fps:g} FPS"

    def pair(key: str, scale: float = 1.0):
        return [(name, None if getattr(c, key) is None else getattr(c, key) * scale)
                for name, c in (("fp32", fp32), ("int8", int8))]

    def peak(column: CompareColumn):
        return column.peak_memory_mb[1] if column.peak_memory_mb else None

    htp = f"\n{HTP_NOTE}"
    panels = [
        _panel("device latency, S24 (ms)", pair("device_latency_ms"), "{:.2f}", (1000.0 / target, target_label)),
        _panel("device FPS", pair("fps"), "{:.0f}", (target, target_label)),
        _panel("peak memory, upper (MB)", [("fp32", peak(fp32)), ("int8", peak(int8))]),
        _panel("layers: NPU and CPU", [("fp32 NPU", fp32.npu_layers), ("fp32 CPU", fp32.cpu_layers),
                                       ("int8 NPU", int8.npu_layers), ("int8 CPU", int8.cpu_layers)], "{:.0f}"),
        _panel("host ORT latency, x86 (ms)", pair("host_latency_ms")),
        _panel("ONNX size (MB)", pair("onnx_bytes", 1e-6), "{:.2f}"),
        _panel("F-score@0.1 vs GT, host", pair("fscore_gt_host"), "{:.2f}"),
        _panel("F-score@0.1 vs GT, device", pair("fscore_gt_device"), "{:.2f}"),
        _panel("int8 vs fp32 SQNR (dB)" + (htp if fidelity.htp_sqnr_db is not None else ""),
               [("host", fidelity.host_sqnr_db), ("host, scale-aligned", fidelity.host_sqnr_db_scale_aligned),
                ("device", fidelity.device and fidelity.device["sqnr_db"]), ("HTP emulation", fidelity.htp_sqnr_db)]),
        _panel("int8 F-score@0.1, fp32 as GT" + (htp if fidelity.htp_fscore_vs_fp32 is not None else ""),
               [("host QDQ", fidelity.host_fscore_vs_fp32), ("HTP emulation", fidelity.htp_fscore_vs_fp32)], "{:.2f}"),
        _panel("int8 nodes on the HTP / CPU" + htp, [("HTP", int8.htp_nodes), ("CPU", int8.htp_cpu_nodes)], "{:.0f}"),
        _panel("F-score@0.1 vs GT, HTP check frames" + htp, [("fp32 CPU", fp32.htp_fscore_gt),
                                                             ("int8 HTP", int8.htp_fscore_gt)], "{:.2f}"),
        _panel("QNN context binary (MB)" + htp, [("int8", _mb(int8.context_binary_bytes))], "{:.2f}"),
    ]
    return [panel for panel in panels if panel is not None]


def _colour(label: str, position: int) -> int:
    """fp32 bars blue, int8 bars orange in every panel; other series by position from green on."""
    word = label.split()[0]
    return {"fp32": 0, "int8": 1}.get(word, 2 + position)


def _bar_panels(panels: list[ComparePanel]):
    from lpcv_depth.visualize import BarPanel

    return [BarPanel(panel.title, list(panel.bars.items()),
                     None if panel.line is None else (panel.line, panel.line_label or ""), panel.fmt,
                     tuple(_colour(label, i) for i, label in enumerate(panel.bars)))
            for panel in panels]


def _chart_title(results: CompareResults) -> str:
    return f"fp32 vs int8: {results.model}" + ("  (host figures only: no AI Hub run)" if results.host_only else "")
