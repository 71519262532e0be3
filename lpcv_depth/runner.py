"""Stages run one after another, the one way `lpcv-depth run` and every `search` trial run them.

A *step* is one stage run inside such a command: the options the command sets itself (`wiring`:
the folders it chains, the options it passes on), the user's `--<stage>-args`, and the stage
folders whose manifests it reads (`upstream`). The runner

- decides whether the HTP check and AI Hub are on (`backend_wanted`),
- checks the command's input folders and its output folder before anything is written
  (`check_input_folders`, `check_output_root`),
- builds every step's config before the first stage runs, so a bad option fails at once
  (`check_steps`),
- runs a step unless its output is up to date (`run_step`; the rule is lpcv_depth.cache's:
  same config, same inputs, same upstream manifests, outputs intact).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lpcv_depth.cache import is_up_to_date, read_records, stage_fingerprint, stage_record, write_records
from lpcv_depth.errors import ConfigError, LpcvError, OutputDirError
from lpcv_depth.files import write_text_atomically
from lpcv_depth.manifest import MANIFEST_NAME, sha256_file
from lpcv_depth.options import add_config_arguments, cli_fields, config_from_args, field_default, option
from lpcv_depth.stage import StageLog, refuse_inputs
from lpcv_depth.workspace import in_workspace, where_to_write_hint

__all__ = ["AUTO_ON_OFF", "STAGES_WITH_ARGS", "PassedOnArgs", "Step", "stage_args_option", "parse_stage_args",
           "check_stage_args", "check_qat_args", "stage_config", "qat_step", "check_steps", "step_is_current",
           "run_step", "backend_wanted",
           "command_inputs", "check_input_folders", "check_output_root", "create_output_root"]

AUTO_ON_OFF = ("auto", "on", "off")
# The stages whose options a command passes on through --<stage>-args.
STAGES_WITH_ARGS = ("export", "ptq", "htp-check", "hub")


# --- --<stage>-args ----------------------------------------------------------------------------------

def stage_args_option(stage: str) -> Any:
    """The --<stage>-args option of a command that runs other stages (run, search)."""
    return option("", metavar='"ARGS"',
                  help=f"more {stage} options, as on its command line (lpcv-depth {stage} --help)")


@dataclass(frozen=True)
class PassedOnArgs:
    """The --<stage>-args options of a command that runs other stages: its config derives from this."""

    export_args: str = stage_args_option("export")
    ptq_args: str = stage_args_option("ptq")
    htp_check_args: str = stage_args_option("htp-check")
    hub_args: str = stage_args_option("hub")


def _split(stage: str, extra_args: str) -> list[str]:
    try:
        return shlex.split(extra_args)
    except ValueError as err:
        raise ConfigError(f"--{stage}-args {extra_args!r} cannot be split into arguments: {err}",
                          hint=f"quote it as one shell word and close every quote inside, e.g. "
                               f"--{stage}-args \"--flag 'a value'\"") from None


def parse_stage_args(stage: str, extra_args: str, wired: Iterable[str] = (), command: str = "run") -> dict:
    """The flags given in --<stage>-args, checked against the stage's own options and refused where
    they set an option in `wired`, which `lpcv-depth COMMAND` sets itself."""
    from lpcv_depth.cli import stage_definition

    parser = argparse.ArgumentParser(prog=f"--{stage}-args", add_help=False, exit_on_error=False)
    add_config_arguments(parser, stage_definition(stage).config, given_only=True)
    flag = f"--{stage}-args"
    try:
        given, unknown = parser.parse_known_args(_split(stage, extra_args))
    except argparse.ArgumentError as err:
        raise ConfigError(f"{flag} {extra_args!r}: {err}", hint=f"use the flags of lpcv-depth {stage} --help") from None
    if unknown:
        raise ConfigError(f"{flag} {extra_args!r}: lpcv-depth {stage} has no option {' '.join(unknown)}",
                          hint=f"use the flags of lpcv-depth {stage} --help")
    clash = sorted(set(vars(given)) & set(wired))
    if clash:
        raise ConfigError(f"{flag} sets {', '.join('--' + c.replace('_', '-') for c in clash)}, which "
                          f"`lpcv-depth {command}` wires itself",
                          hint=f"pass those through {command}'s own options instead")
    return vars(given)


def check_stage_args(config: Any) -> None:
    """Every --<stage>-args of a command's config split and parsed: unknown flags and bad values are
    refused when the config is built. Which options the command wires is checked with its steps."""
    for stage in STAGES_WITH_ARGS:
        parse_stage_args(stage, getattr(config, f"{stage.replace('-', '_')}_args"))


def check_qat_args(config: Any) -> None:
    """A command's --qat-args (run, search): parsed now, and refused without --qat, which it would
    silently do nothing without."""
    parse_stage_args("qat", config.qat_args)
    if config.qat_args and not config.qat:
        raise ConfigError("--qat-args given without --qat", hint="add --qat, or leave --qat-args out")


def stage_config(stage: str, extra_args: str, settings: Mapping, wired: Iterable[str] = (),
                 command: str = "run") -> Any:
    """The stage's config from the command's `settings` plus the user's --<stage>-args (which may
    change any setting not in `wired`)."""
    from lpcv_depth.cli import stage_definition

    config_type = stage_definition(stage).config
    namespace = argparse.Namespace(**{f.name: field_default(f) for f, _ in cli_fields(config_type)})
    for key, value in {**settings, **parse_stage_args(stage, extra_args, wired, command)}.items():
        setattr(namespace, key, value)
    return config_from_args(config_type, namespace)


# --- steps ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One stage run inside a command. `wiring` is every option the command sets; the user's
    --<stage>-args may change those named in `open_to_user` and no other. The config is built
    from them on demand, so it always reflects the folders as they are now."""

    name: str
    stage: str
    folder: Path
    wiring: Mapping[str, Any]
    extra_args: str = ""
    upstream: Mapping[str, Path] = field(default_factory=dict)
    open_to_user: tuple[str, ...] = ()
    command: str = "run"

    @property
    def wired(self) -> tuple[str, ...]:
        return (*(name for name in self.wiring if name not in self.open_to_user), "out")

    @property
    def config(self) -> Any:
        return stage_config(self.stage, self.extra_args, {**self.wiring, "out": self.folder}, self.wired,
                            self.command)

    def fingerprint(self, config: Any) -> str:
        upstream = {name: sha256_file(folder / MANIFEST_NAME) for name, folder in self.upstream.items()}
        return stage_fingerprint(self.stage, config, upstream)

    def upstream_ready(self) -> bool:
        return all((folder / MANIFEST_NAME).is_file() for folder in self.upstream.values())


