"""The AI Hub stage end to end through the real qai-hub 0.56 client, against an in-memory hub behind its
REST layer (tests/hub_rest_double.py): fp32 and int8 inputs, context binaries, resume, failures,
timeouts, rate limits, S3 failures, proxies, expired datasets, missing package / token / network,
CPU fallback, sharing, the Track 3 contract check and bad input.

Every run goes through qai_hub.Client, its S3 transfers and its error handling; the ptq-like and
htp-check-like input folders and client.ini come from tests/stage_folders.py."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from lpcv_depth import cli
from lpcv_depth.backends import ai_hub
from lpcv_depth.backends.ai_hub import (HubAuthError, HubClient, HubJobFailedError, HubTimeoutError,
                                        HubUnavailableError)
from lpcv_depth.errors import ConfigError, ExitCode, MissingDependencyError, OutputDirError
from lpcv_depth.images import list_images
from lpcv_depth.manifest import MANIFEST_NAME, read_manifest
from lpcv_depth.stage import StageLog
from lpcv_depth.stages.hub import STATE_NAME, HubConfig, resolve_inputs, run_hub, summarize_profile
from lpcv_depth.track3_metric import FSCORE
from tests.stage_folders import make_htp_check_folder, make_ptq_folder, write_client_ini
from tests.hub_rest_double import QUANTIZED_IO, S24, HubRestDouble

REPO = Path(__file__).resolve().parents[1]

EMAIL = "lowpowervision@gmail.com"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                   "no_proxy")


@pytest.fixture(scope="session")
def fp32_export(fastdepth_export) -> Path:
    return fastdepth_export  # conftest: the real FastDepth, exported once per test run


@pytest.fixture(scope="module")
def int8_ptq(fp32_export, calibration_dir) -> Path:
    return make_ptq_folder(fp32_export, fp32_export.parent / "ptq-w8a8", list_images(calibration_dir)[:2])


@pytest.fixture(autouse=True)
def client_ini(tmp_path, monkeypatch) -> Path:
    """Every test reads a token file of its own, never the user's ~/.qai_hub, and no proxy settings."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = write_client_ini(tmp_path / "qai_hub")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(path))
    return path


@pytest.fixture
def hub(client_ini, monkeypatch) -> HubRestDouble:
    """The in-memory AI Hub behind qai_hub's REST functions; client.ini points the real client at it."""
    double = HubRestDouble().install(monkeypatch)
    double.write_client_ini(client_ini.parent)
    yield double
    double.close()


class _Clock:
    """Virtual time for lpcv_depth.backends.ai_hub: its sleeps (rate-limit pauses, polls) are instant."""

    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    virtual = _Clock()
    monkeypatch.setattr(ai_hub, "time", types.SimpleNamespace(monotonic=virtual.monotonic, sleep=virtual.sleep))
    return virtual


def _config(artifact: Path, out: Path | None, **overrides) -> HubConfig:
    options = dict(artifact=artifact, out=out, poll=0.001, timeout=30.0, threads=1)
    options.update(overrides)
    return HubConfig(**options)


def _argv(artifact: Path, out: Path, *extra: str) -> list[str]:
    return [str(artifact), "--out", str(out), "--poll", "0.001", "--threads", "1", *extra]


def main(argv: list[str]) -> int:
    """`lpcv-depth hub ARGV` in-process; the real client talks to whatever hub the test installed."""
    return cli.main(["hub", *argv])


def _copy_stage(folder: Path, into: Path) -> Path:
    return Path(shutil.copytree(folder, into / folder.name, ignore=shutil.ignore_patterns("hub-*")))


# -- The double itself: the real client's behaviour it reproduces -----------------------------------------------------

def _real_client():
    import qai_hub

    return qai_hub, qai_hub.Client()


def test_double_upload_has_empty_specs_until_get_model(hub, fp32_export):
    qai_hub, client = _real_client()
    hub.spec_settle_polls = 1
    model = client.upload_model(str(fp32_export / "model.onnx"))
    assert model.input_spec == {} and model.output_spec == {}  # what upload_model returns, always
    assert client.get_model(model.model_id).input_spec == {}  # the hub has not read the file yet
    [image] = client.get_model(model.model_id).input_spec[None]
    assert (image.name, image.dtype, image.shape) == ("image", "float32", (1, 3, 480, 640))
    assert hub.count("_create_model") == 1 and ("PUT", f"models/{model.model_id}/upload") in hub.s3_requests


def test_double_job_states_messages_and_blocking_downloads(hub, fp32_export):
    qai_hub, client = _real_client()
    hub.extra_states["compile"] = ("QUANTIZING_MODEL", "LINKING_MODELS")
    model = client.upload_model(str(fp32_export / "model.onnx"))
    job = client.submit_compile_job(model, qai_hub.Device(S24), options="--target_runtime qnn_context_binary")
    codes = [job.get_status().code for _ in range(4)]
    assert codes == ["QUANTIZING_MODEL", "LINKING_MODELS", "OPTIMIZING_MODEL", "SUCCESS"]
    assert job.get_status().message == ""  # a protobuf string: never None
    profile_job = client.submit_inference_job(job.get_target_model(), qai_hub.Device(S24), profile=True)
    polls = hub.count("get_job")
    profile = profile_job.download_profile()  # blocks in the client's own Job.wait until the job is done
    assert hub.count("get_job") - polls >= 3 and hub.slept and profile["execution_summary"]["estimated_inference_time"]


def test_double_refuses_float64_expired_datasets_and_mismatched_inputs(hub):
    qai_hub, client = _real_client()
    with pytest.raises(qai_hub.UserError, match="float16, float32"):
        client.upload_dataset({"image": [np.zeros((1, 3, 480, 640))]})  # float64
    assert hub.calls == []  # refused by the client before any request
    dataset = client.upload_dataset({"image": [np.zeros((1, 3, 480, 640), np.float32)]})
    hub.expire(dataset.dataset_id)
    expired = client.get_dataset(dataset.dataset_id)
    assert expired.is_expired()
    with pytest.raises(qai_hub.UserError, match="expired"):
        client.submit_inference_job(client.get_model(_upload_binary(hub, client)), qai_hub.Device(S24),
                                    inputs=expired)
    hub.binary_io = QUANTIZED_IO  # a context binary with uint8 I/O, sent float32 frames: FAILED on the hub
    binary = client.get_model(_upload_binary(hub, client))
    job = client.submit_inference_job(binary, qai_hub.Device(S24), inputs=dataset.download(), profile=False)
    status = job.wait()
    assert status.failure and "Input specification mismatch" in status.message


