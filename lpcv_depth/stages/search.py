"""Search a grid of candidates for the best Track 3 submission under a latency budget, on Ray.

    lpcv-depth search --model fastdepth --weights default --input-size 224x224,192x256 \\
        --preset w8a8,w8a16 --eval-data ../shared/data/rgbd
    lpcv-depth search --model depth_anything_v2_vits --input-size 518x518,434x574,364x490 \\
        --preset w8a8,w8a16,mixed --eval-data ../shared/data/rgbd --budget-ms 33.3
    lpcv-depth search ... --ray-address 10.0.0.5:6379 --out /shared/nfs/search   # on a cluster

Each trial is what a user would run by hand: export at its input size (shared by every trial of that
size), PTQ with its preset, the evaluate stage's F-score against ground truth (fp32 and int8), NPU
coverage from the local HTP compile with CPU fallback disabled (where the qnn extra is installed;
--htp-frames N also scores the HTP-emulated int8 model), and an S24 profile on AI Hub where a token
is configured. With --qat, the qat stage fine-tunes each trial's ptq model, and the trial's
evaluation, htp-check and hub take the qat folder. Trials run as Ray tasks (a local Ray by default;
--ray-address none: a plain loop); finished work is reused by content, so a rerun only does what
changed. --onnx FILE searches the file's model at its one size. Writes under OUT (default
build/<model>/search; --onnx: build/<file stem>/search): results.json and results.csv (updated as
each trial ends), pareto.png, report.md (the best fully-NPU trial within --budget-ms, and the
commands that rebuild it).
Every option: docs/search.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lpcv_depth.cache import read_records
from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.manifest import write_manifest
from lpcv_depth.options import format_size, inherit, option, parse_size
from lpcv_depth.results import INT8_STAGES
from lpcv_depth.runner import (AUTO_ON_OFF, PassedOnArgs, Step, backend_wanted, check_input_folders, check_qat_args,
                               check_stage_args, command_inputs, check_steps, check_output_root, create_output_root,
                               qat_step, run_step, step_is_current)
from lpcv_depth.stage import StageDefinition, StageLog, display_path
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.export import ExportConfig, OnnxFileOptions
from lpcv_depth.stages.int8_outputs import QDQ_ONNX
from lpcv_depth.stages.pipeline import RunConfig
from lpcv_depth.stages.ptq import CALIBRATION_SCHEMES, PRESETS, PtqConfig
from lpcv_depth.workspace import build_dir, in_workspace

__all__ = ["SearchConfig", "SearchOutput", "Trial", "run_search", "DEFINITION"]

STAGE = "search"
STATE_NAME = "search.json"
LOG_NAME = "log.txt"
UNIT_STATE = "state.json"
HUB_STATE = "hub_state.json"
HUB_THREADS = 8
# What a trial's ptq checks: host latency on x86 says nothing about the phone (the search's latency is
# the S24 profile), and the trial is scored by the evaluate stage, so the held-out checks only guard
# the export. latency_runs is wired (a trial reads no host latency); verify_images is open to the
# user, so --ptq-args "--verify-images 8" restores the full check.
TRIAL_PTQ_CHECKS = {"latency_runs": 0, "verify_images": 2}
LOCAL_RAY, NO_RAY = "local", "none"


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"
    return parse


def _join(values: tuple) -> str:
    return ",".join(format_size(v) if isinstance(v, tuple) else str(v) for v in values)


@dataclass(frozen=True)
class SearchConfig(PassedOnArgs, OnnxFileOptions):
    model: str = inherit(ExportConfig, "model")
    weights: str | None = inherit(ExportConfig, "weights")
    input_size: tuple[tuple[int, int], ...] | None = option(
        None, parse=_comma_list(parse_size), format=_join, metavar="HxW[,HxW...]",
        help="input sizes to try, each a multiple of the model's patch size (default: the model's native size; "
             "with --onnx, the file's own size is the one size)")
    preset: tuple[str, ...] = option(("w8a8",), parse=_comma_list(str), format=_join, metavar="P[,P...]",
                                     help=f"PTQ presets to try: {', '.join(PRESETS)}")
    calibration_scheme: tuple[str, ...] | None = option(
        None, parse=_comma_list(str), format=_join, metavar="S[,S...]",
        help=f"calibration schemes to try: {', '.join(CALIBRATION_SCHEMES)} (default: ptq's default)")
    output_tail_bits: tuple[int, ...] | None = option(None, parse=_comma_list(int), format=_join, metavar="B[,B...]",
                                               help="output tail widths to try: 8,16 (default: ptq's default)")
    calib: Path = inherit(PtqConfig, "calib")
    eval_data: Path | None = inherit(PtqConfig, "eval_data",
                                     help="RGB-D set(s) every trial is scored on (required: it ranks the trials)")
    htp_check: str = option("auto", choices=AUTO_ON_OFF,
                            help="NPU coverage from the local HTP compile: auto = where the qnn extra is installed")
    htp_frames: int | None = option(None, help="also score the HTP-emulated int8 model on N RGB-D frames")
    median: str = inherit(EvaluateConfig, "median")
    hub: str = option("auto", choices=AUTO_ON_OFF,
                      help="S24 profile on AI Hub: auto = where an API token is configured")
    budget_ms: float = option(round(1000 / 30, 1), help="S24 latency budget per frame, ms (default: 30 FPS)")
    qat: bool = inherit(RunConfig, "qat", help="fine-tune each trial's int8 model with the qat stage; the trial's "
                                               "evaluation, htp-check and hub then take the qat folder")
    qat_args: str = inherit(RunConfig, "qat_args")
    ray_address: str = option(LOCAL_RAY, help="where trials run: local (a Ray started on this machine for the "
                                              "run), an existing cluster (HOST:PORT, ray://HOST:PORT or auto), or "
                                              "none (no Ray: one trial after another in this process)")
    max_concurrent: int | None = option(None, help="trials at once (default: as many as the cluster's CPUs and "
                                                   "memory hold at --trial-cpus / --trial-memory-gb each)")
    trial_cpus: float | None = option(None, help="CPUs per trial; its threads are limited to them (default: every "
                                                 "CPU of the smallest node, one trial per node)")
    trial_memory_gb: float = option(4.0, help="memory Ray reserves per trial, GiB (0: no reservation)")
    force: bool = option(False, help="redo every trial even where its outputs are up to date")
    out: Path | None = option(None, help="output folder (default: build/<model>/search; with --onnx, "
                                         "build/<file stem>/search)")

    def __post_init__(self):
        for name in ("input_size", "preset", "calibration_scheme", "output_tail_bits"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"empty grid: --{name.replace('_', '-')} lists no value",
                                  hint=f"pass at least one value, or leave --{name.replace('_', '-')} out for "
                                       "its default")
        # Each size a patch multiple of the model's; an ONNX file is read when the search starts
        # (check_onnx_file), as export reads it when it runs.
        for size in (None,) if self.onnx is not None else self.sizes:
            export = self.export_config(model=self.model, weights=self.weights, input_size=size)
            object.__setattr__(self, "model", export.model)  # a file reference, with its path made absolute
            object.__setattr__(self, "onnx", export.onnx)
        unknown = [p for p in self.preset if p not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; presets: {', '.join(PRESETS)}",
                              hint=f"pass --preset with some of {','.join(PRESETS)}")
        unknown = [s for s in self.calibration_scheme or () if s not in CALIBRATION_SCHEMES]
        if unknown:
            raise ConfigError(f"unknown calibration scheme(s) {', '.join(unknown)}; "
                              f"schemes: {', '.join(CALIBRATION_SCHEMES)}",
                              hint=f"pass --calibration-scheme with some of {','.join(CALIBRATION_SCHEMES)}")
        if any(bits not in (8, 16) for bits in self.output_tail_bits or ()):
            raise ConfigError(f"--output-tail-bits takes 8 and/or 16, got {_join(self.output_tail_bits)}")
        if self.eval_data is None:
            raise ConfigError("search ranks trials by their F-score against ground truth: --eval-data is required",
                              hint="pass an RGB-D set, e.g. --eval-data ../shared/data/rgbd")
        check_input_folders(self.calib, self.eval_data)
        for name, value, low in (("htp_frames", self.htp_frames, 1), ("max_concurrent", self.max_concurrent, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.trial_cpus is not None and self.trial_cpus <= 0:
            raise ConfigError(f"trial_cpus must be > 0, got {self.trial_cpus}")
        if self.trial_memory_gb < 0 or self.budget_ms <= 0:
            raise ConfigError("trial_memory_gb must be >= 0 and budget_ms > 0",
                              hint="--trial-memory-gb 0 reserves nothing; --budget-ms is the S24 time per frame")
        check_stage_args(self)
        check_qat_args(self)

    def check_onnx_file(self) -> None:
        """--onnx: the file's own size is the grid's one size (reading it refuses a file export would)."""
        if self.onnx is None:
            return
        if self.input_size is not None:
            raise ConfigError("--input-size resizes a registered model; an ONNX file is searched at its own size",
                              hint="leave --input-size out (with --wrap, --native-input-size gives the graph's size)")
        self._onnx_size  # noqa: B018 - read now, so that a file export would refuse fails before any trial

    @functools.cached_property
    def _onnx_size(self) -> tuple[int, int]:
        from lpcv_depth.stages.export_onnx import onnx_input_size

        return onnx_input_size(self.export_config(model=self.model, weights=self.weights))

    @property
    def cluster_address(self) -> str | None:
        """The existing cluster to join; None for a local Ray (or none at all)."""
        return None if self.ray_address in (LOCAL_RAY, NO_RAY) else self.ray_address

    @property
    def sizes(self) -> tuple[tuple[int, int] | None, ...]:
        if self.onnx is not None:
            return (self._onnx_size,)
        if self.input_size:
            return self.input_size
        from lpcv_depth.models import get_spec

        return (tuple(get_spec(self.model).native_input_size),)

    @property
    def destination(self) -> Path:
        return Path(self.out) if self.out is not None else build_dir(self.model_folder(self.model), "search")

    def as_dict(self) -> dict:
        from lpcv_depth.manifest import config_as_dict

        return config_as_dict(self)


# --- the grid ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """Work that runs as one task: a size's export (and its fp32 score), or a trial's local stages."""

    key: str
    folder: Path
    steps: tuple[Step, ...]
    state_name: str = UNIT_STATE
    force: bool = False

    @property
    def state_file(self) -> Path:
        return self.folder / self.state_name


@dataclass(frozen=True)
class Trial:
    name: str
    size: tuple[int, int]
    preset: str
    calibration_scheme: str
    output_tail_bits: int
    export: Unit
    local: Unit
    hub: Unit | None

    @property
    def int8_step(self) -> Step:
        """The step whose model the trial's int8 figures are of: qat with --qat, else ptq."""
        return next(step for step in reversed(self.local.steps) if step.stage in INT8_STAGES)


