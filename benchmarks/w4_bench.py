"""4-bit weight presets against w8a8 on the real FastDepth: the PTQ baselines of 4-bit weights.

    python benchmarks/w4_bench.py                                   # w8a8, w4a8, w4a16; all 120 photos
    python benchmarks/w4_bench.py --presets w4a8 --ptq-args "--seq-mse"
    python benchmarks/w4_bench.py --ptq-args "--holdout 4 --no-cle --num-calib 16 --min-calib 8"   # quick

Exports FastDepth once (../shared weights), then per preset runs `lpcv-depth ptq --eval-data
../shared/data/rgbd` in its own process and prints: int8 vs fp32 SQNR on the held-out photos (plain
and scale-aligned), the F-score with fp32 as reference, the F-score against ground truth of fp32 and
of the quantized model on all shared RGB-D frames and per set (drop = fp32 - quantized), the weights
kept at 8 bits, ptq's wall time and peak RSS, and the HTP coverage (the htp-check stage's compile
with CPU fallback disabled, numerics off; where the qnn extra is installed). The figures are in
docs/ptq.md ("4-bit weights").
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onnx_route_bench import FASTDEPTH_WEIGHTS, htp_coverage
from ptq_bench import CALIBRATION, RGBD, run_stage

from lpcv_depth.report import markdown_table
from lpcv_depth.workspace import build_dir


def per_set_drops(export_dir: Path, ptq_dir: Path) -> dict:
    """F-score drop vs fp32 on each shared RGB-D set, scored as `ptq --eval-data` scores."""
    from lpcv_depth.stages.ptq import score_against_ground_truth

    drops = {}
    for dataset in sorted(p for p in RGBD.iterdir() if p.is_dir()):
        truth = score_against_ground_truth(dataset, export_dir / "model.onnx", ptq_dir / "model_qdq.onnx",
                                           ptq_dir / "bench-eval" / dataset.name)
        drops[dataset.name] = round(truth.fscore_drop, 2)
    return drops


def bench_preset(preset: str, export_dir: Path, out: Path, ptq_args: list[str], coverage: bool) -> dict:
    ptq_dir = out / f"ptq-{preset}"
    wall, rss = run_stage(["-m", "lpcv_depth.cli", "ptq", "--fp32", str(export_dir), "--out", str(ptq_dir),
                           "--preset", preset, "--calib", str(CALIBRATION), "--eval-data", str(RGBD), *ptq_args])
    manifest = json.loads((ptq_dir / "manifest.json").read_text())
    results = manifest["results"]
    fidelity, truth = results["int8_vs_fp32"], results["ground_truth"]
    row = {"preset": preset, "opset": manifest["config"]["opset"],
           "weights_kept_8bit": results["techniques"].get("weights_kept_8bit", {}).get("layers", []),
           "sqnr_db": round(fidelity["sqnr_db"], 2), "sqnr_db_scale_aligned": round(fidelity["sqnr_db_scale_aligned"], 2),
           "fscore_vs_fp32": round(fidelity["fscore_vs_fp32"], 2),
           "qdq_vs_aimet_sim_db": round(results["qdq_vs_aimet_sim"]["sqnr_db"], 2),
           "fscore_fp32": round(truth["fp32"]["fscore@0.1"], 2), "fscore_quantized": round(truth["int8"]["fscore@0.1"], 2),
           "fscore_drop": round(truth["fscore_drop"], 2), "drop_per_set": per_set_drops(export_dir, ptq_dir),
           "ptq_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2)}
    if coverage:
        row.update(htp_coverage(ptq_dir))
    return row


def table(rows: list[dict]) -> str:
    sets = list(rows[0]["drop_per_set"]) if rows else []
    header = ["preset", "SQNR vs fp32 (scale-aligned)", "F-score vs fp32", "GT F-score fp32 / quantized (drop)",
              f"drop per set ({' / '.join(sets)})", "HTP coverage", "ptq"]
    body = []
    for row in rows:
        htp = (f"all {row['htp_nodes']} nodes" if row.get("htp_full") else
               f"{row.get('htp_nodes')} HTP, {row.get('htp_cpu_nodes')} CPU" if "htp_nodes" in row else
               row.get("htp_coverage", "-"))
        body.append([row["preset"], f"{row['sqnr_db']:.2f} dB ({row['sqnr_db_scale_aligned']:.2f} dB)",
                     f"{row['fscore_vs_fp32']:.2f}",
                     f"{row['fscore_fp32']:.2f} / {row['fscore_quantized']:.2f} ({row['fscore_drop']:.2f})",
                     " / ".join(f"{v:.2f}" for v in row["drop_per_set"].values()), htp, f"{row['ptq_s']:.0f} s"])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="w8a8,w4a8,w4a16")
    parser.add_argument("--weights", type=Path, default=FASTDEPTH_WEIGHTS)
    parser.add_argument("--ptq-args", default="", help="more ptq flags, the same for every preset")
    parser.add_argument("--no-htp", action="store_true", help="skip the HTP coverage")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or build_dir("bench", "w4")
    out.mkdir(parents=True, exist_ok=True)
    export_dir = out / "export"
    run_stage(["-m", "lpcv_depth.cli", "export", "--model", "fastdepth", "--weights", str(args.weights),
               "--out", str(export_dir), "--check-images", str(CALIBRATION)])
    rows = [bench_preset(preset, export_dir, out, shlex.split(args.ptq_args), not args.no_htp)
            for preset in args.presets.split(",")]
    print(json.dumps({"model": "fastdepth (real weights)", "ptq_args": args.ptq_args, "presets": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
