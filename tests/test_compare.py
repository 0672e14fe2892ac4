"""`loopmark compare`: the gates, the statistics, the output formats and the exit status."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest_reports_data import (
    ENVIRONMENT,
    make_record,
    pytest_benchmark_doc,
    refresh_blocks,
    step_times,
    write_results_json,
)

from bench.cli import main as loopmark
from reports.compare import compare, format_md, format_text, time_gate
from reports.load import load, to_frame
from reports.stats import median_ci, median_ratio_ci


def main(argv: list[str]) -> int:
    """`loopmark compare ARGV...` through the command line."""
    return loopmark(["compare", *argv])


def _records(**changes) -> list[dict]:
    """Three cells of one run; `changes` maps a variant to the fields its cell gets."""
    variants = ["baseline", "tensor_sum", "graph_sum"]
    records = [make_record("mlp", v, "cpu", seed=i) for i, v in enumerate(variants)]
    for r in records:
        r.update(changes.get(r["variant"], {}))
        refresh_blocks(r)
    return records


def _compare(tmp_path, capsys, base, cand, *args, base_env=None, cand_env=None):
    """Run the CLI on two written results; returns (exit status, stdout, stderr)."""
    b = write_results_json(tmp_path / "base", base, base_env)
    c = write_results_json(tmp_path / "cand", cand, cand_env)
    rc = main([str(b), str(c), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_identical_runs_compare_clean(tmp_path, capsys):
    rc, out, err = _compare(tmp_path, capsys, _records(), _records())
    assert rc == 0
    assert "REGRESSION" not in out
    assert out.strip().endswith("0 regressions in 3 matched cells")
    assert err == ""


def test_one_more_sync_per_step_is_a_regression_naming_the_cell(tmp_path, capsys):
    rc, out, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"syncs_per_step": 1.0}))
    assert rc == 1
    line = next(line for line in out.splitlines() if "REGRESSION" in line)
    assert "mlp/tensor_sum/cpu" in line and "syncs/step changed: 0 -> 1" in line
    assert "1 regression in 3 matched cells" in out


def test_sync_change_below_tolerance_is_not_a_regression(tmp_path, capsys):
    rc, _, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"syncs_per_step": 1e-12}))
    assert rc == 0


@pytest.mark.parametrize("field, value", [("verdict", "broken"), ("retains_graph", True)])
def test_verdict_or_retains_graph_change_is_a_regression(tmp_path, capsys, field, value):
    rc, out, _ = _compare(tmp_path, capsys, _records(), _records(baseline={field: value}))
    assert rc == 1
    assert f"{field} changed" in out


def test_thirty_percent_slower_in_every_block_is_a_regression(tmp_path, capsys):
    """8 blocks each: all 8 candidate blocks above all 8 baseline blocks gives p = 1/12870 = 7.8e-05."""
    slow = [1.3 * t for t in _records()[1]["step_times_s"]]
    rc, out, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"step_times_s": slow}))
    assert rc == 1
    line = next(line for line in out.splitlines() if "REGRESSION" in line)
    assert line.startswith("mlp/tensor_sum/cpu")
    assert re.search(r"slower: median step time x1\.(29|30|31)\d \(95% CI 1\.\d+-1\.\d+ > 1\.05, p=7\.8e-05\)",
                     line)


def test_one_percent_slower_is_below_the_threshold(tmp_path, capsys):
    base = _records(tensor_sum={"step_times_s": step_times(2e-3, n=2000, spread=0.01, seed=1)})
    cand = _records(tensor_sum={"step_times_s": step_times(2e-3 * 1.01, n=2000, spread=0.01, seed=2)})
    rc, _, _ = _compare(tmp_path, capsys, base, cand)
    assert rc == 0
    # significant, but the CI of the ratio (around 1.01) is not above 1.05
    p, ratio, (low, high), regressed = time_gate(base[1]["step_times_s"], cand[1]["step_times_s"], 5.0, 0.01)
    assert p < 0.01 and 1.0 < low < ratio < high < 1.05 and not regressed


def test_high_variance_few_samples_is_not_significant(tmp_path, capsys):
    base = _records(tensor_sum={"step_times_s": step_times(2e-3, n=5, spread=0.6, seed=3)})
    cand = _records(tensor_sum={"step_times_s": step_times(2e-3 * 1.3, n=5, spread=0.6, seed=4)})
    rc, _, _ = _compare(tmp_path, capsys, base, cand)
    assert rc == 0
    p, _, _, regressed = time_gate(base[1]["step_times_s"], cand[1]["step_times_s"], 5.0, 0.01)
    assert p >= 0.01 and not regressed


def test_max_slowdown_option_raises_the_bar(tmp_path, capsys):
    slow = [1.3 * t for t in _records()[1]["step_times_s"]]
    rc, _, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"step_times_s": slow}),
                        "--max-slowdown", "50")
    assert rc == 0


def test_different_torch_version_warns_and_skips_the_time_and_ops_gates(tmp_path, capsys):
    slow = step_times(2e-3 * 2, n=400, seed=7)
    cand = _records(tensor_sum={"step_times_s": slow, "torch_version": "2.6.0", "ops_per_step": 99.0})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand)
    assert rc == 0
    assert "warning: torch version differs (2.5.1 in the baseline, 2.6.0 in the candidate)" in out
    assert "time not compared: torch version differs" in out


def test_different_torch_version_keeps_the_deterministic_gates(tmp_path, capsys):
    cand = _records(baseline={"torch_version": "2.6.0", "syncs_per_step": 3.0})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand)
    assert rc == 1 and "syncs/step changed: 1 -> 3" in out


def test_ops_per_step_change_with_the_same_torch_is_a_regression(tmp_path, capsys):
    rc, out, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"ops_per_step": 121.0}))
    assert rc == 1 and "ops/step changed: 120 -> 121" in out


def test_different_device_name_warns_and_skips_the_time_gate(tmp_path, capsys):
    cand = _records(tensor_sum={"device_name": "Intel Xeon", "step_times_s": step_times(4e-3, n=400)})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand)
    assert rc == 0
    assert "warning: cpu device differs (AMD EPYC 7763 in the baseline, Intel Xeon in the candidate)" in out


@pytest.mark.parametrize("other", ["another model", "another vector unit"])
def test_identical_and_equivalent_are_one_verdict_between_two_cpus_and_two_on_one(tmp_path, capsys, other):
    """Bitwise equality rests on the order a CPU's vector units sum in: between two CPU models (or the same model name
    with other vector instructions) identical <-> equivalent is said, not gated; on one CPU it regresses; and a
    verdict that changes otherwise (equivalent -> broken) regresses on any CPU."""
    base = _records(tensor_sum={"verdict": "equivalent"})
    rounding = _records(tensor_sum={"verdict": "identical"})
    wrong = _records(tensor_sum={"verdict": "broken"})
    kw = {"base_env": {**ENVIRONMENT, "cpu_capability": "AVX2"}, "cand_env": {**ENVIRONMENT, "cpu_capability": "AVX2"}}
    if other == "another model":
        rounding[1]["device_name"] = wrong[1]["device_name"] = "Intel Xeon"
    else:
        kw["cand_env"]["cpu_capability"] = "AVX512"
    rc, out, _ = _compare(tmp_path, capsys, base, rounding, "--only-deterministic", **kw)
    assert rc == 0, out
    assert "verdict equivalent -> identical: the same within rounding on another device" in out
    assert "identical and equivalent verdicts are not told apart" in out
    rc, out, _ = _compare(tmp_path, capsys, base, wrong, "--only-deterministic", **kw)
    assert rc == 1 and "verdict changed: equivalent -> broken" in out
    one_cpu = _records(tensor_sum={"verdict": "identical"})
    rc, out, _ = _compare(tmp_path, capsys, base, one_cpu, "--only-deterministic")
    assert rc == 1 and "verdict changed: equivalent -> identical" in out


def test_environment_torch_is_used_when_cells_do_not_say(tmp_path, capsys):
    base = _records(tensor_sum={"torch_version": None})
    cand = _records(tensor_sum={"torch_version": None, "step_times_s": step_times(4e-3, n=400)})
    rc, out, _ = _compare(tmp_path, capsys, base, cand, cand_env={**ENVIRONMENT, "torch": "2.7.0"})
    assert rc == 0 and "torch version differs (2.5.1 in the baseline, 2.7.0 in the candidate)" in out


def test_cells_in_one_file_only_are_listed_not_regressions(tmp_path, capsys):
    base = _records()
    cand = _records()[:2] + [make_record("mlp", "new_idea", "cpu")]
    rc, out, _ = _compare(tmp_path, capsys, base, cand)
    assert rc == 0
    assert "only in the baseline:\n  mlp/graph_sum/cpu" in out
    assert "only in the candidate:\n  mlp/new_idea/cpu" in out
    assert "2 in one file only" in out


def test_a_cell_that_stops_working_is_a_regression(tmp_path, capsys):
    cand = _records(tensor_sum={"status": "error", "error": "boom", "syncs_per_step": 5.0})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand)
    assert rc == 1
    assert "status ok -> error: boom" in out


def test_cells_not_ok_in_the_baseline_are_listed_not_compared(tmp_path, capsys):
    base = _records(tensor_sum={"status": "error", "error": "boom"})
    rc, out, _ = _compare(tmp_path, capsys, base, _records())
    assert rc == 0
    assert "mlp/tensor_sum/cpu (baseline error, candidate ok)" in out


def test_only_deterministic_ignores_time_and_memory(tmp_path, capsys):
    slow = _records(baseline={"peak_memory_bytes": 10 * 120 * 2**20})
    for r in slow:
        if r.get("step_times_s"):
            r["step_times_s"] = [t * 2 for t in r["step_times_s"]]
    assert _compare(tmp_path, capsys, _records(), slow)[0] == 1
    assert _compare(tmp_path, capsys, _records(), slow, "--only-deterministic")[0] == 0
    more_syncs = _records(tensor_sum={"syncs_per_step": 1.0625})
    assert _compare(tmp_path, capsys, _records(), more_syncs, "--only-deterministic")[0] == 1


def test_missing_block_medians_skip_the_time_gate_with_a_note(tmp_path, capsys):
    cand = _records(tensor_sum={"step_times_s": None, "block_medians_s": None})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand)
    assert rc == 0 and "time not compared: too few timed blocks (or no baseline blocks) in the candidate" in out


@pytest.mark.parametrize("changes, expected", [
    ({"peak_memory_bytes": 120 * 2**20 * 1.10}, 1),  # +10% > 5%
    ({"peak_memory_bytes": 120 * 2**20 * 1.03}, 0),
    ({"memory_growth_bytes_per_step": 5000.0}, 1),  # 0 -> 5000 B/step: a leak
    ({"memory_growth_bytes_per_step": 500.0}, 0),  # below 1024 B/step
])
def test_memory_gates(tmp_path, capsys, changes, expected):
    rc, _, _ = _compare(tmp_path, capsys, _records(), _records(baseline=changes))
    assert rc == expected


def test_memory_threshold_option(tmp_path, capsys):
    cand = _records(baseline={"peak_memory_bytes": 120 * 2**20 * 1.10})
    rc, _, _ = _compare(tmp_path, capsys, _records(), cand, "--memory-threshold", "20")
    assert rc == 0


def test_markdown_has_a_table_and_the_verdict(tmp_path, capsys):
    rc, out, _ = _compare(tmp_path, capsys, _records(), _records(tensor_sum={"verdict": "different"}),
                          "--format", "md")
    assert rc == 1
    assert "| cell | result | time cand/base [95% CI] | p | details |" in out
    assert "|---|---|---|---|---|" in out
    assert "| mlp/tensor_sum/cpu | **REGRESSION** |" in out
    assert out.strip().endswith("**1 regression in 3 matched cells**")


def test_text_table_columns_are_aligned(tmp_path, capsys):
    _, out, _ = _compare(tmp_path, capsys, _records(), _records())
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cell "))
    starts = {line.index(" ok ") for line in lines[header + 1:header + 4]}
    assert starts == {lines[header].index(" result")}


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not readable JSON"),
    (json.dumps({"hello": "world"}), "not a loopmark results file nor a pytest-benchmark JSON"),
    (json.dumps({"format": "loopmark-results", "version": 1, "cells": [{"variant": "x"}]}), "cell 0 has no"),
])
def test_unusable_input_exits_2_with_one_line(tmp_path, capsys, content, message):
    base = write_results_json(tmp_path / "base", _records())
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    rc = main([str(base), str(bad)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert str(bad) in err and message in err
    assert "Traceback" not in err


def test_bad_option_exits_2(capsys):
    assert main(["a.json", "b.json", "--alpha", "3"]) == 2
    assert "--alpha" in capsys.readouterr().err


def test_pytest_benchmark_json_is_accepted(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(pytest_benchmark_doc(_records())))
    base = write_results_json(tmp_path / "base", _records())
    assert main([str(base), str(path)]) == 0
    assert "0 regressions in 3 matched cells" in capsys.readouterr().out


def test_comparison_object():
    base_env, cand_env = {"torch": "2.5.1"}, {"torch": "2.5.1"}
    base = to_frame(_records())
    cand = to_frame(_records(graph_sum={"syncs_per_step": 2.0}))
    c = compare(base_env, base, cand_env, cand)
    assert [r.key for r in c.regressions] == [("mlp", "graph_sum", "cpu")]
    assert c.matched == 3 and not c.only_in_baseline and not c.warnings
    assert "mlp/graph_sum/cpu" in format_text(c) and "mlp/graph_sum/cpu" in format_md(c)


# -- the statistics, against numbers worked out by hand ---------------------------------------------------

def test_time_gate_small_exact_case():
    # every candidate time is above every baseline time: U = 25, and with 5 + 5 samples and no ties the exact
    # one-sided p is 1 / C(10, 5) = 1/252; the medians are 3 and 8
    p, ratio, (low, high), regressed = time_gate([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], 5.0, 0.01)
    assert p == pytest.approx(1 / 252)
    assert ratio == pytest.approx(8 / 3)
    assert 6 / 5 <= low <= ratio <= high <= 10 / 1  # bounded by the extreme resampled medians
    assert regressed


def test_time_gate_not_significant_in_the_other_direction():
    p, ratio, _, regressed = time_gate([6, 7, 8, 9, 10], [1, 2, 3, 4, 5], 5.0, 0.01)
    assert p == pytest.approx(1.0) and ratio == pytest.approx(3 / 8) and not regressed


def test_bootstrap_of_constant_samples_is_exact():
    assert median_ci([2.0] * 50) == (2.0, 2.0)
    assert median_ratio_ci([2.0] * 50, [3.0] * 60) == pytest.approx((1.5, 1.5))


def test_bootstrap_median_ci_matches_the_normal_approximation():
    # the median of n normal samples has standard error sqrt(pi/2) * sigma / sqrt(n): 0.0627 for n=400,
    # sigma=1, so the 95% CI is about median +- 1.96 * 0.0627 = +-0.123
    x = np.random.default_rng(5).normal(10.0, 1.0, 400)
    low, high = median_ci(x)
    half_width = 1.96 * np.sqrt(np.pi / 2) / np.sqrt(400)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.3)
    assert low < np.median(x) < high


def test_bootstrap_is_seeded():
    x, y = step_times(1.0, n=100, seed=1), step_times(1.1, n=100, seed=2)
    assert median_ratio_ci(x, y) == median_ratio_ci(x, y)


def test_load_round_trip_keeps_raw_times(tmp_path):
    records = _records()
    _, df = load(write_results_json(tmp_path, records))
    assert df.loc[0, "step_times_s"] == records[0]["step_times_s"]


def test_a_machine_wide_slowdown_divides_out(tmp_path, capsys):
    """Every cell 30 % slower, the baseline too: a slower machine, not a slower loop."""
    slower = _records()
    for r in slower:
        r["step_times_s"] = [1.3 * t for t in r["step_times_s"]]
        refresh_blocks(r)
    rc, out, _ = _compare(tmp_path, capsys, _records(), slower)
    assert rc == 0 and "time not gated: the baseline variant is the yardstick" in out


def test_different_steps_per_block_skip_the_count_gates_with_a_warning(tmp_path, capsys):
    longer = _records()[1]["step_times_s"] * 2  # twice the steps per block
    cand = _records(tensor_sum={"step_times_s": longer, "syncs_per_step": 0.001})
    rc, out, _ = _compare(tmp_path, capsys, _records(), cand, "--only-deterministic")
    assert rc == 0 and "steps per block differ" in out


# -- which sync site changed ----------------------------------------------------------------------------------

RUNNING_LOSS, ACCURACY, GRAD_NORM = "running_loss += loss.item()", "correct += (pred == y).sum().item()", \
    "norm = grad_norm(model).item()"


def _with_sites(record: dict, sites: list[tuple[int, str, float]], file: str = "loops/lmloops.py") -> dict:
    """`record` with one sync site per (line, code, syncs per step) in `file`, its syncs/step their sum."""
    steps = record["steps"]
    record["sync_sites"] = {f"{file}:{line}": round(n * steps) for line, _, n in sites}
    record["sync_site_details"] = [{"site": f"{file}:{line}", "per_step": n, "count": round(n * steps), "code": code}
                                   for line, code, n in sites]
    record["syncs_per_step"] = sum(n for _, _, n in sites)
    return record


@pytest.mark.parametrize("kind", ["run", "trace"])
@pytest.mark.parametrize(("before", "after", "added"), [
    # a line added above both sites: both move down one
    ([(33, RUNNING_LOSS, 1.0), (40, ACCURACY, 1.0)],
     [(33, GRAD_NORM, 1.0), (34, RUNNING_LOSS, 1.0), (41, ACCURACY, 1.0)], 33),
    # between them: the one below moves
    ([(33, RUNNING_LOSS, 1.0), (40, ACCURACY, 1.0)],
     [(33, RUNNING_LOSS, 1.0), (36, GRAD_NORM, 1.0), (41, ACCURACY, 1.0)], 36),
    # below both: nothing moves
    ([(33, RUNNING_LOSS, 1.0), (40, ACCURACY, 1.0)],
     [(33, RUNNING_LOSS, 1.0), (40, ACCURACY, 1.0), (45, GRAD_NORM, 1.0)], 45),
    # between two lines of the same code: the nearest lines pair, the one in the middle is new
    ([(30, RUNNING_LOSS, 1.0), (40, RUNNING_LOSS, 1.0)],
     [(30, RUNNING_LOSS, 1.0), (35, RUNNING_LOSS, 1.0), (41, RUNNING_LOSS, 1.0)], 35),
])
def test_a_sync_added_is_blamed_on_the_new_line_not_on_the_lines_it_moved(tmp_path, capsys, kind, before, after,
                                                                           added):
    """Sites pair by their code first (then the nearest line): the report names the line added, and only it."""
    def cells(sites):
        if kind == "trace":
            return [_with_sites(make_record("train.py", "trace", "cpu"), sites)]
        records = _records()
        _with_sites(records[1], sites)
        return records

    rc, out, _ = _compare(tmp_path, capsys, cells(before), cells(after), "--only-deterministic")
    assert rc == 1
    code = {line: code for line, code, _ in after}[added]
    assert f"syncs/step changed: 2 -> 3 (+1/step at loops/lmloops.py:{added} `{code}`)" in out


def test_a_site_without_its_code_pairs_by_its_place(tmp_path, capsys):
    """Results without `sync_site_details` (or without the line's code) compare sites by file:line."""
    before, after = _records(), _records()
    _with_sites(before[1], [(33, "", 1.0)])
    _with_sites(after[1], [(33, "", 2.0)])
    rc, out, _ = _compare(tmp_path, capsys, before, after, "--only-deterministic")
    assert rc == 1 and "syncs/step changed: 1 -> 2 (+1/step at loops/lmloops.py:33)" in out


def test_a_line_gone_and_a_line_added_are_both_named(tmp_path, capsys):
    before, after = _records(), _records()
    _with_sites(before[1], [(33, RUNNING_LOSS, 1.0)])
    _with_sites(after[1], [(33, GRAD_NORM, 2.0)])
    rc, out, _ = _compare(tmp_path, capsys, before, after, "--only-deterministic")
    assert rc == 1
    assert (f"syncs/step changed: 1 -> 2 (+2/step at loops/lmloops.py:33 `{GRAD_NORM}`, -1/step at "
            "loops/lmloops.py:33 (gone))") in out


def test_the_ranks_of_a_traced_ddp_script_are_gated_each_on_its_own(tmp_path, capsys):
    """`loopmark trace --nproc-per-node 2` writes a cell per rank (workload `SCRIPT rank R`): compare pairs rank with
    rank, and a change of collectives/step on rank 1 alone (a no_sync that lost a micro-batch's all-reduce there) is
    named on rank 1's cell, the other rank's clean."""
    def ranks(collectives_of_rank_1: float) -> list[dict]:
        cells = [make_record(f"train.py rank {r}", "trace", "cpu", seed=r) for r in range(2)]
        for r, cell in enumerate(cells):
            cell.update(rank=r, ranks=2, collectives_per_step=collectives_of_rank_1 if r else 2.0,
                        collective_sites={"train.py:40": collectives_of_rank_1 if r else 2.0})
        return cells

    rc, out, _ = _compare(tmp_path, capsys, ranks(2.0), ranks(1.0), "--only-deterministic")
    assert rc == 1
    flagged = [line for line in out.splitlines() if "collectives/step changed" in line]
    assert len(flagged) == 1 and "train.py rank 1" in flagged[0] and "2 -> 1" in flagged[0], out
