"""Names, messages, source lines and paths in a results file are anyone's: shown in report.md, report.html, compare's
Markdown, results.csv and on a terminal, they are shown as written and never run (a tag, a link, an image, a formula,
a terminal control sequence)."""

from __future__ import annotations

import csv
import re

import pytest
from conftest_reports_data import make_record, null_record, write_results_json

from bench.cli import main as loopmark
from bench.runner import progress_line
from reports import markup, results
from reports.table import format_table, printable

HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "![x](http://example.com/p.png)",
           "[x](javascript:alert(1))", "a`b", "``c``", "x|y", "\\<b>", "**bold", "[x]: http://example.com/ref"]
TERMINAL = "\x1b]0;title\x07\x1b[31mred\x1b[0m\x9b2J\u202eevil"  # a window title, a colour, a clear screen, RTL


def outside_code(md: str) -> str:
    """The Markdown text outside its code spans, escaped characters dropped: a run of n backticks opens a span that
    the next run of exactly n backticks closes (CommonMark); a run with none to close it is text."""
    out, i = [], 0
    while i < len(md):
        if md[i] == "\\" and i + 1 < len(md):
            i += 2
            continue
        if md[i] == "`":
            n = len(re.match("`+", md[i:]).group())
            close = next((m.start() for m in re.finditer("`+", md[i + n:]) if len(m.group()) == n), None)
            if close is not None:
                i += n + close + n
                continue
            out.append(md[i:i + n])
            i += n
            continue
        out.append(md[i])
        i += 1
    return "".join(out)


def assert_safe_markdown(md: str) -> None:
    """No raw HTML, link, image, reference definition or stray backtick outside code spans (but the report's plots)."""
    text = outside_code(re.sub(r"(?m)^!\[[A-Za-z -]+\]\(plot_[a-z_]+\.png\)$", "", md))
    found = re.findall(r"<[A-Za-z/!?][^\n]{0,20}|\][(\[:][^\n]{0,20}|`[^\n]{0,20}", text)
    assert not found, found


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_shows_untrusted_text_as_written(text):
    """In text, a code span and a table cell: escaped or fenced, whatever the text holds."""
    for md in (markup.to_markdown(markup.literal(text)), markup.to_markdown(markup.code(text)),
               markup.to_markdown(f"**{markup.literal(text)}** and {markup.code(text)}", table=True)):
        assert_safe_markdown(md)
    assert "|" not in markup.to_markdown(markup.literal(text), table=True).replace("\\|", "")
    assert markup.to_html(markup.code(text)) == f"<code>{markup.html.escape(text)}</code>"


def test_a_name_with_backticks_stays_in_its_code_span():
    assert markup.to_markdown(markup.code("a`b")) == "``a`b``"
    assert markup.to_markdown(markup.code("``c``")) == "``` ``c`` ```"
    assert markup.to_markdown(markup.code("x|y"), table=True) == "`x\\|y`"


def test_printable_drops_terminal_control_sequences():
    assert printable(f"a{TERMINAL}\tb\nc\x00") == "aredevil\tb\nc"  # a window title is not text
    assert "\x1b" not in format_table(["name"], [[TERMINAL]])
    record = {"device": "cpu", "workload": TERMINAL, "variant": "v", "status": "error", "error": TERMINAL}
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", progress_line(record))


def _hostile_run() -> list[dict]:
    """A run whose names, messages, command and sync-site code are hostile."""
    workload, variant = HOSTILE[0], "v" + "".join(HOSTILE[1:])
    sites = {"site": "evil.py:3", "per_step": 1.0, "count": 1, "operations": {"item": 1}, "code": HOSTILE[1] + "`"}
    trace = make_record("train<img src=x onerror=alert(1)>.py", "trace", "cpu", kind="train",
                        description="python train.py `--lr` <script>x</script>", sync_sites={"evil.py:3": 1},
                        sync_site_details=[sites])
    return [make_record(workload, "baseline", "cpu"),
            make_record(workload, variant, "cpu", verdict="broken", verdict_reason=" ".join(HOSTILE)),
            null_record(workload, "other" + HOSTILE[2], "cpu", "error", "RuntimeError: " + " ".join(HOSTILE)),
            trace]


def test_report_md_and_html_show_hostile_names_and_messages_as_text(tmp_path, capsys):
    write_results_json(tmp_path / "run", _hostile_run(), {"command": "loopmark run " + HOSTILE[3]})
    assert loopmark(["report", str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert_safe_markdown(md)
    variant = _hostile_run()[1]["variant"]
    assert markup.to_markdown(markup.code(variant)) in md  # whole in one code span, its backticks in it
    page = (tmp_path / "run" / "report.html").read_text()
    assert not re.search(r"<(script|img src=x)", page)


def test_compare_markdown_shows_hostile_names_and_messages_as_text(tmp_path, capsys):
    base, cand = _hostile_run(), _hostile_run()
    cand[1] = null_record(cand[1]["workload"], cand[1]["variant"], "cpu", "error", " ".join(HOSTILE) + TERMINAL)
    cand[3]["sync_sites"], cand[3]["syncs_per_step"] = {"evil.py:3": 1, "evil.py:4": 1}, 2.0
    cand[3]["sync_site_details"] = [*cand[3]["sync_site_details"], {**cand[3]["sync_site_details"][0],
                                                                      "site": "evil.py:4", "code": "``c`` | x"}]
    for r in cand:
        r["device_name"] = TERMINAL
    b, c = write_results_json(tmp_path / "base", base), write_results_json(tmp_path / "cand", cand)
    assert loopmark(["compare", str(b), str(c), "--format", "md"]) == 1
    md = capsys.readouterr().out
    assert_safe_markdown(md)
    assert "\x1b" not in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows and all(outside_code(row).replace("\\|", "").count("|") == 6 for row in rows)  # five cells each
    assert "``c`` \\| x" in md  # the new site's code, its backticks and its bar inside its span
    assert loopmark(["compare", str(b), str(c)]) == 1
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x9b" not in text and "/step at evil.py:4 ```c`` | x`" in text


def test_results_csv_text_that_starts_a_formula_is_led_by_a_quote(tmp_path):
    """`=`, `+`, `-`, `@` at the start of a text cell: led by `'`; a negative number stays a number."""
    records = [make_record("=HYPERLINK(\"http://x\")", "baseline", "cpu", memory_growth_bytes_per_step=-12.5),
               null_record("=HYPERLINK(\"http://x\")", "+cmd", "cpu", "error", "@SUM(1)"),
               null_record("=HYPERLINK(\"http://x\")", "-x", "cpu", "error", "- a list")]
    results.write_results(tmp_path, {}, records)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["workload"] for r in rows} == {"'=HYPERLINK(\"http://x\")"}
    assert [r["variant"] for r in rows] == ["baseline", "'+cmd", "'-x"]
    assert [r["error"] for r in rows[1:]] == ["'@SUM(1)", "'- a list"]
    assert rows[0]["memory_growth_bytes_per_step"] == "-12.5"


def test_the_run_summary_prints_no_terminal_control_sequences(capsys):
    import bench.cli

    bench.cli._summary([{"device": "cpu", "workload": TERMINAL, "variant": TERMINAL, "status": "error",
                         "error": TERMINAL, "verdict": TERMINAL}])
    out = capsys.readouterr().out
    assert "red" in out and not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", out)
