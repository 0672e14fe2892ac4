# Source: karpathy/nanoGPT, train.py, commit e2221318e607eb5ee0669d6b7641af25a2111545: the training loop
# (get_lr, gradient accumulation with a GradScaler, clipping, zero_grad(set_to_none=True), the logged lossf);
# model.py's GPT.forward(idx, targets) -> (logits, loss) and GPT.configure_optimizers
"""nanoGPT's `train.py` loop: the model computes its own loss (`logits, loss = model(X, Y)`, no criterion), two
micro-batches per step (`loss = loss / gradient_accumulation_steps`), each drawn before the previous one's backward
(`X, Y = get_batch('train')`), `scaler.scale(loss).backward()`, `scaler.unscale_(optimizer)` and
`clip_grad_norm_(model.parameters(), grad_clip)`, `scaler.step(optimizer); scaler.update()`,
`optimizer.zero_grad(set_to_none=True)`, the cosine learning rate with warmup set on every param group each
iteration, and `lossf = loss.item() * gradient_accumulation_steps` at each logged iteration. The optimizer is the
model's own: `model.configure_optimizers(weight_decay, learning_rate, betas, device_type)` (AdamW, decayed and
undecayed groups; fused only on CUDA). The GradScaler is enabled (nanoGPT enables it for float16); the loop reports no
epoch loss (nanoGPT has none), so `train` returns None.

Each step consumes the mean gradient of its two micro-batches, unscaled by the GradScaler (a power of two) and
clipped where the norm passes 1.0; the learning rate changes each iteration and a step sees two batches where
loopmark's baseline sees one: `different`.

Syncs on CUDA per optimizer step (two batches): the logged `loss.item()`; AdamW is fused on CUDA, so
`scaler.step` hands `found_inf` to the kernel without reading it back, and `clip_grad_norm_` reads nothing: one
sync per two batches. On the CPU stand-in `device_type` is 'cpu', AdamW is not fused, and `scaler.step` reads
`found_inf` with `.item()`: one more.
"""

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import loops
from tests.corpus import kept, token_stream

EXPECTED_VERDICT = "different"
VOCAB, BLOCK_SIZE, N_EMBD, N_HEAD = 16, 8, 32, 2
GRADIENT_ACCUMULATION_STEPS = 2
LEARNING_RATE, MIN_LR, WARMUP_ITERS, LR_DECAY_ITERS = 6e-4, 6e-5, 2, 20
WEIGHT_DECAY, BETA1, BETA2, GRAD_CLIP = 1e-1, 0.9, 0.95, 1.0
LOG_INTERVAL = 1


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """The logged `loss.item()` once per optimizer step of two batches."""
    return 1 / GRADIENT_ACCUMULATION_STEPS


def CPU_SYNCS_PER_STEP(steps: int) -> float:
    """On the stand-in AdamW is not fused: `scaler.step` reads `found_inf` too."""
    return 2 / GRADIENT_ACCUMULATION_STEPS


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        k = k.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        q = q.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        v = v.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(N_EMBD), CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(N_EMBD)
        self.mlp = nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A one-block GPT: token and position embeddings, a block, the final LayerNorm, the tied LM head."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, N_EMBD), nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.h, self.ln_f = Block(), nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.ln_f(self.h(self.wte(idx) + self.wpe(pos)))
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        extra_args = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


def get_lr(it):
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > LR_DECAY_ITERS:
        return MIN_LR
    decay_ratio = (it - WARMUP_ITERS) / (LR_DECAY_ITERS - WARMUP_ITERS)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


def _windows(n: int, seed: int) -> TensorDataset:
    data = token_stream(n * BLOCK_SIZE + 1, VOCAB, seed)
    x = torch.stack([data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(n)])
    y = torch.stack([data[i * BLOCK_SIZE + 1:(i + 1) * BLOCK_SIZE + 1] for i in range(n)])
    return TensorDataset(x, y)


def workload() -> loops.Workload:
    def build_optimizer(model):  # `model`: loopmark hands it the model, for configure_optimizers
        device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
        return model.configure_optimizers(WEIGHT_DECAY, LEARNING_RATE, (BETA1, BETA2), device_type)

    return loops.Workload(
        name="corpus-nanogpt", build_model=GPT, build_optimizer=build_optimizer, criterion=None,
        train_data=_windows(512, seed=91), test_data=_windows(64, seed=92), batch_size=16, drop_last=True,
        check_steps=4,  # batches per epoch of the correctness pass: two optimizer steps of two micro-batches
        description="nanoGPT train.py: model's own loss, 2 micro-batches, GradScaler, clipping, cosine LR",
    )


def _setup(run: loops.Run) -> dict:
    device_type = "cuda" if "cuda" in str(run.device) else "cpu"
    return {"iter_num": 0, "scaler": torch.amp.GradScaler(device_type, enabled=True),
            "ctx": nullcontext() if device_type == "cpu" else torch.amp.autocast(device_type, dtype=torch.bfloat16)}


def train(run: loops.Run):
    """One pass over `run.batches`, nanoGPT's iterations as they are; a micro-batch is one batch of the loader."""
    model, optimizer = run.model, run.optimizer
    state = kept(optimizer, lambda: _setup(run))
    scaler, ctx = state["scaler"], state["ctx"]
    batches = iter(run.batches)
    X, Y = next(batches)  # X, Y = get_batch('train')
    model.train()
    while X is not None:
        iter_num = state["iter_num"]
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for _micro_step in range(GRADIENT_ACCUMULATION_STEPS):
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
        optimizer.zero_grad(set_to_none=True)
        if iter_num % LOG_INTERVAL == 0:
            lossf = loss.item() * GRADIENT_ACCUMULATION_STEPS
            print(f"iter {iter_num}: loss {lossf:.4f}")
        state["iter_num"] += 1
