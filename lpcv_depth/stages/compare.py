"""fp32 against int8, side by side: phone latency and FPS against 30, memory, NPU/CPU layers, host
latency, size, and accuracy, from the manifests of the export, ptq and hub stages.

    python evaluation/compare.py --fp32 build/fastdepth/export --int8 build/fastdepth/ptq-w8a8
    python evaluation/compare.py --fp32 build/fastdepth/export --int8 build/fastdepth/ptq-w8a8 \\
        --fp32-hub build/fastdepth/hub-export-tflite --int8-hub build/fastdepth/hub-ptq-w8a8-tflite

Hub runs default to the hub-*/ folders beside the two inputs whose manifest names them as their
input (qnn_context_binary first, else the newest). With no hub run the report holds the host
figures only and says so. Writes OUT/compare.md, compare.json, compare.png and manifest.json
(default OUT: build/<model>/compare).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.stage import StageLog, StagingDir, exit_status
from lpcv_depth.manifest import MANIFEST_NAME, config_as_dict, read_manifest, sha256_file, write_manifest
from lpcv_depth.track3_metric import FSCORE
from lpcv_depth.verify import sqnr_db

STAGE = "compare"
PRECISIONS = ("fp32", "int8")
PREFERRED_RUNTIME = "qnn_context_binary"


def _require_stage(folder: Path, stage: str, flag: str, hint: str) -> None:
    if not (Path(folder) / MANIFEST_NAME).is_file():
        raise ConfigError(f"{flag} {folder} is not a stage output (no {MANIFEST_NAME})", hint=hint)
    found = read_manifest(folder).get("stage")
    if found != stage:
        raise ConfigError(f"{flag} {folder} holds a {found!r} stage output, not {stage!r}", hint=hint)


@dataclass(frozen=True)
class CompareConfig:
    fp32: Path
    int8: Path
    fp32_hub: Path | None = None
    int8_hub: Path | None = None
    out_dir: Path | None = None
    target_fps: float = 30.0

    def __post_init__(self):
        _require_stage(self.fp32, "export", "--fp32", "pass the export stage's folder, e.g. build/fastdepth/export")
        _require_stage(self.int8, "ptq", "--int8", "pass the ptq stage's folder, e.g. build/fastdepth/ptq-w8a8")
        for flag, folder in (("--fp32-hub", self.fp32_hub), ("--int8-hub", self.int8_hub)):
            if folder is not None:
                _require_stage(folder, "hub", flag, "pass a folder written by python export/aihub.py")
        if not self.target_fps > 0:
            raise ConfigError(f"target_fps must be > 0, got {self.target_fps}")

    @property
    def destination(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path(self.fp32).parent / "compare"

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class CompareResult:
    out_dir: Path
    report: dict
    manifest: dict


def find_hub_run(stage_dir: Path) -> Path | None:
    """The hub stage output beside `stage_dir` that took it as input (qnn_context_binary first, else newest)."""
    target = Path(stage_dir).resolve()
    found = []
    for folder in Path(stage_dir).resolve().parent.glob("hub-*"):
        if not (folder / MANIFEST_NAME).is_file():
            continue
        manifest = read_manifest(folder)
        source = manifest.get("results", {}).get("input", {}).get("source_dir")
        if manifest.get("stage") == "hub" and source and Path(source).resolve() == target:
            found.append((manifest["results"].get("runtime") == PREFERRED_RUNTIME, manifest["created"], folder))
    return max(found)[2] if found else None


def _get(data: dict | None, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _column(precision: str, stage: dict, ptq: dict, hub: dict | None, hub_dir: Path | None) -> dict:
    """One model's figures; None wherever a stage did not measure it."""
    ptq_results = ptq["results"]
    int8 = precision == "int8"
    profile = _get(hub, "results", "profile")
    inference = _get(hub, "results", "inference")
    units = _get(profile, "compute_units") or {}
    peak = _get(profile, "peak_memory_bytes")
    column = {
        "source": os.fspath(stage["config"].get("destination", "")),
        "hub_run": os.fspath(hub_dir) if hub_dir else None,
        "runtime": _get(hub, "results", "runtime"),
        "compile_job_id": _get(hub, "results", "compile", "job_id"),
        "profile_job_id": _get(profile, "job_id"),
        "device_latency_ms": _get(profile, "estimated_inference_time_ms"),
        "fps": _get(profile, "fps"),
        "peak_memory_mb": [v / 1e6 for v in peak] if peak else None,
        "layers": _get(profile, "layers"),
        "npu_layers": units.get("NPU") if profile else None,
        "gpu_layers": units.get("GPU") if profile else None,
        "cpu_layers": units.get("CPU") if profile else None,
        "cpu_fallback": _get(profile, "cpu_fallback"),
        "host_latency_ms": _get(ptq_results, "host_latency_ms", "int8_qdq" if int8 else "fp32"),
        "onnx_bytes": _get(ptq_results, "sizes_bytes", "qdq_onnx" if int8 else "fp32_onnx")
        or (None if int8 else _get(stage, "results", "onnx_bytes")),
        "compiled_bytes": _get(hub, "results", "compile", "bytes"),
        "fscore_gt_host": _get(ptq_results, "ground_truth", precision, FSCORE),
        "abs_rel_gt_host": _get(ptq_results, "ground_truth", precision, "abs_rel"),
        "fscore_gt_device": _get(inference, "ground_truth", "device", FSCORE),
        "abs_rel_gt_device": _get(inference, "ground_truth", "device", "abs_rel"),
        "gt_frames_device": _get(inference, "ground_truth", "frames"),
        "device_vs_host_sqnr_db": _get(inference, "vs_host", "sqnr_db"),
    }
    if int8:
        column["aimet_bytes"] = (_get(ptq_results, "sizes_bytes", "aimet_onnx") or 0) + \
                                (_get(ptq_results, "sizes_bytes", "aimet_encodings") or 0) or None
    return column


