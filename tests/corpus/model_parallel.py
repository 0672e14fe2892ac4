# Source: pytorch/tutorials, intermediate_source/model_parallel_tutorial.py, commit
# 5130967035247c8343376ee69f49d6e10d61eaca: ToyModel and train(model)
"""The PyTorch model-parallel tutorial's `train(model)`: its own `nn.MSELoss()` made inside the loop, one-hot
labels moved with `labels.to(outputs.device)` (the device the model's last layer put the output on), and
`loss_fn(outputs, labels).backward()`; SGD; the tutorial's ToyModel on one device.

The workload's criterion is `nn.MSELoss()` too: the loop takes the baseline's steps, and its epoch loss (the
contract's return, summed on the device) is the mean batch loss within rounding: `equivalent`.

Syncs on CUDA: none. The batch is on the device, so `inputs.to(device)` and `labels.to(outputs.device)` are
no-ops (a copy to the device a tensor is on is no copy); nothing is read back.
"""

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

import loops
from tests.corpus import teacher_data

EXPECTED_VERDICT = "equivalent"
NUM_CLASSES = 5


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """No value is read back; no copy crosses between host and device."""
    return 0.0


class ToyModel(nn.Module):
    """The tutorial's ToyModel with both halves on one device."""

    def __init__(self):
        super().__init__()
        self.net1 = torch.nn.Linear(10, 10)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(10, NUM_CLASSES)

    def forward(self, x):
        x = self.relu(self.net1(x))
        return self.net2(x)


def _one_hot(n: int, seed: int) -> TensorDataset:
    x, y = teacher_data(n, (10,), NUM_CLASSES, seed)
    return TensorDataset(x, F.one_hot(y, NUM_CLASSES).float())


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-model-parallel",
        build_model=ToyModel,
        build_optimizer=lambda params: optim.SGD(params, lr=0.001),
        criterion=nn.MSELoss(),
        train_data=_one_hot(1024, seed=41),
        test_data=_one_hot(256, seed=42),
        batch_size=120,
        description="pytorch/tutorials model parallel train(): MSELoss on one-hot labels, labels.to(outputs.device)",
    )


def train(run: loops.Run):
    """The tutorial's train(model) for one epoch over `run.batches`."""
    model = run.model
    model.train(True)
    loss_fn = nn.MSELoss()
    optimizer = run.optimizer
    running, batches = torch.zeros((), device=run.device), 0  # the epoch loss the contract asks for
    for inputs, labels in run.batches:
        # run forward pass
        optimizer.zero_grad()
        outputs = model(inputs.to(run.device))

        # run backward pass
        labels = labels.to(outputs.device)
        loss = loss_fn(outputs, labels)
        loss.backward()
        optimizer.step()
        running += loss.detach()
        batches += 1
    return running / batches
