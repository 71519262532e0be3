"""PTQ benchmark: wall time and peak memory of `lpcv-depth ptq` (run as `quantize/ptq.py`), and int8 fidelity.

    python benchmarks/ptq_bench.py fastdepth     # real weights: F-score drop w8a8 vs fp32 on every shared RGB-D set
    python benchmarks/ptq_bench.py fastdepth --ptq-args "--calibration-scheme tf-enhanced" --out build/bench/tfe
    python benchmarks/ptq_bench.py vits          # DA-V2 ViT-S, random weights, full size, 64 calibration images

Each stage runs in its own process, so its peak RSS is its own (os.wait4). The figures measured
with it are in docs/ptq.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lpcv_depth.workspace import build_dir

# The benchmark data sits beside the checkout (../shared); outputs go to the workspace.
SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
CALIBRATION = SHARED / "data" / "calibration_indoor"
RGBD = SHARED / "data" / "rgbd"


def run_stage(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one stage CLI run; exits on failure with its log."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{text[-4000:]}")
    return wall, usage.ru_maxrss / 2**20


def calibration_subset(count: int, folder: Path) -> Path:
    """The first `count` calibration photos plus 8 more held out, as symlinks (nothing is copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(CALIBRATION.glob("*.jpg"))[:count + 8]:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    return folder


def bench_vits(out: Path, num_calib: int) -> dict:
    export_dir, ptq_dir = out / "vits-export", out / "vits-ptq"
    export_wall, export_rss = run_stage(["-m", "lpcv_depth.cli", "export", "--weights", "None", "--out", str(export_dir),
                                         "--check-images", str(CALIBRATION)])
    calib = calibration_subset(num_calib, out / f"calib{num_calib}")
    wall, rss = run_stage(["-m", "lpcv_depth.cli", "ptq", "--calib", str(calib), "--fp32", str(export_dir), "--out", str(ptq_dir)])
    report = json.loads((ptq_dir / "report.json").read_text())
    return {"model": "depth_anything_v2_vits (random weights)", "calibration_images": num_calib,
            "export_wall_s": round(export_wall, 1), "export_peak_rss_gib": round(export_rss, 2),
            "ptq_wall_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2),
            "int8_vs_fp32_sqnr_db": round(report["int8_vs_fp32"]["sqnr_db"], 2),
            "fscore_vs_fp32": round(report["int8_vs_fp32"]["fscore_vs_fp32"], 2),
            "qdq_vs_sim_sqnr_db": round(report["qdq_vs_aimet_sim"]["sqnr_db"], 2)}


def bench_fastdepth(out: Path, ptq_args: list[str]) -> dict:
    from lpcv_depth.stages.ptq import score_against_ground_truth

    export_dir, ptq_dir = out / "fastdepth-export", out / "fastdepth-ptq"
    run_stage(["-m", "lpcv_depth.cli", "export", "--model", "fastdepth", "--weights", "default", "--out", str(export_dir),
               "--check-images", str(CALIBRATION)])
    wall, rss = run_stage(["-m", "lpcv_depth.cli", "ptq", "--calib", str(CALIBRATION), "--fp32", str(export_dir),
                           "--out", str(ptq_dir), *ptq_args])
    per_set = {}
    for dataset in sorted(p for p in RGBD.iterdir() if p.is_dir()):
        # The same scoring as `ptq --eval-data`: both models through the evaluate stage.
        gt = score_against_ground_truth(dataset, export_dir / "model.onnx", ptq_dir / "model_qdq.onnx",
                                        out / "eval" / dataset.name)
        per_set[dataset.name] = {"fp32_fscore": round(gt.fp32["fscore@0.1"], 2),
                                 "int8_fscore": round(gt.int8["fscore@0.1"], 2), "drop": round(gt.fscore_drop, 2),
                                 "fp32_abs_rel": round(gt.fp32["abs_rel"], 4),
                                 "int8_abs_rel": round(gt.int8["abs_rel"], 4)}
    report = json.loads((ptq_dir / "report.json").read_text())
    return {"model": "fastdepth (real weights)", "ptq_args": ptq_args, "ptq_wall_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2),
            "int8_vs_fp32_sqnr_db": round(report["int8_vs_fp32"]["sqnr_db"], 2), "per_set": per_set}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("fastdepth", "vits"))
    parser.add_argument("--num-calib", type=int, default=64)
    parser.add_argument("--out", type=Path, default=build_dir("bench", "ptq"))
    parser.add_argument("--ptq-args", default="", help='extra ptq.py flags for fastdepth, e.g. "--preset mixed"')
    args = parser.parse_args()
    if args.which == "fastdepth":
        result = bench_fastdepth(args.out, args.ptq_args.split())
    else:
        result = bench_vits(args.out, args.num_calib)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
