"""The export stage: every registered model to a verified ONNX, its manifest, and its failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lpcv_depth.stages.export import ExportConfig, run_export
from lpcv_depth.contract import TRACK3
from lpcv_depth.errors import ConfigError, OutputDirError, ParityError, UnknownModelError, WeightsError
from lpcv_depth.images import list_images, load_contract_batch
from lpcv_depth.verify import OrtRunner
from lpcv_depth.models import create_model, get_spec, list_models
from lpcv_depth.models.weights import HUB_PROBE_TIMEOUT_S, download_hub_weights, load_torch_checkpoint
from tests.conftest import REPO_ROOT
from tests.test_wrapper import FAST_INPUT_SIZE, registered_models


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".previous-" in p.name]


# ViT-L takes two minutes here; ViT-S and ViT-B cover the same export path in the default suite.
@pytest.mark.parametrize("name", registered_models(slow=("depth_anything_v2_vitl",)))
def test_every_model_exports_and_round_trips(name, tmp_path, calibration_dir):
    config = ExportConfig(model=name, weights=None, input_size=FAST_INPUT_SIZE.get(name), out=tmp_path / "out",
                          check_images=calibration_dir, num_check_images=2)
    result = run_export(config)
    model = onnx.load(str(result.onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["lpcv.contract"] == TRACK3.name
    assert json.loads(props["lpcv.input"])["shape"] == ["B", 3, 480, 640]
    assert props["lpcv.model"] == name and props["lpcv.weights_source"] == "random"

    # An independent round trip: fresh torch model vs the artifact, on images the stage did not use.
    images = load_contract_batch(list_images(calibration_dir)[10:12])
    reference = create_model(name, weights=None, input_size=FAST_INPUT_SIZE.get(name))
    from lpcv_depth.models import set_gelu_approximation
    set_gelu_approximation(reference, "tanh")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    got = OrtRunner(result.onnx_path).run(images)
    assert np.abs(expected - got).max() < 1e-3
    assert got.min() >= 0 and got.max() <= 1 + 1e-6

    manifest = result.manifest
    assert manifest["stage"] == "export"
    assert manifest["config"]["model"] == name
    assert {"torch", "onnx", "onnxruntime", "onnxsim", "python"} <= set(manifest["tool_versions"])
    assert {"load-model", "torch.onnx.export", "onnxsim", "onnx.checker", "contract", "parity"} <= set(manifest["timings_s"])
    [output] = manifest["outputs"]
    assert output["path"] == "model.onnx" and output["bytes"] == result.onnx_path.stat().st_size
    results = manifest["results"]
    assert results["weights"]["source"] == "random"
    assert results["nodes_simplified"] <= results["nodes_exported"]
    assert results["macs"] > 0 and results["params"] > 0
    assert results["parity"]["max_abs_diff"] < 1e-3 and results["parity"]["sqnr_db"] > 40
    assert manifest["inputs"]["check_images"]["sha256"]
    assert _leftovers(tmp_path) == []


def test_exact_gelu_exports_erf_and_tanh_does_not(tmp_path, calibration_dir):
    common = dict(model="depth_anything_v2_vits", weights=None, input_size=(70, 98), check_images=calibration_dir,
                  num_check_images=1)
    ops = {}
    for gelu in ("tanh", "exact"):
        result = run_export(ExportConfig(gelu=gelu, out=tmp_path / gelu, **common))
        ops[gelu] = {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}
    assert "Erf" in ops["exact"] and "Erf" not in ops["tanh"]


def test_batch_two_is_normalised_per_sample(tmp_path, calibration_dir):
    result = run_export(ExportConfig(model="fastdepth", weights=None, batch=2, out=tmp_path / "b2",
                                      check_images=calibration_dir, num_check_images=2))
    runner = OrtRunner(result.onnx_path)
    images = load_contract_batch(list_images(calibration_dir)[:2])
    together = runner.session.run(None, {"image": images})[0]
    swapped = runner.session.run(None, {"image": images[::-1].copy()})[0]
    assert together.shape == (2, 1, 480, 640)
    np.testing.assert_allclose(together[0], swapped[1], atol=1e-5)
    np.testing.assert_allclose(together.reshape(2, -1).max(axis=1), [1, 1], atol=1e-4)


# ---- errors: clear messages, non-zero exits, nothing half-written ----

def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        run_export(ExportConfig(model="depth_anything_v2_vits", weights=str(tmp_path / "nope.pth"), out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_corrupted_weights_file(tmp_path):
    bad = tmp_path / "depth_anything_v2_vits.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="corrupt"):
        create_model("depth_anything_v2_vits", weights=bad)
    # Garbage makes the unpickler fail in many different ways (KeyError, IndexError, ...); each is "corrupt".
    rng = np.random.default_rng(0)
    for seed in range(64):
        bad.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(WeightsError, match="corrupt"):
            load_torch_checkpoint(bad)
    truncated = tmp_path / "truncated.pth"
    torch.save(create_model("fastdepth", weights=None).backbone.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt"):
        create_model("depth_anything_v2_vits", weights=truncated)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    # A ViT-B checkpoint given to ViT-S: shapes differ, and the error says which.
    state = create_model("depth_anything_v2_vitb", weights=None).backbone.state_dict()
    state["pretrained.extra_token"] = torch.zeros(1)
    del state["pretrained.norm.bias"]
    path = tmp_path / "vitb.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as excinfo:
        create_model("depth_anything_v2_vits", weights=path)
    message = str(excinfo.value)
    assert "1 missing: pretrained.norm.bias" in message
    assert "1 unexpected: pretrained.extra_token" in message
    assert "shape mismatch" in message and "pretrained.cls_token: checkpoint (1, 1, 768) vs model (1, 1, 384)" in message


def test_matching_checkpoint_loads_strictly(tmp_path):
    source = create_model("depth_anything_v2_vits", weights=None, seed=7)
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(source.backbone.state_dict(), path)
    loaded = create_model("depth_anything_v2_vits", weights=path)
    assert loaded.weights_info.source == "file" and len(loaded.weights_info.sha256) == 64
    image = torch.rand(1, 3, 480, 640) * 255
    with torch.no_grad():
        assert torch.equal(source(image), loaded(image))


def _hub_environment(monkeypatch, **variables: str | None) -> None:
    """Set huggingface_hub's environment variables, and the constants it reads them into once, at its
    import: when an earlier test has imported it, the variables alone change nothing (the download then
    went to huggingface.co and waited for its timeout instead of failing at once)."""
    from huggingface_hub import constants

    for name, value in variables.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if "HF_HUB_OFFLINE" in variables:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", variables["HF_HUB_OFFLINE"] == "1")
    if variables.get("HF_ENDPOINT"):
        monkeypatch.setattr(constants, "ENDPOINT", variables["HF_ENDPOINT"])
    if variables.get("HF_HOME"):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(variables["HF_HOME"], "hub"))


def test_hf_weights_offline_says_how_to_pass_a_file(tmp_path, monkeypatch):
    _hub_environment(monkeypatch, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as excinfo:
        create_model("depth_anything_v2_vits", weights="hf")
    message = str(excinfo.value)
    assert "depth_anything_v2_vits.pth" in message and "--weights PATH" in message
    assert "huggingface.co/depth-anything/Depth-Anything-V2-Small" in message


def test_hf_weights_without_network_fail_fast(tmp_path, monkeypatch):
    # No HF_HUB_OFFLINE: the real download path must fail with the same clear error, not hang (the hub
    # client alone retries a refused connection for about 23 s).
    _hub_environment(monkeypatch, HF_HUB_OFFLINE=None, HF_HOME=str(tmp_path / "hf"),
                     HF_ENDPOINT="http://127.0.0.1:9")  # closed port: refused at once
    start = time.monotonic()
    with pytest.raises(WeightsError, match="--weights PATH") as excinfo:
        create_model("depth_anything_v2_vits", weights="hf")
    assert time.monotonic() - start < HUB_PROBE_TIMEOUT_S + 5
    assert "cannot reach 127.0.0.1:9 (ConnectionRefusedError" in str(excinfo.value)
    assert "not in the cache" in str(excinfo.value)


def test_hf_weights_unreachable_hub_and_a_failing_cache_say_both(tmp_path, monkeypatch):
    import huggingface_hub

    def cache_fails(**kwargs):
        assert kwargs["local_files_only"]  # the hub did not answer: only the cache is asked
        raise PermissionError("the cache is locked")

    _hub_environment(monkeypatch, HF_HUB_OFFLINE=None, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_fails)
    with pytest.raises(WeightsError, match="--weights PATH") as excinfo:
        download_hub_weights(get_spec("depth_anything_v2_vits").hub_weights)
    assert "cannot reach 127.0.0.1:9 (ConnectionRefusedError" in str(excinfo.value)
    assert "reading the cache failed: PermissionError: the cache is locked" in str(excinfo.value)


def test_hf_weights_in_the_cache_are_used_without_the_network(tmp_path, monkeypatch):
    hub = get_spec("depth_anything_v2_vits").hub_weights
    _hub_environment(monkeypatch, HF_HUB_OFFLINE=None, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    # The layout huggingface_hub leaves behind a download: the revision's commit, then its snapshot.
    repo = tmp_path / "hf" / "hub" / f"models--{hub.repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / hub.revision).write_text(commit)
    cached = repo / "snapshots" / commit / hub.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a checkpoint")
    assert download_hub_weights(hub) == cached


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputDirError, match="cannot write|not a folder"):
        run_export(ExportConfig(model="fastdepth", weights=None, out=blocker / "sub"))
    with pytest.raises(OutputDirError, match="not a folder"):
        run_export(ExportConfig(model="fastdepth", weights=None, out=blocker))


def test_foreign_folder_is_never_overwritten(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(OutputDirError, match="not an earlier lpcv-depth output"):
        run_export(ExportConfig(model="fastdepth", weights=None, out=target))
    assert (target / "thesis.tex").read_text() == "precious"


def test_failed_check_leaves_no_artifact_and_rerun_replaces(tmp_path, calibration_dir):
    out = tmp_path / "out"
    common = dict(model="fastdepth", weights=None, out=out, check_images=calibration_dir, num_check_images=1)
    with pytest.raises(ParityError) as excinfo:
        run_export(ExportConfig(max_abs_diff=1e-3, min_sqnr=1e6, **common))
    assert excinfo.value.measured["sqnr_db"] < 1e6 and excinfo.value.threshold["min_sqnr_db"] == 1e6
    assert not out.exists() and _leftovers(tmp_path) == []

    first = run_export(ExportConfig(**common))
    (out / "stale.txt").write_text("from an older run")
    second = run_export(ExportConfig(output="disparity", **common))
    assert not (out / "stale.txt").exists(), "a rerun replaces the whole folder, never mixes"
    assert second.manifest["config"]["output"] == "disparity" != first.manifest["config"]["output"]
    assert _leftovers(tmp_path) == []


def test_config_is_validated_at_construction():
    with pytest.raises(UnknownModelError, match="fastdepth"):
        ExportConfig(model="nope")
    with pytest.raises(ConfigError, match="output"):
        ExportConfig(output="inverse")
    with pytest.raises(ConfigError, match="opset"):
        ExportConfig(opset=7)
    with pytest.raises(ConfigError, match="multiples of 14"):
        ExportConfig(input_size=(480, 640))


def _run_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export/to_onnx.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_runs_from_the_repo_root_and_prints_the_next_command(tmp_path, calibration_dir, fastdepth_tflite):
    out = tmp_path / "cli"
    proc = _run_cli("--model", "fastdepth", "--weights", str(fastdepth_tflite), "--out", str(out),
                    "--check-images", str(calibration_dir), "--num-check-images", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("export: onnxsim ok") for line in lines)
    assert any(line.startswith("export: parity ok") for line in lines)
    assert lines[-1].startswith("export: next: python quantize/ptq.py")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["weights"]["source"] == "file"
    assert manifest["results"]["weights"]["sha256"] == "e8957602750f16ac130210868f4403b38b4042f0d10c00b89ec03fc3dc840125"


@pytest.mark.parametrize("args,expected", [
    (["--model", "nope"], "registered models: depth_anything_v2_metric_hypersim_vitb"),
    (["--weights", "/no/such/file.pth"], "weights file not found"),
])
def test_cli_errors_exit_non_zero_with_a_message(args, expected, tmp_path):
    proc = _run_cli(*args, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert expected in proc.stderr and "fix:" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_lists_models():
    proc = _run_cli("--list")
    assert proc.returncode == 0
    for name in list_models():
        assert name in proc.stdout
