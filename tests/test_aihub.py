"""The AI Hub stage end to end against the in-memory fake hub: fp32 and int8 inputs, resume, failures,
timeouts, missing package / token / network, CPU fallback, sharing, context binaries and bad input."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lpcv_depth.stages.hub as hub_stage
from lpcv_depth import cli
from lpcv_depth.stages.hub import STATE_NAME, HubConfig, run_hub, summarize_profile
from lpcv_depth.errors import ConfigError, ExitCode, MissingDependencyError, OutputDirError
from lpcv_depth.backends.ai_hub import HubAuthError, HubClient, HubJobFailedError, HubTimeoutError, HubUnavailableError
from lpcv_depth.images import list_images
from lpcv_depth.manifest import MANIFEST_NAME, read_manifest
from lpcv_depth.track3_metric import FSCORE
from tests.fake_qai_hub import FakeQaiHub, make_htp_check_folder, make_ptq_folder, write_client_ini

REPO = Path(__file__).resolve().parents[1]

EMAIL = "lowpowervision@gmail.com"


@pytest.fixture(scope="session")
def fp32_export(fastdepth_export) -> Path:
    return fastdepth_export  # conftest: the real FastDepth, exported once per test run


@pytest.fixture(scope="module")
def int8_ptq(fp32_export, calibration_dir) -> Path:
    return make_ptq_folder(fp32_export, fp32_export.parent / "ptq-w8a8", list_images(calibration_dir)[:2])


@pytest.fixture(autouse=True)
def client_ini(tmp_path, monkeypatch) -> Path:
    """Every test reads a token file of its own, never the user's ~/.qai_hub."""
    path = write_client_ini(tmp_path / "qai_hub")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(path))
    return path


def _client(fake: FakeQaiHub) -> HubClient:
    return HubClient(fake, preflight=False)


def _config(artifact: Path, out: Path | None, **overrides) -> HubConfig:
    options = dict(artifact=artifact, out=out, poll=0.001, timeout=30.0, threads=1)
    options.update(overrides)
    return HubConfig(**options)


def _argv(artifact: Path, out: Path, *extra: str) -> list[str]:
    return [str(artifact), "--out", str(out), "--poll", "0.001", "--threads", "1", *extra]


def main(argv: list[str], client: HubClient | None = None, monkeypatch=None) -> int:
    """`lpcv-depth hub ARGV` in-process, talking to `client` instead of a real AI Hub."""
    if client is not None:
        monkeypatch.setattr(hub_stage, "HubClient", lambda: client)
    return cli.main(["hub", *argv])


def test_fp32_export_compiles_profiles_runs_scores_and_shares(fp32_export, rgbd_dir, tmp_path, capsys):
    fake = FakeQaiHub()
    out = tmp_path / "hub"
    result = run_hub(_config(fp32_export, out, eval_data=rgbd_dir, max_frames=2, share=(EMAIL,)), _client(fake))

    assert [kind for kind, _, _ in fake.submitted] == ["compile", "profile", "inference"]
    compile_id, profile_id, inference_id = (job_id for _, job_id, _ in fake.submitted)
    assert fake.submitted[0][2] == "--target_runtime qnn_context_binary"
    assert fake.submitted[1][2] == "--max_profiler_iterations 20"
    assert fake.jobs[compile_id].shared_with == [EMAIL]
    assert fake.models[fake.uploads[0]].model_type == "ONNX"

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


def test_int8_ptq_uploads_aimet_folder_and_compares_with_the_qdq_model(int8_ptq, calibration_dir):
    fake = FakeQaiHub()
    config = _config(int8_ptq, None, images=calibration_dir, max_frames=2, compile_options="--quantize_io")
    assert config.destination == int8_ptq.parent / "hub-ptq-w8a8-qnn_context_binary"
    result = run_hub(config, _client(fake))

    uploaded = fake.models[fake.uploads[0]]
    assert uploaded.model_type == "AIMET_ONNX" and uploaded.onnx_path.parent.name == "fastdepth.aimet"
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


