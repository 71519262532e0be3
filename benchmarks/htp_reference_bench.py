"""HTP reference benchmark: which part of "HTP int8 vs CPU int8" moves from one x86 host to another.

    python benchmarks/htp_reference_bench.py --build                  # the test suite's FastDepth ptq, built 3 ways
    python benchmarks/htp_reference_bench.py --ptq build/fastdepth/ptq-w8a8 [--ptq OTHER] [--frames 2]

For each ptq folder it runs the same QDQ model (model_qdq.onnx) on the emulated HTP and on ONNX
Runtime's CPU at every graph optimization level, on the ptq stage's first held-out images, and prints
the SQNR of each output against fp32, the HTP, AIMET's simulation and the CPU reference the ptq stage
saved (holdout_outputs.npz):
  ort-disable-all   Q/DQ run as separate ops: DequantizeLinear -> float op -> QuantizeLinear
  ort-basic         what the ptq and htp-check stages run (lpcv_depth.verify.OrtRunner): Q/DQ still separate
  ort-extended/all  Q/DQ fused into integer kernels (QLinearConv, ...), MLAS's per-ISA u8s8 code paths

--build makes the test suite's ptq (16 calibration + 4 held-out images, no CLE) under
build/bench/htp-reference/: twice as this host runs it (is calibration deterministic?) and once per
lower instruction set PyTorch can be held to (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): the
calibration a host without AMX / AVX-512 / AVX2 computes, as far as PyTorch's kernels decide it. ONNX Runtime's MLAS picks its kernels
from CPUID with no override, so its ISA can only be lowered by running on another CPU (or an emulator).

Prints numbers only (no pass/fail). Every HTP time is host emulation, not device latency. Figures and
what they mean: docs/htp-check.md ("Which CPU reference").
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

import numpy as np

from lpcv_depth.workspace import build_dir

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
CALIBRATION = SHARED / "data" / "calibration_indoor"
FASTDEPTH_WEIGHTS = SHARED / "weights" / "fastdepth" / "fast_depth_224.tflite"
# The test suite's quick ptq (tests/conftest.py: calib_subset, fastdepth_ptq_config).
TEST_PTQ_ARGS = ["--holdout", "4", "--min-calib", "8", "--no-cle", "--latency-runs", "2"]
# PyTorch's kernels (AIMET's calibration runs on them) held to a lower instruction set than the host's.
TORCH_ISAS = {"torch-avx512-core": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
              "torch-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
              "torch-sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}}
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8")
ORT_LEVELS = ("disable-all", "basic", "extended", "all")


def host_isa() -> str:
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return " ".join(flag for flag in ISA_FLAGS if flag in flags) or "none of " + " ".join(ISA_FLAGS)


def run_cli(args: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lpcv_depth.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - start


def build(out: Path) -> list[Path]:
    """Export once, then the test suite's ptq: twice as this host runs it, once per PyTorch ISA cap."""
    calib = out / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    for path in sorted(CALIBRATION.glob("*.jpg"))[::6][:20]:
        if not (calib / path.name).exists():
            (calib / path.name).symlink_to(path)
    export = out / "export"
    if not (export / "manifest.json").is_file():
        run_cli(["export", "--model", "fastdepth", "--weights", str(FASTDEPTH_WEIGHTS), "--out", str(export),
                 "--check-images", str(calib), "--num-check-images", "2"])
    folders = []
    for name, env in (("ptq-host", None), ("ptq-host-again", None),
                      *((f"ptq-{isa}", env) for isa, env in TORCH_ISAS.items())):
        folder = out / name
        if not (folder / "manifest.json").is_file():
            seconds = run_cli(["ptq", "--calib", str(calib), "--fp32", str(export), *TEST_PTQ_ARGS,
                               "--out", str(folder)], env)
            print(f"built {folder} in {seconds:.0f} s" + (f" with {env}" if env else ""))
        folders.append(folder)
    return folders


def encodings_difference(a: Path, b: Path) -> str:
    """How many AIMET encodings differ between two ptq folders, and by how much (relative scale)."""
    def load(folder: Path) -> dict:
        data = json.loads(next((folder / "fastdepth.aimet").glob("*.encodings")).read_text())
        return {entry["name"]: entry for kind in ("activation_encodings", "param_encodings") for entry in data[kind]}

    first, second = load(a), load(b)
    differing = [name for name in first if first[name] != second.get(name)]
    if not differing:
        return f"{a.name} vs {b.name}: all {len(first)} encodings identical"
    worst = max(float(np.max(np.abs(np.array(second[n]["scale"]) / np.array(first[n]["scale"]) - 1)))
                for n in differing if n in second)
    return (f"{a.name} vs {b.name}: {len(differing)} of {len(first)} encodings differ, "
            f"largest relative scale change {worst:.2e}")