def _ptq_default(name: str) -> Any:
    from lpcv_depth.options import field_default

    return field_default(next(f for f in dataclasses.fields(PtqConfig) if f.name == name))


def trial_name(size, preset: str, scheme: str | None, tail: int | None) -> str:
    parts = [format_size(size), preset]
    if scheme is not None:
        parts.append(scheme)
    if tail is not None:
        parts.append(f"tail{tail}")
    return "-".join(parts)


def plan_trials(config: SearchConfig, root: Path, *, htp: bool, hub: bool) -> list[Trial]:
    """Every point of the grid with the stage configs that build it under `root`."""
    schemes = config.calibration_scheme or (None,)
    tails = config.output_tail_bits or (None,)
    exports = {size: _export_unit(config, root / "exports" / format_size(size), size) for size in config.sizes}
    trials = []
    for size, preset, scheme, tail in itertools.product(config.sizes, config.preset, schemes, tails):
        name = trial_name(size, preset, scheme, tail)
        local, hub_unit = _trial_units(config, root / "trials" / name, exports[size], preset, scheme, tail,
                                       htp=htp, hub=hub)
        trials.append(Trial(name, size, preset, scheme or _ptq_default("calibration_scheme"),
                            tail or _ptq_default("output_tail_bits"), exports[size], local, hub_unit))
    return trials


