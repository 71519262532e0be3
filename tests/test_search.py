"""`lpcv-depth search`: a real FastDepth grid on a real multi-process Ray cluster (loopback), reuse on
rerun, a failing trial, hub profiles through the REST double, the choice and its report, bad input."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpcv_depth import cli
from lpcv_depth.backends import qnn
from lpcv_depth.errors import ConfigError, ExitCode, OutputDirError
from lpcv_depth.results import SearchResults, SearchTrial
from lpcv_depth.schema import from_json
from lpcv_depth.stages.evaluate import EvaluateConfig, run_evaluate
from lpcv_depth.stages.search import SearchConfig, run_search
from lpcv_depth.stages.search_report import GMACS, LATENCY, choose, pareto_front
from lpcv_depth.track3_metric import FSCORE
from tests.stage_folders import write_client_ini
from tests.hub_rest_double import HubRestDouble

# Quick PTQs, as the conftest's PTQ fixture: 16 calibration + 4 held-out images, no CLE; the int8
# checks on all 4 held-out images, as the stage itself runs them (a trial's default is the first 2).
PTQ_ARGS = "--holdout 4 --min-calib 8 --no-cle --verify-images 4"
HUB_ARGS = "--poll 0.01 --timeout 120 --threads 1"
SIZES = "224x224,192x256"
PRESETS = "w8a8,w8a16"
TRIALS = {f"{size}-{preset}" for size in SIZES.split(",") for preset in PRESETS.split(",")}


def _argv(weights: Path, calib: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--model", "fastdepth", "--weights", str(weights), "--input-size", SIZES, "--preset", PRESETS,
            "--calib", str(calib), "--eval-data", str(data), f"--ptq-args={PTQ_ARGS}", f"--hub-args={HUB_ARGS}",
            "--out", str(out), *extra]


def _results(out: Path) -> SearchResults:
    return from_json(SearchResults, json.loads((out / "results.json").read_text()), where="results.json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackRayCluster:
    """`ray start --head` on 127.0.0.1 with no CPUs (so it runs no trial) plus one worker node with
    two: every trial must run in a worker process of the second node. Token authentication, as Ray
    2.60 sets up by default; each node runs as `ray start --block` in its own process group, so
    stopping kills exactly this cluster (`ray stop` would stop every Ray on the machine)."""

    def __init__(self):
        self.ray = Path(sys.executable).parent / "ray"
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay short: a deep pytest folder would exceed the 107-byte limit.
        self.temp = Path("/tmp") / f"lpcv-ray-{os.getpid()}"
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.nodes: list[subprocess.Popen] = []

    def _node(self, *args: str) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats",
                  "--block"]
        self.nodes.append(subprocess.Popen([str(self.ray), "start", *args, *common], env=self.env,
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))

    def start(self, monkeypatch) -> "LoopbackRayCluster":
        self._node("--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                   "--temp-dir", str(self.temp))
        self._wait_for_port()
        self._node("--address", self.address, "--num-cpus", "2")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the search's driver runs in this process
        monkeypatch.setenv("RAY_AUTH_TOKEN", self.token)
        if "ray" in sys.modules:  # Ray caches the token it found first (as Ray's own test utilities reset it)
            from ray._raylet import AuthenticationTokenLoader

            AuthenticationTokenLoader.instance().reset_cache()
        self.worker_nodes = self._cpu_nodes(expected=1)
        return self

    def _wait_for_port(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray head did not listen on {self.address} within {timeout_s}s")

    def _cpu_nodes(self, expected: int, timeout_s: float = 120) -> set[str]:
        """Node ids with CPUs, once `expected` of them have joined (read from another process)."""
        script = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
                  "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))"
                  % self.address)
        deadline = time.monotonic() + timeout_s
        while True:
            done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                                  timeout=120)
            nodes = set(json.loads(done.stdout.strip().splitlines()[-1])) if done.returncode == 0 else set()
            if len(nodes) >= expected or time.monotonic() > deadline:
                return nodes
            time.sleep(1)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(60)
        shutil.rmtree(self.temp, ignore_errors=True)

    def alive(self) -> list[str]:
        """The processes of the cluster's nodes still running (zombies waiting for init are not)."""
        groups = {node.pid for node in self.nodes}
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                name, _, rest = stat.read_text().rpartition(")")
                state, _, group = rest.split()[:3]
                if int(group) in groups and state != "Z":
                    left.append(name.split("(", 1)[1])
        return left


