"""Formatting shared by every report: markdown tables and number cells."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["markdown_table", "cell", "percent"]

MISSING = "–"
NOT_MEASURED = "not measured"  # a figure the run chose to skip (e.g. ptq --latency-runs 0)


def cell(value: Any, pattern: str = "{:.1f}") -> str:
    """A table cell: `pattern` applied to a number, the dash for a missing value, text as it is."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    return pattern.format(value)


def percent(part: float | None, whole: float | None) -> str:
    return MISSING if part is None or not whole else f"{100.0 * part / whole:.0f}%"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one letter per column (l, r, c), left by default."""
    headers = list(headers)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    align = align or "l" * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = [cell(value) if not isinstance(value, str) else value for value in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells for {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
