# Source: karpathy/nanoGPT, train.py, commit e2221318e607eb5ee0669d6b7641af25a2111545: the training loop, with a
# planted bug
"""PLANTED BUG: nanoGPT's loop with `optimizer.zero_grad(set_to_none=True)` moved into the micro-step loop, before
each forward: every micro-batch's backward pass starts from a cleared `.grad`, so each step consumes the last
micro-batch's gradient alone (halved by `/ gradient_accumulation_steps`): `broken`. The reported loss cannot show it
(nanoGPT logs the last micro-batch's loss either way), and neither can a falling loss.

Syncs on CUDA: as the correct loop.
"""

import torch

import loops
from tests.corpus import kept
from tests.corpus.nanogpt import (
    CPU_SYNCS_PER_STEP,
    CUDA_SYNCS_PER_STEP,
    GRAD_CLIP,
    GRADIENT_ACCUMULATION_STEPS,
    LOG_INTERVAL,
    _setup,
    get_lr,
    workload,
)

__all__ = ["CPU_SYNCS_PER_STEP", "CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "train", "workload"]

EXPECTED_VERDICT = "broken"


def train(run: loops.Run):
    model, optimizer = run.model, run.optimizer
    state = kept(optimizer, lambda: _setup(run))
    scaler, ctx = state["scaler"], state["ctx"]
    batches = iter(run.batches)
    X, Y = next(batches)
    model.train()
    while X is not None:
        iter_num = state["iter_num"]
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for _micro_step in range(GRADIENT_ACCUMULATION_STEPS):
            optimizer.zero_grad(set_to_none=True)  # the bug: inside the accumulation loop
            with ctx:
                logits, loss = model(X, Y)  # noqa: RUF059 (the source's line)
                loss = loss / GRADIENT_ACCUMULATION_STEPS
            X, Y = next(batches, (None, None))
            scaler.scale(loss).backward()
        if GRAD_CLIP != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        if iter_num % LOG_INTERVAL == 0:
            lossf = loss.item() * GRADIENT_ACCUMULATION_STEPS
            print(f"iter {iter_num}: loss {lossf:.4f}")
        state["iter_num"] += 1
