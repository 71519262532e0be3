"""Score a model on RGB-D data with the LPCVC 2025 Track 3 metric, as the organizers' server would.

    lpcv-depth evaluate --model fastdepth --weights default --data ../shared/data/rgbd
    lpcv-depth evaluate --onnx build/fastdepth/export/model.onnx --data ../shared/data/rgbd
    lpcv-depth evaluate --predictions aihub_outputs/ --data my_track3_set/

Exactly one source: a registered torch model, an ONNX file (fp32 or int8 QDQ), or a folder of
saved predictions (<frame id>.npy of shape (1,1,480,640), e.g. AI Hub inference outputs; for a
folder of sets, <set>/<frame id>.npy also works). --data is one set or a folder of sets, in our
layout (rgb/ + depth/) or the organizers' (raw/ + conf/ + rgb/ or image/).

Writes OUT/frames.csv, summary.json, summary.md, vis/*.png and manifest.json
(default OUT: build/eval/<source name>). Every option: docs/evaluate.md.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lpcv_depth.contract import OUTPUT_MODES, TRACK3
from lpcv_depth.errors import ConfigError, ContractError, LpcvError
from lpcv_depth.manifest import config_as_dict, read_manifest, sha256_file, sha256_of_files, write_manifest
from lpcv_depth.options import choices_hint, option
from lpcv_depth.report import cell, markdown_table
from lpcv_depth.results import EvaluateGroup, EvaluateResults, MetricTime, SkippedFrame
from lpcv_depth.rgbd import DatasetError, Frame, FrameError, GroundTruth, dataset_files, load_rgbd_dataset
from lpcv_depth.schema import to_json
from lpcv_depth.gates import Gate, enforce_gates
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, command_line, display_path
from lpcv_depth.stages.export import ONNX_NAME, parse_weights, weights_path
from lpcv_depth.track3_metric import (DEPTH_METRICS, F_THRESHOLDS_M, FSCORE, GRIDS, MEDIAN_MODES, OFFICIAL_K,
                                      POINT_METRICS, ceiling_fscore, evaluation_masks, fscore_key, mean_metrics,
                                      score_frame)
from lpcv_depth.workspace import build_dir

__all__ = ["EvaluateConfig", "EvaluateOutput", "run_evaluate", "evaluate_within", "summarize", "DEFINITION"]

STAGE = "evaluate"
INTRINSICS = ("official", "dataset")
CEILING = f"ceiling_{FSCORE}"
CSV_COLUMNS = ("set", "frame", *DEPTH_METRICS, *POINT_METRICS, "n_points", "median_scale", "invalid_share", CEILING,
               "share_of_ceiling", "contract", "score_s", "status")
# Below this mean ceiling (F@0.1 of the GT itself) a set's scores say more about its holes than the model.
CEILING_WARNING = 95.0
# summary.md columns: header, metric key, format.
MARKDOWN_COLUMNS = (("F@0.1", FSCORE, "{:.2f}"), ("F@0.2", fscore_key(0.2), "{:.2f}"),
                    ("abs_rel", "abs_rel", "{:.3f}"), ("rmse (m)", "rmse", "{:.3f}"), ("δ<1.25", "delta1", "{:.3f}"))
_MAX_WARNINGS = 10


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score (exactly one of model, onnx, predictions), on which data, and how; validated here."""

    data: Path = option(help="an RGB-D set folder, or a folder of sets")
    model: str | None = option(None, help="source: a registered model, run with torch")
    weights: str | None = option("default", parse=parse_weights,
                                 help="with --model: PATH, 'hf' (official checkpoint), 'default' (the model's "
                                      "declared weights; the default here) or 'None' (random init, pipeline "
                                      "tests only)")
    output: str = option("depth", choices=OUTPUT_MODES, help="with --model: depth or disparity output")
    onnx: Path | None = option(None, help="source: an ONNX file (fp32 or int8 QDQ), run with ONNX Runtime")
    predictions: Path | None = option(None, help="source: a folder of <frame id>.npy predictions of shape "
                                                 "(1,1,480,640), e.g. AI Hub outputs")
    grid: str = option("official", choices=GRIDS,
                       help="official (default): the organizers' pixel grid, as on the leaderboard; "
                            "xy: the geometrically correct one")
    intrinsics: str = option("official", choices=INTRINSICS,
                             help="official (default): the organizers' fixed K as-is on 640x480; "
                                  "dataset: each set's own K from meta.json, scaled to 640x480")
    median: str = option("all", choices=MEDIAN_MODES,
                         help="all (default): the organizers' median scaling over every pixel, holes included; "
                              "valid: both medians over the pixels with valid ground truth (docs/evaluate.md)")
    ceiling: bool = option(True, help="also score each frame's ground truth, holes filled, as its ceiling")
    holes_warning: float = option(0.1, help="warn when a set's mean share of invalid GT pixels is above this")
    require_contract: bool = option(False, help="gate: exit 3 when a prediction breaks the Track 3 output contract "
                                                "(values outside [0,1], a constant map); the reports are written")
    out: Path | None = option(None, help="output folder (default: build/eval/<source name> in the workspace)")
    num_vis: int = option(4, help="frames drawn as side-by-side PNGs")
    # Off by default: sampling changes the score.
    max_points: int | None = option(None, help="score at most N sampled points per frame (seeded, the same pixels "
                                               "for prediction and ground truth); default: all points, exact")
    seed: int = option(0, help="seed of the --max-points sampling")
    threads: int | None = option(None, help="CPU threads for the model and the neighbour search (default: all "
                                            "cores); 1 is often faster on a busy shared machine")

    def __post_init__(self):
        self._check_source()
        if not Path(self.data).is_dir():
            raise ConfigError(f"data folder not found: {self.data}", hint="pass a set folder or a folder of sets")
        if self.grid not in GRIDS:
            raise ConfigError(f"grid must be one of {GRIDS}, got {self.grid!r}", hint=choices_hint("grid", GRIDS))
        if self.intrinsics not in INTRINSICS:
            raise ConfigError(f"intrinsics must be one of {INTRINSICS}, got {self.intrinsics!r}",
                              hint=choices_hint("intrinsics", INTRINSICS))
        if self.num_vis < 0:
            raise ConfigError(f"num_vis must be >= 0, got {self.num_vis}", hint="pass --num-vis 0 for no pictures")
        if self.max_points is not None and self.max_points < 1:
            raise ConfigError(f"max_points must be >= 1, got {self.max_points}",
                              hint="leave --max-points out to score every point")
        if not 0 <= self.holes_warning <= 1:
            raise ConfigError(f"holes_warning must be a share in [0, 1], got {self.holes_warning}",
                              hint="pass --holes-warning as a share of invalid GT pixels between 0 and 1, e.g. 0.1 "
                                   "(the default: warn above 10%)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}",
                              hint="leave --threads out to use every core")

    def _check_source(self) -> None:
        sources = [name for name, value in (("--model", self.model), ("--onnx", self.onnx),
                                            ("--predictions", self.predictions)) if value is not None]
        if len(sources) != 1:
            raise ConfigError(f"give exactly one source to score, got {len(sources)}: {', '.join(sources) or 'none'}",
                              hint="--model NAME [--weights ...], --onnx PATH or --predictions DIR")
        if self.model is not None:
            from lpcv_depth.models import canonical_model  # imports torch: only when a torch model is scored

            # Unknown names fail here, listing the valid ones; a file reference is recorded with its absolute path.
            object.__setattr__(self, "model", canonical_model(self.model))
        if self.output not in OUTPUT_MODES:
            raise ConfigError(f"output must be one of {OUTPUT_MODES}, got {self.output!r}",
                              hint=choices_hint("output", OUTPUT_MODES))

    @property
    def weights_file(self) -> Path | None:
        """The local weights file, when --model runs with one (--out must never replace it)."""
        return weights_path(self.weights) if self.model is not None else None

    @property
    def inputs(self) -> list[Path | None]:
        """Everything the run reads: StagingDir refuses an --out that is, holds or lies inside one."""
        return [self.onnx, self.predictions, self.data, self.weights_file]

    @property
    def source_name(self) -> str:
        if self.model is not None:
            from lpcv_depth.models import model_folder_name

            name = model_folder_name(self.model)
            return name if self.output == "depth" else f"{name}-{self.output}"
        if self.onnx is not None:
            onnx = Path(self.onnx).resolve()
            # Stages name their artifact model.onnx; the folders around it say which one it is.
            return onnx.stem if onnx.stem != "model" else f"{onnx.parent.parent.name}-{onnx.parent.name}"
        return Path(self.predictions).resolve().name

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        variant = "".join(f"-{what}-{value}" for what, value, default in
                          (("grid", self.grid, "official"), ("K", self.intrinsics, "official")) if value != default)
        return build_dir("eval", f"{self.source_name}{variant}")

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class EvaluateOutput:
    """Where the outputs went, the typed scores, and summary.json's content (the scores plus the
    source and the config)."""

    out_dir: Path
    results: EvaluateResults
    summary: dict
    manifest_path: Path
    manifest: dict
    config: EvaluateConfig


