# Source: huggingface/transformers, src/transformers/trainer.py, commit 2cda12cbf6e476183e68ec476551fa7e3717394a:
# Trainer._inner_training_loop and Trainer.training_step (gradient accumulation, the loss divided by
# gradient_accumulation_steps, clip_grad_norm_, optimizer.step, lr_scheduler.step, model.zero_grad)
"""The Hugging Face Trainer's inner loop with `gradient_accumulation_steps=2`: batches are dicts
(`{"input_ids": ..., "labels": ...}`), `outputs = model(**inputs)` and the loss the model computes itself
(`outputs.loss`), `loss = loss / self.args.gradient_accumulation_steps` (the model does not take
`num_items_in_batch`), `loss.backward()`, `tr_loss += loss.detach()`; every second batch
`clip_grad_norm_(model.parameters(), max_grad_norm=1.0)`, `optimizer.step()`, `lr_scheduler.step()` (constant),
`model.zero_grad()`; the epoch's `tr_loss.item() / steps`. The model is hf_glue's tiny RoBERTa classifier.

Each step consumes the sum of its two backward passes, each of a loss divided by 2: the mean gradient of two batches,
clipped: the random-init classifier's gradient norm is above `max_grad_norm` (1.0, the Trainer's default), so the
clipping binds and each step uses a scaled copy of that gradient: `different`. (loopmark's baseline cannot run dict
batches: nothing is compared with it.)

Syncs on CUDA, once per epoch each: `torch.tensor(0.0, device=...)` (a host scalar copied to the device: a blocking
copy from pageable memory) and `tr_loss.item()`.
"""

import torch
from torch.utils.data import Dataset

import loops
from tests.corpus.hf_glue import TinyRobertaForSequenceClassification, _sentences

EXPECTED_VERDICT = "different"
GRADIENT_ACCUMULATION_STEPS, MAX_GRAD_NORM, LEARNING_RATE = 2, 1.0, 5e-4
DIVIDE = True  # Trainer.training_step: `loss = loss / self.args.gradient_accumulation_steps`


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`torch.tensor(0.0, device=...)` and `tr_loss.item()` once per epoch."""
    return 2 / steps


class DictDataset(Dataset):
    """Features as a `datasets` dataset gives them to the Trainer: one dict per example."""

    def __init__(self, n: int, seed: int):
        self.data = _sentences(n, seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        input_ids, label = self.data[i]
        return {"input_ids": input_ids, "labels": label}


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-hf-trainer", build_model=TinyRobertaForSequenceClassification,
        build_optimizer=lambda params: torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0), criterion=None,
        train_data=DictDataset(256, seed=85), test_data=DictDataset(64, seed=86), batch_size=16, drop_last=True,
        check_steps=4,  # batches per epoch of the correctness pass: two optimizer steps of two batches
        description="transformers Trainer inner loop: dict batches, model(**inputs).loss, accumulation 2, clipping",
    )


def training_step(model, inputs, device, divide: bool):
    model.train()
    inputs = {k: v.to(device) for k, v in inputs.items()}  # Trainer._prepare_inputs
    outputs = model(**inputs)
    loss = outputs.loss
    if divide:
        loss = loss / GRADIENT_ACCUMULATION_STEPS
    loss.backward()  # accelerator.backward(loss)
    return loss.detach()


def inner_loop(run: loops.Run, divide: bool):
    model, optimizer = run.model, run.optimizer
    tr_loss = torch.tensor(0.0, device=run.device)
    steps = 0
    for step, inputs in enumerate(run.batches):
        tr_loss += training_step(model, inputs, run.device, divide)
        if (step + 1) % GRADIENT_ACCUMULATION_STEPS == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            model.zero_grad()
            steps += 1
    return tr_loss.item() / max(steps, 1)


def train(run: loops.Run):
    return inner_loop(run, DIVIDE)
