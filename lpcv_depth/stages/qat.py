"""Label-free quantization-aware training of a ptq folder's int8 model, verified as ptq verifies it.

    lpcv-depth qat --ptq build/fastdepth/ptq-w8a8
    lpcv-depth qat --ptq build/fastdepth/ptq-w8a8 --train-images more_photos/ --epochs 8 --device auto
    lpcv-depth qat --ptq build/fastdepth/ptq-w4a8 --train-data my_rgbd_sets/   # + a ground-truth term
    lpcv-depth qat --ptq build/fastdepth/ptq-w8a8 --min-sqnr 20   # CI gate: exit 3

Rebuilds the QuantSim the ptq run built (its config, the same float model and photos, its weights and
weight encodings), checks that the export it came from is unchanged, then fine-tunes it in AIMET's
QuantSim (student) towards the fp32 model's outputs (teacher) on the ptq run's calibration photos
plus --train-images (each also mirrored), with a scale-invariant loss and no labels; --train-data's
RGB-D frames add their measured depth as a second, supervised term. After each epoch the held-out photos
(the ptq run's, never trained on) give the int8-vs-fp32 SQNR; training stops after --patience epochs
without a gain, and the best checkpoint is exported and checked exactly as ptq does. Writes to OUT
(default: beside the ptq folder, ptq-<preset> -> qat-<preset>) what ptq writes:
  <model>.aimet/, model_qdq.onnx, report.json/.md/.png, holdout_outputs.npz, manifest.json
so htp-check, hub, compare, run and search take it wherever they take a ptq folder. Ctrl+C during
training keeps the best checkpoint so far, marked partial (results.partial). Every option: docs/qat.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpcv_depth.device import DEVICES, resolve_device
from lpcv_depth.errors import ConfigError
from lpcv_depth.gates import enforce_gates
from lpcv_depth.images import list_images, load_contract_image
from lpcv_depth.manifest import MANIFEST_NAME, config_as_dict, read_manifest, sha256_file, sha256_of_files
from lpcv_depth.options import choices_hint, flag_name, inherit, option
from lpcv_depth.report import markdown_table
from lpcv_depth.rgbd import Frame, dataset_files, load_rgbd_dataset
from lpcv_depth.results import QatResults, QatTraining
from lpcv_depth.stage import StageDefinition, StageLog, StagingDir, command_line, display_path
from lpcv_depth.stages.int8_outputs import (QDQ_ONNX, aimet_sim_outputs, export_artifacts, manifest_inputs,
                                            sizes, write_int8_manifest)
from lpcv_depth.stages.ptq import DEFAULT_FP32_MODEL, FloatStart, PtqConfig, prepare_float_model
from lpcv_depth.stages.ptq_verify import ptq_gates, verify_int8
from lpcv_depth.stages.qat_start import PtqFolder, check_same_images, read_ptq_folder, rebuild_quantsim
from lpcv_depth.stages.qat_train import AUGMENTATIONS, LOSSES, LR_SCHEDULES, TrainSettings, Training, augmented, fine_tune
from lpcv_depth.workspace import build_dir

__all__ = ["QatConfig", "QatOutput", "run_qat", "DEFINITION"]

STAGE = "qat"
GATE_HINT = ("the artifacts and report were written; try more --epochs, --train-images, another --lr, or a "
             "wider ptq --preset")


@dataclass(frozen=True)
class QatConfig:
    ptq: Path | None = option(None, help="ptq stage output folder to start from (default: "
                                         f"build/{DEFAULT_FP32_MODEL}/ptq-w8a8 of the workspace)")
    train_images: Path | None = option(None, help="folder of extra unlabeled photos to train on, besides the ptq "
                                                  "run's calibration photos")
    train_data: Path | None = option(None, help="RGB-D set(s) (rgb/ + depth/) to train on as well: their photos join "
                                                "the teacher's, and their measured depth adds a scale-invariant "
                                                "ground-truth term (weighted by --ground-truth-weight)")
    ground_truth_weight: float = option(1.0, help="weight of the --train-data ground-truth term beside the teacher's")
    num_train: int | None = option(None, help="train on at most the first N photos (the calibration photos first, "
                                              "then --train-images, then --train-data; default: all)")
    augment: str = option("flip", choices=AUGMENTATIONS,
                          help="flip: each photo is also trained on mirrored left-right (the teacher answers the "
                               "mirrored photo too); none: as taken")
    # epochs, lr, patience and the schedule: measured on FastDepth w4a8 (docs/qat.md, "Measurements").
    epochs: int = option(12, help="at most N passes over the training photos")
    lr: float = option(5e-5, help="Adam learning rate of the weights (and of the ranges unless frozen)")
    lr_schedule: str = option("cosine", choices=LR_SCHEDULES,
                              help="cosine: from --lr down to 0 over the planned epochs; constant: --lr throughout")
    # 2 keeps DA-V2 ViT-S well under 24 GiB (8.3 GiB peak at batch 2, 13.2 GiB with learned ranges: docs/qat.md).
    batch_size: int = option(2, help="photos per training step")
    # The held-out SQNR dips for a few epochs while the rate is high: w4a8's best epoch came 7 after the last gain.
    patience: int = option(8, help="stop after N epochs without a better held-out SQNR")
    # FastDepth w8a8 kept an epoch 0.02 dB above its ptq start on the held-out photos that had lost
    # 6.6 dB on unseen ones (docs/qat.md): a gain within the held-out photos' noise is no gain.
    min_gain: float = option(0.25, help="an epoch replaces the kept checkpoint (the ptq start first) only when its "
                                        "held-out SQNR is at least this many dB better")
    # Chosen by measurement (docs/qat.md, "The loss").
    loss: str = option("si-log", choices=LOSSES,
                       help="si-log (scale-invariant log loss) or si-log-grad (plus multi-scale gradient matching)")
    # Frozen by default: on FastDepth w4a8 learning the ranges recovered no more and took longer per epoch.
    freeze_encodings: bool = option(True, help="keep ptq's quantization ranges (the default); "
                                               "--no-freeze-encodings learns them with the weights (AIMET's range "
                                               "learning)")
    device: str = option("auto", choices=DEVICES, help="where to train: auto (a CUDA GPU where torch sees one), "
                                                       "cpu or cuda")
    seed: int = option(0, help="seed of the order the photos are visited in")
    eval_data: Path | None = option(None, help="RGB-D set(s): fp32 and int8 F-score against ground truth (default: "
                                               "the ptq run's --eval-data)")
    min_sqnr: float | None = inherit(PtqConfig, "min_sqnr")
    max_fscore_drop: float | None = inherit(PtqConfig, "max_fscore_drop")
    out: Path | None = option(None, help="output folder (default: the ptq folder's name with ptq -> qat, beside it)")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}",
                                  hint=f"pass {flag_name(name)} 1 or more")
        if self.num_train is not None and self.num_train < 1:
            raise ConfigError(f"num_train must be >= 1, got {self.num_train}", hint="leave --num-train out to use all")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", hint="pass --lr 5e-5 (the default) or another "
                                                                      "positive rate")
        for name, known in (("loss", LOSSES), ("lr_schedule", LR_SCHEDULES), ("augment", AUGMENTATIONS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}", hint=choices_hint(name, known))
        if not self.min_gain >= 0:
            raise ConfigError(f"min_gain must be >= 0 dB, got {self.min_gain}",
                              hint="pass --min-gain 0.25 (the default), or 0 to keep any better epoch")
        if not self.ground_truth_weight >= 0:
            raise ConfigError(f"ground_truth_weight must be >= 0, got {self.ground_truth_weight}",
                              hint="pass --ground-truth-weight 1 (the default), or 0 to use --train-data's photos "
                                   "without their depth")
        if self.train_data is not None and not Path(self.train_data).is_dir():
            raise ConfigError(f"--train-data folder not found: {self.train_data}",
                              hint="pass an RGB-D set (rgb/ + depth/) or a folder of sets, or leave --train-data out")
        resolve_device(self.device)
        if self.train_images is not None:
            if not Path(self.train_images).is_dir():
                raise ConfigError(f"--train-images folder not found: {self.train_images}",
                                  hint="pass a folder of JPG/PNG photos, or leave --train-images out")
            if not list_images(self.train_images):
                raise ConfigError(f"--train-images {self.train_images} holds no JPG/PNG images",
                                  hint="put unlabeled photos in it, or leave --train-images out")
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise ConfigError(f"--eval-data folder not found: {self.eval_data}",
                              hint="pass an RGB-D set (rgb/ + depth/) or a folder of sets")
        if self.max_fscore_drop is not None and self.max_fscore_drop < 0:
            raise ConfigError(f"max_fscore_drop must be >= 0, got {self.max_fscore_drop}",
                              hint="pass --max-fscore-drop as F-score points >= 0, or leave it out for no gate")

    @property
    def ptq_dir(self) -> Path:
        return Path(self.ptq) if self.ptq is not None else build_dir(DEFAULT_FP32_MODEL, "ptq-w8a8")

    @property
    def destination(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = self.ptq_dir.name
        return self.ptq_dir.parent / ("qat" + name[3:] if name.startswith("ptq") else f"{name}-qat")

    def as_dict(self) -> dict:
        data = config_as_dict(self)
        data["ptq"] = os.fspath(self.ptq_dir)
        return data


@dataclass(frozen=True)
class QatOutput:
    """What a finished (or interrupted, partial) run of the qat stage hands back."""

    out_dir: Path
    qdq_onnx: Path
    manifest_path: Path
    results: QatResults
    manifest: dict


@dataclass(frozen=True)
class _TrainSet:
    images: np.ndarray  # after augmentation
    targets: np.ndarray
    depth: np.ndarray | None  # measured depth per image (0 = none), with --train-data
    extra: list[Path]
    frames: list[Frame]
    photos: int  # before augmentation
    ground_truth_weight: float  # --ground-truth-weight where frames carry depth, else 0


def run_qat(config: QatConfig, log: StageLog | None = None) -> QatOutput:
    """Rebuild ptq's QuantSim, fine-tune it against fp32, export and verify the best checkpoint, report."""
    from lpcv_depth.backends.aimet_fast import fast_quantize_dequantize

    log = log or StageLog(STAGE)
    device = resolve_device(config.device)
    ptq = read_ptq_folder(config.ptq_dir, log)
    start = prepare_float_model(ptq.config, log)
    check_same_images(ptq, start)
    checks_config = dataclasses.replace(ptq.config, eval_data=config.eval_data or ptq.config.eval_data)
    train = _training_set(config, start, checks_config.eval_data, log)
    with StagingDir(config.destination, stage=STAGE, scratch=True,
                    inputs=[ptq.folder, ptq.config.fp32_dir, ptq.config.calib_dir, config.train_images,
                            config.train_data, checks_config.eval_data]) as staging, fast_quantize_dequantize():
        sim, reproduced = rebuild_quantsim(ptq, start, staging.scratch, log)
        training = _train_step(config, sim, start, train, device, log)
        sim_holdout = aimet_sim_outputs(sim, start.inputs.holdout_batches, start.fp32.holdout, log)
        artifacts = export_artifacts(sim, start.inputs.dummy, staging.path, start.fp32.name, opset=ptq.config.opset,
                                     exporter=ptq.config.exporter, log=log)
        checks = verify_int8(checks_config, start.fp32, artifacts.qdq, sim_holdout, start.inputs.holdout, log)
        results = dataclasses.replace(
            QatResults(**{f.name: getattr(ptq.results, f.name) for f in dataclasses.fields(ptq.results)}),
            device="cpu",  # the rebuild calibrates on the CPU; training.device is where it trained
            qdq_vs_aimet_sim=checks.qdq_vs_aimet_sim, int8_vs_fp32=checks.fidelity,
            sizes_bytes=sizes(start.fp32.onnx, artifacts), host_latency_ms=checks.latency,
            ground_truth=checks.ground_truth, ptq_int8_vs_fp32=ptq.results.int8_vs_fp32,
            ptq_ground_truth=ptq.results.ground_truth, training=_training_record(config, training, train, device),
            partial=training.interrupted)
        report = _report(config, ptq, staging.path, results, start, checks.int8_holdout, log)
        manifest_path = write_int8_manifest(
            staging.path, stage=STAGE, config=config.as_dict(), inputs=_inputs_record(ptq, start, train, reproduced),
            artifacts=artifacts, holdout=(start.fp32.holdout, sim_holdout, checks.int8_holdout), report_files=report,
            results=results, log=log)
    out = config.destination
    output = QatOutput(out, out / QDQ_ONNX, out / manifest_path.name, results, read_manifest(out))
    if training.interrupted:
        log.warn(f"interrupted after {len(training.history)} epoch(s): the best checkpoint so far (epoch "
                 f"{training.best_epoch}) is in {display_path(out)}, marked partial")
        raise KeyboardInterrupt
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(out)}; report: {display_path(out / 'report.md')}")
    enforce_gates(ptq_gates(config, results), subject="int8 model", hint=GATE_HINT)
    return output


