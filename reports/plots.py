"""One function per figure: a DataFrame of cells (reports.load) in, a matplotlib Figure out.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no GUI backend): save them with `save_png`.
Each figure has one panel per (workload, device) with variants on the y axis, so long variant names
stay readable; its height grows with the number of variants. A function returns None when the
DataFrame holds nothing it could plot (e.g. `cpu_vs_gpu` with one device).
Cells with a broken verdict are red and hatched, their names red and bold.
Names are drawn as written (`_literal`), in any script an installed font has (`_fonts_for`).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FixedLocator, FuncFormatter, LogLocator, NullFormatter

from reports.findings import growth_text
from reports.load import by_workload_device, in_display_order, is_baseline
from reports.stats import LEAK_BYTES_PER_STEP, growth_interval
from reports.units import human_bytes

MAX_LABEL_CHARS = 56
WIDTH_IN = 11.0
ROW_IN = 0.26  # height per variant
PANEL_IN = 1.1  # title, axis label and margins per panel
DEVICE_COLORS = {"cpu": "#4c72b0", "cuda": "#55a868"}
COLORS = {"baseline": "#8c8c8c", "variant": "#4c72b0", "different": "#dd8452", "broken": "#d62728"}
LEGEND_LABELS = {
    "baseline": "baseline", "variant": "variant (identical/equivalent)", "different": "verdict: different",
    "broken": "verdict: BROKEN",
}
BROKEN_HATCH = "///"
# one per variant in the memory-over-steps panels (tab10 less its red, for broken, and grey, for baselines)
DISTINCT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
CPU_VS_GPU_METRICS = [("samples_per_s", "samples/s (log scale)"),
                      ("ratio_to_baseline", "step time / baseline (< 1 is faster)")]
MiB = 2**20
KiB = 2**10


def throughput(df: pd.DataFrame) -> Figure | None:
    """Samples per second by variant, with the 95% CI of the median step time as whiskers."""
    def draw(ax, cells):
        sps, median = cells["samples_per_s"], cells["step_time_median_s"]
        low = sps * median / cells["step_time_ci_high_s"]
        high = sps * median / cells["step_time_ci_low_s"]
        _bars(ax, cells, sps, low, high)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_xlabel("samples/s (higher is faster)")
    return _panels(df, "Throughput", draw, metric="samples_per_s")


def ratio_to_baseline(df: pd.DataFrame) -> Figure | None:
    """Step time relative to the baseline (bars from 1.0; left of the line is faster), with its 95% CI."""
    def draw(ax, cells):
        ratio = cells["ratio_to_baseline"]
        unreliable = cells["reliability"].map(lambda r: isinstance(r, str) and r.startswith("unreliable"))
        # an unreliable timing (interference seen during its blocks) gets no interval: its bar is hatched instead
        low, high = cells["ratio_ci_low"].mask(unreliable), cells["ratio_ci_high"].mask(unreliable)
        _bars(ax, cells, ratio, low, high, origin=1.0, fmt=lambda v: f"{v:.2f}x")
        for patch, flag in zip(ax.patches, unreliable[ratio.notna()].tolist()):
            if flag:
                patch.set_hatch("..")
                patch.set_alpha(0.5)
        ax.axvline(1.0, color="black", linewidth=1)
        if _wide(ratio):
            _log_x(ax)
        ax.set_xlabel("step time / baseline's, 95% CI (< 1 is faster; dotted, pale, no interval: unreliable timing)"
                      if unreliable.any() else "step time / baseline's, 95% CI (< 1 is faster)")
    return _panels(df, "Step time relative to the baseline", draw, metric="ratio_to_baseline")


def syncs_per_step(df: pd.DataFrame) -> Figure | None:
    """Host-device synchronisations per training step."""
    def draw(ax, cells):
        _bars(ax, cells, cells["syncs_per_step"], fmt=_short)
        ax.set_xlabel("host-device syncs per step")
    return _panels(df, "Host-device synchronisations per step", draw, metric="syncs_per_step")


def memory(df: pd.DataFrame) -> Figure | None:
    """Peak memory (left) and memory growth per step with its 95 % interval (right). The growth axis is linear
    within the leak threshold and logarithmic beyond it (symlog), so 8 MiB/step and 10 KiB/step read in one panel; a
    dashed line marks the threshold. On CPU the peak is tensor bytes and the growth the C heap's (as in the tables)."""
    def draw_peak(ax, cells):
        _bars(ax, cells, cells["peak_memory_bytes"] / MiB, fmt=lambda v: f"{v:.1f}")
        what = "tensor memory" if _device(cells) == "cpu" else "CUDA memory allocated"
        ax.set_xlabel(f"peak {what} (MiB)")

    def draw_growth(ax, cells):
        growth = cells["memory_growth_bytes_per_step"].astype(float)
        growth = growth.where(~(growth.abs() < 0.5), 0.0)  # under half a byte a step: the fit's rounding
        bounds = [growth_interval(g, se, _points(t)) if np.isfinite(g) and np.isfinite(se) else (np.nan, np.nan)
                  for g, se, t in zip(growth, cells["memory_growth_se_bytes_per_step"].astype(float),
                                      cells["memory_trace_bytes"])]
        low, high = [b[0] for b in bounds], [b[1] for b in bounds]
        _bars(ax, cells, growth, low, high, fmt=lambda v: human_bytes(v))
        ax.set_xscale("symlog", linthresh=LEAK_BYTES_PER_STEP, linscale=0.6)
        left, right = ax.get_xlim()
        ticks = [t for t in (-(2**20), -(2**10), 0, 2**10, 2**13, 2**16, 2**20, 2**25, 2**30) if left <= t <= right]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short_bytes(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axvline(LEAK_BYTES_PER_STEP, color=COLORS["broken"], linewidth=0.8, linestyle="--")
        what = "C-heap growth" if _device(cells) == "cpu" else "CUDA memory growth"
        ax.set_xlabel(f"{what}/step ± 95% CI (symlog scale)\ndashed: the {human_bytes(LEAK_BYTES_PER_STEP)}/step leak "
                      "threshold")
    return _panels(df, "Memory", draw_peak, draw_growth,
                   metric=("peak_memory_bytes", "memory_growth_bytes_per_step"))


def _device(cells: pd.DataFrame) -> str:
    return str(cells["device"].iloc[0]) if len(cells) else ""


def _points(trace) -> int | None:
    return len(trace) - 1 if _has_samples(trace) and len(trace) > 3 else None


def _short_bytes(v: float) -> str:
    """0, 1 KiB, 32 KiB, 1 MiB: a tick label of a power-of-two byte count."""
    if not v:
        return "0"
    size, sign = abs(v), "-" if v < 0 else ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{sign}{size:g} {unit}"
        size /= 1024
    return str(v)


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if largest >= scale:
            return unit, scale
    return "B", 1.0


def step_time_distributions(df: pd.DataFrame) -> Figure | None:
    """Box plots of the raw per-step times (all repeats), in milliseconds."""
    def draw(ax, cells):
        series = [np.asarray(t, dtype=float) * 1e3 if _has_samples(t) else np.array([])
                  for t in cells["step_times_s"]]
        present = [i for i, s in enumerate(series) if len(s)]
        # a panel whose cells all failed has no box to draw (boxplot takes an empty list for one empty box)
        boxes = ax.boxplot([series[i] for i in present], positions=present, orientation="horizontal",
                           widths=0.6, patch_artist=True, showfliers=True,
                           flierprops={"markersize": 2, "alpha": 0.4},
                           medianprops={"color": "black"}) if present else {"boxes": []}
        styles = _styles(cells)
        for patch, i in zip(boxes["boxes"], present):
            patch.set_facecolor(styles[i][0])
            patch.set_hatch(styles[i][1])
        for i in set(range(len(cells))) - set(present):
            _note(ax, i, _missing_text(cells["status"].iloc[i], "no per-step times"))
        lows = [s.min() for s in series if len(s) and s.min() > 0]
        if lows and max(s.max() for s in series if len(s)) / min(lows) > 20:
            _log_x(ax)
        ax.set_xlabel("step time (ms)")
    return _panels(df, "Per-step time distributions", draw, metric="step_times_s")


def memory_over_steps(df: pd.DataFrame) -> Figure | None:
    """A panel per variant whose memory grows (`memory_growth_class` "leak" or "grows": significant, see
    `reports.stats.growth_class`): the memory in use at each step boundary, less its value at the end of the first
    step, which is the series its growth is fitted to (on CPU the whole C heap, on CUDA the allocator's allocated
    bytes), with the fitted line and, in grey, its baseline's trace. Each panel has its own scale, so a few KiB a
    step stay visible beside MiB a step; each variant has a colour of its own."""
    growing = df[df["memory_growth_class"].isin(["leak", "grows"]) & df["memory_trace_bytes"].map(_has_samples)]
    if growing.empty:
        return None
    growing = pd.concat([in_display_order(cells) for key, cells in by_workload_device(growing)], ignore_index=True)
    cols = 1 if len(growing) == 1 else 2
    rows = math.ceil(len(growing) / cols)
    fig = _figure(WIDTH_IN, 1.0 + 2.9 * rows, df)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = dict(zip(dict.fromkeys(growing["variant"]), itertools.cycle(DISTINCT_COLORS)))
    for ax, cell in zip(axes, growing.to_dict("records")):
        values = np.asarray(cell["memory_trace_bytes"][1:], dtype=float)
        steps = np.arange(1, len(values) + 1)
        base = df[(df["workload"] == cell["workload"]) & (df["device"] == cell["device"])
                  & (df["variant"] == cell["baseline_variant"])]
        base_trace = base["memory_trace_bytes"].iloc[0] if len(base) else None
        curves = [values - values[0]]
        if _has_samples(base_trace) and cell["variant"] != cell["baseline_variant"]:
            base_values = np.asarray(base_trace[1:], dtype=float)
            curves.append(base_values - base_values[0])
        unit, scale = _byte_unit(max(float(np.nanmax(np.abs(c))) for c in curves))
        if len(curves) > 1:
            ax.plot(np.arange(1, len(curves[1]) + 1), curves[1] / scale, color=COLORS["baseline"], linewidth=1.2,
                    label=_label(cell["baseline_variant"]))
        broken = cell["verdict"] == "broken"
        ax.plot(steps, curves[0] / scale, color=colors[cell["variant"]], linewidth=2, marker="o", markersize=3,
                label=_label(cell["variant"]) + (" (BROKEN)" if broken else ""))
        slope = cell["memory_growth_bytes_per_step"]
        if np.isfinite(slope):
            fit = slope * (steps - steps.mean()) + (curves[0].mean())
            ax.plot(steps, fit / scale, color="black", linewidth=0.8, linestyle="--", label="least-squares fit")
        growth = growth_text(cell).replace("**", "")
        ax.set_title(_label(cell["variant"]) + _literal(f" on {cell['workload']}/{cell['device']}"
                                                        + (" (BROKEN)" if broken else "") + f"\n{growth}"), loc="left",
                     fontsize=9, color=COLORS["broken"] if broken else "black",
                     fontweight="bold" if broken else "normal")
        ax.set_xlabel("step")
        what = "C heap in use" if cell["device"] == "cpu" else "CUDA memory allocated"
        ax.set_ylabel(f"{what}, change\nsince step 1 ({unit})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    for ax in axes[len(growing):]:
        ax.set_visible(False)
    fig.suptitle("Memory over steps: the variants whose memory grows (significantly), each on its own scale",
                 fontsize=12)
    return fig


def cpu_vs_gpu(df: pd.DataFrame) -> Figure | None:
    """Each workload run on both devices: samples/s (log scale) and ratio to baseline, CPU beside GPU."""
    workloads = [w for w, cells in df.groupby("workload", sort=False)
                 if {"cpu", "cuda"} <= set(cells["device"]) and cells["samples_per_s"].notna().any()]
    if not workloads:
        return None
    panels = [df[df["workload"] == w] for w in workloads]
    variants = [in_display_order(cells)["variant"].drop_duplicates().tolist() for cells in panels]
    fig = _figure(WIDTH_IN + 2, _height([len(v) * 1.6 for v in variants]), df)
    grid = fig.add_gridspec(len(panels), 2, height_ratios=[len(v) + 1.5 for v in variants])
    for row, (workload, cells, names) in enumerate(zip(workloads, panels, variants)):
        for col, (metric, xlabel) in enumerate(CPU_VS_GPU_METRICS):
            ax = fig.add_subplot(grid[row, col])
            for offset, device in [(-0.2, "cpu"), (0.2, "cuda")]:
                on = cells[cells["device"] == device].set_index("variant").reindex(names)
                y = np.arange(len(names)) + offset
                broken = (on["verdict"] == "broken").to_numpy()
                left = 1.0 if metric == "ratio_to_baseline" else 0.0
                values = on[metric].to_numpy(dtype=float)
                for i in np.flatnonzero(np.isnan(values)):
                    status = on["status"].iloc[i]
                    _note(ax, y[i], f"{device}: {status if isinstance(status, str) else 'not run'}")
                ax.barh(y, np.nan_to_num(values - left, nan=0.0), left=left, height=0.4,
                        color=DEVICE_COLORS[device],
                        hatch=[BROKEN_HATCH if b else "" for b in broken],
                        edgecolor=[COLORS["broken"] if b else "white" for b in broken])
            if metric == "ratio_to_baseline":
                ax.axvline(1.0, color="black", linewidth=1)
                if _wide(cells[metric]):
                    _log_x(ax)
            else:
                _log_x(ax, engineering=True)
            broken_names = set(cells.loc[cells["verdict"] == "broken", "variant"])
            verdicts = ["broken" if n in broken_names else None for n in names]
            _variant_axis(ax, pd.DataFrame({"variant": names, "verdict": verdicts}), labels=col == 0)
            ax.set_xlabel(xlabel)
            ax.set_title(_literal(workload), loc="left", fontsize=10)
    handles = [Patch(color=color, label=device) for device, color in DEVICE_COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor=COLORS["broken"], hatch=BROKEN_HATCH,
                         label="verdict: BROKEN"))
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle("CPU vs GPU", fontsize=12)
    return fig


# -- layout shared by the per-panel figures ---------------------------------------------------------------

def _panels(df: pd.DataFrame, title: str, *draws, metric) -> Figure | None:
    """A row of panels per (workload, device), a column per `draws` function; None if `metric` is all null."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if df.empty or all(not _column_has_data(df[m]) for m in metrics):
        return None
    facets = by_workload_device(df)
    counts = [len(cells) for _, cells in facets]
    fig = _figure(WIDTH_IN, _height(counts), df)
    grid = fig.add_gridspec(len(facets), len(draws), height_ratios=[n + 2.5 for n in counts])
    for row, ((workload, device), cells) in enumerate(facets):
        for col, draw in enumerate(draws):
            ax = fig.add_subplot(grid[row, col])
            draw(ax, cells)
            _variant_axis(ax, cells, labels=col == 0)
            ax.set_title(_facet_title(workload, device, cells) if col == 0 else "", loc="left", fontsize=10)
    fig.suptitle(title, fontsize=12)
    present = {_style_key(c) for c in df.to_dict("records")}
    handles = [Patch(facecolor=COLORS[k], hatch=BROKEN_HATCH if k == "broken" else "", edgecolor="white",
                     label=LEGEND_LABELS[k]) for k in COLORS if k in present]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def _bars(ax, cells, values, low=None, high=None, origin=0.0, fmt=None) -> None:
    """Horizontal bars from `origin`, optional CI whiskers and value labels; a note for missing values."""
    values = pd.Series(values).to_numpy(dtype=float)
    y = np.arange(len(values))
    styles = _styles(cells)
    present = ~np.isnan(values)
    ax.barh(y[present], values[present] - origin, left=origin, height=0.7,
            color=[styles[i][0] for i in y[present]], hatch=[styles[i][1] for i in y[present]],
            edgecolor="white", linewidth=0.5)
    if low is not None:
        low, high = pd.Series(low).to_numpy(dtype=float), pd.Series(high).to_numpy(dtype=float)
        ok = present & ~np.isnan(low) & ~np.isnan(high)
        err = np.clip([values[ok] - low[ok], high[ok] - values[ok]], 0, None)
        ax.errorbar(values[ok], y[ok], xerr=err, fmt="none", ecolor="black", elinewidth=1, capsize=2.5)
    for i in y[~present]:
        _note(ax, i, _missing_text(cells["status"].iloc[i], "no data"))
    if fmt is not None:  # the value past the bar's end (and past its whisker), on the side the bar points to
        for i in y[present]:
            left = values[i] < origin
            ends = [values[i]] + ([] if low is None or np.isnan(low[i]) else [low[i] if left else high[i]])
            ax.annotate(fmt(values[i]), (min(ends) if left else max(ends), i), xytext=(-4 if left else 4, 0),
                        textcoords="offset points", ha="right" if left else "left", va="center", fontsize=7,
                        color="#333333")
        ax.margins(x=0.18)  # room for the value labels
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _variant_axis(ax, cells, labels: bool = True) -> None:
    """Variant names on the y axis, top to bottom; broken ones red and bold; a line between train and eval."""
    ax.set_yticks(np.arange(len(cells)))
    ax.set_ylim(len(cells) - 0.5, -0.5)
    if "kind" in cells:
        kinds = cells["kind"].tolist()
        for i in range(1, len(kinds)):
            if kinds[i] != kinds[i - 1]:
                ax.axhline(i - 0.5, color="#999999", linewidth=0.8, linestyle=":")
    if not labels:
        ax.set_yticklabels([])
        return
    ax.set_yticklabels([_label(v) for v in cells["variant"]], fontsize=9)
    for tick, verdict in zip(ax.get_yticklabels(), cells["verdict"]):
        if verdict == "broken":
            tick.set_color(COLORS["broken"])
            tick.set_fontweight("bold")


def _log_x(ax, engineering: bool = False) -> None:
    """Log x axis labelled at 1, 2 and 5 times powers of ten only (minor labels overlap), as 0.5 or 20k."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(EngFormatter(sep="") if engineering else plain)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _note(ax, y, text: str) -> None:
    """A grey note in place of a missing bar (x in axes coordinates: safe on log scales)."""
    ax.text(0.01, y, _literal(text), transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="#777777",
            style="italic")


def _missing_text(status, default: str) -> str:
    return f"{status}: not measured" if status and status != "ok" else default


def _styles(cells) -> list[tuple[str, str]]:
    """(colour, hatch) per cell."""
    keys = [_style_key(cell) for cell in cells.to_dict("records")]
    return [(COLORS[k], BROKEN_HATCH if k == "broken" else "") for k in keys]


def _style_key(cell: dict) -> str:
    if cell["verdict"] == "broken":
        return "broken"
    if is_baseline(cell):
        return "baseline"
    return "different" if cell["verdict"] == "different" else "variant"


def _facet_title(workload: str, device: str, cells: pd.DataFrame) -> str:
    names = [n for n in dict.fromkeys(cells["device_name"]) if n]
    return _literal(f"{workload} on {device}" + (f" ({names[0]})" if names else ""))


def _figure(width_in: float, height_in: float, df: pd.DataFrame) -> Figure:
    """An empty figure, its fonts able to draw the names in `df`."""
    _fonts_for(df)
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.08)  # inches kept clear around every panel
    return fig