def _prediction_map(array: np.ndarray, frame: Frame, what: str) -> np.ndarray:
    """A source's output for one frame as a (480, 640) float32 map, or FrameError."""
    array = np.asarray(array)
    if array.size != TRACK3.height * TRACK3.width or array.shape[-2:] != (TRACK3.height, TRACK3.width):
        raise FrameError(f"{frame.name}: {what} has shape {array.shape}; the contract output is "
                         f"(1, 1, {TRACK3.height}, {TRACK3.width})")
    if not np.issubdtype(array.dtype, np.number):
        raise FrameError(f"{frame.name}: {what} has dtype {array.dtype}, not a number")
    array = array.reshape(TRACK3.height, TRACK3.width).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise FrameError(f"{frame.name}: {what} contains NaN or Inf")
    return array


class _ModelSource:
    """A registered model, run with torch on the contract image."""

    def __init__(self, config: EvaluateConfig, log: StageLog):
        from lpcv_depth.models import create_model

        self.model = create_model(config.model, weights=config.weights, output=config.output)
        self.threads = config.threads
        info = self.model.weights_info
        if info.is_random:
            log.warn("RANDOM WEIGHTS (weights=None): the scores are meaningless; use them for pipeline tests only")
        self.inputs = {"kind": "model", "model": config.model, "output": config.output, "weights": info.as_dict(),
                       "sha256": info.sha256}
        self.detail = f"{config.model} ({config.output}), weights: {info.source}"

    def predict(self, frame: Frame) -> np.ndarray:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads or previous)
        try:
            with torch.no_grad():
                output = self.model(torch.from_numpy(frame.load_image()[None])).numpy()
        finally:
            torch.set_num_threads(previous)
        return _prediction_map(output, frame, "model output")


