"""The report's answers, generated from the records: what each idiom costs on the devices measured, whether its
variants are correct, where their syncs are, what their memory growth means. No figure here is written by hand:
every number comes from a cell of the results (or of a committed GPU reference run), every threshold from
`reports.stats` but `RANK_SPREAD`, how far apart the ranks of a distributed cell may measure and still agree.

`findings(df, reference)` gives blocks for `reports.report` (see its `document`); the formatting helpers below
are the report tables' too, so a figure reads the same in the findings and in the tables.
"""

from __future__ import annotations

import math
import statistics

import pandas as pd

from reports import stats
from reports.load import by_workload_device, in_display_order, is_baseline
from reports.markup import code
from reports.results import site_code
from reports.units import human_bytes

# what a sync operation is, in the words of a loop's author (the sync pass's operation names, bench/syncs.py)
OPERATIONS = {
    "aten::_local_scalar_dense": "scalar read-back",
    "aten::item": "scalar read-back",
    "aten::is_nonzero": "truth test of a device tensor",
    "Tensor.tolist": "tolist() read-back",
    "Tensor.numpy": ".numpy() read-back",
    "torch.tensor(device tensors)": "torch.tensor(device tensors): a read-back each",
    "device-to-host copy": "blocking device-to-host copy",
    "blocking host-to-device copy": "blocking host-to-device copy",
    "device synchronize": "explicit synchronize()",
}
RATIO_WORDS = "step time / baseline's, below 1 is faster"
TABLE = ["variant", "correct?", "syncs/step: where", f"cost ({RATIO_WORDS}) [95% CI]", "memory growth/step ± 95% CI"]
SEED_IDIOMS = ("baseline", "loss tracking", "zero_grad placement", "zeroing style", "evaluation")
# a distributed idiom's table has this column after the syncs: what its ranks send each other, and from where
COLLECTIVES_HEADER = "collectives/step: bytes sent, where"
# the c10d operation names a distributed cell's `collective_ops` holds (bench/distributed.py), in a reader's words
COLLECTIVES = {
    "allreduce_": "all-reduce", "allreduce_coalesced_": "coalesced all-reduce", "broadcast_": "broadcast",
    "allgather_": "all-gather", "_allgather_base_": "all-gather", "allgather_coalesced_": "coalesced all-gather",
    "allgather_into_tensor_coalesced_": "coalesced all-gather", "reduce_scatter_": "reduce-scatter",
    "_reduce_scatter_base_": "reduce-scatter", "reduce_scatter_tensor_coalesced_": "coalesced reduce-scatter",
    "reduce_": "reduce", "gather_": "gather", "scatter_": "scatter", "alltoall_": "all-to-all",
    "alltoall_base_": "all-to-all", "barrier": "barrier", "send": "send", "recv_": "receive",
}
# ranks agree when their counts (syncs, collectives, bytes sent) are equal and their peak memory and median step time
# lie within this fraction of each other: timed side by side, ranks differ by their scheduling, not by their loop
RANK_SPREAD = 0.10


def findings(df: pd.DataFrame, reference: pd.DataFrame | None = None, reference_name: str | None = None,
             reference_source: str | None = None) -> list[tuple]:
    """Blocks: what this run's devices can show, then one heading, paragraph and list of variants per idiom."""
    if df.empty:
        return []
    blocks: list[tuple] = [("h2", "Findings")]
    blocks += device_note(df, reference, reference_name, reference_source)
    for idiom, cells in _idioms(df):
        blocks.append(("h3", _idiom_title(idiom, cells)))
        blocks.append(("p", idiom_paragraph(idiom, cells, df, reference, reference_name)))
        collectives = is_distributed(cells)
        rows = [variant_row(variant, vcells, reference, reference_name, collectives=collectives)
                for variant, vcells in _variants(cells)]
        classes = ["broken" if (vcells["verdict"] == "broken").any() else "" for _, vcells in _variants(cells)]
        header = [*TABLE[:3], COLLECTIVES_HEADER, *TABLE[3:]] if collectives else TABLE
        blocks.append(("table", header, rows, classes, set(), "findings distributed" if collectives else "findings"))
    return blocks


# -- what the devices can show -------------------------------------------------------------------------------

