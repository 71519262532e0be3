"""QAT benchmark: what `lpcv-depth qat` recovers over its ptq start, its time per epoch and peak memory.

    python benchmarks/qat_bench.py fastdepth                  # real weights, w8a8: F-score drop vs fp32, PTQ vs PTQ+QAT
    python benchmarks/qat_bench.py fastdepth --losses si-log,si-log-grad   # the loss choice (docs/qat.md)
    python benchmarks/qat_bench.py fastdepth --preset w4a8    # 4-bit weights: a start with a real drop
    python benchmarks/qat_bench.py fastdepth --preset w4a8 --more-photos --epochs 4 --qat-args "--lr 3e-4"
    python benchmarks/qat_bench.py vits --num-calib 16 --epochs 1   # DA-V2 ViT-S, random weights: held-out SQNR

FastDepth is scored against ground truth on the shared RGB-D sets that do not overlap the training
photos (calibration_indoor is the hololens_dev walk-through, so hololens_dev is left out). Each stage
runs in its own process, so its peak RSS is its own (os.wait4). Figures: docs/qat.md ("Measurements").
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq_bench import CALIBRATION, RGBD, calibration_subset, linked, run_stage  # noqa: E402

from lpcv_depth.workspace import build_dir  # noqa: E402

# calibration_indoor is taken from the hololens_dev walk-through: not unseen data for a model trained on it.
TRAINING_OVERLAP = ("hololens_dev",)


def unseen_rgbd(folder: Path) -> Path:
    """A folder of the RGB-D sets the training photos do not overlap, as symlinks."""
    return linked(sorted(p for p in RGBD.iterdir() if p.is_dir() and p.name not in TRAINING_OVERLAP), folder)


def _cli(*args: str | Path) -> list[str]:
    return ["-m", "lpcv_depth.cli", *map(str, args)]


def _results(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["results"]


def unseen_fidelity(fp32_onnx: Path, qdq_onnx: Path, eval_data: Path) -> dict:
    """The int8 model against fp32 on the unseen RGB-D frames' photos (not their ground truth): the
    F-score vs fp32 and the scale-aligned SQNR, as ptq measures them on its held-out photos."""
    from lpcv_depth.rgbd import load_rgbd_dataset
    from lpcv_depth.verify import OrtRunner, output_fidelity

    photos = np.stack([frame.load_image() for frame in load_rgbd_dataset(eval_data)])
    fp32, int8 = OrtRunner(fp32_onnx).run(photos), OrtRunner(qdq_onnx).run(photos)
    measured = output_fidelity(fp32, int8, scale_aligned=True)
    return {"frames": len(photos), "fscore_vs_fp32": round(measured.fscore, 2),
            "sqnr_db_scale_aligned": round(measured.sqnr_db_scale_aligned, 2)}


def _qat(ptq_dir: Path, out: Path, qat_args: list[str]) -> dict:
    wall, rss = run_stage(_cli("qat", "--ptq", ptq_dir, "--out", out, *qat_args))
    results = _results(out)
    training = results["training"]
    summary = {"qat_args": qat_args, "qat_wall_s": round(wall, 1), "qat_peak_rss_gib": round(rss, 2),
               "epochs_done": training["epochs_done"], "best_epoch": training["best_epoch"],
               "train_images": training["train_images"],
               "seconds_per_epoch": [round(e["seconds"], 1) for e in training["history"]],
               "holdout_sim_sqnr_db_scale_aligned": {"ptq": round(training["start_holdout_sqnr_db"], 2),
                                                     "qat": round(training["best_holdout_sqnr_db"], 2)},
               "int8_vs_fp32": {key: {"ptq": round(results["ptq_int8_vs_fp32"][key], 2),
                                      "qat": round(results["int8_vs_fp32"][key], 2)}
                                for key in ("sqnr_db", "sqnr_db_scale_aligned", "fscore_vs_fp32")}}
    if results.get("ground_truth"):
        ptq_gt, qat_gt = results["ptq_ground_truth"], results["ground_truth"]
        summary["ground_truth"] = {
            "frames": qat_gt["frames"], "fp32_fscore": round(qat_gt["fp32"]["fscore@0.1"], 2),
            "ptq_fscore": round(ptq_gt["int8"]["fscore@0.1"], 2), "qat_fscore": round(qat_gt["int8"]["fscore@0.1"], 2),
            "ptq_drop": round(ptq_gt["fscore_drop"], 2), "qat_drop": round(qat_gt["fscore_drop"], 2)}
    return summary


def remaining_photos(num_calib: int, folder: Path) -> Path:
    """The calibration_indoor photos after ptq's calibration and held-out ones, as symlinks: --train-images."""
    return linked(sorted(CALIBRATION.glob("*.jpg"))[num_calib + 8:], folder)


