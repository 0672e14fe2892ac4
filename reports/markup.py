"""Text from results files (names, messages, source lines, paths: anyone's) made safe to show in Markdown, in HTML
and on a terminal.

The report's blocks and compare's details are written in a small markup of their own: `**strong**`, `` `code` `` and
line breaks; everything else is text shown as it is. `to_markdown` and `to_html` render it and escape the text, so
nothing a workload's name or an exception's message holds (`<script>`, `![x](http://...)`, `[x](javascript:...)`)
becomes a tag, an image or a link. Untrusted text put in a code span goes through `code`, which keeps its backticks
inside the span; elsewhere through `literal`, which keeps its backticks and asterisks from being read as markup.
`to_text` renders the markup for a terminal, without control sequences (`reports.table.printable`).
"""

from __future__ import annotations

import html
import re

from reports.table import printable

TICK, STAR = "\ue000", "\ue001"  # a backtick and an asterisk of untrusted text, never markup (Unicode private use)
_TOKENS = re.compile(r"(`[^`]*`|\*\*)")  # a code span or a strong marker; the rest is text
# what could start a tag (`<` before a name), an entity, a link or an image (`]` before `(`, `[` or `:`), a code span,
# emphasis or a table cell, and a backslash that could undo an escape
_MD_SPECIAL = re.compile(r"(\\(?=[!-/:-@\[-`{-~])|[`*|]|<(?=[A-Za-z/!?])|&(?=[#A-Za-z])|\](?=[(\[:]))")


def code(text) -> str:
    """A code span of untrusted `text`, its backticks kept inside."""
    return "`" + printable(text).replace("`", TICK) + "`"


def literal(text) -> str:
    """Untrusted `text` for a markup string: its backticks and asterisks shown, never read as markup."""
    return printable(text).replace("`", TICK).replace("*", STAR)


def to_text(text) -> str:
    """Markup for a terminal: as written, control sequences dropped."""
    return _restore(printable(text))


def to_markdown(text, table: bool = False) -> str:
    """Markup as CommonMark/GitHub Markdown: text escaped, code spans fenced with more backticks than they hold;
    `table`: in a table cell, where a `|` ends the cell (a line break in a cell is the caller's to replace)."""
    out = []
    for kind, part in _parse(text):
        if kind == "strong":
            out.append("**")
        elif kind == "code":
            content = _restore(part)
            content = content.replace("|", "\\|") if table else content
            fence = "`" * (max((len(run) for run in re.findall("`+", content)), default=0) + 1)
            pad = " " if content.startswith(("`", " ")) or content.endswith(("`", " ")) else ""
            out.append(f"{fence}{pad}{content}{pad}{fence}")
        else:
            out.append(_MD_SPECIAL.sub(r"\\\1", part).replace(TICK, "\\`").replace(STAR, "\\*"))
    return "".join(out)


def to_html(text) -> str:
    """Markup as HTML: text escaped, `<strong>`, `<code>`, line breaks as `<br>`."""
    out, strong = [], False
    for kind, part in _parse(text):
        if kind == "strong":
            out.append("</strong>" if strong else "<strong>")
            strong = not strong
        elif kind == "code":
            out.append(f"<code>{html.escape(_restore(part))}</code>")
        else:
            out.append(html.escape(_restore(part)))
    return ("".join(out) + ("</strong>" if strong else "")).replace("\n", "<br>")


def _parse(text) -> list[tuple[str, str]]:
    """(kind, part) of markup: "code" (without its backticks), "strong" (a marker) or "text"."""
    parts = _TOKENS.split(printable(text))
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                out.append(("text", part))
        elif part == "**":
            out.append(("strong", part))
        else:
            out.append(("code", part[1:-1]))
    return out


def _restore(text: str) -> str:
    return text.replace(TICK, "`").replace(STAR, "*")