def device_note(df: pd.DataFrame, reference, reference_name, reference_source) -> list[tuple]:
    devices = set(df["device"])
    if "cuda" in devices:
        gpu = _device_name(df[df["device"] == "cuda"]) or "a GPU"
        text = (f"**Devices.** This run measured CUDA ({gpu})" + (" and CPU" if "cpu" in devices else "") + ". "
                "Sync counts and verdicts are exact on both. On CUDA a sync stalls the host until the queued kernels "
                "have run, so its cost is in the CUDA ratios; on a CPU the host never waits for a device and a sync "
                "costs nothing measurable.")
        return [("p", text)]
    text = ("**What a CPU can and cannot show.** This run measured a CPU only. Sync counts are exact (the sync pass "
            "counts, on a stand-in device, what the same loop does on CUDA), and so are verdicts (every step's "
            "gradient against its batch's) and memory growth. What a CPU cannot show is the time a sync costs: the "
            "host never waits for a device, so the ratios below are the cost of the loop's own CPU work. On a GPU "
            "each sync stalls the host until the queued kernels have run, most costly where steps are short.")
    if reference is not None and len(reference):
        text += (f" GPU reference results ({reference_name}, committed in {code(reference_source)}, not this run) are "
                 "shown beside the CPU ones: there the sync cost is in the ratios.")
    else:
        text += (" No GPU reference results are committed under `results/reference/`: run `loopmark run --device "
                 "cuda` on a GPU (or `.ci/gpu-reference`) to see the sync cost.")
    return [("p", text)]


# -- one idiom --------------------------------------------------------------------------------------------------

def idiom_paragraph(idiom: str, cells: pd.DataFrame, df: pd.DataFrame, reference=None,
                    reference_name=None) -> str:
    ok = cells[cells["status"] == "ok"]
    kind = _first(cells["kind"]) or "train"
    base_name = _first(cells["baseline_variant"]) or ("eval_baseline" if kind == "eval" else "baseline")
    where = _where(cells)
    if ok.empty:
        return f"No cell of this idiom finished ok ({where}); see the summary for why."
    if idiom == "baseline":
        return _baseline_paragraph(ok, where)
    names = list(dict.fromkeys(cells["variant"]))
    others = [n for n in names if n != base_name]
    ranks = _ranks(ok)
    parts = [f"Measured: {_count(len(others), 'variant')} against {code(base_name)} on {where}"
             + (f", {ranks} ranks each." if ranks else ".")]
    parts.append(_sync_sentence(ok, df, base_name, reference, reference_name))
    parts += _collective_sentences(ok, base_name)
    parts.append(_rank_sentence(ok))
    parts.append(_correctness_sentence(cells))
    parts += _fastest_sentences(cells, df, base_name)
    parts.append(_memory_sentence(ok))
    return " ".join(p for p in parts if p)


def _baseline_paragraph(ok: pd.DataFrame, where: str) -> str:
    parts = [f"The seed's loop, the yardstick of every other training variant (measured on {where})."]
    costs = []
    for (workload, device), cells in by_workload_device(ok):
        c = cells.iloc[0]
        if _finite(c["step_time_median_s"]):
            costs.append(f"{workload}/{device} {_ms(c['step_time_median_s'])} per step "
                         f"({_rate(c['samples_per_s'])} samples/s)")
    if costs:
        parts.append("It takes " + "; ".join(costs) + ".")
    return " ".join(p for p in parts if p)


def _sync_sentence(ok: pd.DataFrame, df: pd.DataFrame, base_name: str, reference, reference_name) -> str:
    counts = {v: float(c) for v, c in zip(ok["variant"], ok["syncs_per_step"]) if _finite(c)}
    base = df[(df["variant"] == base_name) & (df["status"] == "ok")]
    base_syncs = next((float(x) for x in base["syncs_per_step"] if _finite(x)), None)
    if not counts:
        return ""
    low, high = min(counts.values()), max(counts.values())
    devices = set(ok["device"])
    if low == high:
        text = f"Every variant syncs {_per_step(low)} per step"
        text += f", as {code(base_name)} does." if base_syncs in (None, low) \
            else f"; {code(base_name)} {_per_step(base_syncs)}."
    else:
        fewest = [v for v, c in counts.items() if c == low]
        most = [v for v, c in counts.items() if c == high]
        text = (f"Syncs per step range from {_per_step(low)} ({_names(fewest)}) to {_per_step(high)} "
                f"({_names(most)})" + (f"; {code(base_name)} has {_per_step(base_syncs)}." if base_syncs is not None
                                       and base_name not in counts else "."))
    if low == high and base_syncs in (None, low):  # no difference in syncs to cost anything
        return text
    if "cuda" in devices:
        return text + " On CUDA each sync stalls the host until the queued kernels have run: its cost is in the " \
                      "CUDA ratios below."
    spread = _ratio_spread(ok)
    text += (" On this CPU that costs nothing measurable (the host never waits for a device"
             + (f"; ratios {spread}" if spread else "") + "); on a GPU each sync stalls the host")
    if reference is not None and len(reference) and set(ok["variant"]) & set(reference["variant"]):
        return text + f": see the GPU reference ({reference_name}) in the cost column."
    return text + ": run with `--device cuda` to measure it."