def qat_step(config: Any, ptq: Step, folder: Path) -> Step | None:
    """With the command's --qat, the step that fine-tunes `ptq`'s folder into `folder`; the steps that
    take an int8 folder (evaluate, htp-check, hub, compare) then take this one's, upstream
    `{step.stage: step.folder}` of whichever int8 step they get. None without --qat."""
    if not config.qat:
        return None
    return Step("qat", "qat", folder, {"ptq": ptq.folder}, config.qat_args, {"ptq": ptq.folder}, command=ptq.command)


def check_steps(steps: Iterable[Step]) -> None:
    """Every step's config built now, before any stage runs: a bad --<stage>-args value or an option
    the command wires fails here, naming the step."""
    for step in steps:
        try:
            step.config
        except ConfigError as err:
            if err.args and str(err.args[0]).startswith(f"--{step.stage}-args"):
                raise
            raise ConfigError(f"{step.stage} (in lpcv-depth {step.command}) would refuse its options: {err.args[0]}",
                              hint=err.hint or f"check --{step.stage}-args against lpcv-depth {step.stage} "
                                               "--help") from None


def step_is_current(step: Step, records: Mapping) -> bool:
    """The step's output exists, verifies, and was made from what it would be made from now."""
    return step.upstream_ready() and _is_current(step, records, step.fingerprint(step.config))


def _is_current(step: Step, records: Mapping, fingerprint: str) -> bool:
    return step.upstream_ready() and is_up_to_date(records.get(step.name), step.folder, step.stage, fingerprint)


def run_step(step: Step, state_file: Path, log: StageLog, *, force: bool = False,
             on_start: Callable[[], None] | None = None) -> str:
    """Run the step's stage unless its output is up to date (or `force`); record what it was made
    from in `state_file`. Returns "ran" or "up to date"; `on_start` is called just before it runs."""
    from lpcv_depth.cli import stage_definition

    config = step.config
    fingerprint = step.fingerprint(config)
    records = read_records(state_file)
    if not force and _is_current(step, records, fingerprint):
        return "up to date"
    if on_start is not None:
        on_start()
    stage_definition(step.stage).run(config, log)
    records = read_records(state_file)  # a concurrent step of the same command may have recorded since
    records[step.name] = stage_record(step.folder, fingerprint)
    write_records(state_file, records)
    return "ran"


# --- what a command checks before its first stage ------------------------------------------------------

