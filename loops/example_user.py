"""A complete example of a user's own workload and loop variants, as docs/own-loops.md describes them.

Copy this file into your project, change the model and the loop, and point loopmark at it:

    loopmark check --workload mypackage.mymodule:regression --variant mypackage.mymodule:clipped_loop
    loopmark run --workload mypackage.mymodule:regression --variant mypackage.mymodule:clipped_loop

Here it is importable as `loops.example_user:...`, which the tests use.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops


def regression() -> loops.Workload:
    """A workload: a function with no arguments that returns a loops.Workload."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x.sum(dim=1) > 0).long()  # two classes, learnable
    return loops.Workload(
        name="regression",
        build_model=lambda: nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)),
        build_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        criterion=nn.CrossEntropyLoss(),
        train_data=TensorDataset(x[:384], y[:384]),
        test_data=TensorDataset(x[384:], y[384:]),
        batch_size=32,
        description="toy two-class problem, 8 features, AdamW",
    )


def clipped_loop(run: loops.Run) -> float:
    """The seed's loop with gradient-norm clipping before the step, loss tracked on the device."""
    model, optimizer, criterion = run.model, run.optimizer, run.criterion
    model.train()
    running = torch.zeros((), device=run.device)
    batches = 0
    for data, labels in run.batches:
        data, labels = data.to(run.device), labels.to(run.device)
        optimizer.zero_grad()
        loss = criterion(model(data), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6)  # never binds here: same gradient
        optimizer.step()
        running += loss.detach()
        batches += 1
    return (running / batches).item()


def forgot_zero_grad(run: loops.Run) -> float:
    """A broken loop: gradients are never cleared, so each step uses the sum of all gradients so far."""
    model, optimizer, criterion = run.model, run.optimizer, run.criterion
    model.train()
    total, batches = 0.0, 0
    for data, labels in run.batches:
        data, labels = data.to(run.device), labels.to(run.device)
        loss = criterion(model(data), labels)
        loss.backward()
        optimizer.step()
        total += loss.item()
        batches += 1
    return total / batches


@loops.evaluation
def eval_argmax(run: loops.Run) -> tuple[float, float]:
    """An evaluation variant (marked with @loops.evaluation): returns (mean batch loss, accuracy)."""
    model, criterion = run.model, run.criterion
    model.eval()
    loss_sum, correct, total, batches = 0.0, 0, 0, 0
    with torch.inference_mode():
        for data, labels in run.batches:
            data, labels = data.to(run.device), labels.to(run.device)
            outputs = model(data)
            loss_sum += criterion(outputs, labels).item()
            correct += outputs.argmax(1).eq(labels).sum().item()
            total += labels.numel()
            batches += 1
    return loss_sum / batches, correct / total