def _collective_sentences(ok: pd.DataFrame, base_name: str) -> list[str]:
    """Per workload and device, the collectives per step of the baseline and of the variants that issue more or
    fewer, or send more or fewer bytes: what each idiom adds to the traffic between the ranks."""
    out = []
    groups = [(key, group) for key, group in by_workload_device(ok) if group["collectives_per_step"].map(_finite).any()]
    for (workload, device), group in groups:
        counted = [c for _, c in group.iterrows() if _finite(c["collectives_per_step"])]
        where = f" on {workload}/{device}" if len(groups) > 1 else ""
        base = next((c for c in counted if c["variant"] == base_name), None)
        if base is None:
            low = min(counted, key=lambda c: c["collectives_per_step"])
            high = max(counted, key=lambda c: c["collectives_per_step"])
            out.append(f"Collectives per step{where} range from {_collectives_short(low)} ({code(low['variant'])}) to "
                       f"{_collectives_short(high)} ({code(high['variant'])}).")
            continue
        key = (base["collectives_per_step"], _or_zero(base["comm_bytes_per_step"]))
        more = [c for c in counted if (c["collectives_per_step"], _or_zero(c["comm_bytes_per_step"])) > key]
        fewer = [c for c in counted if (c["collectives_per_step"], _or_zero(c["comm_bytes_per_step"])) < key]
        n, sent = base["collectives_per_step"], base["comm_bytes_per_step"]
        text = (f"Each rank of {code(base_name)} issues {_per_step(n)} collective{'' if n == 1 else 's'} per "
                f"step{where}"
                + (f", sending {human_bytes(sent)}" if _finite(sent) else ""))
        if more:
            text += "; more in " + ", ".join(f"{code(c['variant'])} ({_collectives_short(c)})" for c in more)
        if fewer:
            text += ("," if more else ";") + " fewer in " + ", ".join(
                f"{code(c['variant'])} ({_collectives_short(c)})" for c in fewer)
        if (more or fewer) and len(counted) > len(more) + len(fewer) + 1:
            text += "; the others as many"
        out.append(text + ".")
    return out


def _collectives_short(cell) -> str:
    """`2 collectives, 300.0 KiB sent`: a cell's collectives per step and the bytes a rank sends in them."""
    n, sent = cell["collectives_per_step"], cell.get("comm_bytes_per_step")
    return f"{_per_step(n)} collective{'' if n == 1 else 's'}" + (f", {human_bytes(sent)} sent" if _finite(sent)
                                                                  else "")


def _rank_sentence(ok: pd.DataFrame) -> str:
    """Whether the ranks of the idiom's distributed cells agree, naming those whose ranks differ and in what."""
    measured = [c for _, c in ok.iterrows() if len(rank_figures(c)) > 1]
    if not measured:
        return ""
    differ = [(c, rank_differences(c)) for c in measured]
    differ = [(c, d) for c, d in differ if d]
    ranks = "/".join(map(str, sorted({len(rank_figures(c)) for c in measured})))
    if not differ:
        return (f"The {ranks} ranks agree in every cell: equal syncs, collectives and bytes sent per step, peak memory "
                f"and median step time within {RANK_SPREAD:.0%} of each other.")
    one_place = len(set(zip(ok["workload"], ok["device"]))) == 1
    items = [code(c['variant']) + ("" if one_place else f" on {c['workload']}/{c['device']}") + f": {', '.join(d)}"
             for c, d in differ]
    agree = len(measured) - len(differ)
    rest = f"; they agree in the other {_count(agree, 'cell')}" if agree else ""
    return f"The ranks differ in {'; '.join(items)}{rest}. Each rank's figures are under the tables below."