@pytest.fixture(scope="module")
def searched(tmp_path_factory, fastdepth_tflite, calib_subset, rgbd_dir):
    """The 2x2 grid run once on a loopback Ray cluster, with the hub double answering the real client."""
    pytest.importorskip("aimet_torch", reason="aimet-torch (the quant extra) is not installed")
    if importlib.util.find_spec("ray") is None:  # not imported here: the cluster's token must be set first
        pytest.skip("ray (the search extra) is not installed")
    root = tmp_path_factory.mktemp("search")
    monkeypatch = pytest.MonkeyPatch()
    cluster = LoopbackRayCluster()
    double = HubRestDouble().install(monkeypatch)
    try:
        cluster.start(monkeypatch)
        client_ini = write_client_ini(root / "qai_hub")
        monkeypatch.setenv("QAIHUB_CLIENT_INI", str(client_ini))
        double.write_client_ini(client_ini.parent)
        out = root / "out"
        argv = _argv(fastdepth_tflite, calib_subset, rgbd_dir / "kinect_home", out, "--ray-address", cluster.address)
        start = time.perf_counter()
        status = cli.main(argv)
        first_s = time.perf_counter() - start
    finally:
        cluster.stop()
    assert not cluster.alive()
    yield {"out": out, "status": status, "argv": argv, "first_s": first_s, "workers": cluster.worker_nodes, "double": double,
           "data": rgbd_dir / "kinect_home", "monkeypatch": monkeypatch}
    monkeypatch.undo()
    double.close()


def test_grid_runs_every_trial_in_ray_worker_processes(searched):
    assert searched["status"] == ExitCode.OK
    results = _results(searched["out"])
    assert {row.trial for row in results.trials} == TRIALS
    worker_nodes = {node[:12] for node in searched["workers"]}
    assert len(worker_nodes) == 1
    for row in results.trials:
        assert row.status == "done", row.error
        node, pid = row.worker.split(", pid ")
        assert node.removeprefix("ray node ") in worker_nodes  # the CPU node, not the head (0 CPUs)
        assert int(pid) != os.getpid()
        assert row.gmacs > 0 and row.sqnr_db > 15
        assert json.loads((Path(row.ptq_dir) / "report.json").read_text())["int8_vs_fp32"]["holdout_images"] == 4
        assert 0 < row.fscore_int8 <= 100 and 0 < row.fscore_fp32 <= 100
        if qnn.unavailable_reason() is None:  # coverage from the compile alone, without emulating the model
            assert row.htp_full is True and row.htp_cpu_nodes == 0
            assert "Not run (--no-numerics)" in (Path(row.htp_check_dir) / "report.md").read_text()
    # One export per size, shared by both presets.
    assert sorted(p.name for p in (searched["out"] / "exports").iterdir()) == ["192x256", "224x224"]


def test_each_trials_fscore_is_the_evaluate_stages(searched, tmp_path):
    def evaluated(onnx: Path, name: str) -> float:
        again = run_evaluate(EvaluateConfig(data=searched["data"], onnx=onnx, out=tmp_path / name, num_vis=0))
        return again.results.overall.metrics[FSCORE]

    rows = _results(searched["out"]).trials
    for row in rows:
        assert row.fscore_int8 == evaluated(Path(row.ptq_dir) / "model_qdq.onnx", row.trial)
    for export_dir in {row.export_dir for row in rows}:  # one fp32 model per size
        fp32 = evaluated(Path(export_dir) / "model.onnx", Path(export_dir).parent.name)
        assert all(row.fscore_fp32 == fp32 for row in rows if row.export_dir == export_dir)


