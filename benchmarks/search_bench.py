"""Search benchmark: a FastDepth grid (3 input sizes x w8a8/w8a16) with the real weights from ../shared.

    python benchmarks/search_bench.py                   # sequential loop, then Ray, then the rerun
    python benchmarks/search_bench.py --sizes 224x224 --presets w8a8   # a smaller grid

Three runs of `lpcv-depth search`, each as its own process (imports and Ray's start-up count):
1. without Ray (`--ray-address none`): the plain sequential loop;
2. the same grid on a local Ray, into a fresh folder: the Ray overhead is run 2 / run 1;
3. run 2 again: every trial reused, as a fraction of run 2.
It prints one JSON object; docs/benchmarks.md has the figures measured with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lpcv_depth.workspace import build_dir

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
WEIGHTS = SHARED / "weights" / "fastdepth" / "fast_depth_224.tflite"
CALIBRATION = SHARED / "data" / "calibration_indoor"
RGBD = SHARED / "data" / "rgbd"


def timed_search(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "lpcv_depth.cli", "search", *args], stdout=handle,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"search failed ({done.returncode}), log: {log}\n{log.read_text()[-3000:]}")
    return seconds


def trials(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["trials"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="224x224,192x256,288x384")
    parser.add_argument("--presets", default="w8a8,w8a16")
    parser.add_argument("--out", type=Path, default=build_dir("bench", "search"))
    options = parser.parse_args()
    shutil.rmtree(options.out, ignore_errors=True)
    options.out.mkdir(parents=True)
    grid = ["--model", "fastdepth", "--weights", str(WEIGHTS), "--input-size", options.sizes,
            "--preset", options.presets, "--calib", str(CALIBRATION), "--eval-data", str(RGBD), "--hub", "off"]
    sequential = timed_search([*grid, "--ray-address", "none", "--out", str(options.out / "loop")],
                              options.out / "loop.log")
    on_ray = timed_search([*grid, "--out", str(options.out / "ray")], options.out / "ray.log")
    rerun = timed_search([*grid, "--out", str(options.out / "ray")], options.out / "rerun.log")
    rows = trials(options.out / "ray")
    loop_rows = {row["trial"]: row for row in trials(options.out / "loop")}
    print(json.dumps({
        "grid": f"fastdepth {options.sizes} x {options.presets}",
        "trials": len(rows),
        "done": sum(row["status"] == "done" for row in rows),
        "sequential_s": round(sequential, 1),
        "ray_s": round(on_ray, 1),
        "ray_over_sequential": round(on_ray / sequential, 3),
        "rerun_s": round(rerun, 1),
        "rerun_over_first": round(rerun / on_ray, 3),
        "rerun_reused": all(row["reused"] for row in trials(options.out / "ray")),
        "same_fscores_loop_and_ray": all(loop_rows[r["trial"]]["fscore_int8"] == r["fscore_int8"] for r in rows),
        "per_trial": [{key: row[key] for key in ("trial", "gmacs", "fscore_fp32", "fscore_int8", "sqnr_db",
                                                 "htp_full", "seconds")} for row in rows],
        "report": str(options.out / "ray" / "report.md"),
    }, indent=2))


if __name__ == "__main__":
    main()
