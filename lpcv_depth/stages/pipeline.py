"""The whole pipeline in one command: export -> ptq -> htp-check -> hub -> compare.

    lpcv-depth run --model fastdepth --weights default
    lpcv-depth run --model depth_anything_v2_vits --eval-data ../shared/data/rgbd --preset w8a16
    lpcv-depth run --model fastdepth --weights default --ptq-args "--holdout 4 --no-cle" --force ptq

htp-check runs where the qnn extra is installed, hub where an AI Hub token is configured (both
can be forced on or off). A stage whose output is up to date (same config, same inputs, outputs
intact) is skipped; `--force STAGE` redoes it and everything after it. Any stage option can be
passed on with --<stage>-args "...". Writes under OUT (default build/<model>/), with
`pipeline.json` recording what each stage was run from.
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lpcv_depth.cache import is_up_to_date, read_records, stage_fingerprint, stage_record, write_records
from lpcv_depth.errors import ConfigError, LpcvError
from lpcv_depth.manifest import Manifest, config_as_dict
from lpcv_depth.options import (add_config_arguments, cli_fields, config_from_args, field_default, inherit,
                                option)
from lpcv_depth.report import markdown_table
from lpcv_depth.stage import StageDefinition, StageLog, command_line, display_path
from lpcv_depth.stages.evaluate import EvaluateConfig
from lpcv_depth.stages.export import ExportConfig
from lpcv_depth.stages.ptq import PtqConfig
from lpcv_depth.workspace import build_dir, in_workspace

__all__ = ["RunConfig", "RunResult", "StageOutcome", "run_pipeline", "PIPELINE_STAGES", "parse_stage_args",
           "stage_config", "stage_args_option", "check_stage_args", "AUTO_ON_OFF"]

STAGE = "run"
PIPELINE_STAGES = ("export", "ptq", "htp-check", "hub", "compare")
STATE_NAME = "pipeline.json"
AUTO_ON_OFF = ("auto", "on", "off")


def stage_args_option(stage: str) -> Any:
    """The --<stage>-args option of a command that runs other stages (run, search)."""
    return option("", metavar='"ARGS"',
                  help=f"more {stage} options, as on its command line (lpcv-depth {stage} --help)")


def check_stage_args(config: Any, wired: dict[str, tuple[str, ...]] | None = None, command: str = "run") -> None:
    """Every --<stage>-args of `config` parsed now: bad flags fail before any stage runs."""
    for stage in ("export", "ptq", "htp-check", "hub"):
        try:
            parse_stage_args(stage, getattr(config, f"{stage.replace('-', '_')}_args"),
                             None if wired is None else wired[stage], command)
        except ValueError as err:
            raise ConfigError(f"--{stage}-args cannot be split into arguments: {err}") from None


@dataclass(frozen=True)
class RunConfig:
    model: str = inherit(ExportConfig, "model")
    weights: str | None = inherit(ExportConfig, "weights")
    input_size: tuple[int, int] | None = inherit(ExportConfig, "input_size")
    calib: Path = inherit(PtqConfig, "calib")
    preset: str = inherit(PtqConfig, "preset")
    eval_data: Path | None = inherit(PtqConfig, "eval_data",
                                     help="RGB-D set(s): F-scores against ground truth in ptq, htp-check and hub")
    median: str = inherit(EvaluateConfig, "median")
    htp_check: str = option("auto", choices=AUTO_ON_OFF,
                            help="run the local HTP check: auto = where the qnn extra is installed")
    hub: str = option("auto", choices=AUTO_ON_OFF, help="run on AI Hub: auto = where an API token is configured")
    max_frames: int | None = option(None, help="at most N frames for the HTP emulation and the phone")
    force: tuple[str, ...] = option((), choices=(*PIPELINE_STAGES, "all"), repeatable=True,
                                    help="redo STAGE (and what follows) even if up to date; repeatable")
    export_args: str = stage_args_option("export")
    ptq_args: str = stage_args_option("ptq")
    htp_check_args: str = stage_args_option("htp-check")
    hub_args: str = stage_args_option("hub")
    out: Path | None = option(None, help="output folder (default: build/<model>)")

    def __post_init__(self):
        ExportConfig(model=self.model, weights=self.weights, input_size=self.input_size)  # validates these
        if not in_workspace(self.calib).is_dir():
            raise ConfigError(f"--calib folder not found: {self.calib}",
                              hint="pass a folder of photos; a fresh clone ships calibration_data/ (run from the "
                                   "checkout, or pass --calib with its path)")
        if self.eval_data is not None and not in_workspace(self.eval_data).is_dir():
            raise ConfigError(f"--eval-data folder not found: {self.eval_data}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        check_stage_args(self)

    @property
    def destination(self) -> Path:
        return Path(self.out) if self.out is not None else build_dir(self.model)

    def forced(self, stage: str) -> bool:
        return "all" in self.force or stage in self.force

    def as_dict(self) -> dict:
        return config_as_dict(self)


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran", "up to date", "skipped"
    folder: Path | None
    seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    outcomes: list[StageOutcome]
    summary: str

    def outcome(self, stage: str) -> StageOutcome:
        return next(o for o in self.outcomes if o.stage == stage)


@dataclass
class _Pipeline:
    """What the stages of one run share: the config, the state file, the folders made so far."""

    config: RunConfig
    log: StageLog
    state: dict
    folders: dict[str, Path] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    outcomes: list[StageOutcome] = field(default_factory=list)
    redo: bool = False


def run_pipeline(config: RunConfig, log: StageLog | None = None) -> RunResult:
    """Each stage in turn: skipped when up to date, run otherwise; then the summary."""
    log = log or StageLog(STAGE)
    root = config.destination
    root.mkdir(parents=True, exist_ok=True)
    pipe = _Pipeline(config, log, read_records(root / STATE_NAME))
    steps: list[tuple[str, Callable[[_Pipeline], Any], Callable[[_Pipeline], str | None]]] = [
        ("export", _export_config, _always),
        ("ptq", _ptq_config, _always),
        ("htp-check", _htp_check_config, _htp_check_unavailable),
        ("hub", _hub_configs, _hub_unavailable),
        ("compare", _compare_config, _always),
    ]
    for index, (stage, build_config, unavailable) in enumerate(steps, 1):
        prefix = f"[{index}/{len(steps)}] {stage}"
        reason = unavailable(pipe)
        if reason:
            pipe.outcomes.append(StageOutcome(stage, "skipped", None, reason=reason))
            log.info(f"{prefix} skipped: {reason}")
            continue
        _run_stage(pipe, stage, build_config(pipe), prefix)
        write_records(root / STATE_NAME, pipe.state)
    summary = summarize(pipe)
    (root / "summary.md").write_text(summary)
    log.info(f"ok {log.total_seconds:.1f}s -> {display_path(root)}")
    for line in summary.splitlines():
        log.info(line)
    return RunResult(root, pipe.outcomes, summary)


def _always(pipe: _Pipeline) -> str | None:
    return None


# The options `run` sets on each stage itself, to chain their folders and pass its own options on.
WIRED = {"export": ("model", "weights", "input_size", "check_images", "out"),
         "ptq": ("calib", "fp32", "preset", "eval_data", "median", "out"),
         "htp-check": ("ptq", "eval_data", "median", "max_frames", "out"),
         "hub": ("artifact", "eval_data", "median", "max_frames", "out"),
         "compare": ("fp32", "int8", "htp_check", "int8_hub", "out")}


def parse_stage_args(stage: str, extra_args: str, wired: tuple[str, ...] | None = None,
                     command: str = "run") -> dict:
    """The flags given in --<stage>-args, checked against the stage's own options and refused where
    they set an option that `lpcv-depth COMMAND` wires itself (`wired`, default: run's WIRED)."""
    from lpcv_depth.cli import stage_definition

    parser = argparse.ArgumentParser(prog=f"--{stage}-args", add_help=False, exit_on_error=False)
    add_config_arguments(parser, stage_definition(stage).config, given_only=True)
    flag = f"--{stage}-args"
    try:
        given, unknown = parser.parse_known_args(shlex.split(extra_args))
    except argparse.ArgumentError as err:
        raise ConfigError(f"{flag} {extra_args!r}: {err}", hint=f"use the flags of lpcv-depth {stage} --help") from None
    if unknown:
        raise ConfigError(f"{flag} {extra_args!r}: lpcv-depth {stage} has no option {' '.join(unknown)}",
                          hint=f"use the flags of lpcv-depth {stage} --help")
    clash = sorted(set(vars(given)) & set(WIRED[stage] if wired is None else wired))
    if clash:
        raise ConfigError(f"{flag} sets {', '.join('--' + c.replace('_', '-') for c in clash)}, which "
                          f"`lpcv-depth {command}` wires itself",
                          hint=f"pass those through {command}'s own options instead")
    return vars(given)


def stage_config(stage: str, extra_args: str, wiring: dict, wired: tuple[str, ...] | None = None) -> Any:
    """The stage's config from the caller's wiring plus the user's --<stage>-args."""
    from lpcv_depth.cli import stage_definition

    config_type = stage_definition(stage).config
    namespace = argparse.Namespace(**{f.name: field_default(f) for f, _ in cli_fields(config_type)})
    for key, value in {**wiring, **parse_stage_args(stage, extra_args, wired)}.items():
        setattr(namespace, key, value)
    return config_from_args(config_type, namespace)


def _export_config(pipe: _Pipeline):
    c = pipe.config
    return stage_config("export", c.export_args, {
        "model": c.model, "weights": c.weights, "input_size": c.input_size,
        "check_images": in_workspace(c.calib), "out": c.destination / "export"})


def _ptq_config(pipe: _Pipeline):
    c = pipe.config
    return stage_config("ptq", c.ptq_args, {
        "calib": in_workspace(c.calib), "fp32": pipe.folders["export"], "preset": c.preset,
        "eval_data": in_workspace(c.eval_data) if c.eval_data else None, "median": c.median,
        "out": c.destination / f"ptq-{c.preset}"})


def _htp_check_config(pipe: _Pipeline):
    c = pipe.config
    return stage_config("htp-check", c.htp_check_args, {
        "ptq": pipe.folders["ptq"], "eval_data": in_workspace(c.eval_data) if c.eval_data else None,
        "median": c.median, "max_frames": c.max_frames, "out": pipe.folders["ptq"] / "htp-check"})


def _hub_configs(pipe: _Pipeline):
    c = pipe.config
    return stage_config("hub", c.hub_args, {
        "artifact": pipe.folders["ptq"], "eval_data": in_workspace(c.eval_data) if c.eval_data else None,
        "median": c.median, "max_frames": c.max_frames, "out": c.destination / f"hub-ptq-{c.preset}"})


def _compare_config(pipe: _Pipeline):
    c = pipe.config
    return stage_config("compare", "", {
        "fp32": pipe.folders["export"], "int8": pipe.folders["ptq"], "htp_check": pipe.folders.get("htp-check"),
        "int8_hub": pipe.folders.get("hub"), "out": c.destination / "compare"})


def _htp_check_unavailable(pipe: _Pipeline) -> str | None:
    if pipe.config.htp_check == "off":
        return "--htp-check off"
    if pipe.config.htp_check == "on":
        return None
    from lpcv_depth.backends import qnn

    return qnn.unavailable_reason()


def _hub_unavailable(pipe: _Pipeline) -> str | None:
    if pipe.config.hub == "off":
        return "--hub off"
    if pipe.config.hub == "on":
        return None
    from lpcv_depth.backends import ai_hub

    try:
        ai_hub.read_api_config()
    except LpcvError as err:
        return f"no AI Hub token ({str(err).splitlines()[0]}); --hub on to insist"
    return None


def _run_stage(pipe: _Pipeline, stage: str, stage_config: Any, prefix: str) -> None:
    from lpcv_depth.cli import stage_definition

    folder = Path(stage_config.destination)
    upstream = {name: pipe.state[name]["manifest_sha256"] for name in pipe.fingerprints}
    fingerprint = stage_fingerprint(stage, stage_config, upstream)
    if not (pipe.redo or pipe.config.forced(stage)) and is_up_to_date(pipe.state.get(stage), folder, stage,
                                                                       fingerprint):
        pipe.log.info(f"{prefix} up to date, skipped -> {display_path(folder)}")
        pipe.outcomes.append(StageOutcome(stage, "up to date", folder))
    else:
        pipe.log.info(f"{prefix} running ...")
        start = time.perf_counter()
        stage_definition(stage).run(stage_config, StageLog(stage))
        seconds = time.perf_counter() - start
        pipe.log.info(f"{prefix} ok {seconds:.1f}s -> {display_path(folder)}")
        pipe.outcomes.append(StageOutcome(stage, "ran", folder, seconds))
        pipe.redo = True  # everything after a redone stage is redone too
    pipe.folders[stage] = folder
    pipe.fingerprints[stage] = fingerprint
    pipe.state[stage] = stage_record(folder, fingerprint)


def summarize(pipe: _Pipeline) -> str:
    """Where everything is, and the figures that decide a submission, from the typed results."""
    rows = [[o.stage, o.status + (f" ({o.seconds:.0f}s)" if o.status == "ran" else ""),
             display_path(o.folder) if o.folder else o.reason, _headline(o)] for o in pipe.outcomes]
    table = markdown_table(["stage", "status", "where", "figures"], rows)
    compare = pipe.folders.get("compare")
    tail = f"\nReport: {display_path(compare / 'compare.md')}\n" if compare else ""
    return f"# lpcv-depth run: {pipe.config.model}\n\n{table}{tail}"


def _headline(outcome: StageOutcome) -> str:
    if outcome.folder is None:
        return ""
    from lpcv_depth import results as r

    manifest = Manifest.read(outcome.folder, stage=outcome.stage, verify=False)
    if outcome.stage == "export":
        figures = manifest.results_as(r.ExportResults)
        return f"{figures.params / 1e6:.1f}M params, {figures.macs / 1e9:.2f} GMACs"
    if outcome.stage == "ptq":
        ptq = manifest.results_as(r.PtqResults)
        text = (f"int8 vs fp32 SQNR {ptq.int8_vs_fp32.sqnr_db:.1f} dB "
                f"({ptq.int8_vs_fp32.sqnr_db_scale_aligned:.1f} scale-aligned)")
        if ptq.ground_truth is not None:
            text += (f", F-score fp32 {ptq.ground_truth.fp32['fscore@0.1']:.2f} / "
                     f"int8 {ptq.ground_truth.int8['fscore@0.1']:.2f}")
        return text
    if outcome.stage == "htp-check":
        htp = manifest.results_as(r.HtpCheckResults)
        coverage = "fully on the HTP" if htp.coverage.full_htp else f"{htp.coverage.cpu_nodes} nodes on the CPU"
        return f"{coverage} (emulation)"
    if outcome.stage == "hub":
        hub = manifest.results_as(r.HubResults)
        return f"{hub.profile.estimated_inference_time_ms:.1f} ms on {hub.device}" if hub.profile else ""
    return ""


def _next_hint(result: RunResult) -> str | None:
    ptq = next((o.folder for o in result.outcomes if o.stage == "ptq" and o.folder), None)
    hub = next((o for o in result.outcomes if o.stage == "hub"), None)
    if ptq is not None and hub is not None and hub.status == "skipped":
        return command_line("hub", display_path(ptq)) + "   (on a Galaxy S24, after qai-hub configure)"
    return None


DEFINITION = StageDefinition(name=STAGE, config=RunConfig, run=run_pipeline, description=__doc__,
                             next_hint=_next_hint)