def _training_set(config: QatConfig, start: FloatStart, eval_data: Path | None, log: StageLog) -> _TrainSet:
    """The calibration photos, --train-images and --train-data's photos (with their depth), augmented,
    and the fp32 ONNX's outputs on them (the teacher's answers, computed once)."""
    frames = _train_frames(config.train_data, eval_data) if config.train_data is not None else []
    with log.step("teacher") as step:
        calibration = np.concatenate([batch.numpy() for batch in start.inputs.calibration_batches])
        extra = list_images(config.train_images) if config.train_images is not None else []
        calibration, extra, frames = _first(config.num_train, calibration, extra, frames)
        photos = [calibration, *(load_contract_image(path)[None] for path in extra)]
        depth = None
        if frames:
            labelled = [_frame_with_depth(frame) for frame in frames]
            photos += [image[None] for image, _ in labelled]
            depth = np.zeros((sum(map(len, photos)), 1, *calibration.shape[2:]), np.float32)
            depth[len(depth) - len(frames):] = np.stack([truth for _, truth in labelled])[:, None]
        count = sum(map(len, photos))
        images, depth = augmented(np.concatenate(photos), depth, config.augment)
        targets = start.fp32.runner.run(images)
        step.detail = (f"fp32 outputs on {len(images)} training images: {len(calibration)} calibration photos + "
                       f"{len(extra)} from --train-images + {len(frames)} RGB-D frames from --train-data"
                       + (", each also mirrored" if len(images) > count else ""))
    return _TrainSet(images, targets, depth, extra, frames, photos=count,
                     ground_truth_weight=config.ground_truth_weight if frames else 0.0)