def _export_unit(config: SearchConfig, folder: Path, size) -> Unit:
    export = Step("export", "export", folder / "export", {
        "model": config.model, "weights": config.weights, "input_size": None if config.onnx else size,
        "check_images": in_workspace(config.calib), **config.onnx_options()}, config.export_args, command=STAGE)
    evaluate = Step("eval-fp32", "evaluate", folder / "eval-fp32", _evaluate_wiring(config, export.folder / "model.onnx"),
                    upstream={"export": export.folder}, command=STAGE)
    return Unit(f"export {format_size(size)}", folder, (export, evaluate), force=config.force)


def _evaluate_wiring(config: SearchConfig, onnx: Path) -> dict:
    return {"data": in_workspace(config.eval_data), "onnx": onnx, "num_vis": 0, "median": config.median}


def _trial_units(config: SearchConfig, folder: Path, export: Unit, preset: str, scheme: str | None,
                 tail: int | None, *, htp: bool, hub: bool) -> tuple[Unit, Unit | None]:
    export_dir, ptq_dir = export.steps[0].folder, folder / "ptq"
    # The grid's axes are the search's own: --ptq-args may not set them, even where the grid leaves
    # one at ptq's default.
    wiring = {"calib": in_workspace(config.calib), "fp32": export_dir, "preset": preset, "eval_data": None,
              "calibration_scheme": scheme or _ptq_default("calibration_scheme"),
              "output_tail_bits": tail or _ptq_default("output_tail_bits"), **TRIAL_PTQ_CHECKS}
    ptq = Step("ptq", "ptq", ptq_dir, wiring, config.ptq_args, {"export": export_dir},
               open_to_user=("verify_images",), command=STAGE)
    qat = qat_step(config, ptq, folder / "qat")
    int8 = qat or ptq
    steps = [ptq, *([qat] if qat else []),
             Step("eval-int8", "evaluate", folder / "eval-int8", _evaluate_wiring(config, int8.folder / QDQ_ONNX),
                  upstream={int8.stage: int8.folder}, command=STAGE)]
    if htp:
        # Coverage comes from the compile alone; the emulation (seconds to minutes a frame) runs only
        # for --htp-frames. Open to the user, so --htp-check-args may turn them back on: numerics, fp16 baseline.
        scored = config.htp_frames is not None
        steps.append(Step("htp-check", "htp-check", folder / "htp-check", {
            "ptq": int8.folder, "eval_data": in_workspace(config.eval_data) if scored else None,
            "median": config.median, "max_frames": config.htp_frames, "numerics": scored, "fp16_baseline": False},
            config.htp_check_args, {int8.stage: int8.folder}, open_to_user=("numerics", "fp16_baseline"),
            command=STAGE))
    hub_unit = None
    if hub:
        hub_step = Step("hub", "hub", folder / "hub", {"artifact": int8.folder, "eval_data": None, "inference": False},
                        config.hub_args, {int8.stage: int8.folder}, command=STAGE)
        hub_unit = Unit(f"hub {folder.name}", folder, (hub_step,), state_name=HUB_STATE)
    return Unit(folder.name, folder, tuple(steps), force=config.force), hub_unit