def _device_int8_vs_fp32(fp32_hub: Path | None, int8_hub: Path | None) -> dict | None:
    """SQNR of the phone's int8 outputs against the phone's fp32 outputs, on the frames both runs have."""
    if fp32_hub is None or int8_hub is None:
        return None
    folders = [Path(hub) / "device_outputs" for hub in (fp32_hub, int8_hub)]
    if not all(folder.is_dir() for folder in folders):
        return None
    common = sorted({p.relative_to(folders[0]) for p in folders[0].rglob("*.npy")}
                    & {p.relative_to(folders[1]) for p in folders[1].rglob("*.npy")})
    if not common:
        return None
    fp32 = np.stack([np.load(folders[0] / name) for name in common])
    int8 = np.stack([np.load(folders[1] / name) for name in common])
    return {"sqnr_db": sqnr_db(fp32, int8), "max_abs_diff": float(np.max(np.abs(fp32 - int8))),
            "frames": len(common)}


def compare(config: CompareConfig, log: StageLog | None = None) -> CompareResult:
    """Gather both models' figures, write the table, the JSON, the chart and the manifest."""
    log = log or StageLog(STAGE)
    with log.step("read-manifests") as step:
        export, ptq = read_manifest(config.fp32), read_manifest(config.int8)
        hub_dirs = {"fp32": config.fp32_hub or find_hub_run(config.fp32),
                    "int8": config.int8_hub or find_hub_run(config.int8)}
        hubs = {key: read_manifest(folder) if folder else None for key, folder in hub_dirs.items()}
        step.detail = ", ".join(f"{key} hub run: {os.path.relpath(folder) if folder else 'none'}"
                                for key, folder in hub_dirs.items())
    columns = {"fp32": _column("fp32", export, ptq, hubs["fp32"], hub_dirs["fp32"]),
               "int8": _column("int8", ptq, ptq, hubs["int8"], hub_dirs["int8"])}
    missing = [key for key, hub in hubs.items() if hub is None]
    if missing:
        log.warn(f"no AI Hub run for {' and '.join(missing)}: its device figures are empty (host figures only). "
                 f"Run python export/aihub.py on it first.")
    with log.step("int8-vs-fp32") as step:
        device = _device_int8_vs_fp32(hub_dirs["fp32"], hub_dirs["int8"])
        host_sqnr = _get(ptq, "results", "int8_vs_fp32", "sqnr_db")
        step.detail = f"host SQNR {host_sqnr:.1f} dB" if host_sqnr is not None else "no host SQNR in the ptq manifest"
        if device:
            step.detail += f", on-device SQNR {device['sqnr_db']:.1f} dB over {device['frames']} frames"
    fp32_ms, int8_ms = columns["fp32"]["device_latency_ms"], columns["int8"]["device_latency_ms"]
    report = {
        "model": export["config"].get("model"),
        "target_fps": config.target_fps,
        "host_only": not any(hubs.values()),
        "missing_hub_runs": missing,
        "models": columns,
        "int8_vs_fp32": {"host_sqnr_db": host_sqnr, "host_holdout_images": _get(ptq, "results", "int8_vs_fp32",
                                                                                  "holdout_images"),
                         "device": device,
                         "device_speedup": fp32_ms / int8_ms if fp32_ms and int8_ms else None},
    }
    for column in columns.values():
        if column["fps"] is not None:
            column["meets_target_fps"] = column["fps"] >= config.target_fps

    with StagingDir(config.destination, stage=STAGE) as staging:
        with log.step("write") as step:
            json_path = staging / "compare.json"
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            md_path = staging / "compare.md"
            md_path.write_text(_markdown(report, config))
            png_path = staging / "compare.png"
            _chart(report).save(png_path)
            step.detail = "compare.md, compare.json, compare.png"
        sources = {"fp32": config.fp32, "int8": config.int8,
                   **{f"{key}_hub": folder for key, folder in hub_dirs.items() if folder}}
        inputs = {key: {"path": os.fspath(folder), "manifest_sha256": sha256_file(Path(folder) / MANIFEST_NAME)}
                  for key, folder in sources.items()}
        write_manifest(staging.path, stage=STAGE, config=config.as_dict(), inputs=inputs,
                       outputs=[md_path, json_path, png_path], timings=log.timings, results=report)
    log.info(f"ok {log.total_seconds:.1f}s -> {config.destination}")
    return CompareResult(config.destination, report, read_manifest(config.destination))