class _OnnxSource:
    """An ONNX file (fp32 or QDQ int8), run with ONNX Runtime on the CPU."""

    def __init__(self, config: EvaluateConfig, log: StageLog):
        from lpcv_depth.verify import OrtRunner

        path = Path(config.onnx)
        try:
            self.runner = OrtRunner(path, threads=config.threads)
        except Exception as err:  # onnxruntime raises its own exception types for unloadable files
            raise ContractError(f"ONNX Runtime cannot load {path}: {type(err).__name__}: {err}",
                                hint=f"pass an ONNX file written by {command_line('export')} or "
                                     f"{command_line('ptq')}") from err
        self.inputs = {"kind": "onnx", "path": os.fspath(path.resolve()), "bytes": path.stat().st_size,
                       "sha256": sha256_file(path)}
        self.detail = f"{path.name}, {self.inputs['bytes'] / 1e6:.1f} MB"

    def predict(self, frame: Frame) -> np.ndarray:
        return _prediction_map(self.runner.run(frame.load_image()[None]), frame, "ONNX output")


class _PredictionFolder:
    """Saved predictions: <folder>/<set>/<frame id>.npy, else <folder>/<frame id>.npy."""

    def __init__(self, config: EvaluateConfig, log: StageLog):
        self.folder = Path(config.predictions)
        files = sorted(self.folder.rglob("*.npy"))
        if not files:
            raise ConfigError(f"no .npy files in {self.folder}",
                              hint="save one (1, 1, 480, 640) array per frame as <frame id>.npy")
        self.inputs = {"kind": "predictions", "path": os.fspath(self.folder.resolve()), "files": len(files),
                       "sha256": sha256_of_files(files, self.folder)}
        self.detail = f"{len(files)} .npy files in {self.folder}"

    def predict(self, frame: Frame) -> np.ndarray:
        candidates = (self.folder / frame.set_name / f"{frame.frame_id}.npy", self.folder / f"{frame.frame_id}.npy")
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FrameError(f"{frame.name}: no prediction file {frame.frame_id}.npy in {self.folder}")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise FrameError(f"{frame.name}: cannot read prediction {path}: {err}") from err
        return _prediction_map(array, frame, f"prediction {path.name}")



