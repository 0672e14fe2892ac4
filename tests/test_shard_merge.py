"""`loopmark run --shard I/N` and `loopmark merge`: the matrix split across CI jobs and put back together."""

import json
import shutil

import pytest
from conftest_reports_data import make_record

import reports.report
from bench import runner
from bench.cli import main
from reports import results

# two workloads (two shards' worth), a correct and a broken loss tracking each; the smallest settings run accepts
RUN = ["run", "--device", "cpu", "--quick", "--steps", "3", "--repeats", "1", "--warmup", "0",
       "--workload", "mlp", "--workload", "loops.example_user:regression", "--variant", "tensor_sum",
       "--variant", "graph_sum"]
COMPARED = ("status", "verdict", "syncs_per_step", "ops_per_step", "retains_graph", "sync_sites")


def test_a_shard_keeps_each_workload_on_a_device_whole_and_the_split_is_balanced_and_stable():
    groups = runner.plan(["cuda", "cpu"], None, None)  # mlp and cnn on two devices: train groups, cnn's eval group
    pairs = {(g.workload, g.device) for g in groups}
    for count in range(1, len(pairs) + 1):
        shards = [runner.shard(groups, i, count) for i in range(1, count + 1)]
        assert shards == [runner.shard(groups, i, count) for i in range(1, count + 1)]  # deterministic
        assert sorted(map(id, (g for s in shards for g in s))) == sorted(map(id, groups))  # each group once
        for s in shards:
            assert [g for g in groups if g in s] == s  # plan order kept
            assert s, "no shard is empty"
        owners = {(g.workload, g.device): i for i, s in enumerate(shards) for g in s}
        assert all(owners[(g.workload, g.device)] == i for i, s in enumerate(shards) for g in s)  # pairs whole
        loads = [sum(len(g.variants) for g in s) for s in shards]
        largest = max(sum(len(g.variants) for g in groups if (g.workload, g.device) == p) for p in pairs)
        assert max(loads) - min(loads) <= largest
    with pytest.raises(ValueError, match="at most 4 shards"):
        runner.shard(groups, 1, 5)


@pytest.mark.parametrize("shard, needle", [("3/2", "between 1 and N"), ("0/2", "between 1 and N"),
                                           ("two", "is not I/N"), ("3/3", "at most 2 shards")])
def test_a_bad_shard_is_one_line_and_exit_2(shard, needle, tmp_path, capsys):
    assert main([*RUN, "--shard", shard, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before an output directory is made


def test_the_shards_merged_hold_the_cells_verdicts_and_syncs_of_one_unsharded_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reports.report, "FIGURES", {})  # each run writes its report, without plots (time)
    assert main([*RUN, "--out", str(tmp_path / "whole")]) == 0
    for i in (1, 2):
        assert main([*RUN, "--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}")]) == 0
    shards = [results.read_results(tmp_path / f"shard{i}") for i in (1, 2)]
    assert [env["shard"] for env, _ in shards] == ["1/2", "2/2"]
    assert [{r["workload"] for r in cells} for _, cells in shards] in ([{"mlp"}, {"regression"}],
                                                                       [{"regression"}, {"mlp"}])
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "shard1"), str(tmp_path / "shard2"), "--out", str(tmp_path / "m")]) == 0
    assert "merged 6 cells of 2 runs" in capsys.readouterr().out

    _, whole = results.read_results(tmp_path / "whole")
    env, merged = results.read_results(tmp_path / "m")
    key = results.cell_key
    assert sorted(map(key, merged)) == sorted(map(key, whole)) and len(whole) == 6
    by_key = {key(r): r for r in whole}
    for r in merged:
        assert {c: r.get(c) for c in COMPARED} == {c: by_key[key(r)].get(c) for c in COMPARED}, key(r)
        assert r["ratio_to_baseline"] is not None  # each cell's baseline came with it from its shard
    assert [m["shard"] for m in env["merged_from"]] == ["1/2", "2/2"] and env["settings"] == shards[0][0]["settings"]
    assert (tmp_path / "m" / "results.csv").read_text().count("\n") == 7
    assert main(["compare", str(tmp_path / "whole"), str(tmp_path / "m"), "--only-deterministic"]) == 0


# -- refusals: synthetic runs, no torch --------------------------------------------------------------------------

SETTINGS = {"steps": 16, "repeats": 3, "warmup": 2, "seed": 0, "check_epochs": 2, "check_steps": None,
            "memory_steps": 12}


def _run(path, workloads=("mlp",), env=None, **cell):
    base = {"loopmark_version": "0.1.0", "torch": "2.5.1", "cpu_model": "AMD EPYC 7763", "devices": ["cpu"],
            "settings": SETTINGS}
    records = [make_record(w, v, "cpu", **cell) for w in workloads for v in ("baseline", "tensor_sum")]
    results.write_results(path, {**base, **(env or {})}, records)
    return str(path)


