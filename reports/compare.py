"""Compare a candidate run against a baseline run, cell by cell: `loopmark compare BASELINE CANDIDATE`.

Cells match on (workload, variant, device). A cell that was ok in the baseline and is not in the candidate
(error, timeout, oom, diverged, skipped) regresses; otherwise only cells ok in both are compared, and a matched cell
regresses when any gate fails:

- deterministic metrics change at all: syncs_per_step (beyond 1e-9; the sync sites whose count changed are named),
  collectives_per_step of a distributed cell (the same; the loop lines whose collectives changed are named),
  verdict, retains_graph, and ops_per_step when both runs used the same torch version (between two devices, say two
  CPU models, `identical` and `equivalent` are one verdict: both are equal within rounding, and bitwise equality
  rests on the order a device's vector units sum in; a warning says so, and any other change of verdict regresses);
- peak_memory_bytes grows by more than `memory_pct` percent;
- memory_growth_bytes_per_step goes from about zero (<= 1 KiB/step: the CPU heap slope's noise stays
  under it) to a leak (> 4 KiB/step: one step of a retained autograd graph on the smallest workload);
- step time, relative to the run's own baseline, one sample per timed block: the block's median step time
  divided by the median of the block of the kind's baseline variant (`baseline` / `eval_baseline`) timed
  in the same round. Variants are interleaved with their baseline round by round, so whatever slows the
  whole machine between or within runs divides out. A cell regresses when these block ratios are larger
  by a one-sided Mann-Whitney U test (p < alpha) AND the bootstrap 95% CI of the ratio of their medians
  lies entirely above 1 + max_slowdown_pct/100. The test takes the blocks of a run as independent draws;
  single steps are not (steps of one block share the machine's state), and testing them as if they were
  raised false alarms between identical runs on a shared 2-core VM. With alpha = 0.01 each run needs at
  least 5 blocks (`--repeats 5`, the default; `--quick` has 3 and gets no time gate in effect). The
  baseline variant itself is the yardstick and gets no time gate; neither does a cell without block
  medians (a note says so), or any cell when the device or the torch version differs (a warning says so).

`--only-deterministic` applies the status and deterministic gates alone: the gate to use against a
baseline recorded on another machine, where time and memory figures are not comparable.

`loopmark compare` (bench.cli) exits 0 when nothing regressed, 1 when some cell regressed, 2 on unusable input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from reports.markup import code, literal, to_markdown, to_text
from reports.results import TRACE_VARIANT, baseline_of, site_code, site_file
from reports.stats import block_ratios, ratio_with_ci
from reports.table import format_table
from reports.units import human_bytes

SYNCS_TOLERANCE = 1e-9
OPS_TOLERANCE = 1e-9
GROWTH_ZERO_BYTES_PER_STEP = 1024  # at most this: the memory does not grow
GROWTH_LEAK_BYTES_PER_STEP = 4096  # more than this, from about zero: a leak
MIN_TIME_SAMPLES = 3  # fewer raw step times than this in either run: no time gate

Key = tuple[str, str, str]


@dataclass
class CellResult:
    key: Key  # (workload, variant, device)
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    time_ratio: float | None = None  # median(candidate step times) / median(baseline step times)
    time_ci: tuple[float, float] | None = None  # its bootstrap 95% CI
    p_value: float | None = None  # one-sided Mann-Whitney U: candidate slower

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)


@dataclass
class Comparison:
    baseline: str
    candidate: str
    cells: list[CellResult]  # matched cells with status ok in both
    not_compared: list[tuple[Key, str, str]]  # status not ok in one: (key, baseline status, candidate status)
    only_in_baseline: list[Key]
    only_in_candidate: list[Key]
    warnings: list[str]
    max_slowdown_pct: float
    alpha: float
    memory_pct: float

    @property
    def regressions(self) -> list[CellResult]:
        return [c for c in self.cells if c.regressed]

    @property
    def matched(self) -> int:
        return len(self.cells) + len(self.not_compared)


def compare(base_env: dict, base_df: pd.DataFrame, cand_env: dict, cand_df: pd.DataFrame,
            max_slowdown_pct: float = 5.0, alpha: float = 0.01, memory_pct: float = 5.0,
            seed: int = 0, only_deterministic: bool = False) -> Comparison:
    """Compare every cell of the candidate with the same cell of the baseline (see the module docstring)."""
    warnings: list[str] = []
    base, cand = _by_key(base_df, "baseline", warnings), _by_key(cand_df, "candidate", warnings)
    cells, not_compared = [], []
    for key in [k for k in base if k in cand]:
        b, c = base[key], cand[key]
        if b.get("status") == "ok" and c.get("status") != "ok":
            error = f": {literal(c.get('error'))}" if c.get("error") else ""
            cells.append(CellResult(key, regressions=[f"status ok -> {literal(c.get('status'))}{error}"]))
            continue
        if b.get("status") != "ok" or c.get("status") != "ok":
            not_compared.append((key, b.get("status") or "unknown", c.get("status") or "unknown"))
            continue
        b_ref, c_ref = base.get(_reference_key(b, key)), cand.get(_reference_key(c, key))
        cells.append(_compare_cell(key, b, c, base_env, cand_env, max_slowdown_pct, alpha, memory_pct, seed,
                                   warnings, only_deterministic, (b_ref, c_ref)))
    return Comparison(
        baseline=str(base_env.get("source", "baseline")), candidate=str(cand_env.get("source", "candidate")),
        cells=cells, not_compared=not_compared,
        only_in_baseline=[k for k in base if k not in cand],
        only_in_candidate=[k for k in cand if k not in base],
        warnings=list(dict.fromkeys(warnings)), max_slowdown_pct=max_slowdown_pct, alpha=alpha,
        memory_pct=memory_pct)


def time_gate(base_times, cand_times, max_slowdown_pct: float, alpha: float,
              seed: int = 0) -> tuple[float, float, tuple[float, float], bool]:
    """(p, median ratio, its 95% CI, regressed) for raw step times of the baseline and the candidate."""
    base, cand = np.asarray(base_times, dtype=float), np.asarray(cand_times, dtype=float)
    p = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
    ratio, low, high = ratio_with_ci(cand, base, seed=seed)
    return p, ratio, (low, high), p < alpha and low > 1 + max_slowdown_pct / 100


def format_text(c: Comparison) -> str:
    """An aligned plain-text table, regressions first, then the lists and the verdict line (what the results files
    say, their names and messages, without terminal control sequences)."""
    rows = [[to_text(x) for x in (_cell_name(r.key), _result(r), _time(r), _p(r.p_value),
                                  "; ".join(r.regressions + r.notes))] for r in _ordered(c.cells)]
    lines = [f"baseline:  {c.baseline}", f"candidate: {c.candidate}", _thresholds(c)]
    lines += [f"warning: {w}" for w in c.warnings]
    lines += ["", format_table(["cell", "result", "time cand/base [95% CI]", "p", "details"], rows, right=[3])]
    lines += [""] + _lists(c, lambda title, items: [f"{title}:"] + [f"  {item}" for item in items])
    return "\n".join(to_text(line).rstrip() for line in lines + [verdict_line(c)]) + "\n"


def format_md(c: Comparison) -> str:
    """A Markdown table for a PR comment or $GITHUB_STEP_SUMMARY, regressions first, then the verdict line. What the
    results files say (names, messages, paths) is escaped: it is shown, never rendered as HTML, a link or an image."""
    lines = ["### loopmark compare", "",
             to_markdown(f"Baseline {code(c.baseline)}, candidate {code(c.candidate)}. {_thresholds(c)}"), ""]
    lines += [f"> **Warning:** {to_markdown(w)}  " for w in c.warnings] + ([""] if c.warnings else [])
    lines += ["| cell | result | time cand/base [95% CI] | p | details |", "|---|---|---|---|---|"]
    lines += [f"| {to_markdown(_cell_name(r.key), table=True)} | {'**REGRESSION**' if r.regressed else 'ok'} | "
              f"{_time(r)} | {_p(r.p_value)} | {to_markdown('; '.join(r.regressions + r.notes), table=True)} |"
              for r in _ordered(c.cells)]
    lines.append("")
    lines += _lists(c, lambda title, items: [f"**{title}:** " + ", ".join(to_markdown(code(i)) for i in items), ""])
    lines.append(f"**{verdict_line(c)}**")
    return "\n".join(lines) + "\n"


def verdict_line(c: Comparison) -> str:
    n = len(c.regressions)
    line = f"{n} regression{'s' if n != 1 else ''} in {c.matched} matched cells"
    extra = [f"{len(c.not_compared)} not compared: status not ok" if c.not_compared else "",
             f"{len(c.only_in_baseline) + len(c.only_in_candidate)} in one file only"
             if c.only_in_baseline or c.only_in_candidate else ""]
    extra = [e for e in extra if e]
    return line + (f" ({', '.join(extra)})" if extra else "")


# -- one cell ---------------------------------------------------------------------------------------------

def _compare_cell(key, b, c, base_env, cand_env, max_slowdown_pct, alpha, memory_pct, seed,
                  warnings, only_deterministic=False, references=(None, None)) -> CellResult:
    result = CellResult(key)
    base_torch, cand_torch = _torch(b, base_env), _torch(c, cand_env)
    torch_differs = bool(base_torch and cand_torch and base_torch != cand_torch)
    base_device, cand_device = _device_name(b, base_env), _device_name(c, cand_env)
    base_vector, cand_vector = (env.get("cpu_capability") if record.get("device") == "cpu" else None
                                for record, env in ((b, base_env), (c, cand_env)))
    if base_vector and cand_vector and base_vector != cand_vector and base_device == cand_device:
        base_device, cand_device = f"{base_device} ({base_vector})", f"{cand_device} ({cand_vector})"
    device_differs = bool(base_device and cand_device and base_device != cand_device)
    if torch_differs:
        warnings.append(f"torch version differs ({literal(base_torch)} in the baseline, {literal(cand_torch)} in the "
                        "candidate): time gate and ops/step gate skipped")
    if device_differs:
        warnings.append(f"{literal(key[2])} device differs ({literal(base_device)} in the baseline, "
                        f"{literal(cand_device)} in the candidate): time gate skipped")

    steps_differ = _value(b.get("steps")) != _value(c.get("steps"))
    if steps_differ:
        warnings.append(f"steps per block differ ({_show(_value(b.get('steps')))} in the baseline, "
                        f"{_show(_value(c.get('steps')))} in the candidate): per-epoch work spreads over a "
                        "different number of steps, so syncs/step and ops/step are not compared")
    _deterministic(result, b, c, check_ops=not torch_differs, check_counts=not steps_differ,
                   rounding_differs=device_differs)
    if device_differs and {_value(b.get("verdict")), _value(c.get("verdict"))} == ROUNDING_ONLY:
        warnings.append(f"{literal(key[2])} device differs ({literal(base_device)} in the baseline, "
                        f"{literal(cand_device)} in the candidate): identical and equivalent verdicts are not told "
                        "apart (equal within rounding either way; bitwise equality rests on the device's arithmetic)")
    if only_deterministic:
        return result
    _memory(result, b, c, memory_pct)
    if torch_differs or device_differs:
        what = "torch version" if torch_differs else "device"
        result.notes.append(f"time not compared: {what} differs")
        return result
    if key == _reference_key(b, key):
        result.notes.append("time not gated: the baseline variant is the yardstick of the others")
        return result
    if key[1] == TRACE_VARIANT:
        result.notes.append("time not gated: a trace times one block of steps, with no baseline to divide by")
        return result
    base_times, cand_times = _normalised(b, references[0]), _normalised(c, references[1])
    if base_times is None or cand_times is None:
        which = " and ".join(w for w, t in [("baseline", base_times), ("candidate", cand_times)] if t is None)
        result.notes.append(f"time not compared: too few timed blocks (or no baseline blocks) in the {which}")
        return result
    p, ratio, ci, slower = time_gate(base_times, cand_times, max_slowdown_pct, alpha, seed)
    result.p_value, result.time_ratio, result.time_ci = p, ratio, ci
    if slower:
        result.regressions.append(f"slower: median step time x{ratio:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f} "
                                  f"> {1 + max_slowdown_pct / 100:g}, p{_p(p, '=')})")
    return result


# two verdicts that differ only in rounding: bitwise equal to the baseline, or equal to it within rounding
ROUNDING_ONLY = {"identical", "equivalent"}


def _deterministic(result: CellResult, b: dict, c: dict, check_ops: bool, check_counts: bool = True,
                   rounding_differs: bool = False) -> None:
    metrics = [("verdict", "verdict", None), ("retains_graph", "retains_graph", None)]
    if check_counts:
        metrics.insert(0, ("syncs_per_step", "syncs/step", SYNCS_TOLERANCE))
        metrics.insert(1, ("collectives_per_step", "collectives/step", SYNCS_TOLERANCE))
    if check_ops and check_counts:
        metrics.append(("ops_per_step", "ops/step", OPS_TOLERANCE))
    for column, name, tolerance in metrics:
        old, new = _value(b.get(column)), _value(c.get(column))
        if old is None and new is None:
            continue
        if old is None or new is None:
            result.notes.append(f"{name} missing in the {'baseline' if old is None else 'candidate'}")
            continue
        changed = abs(float(old) - float(new)) > tolerance if tolerance is not None else old != new
        if changed and column == "verdict" and rounding_differs and {old, new} == ROUNDING_ONLY:
            result.notes.append(f"verdict {old} -> {new}: the same within rounding on another device")
            continue
        if changed:
            where = (_sync_site_changes(b, c) if column == "syncs_per_step" else
                     _collective_site_changes(b, c) if column == "collectives_per_step" else "")
            result.regressions.append(f"{name} changed: {_show(old)} -> {_show(new)}"
                                      + (f" ({where})" if where else ""))


MAX_SITES_SHOWN = 5


def _sync_site_changes(b: dict, c: dict) -> str:
    """Where syncs/step changed, from the cells' `sync_sites` ({file:line: syncs over the sync pass's `steps`}): the
    sites whose syncs per step went up first, then those that went down or are gone. Sites are paired by `_pair_sites`:
    a line that only moved (a line added above it) is recognised by its code, so it is not reported, and the line
    added is."""
    base, cand = _sites_per_step(b), _sites_per_step(c)
    if base is None or cand is None:
        return ""
    pairs = _pair_sites(base, cand)
    changes = []
    for site, (n, line) in cand.items():
        old = base[pairs[site]][0] if site in pairs else 0.0
        if abs(n - old) > SYNCS_TOLERANCE:
            changes.append((old - n, f"{n - old:+g}/step at {literal(site)}" + (f" {code(line)}" if line else "")))
    paired = set(pairs.values())
    changes += [(n, f"{-n:+g}/step at {literal(site)} (gone)") for site, (n, _) in base.items() if site not in paired]
    shown = [text for _, text in sorted(changes, key=lambda change: change[0])]
    return ", ".join(shown[:MAX_SITES_SHOWN]) + (f", {len(shown) - MAX_SITES_SHOWN} more" if len(shown) >
                                                 MAX_SITES_SHOWN else "")


def _pair_sites(base: dict[str, tuple[float, str]], cand: dict[str, tuple[float, str]]) -> dict[str, str]:
    """{candidate site: baseline site} for the sites that are the same line of code. Where both know a site's code,
    the same code in the same file is the same line, wherever it now stands; of several lines with one code, the
    nearest ones pair first (then the earlier). A line whose code is known on one side only is paired by its place
    (file:line); a line with different code at the same place is a different line: the one added, or the one gone."""
    def line(site: str) -> int:
        number = site.rpartition(":")[2]
        return int(number) if number.isdigit() else 0

    known = [(abs(line(s) - line(t)), line(s), s, t) for s, (_, new) in cand.items() for t, (_, old) in base.items()
             if new and new == old and site_file(s) == site_file(t)]
    pairs: dict[str, str] = {}
    for _, _, site, old_site in sorted(known):
        if site not in pairs and old_site not in pairs.values():
            pairs[site] = old_site
    for site, (_, new) in cand.items():
        if site not in pairs and site in base and site not in pairs.values() and not (new and base[site][1]):
            pairs[site] = site
    return pairs


def _collective_site_changes(b: dict, c: dict) -> str:
    """Where collectives/step changed, from the cells' `collective_sites` ({file:line: collectives per step})."""
    base, cand = b.get("collective_sites"), c.get("collective_sites")
    if not isinstance(base, dict) or not isinstance(cand, dict):
        return ""
    changes = [(float(base.get(s, 0.0)) - float(n), f"{float(n) - float(base.get(s, 0.0)):+g}/step at {literal(s)}")
               for s, n in cand.items() if abs(float(n) - float(base.get(s, 0.0))) > SYNCS_TOLERANCE]
    changes += [(float(n), f"{-float(n):+g}/step at {literal(s)} (gone)") for s, n in base.items() if s not in cand]
    return ", ".join(text for _, text in sorted(changes)[:MAX_SITES_SHOWN])


