"""PTQ benchmark: wall time and peak memory of `lpcv-depth ptq` (run as `quantize/ptq.py`), and int8 fidelity.

    python benchmarks/ptq_bench.py fastdepth     # real weights: F-score drop w8a8 vs fp32 on every shared RGB-D set
    python benchmarks/ptq_bench.py fastdepth --ptq-args "--calibration-scheme tf-enhanced" --out build/bench/tfe
    python benchmarks/ptq_bench.py vits          # DA-V2 ViT-S, random weights, full size, 64 calibration images
    python benchmarks/ptq_bench.py vits --vs-ort # the same PTQ, then ONNX Runtime's quantize_static on the same data
    python benchmarks/ptq_bench.py vits --trial  # the same PTQ again with a search trial's checks; artifacts compared

Each stage runs in its own process, so its peak RSS is its own (os.wait4). The figures measured
with it are in docs/ptq.md ("Measurements") and docs/history/ptq-speed.md.
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
from typing import Sequence

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


def linked(paths, folder: Path) -> Path:
    """`folder` holding a symlink to each of `paths` under its own name (nothing is copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    return folder


def calibration_subset(count: int, folder: Path) -> Path:
    """The first `count` calibration photos plus 8 more held out, as symlinks."""
    return linked(sorted(CALIBRATION.glob("*.jpg"))[:count + 8], folder)


def bench_vits(out: Path, num_calib: int, vs_ort: bool = False, ptq_args: Sequence[str] = (),
               trial: bool = False) -> dict:
    export_dir, ptq_dir = out / "vits-export", out / "vits-ptq"
    export_wall, export_rss = run_stage(["-m", "lpcv_depth.cli", "export", "--weights", "None", "--out", str(export_dir),
                                         "--check-images", str(CALIBRATION)])
    calib = calibration_subset(num_calib, out / f"calib{num_calib}")
    ptq = ["-m", "lpcv_depth.cli", "ptq", "--calib", str(calib), "--fp32", str(export_dir), *ptq_args]
    wall, rss = run_stage([*ptq, "--out", str(ptq_dir)])
    report = json.loads((ptq_dir / "report.json").read_text())
    result = {"model": "depth_anything_v2_vits (random weights)", "calibration_images": num_calib,
              "ptq_args": list(ptq_args),
              "export_wall_s": round(export_wall, 1), "export_peak_rss_gib": round(export_rss, 2),
              "ptq_wall_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2),
              "ptq_steps_s": {name: round(seconds, 1) for name, seconds in _step_timings(ptq_dir).items()},
              "int8_vs_fp32_sqnr_db": round(report["int8_vs_fp32"]["sqnr_db"], 2),
              "fscore_vs_fp32": round(report["int8_vs_fp32"]["fscore_vs_fp32"], 2),
              "qdq_vs_sim_sqnr_db": round(report["qdq_vs_aimet_sim"]["sqnr_db"], 2)}
    if trial:
        result["search_trial"] = bench_trial(ptq, ptq_dir, out / "vits-ptq-trial")
    if vs_ort:
        result["ort_quantize_static"] = bench_ort_static(export_dir / "model.onnx", calib, out / "vits-ort")
        ort = result["ort_quantize_static"]
        result["ptq_vs_ort_wall_ratio"] = round(wall / ort["wall_s"], 2)
        result["ptq_vs_ort_call_ratio"] = round(wall / ort["quantize_static_s"], 2)
        if trial:
            result["search_trial"]["ptq_vs_ort_call_ratio"] = round(
                result["search_trial"]["ptq_wall_s"] / ort["quantize_static_s"], 2)
    return result


def bench_trial(ptq: list[str], full_dir: Path, trial_dir: Path) -> dict:
    """The same PTQ with the checks a search trial runs (search's TRIAL_PTQ_CHECKS), and whether its
    int8 artifacts are byte-identical to the full stage's."""
    from lpcv_depth.options import flag_name
    from lpcv_depth.stages.search import TRIAL_PTQ_CHECKS

    checks = [text for name, value in TRIAL_PTQ_CHECKS.items() for text in (flag_name(name), str(value))]
    wall, rss = run_stage([*ptq, *checks, "--out", str(trial_dir)])
    artifacts = [path.relative_to(full_dir) for path in sorted(full_dir.rglob("*"))
                 if path.suffix in (".onnx", ".encodings")]
    return {"ptq_args": checks, "ptq_wall_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2),
            "ptq_steps_s": {name: round(seconds, 1) for name, seconds in _step_timings(trial_dir).items()},
            "int8_artifacts_identical_to_full_stage": {
                path.as_posix(): (full_dir / path).read_bytes() == (trial_dir / path).read_bytes()
                for path in artifacts}}


def _step_timings(stage_dir: Path) -> dict[str, float]:
    return json.loads((stage_dir / "manifest.json").read_text())["timings_s"]


def bench_ort_static(fp32_onnx: Path, calib: Path, out: Path) -> dict:
    """ONNX Runtime's own static PTQ as the yardstick: min-max, per-channel int8 weights, uint8
    activations, QDQ, on the PTQ stage's calibration split; in its own process like the stage, and
    scored on the same held-out images against the same fp32 ONNX."""
    out.mkdir(parents=True, exist_ok=True)
    qdq = out / "model_ort_qdq.onnx"
    wall, rss = run_stage([__file__, "_ort-static", str(fp32_onnx), str(calib), str(qdq)])
    timing = json.loads((out / "timing.json").read_text())
    return {"settings": "quantize_static: MinMax, per_channel, QDQ, uint8 activations, int8 weights",
            "wall_s": round(wall, 1), "quantize_static_s": round(timing["quantize_static_s"], 1),
            "peak_rss_gib": round(rss, 2), "int8_vs_fp32_sqnr_db": round(timing["int8_vs_fp32_sqnr_db"], 2)}


def _ort_static(fp32_onnx: Path, calib: Path, qdq: Path) -> None:
    """The child process of bench_ort_static."""
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from lpcv_depth.calibration import iter_batches, split_calibration_folder
    from lpcv_depth.verify import OrtRunner, sqnr_db

    # The PTQ stage's own split (its --holdout default), so both calibrate and score on the same images.
    split = split_calibration_folder(calib, num_calibration=None, num_holdout=8, min_images=1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter_batches(split.calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    qdq.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quantize_static(str(fp32_onnx), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    seconds = time.perf_counter() - start
    holdout = np.concatenate(list(iter_batches(split.holdout)))
    sqnr = sqnr_db(OrtRunner(fp32_onnx).run(holdout), OrtRunner(qdq).run(holdout))
    (qdq.parent / "timing.json").write_text(json.dumps({"quantize_static_s": seconds, "int8_vs_fp32_sqnr_db": sqnr}))


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
    if sys.argv[1:2] == ["_ort-static"]:
        _ort_static(*map(Path, sys.argv[2:5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("fastdepth", "vits"))
    parser.add_argument("--num-calib", type=int, default=64)
    parser.add_argument("--out", type=Path, default=build_dir("bench", "ptq"))
    parser.add_argument("--ptq-args", default="", help='extra ptq.py flags, e.g. "--preset mixed"')
    parser.add_argument("--trial", action="store_true",
                        help="vits: also run the PTQ with a search trial's checks and compare the int8 artifacts")
    parser.add_argument("--vs-ort", action="store_true",
                        help="vits: also time ONNX Runtime's quantize_static (min-max, per-channel, QDQ) on the "
                             "same model and images, and print the wall-time ratio and both SQNRs")
    args = parser.parse_args()
    if args.which == "fastdepth":
        result = bench_fastdepth(args.out, args.ptq_args.split())
    else:
        result = bench_vits(args.out, args.num_calib, args.vs_ort, args.ptq_args.split(), args.trial)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
