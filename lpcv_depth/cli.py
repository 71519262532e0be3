"""`lpcv-depth`: one console script, one subcommand per stage, each generated from its config.

    lpcv-depth export --model fastdepth --weights default
    lpcv-depth ptq --fp32 build/fastdepth/export
    lpcv-depth run --model fastdepth --weights default

The scripts of the repo (`python export/to_onnx.py`, `python quantize/ptq.py`, ...) call `main`
with their subcommand, so both spellings take the same options.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from pathlib import Path

from lpcv_depth.errors import ConfigError, ExitCode, LpcvError, Terminated
from lpcv_depth.host import keep_freed_memory
from lpcv_depth.options import add_config_arguments, config_from_args
from lpcv_depth.stage import StageDefinition, StageLog, command_line, exit_status, hint_with_scripts
from lpcv_depth.workspace import ENV_VAR, check_workspace, use_workspace

__all__ = ["main", "script_main", "STAGE_MODULES", "stage_definition", "build_parser"]

# Subcommand -> the module that defines it (imported only when needed).
STAGE_MODULES = {
    "export": "lpcv_depth.stages.export",
    "evaluate": "lpcv_depth.stages.evaluate",
    "ptq": "lpcv_depth.stages.ptq",
    "qat": "lpcv_depth.stages.qat",
    "htp-check": "lpcv_depth.stages.htp_check",
    "hub": "lpcv_depth.stages.hub",
    "compare": "lpcv_depth.stages.compare",
    "predict": "lpcv_depth.stages.predict",
    "run": "lpcv_depth.stages.pipeline",
    "search": "lpcv_depth.stages.search",
}


def stage_definition(name: str) -> StageDefinition:
    return importlib.import_module(STAGE_MODULES[name]).DEFINITION


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad number, a missing value) end with a `fix:` line and
    exit 2, as every lpcv-depth error does. Subcommand parsers are built with the same class."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(ExitCode.ERROR, f"{self.prog}: error: {message}\n  fix: see {self.prog} --help\n")


def _stage_parser(definition: StageDefinition, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = definition.description
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser, definition.config)
    if definition.extra_arguments is not None:
        definition.extra_arguments(parser)
    parser.add_argument("--workspace", type=Path, default=None,
                        help=f"folder whose build/ receives the outputs and against which default paths are "
                             f"resolved (default: ${ENV_VAR}, else the current folder)")
    return parser


def build_parser(only: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The whole `lpcv-depth` parser, or with `only` the parser of one subcommand (as a script)."""
    if only is not None:
        return _stage_parser(stage_definition(only), ArgumentParser(prog=prog or f"lpcv-depth {only}"))
    parser = ArgumentParser(prog=prog or "lpcv-depth",
                                     description="Monocular depth model -> INT8 LPCVC 2025 Track 3 submission.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGE_MODULES:
        definition = stage_definition(name)
        summary = definition.description.strip().splitlines()[0]
        _stage_parser(definition, subparsers.add_parser(name, help=summary))
    return parser


def _source_line() -> str:
    """Which code runs: two checkouts sharing one virtualenv would otherwise mix silently."""
    from lpcv_depth import __version__
    from lpcv_depth.manifest import source_tree

    source = source_tree()
    commit = f", git {source['commit']}" if source["commit"] else ""
    return f"lpcv-depth {__version__} from {source['path']}{commit}"


def _raise_terminated(signum, frame):
    raise Terminated()


def _stage_config(name: str, definition: StageDefinition, args: argparse.Namespace):
    """The stage's config; a value it refuses without saying what to do points at the stage's --help."""
    try:
        if definition.config_from_args is not None:
            return definition.config_from_args(args)
        return config_from_args(definition.config, args)
    except ConfigError as err:
        if err.hint is None:
            err.hint = f"see {command_line(name, '--help')} for the values each option takes"
        raise


def run_command(name: str, args: argparse.Namespace) -> int:
    definition = stage_definition(name)
    log = StageLog(name)
    config = None
    try:
        if args.workspace is not None:
            use_workspace(args.workspace)
        check_workspace()
        if definition.before_run is not None:
            status = definition.before_run(args)
            if status is not None:
                return status
        config = _stage_config(name, definition, args)
        log.info(_source_line())
        result = definition.run(config, log)
    except (LpcvError, KeyboardInterrupt) as err:
        if config is not None and definition.interrupted is not None and isinstance(err, KeyboardInterrupt):
            return exit_status(name, err, definition.interrupted(config))
        return exit_status(name, err)
    hint = definition.next_hint(result) if definition.next_hint else None
    if hint:
        log.info(f"next: {hint}")
    return ExitCode.OK


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if argv and argv[0] in STAGE_MODULES:
            # Only the stage asked for is imported: a broken optional stage never blocks the others.
            args = build_parser(argv[0], prog).parse_args(argv[1:])
            return int(run_command(argv[0], args))
        args = build_parser(prog=prog).parse_args(argv)
        return int(run_command(args.command, args))
    finally:
        signal.signal(signal.SIGTERM, previous)


def console_main() -> int:
    """The `lpcv-depth` console script and `python -m lpcv_depth.cli`: `main` in a process that ends with it."""
    return _before_exit(main())


def _before_exit(status: int) -> int:
    """Move every object into the collector's permanent generation as the process ends, so that the
    interpreter's teardown no longer runs collections over the whole torch / AIMET / ONNX Runtime
    heap (docs/history/ptq-speed.md, "Sixth pass"). Objects are still freed by reference counting and atexit
    handlers still run; only garbage in reference cycles is left to the operating system. Not for
    `main` itself: tests and library users call it in a process that goes on."""
    gc.freeze()
    return status


def script_main(command: str, script: str) -> int:
    """Entry point of the repo's scripts: `python export/to_onnx.py ...` is `lpcv-depth export ...`.

    The scripts run whichever lpcv_depth is installed; when that is not the checkout the script
    lives in (two clones sharing one virtualenv), say so before anything runs.
    """
    import lpcv_depth

    checkout = Path(script).resolve().parent.parent
    running = Path(lpcv_depth.__file__).resolve().parent
    if running.parent != checkout:
        print(f"{command}: WARNING this script is in {checkout}, but it runs the lpcv_depth installed from "
              f"{running}; reinstall with pip install -e {os.fspath(checkout)} to run this checkout's code",
              file=sys.stderr)
    hint_with_scripts()
    return _before_exit(main([command, *sys.argv[1:]], prog=f"python {os.path.relpath(script)}"))


if __name__ == "__main__":
    sys.exit(console_main())
