# Source: huggingface/pytorch-image-models, train.py, commit 36b5d1adaa85f8c9d27862a5cd00c20cb2c37e3b:
# train_one_epoch(); timm/utils/cuda.py, commit 1766a01f96bb7e83991a58bd4bf5cf682d07c32e: NativeScaler;
# timm/utils/clip_grad.py: dispatch_clip_grad(); timm/utils/metrics.py: AverageMeter
"""timm's `train_one_epoch()` with `--clip-grad 5 --amp` and no scheduler: the loss scaler (`GradScaler`:
`scale(loss).backward()`, `unscale_(optimizer)`, `clip_grad_norm_`, `step`, `update`), `len(loader)` for the last
batch and the updates per epoch, `optimizer.zero_grad()` once before the loop and after every update, a sample-
weighted loss meter, `_logger.info` every `log_interval` updates; SGD with Nesterov momentum; a small BatchNorm
convnet on synthetic images. The scaler and float16 autocast are on where timm turns them on, on CUDA
(`enabled=(device.type == "cuda")`).

On the CPU the check runs on, the scaler and autocast are off and the clipping never binds (the gradient norms
stay below 1 here; max_norm is 5, so every gradient is multiplied by exactly 1.0): the baseline's steps, and a
sample-weighted epoch loss equal to the mean batch loss within rounding: `equivalent`. (On CUDA float16
autocast makes it `different`.)

Syncs on CUDA: `losses_m.update(loss.item() * accum_steps, ...)` every step, and `GradScaler.step`, which reads
`found_inf` back to decide whether to step (`_maybe_opt_step`: `sum(v.item() for v in found_inf_per_device)`,
torch/amp/grad_scaler.py) with an optimizer that does not fuse the scaling: 2 per step. `scale`, `unscale_`
(`_amp_foreach_non_finite_check_and_unscale_`), `update` (`_amp_update_scale_`) and `clip_grad_norm_`
(`error_if_nonfinite=False`) read nothing back; the log line formats Python floats.
"""

import logging
import time
from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops
from tests.corpus import kept, teacher_data

_logger = logging.getLogger(__name__)

EXPECTED_VERDICT = "equivalent"
CLIP_GRAD, CLIP_MODE = 5.0, 'norm'  # --clip-grad 5 --clip-mode norm
GRAD_ACCUM_STEPS = 1
LOG_INTERVAL = 2  # --log-interval 2 (the default is 50)


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` for the loss meter and `GradScaler.step`'s read of found_inf, every step."""
    return 2.0


def CPU_SYNCS_PER_STEP(steps: int) -> float:
    """What the CPU stand-in counts: the script turns its GradScaler on only when `device.type == "cuda"`, a
    branch that is false without a GPU (docs/measurement.md, "Syncs": where the CPU count differs), so only
    `loss.item()`."""
    return 1.0


class AverageMeter:
    """Computes and stores the average and current value"""

    def __init__(self):
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


def dispatch_clip_grad(parameters, value: float, mode: str = 'norm', norm_type: float = 2.0):
    if mode == 'norm':
        torch.nn.utils.clip_grad_norm_(parameters, value, norm_type=norm_type)
    elif mode == 'value':
        torch.nn.utils.clip_grad_value_(parameters, value)
    else:
        raise ValueError(f"Unknown clip mode ({mode}).")


class NativeScaler:
    state_dict_key = "amp_scaler"

    def __init__(self, device: torch.device):
        self._scaler = torch.amp.GradScaler("cuda", enabled=(device.type == "cuda"))

    def __call__(self, loss, optimizer, clip_grad=None, clip_mode='norm', parameters=None, create_graph=False,
                 need_update=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if need_update:
            if clip_grad is not None:
                assert parameters is not None
                self._scaler.unscale_(optimizer)  # unscale the gradients of optimizer's assigned params in-place
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            self._scaler.step(optimizer)
            self._scaler.update()


def small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.GELU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def workload() -> loops.Workload:
    x, y = teacher_data(384 + 96, (3, 16, 16), 10, seed=71)
    return loops.Workload(
        name="corpus-timm",
        build_model=small_convnet,
        build_optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                       weight_decay=2e-5),
        criterion=nn.CrossEntropyLoss(),
        train_data=TensorDataset(x[:384], y[:384]),
        test_data=TensorDataset(x[384:], y[384:]),
        batch_size=32,
        description="timm train_one_epoch(): GradScaler + unscale_ + clip_grad_norm_ (not binding), SGD nesterov",
    )


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, device, amp_autocast, loss_scaler):
    second_order = hasattr(optimizer, 'is_second_order') and optimizer.is_second_order
    update_time_m = AverageMeter()
    data_time_m = AverageMeter()
    losses_m = AverageMeter()

    model.train()

    accum_steps = GRAD_ACCUM_STEPS
    last_accum_steps = len(loader) % accum_steps
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx = len(loader) - 1
    last_batch_idx_to_accum = len(loader) - last_accum_steps

    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps

        input, target = input.to(device), target.to(device)

        # multiply by accum steps to get equivalent for full update
        data_time_m.update(accum_steps * (time.time() - data_start_time))

        def _forward():
            with amp_autocast():
                output = model(input)  # noqa: B023 (the closure runs in this iteration)
                loss = loss_fn(output, target)  # noqa: B023
            if accum_steps > 1:  # noqa: B023
                loss /= accum_steps  # noqa: B023
            return loss

        def _backward(_loss):
            loss_scaler(
                _loss,
                optimizer,
                clip_grad=CLIP_GRAD,
                clip_mode=CLIP_MODE,
                parameters=model.parameters(),
                create_graph=second_order,
                need_update=need_update,  # noqa: B023
            )

        loss = _forward()
        _backward(loss)

        losses_m.update(loss.item() * accum_steps, input.size(0))
        update_sample_count += input.size(0)

        if not need_update:
            data_start_time = time.time()
            continue

        num_updates += 1
        optimizer.zero_grad()

        time_now = time.time()
        update_time_m.update(time.time() - update_start_time)
        update_start_time = time_now

        if update_idx % LOG_INTERVAL == 0:
            lrl = [param_group['lr'] for param_group in optimizer.param_groups]
            lr = sum(lrl) / len(lrl)
            loss_avg, loss_now = losses_m.avg, losses_m.val
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  '
                f'Time: {update_time_m.val:.3f}s ({update_time_m.avg:.3f}s)  '
                f'LR: {lr:.3e}  '
                f'Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})'
            )

        update_sample_count = 0
        data_start_time = time.time()
        # end for

    return OrderedDict([('loss', losses_m.avg)])


def train(run: loops.Run):
    """One epoch of timm's train_one_epoch(); the scaler and autocast are set up once, as train.py's main() does."""
    device = run.device
    state = kept(run.optimizer, lambda: {"epoch": 0, "loss_scaler": NativeScaler(device)})
    epoch = state["epoch"]
    state["epoch"] += 1
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=torch.float16,
                           enabled=(device.type == "cuda"))
    metrics = train_one_epoch(epoch, run.model, run.batches, run.optimizer, run.criterion, device, amp_autocast,
                              state["loss_scaler"])
    return metrics['loss']