def test_hub_profiles_give_every_trial_latency_and_layers(searched):
    results = _results(searched["out"])
    assert results.axis == LATENCY
    for row in results.trials:
        assert row.s24_latency_ms > 0
        assert row.s24_npu_layers > 0 and row.s24_cpu_layers == 0 and row.s24_gpu_layers == 0
        assert row.hub_profile_job and row.hub_compile_job
        assert row.hub_profile_job in searched["double"].jobs
        recorded = json.loads((Path(row.hub_dir) / "hub_jobs.json").read_text())["jobs"]
        assert recorded["profile"]["job_id"] == row.hub_profile_job
    assert len({row.hub_profile_job for row in results.trials}) == len(TRIALS)


def test_results_table_pareto_and_report(searched):
    out = searched["out"]
    results = _results(out)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["trial"] for r in rows} == TRIALS
    assert all(float(r["fscore_int8"]) == next(t.fscore_int8 for t in results.trials if t.trial == r["trial"])
               for r in rows)
    assert (out / "pareto.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    chosen = next(t for t in results.trials if t.trial == results.chosen)
    best = max((t for t in results.trials if t.s24_latency_ms <= results.budget_ms), key=lambda t: t.fscore_int8)
    assert chosen.fscore_int8 == best.fscore_int8
    assert f"**Chosen: `{results.chosen}`**" in report
    commands = report.split("## Rebuild the chosen trial alone")[1]
    for stage in ("lpcv-depth export", "lpcv-depth ptq", "lpcv-depth evaluate", "lpcv-depth hub"):
        assert stage in commands
    assert f"--input-size {chosen.input_size}" in commands
    # Options at their default are left out, as everywhere: the preset appears unless it is w8a8.
    assert (f"--preset {chosen.preset}" in commands) == (chosen.preset != "w8a8")
    assert "--holdout 4" in commands and "--latency-runs 0" in commands and "--no-numerics" in commands
    assert str(out) not in commands  # the rebuild writes its own folders, not the search's


def test_rerun_reuses_every_trial_without_starting_ray(searched, capsys):
    capsys.readouterr()
    argv = searched["argv"][:searched["argv"].index("--ray-address")]  # the cluster is gone: nothing needs it
    start = time.perf_counter()
    assert cli.main(argv) == ExitCode.OK
    rerun_s = time.perf_counter() - start
    output = capsys.readouterr().out
    assert "ray ok" not in output and ": start" not in output and "] start " not in output
    assert all(row.reused for row in _results(searched["out"]).trials)
    assert output.count("] reused ") == len(TRIALS)
    assert rerun_s < searched["first_s"] / 5


def test_a_failing_trial_is_recorded_and_the_others_finish(searched, monkeypatch, capsys):
    # In the fixture's own folder (the last test to use it): a copy elsewhere would not be up to date,
    # as every stage's fingerprint includes where it writes.
    out = searched["out"]
    victim = "192x256-w8a16"
    shutil.rmtree(out / "trials" / victim / "eval-int8")
    from lpcv_depth.stages import evaluate

    def broken(config, log=None):
        if victim in os.fspath(config.destination):
            raise RuntimeError("injected failure")
        return evaluate.run_evaluate(config, log)

    # Without Ray the trials run in this process, where the failure can be injected.
    monkeypatch.setattr(evaluate, "DEFINITION", dataclasses.replace(evaluate.DEFINITION, run=broken))
    argv = searched["argv"][:searched["argv"].index("--ray-address")] + ["--ray-address", "none", "--hub", "off"]
    assert cli.main(argv) == ExitCode.OK
    rows = {row.trial: row for row in _results(out).trials}
    assert rows[victim].status == "failed" and "injected failure" in rows[victim].error
    assert rows[victim].failed_step == "eval-int8"
    assert "injected failure" in (out / "trials" / victim / "log.txt").read_text()
    assert all(row.status == "done" and row.reused for name, row in rows.items() if name != victim)
    text = capsys.readouterr().out
    assert f"FAILED {victim} at eval-int8: RuntimeError: injected failure" in text
    report = (out / "report.md").read_text()
    assert "## Failed trials" in report and victim in report.split("## Failed trials")[1]
    # Without a hub profile latency is unmeasured: the choice is by GMACs, and the report says so.
    assert _results(out).axis == GMACS and "NOT measured" in report


# -- choice and pareto, on rows built by hand -------------------------------------------------------------------------

def _row(name: str, fscore: float, *, latency=None, gmacs=1.0, htp_full=True, cpu=0, status="done") -> SearchTrial:
    return SearchTrial(trial=name, input_size="224x224", preset="w8a8", calibration_scheme="min-max",
                       output_tail_bits=16, status=status, fscore_int8=fscore, gmacs=gmacs, htp_full=htp_full,
                       s24_latency_ms=latency, s24_npu_layers=10 if latency else None,
                       s24_gpu_layers=0 if latency else None, s24_cpu_layers=cpu if latency else None)


def test_choice_is_the_best_fully_npu_trial_within_the_budget():
    rows = [_row("fast", 60.0, latency=10.0), _row("best-but-slow", 80.0, latency=40.0),
            _row("cpu-fallback", 90.0, latency=12.0, cpu=3), _row("good", 70.0, latency=30.0),
            _row("failed", 99.0, latency=1.0, status="failed")]
    chosen, why = choose(rows, budget_ms=33.3)
    assert chosen.trial == "good" and "within 33.3 ms" in why
    assert choose(rows, budget_ms=5.0)[0] is None


def test_without_latency_the_choice_ranks_by_gmacs_and_says_so():
    rows = [_row("a", 60.0, gmacs=1.0), _row("b", 70.0, gmacs=3.0), _row("c", 95.0, gmacs=0.5, htp_full=False)]
    chosen, why = choose(rows, budget_ms=33.3)
    assert chosen.trial == "b" and "NOT measured" in why and "GMACs" in why
    # One profiled trial among unprofiled ones: the axis stays GMACs for all, never mixed.
    mixed = [_row("a", 60.0, gmacs=1.0, latency=20.0), _row("b", 70.0, gmacs=3.0)]
    assert choose(mixed, budget_ms=33.3)[0].trial == "b"


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (2.5, 55.0), (3.0, 70.0), (3.0, 65.0)]
    assert pareto_front(points) == [0, 1, 3]