def bench_fastdepth(out: Path, preset: str, num_calib: int, losses: list[str], qat_args: list[str],
                    more_photos: bool) -> dict:
    export_dir, ptq_dir = out / "fastdepth-export", out / f"fastdepth-ptq-{preset}"
    if not (export_dir / "manifest.json").is_file():
        run_stage(_cli("export", "--model", "fastdepth", "--weights", "default", "--out", export_dir,
                       "--check-images", CALIBRATION))
    calib = calibration_subset(num_calib, out / f"calib{num_calib}")
    eval_data = unseen_rgbd(out / "rgbd-unseen")
    wall, rss = run_stage(_cli("ptq", "--calib", calib, "--fp32", export_dir, "--preset", preset, "--eval-data",
                               eval_data, "--min-calib", min(num_calib, 32), "--out", ptq_dir))
    result = {"model": "fastdepth (real weights)", "preset": preset, "calibration_images": num_calib,
              "eval_sets": sorted(p.name for p in eval_data.iterdir()), "ptq_wall_s": round(wall, 1),
              "ptq_peak_rss_gib": round(rss, 2),
              "unseen_photos_vs_fp32": {"ptq": unseen_fidelity(export_dir / "model.onnx", ptq_dir / "model_qdq.onnx",
                                                               eval_data)}, "qat": {}}
    if more_photos:
        qat_args = [*qat_args, "--train-images", str(remaining_photos(num_calib, out / f"rest{num_calib}"))]
    for loss in losses:
        qat_dir = out / f"fastdepth-qat-{preset}-{loss}"
        result["qat"][loss] = _qat(ptq_dir, qat_dir, ["--loss", loss, *qat_args])
        result["unseen_photos_vs_fp32"][loss] = unseen_fidelity(export_dir / "model.onnx", qat_dir / "model_qdq.onnx",
                                                                eval_data)
    return result


def bench_vits(out: Path, num_calib: int, qat_args: list[str]) -> dict:
    export_dir, ptq_dir = out / "vits-export", out / "vits-ptq-w8a8"
    if not (export_dir / "manifest.json").is_file():
        run_stage(_cli("export", "--weights", "None", "--out", export_dir, "--check-images", CALIBRATION))
    calib = calibration_subset(num_calib, out / f"calib{num_calib}")
    wall, rss = run_stage(_cli("ptq", "--calib", calib, "--fp32", export_dir, "--min-calib", min(num_calib, 32),
                               "--latency-runs", 0, "--out", ptq_dir))
    return {"model": "depth_anything_v2_vits (random weights)", "preset": "w8a8", "calibration_images": num_calib,
            "ptq_wall_s": round(wall, 1), "ptq_peak_rss_gib": round(rss, 2),
            "qat": _qat(ptq_dir, out / "vits-qat-w8a8", qat_args)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("fastdepth", "vits"))
    parser.add_argument("--preset", default="w8a8", help="fastdepth: the ptq preset QAT starts from")
    parser.add_argument("--num-calib", type=int, default=32, help="calibration (= training) photos; 8 more held out")
    parser.add_argument("--losses", default="si-log", help="fastdepth: comma-separated qat --loss values, each "
                                                           "trained from the same ptq folder")
    parser.add_argument("--more-photos", action="store_true",
                        help="fastdepth: also train on the calibration_indoor photos after the calibration and "
                             "held-out ones (--train-images)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--qat-args", default="", help='extra qat flags, e.g. "--lr 5e-5 --no-freeze-encodings"')
    parser.add_argument("--out", type=Path, default=build_dir("bench", "qat"))
    args = parser.parse_args()
    qat_args = ["--epochs", str(args.epochs), *args.qat_args.split()]
    if args.which == "fastdepth":
        result = bench_fastdepth(args.out, args.preset, args.num_calib, args.losses.split(","), qat_args,
                                 args.more_photos)
    else:
        result = bench_vits(args.out, args.num_calib, qat_args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