def _sites_per_step(record: dict) -> dict[str, tuple[float, str]] | None:
    """{site: (syncs per step, code or "")} of a cell, None when it has no sites or no steps."""
    sites, steps = record.get("sync_sites"), _value(record.get("steps"))
    if not isinstance(sites, dict) or not steps:
        return None
    details = record.get("sync_site_details")
    code = {d.get("site"): site_code(d) for d in details if isinstance(d, dict)} if isinstance(details, list) else {}
    return {str(site): (float(n) / float(steps), code.get(site, "")) for site, n in sites.items()}


def _memory(result: CellResult, b: dict, c: dict, memory_pct: float) -> None:
    old, new = _value(b.get("peak_memory_bytes")), _value(c.get("peak_memory_bytes"))
    if old is not None and new is not None and old > 0 and new > old * (1 + memory_pct / 100):
        result.regressions.append(f"peak memory +{(new / old - 1) * 100:.1f}% ({human_bytes(old)} -> "
                                  f"{human_bytes(new)})")
    old, new = _value(b.get("memory_growth_bytes_per_step")), _value(c.get("memory_growth_bytes_per_step"))
    if old is None or new is None:
        return
    if old <= GROWTH_ZERO_BYTES_PER_STEP and new > GROWTH_LEAK_BYTES_PER_STEP:
        result.regressions.append(f"memory now grows: {human_bytes(old)}/step -> {human_bytes(new)}/step")