# --- running a unit (in a Ray worker, or in this process) -------------------------------------------

def up_to_date(unit: Unit) -> bool:
    """Every step's output exists, verifies, and was made from what it would be made from now."""
    if unit.force:
        return False
    records = read_records(unit.state_file)
    return all(step_is_current(step, records) for step in unit.steps)


def execute_unit(unit: Unit, redirect: bool = True) -> dict:
    """Run the unit's steps that are not up to date; never raises for a stage's failure: the outcome
    says what failed, and the unit's log.txt holds every stage's own lines (with `redirect`, also
    what they print: never from a thread, as the redirection is process-wide)."""
    unit.folder.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {"status": "done", "steps": {}, "worker": _worker()}
    start = time.perf_counter()
    with open(unit.folder / LOG_NAME, "a") as log_file, _quiet(log_file) if redirect else contextlib.nullcontext():
        for step in unit.steps:
            try:
                status = run_step(step, unit.state_file, StageLog(step.name, stream=log_file), force=unit.force)
            except Exception as err:  # noqa: BLE001 - one trial's failure must not stop the others
                traceback.print_exc(file=log_file)
                outcome.update(status="failed", failed_step=step.name, error=_error_text(err))
                break
            outcome["steps"][step.name] = "reused" if status == "up to date" else "ran"
    outcome["seconds"] = round(time.perf_counter() - start, 2)
    return outcome