def _fmt(value, pattern: str = "{:.1f}") -> str:
    return "–" if value is None else pattern.format(value)


def _markdown(report: dict, config: CompareConfig) -> str:
    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]
    target_ms = 1000.0 / report["target_fps"]

    def fps_cell(column):
        if column["fps"] is None:
            return "–"
        return f"{column['fps']:.1f} {'✓' if column['fps'] >= report['target_fps'] else '✗ below target'}"

    def layers(column):
        if column["npu_layers"] is None:
            return "–"
        text = f"{column['npu_layers']} / {column['gpu_layers']} / {column['cpu_layers']}"
        return text + (" ⚠ CPU fallback" if column["cpu_fallback"] else "")

    def memory(column):
        peak = column["peak_memory_mb"]
        return "–" if not peak else f"{peak[0]:.1f} – {peak[1]:.1f}"

    def size_ratio(a, b):
        return f"{a / b:.1f}x smaller" if a and b else ""

    device = report["int8_vs_fp32"]["device"]
    rows = [
        ("device latency, S24 (ms)", _fmt(fp32["device_latency_ms"], "{:.2f}"), _fmt(int8["device_latency_ms"], "{:.2f}"),
         f"{report['int8_vs_fp32']['device_speedup']:.2f}x faster" if report["int8_vs_fp32"]["device_speedup"] else ""),
        (f"device FPS (target {report['target_fps']:g} = {target_ms:.1f} ms)", fps_cell(fp32), fps_cell(int8), ""),
        ("peak memory, inference (MB)", memory(fp32), memory(int8), ""),
        ("layers NPU / GPU / CPU", layers(fp32), layers(int8), ""),
        ("host ORT latency, x86 (ms)", _fmt(fp32["host_latency_ms"]), _fmt(int8["host_latency_ms"]), ""),
        ("ONNX size (MB; int8: QDQ)", _fmt(fp32["onnx_bytes"] and fp32["onnx_bytes"] / 1e6, "{:.2f}"),
         _fmt(int8["onnx_bytes"] and int8["onnx_bytes"] / 1e6, "{:.2f}"), size_ratio(fp32["onnx_bytes"], int8["onnx_bytes"])),
        ("compiled model (MB)", _fmt(fp32["compiled_bytes"] and fp32["compiled_bytes"] / 1e6, "{:.2f}"),
         _fmt(int8["compiled_bytes"] and int8["compiled_bytes"] / 1e6, "{:.2f}"),
         size_ratio(fp32["compiled_bytes"], int8["compiled_bytes"])),
        ("F-score@0.1 vs GT, host", _fmt(fp32["fscore_gt_host"], "{:.2f}"), _fmt(int8["fscore_gt_host"], "{:.2f}"),
         _delta(fp32["fscore_gt_host"], int8["fscore_gt_host"])),
        ("abs_rel vs GT, host", _fmt(fp32["abs_rel_gt_host"], "{:.4f}"), _fmt(int8["abs_rel_gt_host"], "{:.4f}"), ""),
        ("F-score@0.1 vs GT, on device", _fmt(fp32["fscore_gt_device"], "{:.2f}"),
         _fmt(int8["fscore_gt_device"], "{:.2f}"), _delta(fp32["fscore_gt_device"], int8["fscore_gt_device"])),
        ("abs_rel vs GT, on device", _fmt(fp32["abs_rel_gt_device"], "{:.4f}"),
         _fmt(int8["abs_rel_gt_device"], "{:.4f}"), ""),
        ("device vs host SQNR (dB)", _fmt(fp32["device_vs_host_sqnr_db"]), _fmt(int8["device_vs_host_sqnr_db"]), ""),
        ("int8 vs fp32 SQNR, host (dB)", "", "", _fmt(report["int8_vs_fp32"]["host_sqnr_db"], "{:.2f}")),
        ("int8 vs fp32 SQNR, on device (dB)", "", "", _fmt(device and device["sqnr_db"], "{:.2f}")
         + (f" ({device['frames']} frames)" if device else "")),
    ]
    lines = [f"# fp32 vs int8: {report['model']}", ""]
    if report["host_only"]:
        lines += ["**Host figures only: no AI Hub run was found for either model**, so the device rows are empty. "
                  "Run `python export/aihub.py` on both folders, then this command again.", ""]
    elif report["missing_hub_runs"]:
        lines += [f"**No AI Hub run for {' and '.join(report['missing_hub_runs'])}**: its device column is empty.", ""]
    lines += ["| | fp32 | int8 | int8 vs fp32 |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    lines += ["", "Device figures come from AI Hub profile jobs on the Samsung Galaxy S24 (Family)"
              " (--max_profiler_iterations 20, as the organizers profile); host latency is ONNX Runtime on x86, a"
              " sanity figure only. Host accuracy is the ptq stage's --eval-data scoring, device accuracy the hub"
              " stage's; the two may cover different frames.", ""]
    for name, column in report["models"].items():
        if column["cpu_fallback"]:
            lines.append(f"- ⚠ **{name}: {column['cpu_layers']} layers fall back to the CPU** "
                         f"(see {column['hub_run']}/profile.json).")
        if column["compile_job_id"]:
            lines.append(f"- {name}: compile job `{column['compile_job_id']}` ({column['runtime']}), "
                         f"profile job `{column['profile_job_id']}`; hub run `{column['hub_run']}`.")
    lines += ["", "![fp32 vs int8](compare.png)", ""]
    return "\n".join(lines)


