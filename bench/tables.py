"""Markdown tables of measurement records, shared by the benchmarks (bench/) and the experiments (experiments/)."""

from __future__ import annotations

from collections.abc import Callable


def fmt(value) -> str:
    """Booleans as yes/no, floats to 3 significant digits (whole and grouped from 1000 up), None as blank."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None, cell: Callable[[object], str] = fmt) -> str:
    """One row per record, its values under `columns` (default: the first record's keys; a missing value is blank)."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
