"""Write report.md, report.html (self-contained) and plot_*.png from one or more results files.

The report is built once as a list of blocks, then rendered to Markdown and to HTML. Text in blocks may
use `**strong**` and `` `code` ``, which both renderers understand.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import pandas as pd

from reports import plots, results
from reports.load import PYTEST_BENCHMARK, by_workload_device, is_baseline, load_records, to_frame
from reports.results import FLOOR_VARIANT
from reports.units import human_bytes

FIGURES = {  # plot_<name>.png -> (title, figure function)
    "throughput": ("Throughput", plots.throughput),
    "ratio_to_baseline": ("Step time relative to the baseline", plots.ratio_to_baseline),
    "syncs_per_step": ("Host-device syncs per step", plots.syncs_per_step),
    "memory": ("Peak memory and memory growth per step", plots.memory),
    "step_time_distributions": ("Per-step time distributions", plots.step_time_distributions),
    "memory_over_steps": ("Memory over steps", plots.memory_over_steps),
    "cpu_vs_gpu": ("CPU vs GPU", plots.cpu_vs_gpu),
}
DPI = 110
TABLE_HEADER = ["variant", "samples/s", "ratio to baseline (95% CI)", "syncs/step", "peak memory",
                "growth/step", "param tensors", "verdict", "reason"]
TABLE_NUMERIC = {1, 2, 3, 4, 5, 6}  # right-aligned columns
FLOOR_HEADER = f"ratio to floor ({FLOOR_VARIANT})"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.broken td { background: #fde4e4; } tr.broken strong, li strong { color: #b00000; }
tr.mismatch td { background: #fff4d6; } tr.notok td { color: #777; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def write_report(paths: list, out_dir=None) -> list[Path]:
    """Write the report for the results at `paths` (cells concatenated); returns the files written.

    Files go to `out_dir`, by default next to the first results. A pytest-benchmark JSON also gets a
    results.csv next to it. Raises ValueError (one line) for unusable input.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no results to report on")
    loaded = [load_records(p) for p in paths]
    envs = [env for env, _ in loaded]
    df = pd.concat([to_frame(records) for _, records in loaded], ignore_index=True)
    out = Path(out_dir) if out_dir is not None else Path(envs[0]["source"]).parent
    out.mkdir(parents=True, exist_ok=True)

    written = []
    for env, records in loaded:  # a pytest-benchmark JSON gets the results.csv a run writes
        if env["source_format"] == PYTEST_BENCHMARK:
            csv_path = Path(env["source"]).parent / "results.csv"
            results.atomic_write(csv_path, results.csv_text(records))
            written.append(csv_path)
    images = {}
    for name, (title, figure) in FIGURES.items():
        png_path = out / f"plot_{name}.png"
        fig = figure(df)
        if fig is None:
            png_path.unlink(missing_ok=True)  # stale from an earlier report
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        results.atomic_write(png_path, buffer.getvalue())
        images[name] = (title, png_path.name, buffer.getvalue())
        written.append(png_path)

    blocks = document(envs, df, images)
    md_path, html_path = out / "report.md", out / "report.html"
    results.atomic_write(md_path, to_markdown(blocks))
    results.atomic_write(html_path, to_html(blocks))
    return [md_path, html_path, *written]


