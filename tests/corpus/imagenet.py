# Source: pytorch/examples, imagenet/main.py, commit 42068585f7da9a2f8656f793d21c30ee6806c6b9: train(),
# AverageMeter, ProgressMeter, accuracy()
"""pytorch/examples' ImageNet `train()`: the loss tracked by an `AverageMeter` weighted by `images.size(0)`, top-1
and top-5 accuracy meters holding device tensors, `zero_grad` between the loss and `backward()`, a progress line
every `print_freq` batches over `len(train_loader)`; SGD momentum + weight decay; a small BatchNorm convnet on
synthetic images. 100 training samples in batches of 32: every epoch ends with a batch of 4, as the example's
DataLoader (drop_last=False) gives it.

It does what loopmark's baseline does (zero_grad anywhere before `backward()` is the same loop), and its epoch
loss, `losses.avg`, is the sample-weighted mean of the batch losses: the mean loss of the epoch's samples. With
equal batches that is the mean of the batch losses; with the short last batch it is not, and it is still the
right epoch loss: `equivalent`.

Syncs on CUDA: `losses.update(loss.item(), ...)` once per step. `accuracy()` and the top-k meters stay on the
device (`self.sum += val * n` on tensors). `progress.display()` formats each top-k meter's `val` and `avg`,
0-dim tensors: `Tensor.__format__` calls `.item()`, 4 reads per display, on batches `i % PRINT_FREQ == 0`.
"""

import math
import time
from enum import Enum

import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops
from tests.corpus import kept, teacher_data

EXPECTED_VERDICT = "equivalent"
PRINT_FREQ = 3  # -p 3 (the default is 10)
TRAIN_SAMPLES, BATCH_SIZE = 100, 32
CHECK_STEPS = math.ceil(TRAIN_SAMPLES / BATCH_SIZE)  # a check epoch is one pass over the data, short batch last


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` every step; 4 `Tensor.__format__` reads per progress line."""
    return 1 + 4 * math.ceil(steps / PRINT_FREQ) / steps


class Summary(Enum):
    NONE = 0
    AVERAGE = 1


class AverageMeter:
    """Computes and stores the average and current value (the example's meter, without its all_reduce)."""

    def __init__(self, name, fmt=':f', summary_type=Summary.AVERAGE):
        self.name, self.fmt, self.summary_type = name, fmt, summary_type
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        fmtstr = '{name} {val' + self.fmt + '} ({avg' + self.fmt + '})'
        return fmtstr.format(**self.__dict__)


class ProgressMeter:
    def __init__(self, num_batches, meters, prefix=""):
        num_digits = len(str(num_batches // 1))
        fmt = '{:' + str(num_digits) + 'd}'
        self.batch_fmtstr = '[' + fmt + '/' + fmt.format(num_batches) + ']'
        self.meters = meters
        self.prefix = prefix

    def display(self, batch):
        entries = [self.prefix + self.batch_fmtstr.format(batch)]
        entries += [str(meter) for meter in self.meters]
        print('\t'.join(entries))


def accuracy(output, target, topk=(1,)):
    """Computes the accuracy over the k top predictions for the specified values of k"""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        res = []
        for k in topk:
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


def small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def workload() -> loops.Workload:
    x, y = teacher_data(TRAIN_SAMPLES + 64, (3, 16, 16), 10, seed=21)
    return loops.Workload(
        name="corpus-imagenet",
        build_model=small_convnet,
        build_optimizer=lambda params: torch.optim.SGD(params, 0.1, momentum=0.9, weight_decay=1e-4),
        criterion=nn.CrossEntropyLoss(),
        train_data=TensorDataset(x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES]),
        test_data=TensorDataset(x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]),
        batch_size=BATCH_SIZE,
        description="pytorch/examples imagenet train(): sample-weighted AverageMeter, 100 samples in batches of 32",
    )


def train(run: loops.Run):
    """The example's train(train_loader, model, criterion, optimizer, epoch, device, args) for one epoch;
    returns `losses.avg`."""
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
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % PRINT_FREQ == 0:
            progress.display(i + 1)
    return losses.avg
