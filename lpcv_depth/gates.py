"""Quality gates: the thresholds a user sets (--min-sqnr, --max-fscore-drop, --require-full-htp).

A stage collects one `Gate` per threshold it was given and calls `enforce_gates` after its report
is written, so a missed gate still leaves every artifact to look at (exit status 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lpcv_depth.errors import GateError

__all__ = ["Gate", "failed_gates", "enforce_gates"]


@dataclass(frozen=True)
class Gate:
    """`measured` must be at least (`at_least`) or at most (`at_most`) `limit`; unset limits pass."""

    flag: str
    what: str
    measured: float | bool | None
    limit: float | bool | None
    kind: Literal["at_least", "at_most", "true"] = "at_least"
    unit: str = ""

    @property
    def applies(self) -> bool:
        return self.limit is not None and self.limit is not False and self.measured is not None

    @property
    def passed(self) -> bool:
        if not self.applies:
            return True
        if self.kind == "true":
            return bool(self.measured)
        return self.measured >= self.limit if self.kind == "at_least" else self.measured <= self.limit

    def describe(self) -> str:
        if self.kind == "true":
            return f"{self.what} and {self.flag} is set"
        sign = "<" if self.kind == "at_least" else ">"
        return f"{self.what} {self.measured:.2f}{self.unit} {sign} {self.flag} {self.limit:g}"


def failed_gates(gates: list[Gate]) -> list[Gate]:
    return [gate for gate in gates if not gate.passed]


def enforce_gates(gates: list[Gate], *, subject: str, hint: str) -> None:
    failures = failed_gates(gates)
    if failures:
        raise GateError(f"{subject} falls short: " + "; ".join(g.describe() for g in failures), hint=hint)