def _correctness_sentence(cells: pd.DataFrame) -> str:
    broken = cells[cells["verdict"] == "broken"]
    different = cells[cells["verdict"] == "different"]
    parts = []
    if len(broken):
        items = [f"{code(v)}: {_reason(c)}" for v, c in _first_per_variant(broken)]
        parts.append("**Broken** (wrong results, however fast): " + "; ".join(items) + ".")
    else:
        parts.append("No variant of it is broken.")
    if len(different):
        items = [f"{code(v)} on {_where(c)} ({_reason(c.iloc[0])})"
                 for v, c in different.groupby("variant", sort=False)]
        parts.append("A different result, not wrong: " + "; ".join(items) + ".")
    unverified = cells[cells["verdict"] == "unverified"]
    if len(unverified):
        parts.append("Unverified: " + ", ".join(code(v) for v in dict.fromkeys(unverified["variant"])) + ".")
    return " ".join(parts)


def _fastest_sentences(cells: pd.DataFrame, df: pd.DataFrame, base_name: str) -> list[str]:
    out, unreliable = [], 0
    for (workload, device), group in by_workload_device(cells):
        timed = group[(group["status"] == "ok") & group["ratio_to_baseline"].map(_finite)
                      & (group["variant"] != base_name)]
        if timed.empty:
            continue
        reliable = timed[~timed["reliability"].map(_unreliable)]
        unreliable += len(timed) - len(reliable)
        correct = reliable[reliable["verdict"] != "broken"]
        faster = correct[correct["ratio_ci_high"].map(_finite) & (correct["ratio_ci_high"] < 1)]
        where = f"{workload}/{device}"
        if len(faster):
            best = faster.loc[faster["ratio_to_baseline"].idxmin()]
            out.append(f"Fastest correct on {where}: {code(best['variant'])}, {ratio_text(best)} of "
                       f"{code(base_name)}'s step time.")
        elif len(correct):
            out.append(f"On {where} no correct variant is measurably faster than {code(base_name)} (every 95 % "
                       "interval reaches 1 or lies above it).")
        elif len(timed):
            out.append(f"On {where} no correct variant has a reliable timing.")
        slower = correct[correct["ratio_ci_low"].map(_finite) & (correct["ratio_ci_low"] > 1)]
        if len(slower):
            out.append(f"Measurably slower on {where}: " + ", ".join(
                f"{code(c['variant'])} {ratio_text(c)}" for _, c in slower.iterrows()) + ".")
        broken_fast = reliable[(reliable["verdict"] == "broken") & reliable["ratio_ci_high"].map(_finite)
                               & (reliable["ratio_ci_high"] < 1)]
        for _, c in broken_fast.iterrows():
            out.append(f"{code(c['variant'])} looks faster on {where} ({ratio_text(c)}), but it is broken.")
    if unreliable:
        verb = "is" if unreliable == 1 else "are"
        out.append(f"{_count(unreliable, 'timing')} of this idiom marked unreliable (interference during the timed "
                   f"blocks, or not timed in rounds with the baseline; reasons under the tables) {verb} left out of "
                   "these comparisons.")
    return out


def _memory_sentence(ok: pd.DataFrame) -> str:
    leaks, grows, flat = [], [], []
    for variant, cells in ok.groupby("variant", sort=False):
        classes = set(cells["memory_growth_class"].dropna())
        where = [f"{_bytes_per_step(c)} on {c['workload']}/{c['device']}" for _, c in cells.iterrows()
                 if c["memory_growth_class"] in ("leak", "grows")]
        if "leak" in classes:
            leaks.append(f"{code(variant)} ({', '.join(where)})")
        elif "grows" in classes:
            grows.append(f"{code(variant)} ({', '.join(where)})")
        elif classes:
            flat.append(variant)
    threshold = f"{human_bytes(stats.LEAK_BYTES_PER_STEP)}/step"
    parts = []
    if leaks:
        parts.append("**Memory leak**: " + "; ".join(leaks) + f": growth above the {threshold} threshold, its 95 % "
                     "interval above 0.")
    if grows:
        parts.append("Memory grows, significantly but under the leak threshold, in " + "; ".join(grows) + ".")
    if flat:
        parts.append(("The others:" if leaks or grows else "Memory:")
                     + " no growth (each 95 % interval includes 0, or the slope is a few bytes a step).")
    return " ".join(parts)


