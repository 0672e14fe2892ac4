"""A cell's parts: a freshly seeded model, optimizer and loss on a device, the variant's loop prepared for
them, and staged batches.

Every pass builds its own `Cell`, so the passes never share state: the same seed gives every variant the
same initial weights, and `stage_batches` gives every variant the same batches in the same order. What a
loop keeps from epoch to epoch (a GradScaler, a compiled function, a captured CUDA graph) is made when the
cell is built, and belongs to that cell alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from loops import Run, Variant, Workload
from loops.canonical import TrainLoop


@dataclass
class Cell:
    workload: Workload
    variant: Variant
    device: torch.device
    model: torch.nn.Module
    optimizer: Any  # what the workload's build_optimizer returned: one optimizer, or several (a GAN's two)
    criterion: torch.nn.Module | None  # None: the model computes its own loss
    loop: Callable[[Run], Any]  # the variant's loop, prepared for this cell's model and optimizer

    epochs: int = 0  # epochs run so far

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer of the cell, in the order the workload gave them."""
        return optimizers_of(self.optimizer)

    def run(self, batches) -> Run:
        """What the loop gets for its next epoch (each call is one more epoch of this cell)."""
        self.epochs += 1
        return Run(self.model, self.optimizer, self.criterion, batches, self.device, self.epochs - 1)

    def epoch(self, batches):
        """Run the variant's loop once over `batches`; returns what the loop reports."""
        return self.loop(self.run(batches))

    def device_tensors(self) -> list[torch.Tensor]:
        """The device tensors the prepared loop holds besides the model's and the optimizer's (a captured
        CUDA graph's static inputs and running loss); a user's loop holds none between epochs."""
        return self.loop.device_tensors() if isinstance(self.loop, TrainLoop) else []

    def batches(self, staged: list):
        """What this cell's loop reads: the staged batches, or a live DataLoader for input-pipeline variants. A
        distributed loop's have a `sampler`, as its DataLoader would (the staged order stays as it is)."""
        if self.variant.kind == "ddp":
            from bench.distributed import StagedShard

            return StagedShard(staged)
        if not self.variant.input_loader:
            return staged
        if getattr(self, "_live", None) is None:
            self._live = LiveBatches(self.workload, self.variant.input_loader)
        return self._live.take(len(staged))


class LiveBatches:
    """A real DataLoader (workers, pinned memory as the variant asks) read block by block, its workers kept."""

    def __init__(self, workload: Workload, options: dict):
        kept = options.get("num_workers", 0) > 0  # workers outlive a block: the next one does not respawn them
        self.loader = workload.loader("train", persistent_workers=kept, **options)
        self.iterator = iter(self.loader)

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def take(self, count: int) -> _Block:
        return _Block(self, count)


class _Block:
    """`count` batches from a LiveBatches, drawn as the loop asks for them."""

    def __init__(self, source: LiveBatches, count: int):
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            yield self.source._next()


def reset_compiled() -> None:
    """Forget torch.compile's compiled code (if torch.compile was used at all in this process).

    Every pass builds new models; compiled code is cached per model and dynamo stops compiling a
    function after a few models (its recompile limit), silently running it eagerly after that. So
    `build_cell` calls it: a cell's loop compiles, if it does, on its first epoch, as the first model.
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def compiled_frames() -> int:
    """Frames dynamo has compiled (or tried to) in this process so far: a step that changes it compiled."""
    dynamo = sys.modules.get("torch._dynamo")
    return int(dynamo.utils.counters["frames"]["total"]) if dynamo is not None else 0


def graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process so far."""
    dynamo = sys.modules.get("torch._dynamo")
    return sum(dynamo.utils.counters["graph_break"].values()) if dynamo is not None else 0


def optimizers_of(built) -> list[torch.optim.Optimizer]:
    """The optimizers in what a workload's `build_optimizer` returned: one, or a tuple, list or dict of them."""
    if isinstance(built, torch.optim.Optimizer):
        return [built]
    values = built.values() if isinstance(built, dict) else built if isinstance(built, (tuple, list)) else ()
    found = [o for o in values if isinstance(o, torch.optim.Optimizer)]
    if not found or len(found) != len(values):
        raise TypeError(f"build_optimizer returned {type(built).__name__}: give a torch.optim.Optimizer, or a tuple, "
                        "list or dict of them")
    return found