def _upload_binary(hub: HubRestDouble, client) -> str:
    path = Path(hub._tmp.name) / "model.bin"
    path.write_bytes(b"QNN context binary")
    return client.upload_model(str(path)).model_id


def test_double_429_runs_the_clients_retry_loop_then_rate_limited_error(hub, fp32_export):
    import qai_hub.client

    qai_hub_module, client = _real_client()
    model = client.upload_model(str(fp32_export / "model.onnx"))
    device = qai_hub_module.Device(S24)
    hub.outage("create_compile_job", "429")  # a single-device compile has no retry loop: at once
    with pytest.raises(qai_hub.client.RateLimitedError, match="throttled"):
        client.submit_compile_job(model, device, options="--target_runtime tflite")
    assert hub.count("create_compile_job") == 1 and hub.slept == []
    hub.outage("create_inference_job", "429", times=100)  # submit_inference_job(retry=True) retries for 10 min
    with pytest.raises(qai_hub.client.RateLimitedError, match="after retrying for 10 minutes"):
        client.submit_inference_job(model, device, profile=True)
    assert sum(hub.slept) > 600 and hub.count("create_inference_job") > 5  # the client's own loop, instant here


def test_double_s3_failure_is_a_botocore_connection_error(hub, fp32_export):
    import botocore.exceptions

    _, client = _real_client()
    hub.s3_down = True
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.upload_model(str(fp32_export / "model.onnx"))
    assert len(hub.s3_requests) > 1  # botocore retried (instantly) before giving up


