# Source: karpathy/minGPT, mingpt/trainer.py, commit 00aa9cb2edfd85f4bd80d256838ed7eec3088921: Trainer.__init__
# (the device chosen once) and Trainer.run (the step); projects/chargpt/chargpt.py's on_batch_end callback
"""minGPT's `Trainer`: the device is chosen once, when the trainer is made (`self.device = config.device`, then
`self.model.to(self.device)`), and every batch is moved there (`batch = [t.to(self.device) for t in batch]`); the
model computes its own loss (`logits, self.loss = model(x, y)`); `model.zero_grad(set_to_none=True)` after the
forward; `self.loss.backward()`; `clip_grad_norm_(model.parameters(), config.grad_norm_clip)`; `optimizer.step()`;
the optimizer is the model's own (`model.configure_optimizers(config)`: AdamW, decayed and undecayed groups); the
chargpt callback prints `trainer.loss.item()` every `LOG_EVERY` iterations. The trainer is made on the loop's first
epoch and kept (minGPT makes it once), so the device it keeps is the one the first epoch was given. The model is the
nanoGPT module's one-block GPT (minGPT's has the same `forward(idx, targets) -> (logits, loss)`). The loop reports no
epoch loss: `train` returns None.

The random-init model's gradient norm stays below `grad_norm_clip` (1.0) on these batches, so clipping does not bind:
each step is the baseline's step (`model.zero_grad` after the forward clears what `optimizer.zero_grad` before it
would, the optimizer is the same): `identical`.

Syncs on CUDA: the batch is on the device already (`.to(self.device)` is a no-op), `clip_grad_norm_` reads nothing;
the callback's `trainer.loss.item()` every `LOG_EVERY` iterations.
"""

from types import SimpleNamespace

import torch

import loops
from tests.corpus import kept
from tests.corpus.nanogpt import GPT, _windows

EXPECTED_VERDICT = "identical"
LOG_EVERY = 2
GRAD_NORM_CLIP, LEARNING_RATE, BETAS, WEIGHT_DECAY = 1.0, 5e-4, (0.9, 0.95), 0.1


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`trainer.loss.item()` at every LOG_EVERY-th iteration."""
    return 1 / LOG_EVERY


def workload() -> loops.Workload:
    def build_optimizer(model):
        config = SimpleNamespace(weight_decay=WEIGHT_DECAY, learning_rate=LEARNING_RATE, betas=BETAS)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)

    return loops.Workload(
        name="corpus-mingpt", build_model=GPT, build_optimizer=build_optimizer, criterion=None,
        train_data=_windows(256, seed=95), test_data=_windows(64, seed=96), batch_size=16, drop_last=True,
        description="minGPT Trainer: device kept from construction, model's own loss, clipping, AdamW groups",
    )


class Trainer:
    def __init__(self, config, model):
        self.config, self.model = config, model
        self.device = config.device
        self.model = self.model.to(self.device)
        self.iter_num = 0
        self.loss = None


def on_batch_end(trainer):
    if trainer.iter_num % LOG_EVERY == 0:
        print(f"iter {trainer.iter_num}: train loss {trainer.loss.item():.5f}")


def train(run: loops.Run):
    trainer = kept(run.optimizer, lambda: Trainer(SimpleNamespace(device=run.device,
                                                                  grad_norm_clip=GRAD_NORM_CLIP), run.model))
    model, config, optimizer = trainer.model, trainer.config, run.optimizer
    model.train()
    for batch in run.batches:
        batch = [t.to(trainer.device) for t in batch]
        x, y = batch
        logits, trainer.loss = model(x, y)  # noqa: RUF059 (the source's line)
        model.zero_grad(set_to_none=True)
        trainer.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_norm_clip)
        optimizer.step()
        on_batch_end(trainer)
        trainer.iter_num += 1
