"""One plain-text table formatter for every table loopmark prints: list, check, the run summary, selfcheck
and compare. Each column is as wide as its widest cell, so long names never push the others out of line. What a results
file says (a name, a message) is printed through `printable`: no terminal control sequence of it reaches a terminal."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# ANSI escape sequences (CSI: colours, cursor moves; OSC: window titles, hyperlinks; two-byte escapes), the other C0
# and C1 control characters but newline and tab, and the bidirectional overrides that reorder what a line shows
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


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


def printable(text) -> str:
    """`text` without terminal control sequences and control characters (newline and tab are kept)."""
    return _CONTROL.sub("", str(text))
