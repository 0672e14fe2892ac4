"""Write report.md, report.html (self-contained) and plot_*.png from one or more results files.

The report is built once as a list of blocks, then rendered to Markdown and to HTML. Text in blocks may
use `**strong**` and `` `code` ``, which both renderers understand.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from pathlib import Path

import pandas as pd

from reports import markup, results, stats
from reports.findings import (
    RANK_SPREAD,
    findings,
    growth_text,
    is_distributed,
    rank_differences,
    rank_figures,
    ratio_text,
    sync_sites,
)
from reports.load import PYTEST_BENCHMARK, by_workload_device, in_display_order, load_records, to_frame
from reports.markup import code
from reports.results import FLOOR_VARIANT, TRACE_VARIANT, trace_device
from reports.units import human_bytes

FIGURES = {  # plot_<name>.png -> (title, the figure's function in reports.plots, imported when a plot is drawn)
    "throughput": ("Throughput", "throughput"),
    "ratio_to_baseline": ("Step time relative to the baseline", "ratio_to_baseline"),
    "syncs_per_step": ("Host-device syncs per step", "syncs_per_step"),
    "memory": ("Peak memory and memory growth per step", "memory"),
    "step_time_distributions": ("Per-step time distributions", "step_time_distributions"),
    "memory_over_steps": ("Memory over steps", "memory_over_steps"),
    "cpu_vs_gpu": ("CPU vs GPU", "cpu_vs_gpu"),
}
DPI = 110
RATIO_HEADER = "step time / baseline's (below 1 is faster) [95% CI]"
MEMORY_HEADERS = {  # device -> (peak column, growth column): what each figure is on that device
    "cpu": ("peak tensor memory", "C-heap growth/step ± 95% CI"),
    "cuda": ("peak CUDA memory (allocated)", "CUDA memory growth/step ± 95% CI"),
}
TABLE_HEADER = ["variant", "samples/s", RATIO_HEADER, "syncs/step", *MEMORY_HEADERS["cpu"], "param tensors",
                "verdict", "reason"]
TABLE_NUMERIC = {1, 2, 3, 4, 6}  # right-aligned columns (the growth, with its words, wraps)
FLOOR_HEADER = f"ratio to floor ({FLOOR_VARIANT})"
COLLECTIVES_HEADER = "collectives/step (sent)"  # a group with distributed cells has it after the syncs
RANK_HEADER = ["rank", "syncs/step", "peak memory", "collectives/step", "sent/step", "median step time"]
# committed GPU reference runs, `results/reference/<gpu>/results.json`: shown beside a run without CUDA cells
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1340px;
       padding: 0 1em; color: #222; line-height: 1.4; font-size: 15px; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.broken td { background: #fde4e4; } tr.broken strong, li strong { color: #b00000; }
tr.mismatch td { background: #fff4d6; } tr.notok td { color: #777; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
h3 + p { margin-top: .3em; } li { margin: .25em 0; }
table.findings { width: 100%; font-size: 12.5px; } table.findings td, table.findings th { line-height: 1.25; }
table.findings td:nth-child(1) { width: 22%; } table.findings td:nth-child(2) { width: 13%; }
table.findings td:nth-child(3) { width: 30%; } table.findings td:nth-child(4) { width: 16%; }
table.distributed td:nth-child(1) { width: 18%; } table.distributed td:nth-child(2) { width: 11%; }
table.distributed td:nth-child(3) { width: 22%; } table.distributed td:nth-child(4) { width: 18%; }
"""