def _bytes_per_step(cell) -> str:
    slope = cell["memory_growth_bytes_per_step"]
    return ("+" if slope > 0 else "") + human_bytes(slope) + "/step" if _finite(slope) else "–"


# -- one variant ----------------------------------------------------------------------------------------------

def variant_row(variant: str, cells: pd.DataFrame, reference=None, reference_name=None,
                collectives: bool = False) -> list[str]:
    """[variant, correct?, syncs/step: where, cost, memory growth] of one variant over its workloads and devices;
    several cells of a column are separated by a line break (in Markdown: `; `). `collectives`: with
    `COLLECTIVES_HEADER`'s column after the syncs (a distributed idiom's table)."""
    first = cells.iloc[0]
    broken = (cells["verdict"] == "broken").any()
    name = f"**{variant}**" if broken else code(variant)
    description = first.get("description")
    if isinstance(description, str) and description:
        name += f"\n{description}"
    ok = cells[cells["status"] == "ok"]
    if ok.empty:
        statuses = "\n".join(f"{c['workload']}/{c['device']}: {c['status']}" + (
            f" ({c['error']})" if isinstance(c.get("error"), str) and c["error"] else "") for _, c in cells.iterrows())
        return [name, statuses, "–", *(["–"] if collectives else []), "–", "–"]
    correct = _verdicts(ok)
    syncs = sync_summary(ok.iloc[0], short=True)
    if is_baseline(first):
        costs = [f"{c['workload']}/{c['device']}: {_ms(c['step_time_median_s'])}/step (the yardstick)"
                 for _, c in ok.iterrows() if _finite(c["step_time_median_s"])]
    else:
        costs = [f"{c['workload']}/{c['device']}: {ratio_text(c)}" for _, c in ok.iterrows()
                 if _finite(c["ratio_to_baseline"])]
        if reference is not None and len(reference):
            for _, r in reference[(reference["variant"] == variant) & (reference["status"] == "ok")].iterrows():
                if _finite(r["ratio_to_baseline"]):
                    gpu = r["device_name"] if isinstance(r.get("device_name"), str) and r["device_name"] \
                        else reference_name
                    costs.append(f"{r['workload']}/cuda, GPU reference ({gpu}): {ratio_text(r)}")
    memory = [f"{c['workload']}/{c['device']}: {growth_text(c)}" for _, c in ok.iterrows()
              if _finite(c["memory_growth_bytes_per_step"])]
    others = cells[cells["status"] != "ok"]
    if len(others):
        correct += "\nnot measured on " + ", ".join(f"{c['workload']}/{c['device']} ({c['status']})"
                                                    for _, c in others.iterrows())
    sent = ["\n".join(_prefixed(c, collective_summary(c), len(ok))) for _, c in ok.iterrows()] if collectives else []
    return [name, correct, syncs, *(["\n".join(sent)] if collectives else []), "\n".join(costs) or "–",
            "\n".join(memory) or "–"]


# what `identical` and `equivalent` always mean (docs/check.md): the row says the word, the reason is in the table
SHORT_VERDICTS = {"identical": "identical (bitwise)", "equivalent": "equivalent (within rounding)"}


def _verdicts(ok: pd.DataFrame) -> str:
    by_verdict: dict[str, list] = {}
    for _, c in ok.iterrows():
        by_verdict.setdefault(c["verdict"] or "not checked", []).append(c)
    texts = []
    for verdict, cs in by_verdict.items():
        places = ", ".join(f"{c['workload']}/{c['device']}" for c in cs)
        where = "" if len(by_verdict) == 1 else f" on {places}"
        expected = cs[0].get("verdict_as_expected")
        mismatch = f" (expected {cs[0]['expected_verdict']}: **MISMATCH**)" if expected is False else ""
        if verdict in SHORT_VERDICTS and not mismatch:
            texts.append(SHORT_VERDICTS[verdict] + where)
            continue
        word = "**broken**" if verdict == "broken" else verdict
        reason = _reason(cs[0])
        texts.append(f"{word}{where}{mismatch}" + (f": {reason}" if reason else ""))
    return "\n".join(texts)


# -- shared formatting ------------------------------------------------------------------------------------------

