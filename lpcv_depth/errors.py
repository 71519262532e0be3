"""Typed errors and the one table of exit statuses. Each error carries a hint that tells the user
how to fix the problem, and the exit status its CLI returns."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of every lpcv-depth command, distinct so that scripts can branch on them."""

    OK = 0
    ERROR = 2
    GATE_FAILED = 3
    HUB_JOB_FAILED = 4
    HUB_TIMEOUT = 5
    INTERRUPTED = 130
    TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl+C so that the same clean-up runs."""


class LpcvError(Exception):
    """Base class: `str(err)` is the problem, `err.hint` is what to do about it."""

    exit_code = ExitCode.ERROR
    # How the CLI's stderr line names the failure: `<stage>: <headline>: <message>`.
    headline = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        # args[0], not super().__str__(): a KeyError subclass would wrap the message in quotes.
        text = str(self.args[0]) if self.args else ""
        return f"{text}\n  fix: {self.hint}" if self.hint else text


class ConfigError(LpcvError):
    """A stage config value is invalid."""


class UnknownModelError(LpcvError, KeyError):
    """`create_model` was given a name that is not registered."""

    __str__ = LpcvError.__str__


class WeightsError(LpcvError):
    """Weights are missing, corrupt, unreachable or do not fit the architecture."""


class OutputDirError(LpcvError):
    """The output directory cannot be written or already holds a different run."""


class ContractError(LpcvError):
    """A model or artifact does not meet the Track 3 contract."""


class ParityError(LpcvError):
    """Two runtimes disagree by more than the configured threshold."""

    def __init__(self, message: str, *, measured: dict[str, float], threshold: dict[str, float], hint: str | None = None):
        super().__init__(message, hint)
        self.measured = measured
        self.threshold = threshold


class MissingDependencyError(LpcvError):
    """An optional heavy dependency is not installed."""


class GateError(LpcvError):
    """A stage built and verified its artifacts and wrote its report, but the model falls short of a
    quality gate the user set (e.g. --min-sqnr, --max-fscore-drop, --require-full-htp)."""

    exit_code = ExitCode.GATE_FAILED
    headline = "GATE FAILED"
