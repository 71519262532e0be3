"""How far ground-truth holes bias the official median scaling, per shared RGB-D set.

    python benchmarks/ceiling_bench.py [--data ../shared/data/rgbd]

Per set: the mean share of invalid GT pixels, and the ceiling, the F@0.1 of the ground truth itself
(holes filled with the median of the valid depth), under --median all (the organizers' metric) and
--median valid. Prints a markdown table; docs/evaluate.md quotes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lpcv_depth.report import markdown_table
from lpcv_depth.rgbd import load_rgbd_dataset
from lpcv_depth.track3_metric import ceiling_fscore

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "rgbd"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    per_set: dict[str, list[tuple[float, float, float]]] = {}
    for frame in load_rgbd_dataset(args.data):
        gt = frame.load_ground_truth()
        row = (float(np.mean(gt.depth <= 0)), ceiling_fscore(gt.depth, gt.conf, median="all"),
               ceiling_fscore(gt.depth, gt.conf, median="valid"))
        per_set.setdefault(frame.set_name, []).append(row)
    rows = [[name, str(len(values)), *(f"{v:.1f}" for v in np.mean(values, axis=0) * [100, 1, 1])]
            for name, values in per_set.items()]
    print(markdown_table(["set", "frames", "GT invalid (%)", "ceiling, --median all", "ceiling, --median valid"],
                         rows, align="lrrrr"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
