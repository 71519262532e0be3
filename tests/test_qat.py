"""QAT end to end on the real FastDepth from the shared w8a8 ptq folder (conftest): the rebuilt
QuantSim, a short fine-tune that must beat its ptq start, the same artifacts and checks as ptq, the
stages that take its folder, and the refusals. A few photos and one epoch keep the default suite quick."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")

from lpcv_depth.cli import main  # noqa: E402
from lpcv_depth.errors import ConfigError  # noqa: E402
from lpcv_depth.manifest import ArtifactMismatchError, Manifest, read_manifest, sha256_file  # noqa: E402
from lpcv_depth.results import QatResults  # noqa: E402
from lpcv_depth.stages.qat import QatConfig, run_qat  # noqa: E402

# One epoch over 4 photos (2 steps): seconds of training, enough to exercise every step of the stage.
SHORT_RUN = dict(epochs=1, num_train=4, batch_size=2, lr=1e-4)


@pytest.fixture(scope="module")
def qat_run(fastdepth_w8a8, tmp_path_factory):
    return run_qat(QatConfig(ptq=fastdepth_w8a8.out_dir, out=tmp_path_factory.mktemp("qat") / "qat-w8a8",
                             **SHORT_RUN))


def test_qat_keeps_its_best_checkpoint_and_does_no_harm(qat_run):
    """FastDepth w8a8 is already within noise of fp32 (docs/qat.md): an epoch that does not beat the
    ptq start on the scale-aligned held-out SQNR is not kept, so the exported model is never worse."""
    results = qat_run.results
    training = results.training
    assert training.epochs_done == 1 and not results.partial and not training.stopped_early
    epoch = training.history[0]
    if epoch.holdout_sqnr_db > training.start_holdout_sqnr_db:
        assert training.best_epoch == 1 and training.best_holdout_sqnr_db == epoch.holdout_sqnr_db
    else:
        assert training.best_epoch == 0 and training.best_holdout_sqnr_db == training.start_holdout_sqnr_db
    # The exported QDQ model (ONNX Runtime) against fp32, as ptq measures it: the kept sim's figure, within
    # the QDQ-vs-sim parity (ptq's own start is ptq_int8_vs_fp32).
    assert results.int8_vs_fp32.sqnr_db_scale_aligned > results.ptq_int8_vs_fp32.sqnr_db_scale_aligned - 1.0
    assert results.ground_truth is not None and results.ptq_ground_truth is not None  # ptq's --eval-data


def test_the_rebuilt_quantsim_is_the_ptq_one(qat_run, fastdepth_w8a8):
    inputs = qat_run.manifest["inputs"]
    reproduced = inputs["ptq_manifest"]["rebuilt_sim_vs_saved"]
    assert reproduced["max_abs_diff"] < 1e-3 and (reproduced["sqnr_db"] is None or reproduced["sqnr_db"] >= 60)
    assert inputs["ptq_manifest"]["sha256"] == sha256_file(fastdepth_w8a8.out_dir / "manifest.json")
    assert inputs["fp32_onnx"] == fastdepth_w8a8.manifest["inputs"]["fp32_onnx"]
    assert inputs["calibration"] == fastdepth_w8a8.manifest["inputs"]["calibration"]


def test_a_4bit_folder_is_rebuilt_bit_for_bit(fastdepth_w4a8, tmp_path):
    # Read back from AI Hub's .encodings, 4-bit weight encodings gave 37.6 dB instead (docs/qat.md).
    result = run_qat(QatConfig(ptq=fastdepth_w4a8.out_dir, out=tmp_path / "qat-w4a8", **(SHORT_RUN | {"num_train": 2})))
    reproduced = result.manifest["inputs"]["ptq_manifest"]["rebuilt_sim_vs_saved"]
    assert reproduced["sqnr_db"] is None and reproduced["max_abs_diff"] == 0.0


@pytest.mark.slow  # SeqMSE's ptq and the qat on it: minutes on 2 cores
def test_seq_mse_weight_encodings_are_read_back_from_the_folder(fastdepth_export, calib_subset, tmp_path):
    from lpcv_depth.stages.ptq import run_ptq
    from tests.conftest import fastdepth_ptq_config

    ptq = run_ptq(fastdepth_ptq_config(fastdepth_export, calib_subset, tmp_path / "seqmse", seq_mse=True,
                                       seq_mse_candidates=5, calibration_scheme="min-max", latency_runs=0))
    result = run_qat(QatConfig(ptq=ptq.out_dir, out=tmp_path / "qat", **(SHORT_RUN | {"num_train": 2})))
    reproduced = result.manifest["inputs"]["ptq_manifest"]["rebuilt_sim_vs_saved"]
    saved = np.load(ptq.out_dir / "holdout_outputs.npz")
    from lpcv_depth.verify import sqnr_db

    ptq_vs_fp32 = sqnr_db(saved["fp32"], saved["aimet_sim"])
    assert reproduced["sqnr_db"] is None or reproduced["sqnr_db"] >= min(60.0, ptq_vs_fp32 + 20.0)


def test_it_writes_what_ptq_writes(qat_run, fastdepth_w8a8):
    out = qat_run.out_dir
    manifest = Manifest.read(out, stage="qat")
    results = manifest.results_as(QatResults)
    assert results.preset == "w8a8" and results.model == "fastdepth"
    ptq_files = {o["path"] for o in fastdepth_w8a8.manifest["outputs"]}
    assert {o.path for o in manifest.outputs} == ptq_files
    saved = np.load(out / "holdout_outputs.npz")
    assert set(saved.files) == {"fp32", "aimet_sim", "int8_qdq"}
    report = (out / "report.md").read_text()
    assert "# QAT report: w8a8" in report and "| epoch | loss |" in report
    assert json.loads((out / "report.json").read_text())["config"]["ptq"] == str(fastdepth_w8a8.out_dir)


def test_htp_check_and_evaluate_take_the_qat_folder(qat_run, rgbd_dir, tmp_path):
    pytest.importorskip("onnxruntime_qnn", reason="the qnn extra is not installed")
    from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate
    from lpcv_depth.stages.htp_check import HtpCheckConfig, run_htp_check

    htp = run_htp_check(HtpCheckConfig(ptq=qat_run.out_dir, max_frames=1, fp16_baseline=False,
                                       out=tmp_path / "htp"))
    assert htp.results.coverage.full_htp
    scored = run_evaluate(EvaluateConfig(data=rgbd_dir / "kinect_home", onnx=qat_run.qdq_onnx, out=tmp_path / "eval",
                                         num_vis=0, threads=1))
    assert scored.results.overall.scored == qat_run.results.ground_truth.frames


def test_hub_and_compare_read_a_qat_folder(qat_run, fastdepth_export):
    from lpcv_depth.stages.compare import CompareConfig, read_inputs
    from lpcv_depth.stages.hub_artifacts import resolve_artifact

    artifact = resolve_artifact(qat_run.out_dir)
    assert artifact.kind == "ptq" and artifact.label == "qat-w8a8" and artifact.upload.suffix == ".aimet"
    inputs = read_inputs(CompareConfig(fp32=fastdepth_export, int8=qat_run.out_dir))
    assert isinstance(inputs.ptq.results, QatResults) and inputs.ptq_fp32_matches


def _fails_with_fix(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fix:" in err
    return err


def test_bad_options_exit_2_with_a_fix(fastdepth_w8a8, tmp_path, capsys):
    ptq = str(fastdepth_w8a8.out_dir)
    assert "epochs must be >= 1" in _fails_with_fix(["qat", "--ptq", ptq, "--epochs", "0"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    assert "holds no JPG/PNG images" in _fails_with_fix(["qat", "--ptq", ptq, "--train-images", str(empty)], capsys)
    with pytest.raises(SystemExit) as exited:  # argparse refuses a value outside the choices
        main(["qat", "--ptq", ptq, "--device", "tpu"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'tpu'" in err and "fix:" in err
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        QatConfig(ptq=fastdepth_w8a8.out_dir, device="tpu")
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_and_auto_picks_what_there_is(fastdepth_w8a8, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _fails_with_fix(["qat", "--ptq", str(fastdepth_w8a8.out_dir), "--device", "cuda"], capsys)
    assert "torch sees no CUDA GPU" in err and "--device cpu" in err
    from lpcv_depth.device import resolve_device

    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


def test_a_ptq_folder_whose_export_changed_is_refused(fastdepth_w8a8, tmp_path, capsys):
    """The export is redone (another model.onnx, its manifest consistent) after ptq quantized the old one."""
    ptq_manifest = read_manifest(fastdepth_w8a8.out_dir)
    export = Path(ptq_manifest["config"]["fp32"])
    new_export, ptq = tmp_path / "export", tmp_path / "ptq-w8a8"
    shutil.copytree(export, new_export)
    shutil.copytree(fastdepth_w8a8.out_dir, ptq)
    onnx_path = new_export / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # another file, recorded as the export's own
    export_manifest = read_manifest(new_export)
    for output in export_manifest["outputs"]:
        if output["path"] == "model.onnx":
            output.update(bytes=onnx_path.stat().st_size, sha256=sha256_file(onnx_path))
    (new_export / "manifest.json").write_text(json.dumps(export_manifest))
    ptq_manifest["config"]["fp32"] = str(new_export)
    (ptq / "manifest.json").write_text(json.dumps(ptq_manifest))
    with pytest.raises(ArtifactMismatchError, match="changed since"):
        run_qat(QatConfig(ptq=ptq, out=tmp_path / "qat"))
    err = _fails_with_fix(["qat", "--ptq", str(ptq), "--out", str(tmp_path / "qat")], capsys)
    assert "sha256 differs" in err
    assert not (tmp_path / "qat").exists()


def test_not_a_ptq_folder_is_refused(fastdepth_export, tmp_path, capsys):
    err = _fails_with_fix(["qat", "--ptq", str(fastdepth_export), "--out", str(tmp_path / "qat")], capsys)
    assert "holds a 'export' stage output, not ptq" in err


class _Tiny:
    """A stand-in QuantSim: `model` is what fine_tune trains (two convs, one weight each)."""

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(4, 1, 3, padding=1), torch.nn.Sigmoid())


def _tiny_data():
    import torch

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (6, 3, 16, 16)).astype(np.float32)
    targets = (0.2 + 0.6 * images.mean(1, keepdims=True)).astype(np.float32)
    holdout = [torch.from_numpy(images[i:i + 1]) for i in range(2)]
    return images, targets, holdout, targets[:2]


def test_an_interrupt_keeps_the_best_checkpoint_so_far(monkeypatch):
    from lpcv_depth.stages import qat_train

    images, targets, holdout, reference = _tiny_data()
    settings = qat_train.TrainSettings(epochs=5, lr=1e-2, batch_size=2, patience=5, loss="si-log",
                                       learn_encodings=True, device="cpu", seed=0)
    real_epoch, calls = qat_train._one_epoch, []

    def epoch_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(qat_train, "_one_epoch", epoch_then_ctrl_c)
    sim = _Tiny()
    training = qat_train.fine_tune(sim, images, targets, holdout, reference, settings, lambda *_: None)
    assert training.interrupted and len(training.history) == 2
    best = max(training.history, key=lambda e: e.holdout_sqnr_db)
    if best.holdout_sqnr_db > training.start_sqnr_db:
        assert training.best_epoch == best.epoch
    # The sim holds the kept checkpoint: its held-out SQNR is the best one recorded.
    assert qat_train._holdout_sqnr(sim.model, holdout, reference, "cpu")[0] == pytest.approx(training.best_sqnr_db,
                                                                                            abs=1e-4)


def test_early_stopping_keeps_the_best_epoch(monkeypatch):
    from lpcv_depth.stages import qat_train

    images, targets, holdout, reference = _tiny_data()
    scores = iter([10.0, 12.0, 11.0, 11.5, 13.0])
    monkeypatch.setattr(qat_train, "_holdout_sqnr", lambda *_: (next(scores), 0.0))
    settings = qat_train.TrainSettings(epochs=4, lr=1e-3, batch_size=3, patience=2, loss="si-log-grad",
                                       learn_encodings=False, device="cpu", seed=0)
    training = qat_train.fine_tune(_Tiny(), images, targets, holdout, reference, settings, lambda *_: None)
    assert [e.epoch for e in training.history] == [1, 2, 3]
    assert training.best_epoch == 1 and training.best_sqnr_db == 12.0 and training.stopped_early


def test_losses_are_scale_invariant():
    import torch

    from lpcv_depth.stages.qat_train import LOSSES, qat_loss

    rng = np.random.default_rng(1)
    teacher = torch.from_numpy(rng.uniform(0.1, 1, (2, 1, 32, 32)).astype(np.float32))
    student = torch.from_numpy(rng.uniform(0.1, 1, (2, 1, 32, 32)).astype(np.float32))
    for loss in LOSSES:
        assert float(qat_loss(loss, teacher * 0.5, teacher)) == pytest.approx(0.0, abs=1e-6)
        assert float(qat_loss(loss, student, teacher)) > 0.01
        assert float(qat_loss(loss, student * 0.7, teacher)) == pytest.approx(float(qat_loss(loss, student, teacher)),
                                                                            rel=1e-4)


@pytest.mark.slow  # a second rebuild and export; the interrupt itself is covered by the test above
def test_ctrl_c_during_training_writes_a_partial_output(fastdepth_w8a8, tmp_path, monkeypatch, capsys):
    from lpcv_depth.stages import qat_train

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qat_train, "_one_epoch", ctrl_c)
    out = tmp_path / "qat"
    assert main(["qat", "--ptq", str(fastdepth_w8a8.out_dir), "--out", str(out), "--num-train", "2"]) == 130
    assert "marked partial" in capsys.readouterr().err
    manifest = Manifest.read(out, stage="qat")
    results = manifest.results_as(QatResults)
    assert results.partial and results.training.epochs_done == 0 and results.training.best_epoch == 0


def test_docs_flag_table_matches_the_config():
    import re

    from lpcv_depth.options import cli_fields, flag_name

    page = (Path(__file__).resolve().parents[1] / "docs" / "qat.md").read_text()
    text = page.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `--")]
    flags = {flag for row in rows for flag in re.findall(r"--[a-z0-9-]+", row[1]) if not flag.startswith("--no-")}
    assert {flag_name(field.name) for field, _ in cli_fields(QatConfig)} | {"--workspace"} == flags


def test_run_chains_qat_between_ptq_and_the_int8_stages(calib_subset, tmp_path):
    from lpcv_depth.runner import check_steps
    from lpcv_depth.stages.pipeline import RunConfig, plan_steps

    root = tmp_path / "run"
    base = dict(model="fastdepth", weights="None", calib=calib_subset, out=root)
    steps = {step.name: step for step in plan_steps(RunConfig(**base, qat=True, qat_args="--epochs 2"), root)}
    check_steps(steps.values())
    assert steps["qat"].config.ptq == steps["ptq"].folder and steps["qat"].config.epochs == 2
    assert steps["htp-check"].config.ptq == steps["compare"].config.int8 == steps["qat"].folder
    assert steps["hub"].config.artifact == steps["qat"].folder and steps["hub"].folder.name == "hub-qat-w8a8"
    without = {step.name: step for step in plan_steps(RunConfig(**base), root)}
    assert "qat" not in without and without["compare"].config.int8 == without["ptq"].folder
    with pytest.raises(ConfigError, match="--qat-args given without --qat"):
        RunConfig(**base, qat_args="--epochs 2")
    with pytest.raises(ConfigError, match="wires itself"):
        check_steps(plan_steps(RunConfig(**base, qat=True, qat_args="--ptq elsewhere"), root))


def test_a_rebuild_must_differ_from_ptq_far_less_than_ptq_from_fp32():
    from lpcv_depth.stages.qat_start import REPRODUCED_LOADED_MARGIN_DB, REPRODUCED_MIN_SQNR_DB, _reproduction_floor
    from lpcv_depth.verify import sqnr_db

    rng = np.random.default_rng(0)
    fp32 = rng.random((2, 1, 8, 8)).astype(np.float32)
    saved = fp32 + rng.normal(0, 0.1, fp32.shape).astype(np.float32)  # a ptq sim well away from fp32
    floor = _reproduction_floor(fp32, saved)
    assert floor == pytest.approx(sqnr_db(fp32, saved) + REPRODUCED_LOADED_MARGIN_DB)
    assert floor < REPRODUCED_MIN_SQNR_DB
    assert _reproduction_floor(fp32, fp32 + 1e-6) == REPRODUCED_MIN_SQNR_DB  # never above the exact floor


def test_a_4bit_folder_rebuilds_with_another_thread_count(fastdepth_w4a8, tmp_path):
    """ptq ran with torch's default threads; one thread sums in another order and flips a few 4-bit
    weight roundings (measured: FastDepth w4a8 rebuilt at 38.5 dB against ptq's saved outputs), which
    is no reason to refuse the folder."""
    import torch

    from lpcv_depth.backends.aimet_fast import fast_quantize_dequantize
    from lpcv_depth.stage import StageLog
    from lpcv_depth.stages.ptq import prepare_float_model
    from lpcv_depth.stages.qat_start import read_ptq_folder, rebuild_quantsim

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        log = StageLog("qat")
        ptq = read_ptq_folder(fastdepth_w4a8.out_dir, log)
        with fast_quantize_dequantize():
            _, reproduced = rebuild_quantsim(ptq, prepare_float_model(ptq.config, log), tmp_path, log)
    finally:
        torch.set_num_threads(threads)
    assert reproduced["sqnr_db"] is None or reproduced["sqnr_db"] > 25.0


def test_predict_takes_a_qat_folder_as_it_takes_a_ptq_folder(qat_run, calib_subset, tmp_path):
    photo = sorted(calib_subset.glob("*.jpg"))[0]
    out = tmp_path / "predict"
    assert main(["predict", str(photo), "--ptq", str(qat_run.out_dir), "--save-npy", "--out", str(out)]) == 0
    [saved] = list((out / "npy").rglob("*.npy"))
    assert np.load(saved).shape == (1, 1, 480, 640)


def test_the_ground_truth_term_is_scale_invariant_and_reads_only_valid_pixels():
    import torch

    from lpcv_depth.stages.qat_train import ground_truth_loss

    rng = np.random.default_rng(2)
    student = torch.from_numpy(rng.uniform(0.1, 1, (2, 1, 16, 16)).astype(np.float32))
    depth = torch.from_numpy(rng.uniform(0.5, 4, (2, 1, 16, 16)).astype(np.float32))
    assert float(ground_truth_loss(depth * 0.2, depth)) == pytest.approx(0.0, abs=1e-6)
    assert float(ground_truth_loss(student, depth)) > 0.01
    holes = depth.clone()
    holes[..., :8] = 0  # no ground truth there: what the student says there must not count
    changed = student.clone()
    changed[..., :8] = torch.from_numpy(rng.uniform(0.1, 1, (2, 1, 16, 8)).astype(np.float32))
    assert float(ground_truth_loss(changed, holes)) == pytest.approx(float(ground_truth_loss(student, holes)), rel=1e-5)
    # An unlabeled photo in the batch (all zeros) adds nothing: the loss is the labelled one's alone.
    unlabeled = torch.cat([depth[:1], torch.zeros_like(depth[1:])])
    assert float(ground_truth_loss(student, unlabeled)) == pytest.approx(float(ground_truth_loss(student[:1], depth[:1])),
                                                                         rel=1e-5)
    assert float(ground_truth_loss(student, torch.zeros_like(depth))) == 0.0


def test_flip_appends_each_photo_and_its_depth_mirrored():
    from lpcv_depth.stages.qat_train import augmented

    images = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    depth = np.arange(2 * 1 * 2 * 4, dtype=np.float32).reshape(2, 1, 2, 4)
    assert augmented(images, depth, "none")[0] is images
    flipped, flipped_depth = augmented(images, depth, "flip")
    assert flipped.shape == (4, 3, 2, 4) and flipped_depth.shape == (4, 1, 2, 4)
    np.testing.assert_array_equal(flipped[:2], images)
    np.testing.assert_array_equal(flipped[2:, :, :, 0], images[:, :, :, 3])
    np.testing.assert_array_equal(flipped_depth[2:, :, :, 0], depth[:, :, :, 3])
    assert augmented(images, None, "flip")[1] is None


def test_the_cosine_schedule_runs_from_the_rate_down_to_zero():
    import torch

    from lpcv_depth.stages import qat_train

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    settings = qat_train.TrainSettings(epochs=2, lr=1e-3, batch_size=2, patience=2, loss="si-log",
                                       learn_encodings=True, device="cpu", seed=0, lr_schedule="cosine")
    scheduler = qat_train._lr_scheduler(optimizer, settings, steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(rates, rates[1:])) and optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    constant = dataclasses.replace(settings, lr_schedule="constant")
    assert qat_train._lr_scheduler(optimizer, constant, steps=10) is None


def test_train_data_adds_its_frames_with_their_depth(fastdepth_w8a8, rgbd_dir, tmp_path):
    """tum_desk's 2 frames join ptq's 16 photos; ptq scores kinect_home, which training must not touch."""
    out = tmp_path / "qat"
    result = run_qat(QatConfig(ptq=fastdepth_w8a8.out_dir, out=out, train_data=rgbd_dir / "tum_desk", augment="none",
                               epochs=1, batch_size=6, lr=1e-5))
    training = result.results.training
    assert training.ground_truth_frames == 2 and training.ground_truth_weight == 1.0
    assert training.photos == training.train_images == 16 + 2 and training.augment == "none"
    record = result.manifest["inputs"]["train_data"]
    assert record["count"] == 5 and len(record["sha256"]) == 64  # 2 RGB + 2 depth + meta.json
    assert "2 with measured depth" in (out / "report.md").read_text()


def test_train_data_that_eval_data_scores_is_refused(fastdepth_w8a8, rgbd_dir, tmp_path, capsys):
    out = tmp_path / "qat"
    err = _fails_with_fix(["qat", "--ptq", str(fastdepth_w8a8.out_dir), "--train-data", str(rgbd_dir),
                           "--out", str(out)], capsys)
    assert "frames trained on" in err and "kinect_home/" in err
    assert not out.exists()
    assert "--train-data folder not found" in _fails_with_fix(
        ["qat", "--ptq", str(fastdepth_w8a8.out_dir), "--train-data", str(tmp_path / "none")], capsys)
    assert "ground_truth_weight must be >= 0" in _fails_with_fix(
        ["qat", "--ptq", str(fastdepth_w8a8.out_dir), "--ground-truth-weight", "-1"], capsys)


def test_num_train_takes_the_calibration_photos_first_then_train_images_then_train_data():
    from lpcv_depth.stages.qat import _first

    calibration, extra, frames = np.arange(3), ["a", "b"], ["frame"]
    kept = _first(4, calibration, extra, frames)
    assert list(kept[0]) == [0, 1, 2] and kept[1] == ["a"] and kept[2] == []
    assert _first(2, calibration, extra, frames)[1:] == [[], []]
    assert _first(None, calibration, extra, frames) == (calibration, extra, frames)


def test_an_epoch_within_min_gain_of_the_kept_checkpoint_does_not_replace_it(monkeypatch):
    from lpcv_depth.stages import qat_train

    images, targets, holdout, reference = _tiny_data()
    settings = qat_train.TrainSettings(epochs=3, lr=1e-3, batch_size=3, patience=2, loss="si-log",
                                       learn_encodings=False, device="cpu", seed=0, min_gain_db=0.25)
    scores = iter([10.0, 10.1, 10.2, 12.0])  # the start, then three epochs
    monkeypatch.setattr(qat_train, "_holdout_sqnr", lambda *_: (next(scores), 0.0))
    training = qat_train.fine_tune(_Tiny(), images, targets, holdout, reference, settings, lambda *_: None)
    assert training.best_epoch == 0 and training.best_sqnr_db == 10.0 and training.stopped_early
    assert len(training.history) == 2  # two epochs within 0.25 dB used up the patience
    scores = iter([10.0, 10.1, 10.3, 10.4])  # 0.3 dB over the start is a gain; 0.1 more is not
    training = qat_train.fine_tune(_Tiny(), images, targets, holdout, reference, settings, lambda *_: None)
    assert training.best_epoch == 2 and training.best_sqnr_db == 10.3
