"""The seed article (shared/seed/000_ff1cd702c5fbc27f.txt): its worked example in torch, and its loops written out
as a user would write them, run through loopmark's own correctness pass."""

import sys

import pytest
import torch

from bench import correctness
from loops import resolve_variant, resolve_workload

# A user's module, as docs/own-loops.md describes it: a tiny workload trained with the
# seed's SGD, and the seed's training loops line by line (`tqdm(trainloader)` is `run.batches`).
SEED_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops


def workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    return loops.Workload(name="seed", build_model=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                          build_optimizer=lambda params: torch.optim.SGD(params, lr=0.001),
                          criterion=nn.CrossEntropyLoss(), train_data=TensorDataset(x[:48], y[:48]),
                          test_data=TensorDataset(x[48:], y[48:]), batch_size=8)


def seed_loop(run):
    """The seed's first loop: zero_grad, forward, loss, backward, step, train_loss += loss.item()."""
    model, optim, criterion, trainloader = run.model, run.optimizer, run.criterion, run.batches
    model.train()
    train_loss = 0.0
    for data, labels in trainloader:
        data, labels = data.to(run.device), labels.to(run.device)
        # Clear the gradients
        optim.zero_grad()
        # Forward Pass
        target = model(data)
        # Find the Loss
        loss = criterion(target, labels)
        # Calculate gradients
        loss.backward()
        # Update Weights
        optim.step()
        # Calculate Loss
        train_loss += loss.item()
    return train_loss / len(trainloader)


def seed_list_loop(run):
    """The seed's second loop: train_loss.append(loss.item()), torch.tensor(train_loss).mean() at the end."""
    model, optim, criterion, trainloader = run.model, run.optimizer, run.criterion, run.batches
    model.train()
    train_loss = list()
    for data, labels in trainloader:
        data, labels = data.to(run.device), labels.to(run.device)
        optim.zero_grad()
        target = model(data)
        loss = criterion(target, labels)
        loss.backward()
        optim.step()
        train_loss.append(loss.item())
    return torch.tensor(train_loss).mean()


def seed_loop_without_zero_grad(run):
    """The accumulation the seed warns about: its first loop with optim.zero_grad() left out."""
    model, optim, criterion, trainloader = run.model, run.optimizer, run.criterion, run.batches
    model.train()
    train_loss = 0.0
    for data, labels in trainloader:
        data, labels = data.to(run.device), labels.to(run.device)
        target = model(data)
        loss = criterion(target, labels)
        loss.backward()
        optim.step()
        train_loss += loss.item()
    return train_loss / len(trainloader)
'''


@pytest.fixture(scope="module")
def seed_user(tmp_path_factory):
    """The user's module, importable as `seed_user:...` while this module's tests run; its workload and a cache
    for the baseline's trajectory."""
    path = tmp_path_factory.mktemp("seed")
    (path / "seed_user.py").write_text(SEED_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(path))
        mp.delitem(sys.modules, "seed_user", raising=False)
        yield resolve_workload("seed_user:workload"), {}


@pytest.mark.parametrize("loop,verdict,reason", [
    ("seed_loop", "identical", None),  # loopmark's baseline is the seed's loop: bit for bit the same
    ("seed_list_loop", "equivalent", None),  # a float32 mean of the same losses: equal within rounding
    ("seed_loop_without_zero_grad", "broken", "step 2 consumed the sum of 2 batch gradients"),
], ids=["first-loop", "list-loop", "no-zero-grad"])
def test_the_seeds_loops_get_the_verdict_the_seed_implies(seed_user, loop, verdict, reason):
    """The seed's loop, written by a user, is identical to loopmark's baseline; without zero_grad it is broken."""
    workload, cache = seed_user
    record = correctness.check(workload, resolve_variant(f"seed_user:{loop}"), torch.device("cpu"), epochs=2,
                               steps=3, _cache=cache)
    assert record["verdict"] == verdict, record["verdict_reason"]
    if reason:
        assert record["verdict_reason"] == reason


def test_backward_then_sgd_step_matches_the_article():
    """backward() fills .grad with d(sum(100 x))/dx = 100; one SGD step (lr 0.001) subtracts lr * grad."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = 100 * x
    loss = y.sum()
    assert x.grad is None
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([100.0, 100.0]))
    optim = torch.optim.SGD([x], lr=0.001)
    optim.step()
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, 1.9]))


def test_not_zeroing_accumulates_the_gradient():
    """Without zero_grad a second backward adds to .grad: the accumulation the seed warns about."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (100 * x).sum().backward()
    (100 * x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([200.0, 200.0]))
