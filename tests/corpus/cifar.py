# Source: kuangliu/pytorch-cifar, main.py, commit 7ad1b9c745bebd47a273a606bfea9a8749a3bee7: train(); models/lenet.py,
# commit 41e053e2061615c65395447ab947ebf938bcb53b: LeNet; utils.py, commit 1fc07cb61e83e8745d306b25d84b8daf01d40ed0:
# progress_bar()
"""kuangliu/pytorch-cifar's `train(epoch)`: `train_loss += loss.item()`, `correct += predicted.eq(targets).sum()
.item()`, a progress bar over `len(trainloader)` every batch; LeNet, SGD momentum + weight decay; synthetic
3x32x32 images.

It is loopmark's baseline with a training-accuracy count: the same steps, and the epoch loss it shows,
`train_loss/(batch_idx+1)`, is the mean of the batch losses (`identical` can happen): `equivalent`.

Syncs on CUDA: two reads per step, `loss.item()` and `.sum().item()` of the correct count; `outputs.max(1)` and
`predicted.eq()` stay on the device; the progress message formats Python numbers only.
"""

import sys

import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

import loops
from tests.corpus import kept, teacher_data

EXPECTED_VERDICT = "equivalent"


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` and the correct count's `.item()`, every step."""
    return 2.0


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.conv2(out))
        out = F.max_pool2d(out, 2)
        out = out.view(out.size(0), -1)
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        out = self.fc3(out)
        return out


def progress_bar(current, total, msg=None):
    """The repository's progress bar, reduced to its text: the step count and the message."""
    sys.stdout.write(' %d/%d | %s' % (current + 1, total, msg))  # noqa: UP031
    sys.stdout.write('\r' if current < total - 1 else '\n')
    sys.stdout.flush()


def workload() -> loops.Workload:
    x, y = teacher_data(512 + 128, (3, 32, 32), 10, seed=31)
    return loops.Workload(
        name="corpus-cifar",
        build_model=LeNet,
        build_optimizer=lambda params: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
        criterion=nn.CrossEntropyLoss(),
        train_data=TensorDataset(x[:512], y[:512]),
        test_data=TensorDataset(x[512:], y[512:]),
        batch_size=32,
        description="kuangliu/pytorch-cifar train(): LeNet, loss and accuracy read back every step",
    )


def train(run: loops.Run):
    """The repository's train(epoch) for one epoch; returns the loss its progress bar shows last."""
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

        train_loss += loss.item()
        _, predicted = outputs.max(1)
        total += targets.size(0)
        correct += predicted.eq(targets).sum().item()

        progress_bar(batch_idx, len(trainloader), 'Loss: %.3f | Acc: %.3f%% (%d/%d)'  # noqa: UP031
                     % (train_loss/(batch_idx+1), 100.*correct/total, correct, total))
    return train_loss/(batch_idx+1)
