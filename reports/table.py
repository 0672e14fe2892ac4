"""One plain-text table formatter for every table loopmark prints: list, check, the run summary, selfcheck
and compare. Each column is as wide as its widest cell, so long names never push the others out of line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from reports.markup import printable


def format_table(header: Sequence[str], rows: Iterable[Sequence], right: Iterable[int] = ()) -> str:
    """Aligned columns separated by two spaces; columns in `right` are right-aligned (numbers), the last
    column is never padded. Cells are converted with str(), without terminal control sequences; None prints as '-'."""
    right = set(right)
    table = [[str(h) for h in header]] + [["-" if c is None else printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    lines = []
    for row in table:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        if cells and len(row) - 1 not in right:
            cells[-1] = row[-1]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