def _error_text(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, LpcvError) else f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def _quiet(log_file):
    """Stage progress bars and stray prints go to the unit's log, not the search's one line per trial."""
    with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        yield


def _worker() -> str:
    """Where the unit ran: the Ray node and process, or this process."""
    node = "this process"
    # Not imported here: Ray reads its authentication settings once, at import, so a search without
    # Ray would fix them for every later search of this process.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node = f"ray node {ray.get_runtime_context().get_node_id()[:12]}"
    return f"{node}, pid {os.getpid()}"


# --- the driver ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchOutput:
    """What a finished run of lpcv-depth search hands back: where its output folder is, and what it found."""

    out_dir: Path
    results: Any  # results.SearchResults
    report: Path


def run_search(config: SearchConfig, log: StageLog | None = None) -> SearchOutput:
    """Check everything, then run the grid (exports first, each trial as soon as its export is there,
    hub profiles concurrently as trials end), then choose and report."""
    log = log or StageLog(STAGE)
    config.check_onnx_file()
    htp, hub = _htp_wanted(config), backend_wanted("hub", config.hub)[0]
    if config.cluster_address is not None:
        from lpcv_depth.backends.ray_cluster import check_address

        check_address(config.cluster_address)  # a dead address is an error now, not after a minute of retries
    root = config.destination.absolute()
    check_output_root(root, command=STAGE, marker=STATE_NAME, model=config.model, inputs=command_inputs(config))
    trials = plan_trials(config, root, htp=htp, hub=hub)
    check_steps(step for unit in _units(trials) + [t.hub for t in trials if t.hub] for step in unit.steps)
    create_output_root(root, command=STAGE, marker=STATE_NAME, model=config.model)
    table = _Table(root, config, trials)
    log.info(f"{len(trials)} trials ({_grid_line(config)}); qat {'on' if config.qat else 'off'}, "
             f"htp-check {'on' if htp else 'off'}, hub {'on' if hub else 'off'} -> {display_path(root)}")
    # Each unit's up-to-date check hashes what it reads (weights, photos): done once, here.
    current = {unit.key: up_to_date(unit) for unit in _units(trials)}
    with _open_runner(config, root, all(current.values()), log) as runner:
        _Scheduler(config, trials, table, runner, _HubThreads(HUB_THREADS), log, current).run()
    return _finish(config, root, table, log)


def _grid_line(config: SearchConfig) -> str:
    axes = [("input size", config.sizes), ("preset", config.preset), ("scheme", config.calibration_scheme or ()),
            ("tail bits", config.output_tail_bits or ())]
    return " x ".join(f"{len(values)} {name}" for name, values in axes if values)


def _htp_wanted(config: SearchConfig) -> bool:
    wanted, reason = backend_wanted("htp-check", config.htp_check)
    if config.htp_frames and not wanted:
        raise ConfigError(f"--htp-frames needs the local HTP check, but {reason}",
                          hint='pip install -e ".[qnn]" (Linux x86_64), and --htp-check auto or on')
    return wanted