def test_double_aimet_rule_and_client_ini_are_the_clients(hub, int8_ptq, client_ini, tmp_path):
    qai_hub, client = _real_client()
    aimet = _copy_stage(int8_ptq / "fastdepth.aimet", tmp_path)
    (aimet / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(qai_hub.UserError, match="can only contain .onnx, .data, .encodings, and .bin"):
        client.upload_model(str(aimet))
    hub.write_client_ini(client_ini.parent, api_url=None, web_url=None)  # token only
    with pytest.raises(qai_hub.UserError, match="Your API token is missing"):
        qai_hub.Client().get_model("m1")


# -- End to end through the real client -------------------------------------------------------------------------------

def test_fp32_export_compiles_profiles_runs_scores_and_shares(hub, fp32_export, rgbd_dir, tmp_path, capsys):
    out = tmp_path / "hub"
    result = run_hub(_config(fp32_export, out, eval_data=rgbd_dir, max_frames=2, share=(EMAIL,)))

    assert [kind for kind, _, _ in hub.submitted] == ["compile", "profile", "inference"]
    compile_id, profile_id, inference_id = (job_id for _, job_id, _ in hub.submitted)
    assert hub.submitted[0][2] == "--target_runtime qnn_context_binary"
    assert hub.submitted[1][2] == "--max_profiler_iterations 20"
    assert hub.jobs[compile_id].shared_with == [EMAIL]
    assert hub.models[hub.uploads[0]].model_type == "MODEL_TYPE_ONNX"

    manifest = read_manifest(out)
    results = manifest["results"]
    assert manifest["stage"] == "hub" and result.compile_job_id == compile_id
    assert results["compile"]["options"] == "--target_runtime qnn_context_binary"
    assert manifest["config"]["full_compile_options"] == "--target_runtime qnn_context_binary"
    assert (out / results["compile"]["target_model"]).read_bytes().startswith(b"compiled:qnn_context_binary")
    assert results["share"] == {**results["share"], "job_id": compile_id, "emails": [EMAIL]}
    assert {kind: job["job_id"] for kind, job in results["jobs"].items()} == {
        "compile": compile_id, "profile": profile_id, "inference": inference_id}
    assert all(job["status"] == "SUCCESS" for job in results["jobs"].values())
    contract = results["compile"]["contract"]
    assert contract["ok"] is True and contract["problems"] == []
    assert contract["inputs"][0] == {"name": "image", "dtype": "float32", "shape": [1, 3, 480, 640], "scale": None,
                                     "zero_point": None}

    profile = results["profile"]
    raw = json.loads((out / "profile.json").read_text())
    assert profile["estimated_inference_time_ms"] == raw["execution_summary"]["estimated_inference_time"] / 1000
    assert profile["fps"] == pytest.approx(1000 / profile["estimated_inference_time_ms"])
    assert profile["compute_units"] == {"NPU": len(raw["execution_detail"]), "GPU": 0, "CPU": 0}
    assert profile["peak_memory_bytes"] == list(raw["execution_summary"]["inference_memory_peak_range"])
    assert profile["inference_times_ms"]["runs"] == 20 and profile["cpu_fallback"] is False

    # The on-device outputs are what evaluation/score.py --predictions reads.
    files = sorted((out / "device_outputs").rglob("*.npy"))
    assert len(files) == 2 and all(np.load(f).shape == (1, 1, 480, 640) and np.load(f).dtype == np.float32
                                   for f in files)
    inference = results["inference"]
    assert inference["data"]["frames"] == 2 and inference["input_dtype"] == "float32"
    assert inference["io_source"] == "the compiled model on AI Hub"
    # fp16 on the device against fp32 on the host: close, but measured, not identical.
    host = np.stack([np.load(out / "host_outputs" / f.relative_to(out / "device_outputs")) for f in files])
    device = np.stack([np.load(f) for f in files])
    assert 0 < np.abs(host - device).max() < 1e-2
    assert 40 < inference["vs_host"]["sqnr_db"] < 120 and inference["vs_host"]["fscore_vs_host"] > 99
    gt = inference["ground_truth"]
    assert gt["frames"] == 2 and gt["skipped"] == 0
    assert 30 < gt["device"][FSCORE] <= 100 and abs(gt["fscore_drop"]) < 1
    assert gt["fscore_drop"] == pytest.approx(gt["host"][FSCORE] - gt["device"][FSCORE])
    assert read_manifest(out / "eval" / "device")["stage"] == "evaluate"
    assert not (out / ".eval-frames").exists()

    state = json.loads((out / STATE_NAME).read_text())
    assert state["jobs"]["compile"]["job_id"] == compile_id
    paths = {entry["path"] for entry in manifest["outputs"]}
    assert {"profile.json", STATE_NAME, "compiled/model.bin"} <= paths
    stdout = capsys.readouterr().out
    assert f"compile job id (the submission form asks for it): {compile_id}" in stdout
    assert f"compile job {compile_id} OPTIMIZING_MODEL" in stdout and f"profile job {profile_id} SUCCESS" in stdout
    assert "ready to submit: the compiled model's I/O meets the Track 3 contract" in stdout
    assert f"compile job {compile_id} is shared with {EMAIL}" in stdout


def test_int8_ptq_uploads_aimet_folder_and_compares_with_the_qdq_model(hub, int8_ptq, calibration_dir):
    config = _config(int8_ptq, None, images=calibration_dir, max_frames=2, compile_options="--quantize_io")
    assert config.destination == int8_ptq.parent / "hub-ptq-w8a8-qnn_context_binary"
    result = run_hub(config)

    uploaded = hub.models[hub.uploads[0]]
    assert uploaded.model_type == "MODEL_TYPE_AIMET_ONNX" and uploaded.onnx.parent.name == "fastdepth.aimet"
    results = result.manifest["results"]
    assert results["input"]["precision"] == "int8" and results["input"]["label"] == "ptq-w8a8"
    assert results["compile"]["options"] == "--target_runtime qnn_context_binary --quantize_io"
    inference = results["inference"]
    assert inference["input_dtype"] == "uint8"  # --quantize_io: pixels go up as uint8, outputs come back dequantized
    assert inference["vs_host"]["reference"].endswith("model_qdq.onnx")
    device = np.concatenate([np.load(f) for f in sorted((result.out_dir / "device_outputs" / "images").glob("*.npy"))])
    assert device.shape == (2, 1, 480, 640) and 0 <= device.min() and device.max() <= 1
    assert np.allclose(device * 255, np.round(device * 255), atol=1e-3)  # 8-bit output steps, dequantized
    # Device (8-bit outputs of the AIMET graph) against host QDQ: real, finite, imperfect agreement.
    assert 5 < inference["vs_host"]["sqnr_db"] < 60
    assert result.results.inference.ground_truth is None and inference["ground_truth"] is None  # photos have none
    assert results["compile"]["contract"]["ok"] is True  # uint8 I/O whose scale covers 0..255 in, 0..1 out


def test_rerun_resumes_recorded_jobs_and_force_resubmits(hub, fp32_export, tmp_path, capsys):
    out = tmp_path / "hub"
    config = _config(fp32_export, out, runtime="tflite", compile_options="--quantize_io")
    first = run_hub(config)
    assert len(hub.submitted) == 2 and len(hub.uploads) == 1
    assert (out / "compiled" / "model.tflite").is_file()
    assert first.manifest["results"]["compile"]["options"] == "--target_runtime tflite --quantize_io"

    second = run_hub(config)
    assert len(hub.submitted) == 2 and len(hub.uploads) == 1  # nothing resubmitted, nothing re-uploaded
    assert hub.count("_create_model") == 1 and hub.count("create_compile_job") == 1
    assert second.manifest["results"]["jobs"] == first.manifest["results"]["jobs"]
    assert "compile: resuming job" in capsys.readouterr().out

    changed = run_hub(_config(fp32_export, out, runtime="tflite", profile_options="--max_profiler_iterations 5"))
    # New compile options -> new compile job -> new profile job; the old ids stay on record.
    assert len(hub.submitted) == 4
    assert changed.compile_job_id != first.compile_job_id
    state = json.loads((out / STATE_NAME).read_text())
    assert {entry["job_id"] for entry in state["replaced"]} == {job["job_id"] for job in
                                                                first.manifest["results"]["jobs"].values()}

    forced = run_hub(_config(fp32_export, out, runtime="tflite", profile_options="--max_profiler_iterations 5",
                             force=True))
    assert len(hub.submitted) == 6 and forced.compile_job_id != changed.compile_job_id


def test_interrupted_wait_keeps_job_ids_and_the_rerun_resumes(hub, fp32_export, tmp_path, capsys):
    hub.interrupt_at["profile"] = 2  # Ctrl+C while the profile job is provisioning a phone
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out)) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and STATE_NAME in err
    state = json.loads((out / STATE_NAME).read_text())
    assert set(state["jobs"]) == {"compile", "profile"} and not (out / MANIFEST_NAME).exists()
    assert state["jobs"]["profile"]["status"] == "SUBMITTED"

    hub.interrupt_at.clear()
    assert main(_argv(fp32_export, out)) == 0
    assert [kind for kind, _, _ in hub.submitted] == ["compile", "profile"]  # resumed, not resubmitted
    assert read_manifest(out)["results"]["profile"]["job_id"] == state["jobs"]["profile"]["job_id"]


def test_resumed_context_binary_with_quantized_io_uploads_nothing_twice(hub, calibration_dir, tmp_path, capsys):
    """A .bin's I/O is known only once AI Hub has read it (the upload's own record has empty specs):
    the frames go up as uint8 the first time, and an interrupted run resumes without a new job or upload."""
    hub.binary_io, hub.spec_settle_polls = QUANTIZED_IO, 2
    hub.interrupt_at["inference"] = 2
    binary = tmp_path / "htp" / "model.bin"
    binary.parent.mkdir()
    binary.write_bytes(b"QNN context binary" * 100)
    out = tmp_path / "hub"
    argv = _argv(binary, out, "--images", str(calibration_dir), "--max-frames", "2")
    assert main(argv) == ExitCode.INTERRUPTED
    [dataset] = hub.datasets.values()
    assert [str(a.dtype) for a in dataset.entries["image"]] == ["uint8", "uint8"]
    first = list(hub.calls)

    hub.interrupt_at.clear()
    assert main(argv) == 0
    created = ("_create_model", "_create_dataset", "create_compile_job", "create_inference_job")
    assert {name: hub.count(name) for name in created} == {name: first.count(name) for name in created} == {
        "_create_model": 1, "_create_dataset": 1, "create_compile_job": 0, "create_inference_job": 2}
    assert [method for method, _ in hub.s3_requests].count("PUT") == 2  # the model and the frames, once each
    inference = read_manifest(out)["results"]["inference"]
    assert inference["input_dtype"] == "uint8" and inference["io_source"] == "AI Hub's record of the upload"
    assert "inference: resuming job" in capsys.readouterr().out


