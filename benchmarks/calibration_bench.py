"""Calibration forward benchmark: DA-V2 ViT-S (random weights, full size) calibrated twice at once,
with AIMET's passthrough copy of every activation and without the copies of fresh outputs
(`calibration_without_output_copies`), alternating image by image in one process so that the
host's drift falls on both alike; prints the median seconds per image of each and whether their
encodings are the same bits.

    python benchmarks/calibration_bench.py              # 24 images, 11 timed per side
    python benchmarks/calibration_bench.py --images 40
    python benchmarks/calibration_bench.py --thread-scaling   # float and calibration forwards, 1 vs 2 threads

The figures measured with it are in docs/history/ptq-speed.md ("Fifth pass", "Seventh pass").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ptq_bench import CALIBRATION, calibration_subset, run_stage

from lpcv_depth.workspace import build_dir


def build_sims(export_dir: Path, calib: Path, count: int, sims: int = 2):
    """QuantSims of the same float model, built as the PTQ stage builds its own, the float model
    itself (QuantSim works on its own copy) and the images."""
    from lpcv_depth.stage import StageLog
    from lpcv_depth.stages import ptq

    config = ptq.PtqConfig(calib=calib, fp32=export_dir, out=export_dir.parent / "unused", min_calib=4)
    start = ptq.prepare_float_model(config, StageLog("calibration-bench"))
    built = [ptq.build_quantsim(config, start.model, start.inputs.dummy, start.tail)[0] for _ in range(sims)]
    return built, start.model, start.inputs.calibration_batches[:count]


def alternate(copying, uncopied, batches) -> dict:
    """Both sims calibrate on the same images, one forward each per image, in turn."""
    import torch

    from lpcv_depth.backends.aimet_fast import calibration_without_output_copies, fast_quantize_dequantize

    seconds: dict[str, list[float]] = {"aimet_copies": [], "no_copies_of_fresh_outputs": []}

    def forwards(copying_model, uncopied_model):
        with torch.no_grad():
            for index, batch in enumerate(batches):
                order = [("aimet_copies", copying_model), ("no_copies_of_fresh_outputs", uncopied_model)]
                for name, model in order if index % 2 else order[::-1]:
                    start = time.perf_counter()
                    model(batch)
                    if index >= 2:  # the first image per side builds the histograms' ranges
                        seconds[name].append(time.perf_counter() - start)

    with fast_quantize_dequantize(), calibration_without_output_copies(uncopied) as quantizers:
        copying.compute_encodings(lambda m: uncopied.compute_encodings(lambda n: forwards(m, n)))
    return {"quantizers_without_copy": len(quantizers),
            **{f"{name}_s_per_image": round(statistics.median(values), 3) for name, values in seconds.items()},
            "timed_images_per_side": len(seconds["aimet_copies"]),
            "encodings_identical": _same_encodings(copying, uncopied)}


def thread_scaling(float_model, sim, batches) -> dict:
    """Seconds per image of the float forward and of the calibration forward on one and on two
    threads, alternating image by image: how much of the calibration's extra work the second core
    takes (the float ops scale with it; serial work does not)."""
    import torch

    from lpcv_depth.backends.aimet_fast import calibration_without_output_copies, fast_quantize_dequantize

    threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {f"{kind}_{n}_thread": [] for kind in ("float", "calibration") for n in (1, 2)}

    def timed(kind: str, model, index: int, batch) -> None:
        count = 1 + index % 2
        torch.set_num_threads(count)
        start = time.perf_counter()
        model(batch)
        if index >= 2:  # one warm-up image per thread count; the very first builds the histograms' ranges
            seconds[f"{kind}_{count}_thread"].append(time.perf_counter() - start)

    def calibration_forwards(model):
        with torch.no_grad():
            for index, batch in enumerate(batches):
                timed("float", float_model, index, batch)
                timed("calibration", model, index, batch)

    try:
        with fast_quantize_dequantize(), calibration_without_output_copies(sim):
            sim.compute_encodings(calibration_forwards)
    finally:
        torch.set_num_threads(threads)
    medians = {f"{name}_s_per_image": round(statistics.median(values), 3) for name, values in seconds.items()}
    extra = {n: medians[f"calibration_{n}_thread_s_per_image"] - medians[f"float_{n}_thread_s_per_image"]
             for n in (1, 2)}
    return {**medians, "timed_images_per_setting": len(seconds["float_1_thread"]),
            "calibration_extra_s_per_image": {f"{n}_thread": round(extra[n], 3) for n in (1, 2)},
            "calibration_extra_speedup_on_2_threads": round(extra[1] / extra[2], 2),
            "float_speedup_on_2_threads": round(medians["float_1_thread_s_per_image"]
                                                / medians["float_2_thread_s_per_image"], 2)}


def _same_encodings(a, b) -> bool:
    import torch

    def encodings(sim):
        return {name: (q.get_min(), q.get_max()) for name, q in sim.model.named_modules()
                if hasattr(q, "get_min") and q.get_encodings() is not None}

    ours, theirs = encodings(a), encodings(b)
    return ours.keys() == theirs.keys() and all(
        torch.equal(ours[k][i].view(torch.int32), theirs[k][i].view(torch.int32)) for k in ours for i in (0, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="calibration images (default 24)")
    parser.add_argument("--out", type=Path, default=build_dir() / "bench" / "calibration")
    parser.add_argument("--thread-scaling", action="store_true",
                        help="time the float and the calibration forward on 1 and on 2 threads instead")
    args = parser.parse_args()
    if args.images < 4:
        parser.error("--images must be at least 4")
    from lpcv_depth.host import keep_freed_memory

    keep_freed_memory()
    export_dir = args.out / "vits-export"
    if not (export_dir / "manifest.json").is_file():
        run_stage(["-m", "lpcv_depth.cli", "export", "--weights", "None", "--out", str(export_dir),
                   "--check-images", str(CALIBRATION)])
    calib = calibration_subset(args.images, args.out / "calib")
    if args.thread_scaling:
        (sim,), float_model, batches = build_sims(export_dir, calib, args.images, sims=1)
        print(json.dumps(thread_scaling(float_model, sim, batches), indent=2))
        return 0
    (copying, uncopied), _, batches = build_sims(export_dir, calib, args.images)
    print(json.dumps(alternate(copying, uncopied, batches), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