class _Table:
    """Every trial's row, rewritten to results.json / results.csv whenever a trial changes."""

    def __init__(self, root: Path, config: SearchConfig, trials: list[Trial]):
        from lpcv_depth.stages.search_report import trial_row

        self.root, self.config, self.trials = root, config, {t.name: t for t in trials}
        self.outcomes: dict[str, dict] = {}
        self.hub_outcomes: dict[str, dict] = {}
        self.rows = {t.name: trial_row(t, None) for t in trials}

    def update(self, name: str, outcome: dict | None = None, hub_outcome: dict | None = None):
        from lpcv_depth.stages.search_report import trial_row, write_table

        if outcome is not None:
            self.outcomes[name] = outcome
        if hub_outcome is not None:
            self.hub_outcomes[name] = hub_outcome
        self.rows[name] = trial_row(self.trials[name], self.outcomes.get(name), self.hub_outcomes.get(name))
        write_table(self.root, self.results())
        return self.rows[name]

    def results(self, chosen: str | None = None):
        from lpcv_depth.results import SearchResults
        from lpcv_depth.stages.search_report import latency_axis

        rows = list(self.rows.values())
        grid = {"input_size": [format_size(s) for s in self.config.sizes], "preset": list(self.config.preset),
                "calibration_scheme": list(self.config.calibration_scheme or ()),
                "output_tail_bits": list(self.config.output_tail_bits or ())}
        return SearchResults(model=self.config.model, grid=grid, budget_ms=self.config.budget_ms,
                             axis=latency_axis(rows), chosen=chosen, trials=rows)


class _LocalLoop:
    """--ray-address none: one unit after another, in this process."""

    def __init__(self, function: Callable[[Unit], dict]):
        self.function = function
        self.running: dict[str, Unit] = {}

    def submit(self, key: str, unit: Unit) -> None:
        self.running[key] = unit

    def wait(self) -> list[tuple[str, Any]]:
        key = next(iter(self.running))
        return [(key, self.function(self.running.pop(key)))]


@dataclass
class _Runner:
    pool: Any
    capacity: int
    where: str


@contextlib.contextmanager
def _open_runner(config: SearchConfig, root: Path, nothing_to_run: bool, log: StageLog):
    """Ray (local or the cluster at --ray-address) or the plain loop. Ray is not started when every
    unit is up to date: a rerun of a finished search only reads its manifests."""
    if config.ray_address == NO_RAY:
        yield _Runner(_LocalLoop(execute_unit), config.max_concurrent or 1, "this process")
        return
    if nothing_to_run:
        yield _Runner(_LocalLoop(execute_unit), 1, "nothing to run")
        return
    from lpcv_depth.backends.ray_cluster import RayCluster

    with contextlib.ExitStack() as stack:
        with log.step("ray") as step:
            cluster = stack.enter_context(RayCluster(config.cluster_address))
            nodes = cluster.nodes()
            cpus = config.trial_cpus or (min(n.cpus for n in nodes) if nodes else 1)
            memory = config.trial_memory_gb * 2**30
            capacity = cluster.check_fits(cpus, memory)
            if not cluster.is_local:
                cluster.check_shared_folder(root)
            capacity = min(capacity, config.max_concurrent or capacity)
            step.detail = (("Ray on this machine" if cluster.is_local else f"Ray cluster {config.ray_address}")
                           + f", {len(nodes)} node(s), {capacity} trial(s) at once, {cpus:g} CPU(s) and "
                             f"{config.trial_memory_gb:g} GiB each")
        yield _Runner(cluster.pool(execute_unit, cpus=cpus, memory_bytes=memory), capacity, step.detail)


def _units(trials: list[Trial]) -> list[Unit]:
    exports = list({t.export.key: t.export for t in trials}.values())
    return exports + [t.local for t in trials]