def test_failed_job_surfaces_the_hubs_reason(hub, fp32_export, tmp_path, capsys):
    reason = "Failed to compile: the op Erf is not supported by QNN HTP"
    hub.fail["compile"] = reason
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out)) == ExitCode.HUB_JOB_FAILED == 4
    err = capsys.readouterr().err
    job_id = hub.submitted[0][1]
    assert "JOB FAILED" in err and reason in err and job_id in err and "--force" in err
    state = json.loads((out / STATE_NAME).read_text())
    assert state["jobs"]["compile"] == {**state["jobs"]["compile"], "status": "FAILED", "failure_reason": reason}
    assert not (out / MANIFEST_NAME).exists()

    with pytest.raises(HubJobFailedError) as failed:  # the same inputs report the same failed job
        run_hub(_config(fp32_export, out))
    assert failed.value.job_id == job_id and failed.value.reason == reason and len(hub.submitted) == 1
    assert main(_argv(fp32_export, out, "--force")) == 0
    assert len(hub.submitted) == 3


def test_slow_job_times_out_quickly_and_stays_resumable(hub, fp32_export, tmp_path, capsys):
    hub.polls_per_state["profile"] = 10 ** 9  # a phone that never frees up
    out = tmp_path / "hub"
    start = time.monotonic()
    assert main(_argv(fp32_export, out, "--timeout", "0.2", "--poll", "0.02")) == ExitCode.HUB_TIMEOUT == 5
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    profile_id = hub.submitted[1][1]
    assert "TIMED OUT" in err and profile_id in err and "resumes" in err
    assert json.loads((out / STATE_NAME).read_text())["jobs"]["profile"]["job_id"] == profile_id
    with pytest.raises(HubTimeoutError) as timeout:
        run_hub(_config(fp32_export, out, timeout=0.05, poll=0.01))
    assert timeout.value.job_id == profile_id and len(hub.submitted) == 2


def test_rate_limited_submission_is_retried_within_the_timeout(hub, clock, fp32_export, tmp_path, capsys):
    hub.outage("create_compile_job", "429", times=2)
    result = run_hub(_config(fp32_export, tmp_path / "hub", profile=False, timeout=120.0))
    assert result.compile_job_id and hub.count("create_compile_job") == 3
    assert clock.slept[:2] == [20.0, 40.0]

    hub.outage("create_inference_job", "429", times=10 ** 6)  # the profile job's submission: never lets up
    out = tmp_path / "limited"
    assert main(_argv(fp32_export, out, "--timeout", "100")) == 2
    err = capsys.readouterr().err
    assert "rate limited" in err and "HTTP 429" in err and "fix: wait a few minutes and rerun" in err
    # Bounded by --timeout (tries after 0, 20 and 60 s), not by qai-hub's own 10-minute loop, which never ran.
    assert hub.count("create_inference_job") == 3 and sum(clock.slept[2:]) <= 100 and hub.slept == []
    assert "profile" not in json.loads((out / STATE_NAME).read_text())["jobs"]


def test_s3_failure_is_unavailable_and_the_rerun_resumes(hub, fp32_export, tmp_path, capsys):
    out = tmp_path / "hub"
    hub.s3_down = True
    assert main(_argv(fp32_export, out, "--no-profile")) == 2
    err = capsys.readouterr().err
    assert "AI Hub unavailable while trying to upload the model" in err
    assert "Could not connect to the endpoint URL" in err and "rerunning the same command resumes" in err
    hub.s3_down = "GET"  # uploads work again, downloads do not
    assert main(_argv(fp32_export, out, "--no-profile")) == 2
    assert "AI Hub unavailable while trying to download the compiled model" in capsys.readouterr().err
    hub.s3_down = False
    assert main(_argv(fp32_export, out, "--no-profile")) == 0
    assert hub.count("create_compile_job") == 1 and len(hub.uploads) == 1  # resumed after the failed download


def test_local_disk_error_is_not_reported_as_the_network(hub, fp32_export, tmp_path, monkeypatch, capsys):
    from qai_hub import s3_transfer

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(s3_transfer, "shutil", types.SimpleNamespace(move=disk_full))
    assert main(_argv(fp32_export, tmp_path / "hub", "--no-profile")) == 2
    err = capsys.readouterr().err
    assert "local file problem while trying to download the compiled model" in err and "No space left" in err
    assert "free disk space" in err and "check the network" not in err


def test_io_spec_errors_surface_and_the_rerun_resumes(hub, fp32_export, calibration_dir, tmp_path, capsys):
    hub.outage("get_model", "503")  # the compiled model's I/O cannot be read: no silent float32 guess
    out = tmp_path / "hub"
    argv = _argv(fp32_export, out, "--no-profile", "--images", str(calibration_dir), "--max-frames", "1")
    assert main(argv) == 2
    assert "AI Hub unavailable while trying to look up model" in capsys.readouterr().err
    assert [kind for kind, _, _ in hub.submitted] == ["compile"] and hub.count("_create_dataset") == 0
    assert main(argv) == 0
    assert [kind for kind, _, _ in hub.submitted] == ["compile", "inference"]


def test_a_model_gone_from_the_hub_is_uploaded_again_but_a_server_error_is_reported(hub, fp32_export, tmp_path,
                                                                                     capsys):
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out, "--no-profile")) == 0
    hub.outage("get_model", "500")  # the recorded model cannot be looked up: reported, not taken for "gone"
    assert main(_argv(fp32_export, out, "--no-profile", "--runtime", "tflite")) == 2
    err = capsys.readouterr().err
    assert "AI Hub reported an internal error while trying to look up model" in err and "unavailable" not in err
    assert hub.count("_create_model") == 1
    hub.models.pop(hub.uploads[0])  # now really gone (404): uploaded again
    assert main(_argv(fp32_export, out, "--no-profile", "--runtime", "tflite")) == 0
    assert hub.count("_create_model") == 2 and [kind for kind, _, _ in hub.submitted] == ["compile", "compile"]


