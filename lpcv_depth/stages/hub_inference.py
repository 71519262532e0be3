"""On-device inference and its scores: the frames (--eval-data or --images) loaded and uploaded as a
dataset in the model's input dtype, the inference job, its outputs saved as device_outputs/, ONNX
Runtime on the host reference for device-vs-host fidelity, and the evaluate stage against ground
truth on exactly the frames sent to the device."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np

from lpcv_depth.backends.ai_hub import HubClient, HubError, HubJob, TensorInfo
from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError
from lpcv_depth.manifest import MANIFEST_NAME, Manifest, sha256_of_files
from lpcv_depth.results import EvaluateGroup, EvaluateResults, HubGroundTruth, HubHostFidelity, HubInference
from lpcv_depth.stages.hub_device import device_io, from_device, to_device
from lpcv_depth.stages.hub_jobs import STAGE, ArtifactRun, DeviceModel, now_utc, submit_or_resume, wait_for

if TYPE_CHECKING:
    from lpcv_depth.stages.hub import HubConfig

__all__ = ["run_on_device"]


def run_on_device(run: ArtifactRun, model: DeviceModel) -> HubInference | None:
    """The frames through the device, their outputs saved, then measured against the host and GT."""
    config = run.config
    if not config.inference:
        return None
    if config.data_folder is None:
        run.log.info("no --eval-data or --images: skipping the on-device inference step")
        return None
    frames = _load_frames_step(run)
    (inputs, outputs), source = device_io(run, model)
    data = _device_data(run, frames, inputs[0])
    job, device = _inference_job(run, model, data, outputs[0], len(frames.names))
    _save_device_outputs(run, frames, device)
    vs_host, host = _host_fidelity(run, frames, device)
    ground_truth = _ground_truth(run, frames, host is not None) if frames.frames is not None else None
    options = run.plan.device_job_options(config.inference_options)
    return HubInference(job_id=job.job_id, url=job.url, options=options,
                        dataset_id=_dataset_id(run, data), data=frames.description, input_dtype=data.dtype,
                        outputs="device_outputs", vs_host=vs_host, ground_truth=ground_truth, io_source=source)


@dataclass
class _Frames:
    """The images sent to the device: ids, where each output goes, the pixels, and their hash."""

    names: list[tuple[str, str]]  # (set, frame id)
    images: np.ndarray  # (N, 3, 480, 640) float32 in [0, 255]
    sha256: str
    frames: list | None  # rgbd Frames (for ground truth), None for plain photos
    description: dict


class _DeviceData(NamedTuple):
    """The frames as the device's model takes them, and the content key the inference job records
    (the same on every run: it depends on the frames and the model's input, not on the upload)."""

    key: str
    name: str
    dtype: str
    arrays: np.ndarray


def _load_frames(config: HubConfig) -> _Frames:
    from lpcv_depth.images import list_images, load_contract_batch

    if config.eval_data is not None:
        from lpcv_depth.rgbd import load_rgbd_dataset

        frames = load_rgbd_dataset(config.eval_data)[:config.max_frames]
        names = [(frame.set_name, frame.frame_id) for frame in frames]
        images = np.stack([frame.load_image() for frame in frames])
        files = [frame.rgb_path for frame in frames]
        root = Path(config.eval_data)
    else:
        root = Path(config.images)
        files = list_images(root)[:config.max_frames]
        if not files:
            raise ConfigError(f"no JPG/PNG images in --images {root}", hint="pass a folder of .jpg/.png photos")
        names = [("images", path.relative_to(root).with_suffix("").as_posix().replace("/", "__")) for path in files]
        images = load_contract_batch(files)
        frames = None
    description = {"path": os.fspath(root.resolve()), "kind": "rgbd" if frames is not None else "images",
                   "frames": len(names), "max_frames": config.max_frames}
    return _Frames(names, images, sha256_of_files(files, root), frames, description)


def _load_frames_step(run: ArtifactRun) -> _Frames:
    with run.log.step("load-frames") as step:
        frames = _load_frames(run.config)
        step.detail = f"{len(frames.names)} frames from {run.config.data_folder}"
    return frames


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _device_data(run: ArtifactRun, frames: _Frames, tensor: TensorInfo) -> _DeviceData:
    arrays = to_device(frames.images, tensor)
    key = _digest({"frames": frames.sha256, "input": tensor.name, "dtype": str(arrays.dtype), "scale": tensor.scale,
                   "zero_point": tensor.zero_point, "ids": frames.names})
    return _DeviceData(key, tensor.name, str(arrays.dtype), arrays)


def _dataset_handle(run: ArtifactRun, data: _DeviceData) -> Any:
    """The frames on the hub: --dataset-id, the upload recorded for the same content while the hub
    keeps it, or a new upload. Only needed when an inference job is submitted."""
    datasets = run.state.data["datasets"]
    with run.log.step("dataset") as step:
        dataset_id = run.config.dataset_id or datasets.get(data.key, {}).get("dataset_id")
        dataset = run.client.get_dataset(dataset_id) if dataset_id else None
        if dataset is None and run.config.dataset_id:
            raise HubError(f"dataset {run.config.dataset_id} is gone or expired on AI Hub",
                           hint="drop --dataset-id to upload the frames again (hub datasets expire after 30 days)")
        if dataset is None:
            if dataset_id:
                run.log.info(f"dataset {dataset_id} is gone or expired on AI Hub: uploading the frames again")
            dataset = run.client.upload_dataset({data.name: [array[None] for array in data.arrays]},
                                                name=f"lpcv-{len(data.arrays)}frames")
            dataset_id = str(dataset.dataset_id)
            datasets[data.key] = {"dataset_id": dataset_id, "frames": len(data.arrays), "uploaded": now_utc()}
            run.state.save()
        step.detail = f"dataset {dataset_id}, {len(data.arrays)} x {tuple(data.arrays.shape[1:])} {data.dtype}"
    return dataset


def _dataset_id(run: ArtifactRun, data: _DeviceData) -> str:
    return run.config.dataset_id or run.state.data["datasets"].get(data.key, {}).get("dataset_id", "")


def _inference_job(run: ArtifactRun, model: DeviceModel, data: _DeviceData, tensor: TensorInfo,
                   count: int) -> tuple[HubJob, np.ndarray]:
    config = run.config
    options = run.plan.device_job_options(config.inference_options)
    key = {"model": model.key, "device": config.device, "dataset": data.key, "options": options}
    with run.log.step("inference") as step:
        job = submit_or_resume(run, "inference", key, lambda: run.client.submit_inference(
            model.handle, config.device, _dataset_handle(run, data), options, run.job_name, wait_s=config.timeout))
        wait_for(run, job)
        device = _device_outputs(run.client, job, tensor, count)
        step.detail = f"job {job.job_id}, {len(device)} outputs"
    return job, device


def _device_outputs(client: HubClient, job: HubJob, tensor: TensorInfo, count: int) -> np.ndarray:
    outputs = client.output_data(job)
    name = tensor.name if tensor is not None and tensor.name in outputs else TRACK3.output.name
    if name not in outputs:
        if len(outputs) != 1:
            raise HubError(f"inference job {job.job_id} returned outputs {sorted(outputs)}; none is "
                           f"{TRACK3.output.name!r}", hint="export the model with the contract output name")
        name = next(iter(outputs))
    arrays = outputs[name]
    if len(arrays) != count:
        raise HubError(f"inference job {job.job_id} returned {len(arrays)} outputs for {count} frames",
                       hint="rerun with --force to resubmit the inference job")
    return np.concatenate([from_device(array, tensor) for array in arrays])


def _save_outputs(folder: Path, names: list[tuple[str, str]], outputs: np.ndarray) -> list[Path]:
    paths = []
    for (set_name, frame_id), output in zip(names, outputs):
        path = folder / set_name / f"{frame_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, output.reshape(TRACK3.output.concrete_shape(1)).astype(np.float32))
        paths.append(path)
    return paths


def _save_device_outputs(run: ArtifactRun, frames: _Frames, device: np.ndarray) -> None:
    """device_outputs/ afresh; the host outputs and scores of an earlier run go with it."""
    for folder in ("device_outputs", "host_outputs", "eval"):
        shutil.rmtree(run.out / folder, ignore_errors=True)
    run.outputs += _save_outputs(run.out / "device_outputs", frames.names, device)


def _host_fidelity(run: ArtifactRun, frames: _Frames,
                   device: np.ndarray) -> tuple[HubHostFidelity | None, np.ndarray | None]:
    """ONNX Runtime on the host reference, same frames, against the device: SQNR, max abs diff and
    the Track 3 F-score with the host output as the reference."""
    from lpcv_depth.verify import OrtRunner, output_fidelity

    reference = run.artifact.host_reference
    if reference is None:
        run.log.info("no host reference ONNX (a .bin without --reference-onnx): skipping device vs host")
        return None, None
    with run.log.step("host-reference") as step:
        host = OrtRunner(reference, threads=run.config.threads).run(frames.images)
        run.outputs += _save_outputs(run.out / "host_outputs", frames.names, host)
        step.detail = f"ONNX Runtime on {reference.name}, {len(host)} frames"
    if host.shape != device.shape:
        raise HubError(f"device outputs {device.shape} and host outputs {host.shape} do not line up")
    with run.log.step("device-vs-host") as step:
        measured = output_fidelity(host, device, workers=run.config.threads or -1)
        fidelity = HubHostFidelity(reference=os.fspath(reference), sqnr_db=measured.sqnr_db,
                                   max_abs_diff=measured.max_abs_diff, fscore_vs_host=measured.fscore,
                                   fscore_vs_host_per_frame=measured.fscore_per_image)
        step.detail = (f"SQNR {fidelity.sqnr_db:.1f} dB, max abs {fidelity.max_abs_diff:.4f}, "
                       f"F-score vs host {fidelity.fscore_vs_host:.1f}")
    return fidelity, host


@contextmanager
def _scored_frames(run: ArtifactRun, frames: _Frames) -> Iterator[Path]:
    """The RGB-D folder evaluate should score: --eval-data, or with --max-frames a folder linking
    only the frames sent to the device (removed afterwards)."""
    if run.config.max_frames is None:
        yield Path(run.config.eval_data)
        return
    subset = run.out / ".eval-frames"
    _link_frames(frames.frames, subset)
    try:
        yield subset
    finally:
        shutil.rmtree(subset, ignore_errors=True)


def _link_frames(frames: list, folder: Path) -> None:
    """A folder of sets holding only `frames` (links to their files), so evaluate scores just those."""
    shutil.rmtree(folder, ignore_errors=True)
    for frame in frames:
        for source in [*frame.files, frame.set_dir / "meta.json"]:
            if not source.is_file():
                continue
            target = folder / frame.set_name / source.relative_to(frame.set_dir)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(source.resolve())
            except OSError:
                shutil.copy(source, target)


def _evaluate(run: ArtifactRun, data: Path, label: str) -> EvaluateGroup:
    """The evaluate stage on <label>_outputs/, into eval/<label>/; its overall scores."""
    from lpcv_depth.stages.evaluate import evaluate_within

    folder = run.out / "eval" / label
    evaluate_within(STAGE, label, data, folder, predictions=run.out / f"{label}_outputs", num_vis=2,
                    threads=run.config.threads, median=run.config.median)
    manifest = Manifest.read(folder, stage="evaluate")
    run.outputs += [folder / MANIFEST_NAME, *(folder / output.path for output in manifest.outputs)]
    return manifest.results_as(EvaluateResults).overall


def _ground_truth(run: ArtifactRun, frames: _Frames, with_host: bool) -> HubGroundTruth:
    """Device (and host) outputs through the evaluate stage, on exactly the frames sent to the device."""
    from lpcv_depth.track3_metric import FSCORE

    with _scored_frames(run, frames) as data, run.log.step("ground-truth") as step:
        device = _evaluate(run, data, "device")
        host = _evaluate(run, data, "host") if with_host else None
        drop = host.metrics[FSCORE] - device.metrics[FSCORE] if host is not None else None
        step.detail = f"F@0.1 device {device.metrics[FSCORE]:.2f}" + (
            f", host {host.metrics[FSCORE]:.2f}, drop {drop:.2f}" if host is not None else "")
    return HubGroundTruth(frames=device.scored, skipped=device.skipped, device=device.metrics,
                          host=host.metrics if host is not None else None, fscore_drop=drop)