def test_rerun_resumes_recorded_jobs_and_force_resubmits(fp32_export, tmp_path, capsys):
    fake = FakeQaiHub()
    out = tmp_path / "hub"
    config = _config(fp32_export, out, runtime="tflite", compile_options="--quantize_io")
    first = run_hub(config, _client(fake))
    assert len(fake.submitted) == 2 and len(fake.uploads) == 1
    assert (out / "compiled" / "model.tflite").is_file()
    assert first.manifest["results"]["compile"]["options"] == "--target_runtime tflite --quantize_io"

    second = run_hub(config, _client(fake))
    assert len(fake.submitted) == 2 and len(fake.uploads) == 1  # nothing resubmitted, nothing re-uploaded
    assert second.manifest["results"]["jobs"] == first.manifest["results"]["jobs"]
    assert "compile: resuming job" in capsys.readouterr().out

    changed = run_hub(_config(fp32_export, out, runtime="tflite", profile_options="--max_profiler_iterations 5"),
                      _client(fake))
    # New compile options -> new compile job -> new profile job; the old ids stay on record.
    assert len(fake.submitted) == 4
    assert changed.compile_job_id != first.compile_job_id
    state = json.loads((out / STATE_NAME).read_text())
    assert {entry["job_id"] for entry in state["replaced"]} == {job["job_id"] for job in
                                                                first.manifest["results"]["jobs"].values()}

    forced = run_hub(_config(fp32_export, out, runtime="tflite", profile_options="--max_profiler_iterations 5",
                             force=True), _client(fake))
    assert len(fake.submitted) == 6 and forced.compile_job_id != changed.compile_job_id


def test_interrupted_wait_keeps_job_ids_and_the_rerun_resumes(fp32_export, tmp_path, capsys, monkeypatch):
    fake = FakeQaiHub()
    fake.interrupt_at["profile"] = 2  # Ctrl+C while the profile job is provisioning a phone
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out), _client(fake), monkeypatch) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and STATE_NAME in err
    state = json.loads((out / STATE_NAME).read_text())
    assert set(state["jobs"]) == {"compile", "profile"} and not (out / MANIFEST_NAME).exists()
    assert state["jobs"]["profile"]["status"] == "SUBMITTED"

    fake.interrupt_at.clear()
    assert main(_argv(fp32_export, out), _client(fake), monkeypatch) == 0
    assert [kind for kind, _, _ in fake.submitted] == ["compile", "profile"]  # resumed, not resubmitted
    assert read_manifest(out)["results"]["profile"]["job_id"] == state["jobs"]["profile"]["job_id"]


def test_failed_job_surfaces_the_hubs_reason(fp32_export, tmp_path, capsys, monkeypatch):
    fake = FakeQaiHub()
    reason = "Failed to compile: the op Erf is not supported by QNN HTP"
    fake.fail["compile"] = reason
    out = tmp_path / "hub"
    assert main(_argv(fp32_export, out), _client(fake), monkeypatch) == ExitCode.HUB_JOB_FAILED == 4
    err = capsys.readouterr().err
    job_id = fake.submitted[0][1]
    assert "JOB FAILED" in err and reason in err and job_id in err and "--force" in err
    state = json.loads((out / STATE_NAME).read_text())
    assert state["jobs"]["compile"] == {**state["jobs"]["compile"], "status": "FAILED", "failure_reason": reason}
    assert not (out / MANIFEST_NAME).exists()

    with pytest.raises(HubJobFailedError) as failed:  # the same inputs report the same failed job
        run_hub(_config(fp32_export, out), _client(fake))
    assert failed.value.job_id == job_id and failed.value.reason == reason and len(fake.submitted) == 1
    assert main(_argv(fp32_export, out, "--force"), _client(fake), monkeypatch) == 0
    assert len(fake.submitted) == 3


def test_slow_job_times_out_quickly_and_stays_resumable(fp32_export, tmp_path, capsys, monkeypatch):
    fake = FakeQaiHub()
    fake.polls_per_state["profile"] = 10 ** 9  # a phone that never frees up
    out = tmp_path / "hub"
    start = time.monotonic()
    assert main(_argv(fp32_export, out, "--timeout", "0.2", "--poll", "0.02"), _client(fake),
                monkeypatch) == ExitCode.HUB_TIMEOUT == 5
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    profile_id = fake.submitted[1][1]
    assert "TIMED OUT" in err and profile_id in err and "resumes" in err
    assert json.loads((out / STATE_NAME).read_text())["jobs"]["profile"]["job_id"] == profile_id
    with pytest.raises(HubTimeoutError) as timeout:
        run_hub(_config(fp32_export, out, timeout=0.05, poll=0.01), _client(fake))
    assert timeout.value.job_id == profile_id and len(fake.submitted) == 2