def _open_source(config: EvaluateConfig, log: StageLog):
    kind = _ModelSource if config.model is not None else _OnnxSource if config.onnx is not None else _PredictionFolder
    return kind(config, log)


def run_evaluate(config: EvaluateConfig, log: StageLog | None = None) -> EvaluateOutput:
    """Score every frame of config.data; write the per-frame CSV, summaries, panels and manifest."""
    log = log or StageLog(STAGE)
    _check_source_exists(config)
    frames, sets = _discover(config, log)
    data_inputs = _hash_data(config, frames, sets, log)
    source = _load_source(config, log)
    with StagingDir(config.destination, stage=STAGE, inputs=config.inputs) as staging:
        rows, skipped, panels = _score(frames, source, config, staging, log)
        results = summarize(rows, skipped, sets, config)
        summary = {"source": source.inputs, "config": config.as_dict(), **to_json(results)}
        reports = _write_reports(staging, rows, summary, results, config, log)
        manifest_path = write_manifest(
            staging.path, stage=STAGE, config=config.as_dict(),
            inputs={"data": data_inputs, "source": source.inputs, "metric": _metric_inputs(config)},
            outputs=[*reports, *panels], timings=log.timings, results=results)
    destination = config.destination
    _log_score(results, destination, log)
    enforce_gates([Gate("--require-contract", f"{len(results.out_of_contract)} prediction(s) break the output contract",
                        not results.out_of_contract, config.require_contract, kind="true")],
                  subject="the predictions",
                  hint="make the model output depth in [0, 1], scaled per sample (docs/export.md, the contract); "
                       "the reports list the frames")
    return EvaluateOutput(destination, results, summary, destination / manifest_path.name,
                          read_manifest(destination), config)


def _check_source_exists(config: EvaluateConfig) -> None:
    """The ONNX file or predictions folder to score, checked when the stage starts (a command that
    chains stages builds this config before the stage that writes them has run)."""
    if config.onnx is not None and not Path(config.onnx).is_file():
        raise ConfigError(f"ONNX file not found: {config.onnx}", hint=f"export one with {command_line('export')}")
    if config.predictions is not None and not Path(config.predictions).is_dir():
        raise ConfigError(f"predictions folder not found: {config.predictions}",
                          hint="pass the folder holding <frame id>.npy files")


def _discover(config: EvaluateConfig, log: StageLog) -> tuple[list[Frame], list[str]]:
    """The frames of --data, and the names of its sets in order."""
    with log.step("discover") as step:
        frames = load_rgbd_dataset(config.data)
        sets = list(dict.fromkeys(frame.set_name for frame in frames))
        if config.intrinsics == "dataset":
            missing = sorted({frame.set_name for frame in frames if frame.intrinsics is None})
            if missing:
                raise DatasetError(f"--intrinsics dataset, but these sets declare no intrinsics: {', '.join(missing)}",
                                   hint="use --intrinsics official, or pass only sets whose meta.json has intrinsics")
        step.detail = f"{len(frames)} frames in {len(sets)} set(s): {', '.join(sets)}"
    return frames, sets


def _hash_data(config: EvaluateConfig, frames: list[Frame], sets: list[str], log: StageLog) -> dict:
    with log.step("hash-inputs") as step:
        files = dataset_files(frames)
        step.detail = f"{len(files)} files"
        return {"path": os.fspath(Path(config.data).resolve()), "sets": sets, "frames": len(frames),
                "files": len(files), "sha256": sha256_of_files(files, Path(config.data))}


def _load_source(config: EvaluateConfig, log: StageLog):
    with log.step("load-source") as step:
        source = _open_source(config, log)
        step.detail = source.detail
    return source


def _metric_inputs(config: EvaluateConfig) -> dict:
    """What the numbers depend on beyond the data and the model (scipy: neighbour search, Pillow: GT resize)."""
    return {"module": "lpcv_depth.track3_metric", "grid": config.grid, "thresholds_m": list(F_THRESHOLDS_M),
            "K": OFFICIAL_K.as_dict() if config.intrinsics == "official" else "each set's meta.json, scaled to 640x480",
            "scipy": metadata.version("scipy"), "pillow": metadata.version("pillow")}