# -- helpers ----------------------------------------------------------------------------------------------

def _by_key(df: pd.DataFrame, which: str, warnings: list[str]) -> dict[Key, dict]:
    cells: dict[Key, dict] = {}
    for record in df.to_dict("records"):
        key = (record["workload"], record["variant"], record["device"])
        if key in cells:
            warnings.append(f"{_cell_name(key)} appears more than once in the {which}: the last one is used")
        cells[key] = record
    return cells


def _torch(record: dict, env: dict) -> str | None:
    return record.get("torch_version") or env.get("torch") or None


def _device_name(record: dict, env: dict) -> str | None:
    if record.get("device_name"):
        return record["device_name"]
    gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
    return (gpu.get("name") if record["device"] == "cuda" else env.get("cpu_model")) or None


def _reference_key(record: dict, key: Key) -> Key:
    reference = record.get("baseline_variant") or baseline_of(record.get("kind"))  # frames built by hand
    return (key[0], reference, key[2])


def _normalised(record: dict, reference: dict | None) -> np.ndarray | None:
    """One sample per timed block: its median step time over the median of the reference's block of the
    same round (None if unavailable)."""
    blocks = _samples(record.get("block_medians_s"))
    reference_blocks = _samples((reference or {}).get("block_medians_s"))
    if blocks is None or reference_blocks is None:
        return None
    return block_ratios(blocks, reference_blocks)  # the report's estimator too (reports.results.derive)


