"""Tables of results, shared by the tour's HTML report and the benchmarks' Markdown pages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Number", "Table", "format_number", "markdown_table"]

Number = int | float | str | bool | None


@dataclass
class Table:
    """A table of results; ``rows`` hold numbers or strings, one list per row."""

    caption: str
    headers: list[str]
    rows: Sequence[Sequence[Number]]


def format_number(value: Number) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(table: Table) -> str:
    """GitHub-flavoured Markdown for ``table`` (used by the benchmark documents)."""
    lines = [
        "| " + " | ".join(table.headers) + " |",
        "|" + "|".join(" --- " for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)
