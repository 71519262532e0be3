"""The hub stage's profile summary: the figures the challenge cares about from an AI Hub profile
(latency, FPS against the target, memory, layers per compute unit), its one-line form, and the
warnings a profile calls for (CPU fallback, GPU layers, below the FPS target)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from lpcv_depth.backends.ai_hub import HubError, HubJob
from lpcv_depth.stage import StageLog

__all__ = ["summarize_profile", "profile_line", "warn_profile", "TARGET_FPS", "COMPUTE_UNITS"]

TARGET_FPS = 30.0
COMPUTE_UNITS = ("NPU", "GPU", "CPU")


def summarize_profile(profile: dict) -> dict:
    """The figures the challenge cares about, from download_profile()'s dict (times in us, memory in bytes)."""
    summary = profile.get("execution_summary", {})
    layers = profile.get("execution_detail", [])
    estimated_us = summary.get("estimated_inference_time")
    if not estimated_us:
        raise HubError("the profile has no estimated_inference_time", hint="open the profile job's page on AI Hub")
    ms = estimated_us / 1000.0
    peak = summary.get("inference_memory_peak_range") or [summary.get("estimated_inference_peak_memory")] * 2
    units = Counter(str(layer.get("compute_unit", "UNSPECIFIED")).upper() for layer in layers)
    counts = {unit: units.get(unit, 0) for unit in COMPUTE_UNITS}
    counts.update({unit: n for unit, n in units.items() if unit not in COMPUTE_UNITS})
    off_npu = Counter(layer.get("type", "?") for layer in layers if str(layer.get("compute_unit")).upper() == "CPU")
    result = {
        "estimated_inference_time_ms": ms,
        "fps": 1000.0 / ms,
        "meets_target_fps": 1000.0 / ms >= TARGET_FPS,
        "target_fps": TARGET_FPS,
        "peak_memory_bytes": [int(v) for v in peak] if peak[0] is not None else None,
        "layers": len(layers),
        "compute_units": counts,
        "cpu_fallback": counts["CPU"] > 0,
        "cpu_layer_types": dict(off_npu.most_common()),
        "first_load_time_ms": (summary.get("first_load_time") or 0) / 1000.0 or None,
        "warm_load_time_ms": (summary.get("warm_load_time") or 0) / 1000.0 or None,
    }
    times = summary.get("all_inference_times") or []
    if times:
        result["inference_times_ms"] = {"runs": len(times), "min": min(times) / 1000.0,
                                        "median": float(np.median(times)) / 1000.0, "max": max(times) / 1000.0}
    return result


def profile_line(job: HubJob, summary: dict) -> str:
    counts = summary["compute_units"]
    return (f"job {job.job_id}: {summary['estimated_inference_time_ms']:.2f} ms = {summary['fps']:.0f} FPS, "
            f"layers NPU {counts['NPU']} / GPU {counts['GPU']} / CPU {counts['CPU']}")


def warn_profile(summary: dict, log: StageLog) -> None:
    counts = summary["compute_units"]
    if summary["cpu_fallback"]:
        types = ", ".join(f"{name} x{n}" for name, n in summary["cpu_layer_types"].items())
        bar = "!" * 78
        log.warn(bar)
        log.warn(f"CPU FALLBACK: {counts['CPU']} of {summary['layers']} layers run on the CPU, not the NPU ({types}).")
        log.warn("Every frame then crosses between NPU and CPU: latency suffers and the model is not fully "
                 "accelerated. Replace or re-export those ops (see profile.json, execution_detail).")
        log.warn(bar)
    if counts["GPU"]:
        log.warn(f"{counts['GPU']} of {summary['layers']} layers run on the GPU, not the NPU")
    if not summary["meets_target_fps"]:
        log.warn(f"{summary['fps']:.1f} FPS on the device is below the {TARGET_FPS:g} FPS target "
                 f"({summary['estimated_inference_time_ms']:.1f} ms > {1000 / TARGET_FPS:.1f} ms)")