def document(envs: list[dict], df: pd.DataFrame, images: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("list", items),
    ("table", header, rows, row_classes, numeric column indices), ("image", title, file name, png bytes)."""
    blocks: list[tuple] = [("h1", "loopmark report")]
    for env in envs:
        blocks += [("list", _environment_lines(env))]
    blocks += _summary(df)
    for (workload, device), cells in by_workload_device(df):
        names = [n for n in dict.fromkeys(cells["device_name"]) if n]
        blocks.append(("h2", f"{workload} on {device}" + (f" ({names[0]})" if names else "")))
        rows, classes = zip(*(_row(cell) for cell in cells.to_dict("records")))
        header, numeric = TABLE_HEADER, TABLE_NUMERIC
        if cells["ratio_to_floor"].notna().any():  # a CUDA group with its whole-step CUDA graph timed
            header = [*header[:3], FLOOR_HEADER, *header[3:]]
            rows = [[*row[:3], _floor(cell), *row[3:]] for row, cell in zip(rows, cells.to_dict("records"))]
            numeric = {i + (i >= 3) for i in numeric} | {3}
        blocks.append(("table", header, list(rows), list(classes), numeric))
        if cells["noisy"].eq(True).any():
            blocks.append(("p", "(noisy): the step time's IQR is more than 10% of its median."))
    if images:
        blocks.append(("h2", "Plots"))
        for title, name, png in images.values():
            blocks += [("h3", title), ("image", title, name, png)]
    return blocks


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {block[1]}\n")
        elif kind == "p":
            out.append(block[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            header, rows, numeric = block[1], block[2], block[4]
            rule = ["---:" if i in numeric else "---" for i in range(len(header))]
            lines = [_md_row(header), "|" + "|".join(rule) + "|"]
            out.append("\n".join(lines + [_md_row(r) for r in rows]) + "\n")
        elif kind == "image":
            out.append(f"![{block[1]}]({block[2]})\n")
    return "\n".join(out)


def to_html(blocks: list[tuple]) -> str:
    """One self-contained page: inline CSS, plots as base64 PNG data URIs, no external resources."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            header, rows, classes, numeric = block[1:]
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            body_rows = "".join(
                (f'<tr class="{cls}">' if cls else "<tr>") + "".join(
                    f'<td class="num">{_inline(c)}</td>' if i in numeric else f"<td>{_inline(c)}</td>"
                    for i, c in enumerate(row)) + "</tr>"
                for row, cls in zip(rows, classes))
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>")
        elif kind == "image":
            data = base64.b64encode(block[3]).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[1])}" src="data:image/png;base64,{data}"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>loopmark report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# -- content --------------------------------------------------------------------------------------------

def _environment_lines(env: dict) -> list[str]:
    gpu = env.get("gpu") or {}
    lines = [f"results: `{env.get('source')}` ({env.get('source_format')})"]
    run = ", ".join(str(x) for x in (env.get("loopmark_version") and f"loopmark {env['loopmark_version']}",
                                     env.get("timestamp")) if x)
    if run:
        lines.append(run)
    if env.get("command"):
        lines.append(f"command: `{env['command']}`")
    if env.get("commit"):
        lines.append(f"commit {env['commit']}" + (f" on {env['branch']}" if env.get("branch") else "")
                     + (" (dirty)" if env.get("dirty") else ""))
    names = {"python": "Python", "torch": "torch", "cuda": "CUDA", "cudnn": "cuDNN"}
    software = [f"{name} {env[key]}" for key, name in names.items() if env.get(key)]
    if software:
        lines.append(", ".join(software))
    if env.get("cpu_model") or env.get("cpu_cores"):
        extra = [f"{env['cpu_cores']} cores" if env.get("cpu_cores") else None,
                 f"{env['torch_threads']} torch threads" if env.get("torch_threads") else None]
        details = ", ".join(x for x in extra if x)
        lines.append(f"CPU: {env.get('cpu_model') or 'unknown'}" + (f" ({details})" if details else ""))
    if isinstance(gpu, dict) and gpu.get("name"):
        extra = [f"driver {gpu['driver']}" if gpu.get("driver") else None,
                 human_bytes(gpu["memory_total_bytes"]) if gpu.get("memory_total_bytes") else None]
        details = ", ".join(x for x in extra if x)
        lines.append(f"GPU: {gpu['name']}" + (f" ({details})" if details else ""))
    return lines


def _summary(df: pd.DataFrame) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Summary")]
    ok = df["status"] == "ok"
    blocks.append(("p", f"{len(df)} cells: {int(ok.sum())} finished ok, {int((~ok).sum())} not."))
    broken = df[df["verdict"] == "broken"]
    if len(broken):
        items = []
        for variant, cells in broken.groupby("variant", sort=False):
            where = ", ".join(f"{w}/{d}" for w, d in zip(cells["workload"], cells["device"]))
            reason = next((r for r in cells["verdict_reason"] if r), "")
            items.append(f"**{variant}** ({where})" + (f": {reason}" if reason else ""))
        blocks += [("p", f"**Broken** variants ({len(broken)} cells): wrong results, however fast."),
                   ("list", items)]
    else:
        blocks.append(("p", "No variant is broken."))
    mismatched = df[df["verdict_as_expected"].eq(False) & df["status"].eq("ok")]
    if len(mismatched):
        blocks += [("p", f"**Verdict differs from the expected one** ({len(mismatched)} cells):"),
                   ("list", [f"{c.variant} on {c.workload}/{c.device}: {c.verdict}, expected "
                             f"{c.expected_verdict}" + (f" ({c.verdict_reason})" if c.verdict_reason else "")
                             for c in mismatched.itertuples()])]
    if (~ok).any():
        blocks += [("p", "**Cells that did not finish ok:**"),
                   ("list", [f"{c.variant} on {c.workload}/{c.device}: {c.status}"
                             + (f": {c.error}" if c.error else "") for c in df[~ok].itertuples()])]
    return blocks


