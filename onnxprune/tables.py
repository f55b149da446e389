"""Plain-text tables for the terminal: aligned columns, numbers right-aligned, long text cut."""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"^[-+]?(\d[\d.]*(e[-+]?\d+)?x?|\d+/\d+|inf|nan)$")

#: Longest a text cell may be before it is shortened (keeping its end, where names differ).
MAX_TEXT = 48


def _cell(value, cut: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    text = str(value)
    return text if len(text) <= MAX_TEXT or not cut else "…" + text[-(MAX_TEXT - 1):]


def _numeric(value) -> bool:
    """Numbers, and numbers already formatted (``"1.25x"``, ``"3/40"``), align right."""
    if isinstance(value, str):
        return bool(_NUMBER.match(value))
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Sequence[Sequence], indent: str = "  ") -> str:
    """``rows`` of raw values (numbers are formatted here). Long text is shortened from the left
    (names differ at their ends), except in the last column, which has room to run on."""
    last = len(headers) - 1
    cells = [[_cell(v, cut=i != last) for i, v in enumerate(row)] for row in rows]
    right = [bool(rows) and all(_numeric(row[i]) or row[i] is None for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return (indent + "  ".join(parts)).rstrip()

    out = [line(headers), indent + "  ".join("─" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.2f}{suffix}"
    return str(n)
