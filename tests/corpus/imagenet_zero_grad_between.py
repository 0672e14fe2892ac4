# Source: pytorch/examples, imagenet/main.py, commit 42068585f7da9a2f8656f793d21c30ee6806c6b9: train(), with a
# planted bug
"""PLANTED BUG: pytorch/examples' ImageNet `train()` with `optimizer.zero_grad()` moved one line down, between
`loss.backward()` and `optimizer.step()`.

Every step clears the gradient it has just computed (to None), so SGD updates nothing: `broken`.

Syncs on CUDA: as the correct loop, `loss.item()` every step and 4 `Tensor.__format__` reads per progress line.
"""

import math
import time

import loops
from tests.corpus import kept
from tests.corpus.imagenet import (
    CHECK_STEPS,
    PRINT_FREQ,
    AverageMeter,
    ProgressMeter,
    Summary,
    accuracy,
    workload,
)

__all__ = ["CHECK_STEPS", "CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "train", "workload"]

EXPECTED_VERDICT = "broken"


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` every step; 4 `Tensor.__format__` reads per progress line."""
    return 1 + 4 * math.ceil(steps / PRINT_FREQ) / steps


def train(run: loops.Run):
    """The example's train() for one epoch with `optimizer.zero_grad()` moved below `loss.backward()`."""
    train_loader, model, criterion, optimizer, device = run.batches, run.model, run.criterion, run.optimizer, \
        run.device
    state = kept(optimizer, lambda: {"epoch": 0})
    epoch = state["epoch"]
    state["epoch"] += 1

    batch_time = AverageMeter('Time', ':6.3f', Summary.NONE)
    data_time = AverageMeter('Data', ':6.3f', Summary.NONE)
    losses = AverageMeter('Loss', ':.4e', Summary.NONE)
    top1 = AverageMeter('Acc@1', ':6.2f', Summary.NONE)
    top5 = AverageMeter('Acc@5', ':6.2f', Summary.NONE)
    progress = ProgressMeter(
        len(train_loader),
        [batch_time, data_time, losses, top1, top5],
        prefix="Epoch: [{}]".format(epoch))  # noqa: UP032

    # switch to train mode
    model.train()

    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        data_time.update(time.time() - end)

        # move data to the same device as model
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)

        # compute output
        output = model(images)
        loss = criterion(output, target)

        # measure accuracy and record loss
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), images.size(0))
        top1.update(acc1[0], images.size(0))
        top5.update(acc5[0], images.size(0))

        # compute gradient and do SGD step
        loss.backward()
        optimizer.zero_grad()
        optimizer.step()

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % PRINT_FREQ == 0:
            progress.display(i + 1)
    return losses.avg
