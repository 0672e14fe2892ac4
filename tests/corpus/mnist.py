# Source: pytorch/examples, mnist/main.py, commit d0b7e3709407074ac64bb34c5af33fe226abb47c: train() and Net
"""pytorch/examples' MNIST `train()`: dropout in the model, its own `F.nll_loss`, a log line with `loss.item()`
every `log_interval` batches and `len(train_loader)`; Adadelta; on scikit-learn's 8x8 digits, widths cut down.

It does what loopmark's baseline does: the same zero_grad -> forward -> loss -> backward -> step, and
`F.nll_loss` is the workload's `nn.NLLLoss()`, so with the same dropout masks the parameters are bitwise the
baseline's; the epoch loss (the contract's return, summed on the device) equals the mean batch loss within
rounding: `equivalent`.

Syncs on CUDA: the batches are on the device already (`.to(device)` is a no-op); zero_grad, forward, backward and
Adadelta's step read nothing back (its `step` counter lives on the host); the one `loss.item()` is on logged
batches only, `batch_idx % LOG_INTERVAL == 0`: ceil(steps / LOG_INTERVAL) per epoch.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn, optim

import loops
from tests.corpus import digits, kept

EXPECTED_VERDICT = "equivalent"
LOG_INTERVAL = 2  # --log-interval 2 (the default is 10): several log lines in a short epoch


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """One `loss.item()` per logged batch (batch_idx 0, LOG_INTERVAL, ...)."""
    return math.ceil(steps / LOG_INTERVAL) / steps


class Net(nn.Module):
    """The example's Net (conv, conv, max-pool, dropout 0.25, fc, dropout 0.5, fc, log_softmax) for 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-mnist",
        build_model=Net,
        build_optimizer=lambda params: optim.Adadelta(params, lr=1.0),
        criterion=nn.NLLLoss(),
        train_data=digits(0, 1400),
        test_data=digits(1400, 1797),
        batch_size=64,
        description="pytorch/examples mnist Net (dropout, log_softmax) on sklearn digits, Adadelta",
    )


def train(run: loops.Run):
    """The example's train(args, model, device, train_loader, optimizer, epoch) for one epoch."""
    model, device, train_loader, optimizer = run.model, run.device, run.batches, run.optimizer
    state = kept(optimizer, lambda: {"epoch": 0})
    state["epoch"] += 1
    epoch = state["epoch"]
    epoch_loss = torch.zeros((), device=device)  # the epoch loss the contract asks for, kept on the device
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % LOG_INTERVAL == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(  # noqa: UP032
                epoch, batch_idx * len(data), len(train_loader) * len(data),  # run.batches has no .dataset
                100. * batch_idx / len(train_loader), loss.item()))
        epoch_loss += loss.detach()
    return epoch_loss / len(train_loader)