def write_report(paths: list, out_dir=None, reference_dir=REFERENCE_DIR) -> list[Path]:
    """Write the report for the results at `paths` (cells concatenated); returns the files written.

    Where the results hold no CUDA cell, committed GPU reference runs found under `reference_dir` (each
    `<name>/results.json` with CUDA cells) are shown beside them (`gpu_reference`); none found, the report says so.

    Files go to `out_dir`, by default `report_dir` of the first input; nothing is written anywhere else. The cells
    of pytest-benchmark JSON inputs also go to a results.csv there, unless it is a run's directory (results.json):
    a run's results.csv is its results.json's. Raises ValueError (one line) for unusable input or an unwritable
    `out_dir`, `results.OutputError` when a file cannot be written (each file stays whole, old or new).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no results to report on")
    loaded = [load_records(p) for p in paths]
    envs = [env for env, _ in loaded]
    df = pd.concat([to_frame(records) for _, records in loaded], ignore_index=True)
    out = results.check_writable(Path(out_dir) if out_dir is not None else report_dir(Path(envs[0]["source"])))

    written = []
    benchmarked = {Path(env["source"]).resolve(): records for env, records in loaded
                   if env["source_format"] == PYTEST_BENCHMARK}
    run_json = (out / "results.json").resolve()  # a run's results.csv is written with its results.json only
    if benchmarked and (run_json in benchmarked or not run_json.exists()):
        csv_path = out / "results.csv"
        results.atomic_write(csv_path, results.csv_text([r for records in benchmarked.values() for r in records]))
        written.append(csv_path)
    reference = gpu_reference(reference_dir) if not (df["device"] == "cuda").any() else None
    images = {}
    if FIGURES:
        from reports import plots  # matplotlib: loaded by the commands that draw, not by every command's start
    for name, (title, function) in FIGURES.items():
        figure = getattr(plots, function)
        png_path = out / f"plot_{name}.png"
        if name == "cpu_vs_gpu" and reference is not None:  # this run's CPU cells beside the GPU reference
            fig = figure(pd.concat([df, reference["df"]], ignore_index=True))
        else:
            fig = figure(df)
        if fig is None:
            png_path.unlink(missing_ok=True)  # stale from an earlier report
            continue
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # a character no font has: said once, by plots._fonts_for
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            plots.save_png(fig, buffer, DPI)
        results.atomic_write(png_path, buffer.getvalue())
        images[name] = (title, png_path.name, buffer.getvalue())
        written.append(png_path)

    blocks = document(envs, df, images, reference)
    md_path, html_path = out / "report.md", out / "report.html"
    results.atomic_write(md_path, to_markdown(blocks))
    results.atomic_write(html_path, to_html(blocks))
    return [md_path, html_path, *written]


def report_dir(source: Path) -> Path:
    """Where the report of one results file goes by default: the run's directory for a results.json; for any other
    file (a pytest-benchmark JSON, a renamed results file) a directory beside it named after it (out.json ->
    out-report/): its own files never land loose in the JSON's directory, often the current one."""
    return source.parent if source.name == "results.json" else source.with_name(f"{source.stem}-report")


def gpu_reference(directory) -> dict | None:
    """The committed GPU reference runs under `directory`: every `<name>/results.json` holding CUDA cells that
    finished ok, their CUDA cells together (`df`), named by their GPUs (`name`), their files (`source`) and
    environments (`envs`); None when there are none (no directory, CPU-only or unreadable references)."""
    if directory is None or not Path(directory).is_dir():
        return None
    frames, names, sources, envs = [], [], [], []
    for path in sorted(Path(directory).glob("*/results.json")):
        try:
            env, records = load_records(path)
        except (ValueError, OSError):
            continue  # a reference that cannot be read is left out, not the report
        frame = to_frame(records)
        cuda = frame[frame["device"] == "cuda"]
        if not (cuda["status"] == "ok").any():
            continue
        gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
        names.append(gpu.get("name") or next((n for n in cuda["device_name"] if n), path.parent.name))
        frames.append(cuda)
        sources.append(_shown_path(path))
        envs.append(env)
    if not frames:
        return None
    return {"df": pd.concat(frames, ignore_index=True), "name": ", ".join(dict.fromkeys(names)),
            "source": ", ".join(sources), "envs": envs}


