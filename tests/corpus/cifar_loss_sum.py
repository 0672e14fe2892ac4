# Source: kuangliu/pytorch-cifar, main.py, commit 7ad1b9c745bebd47a273a606bfea9a8749a3bee7: train(), with a planted
# bug
"""PLANTED BUG: kuangliu/pytorch-cifar's `train(epoch)` with `train_loss += loss` where it reads
`train_loss += loss.item()`.

The running loss is a tensor that keeps every step's autograd graph alive, and the loop reports it: `broken`.

Syncs on CUDA: still two per step. The correct count's `.sum().item()`, and the progress message's `'%.3f' %
(train_loss/(batch_idx+1))`, which formats a 0-dim device tensor through `float()`: one read.
"""

import loops
from tests.corpus import kept
from tests.corpus.cifar import LeNet, progress_bar, workload

__all__ = ["CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "LeNet", "train", "workload"]

EXPECTED_VERDICT = "broken"


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """The correct count's `.item()` and `float()` of the running loss in the progress message, every step."""
    return 2.0


def train(run: loops.Run):
    """The repository's train(epoch) for one epoch with `train_loss += loss` (no `.item()`); returns the loss its
    progress bar shows last, a tensor that holds every step's autograd graph."""
    net, trainloader, device, optimizer, criterion = run.model, run.batches, run.device, run.optimizer, \
        run.criterion
    state = kept(optimizer, lambda: {"epoch": 0})
    epoch = state["epoch"]
    state["epoch"] += 1
    print('\nEpoch: %d' % epoch)  # noqa: UP031
    net.train()
    train_loss = 0
    correct = 0
    total = 0
    for batch_idx, (inputs, targets) in enumerate(trainloader):
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()

        train_loss += loss
        _, predicted = outputs.max(1)
        total += targets.size(0)
        correct += predicted.eq(targets).sum().item()

        progress_bar(batch_idx, len(trainloader), 'Loss: %.3f | Acc: %.3f%% (%d/%d)'  # noqa: UP031
                     % (train_loss/(batch_idx+1), 100.*correct/total, correct, total))
    return train_loss/(batch_idx+1)
