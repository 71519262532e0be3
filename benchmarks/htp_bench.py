"""HTP emulation benchmark: how long `quantize/htp_check.py` takes per frame on this host, per model.

    python benchmarks/htp_bench.py fastdepth                  # real weights, w8a8, 2 held-out images
    python benchmarks/htp_bench.py vits --frames 1            # DA-V2 ViT-S, random weights, full size
    python benchmarks/htp_bench.py vits --ptq build/bench/htp/vits-ptq   # reuse an existing ptq folder

Builds what is missing (export, a quick AIMET w8a8 ptq on a few calibration images) under
build/bench/htp/, then runs the HTP check on `--frames` held-out images and prints its compile time,
context binary size, coverage and the emulation time per frame. Every time here is host emulation
of the NPU on this x86 CPU, NOT device latency. The figures measured so far: docs/htp-check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lpcv_depth.workspace import build_dir

# The benchmark data sits beside the checkout (../shared); outputs go to the workspace.
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
CALIBRATION = SHARED / "data" / "calibration_indoor"
FASTDEPTH_WEIGHTS = SHARED / "weights" / "fastdepth" / "fast_depth_224.tflite"
MODELS = {"fastdepth": ["--model", "fastdepth", "--weights", str(FASTDEPTH_WEIGHTS)],
          "vits": ["--model", "depth_anything_v2_vits", "--weights", "None"]}


def run(args: list[str]) -> float:
    """Wall seconds of one stage CLI run; exits with its log tail on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode not in (0, 3):  # 3: a gate failed, the report is still there
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - start


def calibration_subset(count: int, holdout: int, folder: Path) -> Path:
    """Every 6th photo of the walk-through (spread-out views), as symlinks."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(CALIBRATION.glob("*.jpg"))[::6][:count + holdout]:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    return folder


def ensure_ptq(model: str, out: Path, calib_images: int, holdout: int) -> tuple[Path, dict]:
    export_dir, ptq_dir = out / f"{model}-export", out / f"{model}-ptq"
    timings = {}
    if not (export_dir / "manifest.json").is_file():
        timings["export_s"] = round(run(["-m", "lpcv_depth.cli", "export", *MODELS[model], "--out", str(export_dir),
                                         "--check-images", str(CALIBRATION)]), 1)
    if not (ptq_dir / "manifest.json").is_file():
        calib = calibration_subset(calib_images, holdout, out / f"calib{calib_images}")
        timings["ptq_s"] = round(run(["-m", "lpcv_depth.cli", "ptq", "--calib", str(calib), "--fp32", str(export_dir),
                                      "--num-calib", str(calib_images), "--min-calib", str(calib_images),
                                      "--holdout", str(holdout), "--no-cle", "--latency-runs", "2",
                                      "--out", str(ptq_dir)]), 1)
    return ptq_dir, timings


def bench(model: str, ptq_dir: Path, frames: int, fp16: bool, out: Path) -> dict:
    check_dir = out / f"{model}-htp-check"
    args = ["-m", "lpcv_depth.cli", "htp-check", "--ptq", str(ptq_dir), "--max-frames", str(frames), "--out", str(check_dir),
            "--fscore-max-points", "20000"]
    if not fp16:
        args.append("--no-fp16-baseline")
    wall = run(args)
    report = json.loads((check_dir / "report.json").read_text())
    coverage, emulation = report["coverage"], report["emulation_time"]
    row = {"model": model, "ptq": os.fspath(ptq_dir), "stage_wall_s": round(wall, 1),
           "nodes": report["model"]["nodes"], "full_htp": coverage["full_htp"], "cpu_nodes": coverage["cpu_nodes"],
           "cpu_op_types": coverage["cpu_op_types"], "htp_partitions": coverage["htp_partitions"],
           "compile_s": round(coverage["build_s"], 1),
           "int8_emulation_s_per_frame": round(emulation["int8"]["mean_s_per_frame"], 1),
           "frames": emulation["int8"]["frames"],
           "htp_vs_int8_cpu_sqnr_db": round(report["numerics"]["htp_vs_int8_cpu"]["sqnr_db"], 2)}
    if "context_binary" in report:
        row["context_binary_mb"] = round(report["context_binary"]["bytes"] / 1e6, 2)
    if "fp16" in emulation:
        row["fp16_emulation_s_per_frame"] = round(emulation["fp16"]["mean_s_per_frame"], 1)
        row["fp16_full_htp"] = report["fp16_baseline"]["full_htp"]
    row["note"] = "host emulation of the NPU on this x86 CPU; NOT device latency"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/htp_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=tuple(MODELS))
    parser.add_argument("--ptq", type=Path, default=None, help="an existing ptq folder (default: build one)")
    parser.add_argument("--frames", type=int, default=2, help="held-out images emulated (default 2)")
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp32-in-fp16 baseline")
    parser.add_argument("--calib-images", type=int, default=8, help="calibration images of the quick ptq (default 8)")
    parser.add_argument("--out", type=Path, default=build_dir("bench", "htp"))
    args = parser.parse_args(argv)
    timings: dict = {}
    ptq_dir = args.ptq
    if ptq_dir is None:
        ptq_dir, timings = ensure_ptq(args.model, args.out, args.calib_images, holdout=max(args.frames, 1))
    row = {**bench(args.model, ptq_dir, args.frames, args.fp16, args.out), **timings}
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