def test_missing_package_says_how_to_install(fp32_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qai_hub", None)  # `import qai_hub` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[hub\]"'):
        HubClient().preflight()
    assert main(_argv(fp32_export, tmp_path / "hub")) == 2
    assert 'fix: pip install -e ".[hub]"' in capsys.readouterr().err


@pytest.mark.parametrize("ini", ["missing", "no-token"])
def test_missing_token_fails_before_any_request(ini, client_ini, fp32_export, tmp_path, monkeypatch, capsys):
    if ini == "missing":
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "nowhere" / "client.ini"))
    else:
        write_client_ini(client_ini.parent, token=None)
    fake = FakeQaiHub()
    with pytest.raises(HubAuthError, match="qai-hub configure --api_token"):
        run_hub(_config(fp32_export, tmp_path / "hub"), HubClient(fake, preflight=True))
    assert fake.uploads == [] and fake.submitted == []
    assert main(_argv(fp32_export, tmp_path / "hub"), HubClient(fake), monkeypatch) == 2
    assert "qai-hub configure --api_token YOUR_TOKEN" in capsys.readouterr().err


def test_token_rejected_by_the_hub_is_translated(fp32_export, tmp_path):
    with pytest.raises(HubAuthError, match="qai-hub configure"):
        run_hub(_config(fp32_export, tmp_path / "hub"), _client(FakeQaiHub(token=False)))


def test_no_network_fails_fast_with_a_clear_message(client_ini, fp32_export, tmp_path, capsys, monkeypatch):
    with socket.socket() as probe:  # a local port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_client_ini(client_ini.parent, api_url=f"https://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match=f"cannot reach AI Hub at 127.0.0.1:{port}"):
        HubClient(FakeQaiHub(), connect_timeout_s=2).preflight()
    assert time.monotonic() - start < 3

    fake = FakeQaiHub(network=False)  # the network drops after the preflight: qai_hub's InternalError
    assert main(_argv(fp32_export, tmp_path / "hub"), _client(fake), monkeypatch) == 2
    err = capsys.readouterr().err
    assert "AI Hub unavailable" in err and "Could not connect" in err and "resumes" in err


def test_cpu_fallback_is_flagged_loudly(fp32_export, tmp_path, capsys):
    result = run_hub(_config(fp32_export, tmp_path / "hub"), _client(FakeQaiHub(cpu_layers=3)))
    profile = result.manifest["results"]["profile"]
    assert profile["cpu_fallback"] is True and profile["compute_units"]["CPU"] == 3
    assert sum(profile["cpu_layer_types"].values()) == 3
    stdout = capsys.readouterr().out
    assert f"hub: WARNING CPU FALLBACK: 3 of {profile['layers']} layers run on the CPU" in stdout
    assert stdout.count("hub: WARNING !!!!") == 2


def test_share_prints_the_compile_job_id_for_the_submission_form(fp32_export, tmp_path, capsys, monkeypatch):
    fake = FakeQaiHub()
    assert main(_argv(fp32_export, tmp_path / "hub", "--share", EMAIL, "--no-profile"), _client(fake),
                monkeypatch) == 0
    [(kind, compile_id, _)] = fake.submitted
    assert kind == "compile" and fake.jobs[compile_id].shared_with == [EMAIL]
    stdout = capsys.readouterr().out
    assert f"compile job {compile_id} shared with {EMAIL}" in stdout
    assert f"submission form asks for it): {compile_id}" in stdout
    assert "skipping the on-device inference step" in stdout


def test_context_binary_is_profiled_without_compiling(fp32_export, calibration_dir, tmp_path, capsys):
    binary = tmp_path / "htp" / "model.bin"
    binary.parent.mkdir()
    binary.write_bytes(b"QNN context binary" * 100)
    fake = FakeQaiHub()
    config = _config(binary, None, images=calibration_dir, max_frames=1, share=(EMAIL,),
                     reference_onnx=fp32_export / "model.onnx")
    assert config.destination == binary.parent / "hub-model-qnn_context_binary"
    result = run_hub(config, _client(fake))
    assert [kind for kind, _, _ in fake.submitted] == ["profile", "inference"]
    assert fake.models[fake.uploads[0]].model_type == "QNN_CONTEXT_BINARY"
    results = result.manifest["results"]
    assert result.results.compile is None and results["compile"] is None and results["runtime"] == "qnn_context_binary"
    assert results["share"]["kind"] == "profile" and fake.jobs[results["share"]["job_id"]].shared_with == [EMAIL]
    assert results["inference"]["vs_host"]["reference"].endswith("model.onnx")
    stdout = capsys.readouterr().out
    assert "no compile job to share" in stdout and "no compile job" in stdout


