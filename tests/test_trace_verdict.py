"""`loopmark trace` judges an unmodified script from what its optimizers consumed (bench.audit), over a pass of its
own: `consistent`, `broken`, `different`, or `unverified`. Each script below is complete and ordinary; the expected
verdict is worked out from its code in the comment beside it, never from loopmark's output.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bench import trace
from bench.cli import main
from bench.target import script_target

# A complete script: a DataLoader over seeded data, an MLP, SGD with momentum; STEP is the body of one iteration over
# the loader (`batches` is its iterator, `data, target` the batch drawn), EVAL runs after each iteration.
SCRIPT = """\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()
dataset = TensorDataset(torch.randn(4096, 6), torch.randint(0, 3, (4096,)))
loader = DataLoader(dataset, batch_size=8, shuffle=True)
running = 0.0
test_loss = 0.0
batches = iter(loader)
for data, target in batches:
    data, target = data.to(device), target.to(device)
{step}
{eval}
"""

CORRECT = """\
optimizer.zero_grad()
loss = criterion(model(data), target)
loss.backward()
optimizer.step()
running += loss.item()
"""


def script(tmp_path: Path, step: str = CORRECT, evaluation: str = "", name: str = "train.py") -> Path:
    def indent(code):
        return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")
    path = tmp_path / name
    path.write_text(SCRIPT.format(step=indent(step), eval=indent(evaluation) if evaluation else ""))
    return path


def judged(path: Path) -> dict:
    result = trace.trace(script_target(str(path), []), steps=3, warmup=1)
    assert result.record["trace_passes"]["audit"] == 3, result.record
    return result.record


CASES = {
    # zero_grad, forward, loss, backward, step: each step consumes exactly its one backward pass
    "correct": (CORRECT, "consistent", "consumed exactly what its backward passes produced"),
    # no zero_grad: from the second step on, .grad holds the earlier steps' gradients when backward adds this one's
    "missing zero_grad": ("""\
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        """, "broken", "earlier steps' gradients too"),
    # zero_grad between backward and step: the step consumes zeros (SGD with momentum still moves the parameters)
    "zero_grad between backward and step": ("""\
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.zero_grad(set_to_none=False)
        optimizer.step()
        """, "broken", "zero_grad() between backward() and step()"),
    # accumulation over 2 loader batches with zero_grad inside the micro-batch loop: the step consumes the last alone
    "zero_grad inside the accumulation loop": ("""\
        for micro, (x, y) in enumerate([(data, target), next(batches)]):
            optimizer.zero_grad()
            loss = criterion(model(x.to(device)), y.to(device)) / 2
            loss.backward()
        optimizer.step()
        """, "broken", "consumed the gradient of its last backward pass of 2 alone"),
    # two optimizer.step() per backward: the second applies the same gradient again
    "double step": ("""\
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        optimizer.step()
        """, "broken", "applied the same gradient a second time"),
    # running += loss: every step's loss keeps its autograd graph alive through the running sum
    "running += loss": ("""\
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        running += loss
        """, "broken", "still holds its autograd graph"),
    # a loss that becomes NaN: broken whatever the steps consumed
    "non-finite loss": ("""\
        optimizer.zero_grad()
        loss = criterion(model(data), target) * float("nan")
        loss.backward()
        optimizer.step()
        """, "broken", "not finite"),
    # Trainer-style accumulation of 2 loader batches whose losses are not divided by 2: each step consumes exactly
    # its two backward passes, whose roots are the criterion's mean (NllLossBackward0): twice the mean gradient
    "undivided accumulation": ("""\
        optimizer.zero_grad()
        for x, y in [(data, target), next(batches)]:
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
        optimizer.step()
        """, "different", "not divided by 2"),
    # the same accumulation divided by 2 (the root is DivBackward0): the mean gradient, consumed whole
    "divided accumulation": ("""\
        optimizer.zero_grad()
        for x, y in [(data, target), next(batches)]:
            loss = criterion(model(x.to(device)), y.to(device)) / 2
            loss.backward()
        optimizer.step()
        """, "consistent", "consumed exactly"),
    # clipping at 1e-3 binds on every step (a random-init MLP's gradient norm is far above it): a scaled copy
    "clipping that binds": ("""\
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        optimizer.step()
        """, "different", "clipping by norm that binds"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_script_gets_the_verdict_its_code_implies(tmp_path, case):
    step, verdict, reason = CASES[case]
    r = judged(script(tmp_path, step))
    assert (r["verdict"], reason in r["verdict_reason"]) == (verdict, True), r["verdict_reason"]


def test_evaluation_that_keeps_its_graphs_is_broken(tmp_path):
    """Validation after every step with the model in eval mode and no torch.no_grad(), summing `test_loss += loss`:
    every evaluation's graph stays alive through the running sum. The same evaluation under no_grad is consistent."""
    evaluation = """\
        model.eval()
        {guard}
            test_loss = test_loss + criterion(model(data), target)
        model.train()
        """
    kept = judged(script(tmp_path, evaluation=evaluation.format(guard="if True:"), name="kept.py"))
    assert kept["verdict"] == "broken" and "evaluation" in kept["verdict_reason"], kept["verdict_reason"]
    guarded = judged(script(tmp_path, evaluation=evaluation.format(guard="with torch.no_grad():"), name="fine.py"))
    assert guarded["verdict"] == "consistent", guarded["verdict_reason"]