def _delta(fp32, int8) -> str:
    return "" if fp32 is None or int8 is None else f"{int8 - fp32:+.2f}"


def _chart(report: dict):
    from lpcv_depth.visualize import BarPanel, bar_chart

    fp32, int8 = report["models"]["fp32"], report["models"]["int8"]

    def pair(key, scale=1.0):
        return [(name, None if column[key] is None else column[key] * scale)
                for name, column in (("fp32", fp32), ("int8", int8))]

    def peak(column):
        return column["peak_memory_mb"][1] if column["peak_memory_mb"] else None

    target_ms = 1000.0 / report["target_fps"]
    panels = [
        BarPanel("device latency, S24 (ms)", pair("device_latency_ms"), (target_ms, f"{report['target_fps']:g} FPS"),
                 "{:.2f}"),
        BarPanel("device FPS", pair("fps"), (report["target_fps"], f"{report['target_fps']:g} FPS"), "{:.0f}"),
        BarPanel("peak memory, upper (MB)", [("fp32", peak(fp32)), ("int8", peak(int8))]),
        BarPanel("layers: NPU and CPU", [("fp32 NPU", fp32["npu_layers"]), ("fp32 CPU", fp32["cpu_layers"]),
                                         ("int8 NPU", int8["npu_layers"]), ("int8 CPU", int8["cpu_layers"])], fmt="{:.0f}",
                 colours=(0, 0, 1, 1)),
        BarPanel("host ORT latency, x86 (ms)", pair("host_latency_ms")),
        BarPanel("ONNX size (MB)", pair("onnx_bytes", 1e-6), fmt="{:.2f}"),
        BarPanel("F-score@0.1 vs GT, host", pair("fscore_gt_host"), fmt="{:.2f}"),
        BarPanel("F-score@0.1 vs GT, device", pair("fscore_gt_device"), fmt="{:.2f}"),
    ]
    title = f"fp32 vs int8: {report['model']}" + ("  (host figures only: no AI Hub run)" if report["host_only"] else "")
    return bar_chart(panels, title, columns=4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python evaluation/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True, help="export stage folder (fp32 model.onnx)")
    parser.add_argument("--int8", type=Path, required=True, help="ptq stage folder")
    parser.add_argument("--fp32-hub", type=Path, default=None, help="hub stage folder of the fp32 model "
                        "(default: found beside --fp32)")
    parser.add_argument("--int8-hub", type=Path, default=None, help="hub stage folder of the int8 model "
                        "(default: found beside --int8)")
    parser.add_argument("--target-fps", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default <fp32>/../compare)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = StageLog(STAGE)
    try:
        config = CompareConfig(fp32=args.fp32, int8=args.int8, fp32_hub=args.fp32_hub, int8_hub=args.int8_hub,
                               out_dir=args.out, target_fps=args.target_fps)
        result = compare(config, log)
    except (LpcvError, KeyboardInterrupt) as err:
        return exit_status(STAGE, err)
    log.info(f"next: cat {os.path.relpath(result.out_dir / 'compare.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