def _row(cell: dict) -> tuple[list[str], str]:
    """A table row and its class: broken, mismatch, notok or empty."""
    status, verdict = cell["status"], cell["verdict"]
    sps = _number(cell["samples_per_s"]) + (" (noisy)" if cell["noisy"] is True else "")
    if is_baseline(cell):
        ratio = "1 (baseline)" if _finite(cell["ratio_to_baseline"]) else "–"
    else:
        ratio = _ratio(cell["ratio_to_baseline"], cell["ratio_ci_low"], cell["ratio_ci_high"])
    growth = cell["memory_growth_bytes_per_step"]
    growth_text = f"{'+' if growth > 0 else ''}{human_bytes(growth)}/step" if _finite(growth) else "–"
    verdict_text, reason, cls = verdict or "", cell["verdict_reason"] or "", ""
    if verdict == "broken":
        verdict_text, cls = "**broken**", "broken"
    if status == "ok" and cell["verdict_as_expected"] is False:
        verdict_text += f" (expected {cell['expected_verdict']}) **MISMATCH**"
        cls = cls or "mismatch"
    if status != "ok":  # skipped, error, oom, diverged: the status first, the error as the reason
        verdict_text = f"{status}; {verdict_text}" if verdict_text else str(status)
        reason, cls = cell["error"] or reason, cls or "notok"
    variant = f"**{cell['variant']}**" if verdict == "broken" else cell["variant"]
    peak = human_bytes(cell["peak_memory_bytes"]) if _finite(cell["peak_memory_bytes"]) else "–"
    syncs = _number(cell["syncs_per_step"])
    tensors = _number(cell.get("param_tensors"))
    reason = "; ".join([reason, *_notes(cell)]) if reason else "; ".join(_notes(cell))
    return [variant, sps, ratio, syncs, peak, growth_text, tensors, verdict_text, reason], cls


def _floor(cell: dict) -> str:
    if cell["variant"] == FLOOR_VARIANT:
        return "1 (floor)" if _finite(cell["ratio_to_floor"]) else "–"
    return f"{cell['ratio_to_floor']:.2f}x" if _finite(cell["ratio_to_floor"]) else "–"


def _notes(cell: dict) -> list[str]:
    """What a few variants add to their row: graph breaks, compile time, skipped or unsynchronised steps."""
    notes = []
    if _finite(cell.get("graph_breaks")) and cell["graph_breaks"] > 0:
        notes.append(f"{int(cell['graph_breaks'])} graph break(s)")
    if cell.get("idiom") == "compilation" and _finite(cell.get("warmup_time_s")):
        notes.append(f"compile + warm-up {cell['warmup_time_s']:.1f} s (not timed)")
    if _finite(cell.get("skipped_steps")) and cell["skipped_steps"] > 0:
        notes.append(f"{int(cell['skipped_steps'])} optimizer step(s) skipped")
    if _finite(cell.get("unsynced_reads_per_step")) and cell["unsynced_reads_per_step"] > 0:
        notes.append(f"{cell['unsynced_reads_per_step']:g} unsynchronised read(s) of a non-blocking copy/step")
    return notes


# -- formatting -----------------------------------------------------------------------------------------

def _number(v) -> str:
    if not _finite(v):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def _ratio(ratio, low, high) -> str:
    if not _finite(ratio):
        return "–"
    text = f"{ratio:.2f}x"
    return text + (f" [{low:.2f}, {high:.2f}]" if _finite(low) and _finite(high) else "")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _inline(text: str) -> str:
    """HTML for a block's text: escaped, with **strong** and `code`."""
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