# -- bad input: each is an error before any trial starts --------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--preset", ""], "empty grid: --preset"),
    (["--input-size", ""], "empty grid: --input-size"),
    (["--input-size", "224x224,200x256"], "multiples of 32"),
    (["--preset", "w8a8,w2a8"], "unknown preset(s) w2a8"),
    (["--calibration-scheme", "min-max,best"], "unknown calibration scheme(s) best"),
    (["--ptq-args", "--preset w8a16"], "--ptq-args sets --preset"),
])
def test_bad_grid_is_refused_before_any_trial(extra, message, fastdepth_tflite, calib_subset, rgbd_dir, tmp_path,
                                              capsys):
    out = tmp_path / "out"
    argv = ["search", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib_subset),
            "--eval-data", str(rgbd_dir / "kinect_home"), "--out", str(out), *extra]
    assert cli.main(argv) == ExitCode.ERROR
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_presets_and_schemes_say_which_are_known(fastdepth_tflite, calib_subset, rgbd_dir, tmp_path, capsys):
    base = ["search", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib_subset),
            "--eval-data", str(rgbd_dir / "kinect_home"), "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--preset", "w2a8"]) == ExitCode.ERROR
    assert "fix: pass --preset with some of w8a8,w8a16,mixed,w4a8,w4a16" in capsys.readouterr().err
    assert cli.main([*base, "--calibration-scheme", "best"]) == ExitCode.ERROR
    assert "fix: pass --calibration-scheme with some of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_written_exits_2_with_a_fix(fastdepth_tflite, calib_subset, rgbd_dir, tmp_path, capsys,
                                                          monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    base = ["search", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib_subset),
            "--eval-data", str(rgbd_dir / "kinect_home"), "--ray-address", "none", "--htp-check", "off",
            "--hub", "off"]
    assert cli.main([*base, "--out", str(a_file / "search")]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and "fix: choose a writable location with --out" in err

    # A read-only location (root ignores chmod, so the operating system's answer is given directly).
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if read_only in self.absolute().parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    assert cli.main([*base, "--out", str(read_only / "search")]) == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "Permission denied" in err and "fix:" in err and list(read_only.iterdir()) == []


def test_unreachable_ray_address_fails_in_seconds_with_a_fix(fastdepth_tflite, calib_subset, rgbd_dir, tmp_path,
                                                             capsys):
    pytest.importorskip("ray", reason="ray (the search extra) is not installed")
    out = tmp_path / "out"
    argv = ["search", "--model", "fastdepth", "--weights", str(fastdepth_tflite), "--calib", str(calib_subset),
            "--eval-data", str(rgbd_dir / "kinect_home"), "--out", str(out), "--ray-address", f"127.0.0.1:{_free_port()}"]
    start = time.perf_counter()
    assert cli.main(argv) == ExitCode.ERROR
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "no Ray cluster answers at --ray-address 127.0.0.1:" in err and "fix: start one with `ray start --head" in err
    assert not out.exists()


def test_a_workspace_the_cluster_cannot_read_is_refused(tmp_path):
    from lpcv_depth.backends.ray_cluster import NodeInfo, RayCluster, WorkspaceNotSharedError

    cluster = RayCluster("10.0.0.5:6379")
    nodes = [NodeInfo("head", "10.0.0.5", 8, 2**34), NodeInfo("other", "10.0.0.6", 8, 2**34)]
    cluster.nodes = lambda: nodes  # what `ray.nodes()` reports on a two-machine cluster

    def probe(node_id: str, path: str) -> str:  # the second machine has no such folder
        return Path(path).read_text() if node_id == "head" else f"FileNotFoundError: {path}"

    with pytest.raises(WorkspaceNotSharedError, match="10.0.0.6 .*cannot read it") as caught:
        cluster.check_shared_folder(tmp_path, probe=probe)
    assert "same path" in caught.value.hint
    assert not list(tmp_path.iterdir())  # the probe file is gone again
    cluster.check_shared_folder(tmp_path, probe=lambda node, path: Path(path).read_text())


def test_out_that_is_not_a_search_folder_is_refused(fastdepth_tflite, calib_subset, rgbd_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    config = SearchConfig(model="fastdepth", weights=str(fastdepth_tflite), calib=calib_subset,
                          eval_data=rgbd_dir / "kinect_home", out=mine, ray_address="none")
    with pytest.raises(OutputDirError, match="not an earlier lpcv-depth search"):
        run_search(config)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    with pytest.raises(ConfigError, match="--eval-data is required"):
        SearchConfig(model="fastdepth", weights=str(fastdepth_tflite), calib=calib_subset)


def test_a_trials_ptq_checks_two_held_out_images_unless_told_otherwise(fastdepth_tflite, calib_subset, rgbd_dir,
                                                                         tmp_path):
    from lpcv_depth.stages.search import plan_trials

    def ptq_config(**options):
        config = SearchConfig(model="fastdepth", weights=str(fastdepth_tflite), calib=calib_subset,
                              eval_data=rgbd_dir / "kinect_home", **options)
        trial = plan_trials(config, tmp_path, htp=False, hub=False)[0]
        return next(step for step in trial.local.steps if step.stage == "ptq").config

    trial = ptq_config()
    assert (trial.verify_images, trial.latency_runs, trial.holdout) == (2, 0, 8)
    assert ptq_config(ptq_args="--verify-images 8").verify_images == 8


def test_htp_frames_turn_the_emulation_and_its_score_on(fastdepth_tflite, calib_subset, rgbd_dir, tmp_path):
    from lpcv_depth.stages.search import plan_trials

    def htp_step(**options):
        config = SearchConfig(model="fastdepth", weights=str(fastdepth_tflite), calib=calib_subset,
                              eval_data=rgbd_dir / "kinect_home", preset=("w8a8", "w8a16"), **options)
        trials = plan_trials(config, tmp_path, htp=True, hub=False)
        assert [t.name for t in trials] == ["224x224-w8a8", "224x224-w8a16"]
        return next(s for s in trials[0].local.steps if s.stage == "htp-check")

    coverage_only = htp_step()
    assert coverage_only.wiring["numerics"] is False and coverage_only.wiring["eval_data"] is None
    scored = htp_step(htp_frames=3, htp_check_args="--fp16-baseline")
    assert scored.wiring["numerics"] is True and scored.wiring["max_frames"] == 3
    assert scored.wiring["eval_data"] == rgbd_dir / "kinect_home"
    assert scored.extra_args == "--fp16-baseline"  # fp16_baseline is not wired: the flag may set it
