"""Plumbing every stage shares: one log line per step, atomic output folders, and `manifest.json`.

A stage builds its outputs inside a hidden staging folder next to the destination and only moves
them into place, manifest last, once every step has passed. An interrupted or failed run therefore
never leaves a folder that looks like a finished artifact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lpcv_depth.errors import ExitCode, LpcvError, OutputDirError, Terminated
from lpcv_depth.manifest import MANIFEST_NAME

__all__ = ["StageLog", "StepResult", "StagingDir", "StageDefinition", "refuse_inputs", "remove_stale_partials",
           "exit_status", "human_size", "command_line", "display_path"]


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    raise AssertionError("unreachable")


class StageLog:
    """Prints `stage: step ok 3.1s -> path (33.5 MB)` per step and keeps the timings."""

    def __init__(self, stage: str, stream=None):
        self.stage = stage
        self.stream = stream or sys.stdout
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()

    def info(self, message: str) -> None:
        print(f"{self.stage}: {message}", file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"{self.stage}: WARNING {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator["StepResult"]:
        result = StepResult()
        start = time.perf_counter()
        try:
            yield result
        except BaseException:
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            self.info(f"{name} FAILED after {elapsed:.1f}s")
            raise
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        line = f"{name} ok {elapsed:.1f}s"
        if result.detail:
            line += f" ({result.detail})"
        if result.artifact is not None:
            line += f" -> {result.artifact}"
            if Path(result.artifact).is_file():
                line += f" ({human_size(Path(result.artifact).stat().st_size)})"
        self.info(line)

    @property
    def total_seconds(self) -> float:
        return round(time.perf_counter() - self._started, 3)


@dataclass
class StepResult:
    detail: str = ""
    artifact: str | os.PathLike | None = None


class StagingDir:
    """Write a stage's outputs somewhere hidden, then swap them into `final` in one rename.

    `final` may already hold an earlier run of the same stage (its manifest names the stage): that
    is replaced as a whole. Anything else is refused: a non-empty folder that is not this stage's
    output, or a folder that is, holds or lies inside one of the run's inputs. So a typo in --out
    never deletes a user's files. With `scratch=True`, `self.scratch` is a second hidden folder for
    intermediate files that never reach the output.
    """

    def __init__(self, final: str | os.PathLike, *, stage: str | None = None,
                 inputs: Iterable[str | os.PathLike | None] = (), scratch: bool = False):
        self.final = Path(final).resolve()
        self.stage = stage
        self.inputs = [Path(p).resolve() for p in inputs if p is not None]
        self.with_scratch = scratch
        self.path: Path | None = None
        self.scratch: Path | None = None

    def __enter__(self) -> "StagingDir":
        self._refuse_unsafe_destination()
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.final)
            self.path = self._fresh(f".{self.final.name}.partial-{os.getpid()}")
            if self.with_scratch:
                self.scratch = self._fresh(f".{self.final.name}.scratch-{os.getpid()}")
        except OSError as err:
            raise OutputDirError(f"cannot write to output folder {self.final.parent}: {err.strerror or err}",
                                 hint="choose a writable location with --out") from err
        return self

    def __truediv__(self, name: str) -> Path:
        assert self.path is not None
        return self.path / name

    def _fresh(self, name: str) -> Path:
        folder = self.final.parent / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    def _refuse_unsafe_destination(self) -> None:
        final = self.final
        if final.exists() and not final.is_dir():
            raise OutputDirError(f"output path {final} exists and is not a folder", hint="pass a different --out")
        refuse_inputs(final, self.inputs)
        if not (final.is_dir() and any(final.iterdir())):
            return
        manifest = final / MANIFEST_NAME
        if not manifest.is_file():
            raise OutputDirError(
                f"output folder {final} is not empty and is not an earlier lpcv-depth output",
                hint="pass an empty or new folder with --out; lpcv-depth only replaces its own outputs")
        try:
            written_by = json.loads(manifest.read_text()).get("stage")
        except (OSError, ValueError):
            written_by = None
        if self.stage is not None and written_by != self.stage:
            raise OutputDirError(
                f"output folder {final} holds a {written_by!r} stage output, not an earlier {self.stage!r} run",
                hint="pass another --out; lpcv-depth only replaces an earlier output of the same stage")

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.path is not None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        try:
            self._swap_into_place()
        except OSError as err:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputDirError(f"cannot move the finished output into {self.final}: {err.strerror or err}",
                                 hint="check that the folder and its parent are writable (not a read-only mount or "
                                      "a mount point) and that no other run writes there, then rerun") from err
        return False

    def _swap_into_place(self) -> None:
        for attempt in (1, 2):
            previous = None
            if self.final.exists():
                previous = self.final.parent / f".{self.final.name}.previous-{os.getpid()}"
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(self.final, previous)
            try:
                os.replace(self.path, self.final)
            except OSError as err:
                # Another run of the same stage swapped its own output in between: retry once.
                if attempt == 1 and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                if previous is not None and not self.final.exists():
                    os.replace(previous, self.final)
                raise
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            return


def refuse_inputs(final: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """An output folder must not be, hold, or lie inside any input: replacing it would delete that input."""
    final = Path(final).resolve()
    for source in (Path(p).resolve() for p in inputs if p is not None):
        if final == source or final in source.parents or source in final.parents:
            relation = "is" if final == source else "contains" if final in source.parents else "lies inside"
            raise OutputDirError(f"output folder {final} {relation} this run's input {source}; writing there "
                                 "would replace the input",
                                 hint="pass a separate --out folder (or leave --out out for the default)")


def remove_stale_partials(final: Path) -> list[Path]:
    """Hidden staging folders of `final` left by runs whose process is gone (SIGKILL, power loss)."""
    removed = []
    for folder in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = folder.name[len(final.name) + 2:].rpartition("-")
        if kind not in ("partial", "scratch", "previous") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_status(stage: str, err: BaseException, interrupted: str = "nothing was written") -> int:
    """Print a stage's failure on stderr the one way all stages do, and return its exit status from
    the error's type (errors.ExitCode). Anything that is not an LpcvError or an interruption is a
    bug and is re-raised with its traceback."""
    if isinstance(err, LpcvError):
        print(f"{stage}: {err.headline}: {err}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{stage}: {what}; {interrupted}", file=sys.stderr)
        return ExitCode.TERMINATED if isinstance(err, Terminated) else ExitCode.INTERRUPTED
    raise err


@dataclass(frozen=True)
class StageDefinition:
    """A stage as the CLI and the pipeline see it: its config type, its run function and its hint.

    run(config, log) -> result; `next_hint(result)` is the command to run next; `extra_arguments`
    adds CLI-only flags (e.g. export's --list) that `before_run(args)` may act on (returning an
    exit status ends the command there). `config_from_args(args)` builds what the command line
    hands to `run` where that is more than the config type from its own flags (hub: one config per
    positional artifact); `interrupted(config)` is what stderr says after Ctrl+C or SIGTERM
    (default: nothing was written).
    """

    name: str
    config: type
    run: Callable[..., Any]
    description: str
    next_hint: Callable[[Any], str | None] | None = None
    extra_arguments: Callable[[Any], None] | None = None
    before_run: Callable[[Any], int | None] | None = None
    config_from_args: Callable[[Any], Any] | None = None
    interrupted: Callable[[Any], str] | None = None


# The repo's scripts, one per stage: hints printed by a script name the scripts.
STAGE_SCRIPTS = {"export": "export/to_onnx.py", "evaluate": "evaluation/score.py", "ptq": "quantize/ptq.py",
                 "qat": "quantize/qat.py",
                 "htp-check": "quantize/htp_check.py", "hub": "export/aihub.py", "compare": "evaluation/compare.py",
                 "search": "quantize/search.py"}
_hint_style = {"scripts": False}


def hint_with_scripts(enabled: bool = True) -> None:
    """Make `command_line` spell commands as `python quantize/ptq.py ...` (set by the repo's scripts)."""
    _hint_style["scripts"] = enabled


def command_line(stage: str, *args: str | os.PathLike) -> str:
    """The command that runs STAGE with ARGS, every argument shell-quoted (paths may hold spaces):
    `lpcv-depth STAGE ...`, or `python <script> ...` when the user started one of the repo's scripts."""
    import shlex

    prefix = (["python", STAGE_SCRIPTS[stage]] if _hint_style["scripts"] and stage in STAGE_SCRIPTS
              else ["lpcv-depth", stage])
    return " ".join([*prefix, *(shlex.quote(os.fspath(a)) for a in args)])


def display_path(path: str | os.PathLike) -> str:
    """A path as short as it reads best: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return os.fspath(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return os.fspath(path)
