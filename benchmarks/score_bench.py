"""Track 3 metric benchmark: seconds to score one 640x480 frame, and the exhaustive search it replaces.

    python benchmarks/score_bench.py [--cores 2] [--repeats 5] [--data ../shared/data/rgbd]

Scores real frames (HoloLens, Kinect, iPhone LiDAR GT brought to 640x480) against real FastDepth
predictions, on both pixel grids and with 1 and all neighbour-search workers. `--cores N` pins the
process to N cores, so "on 2 cores" means the same on a bigger machine. For comparison it times an
exhaustive exact nearest-neighbour search (cKDTree without eps) on the same point clouds and checks
that it gives the same F-scores. Wall times depend on what else the machine runs: the load average
is printed with them. Last results: docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

# The benchmark data sits beside the checkout (../shared).
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "rgbd"
FRAMES = ("hololens_dev/holo_00003", "kinect_home/home_1", "iphone_lidar/iphone_0")


def _median_seconds(function, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds (CPU: all threads of the process) of `repeats` calls, and a result."""
    wall, cpu, value = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu)), value


def _exhaustive_fscores(pred, gt, conf, scale: float, grid: str, workers: int) -> dict[str, float]:
    """F-scores from exact nearest-neighbour distances of every point, the search `score_frame` avoids."""
    from lpcv_depth.track3_metric import (F_THRESHOLDS_M, KDTREE_OPTIONS, OFFICIAL_K, backproject, evaluation_masks,
                                          fscores)

    pixels = np.flatnonzero(evaluation_masks(gt, conf)[1])
    pred_points = backproject(pred * scale, OFFICIAL_K, grid, pixels)
    gt_points = backproject(gt, OFFICIAL_K, grid, pixels)
    pred_to_gt = cKDTree(gt_points, **KDTREE_OPTIONS).query(pred_points, workers=workers)[0]
    gt_to_pred = cKDTree(pred_points, **KDTREE_OPTIONS).query(gt_points, workers=workers)[0]
    return fscores(np.stack([pred_to_gt < t for t in F_THRESHOLDS_M]),
                   np.stack([gt_to_pred < t for t in F_THRESHOLDS_M]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=None, help="pin this process to the first N cores (Linux)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    cores = len(os.sched_getaffinity(0))

    import torch

    from lpcv_depth.rgbd import load_rgbd_dataset
    from lpcv_depth.track3_metric import FSCORE, POINT_METRICS, score_frame
    from lpcv_depth.models import create_model

    torch.set_num_threads(1)
    model = create_model("fastdepth", weights="default")
    frames = {frame.name: frame for frame in load_rgbd_dataset(args.data)}
    print(f"{cores} core(s) available to this process, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats} runs. CPU s sums all threads; with 1 worker it is what the wall time "
          "would be on an idle machine.")
    print("| frame | grid | points | workers | score_frame wall s | score_frame CPU s | exhaustive NN wall s "
          "| F@0.1 | same F |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in FRAMES:
        frame = frames[name]
        gt = frame.load_ground_truth()
        with torch.no_grad():
            pred = model(torch.from_numpy(frame.load_image()[None])).numpy()[0, 0]
        for grid in ("official", "xy"):
            for workers in sorted({1, cores}):
                wall, cpu, result = _median_seconds(
                    lambda: score_frame(pred, gt.depth, gt.conf, grid=grid, workers=workers), args.repeats)
                exhaustive_wall, _, exhaustive = _median_seconds(
                    lambda: _exhaustive_fscores(pred, gt.depth, gt.conf, result["median_scale"], grid, workers), 1)
                same = all(result[key] == exhaustive[key] for key in POINT_METRICS)
                print(f"| {name} | {grid} | {result['n_points']} | {workers} | {wall:.3f} | {cpu:.3f} | "
                      f"{exhaustive_wall:.3f} | {result[FSCORE]:.2f} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