def _wide(ratios: pd.Series) -> bool:
    """Whether ratios span more than 4x, so that a log axis shows them better."""
    positive = ratios[ratios > 0]
    return len(positive) > 0 and positive.max() / positive.min() > 4


def _height(counts) -> float:
    return 0.9 + sum(ROW_IN * n + PANEL_IN for n in counts)


def _label(name: str) -> str:
    return _literal(name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…")


def _literal(text) -> str:
    """`text` (a name from a results file) as matplotlib must draw it: literally. Text between two `$` would be
    parsed as TeX math (mathtext): `a$b$` drawn as a math b, `$\\x$` failing the whole figure; `\\$` is a `$`."""
    return str(text).replace("$", r"\$")


NAME_COLUMNS = ("workload", "variant", "device", "device_name", "status")  # the text of a results file a plot draws
LAST_RESORT = "Last Resort"  # matplotlib's font of placeholder boxes: it has every character and shows none of them
_said: list[str] = []  # the characters no installed font has, once said


def _fonts_for(df: pd.DataFrame) -> None:
    """Fonts for the names in `df`: a character the figures' font lacks (a Chinese, Japanese or Korean name in DejaVu
    Sans) is drawn from an installed font that has it, added after the figures' fonts in matplotlib's font.family
    (matplotlib falls back from family to family, glyph by glyph). Where no installed font has it, it is drawn as a
    box and one line on stderr says so, once per process."""
    names = {str(v) for c in NAME_COLUMNS if c in df for v in df[c].dropna()}
    wanted = {ch for name in names for ch in name if ord(ch) > 0x7E}
    if not wanted:
        return
    families = list(matplotlib.rcParams["font.family"])
    covered = _charmap(font_manager.findfont(FontProperties()))
    covered = covered.union(*(_family_charmaps().get(f, frozenset()) for f in families))
    missing = wanted - covered
    while missing:
        family, chars = max(((f, missing & m) for f, m in _family_charmaps().items() if f not in families),
                            key=lambda fc: len(fc[1]), default=(None, set()))
        if not chars:
            break
        families.append(family)
        missing -= chars
    matplotlib.rcParams["font.family"] = families
    if missing and not _said:
        _said.append("".join(sorted(missing)))
        shown = "".join(sorted(missing)[:12]) + ("…" if len(missing) > 12 else "")
        print(f"plots: no installed font has the characters {shown} of some names: the plots draw them as boxes "
              "(report.md and report.html show them); install a font that has them (for Chinese, Japanese, Korean: "
              "Noto Sans CJK) and make the report again", file=sys.stderr)


@functools.cache
def _family_charmaps() -> dict[str, frozenset]:
    """{family: the characters of the font matplotlib draws it with (its regular style)}, Last Resort aside."""
    out = {}
    for family in sorted({entry.name for entry in font_manager.fontManager.ttflist}):
        if family.startswith(LAST_RESORT):
            continue
        try:
            out[family] = _charmap(font_manager.findfont(FontProperties(family=family), fallback_to_default=False))
        except ValueError:  # listed, but not found as a regular style
            continue
    return out


@functools.cache
def _charmap(path: str) -> frozenset:
    try:
        return frozenset(chr(c) for c in FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _short(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def _has_samples(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0


def _column_has_data(column: pd.Series) -> bool:
    if column.dtype == object:
        return column.map(lambda v: _has_samples(v) or (isinstance(v, float) and not math.isnan(v))).any()
    return column.notna().any()


def save_png(fig: Figure, file, dpi: float) -> None:
    """`fig` as a PNG of `dpi` dots per inch, drawn once: `savefig` with a layout engine (every figure here has one)
    draws the figure twice, the first time to place its panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imsave

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    imsave(file, canvas.buffer_rgba(), format="png", dpi=dpi)