def document(envs: list[dict], df: pd.DataFrame, images: dict, reference: dict | None = None) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("list", items),
    ("table", header, rows, row_classes, numeric column indices), ("image", title, file name, png bytes).

    First the run (settings, the load it ran under), then the findings (`reports.findings`: per idiom, what it costs,
    whether it is correct, where its syncs are), the summary, a table per workload and device (with its distributed
    cells' ranks where they differ), the sync sites, the GPU reference beside a CPU-only run, the plots."""
    blocks: list[tuple] = [("h1", "loopmark report")]
    for i, env in enumerate(envs, 1):  # the load the timed blocks saw, of all the inputs, under the last one
        blocks += [("list", _environment_lines(env) + _settings_lines(env, df) + (_load_lines(df) if i == len(envs)
                                                                                   else []))]
    measured = df[df["variant"] != TRACE_VARIANT]  # a traced script has its own section below its table
    ref = reference or {}
    blocks += findings(measured, ref.get("df"), ref.get("name"), ref.get("source"))
    blocks += _summary(df)
    if len(df):
        blocks += _reading_guide(df)
    for (workload, device), cells in by_workload_device(df):
        names = [n for n in dict.fromkeys(cells["device_name"]) if n]
        blocks.append(("h2", f"{workload} on {device}" + (f" ({names[0]})" if names else "")))
        rows, classes = zip(*(_row(cell) for cell in cells.to_dict("records")))
        header, numeric = _table_header(device), TABLE_NUMERIC
        if is_distributed(cells):  # what the ranks send each other, beside the syncs
            header = [*header[:4], COLLECTIVES_HEADER, *header[4:]]
            rows = [[*row[:4], _collectives(cell), *row[4:]] for row, cell in zip(rows, cells.to_dict("records"))]
            numeric = {i + (i >= 4) for i in numeric} | {4}
        if cells["ratio_to_floor"].notna().any():  # a CUDA group with its whole-step CUDA graph timed
            header = [*header[:3], FLOOR_HEADER, *header[3:]]
            rows = [[*row[:3], _floor(cell), *row[3:]] for row, cell in zip(rows, cells.to_dict("records"))]
            numeric = {i + (i >= 3) for i in numeric} | {3}
        blocks.append(("table", header, list(rows), list(classes), numeric))
        if cells["noisy"].eq(True).any():
            blocks.append(("p", "(noisy): the step time's IQR is more than 10% of its median."))
        unreliable = [c for c in cells.to_dict("records") if _unreliable(c)]
        if unreliable:
            blocks += [("p", "**Timings without an interval** (interference seen during the timed blocks: rerun on "
                             "a quiet machine; or blocks not timed in rounds with the baseline's):"),
                       ("list", [f"{code(c['variant'])}: {c['reliability'].removeprefix('unreliable: ')}"
                                 for c in unreliable])]
        blocks += _rank_blocks(cells, _backends(envs))
        for cell in cells.to_dict("records"):
            blocks += _trace_blocks(cell)
    blocks += _sync_section(measured)
    if reference is not None:
        blocks += _reference_section(reference, df)
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
            out.append(f"{'#' * int(kind[1])} {markup.to_markdown(block[1])}\n")
        elif kind == "p":
            out.append(markup.to_markdown(block[1]) + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {markup.to_markdown(item)}" for item in block[1]) + "\n")
        elif kind == "table":
            header, rows, numeric = block[1], block[2], block[4]
            rule = ["---:" if i in numeric else "---" for i in range(len(header))]
            lines = [_md_row(header), "|" + "|".join(rule) + "|"]
            out.append("\n".join(lines + [_md_row(r) for r in rows]) + "\n")
        elif kind == "image":
            out.append(f"![{markup.to_markdown(block[1])}]({block[2]})\n")  # a plot's title, its file's name
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
            header, rows, classes, numeric = block[1:5]
            css = f' class="{block[5]}"' if len(block) > 5 and block[5] else ""  # an optional class of the table
            head = "".join(f"<th>{markup.to_html(h)}</th>" for h in header)
            body_rows = "".join(
                (f'<tr class="{cls}">' if cls else "<tr>") + "".join(
                    f'<td class="num">{_inline(c)}</td>' if i in numeric else f"<td>{_inline(c)}</td>"
                    for i, c in enumerate(row)) + "</tr>"
                for row, cls in zip(rows, classes))
            body.append(f"<table{css}><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>")
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
    lines = [f"results: {code(env.get('source'))} ({env.get('source_format')})"]
    run = ", ".join(str(x) for x in (env.get("loopmark_version") and f"loopmark {env['loopmark_version']}",
                                     env.get("timestamp")) if x)
    if run:
        lines.append(run)
    if env.get("command"):
        lines.append(f"command: {code(env['command'])}")
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
    if env.get("ranks"):  # a run of distributed cells under torchrun
        lines.append(f"distributed: {env['ranks']} ranks" + (f", {env['backend']} backend" if env.get("backend")
                                                             else ""))
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
    ratio = ratio_text(cell)
    if _unreliable(cell):
        ratio = ratio.replace("unreliable", "**unreliable**")
    growth = growth_text(cell)
    verdict_text, reason, cls = verdict or "", cell["verdict_reason"] or "", ""
    if verdict == "broken":
        verdict_text, cls = "**broken**", "broken"
    if status == "ok" and cell["verdict_as_expected"] is False:
        verdict_text += f" (expected {cell['expected_verdict']}) **MISMATCH**"
        cls = cls or "mismatch"
    if status != "ok":  # skipped, error, timeout, oom, diverged: the status first, the error as the reason
        verdict_text = f"{status}; {verdict_text}" if verdict_text else str(status)
        reason, cls = cell["error"] or reason, cls or "notok"
    variant = f"**{cell['variant']}**" if verdict == "broken" else cell["variant"]
    if cell.get("test_id"):  # measured by the pytest plugin: the test tells two rows of one cell apart
        variant += f" ({code(cell['test_id'])})"
    peak = human_bytes(cell["peak_memory_bytes"]) if _finite(cell["peak_memory_bytes"]) else "–"
    syncs = _number(cell["syncs_per_step"])
    # the zeroing cost it stands beside is the optimizer's: no optimizer in an evaluation loop
    tensors = "n/a" if cell.get("kind") == "eval" and status == "ok" else _number(cell.get("param_tensors"))
    reason = "; ".join([reason, *_notes(cell)]) if reason else "; ".join(_notes(cell))
    return [variant, sps, ratio, syncs, peak, growth, tensors, verdict_text, reason], cls


def _table_header(device: str) -> list[str]:
    peak, growth = MEMORY_HEADERS.get(device, ("peak memory", "memory growth/step ± 95% CI"))
    return ["variant", "samples/s", RATIO_HEADER, "syncs/step", peak, growth, "param tensors", "verdict", "reason"]


def _settings_lines(env: dict, df: pd.DataFrame) -> list[str]:
    """Steps, blocks, warm-up, seed and threads the cells were measured with."""
    settings = env.get("settings") if isinstance(env.get("settings"), dict) else {}

    def one(key, column):
        if settings.get(key) is not None:
            return settings[key]
        values = [int(v) for v in df[column].dropna().unique()] if column in df else []
        return values[0] if len(values) == 1 else ("/".join(map(str, sorted(values))) if values else None)

    steps, repeats, warmup = one("steps", "steps"), one("repeats", "repeats"), one("warmup", "warmup_steps")
    parts = []
    if steps is not None or repeats is not None:
        # only `loopmark run` times blocks in rounds with the baseline's; a trace and a pytest-benchmark test do not
        rounds = "timing_rounds" in df and df["timing_rounds"].notna().any()
        parts.append(f"{steps if steps is not None else '?'} timed steps × {repeats if repeats is not None else '?'} "
                     "blocks per cell" + (", each block interleaved with its baseline's, round by round" if rounds
                                          else ", not interleaved with a baseline's"))
    if warmup is not None:
        parts.append(f"{warmup} warm-up steps (not timed)")
    if settings.get("seed") is not None:
        parts.append(f"seed {settings['seed']}")
    threads = env.get("torch_threads")
    if threads:
        parts.append(f"{threads} torch threads" + (f" on {env['cpu_cores']} cores" if env.get("cpu_cores") else ""))
    return [f"settings: {', '.join(parts)}"] if parts else []


def _load_lines(df: pd.DataFrame) -> list[str]:
    """The load the run's timed blocks saw (`bench.timing.LoadWatch` readings) and how many timings it spoiled."""
    blocks = [(b, cell["device"]) for cell in df.to_dict("records") if isinstance(cell.get("block_load"), list)
              for b in cell["block_load"] if isinstance(b, dict)]
    if not blocks:
        return ["load during timing: not recorded (results written before loopmark read it, or not timed by "
                "`loopmark run`)"]
    disturbed = sum(1 for b, device in blocks if stats.block_interference(b, device))
    waits = sorted(w for w in (stats.wait_fraction(b) for b, _ in blocks) if w is not None)
    others = sorted(n for n in (stats.max_others(b) for b, _ in blocks) if n is not None)
    parts = [f"{disturbed} of {len(blocks)} timed blocks disturbed"]
    if waits:
        parts.append(f"time the process's threads waited for a CPU: {waits[len(waits) // 2]:.0%} of a block at the "
                     f"median, {waits[-1]:.0%} at most (flagged above {stats.MAX_WAIT_FRACTION:.0%})")
    if others:
        parts.append(f"other runnable processes at a block's start or end: {others[len(others) // 2]} at the median, "
                     f"{others[-1]} at most")
    timed = df[df["ratio_to_baseline"].map(_finite) | df["reliability"].map(lambda r: isinstance(r, str))]
    unreliable = int(timed["reliability"].map(lambda r: isinstance(r, str) and r.startswith("unreliable")).sum())
    parts.append(f"{unreliable} of {len(timed)} timed cells unreliable")
    return ["load during timing: " + "; ".join(parts)]


def _reading_guide(df: pd.DataFrame) -> list[tuple]:
    devices = set(df["device"])
    items = [f"**{RATIO_HEADER}**: the median over timed blocks of (the block's median step time / the baseline's "
             "block of the same round) — the per-block samples `loopmark compare` gates on — with a 95 % interval over "
             "blocks (Student's t on their logarithms). A timing disturbed by other processes is marked "
             "**unreliable**, with the reason, instead."]
    if "cpu" in devices:
        items.append("On CPU, **peak tensor memory** is the most tensor bytes the CPU allocator had handed out "
                     "within a step; **C-heap growth/step** is the least-squares slope of the whole C heap in use "
                     "(tensors and the autograd graph's nodes, which `running += loss` keeps on the host) over the "
                     "step boundaries, ± its 95 % interval; the memory-over-steps plot shows the same heap.")
    if "cuda" in devices:
        items.append("On CUDA, both memory figures are the caching allocator's allocated bytes.")
    if is_distributed(df):
        items.append("A **distributed** cell (`ddp_*`) runs on every rank at once: its batch is the global one (all "
                     "ranks'), each step's time the slowest rank's, its syncs, memory and collectives the worst "
                     "rank's. **collectives/step** counts the c10d collectives a rank issues per optimizer step (DDP's "
                     "gradient all-reduces and the loop's own), **sent** the bytes of the tensors it sends in them. "
                     "Where the ranks differ, a table gives each rank's own figures.")
    items.append(f"A growth is a **leak** when its 95 % interval lies above 0 and it exceeds "
                 f"{human_bytes(stats.LEAK_BYTES_PER_STEP)}/step; it **grows** when significant and above "
                 f"{stats.GROWS_BYTES_PER_STEP} B/step; else **no growth** (the interval includes 0, it falls, or a "
                 "few bytes a step); a slope under half a byte a step prints as 0. **n/a**: the column does not apply "
                 "(param tensors, the zeroing cost of an optimizer step, in an evaluation loop); **–**: not measured.")
    return [("h2", "Reading the tables"), ("list", items)]


def _sync_section(df: pd.DataFrame) -> list[tuple]:
    """Every sync site of every variant, per device: where (file:line), how often, the operation, the code."""
    cells = df[df["status"] == "ok"]
    if cells.empty or not cells["syncs_per_step"].map(_finite).any():
        return []
    blocks: list[tuple] = [("h2", "Where the syncs are"), (
        "p", "Each host-device sync the sync pass counted, at the line of the loop that caused it: on CUDA each one "
             "makes the host wait for the GPU to finish its queued work. Remove them line by line; the counts are "
             "exact on both devices.")]
    for device in dict.fromkeys(cells["device"]):
        rows, none = {}, []
        for (_, d), group in by_workload_device(cells):
            if d != device:
                continue
            for cell in in_display_order(group).to_dict("records"):
                sites = sync_sites(cell)
                if not sites and cell["syncs_per_step"] == 0:
                    none.append(cell["variant"])
                for site in sites:
                    key = (cell["variant"], site["site"], site["when"], site["operation"], site["code"])
                    rows.setdefault(key, []).append(cell["workload"])
        if len(set(cells["device"])) > 1:
            blocks.append(("h3", f"on {device}"))
        if rows:
            table = [[f"**{v}**" if _is_broken(cells, v) else v, code(site), when, op,
                      code(line) if line else "", ", ".join(dict.fromkeys(workloads))]
                     for (v, site, when, op, line), workloads in rows.items()]
            blocks.append(("table", ["variant", "where", "how often", "operation", "code", "workloads"], table,
                           [""] * len(table), set()))
        if none:
            blocks.append(("p", "No sync: " + ", ".join(code(v) for v in dict.fromkeys(none)) + "."))
    return blocks


def _reference_section(reference: dict, df: pd.DataFrame) -> list[tuple]:
    """The committed GPU reference beside this run's CPU cells: the ratio where a sync costs time, and the syncs."""
    ref = reference["df"]
    env = reference["envs"][0] if reference["envs"] else {}
    about = ", ".join(str(x) for x in (f"torch {env['torch']}" if env.get("torch") else None,
                                      env.get("timestamp")) if x)
    blocks: list[tuple] = [("h2", f"GPU reference ({reference['name']}): committed results, not this run"), (
        "p", f"From {code(reference['source'])}" + (f" ({about})" if about else "") + ". The same cells on a GPU, "
             "where the time a sync costs shows in the step time; beside them this run's CPU figures.")]
    for (workload, _device), cells in by_workload_device(ref):
        rows = []
        for cell in cells.to_dict("records"):
            mine = df[(df["workload"] == workload) & (df["variant"] == cell["variant"])]
            cpu = mine.iloc[0] if len(mine) else None
            rows.append([f"**{cell['variant']}**" if cell["verdict"] == "broken" else cell["variant"],
                         ratio_text(cell), _number(cell["syncs_per_step"]),
                         ratio_text(cpu) if cpu is not None else "not run", _number(cpu["syncs_per_step"])
                         if cpu is not None else "–", cell["verdict"] or cell["status"]])
        blocks += [("h3", f"{workload}: GPU reference beside this run"),
                   ("table", ["variant", f"GPU: {RATIO_HEADER}", "GPU syncs/step", f"this run: {RATIO_HEADER}",
                              "this run: syncs/step", "verdict (GPU)"], rows, [""] * len(rows), {1, 2, 3, 4})]
    return blocks


def _rank_blocks(cells: pd.DataFrame, backend: str) -> list[tuple]:
    """The ranks of a group's distributed cells: one line naming the cells whose ranks agree (the worst rank's
    figures in the table stand for every rank), and where they differ each rank's own figures, so that a rank that
    syncs, sends or holds more, or runs slower, than the others is seen."""
    measured = [c for c in cells.to_dict("records") if c["status"] == "ok" and len(rank_figures(c)) > 1]
    if not measured:
        return []
    counts = sorted({len(rank_figures(c)) for c in measured})
    title = f"Per rank ({'/'.join(map(str, counts))} ranks" + (f", {backend}" if backend else "") + ")"
    blocks: list[tuple] = [("h3", title)]
    agree = [c for c in measured if not rank_differences(c)]
    if agree:
        which = "every distributed cell" if len(agree) == len(measured) else \
            f"{len(agree)} of the {len(measured)} distributed cells (all but those below)"
        n = "/".join(map(str, sorted({len(rank_figures(c)) for c in agree})))
        blocks.append(("p", f"The {n} ranks agree in {which}: equal syncs, collectives and bytes sent per step, peak "
                            f"memory and median step time within {RANK_SPREAD:.0%} of each other."))
    for cell in measured:
        differences = rank_differences(cell)
        if not differences:
            continue
        variant = f"**{cell['variant']}**" if cell["verdict"] == "broken" else code(cell['variant'])
        timed = any(d.startswith("median step time") for d in differences)
        blocks.append(("p", f"{variant}: its {len(rank_figures(cell))} ranks differ in {', '.join(differences)}."
                       + (" Its timing is marked unreliable (the reason is under the table above): the ranks' step "
                          "times may differ by the interference." if timed and _unreliable(cell) else "")))
        rows = [[str(r["rank"]), _number(r["syncs"]), human_bytes(r["peak"]) if _finite(r["peak"]) else "–",
                 _number(r["collectives"]), human_bytes(r["sent"]) if _finite(r["sent"]) else "–",
                 _ms(r["median_s"])] for r in rank_figures(cell)]
        blocks.append(("table", RANK_HEADER, rows, [""] * len(rows), set(range(len(RANK_HEADER)))))
    return blocks


def _backends(envs: list[dict]) -> str:
    """The process-group backends (gloo, nccl) of the runs reported on, "" where none says."""
    return ", ".join(dict.fromkeys(str(env["backend"]) for env in envs if env.get("backend")))


def _collectives(cell: dict) -> str:
    """`1 (300.0 KiB)`: a distributed cell's collectives per step and the bytes a rank sends in them."""
    if not _finite(cell.get("collectives_per_step")):
        return "–"
    sent = cell.get("comm_bytes_per_step")
    return _number(cell["collectives_per_step"]) + (f" ({human_bytes(sent)})" if _finite(sent) else "")


def _is_broken(cells: pd.DataFrame, variant: str) -> bool:
    return bool((cells.loc[cells["variant"] == variant, "verdict"] == "broken").any())


def _unreliable(cell) -> bool:
    reliability = cell.get("reliability")
    return isinstance(reliability, str) and reliability.startswith("unreliable")


def _shown_path(path: Path) -> str:
    """`path` relative to the current directory where it lies below it (results/reference/h100/results.json)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


TRACE_SITES = 10  # the sync sites a traced script's section lists, most syncs first


def _trace_blocks(cell: dict) -> list[tuple]:
    """A script traced by `loopmark trace` (variant `trace`): its per-step figures beyond the table and its costliest
    sync sites (file:line in the script, the operation, syncs per step, the line's code)."""
    if cell["variant"] != TRACE_VARIANT:
        return []
    name = cell["workload"]
    passes = cell.get("trace_passes") if isinstance(cell.get("trace_passes"), dict) else {}
    items = [f"command: {code(cell['description'])}" if cell.get("description") else None,
             f"device: {trace_device(cell)}",
             f"{_number(cell.get('warmup_steps'))} warm-up steps, then "
             + ", ".join(f"{n} {p}" for p, n in passes.items()) + " steps (count, audit, time and memory passes)",
             f"operators: {_number(cell.get('ops_per_step'))}/step",
             f"step time: median {cell['step_time_median_s'] * 1e3:.3g} ms"
             + (f", IQR {cell['step_time_iqr_s'] * 1e3:.2g} ms" if _finite(cell.get("step_time_iqr_s")) else "")
             if _finite(cell.get("step_time_median_s")) else None,
             "**autograd graph kept across steps**: the loss's graph of "
             f"{_number(cell.get('graph_retained_steps'))} step(s) outlived them" if cell.get("retains_graph") is True
             else None]
    nonfinite = cell.get("nonfinite_loss_steps")
    if isinstance(nonfinite, list) and nonfinite:
        items.append(f"**non-finite loss** at step(s) {', '.join(str(s) for s in nonfinite[:10])}")
    if _finite(cell.get("skipped_steps")) and cell["skipped_steps"] > 0:
        items.append(f"{int(cell['skipped_steps'])} optimizer step(s) skipped by a GradScaler")
    if _finite(cell.get("eval_passes")) and cell["eval_passes"] > 0:
        items.append(f"evaluation, left out of the steps: {int(cell['eval_passes'])} pass(es) in the count pass, "
                     f"{_number(cell.get('eval_syncs'))} syncs, {_number(cell.get('eval_ops'))} operators")
    notes = cell.get("trace_notes")
    items += [f"note: {n}" for n in notes] if isinstance(notes, list) else []
    blocks: list[tuple] = [("h3", f"{name}: traced steps"), ("list", [i for i in items if i])]
    sites = sync_sites(cell)
    if sites:
        shown = sites[:TRACE_SITES]
        rows = [[code(s['site']), s["operation"], _number(s["per_step"]), code(s['code']) if s["code"] else ""]
                for s in shown]
        blocks += [("h3", f"{name}: sync sites ({len(shown)} of {len(sites)}, most syncs first)"),
                   ("table", ["site", "operation", "syncs/step", "code"], rows, [""] * len(rows), {2})]
        settings: dict[str, list[str]] = {}
        for s in shown:
            if s["setting"]:
                settings.setdefault(s["setting"], []).append(code(s["site"]))
        if settings:
            blocks.append(("list", [f"setting behind {', '.join(where)}: {setting}"
                                    for setting, where in settings.items()]))
    return blocks


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


def _ms(seconds) -> str:
    if not _finite(seconds):
        return "–"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _md_row(cells: list[str]) -> str:
    """A Markdown table row; a line break within a cell becomes `; `."""
    # lines become "; " ("2/step:" and its sites below it: "2/step: 1 per step: ...; 1 per step: ...")
    return "| " + " | ".join(markup.to_markdown(c.replace(":\n", ": ").replace("\n", "; "), table=True)
                             for c in cells) + " |"


def _inline(text: str) -> str:
    """HTML for a block's text: escaped, with **strong**, `code` and line breaks."""
    return markup.to_html(text)