def ratio_text(cell) -> str:
    """`0.99x [0.97, 1.01]`; an unreliable cell's interval is not given (`1.13x, unreliable`)."""
    ratio = cell["ratio_to_baseline"]
    if not _finite(ratio):
        return "–"
    if is_baseline(cell):
        return "1 (baseline)"
    if _unreliable(cell.get("reliability")):
        return f"{ratio:.2f}x, unreliable"
    low, high = cell["ratio_ci_low"], cell["ratio_ci_high"]
    if not (_finite(low) and _finite(high)):
        return f"{ratio:.2f}x"
    # a bound that two decimals would show as 1.00 while it is not 1 (whether 1 is inside is what a reader looks for)
    digits = 3 if any(b != 1 and round(b, 2) == 1 for b in (low, high)) else 2
    return f"{ratio:.{digits}f}x [{low:.{digits}f}, {high:.{digits}f}]"


def growth_text(cell) -> str:
    """Memory growth per step with its 95 % interval and what it means: `+7.0 KiB ± 327 B/step: leak`,
    `0 B ± 2 B/step: no growth` (`stats.growth_class`). A slope under half a byte a step is printed as 0
    (floating-point noise of the fit)."""
    slope, se = cell["memory_growth_bytes_per_step"], cell.get("memory_growth_se_bytes_per_step")
    if not _finite(slope):
        return "–"
    trace = cell.get("memory_trace_bytes")
    n = len(trace) - 1 if isinstance(trace, list) and len(trace) > 3 else None
    low, high = stats.growth_interval(slope, se, n) if _finite(se) else (math.nan, math.nan)
    text = "0 B" if abs(slope) < 0.5 else ("+" if slope > 0 else "") + human_bytes(slope)
    if _finite(low):
        half = (high - low) / 2
        text += f" ± {human_bytes(half) if half >= 0.5 else '0 B'}"
    meaning = {"leak": "**leak**", "grows": "grows (under the leak threshold)", "none": "no growth"}
    cls = cell.get("memory_growth_class")
    return f"{text}/step" + (f": {meaning[cls]}" if cls in meaning else "")


def sync_summary(cell, short: bool = False) -> str:
    """`1/step: 1 per step at loops/canonical.py:172 (`train_loss += loss.item()`, scalar read-back)`, every site,
    with the framework setting behind it where one is known; `short`: one line per site, the code only."""
    syncs = cell["syncs_per_step"]
    if not _finite(syncs):
        return "not counted"
    if syncs == 0:
        return "0: none"
    sites = sync_sites(cell)
    if not sites:
        return f"{_per_step(syncs)}"
    if short:
        texts = [f"{s['when']}: {code(s['site'])}" + (f" {code(s['code'])}" if s["code"] else "")
                 + (f" ({s['operation']})" if s["operation"] else "") + _behind(s) for s in sites]
        return "\n".join(texts) if len(sites) == 1 else f"{_per_step(syncs)}/step:\n" + "\n".join(texts)
    texts = [f"{s['when']} at {code(s['site'])}" + (f" ({code(s['code'])}"
                                                    + (f", {s['operation']})" if s["operation"] else ")")
                                                  if s["code"] else f" ({s['operation']})" if s["operation"] else "")
             + _behind(s) for s in sites]
    return f"{_per_step(syncs)}/step: " + "; ".join(texts)


def _behind(site: dict) -> str:
    """The framework setting behind a site, as its sentence ends; "" where none is known."""
    return f", behind it {site['setting']}" if site.get("setting") else ""


def collective_summary(cell) -> str:
    """`1/step (all-reduce), 300.0 KiB sent`, then one line per loop line that issues them (`1 per step:
    `loops/canonical.py:173``): the c10d collectives one rank issues per optimizer step (the worst rank's), the bytes
    it sends in them, and where the loop calls them."""
    n = cell.get("collectives_per_step")
    if not _finite(n):
        return "not counted"
    if n == 0:
        return "0: none"
    raw, ops = cell.get("collective_ops"), {}
    for op, count in raw.items() if isinstance(raw, dict) else ():
        ops[COLLECTIVES.get(op, op)] = ops.get(COLLECTIVES.get(op, op), 0) + count
    kinds = ", ".join(op if len(ops) == 1 else f"{op} ×{_per_step(count)}" for op, count in ops.items())
    sent = cell.get("comm_bytes_per_step")
    lines = [f"{_per_step(n)}/step" + (f" ({kinds})" if kinds else "")
             + (f", {human_bytes(sent)} sent" if _finite(sent) else "")]
    sites = cell.get("collective_sites")
    steps = cell.get("steps")
    for site, per_step in sorted(sites.items(), key=lambda kv: (-kv[1], kv[0])) if isinstance(sites, dict) else ():
        count = per_step * steps if _finite(per_step) and _finite(steps) else None
        whole = count if _finite(count) and abs(count - round(count)) < 1e-6 else None
        lines.append(f"{_when(whole, per_step, steps)}: {code(site)}")
    return "\n".join(lines)


