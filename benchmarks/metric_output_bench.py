"""How a metric model's output is brought into the contract's [0, 1]: divided by its per-sample
maximum (what the wrapper does) or by the model's max_depth, scored on the shared RGB-D frames.

    python benchmarks/metric_output_bench.py [--model depth_anything_v2_metric_hypersim_vits]
        [--weights None] [--input-size 196x252] [--data ../shared/data/rgbd]

Both are a pure per-image scale of the same metric map, which the scorer's median scaling removes:
their F-scores must agree in float. The table also shows the share of [0, 1] each one uses, which is
what an 8-bit output grid has to resolve. With --weights None (random init, the default here, since
the official checkpoints cannot be downloaded offline) the numbers test the plumbing only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from lpcv_depth.models import create_model
from lpcv_depth.options import parse_size
from lpcv_depth.report import markdown_table
from lpcv_depth.rgbd import load_rgbd_dataset
from lpcv_depth.stages.export import parse_weights
from lpcv_depth.track3_metric import FSCORE, score_frame

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "rgbd"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="depth_anything_v2_metric_hypersim_vits")
    parser.add_argument("--weights", type=parse_weights, default=None)
    parser.add_argument("--input-size", type=parse_size, default=(196, 252))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    model = create_model(args.model, weights=args.weights, input_size=args.input_size)
    max_depth = model.spec.max_depth
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for frame in load_rgbd_dataset(args.data):
        gt = frame.load_ground_truth()
        with torch.no_grad():
            per_sample = model(torch.from_numpy(frame.load_image()[None]))[0, 0].numpy()
        # The wrapper divided the metric map by its maximum; undo that with the maximum it used.
        metric = per_sample * _raw_maximum(model, frame)
        by_max_depth = metric / max_depth
        rows.setdefault(frame.set_name, []).append((
            score_frame(per_sample, gt.depth, gt.conf)[FSCORE], score_frame(by_max_depth, gt.depth, gt.conf)[FSCORE],
            float(per_sample.max() - per_sample.min()), float(by_max_depth.max() - by_max_depth.min())))
    table = [[name, str(len(v)), *(f"{x:.2f}" for x in np.mean(v, axis=0))] for name, v in rows.items()]
    print(markdown_table(["set", "frames", "F@0.1 / per-sample max", "F@0.1 / max_depth",
                          "range used, per-sample max", "range used, / max_depth"], table, align="lrrrrr"), end="")
    return 0


def _raw_maximum(model, frame) -> float:
    """The metric map's maximum over the frame, as the wrapper saw it before dividing."""
    with torch.no_grad():
        image = torch.from_numpy(frame.load_image()[None])
        x = (image - model.pixel_mean) / model.pixel_std
        x = torch.nn.functional.interpolate(x, size=model.input_size, mode="bilinear", align_corners=False)
        raw = torch.nn.functional.interpolate(model.backbone(x), size=(480, 640), mode="bilinear",
                                              align_corners=False)
    return float(raw.max())


if __name__ == "__main__":
    sys.exit(main())