@pytest.mark.parametrize("other, needle", [
    ({"env": {"settings": {**SETTINGS, "seed": 1}}}, "differ in settings (seed 0 vs seed 1)"),
    ({"warmup_steps": 1}, "differ in settings (warmup)"),
    ({"env": {"torch": "2.6.0"}}, "differ in torch version (2.5.1 vs 2.6.0)"),
    ({"torch_version": "2.6.0"}, "differ in torch version"),
    ({"env": {"loopmark_version": "0.2.0"}}, "differ in loopmark version"),
    ({"env": {"devices": ["cuda", "cpu"]}}, "differ in devices (--device)"),
    ({"device_name": "Intel Xeon"}, "differ in cpu device"),
    ({"workloads": ("mlp",)}, "mlp/baseline/cpu is in both"),
])
def test_merge_refuses_runs_that_could_not_be_one_in_one_line_exit_2(other, needle, tmp_path, capsys):
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b", **{"workloads": ("cnn",), **other})
    assert main(["merge", first, second, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("loopmark merge: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()  # refused before --out is made


def test_merge_takes_other_cpu_models_when_asked_and_keeps_each_cells_own(tmp_path):
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b", ("cnn",), device_name="Intel Xeon")
    assert main(["merge", first, second, "--out", str(tmp_path / "m"), "--mixed-cpus"]) == 0
    _, cells = results.read_results(tmp_path / "m")
    assert {(r["workload"], r["device_name"]) for r in cells} == {("mlp", "AMD EPYC 7763"), ("cnn", "Intel Xeon")}


def test_merge_does_not_write_over_results_or_into_an_input(tmp_path, capsys):
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b", ("cnn",))
    assert main(["merge", first, second, "--out", first]) == 2
    assert main(["merge", first, second, "--out", str(tmp_path / "m")]) == 0
    before = (tmp_path / "m" / "results.json").read_text()
    assert main(["merge", first, second, "--out", str(tmp_path / "m")]) == 2
    assert (tmp_path / "m" / "results.json").read_text() == before
    assert main(["merge", first, second, "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert "holds the results of an earlier run" in capsys.readouterr().err
    doc = json.loads((tmp_path / "m" / "results.json").read_text())
    assert doc["environment"]["command"].startswith("loopmark merge ")


def test_merge_overwrite_into_a_run_directory_removes_that_runs_report(tmp_path, capsys):
    """The report beside the results --overwrite replaces is that run's, not the merge's: it goes with them."""
    first, second, old = _run(tmp_path / "a"), _run(tmp_path / "b", ("cnn",)), tmp_path / "old"
    results.write_results(old, {}, [make_record("mlp", "baseline")])
    assert main(["report", str(old)]) == 0
    assert (old / "report.md").exists() and list(old.glob("plot_*.png"))
    assert main(["merge", first, second, "--out", str(old), "--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["results.csv", "results.json"]


@pytest.mark.parametrize("shards, needle", [
    (["1/2"], "shard 2/2 missing"),
    (["1/3", "3/3"], "shard 2/3 missing"),
    (["1/2", None], "is not a shard"),
    (["1/2", "2/3"], "shards of different splits"),
])
def test_merge_refuses_an_incomplete_set_of_shards_unless_partial(shards, needle, tmp_path, capsys):
    """A missing shard's artifact must not let the gate on the merge pass on the cells that are there."""
    paths = [_run(tmp_path / f"r{i}", (w,), env={"shard": s} if s else None)
             for i, (s, w) in enumerate(zip(shards, ("mlp", "cnn")))]
    assert main(["merge", *paths, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()
    assert main(["merge", *paths, "--out", str(tmp_path / "m"), "--partial"]) == 0


@pytest.mark.parametrize("second, needle", [("s1", "s1 is given twice: name each run once"),
                                            ("s1/results.json", "s1/results.json is given twice (as "),
                                            ("copy", "shard 1/2 is given twice (")])
def test_merge_of_a_run_given_twice_says_so_rather_than_a_shard_missing(second, needle, tmp_path, capsys,
                                                                         monkeypatch):
    """`merge s1 s1` (the same run by another path, or a copy of its shard) is a run given twice: not `shard 2/2
    missing`, which sends the user looking for a shard, nor a merge with --partial."""
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "s1", env={"shard": "1/2"})
    shutil.copytree(tmp_path / "s1", tmp_path / "copy")
    partials = [[]] if second == "copy" else [[], ["--partial"]]  # with --partial a copy's cells are "in both"
    for partial in partials:
        assert main(["merge", "s1", second, "--out", "m", *partial]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.startswith("loopmark merge: ") and len(err.splitlines()) == 1, err
        assert not results.holds_results(tmp_path / "m")