def _first(limit: int | None, *groups):
    """The groups cut to at most `limit` items in all, the earlier groups first."""
    if limit is None:
        return groups
    kept = []
    for group in groups:
        kept.append(group[:max(0, limit)])
        limit -= len(kept[-1])
    return kept


def _train_frames(train_data: Path, eval_data: Path | None) -> list[Frame]:
    """--train-data's frames; none of them may be a frame the F-score against ground truth is measured on."""
    frames = load_rgbd_dataset(train_data)
    if eval_data is not None:
        scored = {frame.rgb_path.resolve() for frame in load_rgbd_dataset(eval_data) if frame.rgb_path is not None}
        shared = [frame.name for frame in frames if frame.rgb_path is not None and frame.rgb_path.resolve() in scored]
        if shared:
            raise ConfigError(f"--train-data {train_data} holds {len(shared)} frame(s) that --eval-data {eval_data} "
                              f"scores (e.g. {shared[0]}): the F-score against ground truth would be measured on "
                              "frames trained on",
                              hint="train on other RGB-D sets than those --eval-data scores, or pass --eval-data "
                                   "with sets kept out of training")
    return frames


def _frame_with_depth(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """A --train-data frame's photo and its measured depth in metres where the ground truth is valid, else 0."""
    from lpcv_depth.track3_metric import evaluation_masks

    truth = frame.load_ground_truth()
    valid, _ = evaluation_masks(truth.depth, truth.conf)
    return frame.load_image(), np.where(valid, truth.depth, 0).astype(np.float32)


def _train_step(config: QatConfig, sim, start: FloatStart, train: _TrainSet, device: str, log: StageLog) -> Training:
    settings = TrainSettings(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                             patience=config.patience, loss=config.loss, learn_encodings=not config.freeze_encodings,
                             device=device, seed=config.seed, lr_schedule=config.lr_schedule,
                             min_gain_db=config.min_gain,
                             ground_truth_weight=train.ground_truth_weight)

    def on_epoch(epoch, best: float) -> None:
        log.info(f"epoch {epoch.epoch}/{config.epochs}: loss {epoch.loss:.4g}, held-out SQNR "
                 f"{epoch.holdout_sqnr_db:.2f} dB scale-aligned (best {best:.2f} dB; plain "
                 f"{epoch.holdout_sqnr_db_plain:.2f} dB), {epoch.seconds:.0f}s")

    with log.step("train") as step:
        training = fine_tune(sim, train.images, train.targets, start.inputs.holdout_batches, start.fp32.holdout,
                             settings, on_epoch, depth=train.depth)
        step.detail = (f"{len(training.history)} epoch(s) on {device}; held-out SQNR (scale-aligned) "
                       f"{training.start_sqnr_db:.2f} -> {training.best_sqnr_db:.2f} dB (epoch {training.best_epoch} "
                       "kept)")
        if training.interrupted:
            step.detail += "; INTERRUPTED"
    return training


def _training_record(config: QatConfig, training: Training, train: _TrainSet, device: str) -> QatTraining:
    return QatTraining(loss=config.loss, epochs_planned=config.epochs, epochs_done=len(training.history),
                       best_epoch=training.best_epoch, stopped_early=training.stopped_early,
                       learned_encodings=not config.freeze_encodings, device=device, train_images=len(train.images),
                       lr=config.lr, batch_size=config.batch_size, start_holdout_sqnr_db=training.start_sqnr_db,
                       best_holdout_sqnr_db=training.best_sqnr_db, history=training.history,
                       peak_rss_mb=training.peak_rss_mb, lr_schedule=config.lr_schedule, augment=config.augment,
                       photos=train.photos, ground_truth_frames=len(train.frames),
                       ground_truth_weight=train.ground_truth_weight)


def _inputs_record(ptq: PtqFolder, start: FloatStart, train: _TrainSet, reproduced: dict) -> dict:
    fp32 = start.fp32
    record = manifest_inputs(start.export, fp32.onnx, fp32.onnx_sha256, fp32.weights, start.inputs.split)
    record["ptq_manifest"] = {"path": os.fspath(ptq.folder / MANIFEST_NAME),
                              "sha256": sha256_file(ptq.folder / MANIFEST_NAME),
                              "rebuilt_sim_vs_saved": reproduced}
    for name, files in (("train_images", train.extra), ("train_data", dataset_files(train.frames))):
        if files:
            root = Path(os.path.commonpath([p.parent for p in files]))
            record[name] = {"root": os.fspath(root), "count": len(files), "sha256": sha256_of_files(files, root)}
    return record


def _report(config: QatConfig, ptq: PtqFolder, folder: Path, results: QatResults, start: FloatStart,
            int8_holdout: np.ndarray, log: StageLog) -> list[Path]:
    from lpcv_depth.stages.ptq_report import write_report

    with log.step("report") as step:
        files = write_report(folder, ptq.config, results, start.fp32.holdout, int8_holdout,
                             record=config.as_dict(), title="QAT report", sections=(_training_section(results),))
        step.artifact = folder / "report.md"
    return files


def _training_section(results: QatResults) -> str:
    training, before, after = results.training, results.ptq_int8_vs_fp32, results.int8_vs_fp32
    rows = [("SQNR vs fp32", f"{before.sqnr_db:.2f} dB", f"{after.sqnr_db:.2f} dB"),
            ("SQNR, scale-aligned", f"{before.sqnr_db_scale_aligned:.2f} dB", f"{after.sqnr_db_scale_aligned:.2f} dB"),
            ("F-score vs fp32", f"{before.fscore_vs_fp32:.2f}", f"{after.fscore_vs_fp32:.2f}")]
    if results.ptq_ground_truth is not None and results.ground_truth is not None:
        rows.append(("F-score drop vs ground truth", f"{results.ptq_ground_truth.fscore_drop:.2f}",
                     f"{results.ground_truth.fscore_drop:.2f}"))
    epochs = [(str(e.epoch), f"{e.loss:.4g}", f"{e.holdout_sqnr_db:.2f}", f"{e.holdout_sqnr_db_plain:.2f}",
               f"{e.seconds:.0f}") for e in training.history]
    state = ("PARTIAL: interrupted; the best checkpoint of the epochs done" if results.partial
             else "stopped early (no gain for --patience epochs)" if training.stopped_early else "all epochs run")
    return ("## QAT: ptq start vs fine-tuned (ONNX Runtime, held-out images)\n\n"
            + markdown_table(["metric", "ptq", "qat"], rows, align="lrr")
            + f"\n{training.loss} loss, lr {training.lr:g} ({training.lr_schedule}), batch {training.batch_size}, "
              f"{_photos_text(training)}, ranges {'learned' if training.learned_encodings else 'frozen'}, on {training.device}; "
              f"{state}; epoch {training.best_epoch} kept (0 = the ptq start).\n\n"
            + markdown_table(["epoch", "loss", "held-out SQNR, scale-aligned, dB", "plain, dB", "seconds"], epochs,
                             align="rrrrr"))


def _photos_text(training: QatTraining) -> str:
    text = f"{training.photos or training.train_images} photos"
    if training.ground_truth_frames:
        text += (f" ({training.ground_truth_frames} with measured depth, ground-truth weight "
                 f"{training.ground_truth_weight:g})")
    return text + (", each also mirrored" if training.augment == "flip" else "")


def _interrupted(config: QatConfig) -> str:
    """What Ctrl+C left: the best checkpoint marked partial when training was under way, else nothing."""
    manifest = config.destination / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "nothing was written"
    if data.get("stage") == STAGE and data.get("results", {}).get("partial"):
        return f"the best checkpoint so far is in {display_path(config.destination)}, marked partial (results.partial)"
    return "nothing was written"


def _next_hint(result: QatOutput) -> str:
    folder = display_path(result.out_dir)
    return f"{command_line('htp-check', '--ptq', folder)}   (then: {command_line('hub', folder)})"


DEFINITION = StageDefinition(name=STAGE, config=QatConfig, run=run_qat, description=__doc__, next_hint=_next_hint,
                             interrupted=_interrupted)
