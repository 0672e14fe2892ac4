# Source: pytorch/examples, mnist/main.py, commit d0b7e3709407074ac64bb34c5af33fe226abb47c: train(), with a
# planted bug
"""PLANTED BUG: pytorch/examples' MNIST `train()` with its `optimizer.zero_grad()` line deleted.

Gradients accumulate across steps, so step k consumes the sum of k batch gradients: `broken`, whatever the dropout
masks are.

Syncs on CUDA: as the correct loop, one `loss.item()` per logged batch.
"""

import math

import torch
import torch.nn.functional as F

import loops
from tests.corpus import kept
from tests.corpus.mnist import LOG_INTERVAL, Net, workload

__all__ = ["CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "Net", "train", "workload"]

EXPECTED_VERDICT = "broken"


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """One `loss.item()` per logged batch (batch_idx 0, LOG_INTERVAL, ...)."""
    return math.ceil(steps / LOG_INTERVAL) / steps


def train(run: loops.Run):
    """The example's train() for one epoch, without `optimizer.zero_grad()`."""
    model, device, train_loader, optimizer = run.model, run.device, run.batches, run.optimizer
    state = kept(optimizer, lambda: {"epoch": 0})
    state["epoch"] += 1
    epoch = state["epoch"]
    epoch_loss = torch.zeros((), device=device)
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % LOG_INTERVAL == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(  # noqa: UP032
                epoch, batch_idx * len(data), len(train_loader) * len(data),
                100. * batch_idx / len(train_loader), loss.item()))
        epoch_loss += loss.detach()
    return epoch_loss / len(train_loader)