def test_missing_package_says_how_to_install(fp32_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qai_hub", None)  # `import qai_hub` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[hub\]"'):
        HubClient().preflight()
    assert main(_argv(fp32_export, tmp_path / "hub")) == 2
    assert 'fix: pip install -e ".[hub]"' in capsys.readouterr().err


def test_qai_hub_versions_are_read_from_the_installed_metadata(monkeypatch, request):
    import importlib.metadata

    from lpcv_depth import pins

    # The pins are read once per process: each metadata below is read afresh, and the real one after.
    request.addfinalizer(pins._pins.cache_clear)
    monkeypatch.setitem(sys.modules, "qai_hub", None)
    pins._pins.cache_clear()
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ['qai-hub==9.9.9; extra == "hub"'])
    assert ai_hub.supported_version() == "9.9.9"
    with pytest.raises(MissingDependencyError) as missing:
        HubClient().preflight()
    assert missing.value.hint == 'pip install -e ".[hub]"  (installs qai-hub==9.9.9)'

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)  # a source tree lpcv-depth is not installed from
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pins._pins.cache_clear()
    assert ai_hub.supported_version() is None and ai_hub.installed_version() is None
    with pytest.raises(MissingDependencyError) as missing:
        HubClient().preflight()
    assert missing.value.hint == 'pip install -e ".[hub]"'


@pytest.mark.parametrize("ini", ["missing", "no-token", "no-urls"])
def test_missing_token_fails_before_any_request(ini, hub, client_ini, fp32_export, tmp_path, monkeypatch, capsys):
    if ini == "missing":
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "nowhere" / "client.ini"))
    elif ini == "no-token":
        write_client_ini(client_ini.parent, token=None)
    else:  # a hand-written ini: the client also needs api_url and web_url, and would call the token missing
        client_ini.write_text("[api]\napi_token = abc\n")
    with pytest.raises(HubAuthError, match="qai-hub configure --api_token"):
        run_hub(_config(fp32_export, tmp_path / "hub"), HubClient(preflight=True))
    assert hub.uploads == [] and hub.submitted == [] and hub.calls == []
    start = time.monotonic()
    assert main(_argv(fp32_export, tmp_path / "hub")) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert "qai-hub configure --api_token YOUR_TOKEN" in err and "  fix: " in err
    if ini == "no-urls":
        assert "lacks api_url, web_url" in err


def test_token_rejected_by_the_hub_is_translated(hub, fp32_export, tmp_path):
    hub.token_valid = False  # HTTP 401 on every request
    with pytest.raises(HubAuthError, match="qai-hub configure"):
        run_hub(_config(fp32_export, tmp_path / "hub"))


