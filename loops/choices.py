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
