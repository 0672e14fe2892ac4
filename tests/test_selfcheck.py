"""`loopmark selfcheck` prints its table and exits 1 when a goal is missed (its measurements stubbed: the real
one takes about 30 s and its figures depend on the machine)."""

import sys

import pytest

from bench import selfcheck
from bench.cli import main

GOALS = selfcheck.GOALS["cpu"]


def _stub(monkeypatch, overhead=(0.0, 0.0), agreement=(1e-4, 1e-4, 0.0), ratios=(1.0, 1.0, 1.0)):
    monkeypatch.setattr(selfcheck, "stage_batches", lambda *args: [])
    monkeypatch.setattr(selfcheck, "overhead", lambda *args, **kwargs: overhead)
    monkeypatch.setattr(selfcheck, "agreement", lambda *args, **kwargs: agreement)
    monkeypatch.setattr(selfcheck, "ratio_spread", lambda *args, **kwargs: list(ratios))


def test_all_goals_met_exits_0_and_prints_the_table(monkeypatch, capsys):
    """With every measurement inside its goal, `loopmark selfcheck` prints each check as met and exits 0."""
    _stub(monkeypatch)
    assert main(["selfcheck", "--workload", "digits"]) == 0
    out = capsys.readouterr().out
    for check in ("per-step marks vs the same loop timed whole", "torch.utils.benchmark", "ratio_to_baseline"):
        assert check in out
    assert "MISSED" not in out and out.count(" met") == 4


@pytest.mark.parametrize("missed", [
    {"overhead": (GOALS["overhead"] * 2, 0.0)},  # per-step marks cost too much
    {"overhead": (0.0, GOALS["loop"] * 2)},  # the canonical loop is slower than the hand-written one
    {"agreement": (1.1e-4, 1e-4, 0.1)},  # 10 % off torch.utils.benchmark
    {"agreement": (0.9e-4, 1e-4, -0.1)},  # ... in either direction
    {"ratios": (1.0, 1.1, 1.0)},  # ratio_to_baseline spreads 10 % over 3 runs
], ids=["marks", "loop", "agreement-high", "agreement-low", "spread"])
def test_one_missed_goal_exits_1(monkeypatch, capsys, missed):
    """A single goal missed makes `loopmark selfcheck` exit 1 and mark exactly that row MISSED."""
    _stub(monkeypatch, **missed)
    assert main(["selfcheck", "--workload", "digits"]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSED") == 1 and "1 of 4 goals missed" in out


def test_goals_on_the_boundary_are_met(monkeypatch):
    """A value exactly at its goal meets it (`<=`, `within`)."""
    _stub(monkeypatch, overhead=(GOALS["overhead"], GOALS["loop"]), agreement=(1e-4, 1e-4, GOALS["agreement"]))
    assert selfcheck.main("cpu", "digits") == 0


def _python_calls(fn) -> int:
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_the_canonical_step_adds_only_its_own_structure_to_the_seeds_python_calls():
    """Per step, the canonical loop (`baseline`) makes the Python calls the seed's loop written out by hand makes, and
    at most 11 more: its step function, the zeroing choice, the micro-batches, the no_sync contexts, the three
    contexts' enter and exit, the forward function and the model-and-loss call. A disabled GradScaler and an accuracy
    that is not counted cost no call (selfcheck's goal for this loop is 1 %: every call counts on a 0.1 ms step)."""
    import torch

    from bench.cell import build_cell, stage_batches
    from loops import resolve_variant, resolve_workload

    workload, device = resolve_workload("mlp"), torch.device("cpu")
    staged = stage_batches(workload, "train", 20, device)
    canonical, bare = (build_cell(workload, resolve_variant("baseline"), device) for _ in range(2))
    canonical.epoch(staged[:2]), selfcheck._bare_block(bare, staged[:2])

    def extra(steps):  # per epoch of `steps` steps: the canonical loop's calls less the hand-written loop's
        return (_python_calls(lambda: selfcheck._whole_block(canonical, staged[:steps]))
                - _python_calls(lambda: selfcheck._bare_block(bare, staged[:steps])))

    assert (extra(20) - extra(10)) / 10 <= 12  # the epoch's own calls (Run, model.train()) cancel out
