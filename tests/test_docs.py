"""The README is read in five minutes and sends the reader on: it stays short, every relative link in it and in
`docs/` leads to a file and heading that exist, every command of the CLI has its page linked from it, and its install
and test commands are the ones `.ci/run` runs."""

import re
from pathlib import Path

import pytest

from bench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The Markdown outside code blocks and code spans: a `[x](y)` inside code is no link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as `-`, `-1`, `-2` ... on
    a repeated heading."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(path.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


def _readme_pages() -> set[Path]:
    """The files README.md links to."""
    return {(ROOT / target.split("#")[0]).resolve() for target in _links(README) if target.split("#")[0]}


def test_the_readme_is_short():
    """A newcomer reads the README in five minutes; the reference lives in docs/."""
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference text into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """A relative link leads to a file that exists and, with `#anchor`, to a heading of that file."""
    broken = []
    for target in _links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_command_has_a_page_linked_from_the_readme():
    """Each `loopmark COMMAND` of the CLI is the title of a docs page the README links to."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    linked = _readme_pages()
    titles = {page: page.read_text(encoding="utf-8").splitlines()[0]
              for page in linked if page.suffix == ".md" and page.is_file()}
    missing = [name for name in subparsers.choices
               if not any(f"`loopmark {name}`" in title for title in titles.values())]
    assert not missing, f"no docs page titled `loopmark COMMAND` is linked from README.md for: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    """No page of the reference is out of a reader's reach."""
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in _readme_pages()]
    assert not orphans, f"docs pages not linked from README.md: {orphans}"


def test_the_readme_install_and_test_commands_are_those_ci_runs():
    """`.ci/run` installs exactly as README.md says and runs its test command: the two must not drift apart."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    test_command = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
    assert test_command in ci.splitlines(), ".ci/run no longer installs and tests as README.md says"
    assert f"```sh\n{test_command}\n```" in readme, "README.md's test command is not the one .ci/run runs"