def _closed_port() -> int:
    with socket.socket() as probe:  # a local port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_network_fails_fast_with_a_clear_message(hub, client_ini, fp32_export, tmp_path, capsys):
    port = _closed_port()
    hub.write_client_ini(client_ini.parent, api_url=f"https://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match=f"cannot reach AI Hub at 127.0.0.1:{port}"):
        HubClient(connect_timeout_s=2).preflight()
    assert time.monotonic() - start < 3
    assert main(_argv(fp32_export, tmp_path / "offline")) == 2
    assert time.monotonic() - start < 6
    err = capsys.readouterr().err
    assert f"cannot reach AI Hub at 127.0.0.1:{port}" in err and "  fix: check the network" in err
    assert hub.calls == []

    hub.write_client_ini(client_ini.parent)
    hub.network = False  # the network drops after the preflight: qai_hub's InternalError
    assert main(_argv(fp32_export, tmp_path / "hub")) == 2
    err = capsys.readouterr().err
    assert "AI Hub unavailable" in err and "Could not connect" in err and "resumes" in err


class _Proxy:
    """A local HTTP proxy that answers CONNECT with `answer` and records the request lines."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"):
        self.answer = answer
        self.requests: list[str] = []
        self.headers: list[str] = []
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(8)
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            with connection:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := connection.recv(1024)):
                    data += chunk
                lines = data.decode().split("\r\n")
                self.requests.append(lines[0])
                self.headers += lines[1:]
                connection.sendall(self.answer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


@pytest.fixture
def proxy():
    server = _Proxy()
    yield server
    server.close()


def test_preflight_goes_through_the_proxy_requests_would_use(hub, proxy, client_ini, fp32_export, tmp_path,
                                                             monkeypatch, capsys):
    # The hub host only resolves through the proxy: a direct probe could never reach it.
    hub.write_client_ini(client_ini.parent, api_url="https://aihub.example.invalid")
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert main(_argv(fp32_export, tmp_path / "hub", "--no-profile")) == 0
    assert proxy.requests == ["CONNECT aihub.example.invalid:443 HTTP/1.1"]

    # This test is about the route and the message, not the time: a generous timeout keeps a stalled
    # scheduler from turning "connection refused" into "no answer within 2s".
    port = _closed_port()  # NO_PROXY: straight to the host, as requests does
    hub.write_client_ini(client_ini.parent, api_url=f"https://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(HubUnavailableError, match=f"cannot reach AI Hub at 127.0.0.1:{port} \\(Connection"):
        HubClient(connect_timeout_s=15).preflight()
    assert len(proxy.requests) == 1

    monkeypatch.delenv("NO_PROXY")
    proxy.answer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://me:secret@"))
    refused = "through the proxy http://127.0.0.1:.*authentication required"
    with pytest.raises(HubUnavailableError, match=refused) as err:
        HubClient(connect_timeout_s=15).preflight()
    assert "secret" not in str(err.value) and "Proxy-Authorization: Basic bWU6c2VjcmV0" in proxy.headers

    assert main(_argv(fp32_export, tmp_path / "unprobed", "--no-profile", "--no-preflight")) == 0
    assert "network probe skipped: --no-preflight" in capsys.readouterr().out


def test_expired_dataset_is_uploaded_again_and_a_given_one_refused(hub, fp32_export, calibration_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "hub"
    first = run_hub(_config(fp32_export, out, profile=False, images=calibration_dir, max_frames=1))
    old = first.results.inference.dataset_id
    hub.expire(old)  # 30 days later
    again = run_hub(_config(fp32_export, out, profile=False, images=calibration_dir, max_frames=1, force=True))
    assert again.results.inference.dataset_id != old and hub.count("_create_dataset") == 2
    assert f"dataset {old} is gone or expired on AI Hub: uploading the frames again" in capsys.readouterr().out
    with pytest.raises(ai_hub.HubError, match=f"dataset {old} is gone or expired"):
        run_hub(_config(fp32_export, out, profile=False, images=calibration_dir, max_frames=1, force=True,
                        dataset_id=old))


def test_hidden_file_in_an_aimet_folder_is_refused_before_upload(hub, int8_ptq, tmp_path, capsys):
    ptq = _copy_stage(int8_ptq, tmp_path)
    (ptq / "fastdepth.aimet" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="not an AIMET model folder") as refused:
        run_hub(HubConfig(artifact=ptq))
    assert "remove .DS_Store" in str(refused.value)
    assert main(_argv(ptq, tmp_path / "hub")) == 2
    assert "fix: it must hold exactly one .onnx" in capsys.readouterr().err and hub.calls == []


def test_cpu_fallback_is_flagged_loudly(hub, fp32_export, tmp_path, capsys):
    hub.cpu_layers = 3
    result = run_hub(_config(fp32_export, tmp_path / "hub"))
    profile = result.manifest["results"]["profile"]
    assert profile["cpu_fallback"] is True and profile["compute_units"]["CPU"] == 3
    assert sum(profile["cpu_layer_types"].values()) == 3
    stdout = capsys.readouterr().out
    assert f"hub: WARNING CPU FALLBACK: 3 of {profile['layers']} layers run on the CPU" in stdout
    assert stdout.count("hub: WARNING !!!!") == 2


@pytest.mark.parametrize("schema", ["older", "no-layer-times", "no-memory-ranges"])
def test_profiles_of_every_schema_are_summarized(schema, hub, fp32_export, tmp_path):
    hub.profile_version = (0, 0) if schema == "older" else (1, 1) if schema == "no-memory-ranges" else (1, 2)
    hub.profile_memory = schema != "no-memory-ranges"
    hub.layer_timings = schema != "no-layer-times"
    profile = run_hub(_config(fp32_export, tmp_path / "hub")).results.profile
    raw = json.loads((tmp_path / "hub" / "profile.json").read_text())
    assert profile.estimated_inference_time_ms == raw["execution_summary"]["estimated_inference_time"] / 1000
    assert profile.layers == len(raw["execution_detail"]) > 0 and profile.compute_units["NPU"] == profile.layers
    if schema == "older":
        assert raw["execution_summary"]["inference_memory_peak_range"] is None and profile.peak_memory_bytes is None
        assert profile.inference_times_ms is None and profile.warm_load_time_ms is None
    elif schema == "no-memory-ranges":
        peak = raw["execution_summary"]["estimated_inference_peak_memory"]
        assert raw["execution_summary"]["inference_memory_peak_range"] is None
        assert profile.peak_memory_bytes == [peak, peak]
    else:
        assert "execution_time" not in raw["execution_detail"][0] and profile.inference_times_ms["runs"] == 20


def test_new_job_states_are_reported(hub, fp32_export, tmp_path, capsys):
    hub.extra_states["compile"] = ("QUANTIZING_MODEL", "LINKING_MODELS")
    result = run_hub(_config(fp32_export, tmp_path / "hub", profile=False))
    stdout = capsys.readouterr().out
    for state in ("QUANTIZING_MODEL", "LINKING_MODELS", "OPTIMIZING_MODEL", "SUCCESS"):
        assert f"compile job {result.compile_job_id} {state}" in stdout


def test_share_prints_the_compile_job_id_for_the_submission_form(hub, fp32_export, tmp_path, capsys):
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out, "--share", EMAIL, "--no-profile")) == 0
    [(kind, compile_id, _)] = hub.submitted
    assert kind == "compile" and hub.jobs[compile_id].shared_with == [EMAIL]
    stdout = capsys.readouterr().out
    assert f"compile job {compile_id} shared with {EMAIL}" in stdout
    assert f"submission form asks for it): {compile_id}" in stdout
    assert "skipping the on-device inference step" in stdout

    assert main(_argv(fp32_export, out, "--share", EMAIL, "--no-profile")) == 0  # a rerun shares nothing again
    assert hub.count("modify_sharing") == 1
    share = read_manifest(out)["results"]["share"]
    assert share["already_shared"] is True and share["job_id"] == compile_id
    assert f"already shared with {EMAIL}" in capsys.readouterr().out

    assert main(_argv(fp32_export, out, "--no-profile")) == 0  # without --share, the record still counts
    assert f"compile job {compile_id} is shared with {EMAIL}" in capsys.readouterr().out


def test_context_binary_is_profiled_without_compiling(hub, fp32_export, calibration_dir, tmp_path, capsys):
    binary = tmp_path / "htp" / "model.bin"
    binary.parent.mkdir()
    binary.write_bytes(b"QNN context binary" * 100)
    config = _config(binary, None, images=calibration_dir, max_frames=1, share=(EMAIL,),
                     reference_onnx=fp32_export / "model.onnx")
    assert config.destination == binary.parent / "hub-model-qnn_context_binary"
    result = run_hub(config)
    assert [kind for kind, _, _ in hub.submitted] == ["profile", "inference"]
    assert hub.models[hub.uploads[0]].model_type == "MODEL_TYPE_QNN_CONTEXT_BINARY"
    results = result.manifest["results"]
    assert result.results.compile is None and results["compile"] is None and results["runtime"] == "qnn_context_binary"
    assert results["share"]["kind"] == "profile" and hub.jobs[results["share"]["job_id"]].shared_with == [EMAIL]
    assert results["inference"]["vs_host"]["reference"].endswith("model.onnx")
    assert results["inference"]["io_source"] == "AI Hub's record of the upload" and results["qairt_version"] is None
    stdout = capsys.readouterr().out
    assert "no compile job to share" in stdout and "no compile job" in stdout
    assert "no QNN version recorded for model.bin" in stdout


def test_htp_check_folder_sends_its_context_binary(hub, int8_ptq, calibration_dir, tmp_path, capsys):
    hub.binary_qnn_version = "2.51"  # the hub's default runtime (2.37) cannot load it
    htp = make_htp_check_folder(int8_ptq, tmp_path / "htp-check", companion_io=(("image", "float32"),
                                                                                 ("depth", "float32")))
    result = run_hub(_config(htp, tmp_path / "hub", images=calibration_dir, max_frames=1))
    assert [kind for kind, _, _ in hub.submitted] == ["profile", "inference"]
    assert hub.models[hub.uploads[0]].model_type == "MODEL_TYPE_QNN_CONTEXT_BINARY"
    # On-device outputs are measured against the QDQ model it was built from.
    assert result.manifest["results"]["inference"]["vs_host"]["reference"] == str(int8_ptq / "model_qdq.onnx")
    # The QNN version that built it picks the runtime of both device jobs, recorded and said.
    assert [options for _, _, options in hub.submitted] == ["--max_profiler_iterations 20 --qairt_version 2.51",
                                                            "--qairt_version 2.51"]
    results = result.manifest["results"]
    assert results["qairt_version"] == "2.51" and results["profile"]["options"].endswith("--qairt_version 2.51")
    assert results["inference"]["io_source"] == "the graph of model_ctx.onnx"
    assert "its jobs run on --qairt_version 2.51 (from the htp-check manifest)" in capsys.readouterr().out

    # Forcing an older runtime: the hub fails to load the binary, and says why.
    with pytest.raises(HubJobFailedError, match="generated with QNN 2.51"):
        run_hub(_config(htp, tmp_path / "old", profile_options="--qairt_version 2.37"))

    (htp / "model_ctx_qnn.bin").unlink()
    with pytest.raises(ConfigError, match="no QNN context binary"):
        run_hub(_config(htp, tmp_path / "hub2"))


def test_output_folder_of_someone_else_is_refused(hub, fp32_export, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not an earlier hub stage output"):
        run_hub(_config(fp32_export, out))
    assert (out / "notes.txt").read_text() == "keep me"


def _bad_inputs(tmp: Path, export: Path, ptq: Path) -> dict:
    plain = tmp / "plain"
    plain.mkdir()
    evaluated = tmp / "evaluated"
    evaluated.mkdir()
    (evaluated / MANIFEST_NAME).write_text(json.dumps({"stage": "evaluate"}))
    two_onnx = tmp / "two.aimet"
    two_onnx.mkdir()
    for name in ("a.onnx", "b.onnx", "a.encodings"):
        (two_onnx / name).write_bytes(b"x")
    text = tmp / "model.txt"
    text.write_text("x")
    return {
        "missing": (dict(artifact=tmp / "nope"), "artifact not found"),
        "plain folder": (dict(artifact=plain), "not a stage output"),
        "evaluate folder": (dict(artifact=evaluated), "'evaluate' stage output"),
        "bad aimet": (dict(artifact=two_onnx), "not an AIMET model folder"),
        "text file": (dict(artifact=text), "not a model AI Hub takes"),
        "runtime": (dict(artifact=export, runtime="coreml"), "runtime must be one of"),
        "runtime in options": (dict(artifact=export, compile_options="--target_runtime tflite"), "--runtime"),
        "email": (dict(artifact=export, share=("organizers",)), "email address"),
        "two data sources": (dict(artifact=export, eval_data=tmp, images=tmp), "not both"),
        "frames": (dict(artifact=export, max_frames=0), "max_frames"),
        "aimet uncompiled": (dict(artifact=ptq, compile=False), "without compiling"),
    }


def test_bad_input_is_a_config_error_with_a_hint(fp32_export, int8_ptq, tmp_path, capsys):
    for name, (options, message) in _bad_inputs(tmp_path, fp32_export, int8_ptq).items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            resolve_inputs(HubConfig(**options), StageLog("hub"))  # values at construction, the artifact here
    # The repo's script, with the artifact as a positional argument, as users type it.
    script = subprocess.run([sys.executable, "export/aihub.py", str(tmp_path / "plain")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 2
    err = script.stderr
    assert "neither an export nor a ptq folder" in err and "fix: pass build/<model>/export" in err


def test_config_holds_values_only_and_the_first_step_refuses_an_unusable_artifact(hub, fp32_export, tmp_path,
                                                                                     capsys):
    missing = tmp_path / "nope"
    config = HubConfig(artifact=missing, out=tmp_path / "hub")  # no file is read while the config is built
    assert config.artifact == missing
    with pytest.raises(ConfigError, match="artifact not found"):
        run_hub(config)
    # Several artifacts: every one is resolved before anything is uploaded, so the bad second one
    # stops the command before the good first one reaches the hub.
    export = _copy_stage(fp32_export, tmp_path)
    assert main([str(export), str(missing), "--no-profile", "--poll", "0.001"]) == ExitCode.ERROR == 2
    err = capsys.readouterr().err
    assert f"artifact not found: {missing}" in err and "fix: pass build/<model>/export" in err
    assert hub.uploads == [] and hub.submitted == [] and hub.calls == []
    assert not (tmp_path / "hub").exists() and not (tmp_path / "hub-export-qnn_context_binary").exists()


def test_profile_summary_reads_the_real_layout():
    profile = {"execution_summary": {"estimated_inference_time": 40_000, "estimated_inference_peak_memory": 9_000_000,
                                     "inference_memory_peak_range": None},
               "execution_detail": [{"name": "a", "type": "Conv", "compute_unit": "NPU"},
                                    {"name": "b", "type": "Resize", "compute_unit": "GPU"},
                                    {"name": "c", "type": "ArgMax", "compute_unit": "CPU"}]}
    summary = summarize_profile(profile)
    assert summary["estimated_inference_time_ms"] == 40.0 and summary["fps"] == 25.0
    assert summary["meets_target_fps"] is False and summary["peak_memory_bytes"] == [9_000_000, 9_000_000]
    assert summary["compute_units"] == {"NPU": 1, "GPU": 1, "CPU": 1} and summary["cpu_layer_types"] == {"ArgMax": 1}


def test_several_positional_artifacts_run_in_turn_then_point_at_compare(hub, fp32_export, int8_ptq, tmp_path, capsys):
    export, ptq = _copy_stage(fp32_export, tmp_path), _copy_stage(int8_ptq, tmp_path)
    argv = [str(export), str(ptq), "--no-profile", "--poll", "0.001", "--threads", "1"]
    assert main(argv) == 0
    assert [kind for kind, _, _ in hub.submitted] == ["compile", "compile"]
    for folder in (export.parent / "hub-export-qnn_context_binary", ptq.parent / "hub-ptq-w8a8-qnn_context_binary"):
        assert read_manifest(folder)["stage"] == "hub"
    stdout = capsys.readouterr().out
    assert "hub: next: lpcv-depth compare --fp32 " in stdout and " --int8 " in stdout

    assert main([*argv, "--out", str(tmp_path / "one")]) == 2
    assert "--out takes one artifact" in capsys.readouterr().err
    assert main(["--no-profile"]) == 2
    assert "no artifact" in capsys.readouterr().err


def test_quantize_io_goes_only_where_it_means_something(hub, fp32_export, int8_ptq, calibration_dir, tmp_path,
                                                        capsys):
    export, ptq = _copy_stage(fp32_export, tmp_path), _copy_stage(int8_ptq, tmp_path)
    argv = [str(export), str(ptq), "--quantize-io", "--no-profile", "--images", str(calibration_dir),
            "--max-frames", "1", "--poll", "0.001", "--threads", "1"]
    assert main(argv) == 0
    assert [options for kind, _, options in hub.submitted if kind == "compile"] == [
        "--target_runtime qnn_context_binary", "--target_runtime qnn_context_binary --quantize_io"]
    fp32 = read_manifest(export.parent / "hub-export-qnn_context_binary")
    int8 = read_manifest(ptq.parent / "hub-ptq-w8a8-qnn_context_binary")
    assert fp32["config"]["quantize_io_applied"] is False and fp32["results"]["compile"]["quantize_io"] is False
    assert int8["config"]["quantize_io_applied"] is True and int8["results"]["compile"]["quantize_io"] is True
    assert int8["results"]["inference"]["input_dtype"] == "uint8"
    assert int8["results"]["compile"]["contract"]["inputs"][0]["scale"] == 1.0
    assert "--quantize-io not applied to export: a float model has no quantized I/O" in capsys.readouterr().out

    hub.quantize_io_scales = (1 / 255, 1 / 255)  # uint8 input in [0, 1]: camera pixels 0..255 would saturate
    result = run_hub(_config(ptq, tmp_path / "scaled", quantize_io=True, profile=False, inference=False))
    contract = result.results.compile.contract
    assert contract.ok is False and "the contract's range is [0, 255]" in contract.problems[0]
    assert "NOT ready to submit" in capsys.readouterr().out


def test_compiled_io_that_breaks_the_contract_is_not_ready_to_submit(hub, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceMean", ["image"], ["disparity"], axes=[1], keepdims=1)], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 480, 640])],
                              [helper.make_tensor_value_info("disparity", TensorProto.FLOAT, [1, 1, 480, 640])])
    model = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    result = run_hub(_config(model, tmp_path / "hub", profile=False))
    contract = result.manifest["results"]["compile"]["contract"]
    assert contract["ok"] is False
    assert contract["problems"] == ["output is named 'disparity', the contract says 'depth'"]
    stdout = capsys.readouterr().out
    assert "NOT ready to submit: the compiled model's I/O breaks the Track 3 contract" in stdout
    assert f"compile job id (the submission form asks for it): {result.compile_job_id}" in stdout
    assert f"compile job {result.compile_job_id} is not shared: the organizers cannot open it" in stdout
    assert f"--share {EMAIL}" in stdout


def test_out_that_is_or_lies_inside_an_input_is_refused(hub, fp32_export, rgbd_dir, tmp_path):
    before = sorted(p.name for p in fp32_export.iterdir())
    for out, relation in ((fp32_export, "is"), (fp32_export / "hub", "lies inside"), (fp32_export.parent, "contains")):
        with pytest.raises(OutputDirError, match=f"{relation} this run's input"):
            run_hub(_config(fp32_export, out))
    with pytest.raises(OutputDirError, match="lies inside this run's input"):
        run_hub(_config(fp32_export, tmp_path / "x", eval_data=tmp_path))
    assert sorted(p.name for p in fp32_export.iterdir()) == before
    assert read_manifest(fp32_export)["stage"] == "export"
    assert hub.calls == []


def test_the_models_own_compile_options_are_added_and_recorded(hub, fp32_export, tmp_path, monkeypatch):
    import lpcv_depth.models as models

    real = models.get_spec
    monkeypatch.setattr(models, "get_spec", lambda name: dataclasses.replace(
        real(name), hub_compile_options="--truncate_64bit_io"))
    out = tmp_path / "hub"
    result = run_hub(_config(fp32_export, out, profile=False, compile_options="--quantize_io"))
    options = "--target_runtime qnn_context_binary --truncate_64bit_io --quantize_io"
    assert hub.submitted[0][2] == options
    manifest = read_manifest(out)
    assert manifest["config"]["full_compile_options"] == options
    assert manifest["config"]["model_compile_options"] == "--truncate_64bit_io"
    assert result.results.compile.model_options == "--truncate_64bit_io"
    assert manifest["results"]["compile"]["options"] == options


def test_a_4bit_preset_compiles_with_the_models_options_for_it(hub, fp32_export, calibration_dir, tmp_path,
                                                                monkeypatch):
    import lpcv_depth.models as models

    ptq = make_ptq_folder(fp32_export, tmp_path / "ptq-w4a8", list_images(calibration_dir)[:2], preset="w4a8")
    result = run_hub(_config(ptq, tmp_path / "hub", profile=False))
    options = "--target_runtime qnn_context_binary --quantize_full_type w4a8"
    assert hub.submitted[0][2] == options and result.results.compile.options == options
    assert result.results.compile.model_options == "--quantize_full_type w4a8"
    # The .aimet folder itself: the preset is read from the ptq folder around it.
    run_hub(_config(ptq / "fastdepth.aimet", tmp_path / "hub-aimet", profile=False, compile_options="--quantize_io"))
    assert hub.submitted[-1][2] == options + " --quantize_io"
    # The options are the model's: a spec that wants none for w4a8 sends none.
    real = models.get_spec
    monkeypatch.setattr(models, "get_spec", lambda name: dataclasses.replace(
        real(name), hub_compile_options="--truncate_64bit_io", hub_preset_compile_options={}))
    run_hub(_config(ptq, tmp_path / "hub-own", profile=False))
    assert hub.submitted[-1][2] == "--target_runtime qnn_context_binary --truncate_64bit_io"


def test_a_context_binary_of_4bit_weights_is_said_to_hold_them_as_int8(hub, int8_ptq, tmp_path, capsys):
    htp = make_htp_check_folder(int8_ptq, tmp_path / "htp-check", model={"int4_weights": 36})
    run_hub(_config(htp, tmp_path / "hub", inference=False))
    assert "holds the 36 4-bit weights of its model in INT8 storage" in capsys.readouterr().out


def test_docs_flag_table_lists_every_option():
    from lpcv_depth.options import cli_fields, flag_name

    table = (REPO / "docs" / "hub.md").read_text().split("## Options", 1)[1]
    missing = [flag_name(f.name) for f, _ in cli_fields(HubConfig) if f"`{flag_name(f.name)}" not in table]
    assert missing == []