def rank_figures(cell) -> list[dict]:
    """Each rank's own figures of a distributed cell, in rank order: `syncs`, `collectives`, `sent` (per step),
    `peak` (bytes) and `median_s` (the median over timed blocks of the rank's block median step time); None where a
    rank's is missing, [] for a cell without per-rank figures (not distributed, or results written before them)."""
    fields = {"syncs": "rank_syncs_per_step", "collectives": "rank_collectives_per_step",
              "sent": "rank_comm_bytes_per_step", "peak": "rank_peak_memory_bytes"}
    lists = {key: cell.get(name) for key, name in fields.items()}
    lists = {key: value if isinstance(value, list) else [] for key, value in lists.items()}
    blocks = cell.get("rank_block_medians_s")
    blocks = [b for b in blocks if isinstance(b, list)] if isinstance(blocks, list) else []
    n = max([len(v) for v in lists.values()] + [len(b) for b in blocks], default=0)
    out = []
    for rank in range(n):
        figures = {key: (value[rank] if rank < len(value) and _finite(value[rank]) else None)
                   for key, value in lists.items()}
        times = [b[rank] for b in blocks if rank < len(b) and _finite(b[rank])]
        out.append({"rank": rank, **figures, "median_s": statistics.median(times) if times else None})
    return out


def rank_differences(cell) -> list[str]:
    """What the ranks of a distributed cell differ in (`syncs/step`, `median step time (18% apart)`); [] where they
    agree: equal counts, peak memory and median step time within `RANK_SPREAD` of each other."""
    ranks = rank_figures(cell)
    out = []
    for key, words in (("syncs", "syncs/step"), ("collectives", "collectives/step"), ("sent", "bytes sent/step")):
        if len({r[key] for r in ranks if r[key] is not None}) > 1:
            out.append(words)
    for key, words in (("peak", "peak memory"), ("median_s", "median step time")):
        values = [r[key] for r in ranks if r[key] is not None and r[key] > 0]
        if len(values) > 1 and max(values) / min(values) - 1 > RANK_SPREAD:
            out.append(f"{words} ({max(values) / min(values) - 1:.0%} apart)")
    return out


def is_distributed(cells: pd.DataFrame) -> bool:
    """Whether any of `cells` is a distributed one (kind `ddp`, or its collectives counted)."""
    counted = cells["collectives_per_step"].map(_finite).any() if "collectives_per_step" in cells else False
    return bool((cells["kind"] == "ddp").any() or counted)


