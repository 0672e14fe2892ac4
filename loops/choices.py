"""The choices a training loop resolves before it starts: zeroing style and placement, precision, and the
optimizer's kernels. Each is a table from the `Idioms` value to what the loop calls."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


# ---------------------------------------------------------------- zeroing style
def zero_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()  # set_to_none=True, the default since PyTorch 2.0


def zero_optimizer_keep(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=False)  # one zero_() per parameter tensor


def zero_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.zero_grad()


def zero_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


ZEROING = {
    "optimizer": zero_optimizer,
    "optimizer_set_to_none_false": zero_optimizer_keep,
    "model": zero_model,
    "manual_none": zero_by_hand,
}

# where in the step zero_grad() runs ("missing": nowhere)
ZERO_GRAD_AT = ("before_forward", "before_backward", "between_backward_and_step", "after_step", "missing")


# ---------------------------------------------------------------- no_sync under DistributedDataParallel
def _quiet(model: nn.Module) -> contextlib.AbstractContextManager:
    """`model.no_sync()`: the gradients this backward adds are not all-reduced (DDP decides in the forward)."""
    if not hasattr(model, "no_sync"):
        raise ValueError("no_sync needs the model wrapped in DistributedDataParallel (loopmark run --nproc-per-node N)")
    return model.no_sync()


def _none(i: int, k: int) -> tuple[bool, bool]:
    return False, False


# which micro-batches of k run under `model.no_sync()`: (i, k) -> (forward and backward inside, backward alone inside)
NO_SYNC = {
    "none": _none,
    # the documented idiom: every micro-batch but the last skips the all-reduce, forward included
    "forward_and_backward": lambda i, k: (i < k - 1, False),
    # no_sync() around backward() alone: DDP has already decided in the forward, so every micro-batch all-reduces
    "backward_only": lambda i, k: (False, i < k - 1),
    # `if i != 0: with no_sync()`: syncs the first micro-batch and skips the last, so each rank steps on its own sum
    "off_by_one": lambda i, k: (i > 0, False),
}


_NO_CONTEXTS = (contextlib.nullcontext(), contextlib.nullcontext())  # a nullcontext holds no state: reused


def no_sync_contexts(mode: str, model: nn.Module, i: int, k: int):
    """(context around micro-batch i's forward and backward, context around its backward alone)."""
    if mode == "none":  # every step of every loop outside DDP: no table look-up, no new objects
        return _NO_CONTEXTS
    around, backward = NO_SYNC[mode](i, k)
    return (_quiet(model) if around else contextlib.nullcontext(),
            _quiet(model) if backward else contextlib.nullcontext())


# ---------------------------------------------------------------- precision
PRECISION = ("fp32", "bf16_autocast", "fp16_grad_scaler")


def autocast(precision: str, device: torch.device):
    """The context the forward pass and loss run in; one object, entered once per step."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16_autocast" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16. A disabled one passes through: `scale(loss)` is `loss` and
    `step(optimizer)` is `optimizer.step()`, so the loop is written once for every precision. One per cell,
    so that its scale carries over from epoch to epoch."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16_grad_scaler")


# ---------------------------------------------------------------- optimizer implementation
OPTIMIZER_IMPL = ("default", "for_loop", "foreach", "fused")


def use_implementation(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Select the optimizer's for-loop, foreach (multi-tensor) or fused kernels, as the constructor's
    `foreach=`/`fused=` would: in every param group (what step() reads) and in the defaults (what
    zero_grad(set_to_none=False) reads: one _foreach_zero_ instead of a zero_() per parameter tensor)."""
    if impl == "default":
        return
    for flags in (optimizer.defaults, *optimizer.param_groups):
        flags["foreach"] = impl == "foreach"
        flags["fused"] = impl == "fused"
