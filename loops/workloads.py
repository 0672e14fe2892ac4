"""Workloads: a model, its optimizer and loss, real DataLoaders over seeded data, a batch size and a seed.

A user's workload is a function with no arguments that returns a `Workload`, named
`package.module:function`; see docs/own-loops.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from loops.registry import WORKLOAD_NAMES, check_workload_name
from loops.resolve import BadName, load_object


@dataclass
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    # the optimizer(s) over the model's parameters; a function whose first parameter is named `model` gets the model
    # itself (`model.configure_optimizers(...)`), and may return several optimizers (a tuple, list or dict: a GAN's two)
    build_optimizer: Callable[[Iterable[nn.Parameter]], Any]
    criterion: nn.Module | None  # None: the model computes its own loss (`forward(x, targets) -> (logits, loss)`)
    train_data: Dataset
    test_data: Dataset | None = None
    batch_size: int = 64
    seed: int = 0
    description: str = ""
    # a Dataset whose items are whole batches (batch_size is then only reported)
    batched: bool = False
    # as DataLoader's own option, and its default: the last batch of an epoch may be smaller
    drop_last: bool = False
    # steps per epoch of the correctness pass (None: its default, 3); the same under check and run
    check_steps: int | None = None

    def loader(self, split: str = "train", *, num_workers: int = 0, pin_memory: bool = False,
               persistent_workers: bool = False, shard: tuple[int, int] | None = None) -> DataLoader:
        """A real DataLoader over the split, shuffled by a generator seeded from the workload's seed: the one
        place a workload's batches come from, so every reader (staged batches, a live input pipeline with
        workers and pinned memory) sees the same batches in the same order. Memory is pinned only where there
        is a GPU to copy to. `shard=(rank, ranks)`: that rank's part through a DistributedSampler seeded with the
        workload's seed, as a DDP script reads it (`sampler.set_epoch(epoch)` reorders it)."""
        data = self.train_data if split == "train" else self.test_data
        if data is None:
            raise ValueError(f"workload {self.name!r} has no {split} data")
        options = {"num_workers": num_workers, "persistent_workers": persistent_workers,
                   "pin_memory": pin_memory and torch.cuda.is_available()}
        if shard is not None:
            sampler = DistributedSampler(data, num_replicas=shard[1], rank=shard[0], shuffle=split == "train",
                                         seed=self.seed, drop_last=self.drop_last)
            batching = {"batch_size": None} if self.batched else {"batch_size": self.batch_size,
                                                                   "drop_last": self.drop_last}
            return DataLoader(data, sampler=sampler, **batching, **options)
        if self.batched:
            return DataLoader(data, batch_size=None, shuffle=False, **options)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(data, batch_size=self.batch_size, shuffle=split == "train", drop_last=self.drop_last,
                          generator=generator, **options)


def _classification_data(n: int, shape: tuple[int, ...], classes: int, seed: int) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, and the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(x[0].numel(), classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorDataset(x, y)


def mlp() -> Workload:
    """Small MLP on synthetic features: launch-bound on a GPU."""
    return Workload(
        name="mlp",
        drop_last=True,
        build_model=lambda: nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                          nn.Linear(256, 10)),
        build_optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        criterion=nn.CrossEntropyLoss(),
        train_data=_classification_data(4096, (32,), 10, seed=1),
        test_data=_classification_data(1024, (32,), 10, seed=2),
        batch_size=64,
        description="3-layer MLP, 32->256->256->10, SGD momentum, synthetic data",
    )


class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def cnn() -> Workload:
    """Small convnet on synthetic 3x32x32 images, 10 classes."""
    return Workload(
        name="cnn",
        drop_last=True,
        build_model=SmallConvNet,
        build_optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
        criterion=nn.CrossEntropyLoss(),
        train_data=_classification_data(2048, (3, 32, 32), 10, seed=3),
        test_data=_classification_data(512, (3, 32, 32), 10, seed=4),
        batch_size=32,
        description="2-conv convnet with BatchNorm, SGD momentum + weight decay, synthetic 3x32x32",
    )


def resnet18() -> Workload:
    """torchvision resnet18, random init, synthetic 3x32x32 images."""
    import torchvision

    return Workload(
        name="resnet18",
        drop_last=True,
        check_steps=2,  # 2 steps per epoch still show accumulation across steps; each costs a second on CPU
        build_model=lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        build_optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
        criterion=nn.CrossEntropyLoss(),
        train_data=_classification_data(512, (3, 32, 32), 10, seed=5),
        test_data=_classification_data(128, (3, 32, 32), 10, seed=6),
        batch_size=16,
        description="torchvision resnet18 (random init), SGD momentum + weight decay, synthetic 3x32x32",
    )


def digits() -> Workload:
    """scikit-learn's bundled handwritten digits (real data, 8x8), MLP with Adam."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return Workload(
        name="digits",
        drop_last=True,
        build_model=lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
        build_optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        criterion=nn.CrossEntropyLoss(),
        train_data=TensorDataset(x[:split], y[:split]),
        test_data=TensorDataset(x[split:], y[split:]),
        batch_size=32,
        description="scikit-learn digits (1797 real 8x8 images, 80/20 split), MLP 64->128->10, Adam",
    )


class TwoTaskNet(nn.Module):
    """Two input stems (one per task) on a shared trunk: the stem of the other task gets no gradient."""

    def __init__(self, width_a: int = 20, width_b: int = 12, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.width_a = width_a
        self.stem_a = nn.Linear(width_a, hidden)
        self.stem_b = nn.Linear(width_b, hidden)
        self.trunk = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem_a if x.shape[1] == self.width_a else self.stem_b  # the task shows in the input width
        return self.trunk(stem(x))


class AlternatingTasks(Dataset):
    """Whole batches, task A and task B alternately: a batch-level view of multi-task training."""

    def __init__(self, batches: int, batch_size: int, seed: int, widths: tuple[int, int] = (20, 12)):
        self.items = []
        for i in range(batches):
            d = _classification_data(batch_size, (widths[i % 2],), 4, seed=seed * 1000 + i)
            self.items.append(d.tensors)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def conditional() -> Workload:
    """Two tasks with separate input stems, Adam + weight decay: where set_to_none changes the result."""
    return Workload(
        name="conditional",
        build_model=TwoTaskNet,
        build_optimizer=lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
        criterion=nn.CrossEntropyLoss(),
        train_data=AlternatingTasks(64, 32, seed=8),
        test_data=AlternatingTasks(16, 32, seed=9),
        batch_size=32,
        batched=True,
        description="two-task net (a stem per task, shared trunk), tasks alternate by batch, Adam + L2",
    )


# the functions named in loops.registry, which the command line reads without importing torch
WORKLOADS: dict[str, Callable[[], Workload]] = {name: globals()[name] for name in WORKLOAD_NAMES}


def resolve_workload(name: str) -> Workload:
    """A built-in name or a user's `package.module:function` returning a Workload."""
    if ":" in name:
        workload = load_object(name, "workload")()
        if not isinstance(workload, Workload):
            raise BadName(f"workload {name!r} returned {type(workload).__name__}, not loops.Workload")
        return workload
    check_workload_name(name)
    return WORKLOADS[name]()