def _score(frames: list[Frame], source, config: EvaluateConfig, staging: StagingDir,
           log: StageLog) -> tuple[list[dict], list[SkippedFrame], list[Path]]:
    """Every frame scored or skipped with its reason; an error when none could be scored."""
    with log.step("score") as step:
        rows, skipped, panels = _score_frames(frames, source, config, staging)
        scored = [row for row in rows if row["status"] == "ok"]
        if not scored:
            reasons = "; ".join(item.reason for item in skipped[:3])
            raise LpcvError(f"no frame could be scored ({len(skipped)} skipped): {reasons}",
                            hint="check that --data and the predictions belong together")
        mean_f, mean_s = np.mean([row[FSCORE] for row in scored]), np.mean([row["score_s"] for row in scored])
        step.detail = f"{len(scored)} scored, {len(skipped)} skipped; F@0.1 {mean_f:.2f}; metric {mean_s:.2f} s/frame"
    for item in skipped[:_MAX_WARNINGS]:
        log.warn(f"skipped {item.set}/{item.frame}: {item.reason}")
    if len(skipped) > _MAX_WARNINGS:
        log.warn(f"... and {len(skipped) - _MAX_WARNINGS} more skipped frames, listed in summary.json")
    return rows, skipped, panels


def _score_frames(frames: list[Frame], source, config: EvaluateConfig,
                  staging: StagingDir) -> tuple[list[dict], list[SkippedFrame], list[Path]]:
    """Per-frame rows (metrics or a skip status), the skipped frames with reasons, and panel files."""
    drawn = _vis_indices(len(frames), config.num_vis)
    rows, skipped, panels = [], [], []
    for index, frame in enumerate(tqdm(frames, desc=STAGE, unit="frame", file=sys.stderr)):
        row: dict[str, Any] = {"set": frame.set_name, "frame": frame.frame_id}
        try:
            gt = frame.load_ground_truth()
            pred = source.predict(frame)
        except FrameError as err:
            skip = SkippedFrame(frame.set_name, frame.frame_id, err.args[0].removeprefix(f"{frame.name}: "))
            skipped.append(skip)
            rows.append({**row, "status": f"skipped: {skip.reason}"})
            continue
        scores = _score_one(pred, gt, config)
        rows.append({**row, **scores, "contract": contract_violation(pred) or "ok", "status": "ok"})
        if index in drawn:
            panels.append(_save_panel(frame, gt, pred * scores["median_scale"], staging))
    return rows, skipped, panels


def contract_violation(pred: np.ndarray, tolerance: float = 1e-3) -> str | None:
    """Why a prediction breaks the output contract (depth in [0, 1], scaled per sample), or None.

    The scorer takes any map, but a map outside [0, 1] or a constant one is not what a submission
    must produce, and its F-score means little (an all-zero map still scores)."""
    low, high = float(pred.min()), float(pred.max())
    if high - low <= 0:
        return f"constant map ({low:g} everywhere)"
    if low < -tolerance or high > 1 + tolerance:
        return f"values outside [0, 1]: min {low:.4g}, max {high:.4g}"
    return None


def _vis_indices(count: int, num_vis: int) -> set[int]:
    """Frames drawn as panels: spread evenly over the whole run."""
    return set(np.linspace(0, count - 1, num_vis).round().astype(int).tolist()) if num_vis else set()


def _score_one(pred: np.ndarray, gt: GroundTruth, config: EvaluateConfig) -> dict[str, float]:
    K = OFFICIAL_K if config.intrinsics == "official" else gt.intrinsics
    options = dict(K=K, grid=config.grid, max_points=config.max_points, seed=config.seed,
                   workers=config.threads or -1, median=config.median)
    start = time.perf_counter()
    scores = score_frame(pred, gt.depth, gt.conf, **options)
    scores["score_s"] = time.perf_counter() - start
    scores["invalid_share"] = float(np.mean(gt.depth <= 0))
    if config.ceiling:
        scores[CEILING] = ceiling_fscore(gt.depth, gt.conf, **options)
        scores["share_of_ceiling"] = 100.0 * scores[FSCORE] / scores[CEILING] if scores[CEILING] > 0 else None
    return scores


