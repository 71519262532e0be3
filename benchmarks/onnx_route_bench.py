"""The torch path against the two routes of an ONNX-file export (issue #26), on the same photos: for each
registered model given, the model exported by the registry (torch path), and its backbone exported bare
by plain torch.onnx.export and wrapped in ONNX (export --onnx --wrap), quantized through onnx2torch and
aimet-torch (`--backend onnx2torch`) and with aimet-onnx (`--backend aimet-onnx`, with the settings that
route takes: `--no-cle --output-tail-bits 8`). Prints, per route: export and ptq wall time, ptq time
without the ground-truth scoring, calibration time (ptq's compute-encodings step), peak RSS, int8 SQNR vs
fp32 (held-out images), fp32/int8 F-score on the RGB-D set, and the int8 model's HTP coverage (the
htp-check stage's compile with CPU fallback disabled, numerics off; only where the qnn extra is installed).

The host is shared: the routes' ptq runs are interleaved (with `--repeats N`, N rounds, each in a rotated
order), so a load that comes and goes hits every route alike; compare routes within one run.

    python benchmarks/onnx_route_bench.py                                  # FastDepth, real weights
    python benchmarks/onnx_route_bench.py --model depth_anything_v2_vits --weights None --num-calib 16
    python benchmarks/onnx_route_bench.py --ptq-args "--holdout 4" --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ptq_bench import CALIBRATION, RGBD, SHARED, run_stage

from lpcv_depth.workspace import build_dir

FASTDEPTH_WEIGHTS = SHARED / "weights" / "fastdepth" / "fast_depth_224.tflite"


def bare_backbone(model_name: str, weights: str | None, path: Path) -> list[str]:
    """The model's backbone alone as ONNX, and the export --onnx flags that wrap it like the registry does."""
    import torch

    from lpcv_depth.models import create_model, set_gelu_approximation
    from lpcv_depth.stages.export_onnx import format_channels

    model = create_model(model_name, weights=weights)
    set_gelu_approximation(model, "tanh")  # as the torch path exports it (export --gelu tanh, the default)
    height, width = model.input_size
    torch.onnx.export(model.backbone.eval(), (torch.zeros(1, 3, height, width),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    return ["--onnx", str(path), "--wrap", "--mean", format_channels(model.spec.mean), "--std",
            format_channels(model.spec.std), "--native-output", model.spec.native_output]


ROUTES = {"torch": [], "onnx2torch": ["--backend", "onnx2torch"],
          "aimet-onnx": ["--backend", "aimet-onnx", "--no-cle", "--output-tail-bits", "8"]}


def ptq_figures(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    results, timings = manifest["results"], manifest["timings_s"]
    truth = results.get("ground_truth") or {}
    return {"backend": results.get("backend"), "calibration_s": timings.get("compute-encodings"),
            "ground_truth_s": timings.get("ground-truth", 0.0),
            "sqnr_vs_fp32_db": round(results["int8_vs_fp32"]["sqnr_db"], 2),
            "fscore_fp32": truth.get("fp32", {}).get("fscore@0.1"),
            "fscore_int8": truth.get("int8", {}).get("fscore@0.1")}


def htp_coverage(ptq_dir: Path) -> dict:
    """Nodes of the int8 model on the HTP and on the CPU, from the htp-check stage's compile alone."""
    from lpcv_depth.runner import backend_wanted
    from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check

    wanted, reason = backend_wanted("htp-check", "auto")
    if not wanted:
        return {"htp_coverage": f"not measured: {reason}"}
    coverage = run_htp_check(HtpCheckConfig(ptq=ptq_dir, numerics=False, fp16_baseline=False,
                                            out=ptq_dir / "htp-check")).results.coverage
    return {"htp_full": coverage.full_htp, "htp_nodes": coverage.htp_nodes, "htp_cpu_nodes": coverage.cpu_nodes}


def export(label: str, export_args: list[str], out: Path) -> tuple[Path, float, float]:
    folder = out / f"{label}-export"
    seconds, rss = run_stage(["-m", "lpcv_depth.cli", "export", *export_args, "--out", str(folder),
                              "--check-images", str(CALIBRATION)])
    return folder, seconds, rss


def ptq(route: str, export_dir: Path, ptq_args: list[str], out: Path, round_: int) -> dict:
    ptq_dir = out / f"{route}-ptq-{round_}"
    seconds, rss = run_stage(["-m", "lpcv_depth.cli", "ptq", "--fp32", str(export_dir), "--out", str(ptq_dir),
                              *ptq_args, *ROUTES[route]])
    figures = ptq_figures(ptq_dir)
    return {"route": route, "round": round_, "ptq_s": round(seconds, 1),
            "ptq_without_ground_truth_s": round(seconds - figures.pop("ground_truth_s"), 1),
            "ptq_peak_rss_gib": round(rss, 2), **figures, "folder": str(ptq_dir)}


def interleaved(exports: dict[str, Path], ptq_args: list[str], out: Path, repeats: int) -> list[dict]:
    """Every route's ptq, `repeats` rounds, each round in an order rotated by one."""
    routes, rows = list(ROUTES), []
    for round_ in range(repeats):
        order = routes[round_ % len(routes):] + routes[:round_ % len(routes)]
        for route in order:
            rows.append(ptq(route, exports["torch" if route == "torch" else "onnx"], ptq_args, out, round_))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fastdepth")
    parser.add_argument("--weights", default=str(FASTDEPTH_WEIGHTS), help="a file, hf, or None (random)")
    parser.add_argument("--calib", type=Path, default=CALIBRATION)
    parser.add_argument("--eval-data", type=Path, default=RGBD)
    parser.add_argument("--num-calib", type=int, default=None, help="default: ptq's own")
    parser.add_argument("--ptq-args", default="", help="more ptq flags, the same for both paths")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every route's ptq, interleaved")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    weights = None if args.weights.lower() == "none" else args.weights
    out = args.out or build_dir("bench", f"onnx-route-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    ptq_args = ["--calib", str(args.calib), "--eval-data", str(args.eval_data), *shlex.split(args.ptq_args)]
    if args.num_calib is not None:
        ptq_args += ["--num-calib", str(args.num_calib)]
    torch_export = ["--model", args.model, "--weights", "None" if weights is None else weights]
    onnx_export = bare_backbone(args.model, weights, out / f"{args.model}_bare.onnx")
    exports, export_rows = {}, []
    for label, export_args in (("torch", torch_export), ("onnx", onnx_export)):
        exports[label], seconds, rss = export(label, export_args, out)
        export_rows.append({"export": label, "export_s": round(seconds, 1), "peak_rss_gib": round(rss, 2)})
    rows = interleaved(exports, ptq_args, out, args.repeats)
    for route in ROUTES:  # the HTP compile once per route (its int8 model is the same every round)
        last = [row for row in rows if row["route"] == route][-1]
        last.update(htp_coverage(Path(last["folder"])))
    print(json.dumps({"model": args.model, "weights": args.weights, "ptq_args": ptq_args, "routes": ROUTES,
                      "exports": export_rows, "ptq": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
