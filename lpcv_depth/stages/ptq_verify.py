"""ptq's verification, its own step: the int8 QDQ model against AIMET's simulation and against fp32 on
held-out images (names, shapes, then numbers), optionally both models against ground truth through the
evaluate stage, the host latency, and the gates. Thresholds come from PtqConfig."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError
from lpcv_depth.gates import Gate
from lpcv_depth.results import Fidelity, GroundTruthPair, HostLatency, PtqResults
from lpcv_depth.stage import StageLog
from lpcv_depth.verify import OrtRunner, check_output_range, compare_outputs, output_fidelity

if TYPE_CHECKING:
    from lpcv_depth.stages.ptq import PtqConfig

__all__ = ["Int8Checks", "verify_int8", "int8_fidelity", "score_against_ground_truth", "ptq_gates",
           "HOST_LATENCY_NOTE"]

STAGE = "ptq"
HOST_LATENCY_NOTE = ("ONNX Runtime on this x86 host: a sanity figure only. x86 ORT runs QDQ int8 slower than fp32; "
                     "it says nothing about the phone's NPU.")


class Fp32Reference(Protocol):
    """The fp32 side of the checks: its ONNX, a runner on it, and its outputs on the held-out images."""

    onnx: Path
    runner: Any
    holdout: np.ndarray


@dataclass(frozen=True)
class Int8Checks:
    """What the int8 model's checks found: QDQ vs AIMET's simulation, fidelity to fp32, ground truth,
    host latency, and the QDQ outputs on the held-out images."""

    qdq_vs_aimet_sim: dict
    fidelity: Fidelity
    latency: HostLatency | None
    ground_truth: GroundTruthPair | None
    int8_holdout: np.ndarray



def verify_int8(config: PtqConfig, fp32: Fp32Reference, qdq: Path, sim_holdout: np.ndarray, holdout: np.ndarray,
            log: StageLog) -> Int8Checks:
    """int8 QDQ against AIMET's own simulation and against fp32 (both ONNX Runtime) on held-out images,
    optionally both models against real ground truth, and host latency."""
    with log.step("qdq-vs-aimet-sim") as step:
        int8_runner = OrtRunner(qdq)
        int8_holdout = int8_runner.run(holdout)
        parity = compare_outputs(sim_holdout, int8_holdout, config.sim_parity, "ONNX Runtime QDQ vs AIMET QuantSim")
        step.detail = f"SQNR {parity['sqnr_db']:.1f} dB"
    with log.step("int8-vs-fp32") as step:
        check_output_range(int8_holdout, TRACK3, tolerance=1e-2)
        fidelity = int8_fidelity(fp32.holdout, int8_holdout)
        step.detail = (f"SQNR {fidelity.sqnr_db:.1f} dB ({fidelity.sqnr_db_scale_aligned:.1f} dB scale-aligned), "
                       f"max abs {fidelity.max_abs_diff:.3f}, F-score vs fp32 {fidelity.fscore_vs_fp32:.1f}")
    ground_truth = None
    if config.eval_data is not None:
        with log.step("ground-truth") as step:
            ground_truth = score_against_ground_truth(Path(config.eval_data), fp32.onnx, qdq, qdq.parent / "eval",
                                                      median=config.median)
            step.detail = (f"F-score fp32 {ground_truth.fp32['fscore@0.1']:.2f} / int8 "
                           f"{ground_truth.int8['fscore@0.1']:.2f}, drop {ground_truth.fscore_drop:.2f}")
    latency = None
    if config.latency_runs == 0:  # a search scores many candidates and reads none of these figures
        log.info("host-latency skipped (--latency-runs 0)")
    else:
        latency = _host_latency(config, fp32, int8_runner, holdout, log)
    return Int8Checks(qdq_vs_aimet_sim=parity, fidelity=fidelity, latency=latency, ground_truth=ground_truth,
                         int8_holdout=int8_holdout)


def _host_latency(config: PtqConfig, fp32: Fp32Reference, int8_runner: OrtRunner, holdout: np.ndarray,
                  log: StageLog) -> HostLatency:
    with log.step("host-latency") as step:
        fp32_ms = fp32.runner.median_latency_ms(holdout[:1], config.latency_runs)
        int8_ms = int8_runner.median_latency_ms(holdout[:1], config.latency_runs)
        runs = min(len(fp32.runner.timed_ms), len(int8_runner.timed_ms))
        latency = HostLatency(fp32=fp32_ms, int8_qdq=int8_ms, runs=runs, note=HOST_LATENCY_NOTE)
        step.detail = f"fp32 {latency.fp32:.0f} ms, int8 QDQ {latency.int8_qdq:.0f} ms (host ORT, not the phone)"
    return latency


def int8_fidelity(fp32: np.ndarray, int8: np.ndarray) -> Fidelity:
    """SQNR (plain and after a per-image scale fit), max abs diff, and the Track 3 F-score of int8 with
    fp32 as the reference (scale-invariant, like the organizers' scorer)."""
    measured = output_fidelity(fp32, int8, scale_aligned=True)
    return Fidelity(sqnr_db=measured.sqnr_db, sqnr_db_scale_aligned=measured.sqnr_db_scale_aligned,
                    max_abs_diff=measured.max_abs_diff, fscore_vs_fp32=measured.fscore,
                    fscore_vs_fp32_per_image=measured.fscore_per_image, holdout_images=len(int8))


def score_against_ground_truth(data: Path, fp32_onnx: Path, qdq: Path, folder: Path, *,
                               median: str = "all") -> GroundTruthPair:
    """Both ONNX models through the evaluate stage, so PTQ scores frames exactly as `lpcv-depth evaluate`
    does (same metric, same skipping of bad frames); each one's outputs land in `folder`/fp32|int8."""
    from lpcv_depth.stages.evaluate import evaluate_within

    metrics = {}
    for label, onnx_path in (("fp32", fp32_onnx), ("int8", qdq)):
        overall = evaluate_within(STAGE, label, data, folder / label, onnx=onnx_path, median=median).results.overall
        if not overall.scored:
            raise ConfigError(f"no usable RGB-D frames in --eval-data {data} ({overall.skipped} skipped)",
                              hint="pass an RGB-D set whose frames have valid depth")
        metrics[label] = overall.metrics
    return GroundTruthPair(fp32=metrics["fp32"], int8=metrics["int8"], frames=overall.scored, skipped=overall.skipped,
                           fscore_drop=metrics["fp32"]["fscore@0.1"] - metrics["int8"]["fscore@0.1"])


def ptq_gates(config: PtqConfig, results: PtqResults) -> list[Gate]:
    fidelity = results.int8_vs_fp32
    if results.ground_truth is not None:
        drop, what = results.ground_truth.fscore_drop, "F-score drop vs GT"
    else:
        drop, what = 100.0 - fidelity.fscore_vs_fp32, "F-score drop vs fp32"
    return [Gate("--min-sqnr", "SQNR", fidelity.sqnr_db, config.min_sqnr, unit=" dB"),
            Gate("--max-fscore-drop", what, drop, config.max_fscore_drop, kind="at_most")]