def test_htp_check_folder_sends_its_context_binary(int8_ptq, calibration_dir, tmp_path):
    htp = make_htp_check_folder(int8_ptq, tmp_path / "htp-check")
    fake = FakeQaiHub()
    result = run_hub(_config(htp, tmp_path / "hub", images=calibration_dir, max_frames=1), _client(fake))
    assert [kind for kind, _, _ in fake.submitted] == ["profile", "inference"]
    assert fake.models[fake.uploads[0]].model_type == "QNN_CONTEXT_BINARY"
    # On-device outputs are measured against the QDQ model the binary was built from.
    assert result.manifest["results"]["inference"]["vs_host"]["reference"] == str(int8_ptq / "model_qdq.onnx")

    (htp / "model_ctx_qnn.bin").unlink()
    with pytest.raises(ConfigError, match="no QNN context binary"):
        _config(htp, tmp_path / "hub2")


def test_output_folder_of_someone_else_is_refused(fp32_export, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not an earlier hub stage output"):
        run_hub(_config(fp32_export, out), _client(FakeQaiHub()))
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
            HubConfig(**options)
    # The repo's script, with the artifact as a positional argument, as users type it.
    script = subprocess.run([sys.executable, "export/aihub.py", str(tmp_path / "plain")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 2
    err = script.stderr
    assert "neither an export nor a ptq folder" in err and "fix: pass build/<model>/export" in err


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


def test_several_positional_artifacts_run_in_turn_then_point_at_compare(fp32_export, int8_ptq, tmp_path, capsys,
                                                                        monkeypatch):
    fake = FakeQaiHub()
    argv = [str(fp32_export), str(int8_ptq), "--no-profile", "--poll", "0.001", "--threads", "1"]
    assert main(argv, _client(fake), monkeypatch) == 0
    assert [kind for kind, _, _ in fake.submitted] == ["compile", "compile"]
    for folder in (fp32_export.parent / "hub-export-qnn_context_binary",
                   int8_ptq.parent / "hub-ptq-w8a8-qnn_context_binary"):
        assert read_manifest(folder)["stage"] == "hub"
    stdout = capsys.readouterr().out
    assert "hub: next: lpcv-depth compare --fp32 " in stdout and " --int8 " in stdout

    assert main([*argv, "--out", str(tmp_path / "one")], _client(fake), monkeypatch) == 2
    assert "--out takes one artifact" in capsys.readouterr().err
    assert main(["--no-profile"], _client(fake), monkeypatch) == 2
    assert "no artifact" in capsys.readouterr().err


def test_out_that_is_or_lies_inside_an_input_is_refused(fp32_export, rgbd_dir, tmp_path):
    before = sorted(p.name for p in fp32_export.iterdir())
    for out, relation in ((fp32_export, "is"), (fp32_export / "hub", "lies inside"), (fp32_export.parent, "contains")):
        with pytest.raises(OutputDirError, match=f"{relation} this run's input"):
            run_hub(_config(fp32_export, out), _client(FakeQaiHub()))
    with pytest.raises(OutputDirError, match="lies inside this run's input"):
        run_hub(_config(fp32_export, tmp_path / "x", eval_data=tmp_path), _client(FakeQaiHub()))
    assert sorted(p.name for p in fp32_export.iterdir()) == before
    assert read_manifest(fp32_export)["stage"] == "export"


def test_the_models_own_compile_options_are_added_and_recorded(fp32_export, tmp_path, monkeypatch):
    import lpcv_depth.models as models

    real = models.get_spec
    monkeypatch.setattr(models, "get_spec", lambda name: dataclasses.replace(
        real(name), hub_compile_options="--truncate_64bit_io"))
    fake = FakeQaiHub()
    out = tmp_path / "hub"
    result = run_hub(_config(fp32_export, out, profile=False, compile_options="--quantize_io"), _client(fake))
    options = "--target_runtime qnn_context_binary --truncate_64bit_io --quantize_io"
    assert fake.submitted[0][2] == options
    manifest = read_manifest(out)
    assert manifest["config"]["full_compile_options"] == options
    assert manifest["config"]["model_compile_options"] == "--truncate_64bit_io"
    assert result.results.compile.model_options == "--truncate_64bit_io"
    assert manifest["results"]["compile"]["options"] == options


def test_docs_flag_table_lists_every_option():
    from lpcv_depth.options import cli_fields, flag_name

    table = (REPO / "docs" / "hub.md").read_text().split("## Options", 1)[1]
    missing = [flag_name(f.name) for f, _ in cli_fields(HubConfig) if f"`{flag_name(f.name)}" not in table]
    assert missing == []