def _samples(v, minimum: int = MIN_TIME_SAMPLES) -> np.ndarray | None:
    """Finite raw step times, or None when there are too few to test."""
    if not isinstance(v, (list, tuple, np.ndarray)):
        return None
    try:
        x = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        return None
    x = x[np.isfinite(x)] if x.ndim == 1 else np.array([])
    return x if len(x) >= minimum else None


def _value(v):
    """None for null/NaN, else the value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _show(v) -> str:
    if isinstance(v, float) and not isinstance(v, bool):
        return f"{v:g}"
    return str(v)


def _ordered(cells: list[CellResult]) -> list[CellResult]:
    return sorted(cells, key=lambda r: not r.regressed)


def _cell_name(key: Key) -> str:
    return literal("/".join(key))


def _result(r: CellResult) -> str:
    return "REGRESSION" if r.regressed else "ok"


def _time(r: CellResult) -> str:
    if r.time_ratio is None:
        return "-"
    return f"{r.time_ratio:.3f}x [{r.time_ci[0]:.3f}, {r.time_ci[1]:.3f}]"


def _p(p: float | None, equals: str = "") -> str:
    if p is None:
        return "-"
    return "<1e-6" if p < 1e-6 else f"{equals}{p:.2g}"


def _thresholds(c: Comparison) -> str:
    return (f"Time regression: Mann-Whitney p < {c.alpha:g} and 95% CI of the median ratio above "
            f"{1 + c.max_slowdown_pct / 100:g}; peak memory regression: > +{c.memory_pct:g}%.")


def _lists(c: Comparison, render) -> list[str]:
    lines: list[str] = []
    if c.not_compared:
        lines += render("not compared (status not ok)",
                        [f"{_cell_name(k)} (baseline {literal(b)}, candidate {literal(s)})"
                         for k, b, s in c.not_compared])
    if c.only_in_baseline:
        lines += render("only in the baseline", [_cell_name(k) for k in c.only_in_baseline])
    if c.only_in_candidate:
        lines += render("only in the candidate", [_cell_name(k) for k in c.only_in_candidate])
    return lines