INSTALL_HINTS = {"htp-check": 'pip install -e ".[qnn]" (Linux x86_64)',
                 "hub": 'pip install -e ".[hub]", then qai-hub configure --api_token TOKEN'}


def backend_wanted(stage: str, mode: str) -> tuple[bool, str | None]:
    """Whether a command runs `stage` ("htp-check" or "hub") under --<stage> auto|on|off, and why not.
    `on` where the backend cannot run is an error now, before any stage, not after the export."""
    if mode == "off":
        return False, f"--{stage} off"
    reason = _unavailable(stage)
    if reason is not None and mode == "on":
        raise ConfigError(f"--{stage} on, but {reason}", hint=f"{INSTALL_HINTS[stage]}, or --{stage} auto")
    return reason is None, reason


def _unavailable(stage: str) -> str | None:
    if stage == "htp-check":
        from lpcv_depth.backends import qnn

        reason = qnn.unavailable_reason()
        return None if reason is None else f"the local HTP backend is unavailable: {reason}"
    from lpcv_depth.backends import ai_hub

    try:
        ai_hub.read_api_config()
        ai_hub.HubClient().hub  # the package, imported now: a missing install fails before any stage
    except LpcvError as err:
        return f"AI Hub cannot be used: {str(err).splitlines()[0]}"
    return None


def command_inputs(config: Any) -> list[Path | None]:
    """What a command that chains stages reads (its photos, RGB-D data, weights file or ONNX file):
    its output folder must be none of these, hold none and lie in none."""
    weights = Path(config.weights) if config.weights and Path(config.weights).is_file() else None
    eval_data = in_workspace(config.eval_data) if config.eval_data else None
    return [in_workspace(config.calib), eval_data, weights, config.onnx]


def check_input_folders(calib: Path, eval_data: Path | None) -> None:
    if not in_workspace(calib).is_dir():
        raise ConfigError(f"--calib folder not found: {calib}",
                          hint="pass a folder of photos; a fresh clone ships calibration_data/ (run from the "
                               "checkout, or pass --calib with its path)")
    if eval_data is not None and not in_workspace(eval_data).is_dir():
        raise ConfigError(f"--eval-data folder not found: {eval_data}",
                          hint="pass an RGB-D set (rgb/ + depth/) or a folder of sets")


def check_output_root(root: Path, *, command: str, marker: str, model: str, inputs: Iterable[Path | None]) -> None:
    """The folder a command writes everything under must be new, empty, or an earlier run of the
    same command and model (whose finished work it reuses); never one of its inputs, nor a user's
    folder. Checked without writing anything."""
    root = Path(root).absolute()
    try:
        refuse_inputs(root, inputs)
        if root.exists() and not root.is_dir():
            raise OutputDirError(f"output path {root} exists and is not a folder", hint="pass a different --out")
        if not (root.is_dir() and any(root.iterdir())):
            return
        earlier = _read_marker(root / marker)
    except OSError as err:
        raise OutputDirError(f"cannot read output folder {root}: {err.strerror or err}",
                             hint=where_to_write_hint()) from err
    if earlier is None or not _made_by(earlier, command):
        raise OutputDirError(f"output folder {root} is not empty and is not an earlier lpcv-depth {command}",
                             hint="pass an empty or new folder with --out; lpcv-depth only reuses its own outputs")
    if earlier.get("model", model) != model:
        raise OutputDirError(f"output folder {root} holds a {command} of {earlier['model']}, not {model}",
                             hint=f"pass another --out: one {command} folder holds one model's outputs")


def create_output_root(root: Path, *, command: str, marker: str, model: str) -> Path:
    """The checked output folder, made, with its marker file naming the command and the model (the
    command's records go in that file too)."""
    root = Path(root).absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_marker(root / marker, {"command": command, "stage": command, "model": model})
    except OSError as err:
        raise OutputDirError(f"cannot write to output folder {root}: {err.strerror or err}",
                             hint=where_to_write_hint()) from err
    return root


def _made_by(marker: Mapping, command: str) -> bool:
    """Whether a marker file is `command`'s: it says so ("stage" in a search's from before the
    runner), or it is a run's pipeline.json from before markers (records only)."""
    if marker.get("command", marker.get("stage")) == command:
        return True
    return command == "run" and set(marker) == {"stages"} and isinstance(marker["stages"], dict)


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(path: Path, identity: Mapping) -> None:
    write_text_atomically(path, json.dumps({**(_read_marker(path) or {}), **identity}, indent=2) + "\n")