def build_optimizer(workload: Workload, model: torch.nn.Module):
    """The workload's optimizer(s) over `model`: `build_optimizer(model)` when its first parameter is named `model`
    (nanoGPT's and minGPT's `model.configure_optimizers(...)`, parameter groups, a GAN's two optimizers), else
    `build_optimizer(model.parameters())`."""
    try:
        first = next(iter(inspect.signature(workload.build_optimizer).parameters), None)
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        first = None
    built = workload.build_optimizer(model if first == "model" else model.parameters())
    optimizers_of(built)
    return built


_built: list = []  # [(workload, its build_model, seed, the model as built, the CPU random-number state after it)]


def _seeded_model(workload: Workload, seed: int) -> torch.nn.Module:
    """`workload.build_model()` right after `torch.manual_seed(workload.seed + seed)`, leaving the random-number state
    where building leaves it. Every pass of every variant of a workload builds the same model from the same seed: the
    last one built is kept, and a copy of it stands in for building it again (a resnet18's initialisation costs
    several times its copy). A model that cannot be copied is built every time."""
    torch.manual_seed(workload.seed + seed)
    if _built and _built[0][0] is workload and _built[0][1] is workload.build_model and _built[0][2] == seed:
        *_, model, after = _built[0]
        _set_rng_states(after)
        return copy.deepcopy(model)
    model = workload.build_model()
    _built.clear()
    with contextlib.suppress(Exception):  # a module holding what deepcopy refuses (a generator, a handle): none kept
        _built.append((workload, workload.build_model, seed, copy.deepcopy(model), _rng_states()))
    return model


def _rng_states() -> tuple:
    """The CPU random-number state, and each GPU's where CUDA is in use (a model built on the GPU draws there)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_states(states: tuple) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def build_cell(workload: Workload, variant: Variant, device: torch.device, seed: int = 0) -> Cell:
    """A fresh cell: the model seeded, the optimizer over it, the variant's loop prepared for both.

    Building a cell forgets compiled code, so build every cell of a pass before running any whose loop
    compiles: a cell run after another is built recompiles on its next epoch."""
    reset_compiled()
    model = _seeded_model(workload, seed).to(device)
    if variant.ddp is not None:  # every rank starts from these weights; DDP broadcasts rank 0's all the same
        from bench.distributed import wrap

        model = wrap(model, device, variant.ddp)
    optimizer = build_optimizer(workload, model)
    loop = variant.loop_for(model, optimizer, device)
    criterion = workload.criterion.to(device) if workload.criterion is not None else None
    return Cell(workload, variant, device, model, optimizer, criterion, loop)


def stage_batches(workload: Workload, split: str, count: int, device: torch.device,
                  shard: tuple[int, int] | None = None) -> list:
    """`count` batches from the workload's DataLoader (cycled if it is shorter), already on `device`.

    Default cells measure the loop, not the input pipeline: batches are moved to the device once,
    before any pass, so the loop's own `.to(device)` is a no-op, as with a device-resident dataset.
    They are copies on the CPU too: a Dataset of whole batches hands out its own tensors, and a live
    loader's batch must never be the very tensor the sync pass counts as staged on the device.
    """
    loader = workload.loader(split, shard=shard)  # shard: (rank, ranks), this rank's part of each global batch
    staged: list = []
    while len(staged) < count:  # epoch after epoch, as the loader gives them
        epoch = [tree_map(lambda t: t.to(device, copy=True) if isinstance(t, torch.Tensor) else t,
                          tuple(batch) if isinstance(batch, list) else batch)  # a pair, a dict: any structure
                 for batch in itertools.islice(loader, count - len(staged))]
        if not epoch:  # cycling a loader that yields nothing would never end
            data = workload.train_data if split == "train" else workload.test_data
            size = len(data) if hasattr(data, "__len__") else "?"
            raise ValueError(f"workload {workload.name!r} has no {split} batch: {size} sample(s), batch_size "
                             f"{workload.batch_size}, drop_last={workload.drop_last} (a dataset smaller than one "
                             "batch with drop_last=True, or an empty one)")
        staged += epoch
    return staged


def parse_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" else name)