def _save_panel(frame: Frame, gt: GroundTruth, scaled_pred: np.ndarray, staging: StagingDir) -> Path:
    from lpcv_depth.visualize import depth_comparison_panel

    panel = depth_comparison_panel(frame.load_image(), gt.depth, scaled_pred, evaluation_masks(gt.depth, gt.conf)[0],
                                   title=frame.name)
    path = staging / "vis" / f"{frame.set_name}__{frame.frame_id}.png"
    path.parent.mkdir(exist_ok=True)
    panel.save(path)
    return path


def _group(rows: list[dict]) -> EvaluateGroup:
    scored = [row for row in rows if row["status"] == "ok"]
    ceilings = [row[CEILING] for row in scored if CEILING in row]
    return EvaluateGroup(frames=len(rows), scored=len(scored), skipped=len(rows) - len(scored),
                         metrics=mean_metrics(scored),
                         mean_points=float(np.mean([row["n_points"] for row in scored])) if scored else 0.0,
                         invalid_share=float(np.mean([row["invalid_share"] for row in scored])) if scored else None,
                         out_of_contract=sum(row["contract"] != "ok" for row in scored),
                         ceiling_fscore=float(np.mean(ceilings)) if ceilings else None)


def summarize(rows: list[dict], skipped: list[SkippedFrame], sets: list[str],
              config: EvaluateConfig) -> EvaluateResults:
    """Means per set and overall; every frame counts once, whichever set it is in (the organizers'
    dataset score)."""
    times = [row["score_s"] for row in rows if row["status"] == "ok"]
    groups = {name: _group([row for row in rows if row["set"] == name]) for name in sets}
    return EvaluateResults(overall=_group(rows), sets=groups, skipped=list(skipped),
                           metric_time_s=MetricTime(mean=float(np.mean(times)), max=float(np.max(times))),
                           median=config.median, warnings=hole_warnings(groups, config),
                           out_of_contract=[SkippedFrame(row["set"], row["frame"], row["contract"]) for row in rows
                                            if row["status"] == "ok" and row["contract"] != "ok"])


def hole_warnings(groups: dict[str, EvaluateGroup], config: EvaluateConfig) -> list[str]:
    """One warning per set whose ground-truth holes bias the median scale (or make it unsure)."""
    warnings = []
    for name, group in groups.items():
        if not group.scored:
            continue
        low_ceiling = group.ceiling_fscore is not None and group.ceiling_fscore < CEILING_WARNING
        if group.invalid_share > config.holes_warning or low_ceiling:
            warnings.append(f"set {name}: {100 * group.invalid_share:.0f}% of GT pixels are invalid; "
                            + _holes_effect(group, config.median, low_ceiling))
    return warnings


def _holes_effect(group: EvaluateGroup, median: str, low_ceiling: bool) -> str:
    """What a set's holes do to its scores: under --median valid a dense prediction can still reach
    the ceiling, so "bounded by its holes" is only said where the ceiling shows it."""
    ceiling = f"{group.ceiling_fscore:.1f}" if group.ceiling_fscore is not None else "not measured"
    if median == "valid" and not low_ceiling:
        return (f"under --median valid its F-scores count only the {100 * (1 - group.invalid_share):.0f}% of pixels "
                f"with valid ground truth (the ground truth itself, holes filled, scores F@0.1 {ceiling}), so they "
                "do not compare with the leaderboard's --median all.")
    alternative = " --median valid scores against the valid pixels only." if median == "all" else ""
    return (f"the ground truth itself (holes filled) scores F@0.1 {ceiling} under --median {median}, so its "
            f"F-scores are bounded by its holes.{alternative}")


def _write_reports(staging: StagingDir, rows: list[dict], summary: dict, results: EvaluateResults,
                   config: EvaluateConfig, log: StageLog) -> list[Path]:
    """frames.csv, summary.json and summary.md."""
    with log.step("write") as step:
        csv_path = _write_csv(staging / "frames.csv", rows)
        json_path = staging / "summary.json"
        json_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        md_path = staging / "summary.md"
        md_path.write_text(_markdown(results, config))
        step.detail = f"{len(rows)} rows"
    return [csv_path, json_path, md_path]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})
    return path