def sync_sites(cell) -> list[dict]:
    """A cell's sync sites: `site` (file:line), `per_step`, `when` ("1 per step", "1 per 16-step epoch"),
    `operation`, `code` (the line, where the results hold it; for a site in a library, then its caller's line after
    " from ") and `setting` (a framework's setting behind it, `bench.frameworks`; "" where none is known). From
    `sync_site_details` where the results have it, else from `sync_sites` and `sync_kinds` (the operation is then
    known only where a cell has one kind)."""
    steps = cell.get("steps")
    details = cell.get("sync_site_details")
    out = []
    if isinstance(details, list) and details:
        for d in details:
            if not isinstance(d, dict) or not d.get("site"):
                continue
            ops = d.get("operations") or {}
            out.append({"site": str(d["site"]), "per_step": d.get("per_step"), "count": d.get("count"),
                        "operation": _operations(ops), "code": site_code(d), "setting": str(d.get("setting") or "")})
    else:
        sites, kinds = cell.get("sync_sites"), cell.get("sync_kinds")
        if not isinstance(sites, dict):
            return []
        kinds = kinds if isinstance(kinds, dict) else {}
        operation = _operations(kinds) if len(kinds) == 1 else (
            "one of " + ", ".join(code(k) for k in kinds) if kinds else "")
        for site, count in sorted(sites.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append({"site": site, "count": count, "per_step": count / steps if _finite(steps) and steps else None,
                        "operation": operation, "code": "", "setting": ""})
    for s in out:
        s["when"] = _when(s.get("count"), s.get("per_step"), steps)
    return out


def _operations(ops: dict) -> str:
    return ", ".join(OPERATIONS.get(k, k) if len(ops) == 1 else f"{OPERATIONS.get(k, k)} ×{n}" for k, n in ops.items())


def _when(count, per_step, steps) -> str:
    if _finite(per_step) and per_step >= 1 and float(per_step).is_integer():
        return f"{int(per_step)} per step"
    if _finite(count) and _finite(steps) and steps:
        return f"{int(count)} per {int(steps)}-step epoch"
    return f"{per_step:.3g} per step" if _finite(per_step) else "?"


def _per_step(v) -> str:
    if not _finite(v):
        return "?"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def _ratio_spread(ok: pd.DataFrame) -> str:
    reliable = ok[ok["ratio_to_baseline"].map(_finite) & ~ok["reliability"].map(_unreliable)
                  & ~ok.apply(is_baseline, axis=1)]
    if reliable.empty:
        return ""
    low, high = reliable["ratio_to_baseline"].min(), reliable["ratio_to_baseline"].max()
    return f"{low:.2f}x to {high:.2f}x of the baseline" if low != high else f"{low:.2f}x of the baseline"


# -- helpers ------------------------------------------------------------------------------------------------------

def _idioms(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(idiom, its cells in display order) in the order idioms first appear, training before evaluation."""
    ordered = pd.concat([cells for _, cells in by_workload_device(df)], ignore_index=True) if len(df) else df
    ordered = ordered.assign(_rank=[(k == "eval") for k in ordered["kind"]])
    out = []
    for kind_eval in (False, True):
        part = ordered[ordered["_rank"] == kind_eval]
        for idiom in dict.fromkeys(part["idiom"].map(lambda i: i if isinstance(i, str) and i else "other")):
            cells = part[part["idiom"].map(lambda i, idiom=idiom: (i if isinstance(i, str) and i else "other")
                                           == idiom)]
            out.append((idiom, cells.drop(columns="_rank")))
    return out


def _variants(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(v, cells[cells["variant"] == v]) for v in dict.fromkeys(in_display_order(cells)["variant"])]


def _prefixed(cell, text: str, cells: int) -> list[str]:
    """`text`'s lines, the first prefixed with the cell's `workload/device: ` where a row holds several cells."""
    lines = text.split("\n")
    if cells > 1:
        lines[0] = f"{cell['workload']}/{cell['device']}: {lines[0]}"
    return lines


def _ranks(cells: pd.DataFrame) -> str:
    """The number of ranks of distributed cells (`2`, or `2/4` where they differ); "" for none."""
    values = sorted({int(r) for r in cells["ranks"] if _finite(r)}) if "ranks" in cells else []
    return "/".join(map(str, values))


def _or_zero(v) -> float:
    return float(v) if _finite(v) else 0.0


def _first_per_variant(cells: pd.DataFrame):
    return [(v, cells[cells["variant"] == v].iloc[0]) for v in dict.fromkeys(cells["variant"])]


def _idiom_title(idiom: str, cells: pd.DataFrame) -> str:
    seed = " (beyond the seed)" if idiom not in SEED_IDIOMS and idiom not in ("user", "other") else ""
    return f"{idiom[:1].upper()}{idiom[1:]}{seed}"


def _where(cells: pd.DataFrame) -> str:
    by_device: dict[str, list[str]] = {}
    for w, d in dict.fromkeys(zip(cells["workload"], cells["device"])):
        by_device.setdefault(d, []).append(w)
    return "; ".join(f"{' and '.join(ws) if len(ws) < 3 else ', '.join(ws)} on {d}" for d, ws in by_device.items())


def _device_name(cells: pd.DataFrame) -> str | None:
    return next((n for n in cells["device_name"] if isinstance(n, str) and n), None)


def _reason(cell) -> str:
    reason = cell.get("verdict_reason")
    return reason if isinstance(reason, str) else ""


def _names(names: list[str]) -> str:
    shown = ", ".join(code(n) for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _first(values):
    return next((v for v in values if isinstance(v, str) and v), None)


def _ms(seconds) -> str:
    if not _finite(seconds):
        return "–"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _rate(v) -> str:
    return f"{v:,.0f}" if _finite(v) else "–"


def _unreliable(reliability) -> bool:
    return isinstance(reliability, str) and reliability.startswith("unreliable")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
