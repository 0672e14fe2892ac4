"""`loopmark merge DIR... --out DIR`: the results of several runs, typically the shards of one (`loopmark run --shard
I/N` in N jobs), as one run.

Runs are merged only when they could have been one: the same measured settings (steps, repeats, warm-up, seed, the
correctness and memory passes' sizes), the same loopmark and torch versions, the same planned devices, the same
device model for each device type they share (the CPU model of cpu cells, the GPU of cuda cells), and no cell in
two of them. Anything else is refused with one line naming the two runs and what differs. Each workload's cells come
from one run (a shard keeps a workload's groups together), so the ratios to the baseline stay those of one machine.

Torch-free, like every module of `reports`: the merged cells are written by `reports.results.write_results`.
"""

from __future__ import annotations

from reports import results

CELL_SETTINGS = {"steps": "steps", "repeats": "repeats", "warmup": "warmup_steps"}  # settings every cell records


def merge(paths, mixed_cpus: bool = False, partial: bool = False) -> tuple[dict, list[dict]]:
    """(environment, records) of the runs at `paths` (results directories or results.json files) put together;
    ValueError (one line) when they cannot be. `mixed_cpus`: accept runs on different CPU models (each cell keeps
    its own `device_name`). `partial`: accept shards that are not every shard of one run (a gate on the merge
    would otherwise pass on the cells that are there, silent about those that are not)."""
    runs, given = [], {}
    for path in paths:
        file = results.results_file(path).resolve()  # a directory and its results.json are one run
        if file in given:
            same = given[file] == str(path)
            raise ValueError(f"{path} is given twice{'' if same else f' (as {given[file]} too)'}: name each run once")
        given[file] = str(path)
        env, records = results.read_results(path)
        runs.append((str(path), env, records))
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    for run in runs[1:]:
        _check_same(first, run, mixed_cpus)
    if not partial:
        _check_complete(runs)
    seen: dict[tuple, str] = {}
    for path, _, records in runs:
        for r in records:
            key = results.cell_key(r)
            if key in seen:
                raise ValueError(f"{'/'.join(key)} is in both {seen[key]} and {path}: runs to merge must not "
                                 "overlap (each shard of a run holds different cells)")
            seen[key] = path
    env = {k: v for k, v in first[1].items() if k not in ("shard", "source", "source_format")}
    env["merged_from"] = [{"path": path, "command": e.get("command"), "timestamp": e.get("timestamp"),
                           "shard": e.get("shard"), "cpu_model": e.get("cpu_model")} for path, e, _ in runs]
    return env, [dict(r) for _, _, records in runs for r in records]


def _check_complete(runs: list) -> None:
    """ValueError (one line) unless the runs are every shard of one run, once each (`--shard I/N`: all of 1..N)
    or runs none of which is a shard."""
    shards = {path: env.get("shard") for path, env, _ in runs}
    if not any(shards.values()):
        return
    whole = [path for path, shard in shards.items() if not shard]
    if whole:
        raise ValueError(f"{whole[0]} is not a shard, {next(p for p, s in shards.items() if s)} is: merge the "
                         "shards of one run (or pass --partial)")
    first: dict[str, str] = {}
    for path, shard in shards.items():  # a shard's copy: the same cells twice, another shard missing
        if str(shard) in first:
            raise ValueError(f"shard {shard} is given twice ({first[str(shard)]} and {path}): merge each shard once")
        first[str(shard)] = path
    counts = {str(s).partition("/")[2] for s in shards.values()}
    if len(counts) > 1:
        raise ValueError(f"shards of different splits ({', '.join(sorted(str(s) for s in shards.values()))}): merge "
                         "the shards of one run (or pass --partial)")
    n = counts.pop()
    have = sorted(str(s).partition("/")[0] for s in shards.values())
    missing = [f"{i}/{n}" for i in range(1, int(n) + 1) if str(i) not in have] if n.isdigit() else []
    if missing:
        raise ValueError(f"shard {', '.join(missing)} missing: a gate on a merge without it would pass on the cells "
                         "that are there; merge every shard (or pass --partial)")


def write_merged(paths, out_dir, command: str, mixed_cpus: bool = False, partial: bool = False) -> list[dict]:
    """Merge `paths` into `out_dir`/results.json and results.csv (the one results writer); the merged records. Runs that
    cannot be merged are refused (ValueError) before `out_dir` is made; a report found there (of the run whose results
    are replaced) is removed once the merged results are written: it is not theirs."""
    env, records = merge(paths, mixed_cpus, partial)
    env["command"] = command
    out_dir = results.check_writable(out_dir)
    results.write_results(out_dir, env, records)
    results.remove_report(out_dir)
    return records


def _check_same(a: tuple, b: tuple, mixed_cpus: bool) -> None:
    (path_a, env_a, cells_a), (path_b, env_b, cells_b) = a, b

    def refuse(what: str, x, y):
        raise ValueError(f"{path_a} and {path_b} differ in {what} ({_show(x)} vs {_show(y)}): merged, their cells "
                         "would not be one run's")

    settings_a, settings_b = env_a.get("settings"), env_b.get("settings")
    if isinstance(settings_a, dict) and isinstance(settings_b, dict):
        differ = [k for k in sorted(set(settings_a) | set(settings_b)) if settings_a.get(k) != settings_b.get(k)]
        if differ:
            refuse("settings", ", ".join(f"{k} {settings_a.get(k)}" for k in differ),
                   ", ".join(f"{k} {settings_b.get(k)}" for k in differ))
    for name, field in CELL_SETTINGS.items():  # what each cell records, for files written without the settings
        values_a, values_b = _values(cells_a, field), _values(cells_b, field)
        if values_a and values_b and values_a != values_b:
            refuse(f"settings ({name})", values_a, values_b)
    for what, key in (("loopmark version", "loopmark_version"), ("torch version", "torch")):
        if env_a.get(key) and env_b.get(key) and env_a[key] != env_b[key]:
            refuse(what, env_a[key], env_b[key])
    torch_a, torch_b = _values(cells_a, "torch_version"), _values(cells_b, "torch_version")
    if torch_a and torch_b and torch_a != torch_b:
        refuse("torch version", torch_a, torch_b)
    if env_a.get("devices") and env_b.get("devices") and sorted(env_a["devices"]) != sorted(env_b["devices"]):
        refuse("devices (--device)", env_a["devices"], env_b["devices"])
    for device in sorted({r["device"] for r in cells_a} & {r["device"] for r in cells_b}):
        if device == "cpu" and mixed_cpus:
            continue
        models_a = _values([r for r in cells_a if r["device"] == device], "device_name")
        models_b = _values([r for r in cells_b if r["device"] == device], "device_name")
        if models_a and models_b and models_a != models_b:
            refuse(f"{device} device" + (" (--mixed-cpus accepts other CPU models)" if device == "cpu" else ""),
                   models_a, models_b)


def _values(records: list[dict], field: str) -> list:
    return sorted({r.get(field) for r in records if r.get(field) is not None}, key=str)


def _show(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "none"
    return str(v)