def held_out(ptq: Path, frames: int) -> tuple[np.ndarray, Path, dict]:
    from lpcv_depth.images import load_contract_image

    manifest = json.loads((ptq / "manifest.json").read_text())
    split = manifest["inputs"]["calibration"]
    files = [Path(split["root"]) / name for name in split["holdout_files"][:frames]]
    images = np.stack([load_contract_image(path) for path in files])
    with np.load(ptq / "holdout_outputs.npz") as saved:
        outputs = {name: saved[name][:frames] for name in saved.files}
    return images, Path(manifest["inputs"]["fp32_onnx"]["path"]), outputs


def ort_outputs(model: Path, images: np.ndarray, level: str) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable-all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: image[None].astype(np.float32)})[0] for image in images])


def htp_outputs(model: Path, images: np.ndarray, repeats: int) -> tuple[list[np.ndarray], float]:
    from lpcv_depth.backends.qnn import SM8650, HtpTarget, compile_for_htp, import_qnn, inspect_qdq_model

    backend = import_qnn()
    with tempfile.TemporaryDirectory() as scratch:
        compiled = compile_for_htp(model, backend, HtpTarget(soc_model=SM8650, htp_arch="75"),
                                   Path(scratch) / "model_ctx.onnx", inspect_qdq_model(model)["op_types"])
        start = time.perf_counter()
        runs = [compiled.session.run(images) for _ in range(repeats)]
    return runs, (time.perf_counter() - start) / (repeats * len(images))


def measure(ptq: Path, frames: int, htp_repeats: int) -> None:
    from lpcv_depth.verify import sqnr_db

    images, fp32_onnx, saved = held_out(ptq, frames)
    model = ptq / "model_qdq.onnx"
    outputs = {"fp32 (ptq saved)": saved["fp32"], "aimet-sim (ptq saved)": saved["aimet_sim"],
               "int8 cpu (ptq saved)": saved["int8_qdq"]}
    outputs.update({f"ort-{level}": ort_outputs(model, images, level) for level in ORT_LEVELS})
    htp_runs, seconds = htp_outputs(model, images, htp_repeats)
    outputs["htp"] = htp_runs[0]
    references = ("fp32 (ptq saved)", "htp", "aimet-sim (ptq saved)", "int8 cpu (ptq saved)")
    print(f"\n{ptq} ({len(images)} held-out image(s); HTP emulation {seconds:.1f} s/frame, not device latency)")
    print(f"  {'output':24s}" + "".join(f"{'vs ' + ref.split(' (')[0]:>16s}" for ref in references) + "   (SQNR, dB)")
    for name, output in outputs.items():
        cells = "".join(f"{'-' if ref == name else f'{sqnr_db(outputs[ref], output):.2f}':>16s}" for ref in references)
        print(f"  {name:24s}{cells}")
    for index, other in enumerate(htp_runs[1:], 2):
        same = np.array_equal(htp_runs[0], other)
        print(f"  HTP run {index} vs run 1: " + ("identical" if same else f"SQNR {sqnr_db(htp_runs[0], other):.2f} dB"))
    fp32_here = ort_outputs(fp32_onnx, images, "all") if fp32_onnx.is_file() else None
    if fp32_here is not None:
        print(f"  fp32 here vs fp32 saved by ptq: SQNR {sqnr_db(saved['fp32'], fp32_here):.2f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptq", type=Path, action="append", default=[], help="ptq folder (repeatable)")
    parser.add_argument("--build", action="store_true", help="build the test suite's ptq once per PyTorch ISA "
                                                             "(and twice at the host's) and measure each")
    parser.add_argument("--frames", type=int, default=2, help="held-out images (the test checks 2)")
    parser.add_argument("--htp-repeats", type=int, default=1, help="run the HTP N times: is it deterministic?")
    parser.add_argument("--out", type=Path, default=build_dir("bench", "htp-reference"))
    args = parser.parse_args()
    folders = list(args.ptq)
    if args.build:
        folders += build(args.out)
    if not folders:
        parser.error("pass --ptq FOLDER or --build")
    import onnxruntime
    import torch

    print(f"host: {host_isa()}; onnxruntime {onnxruntime.__version__}; "
          f"torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for first, second in zip(folders, folders[1:]):
        print(encodings_difference(first, second))
    for folder in folders:
        measure(folder, args.frames, args.htp_repeats)


if __name__ == "__main__":
    main()
