"""What `loopmark trace` costs the script: the time and memory passes run it with no torch mode (the CUDA stand-in's
device mapping sits at the few entry points that take a device), and a script that names CUDA at each step still runs
through every pass."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from bench import trace
from bench.target import script_target

# every way of naming the GPU that the stand-in maps, at each step; `modes` records the torch function modes on
ENTRY_POINTS = """\
import json, sys
import torch
from torch import nn, zeros

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
modes = []
try:
    for step in range({steps}):
        modes.append(torch._C._len_torch_function_stack())
        model.to("cuda")
        model.cuda()
        data = x.to("cuda") + x.cuda() + x.to(0) + x.to(device="cuda:0", non_blocking=True) + x.pin_memory().to(device)
        data = data + zeros(8, 4, device="cuda") + torch.ones(8, 4, device=device) + torch.tensor(1.0, device="cuda")
        data = data + x.new_zeros((8, 4), device="cuda") + torch.zeros_like(x, device="cuda")
        data = data + torch.empty(8, 4, device="cuda", pin_memory=True).fill_(0) + nn.Linear(4, 4, device="cuda")(x)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data), y.to(device))
        loss.backward()
        optimizer.step()
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(modes, f)
"""


def test_the_time_and_memory_passes_run_without_a_mode_and_map_every_cuda_argument(tmp_path: Path):
    steps, warmup = 3, 2
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(ENTRY_POINTS.format(steps=100)))
    seen = tmp_path / "modes.json"
    result = trace.trace(script_target(str(script), [str(seen)]), steps, warmup)
    r = result.record
    assert (r["status"], result.outcome.how) == ("ok", "stopped"), r["error"]
    assert r["trace_passes"] == dict.fromkeys(trace.PHASES, steps)
    # blocking copies: x.to("cuda"), x.cuda(), x.to(0), x.pin_memory().to(device), torch.tensor(1.0, device="cuda"),
    # y.to(device); the non_blocking one: none
    assert r["syncs_per_step"] == 6
    modes = json.loads(seen.read_text())  # iteration i runs step i + 1, the first of a pass after `warmup + k steps`
    count, time_and_memory = modes[warmup:warmup + steps], modes[warmup + 2 * steps:warmup + 4 * steps]
    assert min(count) >= 1 and time_and_memory == [0] * (2 * steps)
    assert torch._C._len_torch_function_stack() == 0
    assert torch.zeros is torch._C._VariableFunctions.zeros and "to" not in vars(torch.Tensor)  # all undone
