"""Export benchmark: wall time and peak memory of the export stage, ONNX Runtime fp32 host latency
and MACs, for Depth-Anything-V2 ViT-S (random weights; the real ones cannot be downloaded here)
and FastDepth (real weights from ../shared).

    python benchmarks/export_bench.py [--runs 20] [--out build/bench/export]

Each export runs in its own process so its peak RSS is its own. Host latency is a sanity figure
for this x86 CPU, not the phone's: the Galaxy S24 figure comes from an AI Hub profile job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

from lpcv_depth.report import markdown_table
from lpcv_depth.workspace import build_dir

# The benchmark data sits beside the checkout (../shared), not in the workspace.
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FASTDEPTH_TFLITE = SHARED / "weights" / "fastdepth" / "fast_depth_224.tflite"
CHECK_IMAGES = SHARED / "data" / "calibration_indoor"


def _cases() -> list[tuple[str, str]]:
    cases = [("depth_anything_v2_vits", "None")]
    if FASTDEPTH_TFLITE.is_file():
        cases.append(("fastdepth", str(FASTDEPTH_TFLITE)))
    else:
        print(f"skipping fastdepth: {FASTDEPTH_TFLITE} not found", file=sys.stderr)
    return cases


def _export(model: str, weights: str, out: Path) -> tuple[float, float]:
    """Run the export CLI in a child process; returns (wall seconds, peak RSS in GiB)."""
    command = [sys.executable, "-m", "lpcv_depth.cli", "export", "--model", model, "--weights", weights,
               "--out", str(out)]
    if CHECK_IMAGES.is_dir():
        command += ["--check-images", str(CHECK_IMAGES)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        # wait4 gives this child's own rusage, so each model's peak RSS is its own.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"export of {model} failed:\n{log.read()}")
    peak_gib = usage.ru_maxrss / 2**20
    return wall, peak_gib


def _ort_latency_ms(onnx_path: Path, runs: int) -> float:
    from lpcv_depth.verify import OrtRunner

    image = np.random.default_rng(0).uniform(0, 255, (1, 3, 480, 640)).astype(np.float32)
    return OrtRunner(onnx_path).median_latency_ms(image, runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=build_dir("bench", "export"))
    args = parser.parse_args()
    rows = []
    for model, weights in _cases():
        out = args.out / model
        wall, peak = _export(model, weights, out)
        manifest = json.loads((out / "manifest.json").read_text())
        results = manifest["results"]
        rows.append({
            "model": model, "weights": results["weights"]["source"], "export_wall_s": round(wall, 1),
            "export_peak_rss_gib": round(peak, 2), "gmacs": round(results["macs"] / 1e9, 2),
            "params_m": round(results["params"] / 1e6, 2), "onnx_mb": round(results["onnx_bytes"] / 1e6, 1),
            "nodes": f"{results['nodes_exported']}->{results['nodes_simplified']}",
            "ort_fp32_median_ms": round(_ort_latency_ms(out / "model.onnx", args.runs), 1),
        })
    header = list(rows[0])
    print(markdown_table(header, [[str(row[h]) for h in header] for row in rows]), end="")
    print(f"(ORT latency: median of {args.runs} runs, batch 1, CPU EP, this host; not device latency)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