def test_a_trace_turned_broken_fails_compare_and_strict(tmp_path, monkeypatch, capsys):
    """A correct script traced, then the same script with its zero_grad() deleted: `compare` fails naming the
    verdict, `trace --strict` exits 1 on the broken one and 0 on the correct one."""
    monkeypatch.chdir(tmp_path)
    good = script(tmp_path)
    assert main(["trace", "--steps", "3", "--warmup", "1", "--strict", "--out", "before", str(good)]) == 0
    good.write_text(good.read_text().replace("    optimizer.zero_grad()\n", ""))
    assert main(["trace", "--steps", "3", "--warmup", "1", "--strict", "--out", "after", str(good)]) == 1
    after = json.loads((tmp_path / "after" / "results.json").read_text())
    cell = after["cells"][0] if "cells" in after else after
    assert cell["verdict"] == "broken"
    capsys.readouterr()
    assert main(["compare", "before", "after", "--only-deterministic"]) == 1
    out = capsys.readouterr().out
    assert "verdict" in out and "broken" in out, out


SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.mark.parametrize(("kwargs", "verdict", "reason"), [
    # forward(x, labels): the Trainer divides each micro-batch's loss by 2 (the root: NllLoss / 2 / 1)
    (False, "consistent", "consumed exactly what its backward passes produced"),
    # forward(..., **kwargs): undivided (NllLoss * 1 / 1), two batches per step: twice the mean gradient
    (True, "different", "not divided by 2): 2x their mean gradient"),
])
def test_a_hugging_face_trainer_with_gradient_accumulation(tmp_path, monkeypatch, kwargs, verdict, reason):
    """The real Trainer, where transformers is installed: with gradient_accumulation_steps=2 and a model that ignores
    `num_items_in_batch` but takes **kwargs, every step uses twice the mean gradient; the same model without
    **kwargs is divided as it should be."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text((SCRIPTS / "hf_trainer_accumulation.py").read_text())
    r = trace.trace(script_target(str(script), ["--kwargs"] if kwargs else []), steps=3, warmup=2).record
    assert (r["verdict"], reason in r["verdict_reason"]) == (verdict, True), r["verdict_reason"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_lightning_script_steps_through_closures(tmp_path, monkeypatch, accumulate):
    """PyTorch Lightning, where it is installed: each step runs its (last) backward pass inside
    `optimizer.step(closure)`; with accumulate_grad_batches=2 the first micro-batch's backward runs before the step
    and Lightning divides each loss by 2. Every step consumes what its backward passes produced: consistent."""
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text((SCRIPTS / "lightning_module.py").read_text())
    r = trace.trace(script_target(str(script), [str(accumulate)]), steps=3, warmup=2).record
    assert (r["verdict"], r["audit_steps"]) == ("consistent", 3), r["verdict_reason"]


LEFTOVER = """\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
x = torch.randn(224, 20)
loader = DataLoader(TensorDataset(x, (x[:, :3].sum(1) > 0).long()), batch_size=32, shuffle=True)  # 7 batches
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
criterion = nn.CrossEntropyLoss()
for epoch in range(20):
    optimizer.zero_grad(set_to_none=True)
    for i, (xb, yb) in enumerate(loader):
        loss = criterion(model(xb.to(device)), yb.to(device)) / 2
        loss.backward()
        if (i + 1) % 2 == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
"""


def test_an_epochs_leftover_micro_batch_is_not_a_dropped_one(tmp_path):
    """Accumulation over 2 of an epoch's 7 batches: the 7th batch's backward pass is left over and the next epoch's
    zero_grad() clears it; the step after it consumes exactly its own two passes (each loss / 2): consistent. With 3
    steps per pass and 3 optimizer steps per epoch, an epoch boundary falls in the audit pass."""
    path = tmp_path / "train.py"
    path.write_text(LEFTOVER)
    r = trace.trace(script_target(str(path), []), steps=3, warmup=2).record
    assert r["verdict"] == "consistent", r["verdict_reason"]
