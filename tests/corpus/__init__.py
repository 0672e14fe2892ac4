"""A corpus of real public training loops, each adapted to loopmark's contract and nothing more.

Every module holds one loop from a public source (named, with its commit, in the comment at its top), re-expressed
as docs/own-loops.md asks: a workload function `workload()` returning `loops.Workload`
(a small random-init model, seeded data, the optimizer the source builds) and a variant `train(run)` that runs one
epoch over `run.batches` with `run.model`, `run.optimizer`, `run.criterion` and `run.device` and returns the epoch
loss. The loop body is the source's: its own loss call, dropout, clipping, scheduler, `len(train_loader)`, log
lines. What a script builds once before its epoch loop (an LR scheduler, a GradScaler, its epoch counter) is made
on the loop's first epoch and kept with the optimizer (`kept`).

Each module also declares what a correct tool must answer for it:

* `EXPECTED_VERDICT`: `identical`/`equivalent` when the loop does what loopmark's baseline does, `consistent` when
  the baseline cannot run the workload (dict batches, two optimizers) and every step is right, `different` when
  every step uses a function of its own batch's gradient only but not the baseline's (clipping that binds, an LR
  schedule), `broken` for the planted bugs;
* `CUDA_SYNCS_PER_STEP(steps)`: host-device syncs per step on CUDA over an epoch of `steps` batches, worked out
  from the code (a sync made once per epoch counts `1 / steps`);
* `CHECK_STEPS` (optional): steps per epoch of the correctness check, where an epoch must be a whole pass over
  the data.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import TensorDataset

CORRECT = ["mnist", "imagenet", "cifar", "vae", "model_parallel", "word_language_model", "transformer_tutorial",
           "timm_train", "hf_glue", "nanogpt", "mingpt", "dcgan", "hf_trainer"]
BROKEN = ["mnist_no_zero_grad", "cifar_loss_sum", "imagenet_zero_grad_between", "nanogpt_zero_grad_in_micro_loop",
          "dcgan_no_zero_grad", "hf_trainer_undivided"]
MODULES = CORRECT + BROKEN

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept(optimizer: torch.optim.Optimizer, make: Callable[[], Any]) -> Any:
    """What a script sets up once before its epoch loop and uses from epoch to epoch (its epoch counter, an LR
    scheduler, a GradScaler): `make()` on the first epoch a loop runs with this optimizer, the same object on
    every later epoch. A fresh optimizer (a fresh cell) starts afresh."""
    state = _KEPT.get(optimizer)
    if state is None:
        state = _KEPT[optimizer] = make()
    return state


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel values in [0, 1]
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(11))
    return x[order], y[order]


def digits(start: int, stop: int, images: bool = True) -> TensorDataset:
    """scikit-learn's bundled 8x8 handwritten digits (real data, shipped with the package), samples
    `start:stop` of a fixed shuffle: images of shape (1, 8, 8), or flat 64-vectors."""
    x, y = _digits()
    x, y = x[start:stop], y[start:stop]
    return TensorDataset(x.view(-1, 1, 8, 8) if images else x, y)


def teacher_data(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(x[0].numel(), classes, generator=g)
    return x, (x.flatten(1) @ teacher).argmax(1)


def token_stream(n: int, vocab: int, seed: int) -> torch.Tensor:
    """A seeded token sequence with structure to learn: each token is the previous one plus a step drawn from a
    small set (a Markov chain over `vocab` symbols)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor([1, 2, 3, vocab - 1])[torch.randint(0, 4, (n,), generator=g)]
    return torch.cumsum(steps, 0) % vocab
