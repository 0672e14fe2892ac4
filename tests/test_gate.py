"""The regression gate end to end: loopmark run twice, loopmark compare, exit codes."""

import pytest

from bench.cli import main

LOOP = '''
import torch


def loop(run):
    run.model.train()
    running, batches = torch.zeros((), device=run.device), 0
    for data, labels in run.batches:
        data, labels = data.to(run.device), labels.to(run.device)
        run.optimizer.zero_grad()
        loss = run.criterion(run.model(data), labels)
        loss.backward()
        run.optimizer.step()
        running += loss.detach()
        {extra}
        batches += 1
    return (running / batches).item()
'''


def _run(tmp_path, monkeypatch, name: str, extra: str):
    src = tmp_path / name
    src.mkdir()
    (src / "userloop.py").write_text(LOOP.format(extra=extra))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(__import__("sys").modules, "userloop", raising=False)
    out = tmp_path / f"out_{name}"
    argv = ["run", "--device", "cpu", "--workload", "digits", "--variant", "userloop:loop", "--steps", "6",
            "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_one_more_item_per_step_fails_the_gate_on_syncs(tmp_path, monkeypatch, capsys):
    base = _run(tmp_path, monkeypatch, "a", "pass")
    cand = _run(tmp_path, monkeypatch, "b", "loss.item()  # a debugging print left in")
    capsys.readouterr()
    assert main(["compare", str(base), str(cand), "--only-deterministic"]) == 1
    out = capsys.readouterr().out
    assert "digits/userloop:loop/cpu" in out and "syncs/step changed: 0.166667 -> 1.16667" in out


def test_same_code_compares_clean_on_deterministic_metrics(tmp_path, monkeypatch, capsys):
    base = _run(tmp_path, monkeypatch, "a", "pass")
    cand = _run(tmp_path, monkeypatch, "b", "pass")
    assert main(["compare", str(base), str(cand), "--only-deterministic"]) == 0


@pytest.mark.parametrize("args", [["/nonexistent/dir", "/nonexistent/dir"]])
def test_unusable_input_is_exit_2(capsys, args):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