class _Scheduler:
    """Exports first; a trial as soon as its export is done and a slot is free; its hub profile in a
    thread as soon as it ends. One line per trial start and end, with the count and an ETA."""

    def __init__(self, config, trials, table, runner, hub_threads, log, current: dict[str, bool]):
        self.config, self.trials, self.table, self.runner = config, trials, table, runner
        self.hub_threads, self.log, self.current = hub_threads, log, current
        self.exports = {t.export.key: t.export for t in trials}
        self.export_state: dict[str, dict] = {}
        self.waiting = list(trials)
        self.finished = 0
        self.durations: list[float] = []
        self.started = 0

    def run(self) -> None:
        queue = []
        for key, unit in self.exports.items():
            if self.current[key]:
                self.export_state[key] = {"status": "done", "reused": True}
            else:
                queue.append(unit)
        while queue or self.waiting or self.runner.pool.running:
            while queue and len(self.runner.pool.running) < self.runner.capacity:
                unit = queue.pop(0)
                self.log.info(f"{unit.key}: start")
                self.runner.pool.submit(unit.key, unit)
            self._start_ready_trials()
            if not self.runner.pool.running:
                if queue or not self.waiting:
                    continue
                raise RuntimeError(f"search scheduler stalled with {len(self.waiting)} trial(s) waiting")
            for key, outcome in self.runner.pool.wait():
                self._finished(key, outcome)
            self._collect_hub(block=False)
        self._collect_hub(block=True)

    def _start_ready_trials(self) -> None:
        for trial in list(self.waiting):
            export = self.export_state.get(trial.export.key)
            if export is None:
                continue
            if export["status"] == "failed":
                self.waiting.remove(trial)
                self._record(trial, {"status": "failed", "failed_step": "export",
                                     "error": f"{trial.export.key} failed: {export.get('error')}"})
                continue
            # Checked at the start, unless its export was redone since (then it is not up to date).
            if self.current[trial.local.key] if export.get("reused") else up_to_date(trial.local):
                self.waiting.remove(trial)
                self._record(trial, {"status": "done", "reused": True})
                continue
            if len(self.runner.pool.running) >= self.runner.capacity:
                return
            self.waiting.remove(trial)
            self.started += 1
            self.log.info(f"[{self.started}/{len(self.trials)}] start {trial.name}")
            self.runner.pool.submit(trial.name, trial.local)

    def _finished(self, key: str, outcome: Any) -> None:
        if not isinstance(outcome, dict):  # the worker process died (out of memory, crash)
            outcome = {"status": "failed", "error": f"the worker running it died: {_error_text(outcome)}"}
        if key in self.exports:
            self.export_state[key] = outcome
            line = f"ok {outcome.get('seconds', 0):.1f}s" if outcome["status"] == "done" else \
                f"FAILED: {str(outcome.get('error')).splitlines()[0]}"
            self.log.info(f"{key}: {line}")
            return
        trial = self.table.trials[key]
        if outcome["status"] == "done":
            self.durations.append(outcome["seconds"])
        self._record(trial, outcome)

    def _record(self, trial: Trial, outcome: dict) -> None:
        self.finished += 1
        row = self.table.update(trial.name, outcome)
        self.log.info(f"[{self.finished}/{len(self.trials)}] {_end_line(trial, row, outcome)} | {self._eta()}")
        if row.status == "done" and trial.hub is not None:
            self.hub_threads.submit(trial)

    def _eta(self) -> str:
        left = len(self.trials) - self.finished
        failed = sum(1 for r in self.table.rows.values() if r.status == "failed")
        count = f"{self.finished}/{len(self.trials)} finished" + (f" ({failed} failed)" if failed else "")
        if not left:
            pending = self.hub_threads.pending
            return count + (f", {pending} hub profile(s) pending" if pending else "")
        if not self.durations:
            return count + ", ETA after the first trial"
        seconds = sum(self.durations) / len(self.durations) * left / max(1, self.runner.capacity)
        return count + f", ETA {_duration(seconds)}"

    def _collect_hub(self, block: bool) -> None:
        from lpcv_depth.stages.search_report import latency_line

        for trial, outcome in self.hub_threads.finished(block):
            row = self.table.update(trial.name, hub_outcome=outcome)
            if outcome["status"] == "done":
                self.log.info(f"hub {trial.name}: {latency_line(row)}")
            else:
                self.log.warn(f"hub {trial.name} FAILED: {str(outcome.get('error')).splitlines()[0]} "
                              f"(log: {display_path(trial.local.folder / LOG_NAME)})")