def _markdown(results: EvaluateResults, config: EvaluateConfig) -> str:
    sampled = f", sampled to {config.max_points} points" if config.max_points else ""
    lines = [f"# Track 3 evaluation: {config.source_name}", "",
             f"grid `{config.grid}`, intrinsics `{config.intrinsics}`, median `{config.median}`, "
             f"data `{config.data}`{sampled}. "
             "F@0.1 is the leaderboard score; every number is a mean over frames. The ceiling is the F@0.1 of "
             "the ground truth itself, holes filled, under the same settings.", "",
             _scores_table(results).rstrip("\n")]
    if results.warnings:
        lines += ["", *(f"**Warning:** {warning}" for warning in results.warnings)]
    if results.out_of_contract:
        lines += ["", f"**{len(results.out_of_contract)} prediction(s) break the output contract** (depth in [0, 1], "
                      "scaled per sample); their scores are in the table but mean little:"]
        lines += [f"- {item.set}/{item.frame}: {item.reason}" for item in results.out_of_contract]
    if results.skipped:
        lines += ["", f"Skipped {len(results.skipped)} frame(s):"]
        lines += [f"- {item.set}/{item.frame}: {item.reason}" for item in results.skipped]
    return "\n".join(lines) + "\n"


def _scores_table(results: EvaluateResults) -> str:
    groups = [*results.sets.items(), ("**all**", results.overall)]
    rows = [[name, str(group.frames), str(group.scored),
             *(cell(group.metrics.get(key) if group.scored else None, fmt) for _, key, fmt in MARKDOWN_COLUMNS),
             cell(group.invalid_share * 100 if group.invalid_share is not None else None, "{:.0f}%"),
             cell(group.ceiling_fscore, "{:.1f}")]
            for name, group in groups]
    headers = ["set", "frames", "scored", *(header for header, _, _ in MARKDOWN_COLUMNS), "GT invalid", "ceiling"]
    return markdown_table(headers, rows, align="lrr" + "r" * (len(MARKDOWN_COLUMNS) + 2))


def _log_score(results: EvaluateResults, destination: Path, log: StageLog) -> None:
    for warning in results.warnings:
        log.warn(warning)
    for item in results.out_of_contract[:_MAX_WARNINGS]:
        log.warn(f"{item.set}/{item.frame} breaks the output contract: {item.reason}")
    if len(results.out_of_contract) > _MAX_WARNINGS:
        log.warn(f"... {len(results.out_of_contract)} frames break the output contract in all (summary.json)")
    overall = results.overall
    log.info(f"F@0.1 {overall.metrics[FSCORE]:.2f}, abs_rel {overall.metrics['abs_rel']:.3f} over "
             f"{overall.scored} frames ({overall.skipped} skipped); table: "
             f"{display_path(destination / 'summary.md')}")


def _next_hint(result: EvaluateOutput) -> str:
    """Export what scored well; quantize an exported ONNX; otherwise read the table."""
    config = result.config
    if config.model is not None:
        output = ["--output", config.output] if config.output != "depth" else []
        return command_line("export", "--model", config.model, "--weights", str(config.weights), *output)
    if config.onnx is not None and Path(config.onnx).name == ONNX_NAME:
        return command_line("ptq", "--calib", "calibration_data", "--fp32", display_path(Path(config.onnx).parent))
    return f"cat {shlex.quote(os.path.relpath(result.out_dir / 'summary.md'))}"


def evaluate_within(stage: str, label: str, data: str | os.PathLike, out: Path, *, quiet: bool = False,
                    **options) -> EvaluateOutput:
    """The evaluate stage run by another stage on one model (its .onnx or its saved predictions, in
    `options` with any other EvaluateConfig field; no panels unless num_vis is given), into `out`,
    logged as `<stage>/evaluate-<label>` (nowhere with `quiet`): scored exactly as `lpcv-depth
    evaluate` scores."""
    import io

    config = EvaluateConfig(data=Path(data), out=out, **{"num_vis": 0, **options})
    return run_evaluate(config, StageLog(f"{stage}/evaluate-{label}", stream=io.StringIO() if quiet else None))


DEFINITION = StageDefinition(name=STAGE, config=EvaluateConfig, run=run_evaluate, description=__doc__,
                             next_hint=_next_hint)
