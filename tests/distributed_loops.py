"""A user's distributed loops and workloads for tests/test_distributed.py: each runs on every rank under torchrun."""

import os
import signal
import time

import torch
import torch.distributed as dist

from loops import Idioms, TrainLoop, distributed, workloads


@distributed()
def crash_on_rank_1(run):
    """The seed's loop, but rank 1 dies in its first step (a segfault, an OOM kill)."""
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return TrainLoop(Idioms(), run.model, run.optimizer, run.device)(run)


@distributed()
def stuck_on_rank_1(run):
    """Rank 1 stops in a call that no signal interrupts (SIGALRM blocked), as in a collective whose peer is gone."""
    if dist.get_rank() == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    return TrainLoop(Idioms(), run.model, run.optimizer, run.device)(run)


class _AllReducedLoss(torch.nn.Module):
    """A loss that all-reduces a copy of itself on every call, for a log line: one more collective per step."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion = criterion

    def forward(self, output, target):
        loss = self.criterion(output, target)
        if dist.is_initialized():
            dist.all_reduce(loss.detach().clone())
        return loss


def mlp_with_extra_all_reduce():
    """The built-in mlp, named mlp, whose loss all-reduces once more per step: what `compare` must catch."""
    w = workloads.mlp()
    w.criterion = _AllReducedLoss(w.criterion)
    return w


@distributed()
def tutorial_epoch(run):
    """One epoch as the DDP tutorials write it: peek at the first batch for the log line, set the sampler's epoch
    without a guard, F.cross_entropy rather than a criterion object, the loss kept as a detached sum."""
    batch_size = len(next(iter(run.batches))[0])
    run.batches.sampler.set_epoch(run.epoch)
    run.model.train()
    total, steps = torch.zeros((), device=run.device), 0
    for source, targets in run.batches:
        source, targets = source.to(run.device), targets.to(run.device)
        run.optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(run.model(source), targets)
        loss.backward()
        run.optimizer.step()
        total += loss.detach()
        steps += 1
    assert batch_size > 0
    return (total / steps).item()


@distributed()
def raises_on_rank_1(run):
    """The seed's loop, but rank 1 raises in its first step (a rank-dependent bug)."""
    if dist.get_rank() == 1:
        raise RuntimeError("only rank 1 fails")
    return TrainLoop(Idioms(), run.model, run.optimizer, run.device)(run)
