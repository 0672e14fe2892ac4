# Source: huggingface/transformers, examples/pytorch/text-classification/run_glue_no_trainer.py, commit
# a22a4378d97d06b7a1d9abad6e0086d30fdea199: the training loop of main() and its linear scheduler;
# src/transformers/models/roberta/modeling_roberta.py, commit 87b236ba2be8b3e48a7d0c8ca6513302736d2886:
# RobertaForSequenceClassification.forward and RobertaClassificationHead
"""Hugging Face's `run_glue_no_trainer.py` training loop with `--with_tracking`: `outputs = model(**batch)` and
the loss the model computes itself (`RobertaForSequenceClassification`: `labels = labels.to(logits.device)`, then
`CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))`), `total_loss += loss.detach().float()`,
`step == len(train_dataloader) - 1`, `optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()` with the
linear schedule (no warmup) over `num_train_epochs * len(train_dataloader)` steps, and the epoch's
`total_loss.item() / len(train_dataloader)`; AdamW; a tiny RoBERTa-style classifier (embeddings, one encoder
layer, the classification head, dropout 0.1) on synthetic token sequences.

Each step uses its own batch's gradient, at a learning rate that falls linearly step by step: the parameters
leave the baseline's (constant learning rate): `different`.

Syncs on CUDA: `labels.to(logits.device)` is a no-op (the labels are on that device already), the running loss
stays on the device, `LambdaLR.step()` computes in Python; one read per epoch, `total_loss.item()`.
"""

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

import loops
from tests.corpus import kept

EXPECTED_VERDICT = "different"
VOCAB, HIDDEN, HEADS, SEQ_LEN, NUM_LABELS = 24, 16, 2, 8, 2
HIDDEN_DROPOUT_PROB = 0.1
LEARNING_RATE = 1e-3  # --learning_rate 1e-3
NUM_TRAIN_EPOCHS = 3  # its default
GRADIENT_ACCUMULATION_STEPS = 1
NUM_WARMUP_STEPS = 0


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`total_loss.item()` once per epoch."""
    return 1 / steps


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class RobertaClassificationHead(nn.Module):
    """Head for sentence-level classification tasks."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = nn.Dropout(HIDDEN_DROPOUT_PROB)
        self.out_proj = nn.Linear(HIDDEN, NUM_LABELS)

    def forward(self, features, **kwargs):
        x = features[:, 0, :]  # take <s> token (equiv. to [CLS])
        x = self.dropout(x)
        x = self.dense(x)
        x = torch.tanh(x)
        x = self.dropout(x)
        x = self.out_proj(x)
        return x


class TinyRobertaForSequenceClassification(nn.Module):
    """RobertaForSequenceClassification over a one-layer encoder (word and position embeddings, LayerNorm,
    dropout, one self-attention layer)."""

    def __init__(self):
        super().__init__()
        self.num_labels = NUM_LABELS
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(SEQ_LEN, HIDDEN)
        self.layer_norm = nn.LayerNorm(HIDDEN)
        self.dropout = nn.Dropout(HIDDEN_DROPOUT_PROB)
        self.layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, HIDDEN_DROPOUT_PROB, activation="gelu",
                                                batch_first=True)
        self.classifier = RobertaClassificationHead()

    def forward(self, input_ids=None, labels=None):
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        sequence_output = self.layer(self.dropout(self.layer_norm(embeddings)))
        logits = self.classifier(sequence_output)

        loss = None
        if labels is not None:
            # move labels to correct device to enable model parallelism
            labels = labels.to(logits.device)
            loss_fct = CrossEntropyLoss()
            loss = loss_fct(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LogitsCrossEntropy(nn.Module):
    """The model's own loss as a criterion of (model output, labels), for loopmark's baseline."""

    def forward(self, output, labels):
        return CrossEntropyLoss()(output.logits.view(-1, NUM_LABELS), labels.view(-1))


def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, last_epoch=-1):
    """transformers' linear schedule (what `get_scheduler("linear", ...)` returns): warmup, then a linear fall
    to 0 at `num_training_steps`."""
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch)


def _sentences(n: int, seed: int) -> TensorDataset:
    """Token sequences starting with <s> (token 0); the label says whether token 1 appears in the rest."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    ids[:, 0] = 0
    return TensorDataset(ids, (ids[:, 1:] == 1).any(1).long())


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-hf-glue",
        build_model=TinyRobertaForSequenceClassification,
        build_optimizer=lambda params: torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0),
        criterion=LogitsCrossEntropy(),
        train_data=_sentences(512, seed=81),
        test_data=_sentences(128, seed=82),
        batch_size=32,
        description="transformers run_glue_no_trainer loop: model(**batch).loss, linear LR decay per step, AdamW",
    )


def _setup(optimizer, train_dataloader):
    """What main() sets up before its epoch loop: the step count, the scheduler, the progress bar."""
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / GRADIENT_ACCUMULATION_STEPS)
    max_train_steps = NUM_TRAIN_EPOCHS * num_update_steps_per_epoch
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, NUM_WARMUP_STEPS, max_train_steps)
    progress_bar = tqdm(range(max_train_steps), disable=not sys.stderr.isatty())
    return {"max_train_steps": max_train_steps, "lr_scheduler": lr_scheduler, "progress_bar": progress_bar,
            "completed_steps": 0}


def train(run: loops.Run):
    """One epoch of the script's `for epoch in range(starting_epoch, args.num_train_epochs)` loop (training
    part); returns the train_loss it logs."""
    model, optimizer, train_dataloader = run.model, run.optimizer, run.batches
    state = kept(optimizer, lambda: _setup(optimizer, train_dataloader))
    lr_scheduler, progress_bar = state["lr_scheduler"], state["progress_bar"]
    model.train()
    total_loss = 0
    for step, (input_ids, labels) in enumerate(train_dataloader):
        batch = {"input_ids": input_ids, "labels": labels}
        outputs = model(**batch)
        loss = outputs.loss
        # We keep track of the loss at each epoch
        total_loss += loss.detach().float()
        loss = loss / GRADIENT_ACCUMULATION_STEPS
        loss.backward()  # accelerator.backward(loss): no mixed precision, no DeepSpeed
        if step % GRADIENT_ACCUMULATION_STEPS == 0 or step == len(train_dataloader) - 1:
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            progress_bar.update(1)
            state["completed_steps"] += 1

        if state["completed_steps"] >= state["max_train_steps"]:
            break
    return total_loss.item() / len(train_dataloader)