class _HubThreads:
    """Hub runs in daemon threads, at most `limit` at once: they mostly wait on AI Hub, and Ctrl+C
    must end the search at once instead of waiting for a job (its id is in the trial's
    hub_jobs.json, so a rerun resumes it)."""

    def __init__(self, limit: int):
        self.slots = threading.Semaphore(limit)
        self.done: queue.Queue = queue.Queue()
        self.pending = 0

    def submit(self, trial: Trial) -> None:
        def work() -> None:
            with self.slots:
                try:
                    outcome = execute_unit(trial.hub, redirect=False)
                except Exception as err:  # noqa: BLE001 - e.g. its log cannot be written: that trial's hub fails
                    outcome = {"status": "failed", "error": _error_text(err)}
            self.done.put((trial, outcome))

        self.pending += 1
        threading.Thread(target=work, name=f"hub {trial.name}", daemon=True).start()

    def finished(self, block: bool) -> list[tuple[Trial, dict]]:
        """What has ended; with `block`, everything, waiting for it."""
        ended = []
        while self.pending:
            try:
                ended.append(self.done.get(block=block))
            except queue.Empty:
                break
            self.pending -= 1
        return ended


def _end_line(trial: Trial, row, outcome: dict) -> str:
    if row.status == "failed":
        return (f"FAILED {trial.name} at {outcome.get('failed_step', '?')}: "
                f"{str(row.error).splitlines()[0]} (log: {display_path(trial.local.folder / LOG_NAME)})")
    verb = "reused" if outcome.get("reused") else f"done {outcome.get('seconds', 0):.1f}s"
    int8 = "int8 after qat" if row.int8_stage == "qat" else "int8"
    figures = f"F-score {int8} {row.fscore_int8:.3f} (fp32 {row.fscore_fp32:.3f})" if row.fscore_int8 is not None \
        else ""
    if row.htp_full is not None:
        figures += ", all on the HTP" if row.htp_full else f", {row.htp_cpu_nodes} node(s) on the CPU"
    return f"{verb} {trial.name}: {figures}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f}m{seconds % 60:02.0f}s" if seconds >= 60 else f"{seconds:.0f}s"


def _finish(config: SearchConfig, root: Path, table: _Table, log: StageLog) -> SearchOutput:
    from lpcv_depth.stages.search_report import (PARETO, REPORT, choose, draw_pareto, rebuild_commands,
                                                 report_markdown, write_table)

    rows = list(table.rows.values())
    chosen, reason = choose(rows, config.budget_ms)
    results = table.results(chosen.trial if chosen else None)
    outputs = write_table(root, results)
    pareto = draw_pareto(root / PARETO, rows, config.budget_ms, config.model)
    commands = rebuild_commands(config, table.trials[chosen.trial]) if chosen else []
    report = root / REPORT
    report.write_text(report_markdown(results, reason, commands, root))
    outputs += [report] + ([pareto] if pareto else [])
    write_manifest(root, stage=STAGE, config=config.as_dict(), inputs=_manifest_inputs(config),
                   outputs=outputs, timings=log.timings, results=results)
    failed = sum(r.status == "failed" for r in rows)
    log.info(f"ok {log.total_seconds:.1f}s: {len(rows) - failed}/{len(rows)} trials done"
             + (f", {failed} FAILED" if failed else "") + f" -> {display_path(root)}")
    log.info(f"chosen: {chosen.trial}" if chosen else f"no trial chosen: {reason}")
    return SearchOutput(root, results, report)


def _manifest_inputs(config: SearchConfig) -> dict:
    from lpcv_depth.images import list_images
    from lpcv_depth.manifest import sha256_of_files

    calib = in_workspace(config.calib)
    inputs = {"calib": {"path": os.fspath(calib), "sha256": sha256_of_files(list_images(calib), calib)},
              "eval_data": {"path": os.fspath(in_workspace(config.eval_data))}}
    if config.onnx is not None:  # as export --onnx records it: the file searched, and its external data
        from lpcv_depth.stages.export_onnx import source_hashes

        hashes = source_hashes(Path(config.onnx))
        inputs["onnx"] = {"path": os.fspath(Path(config.onnx).resolve()), "sha256": hashes.pop(Path(config.onnx).name),
                          "external_data": hashes}
    return inputs


def _next_hint(result: SearchOutput) -> str | None:
    return f"open {display_path(result.report)}"


DEFINITION = StageDefinition(name=STAGE, config=SearchConfig, run=run_search, description=__doc__,
                             next_hint=_next_hint)
