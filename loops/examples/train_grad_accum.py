"""Train a tiny GPT-style language model with gradient accumulation, the way a causal-LM fine-tuning script does it
(Hugging Face's run_clm_no_trainer.py, nanoGPT): micro-batches of `--batch-size` sequences, `loss /
gradient_accumulation_steps`, one optimizer step per `--gradient-accumulation-steps` micro-batches, gradient clipping,
AdamW with a linear warm-up/decay schedule, the running loss kept on the device and read every `--log-interval`
optimizer steps.

The text is synthetic (sequences from a fixed random bigram table): nothing is downloaded.

    python loops/examples/train_grad_accum.py --epochs 1
    loopmark trace --steps 20 loops/examples/train_grad_accum.py

Host-device syncs per optimizer step on CUDA, worked out from the code below (a step ends at `optimizer.step()`, so it
holds `gradient_accumulation_steps` micro-batches):
  * `{k: v.to(device) ...}` of `input_ids` and `labels`: 2 blocking copies per micro-batch ..... 2 x accumulation
  * the forward pass (scaled_dot_product_attention, is_causal), `loss / accumulation`, `total_loss +=
    loss.detach().float()`, backward ....................................................................... 0
  * `clip_grad_norm_`, AdamW's step (its `step` counter lives on the host), the LambdaLR step, zero_grad ... 0
  * `total_loss.item()` in the log line, every `--log-interval` optimizer steps ....................... 1 per
    log_interval steps
  => 2 x gradient_accumulation_steps + 1/log_interval per step: 8.1 with the defaults (4 and 10).
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class BigramText(Dataset):
    """Token sequences drawn from a fixed random bigram distribution (a language with some structure to learn)."""

    def __init__(self, size, seq_len, vocab_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        table = torch.softmax(3 * torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(7)), -1)
        tokens = torch.empty(size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_size, (size,), generator=g)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.multinomial(table[tokens[:, t]], 1, generator=g).squeeze(1)
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        seq = self.tokens[index]
        return {"input_ids": seq[:-1], "labels": seq[1:]}


class Block(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size, seq_len, d_model=64, n_head=4, n_layer=2):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids, labels=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if labels is None else F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def linear_schedule_with_warmup(optimizer, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main():
    parser = argparse.ArgumentParser(description="Tiny causal LM with gradient accumulation")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=4096, help="sequences in the training set")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--log-interval", type=int, default=10, help="optimizer steps between log lines")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_dataloader = DataLoader(BigramText(args.train_size, args.seq_len, args.vocab_size, seed=args.seed),
                                  batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = TinyGPT(args.vocab_size, args.seq_len, args.d_model).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    lr_scheduler = linear_schedule_with_warmup(optimizer, args.warmup_steps, args.epochs * updates_per_epoch)

    completed_steps = 0
    for epoch in range(args.epochs):
        model.train()
        total_loss = torch.zeros((), device=device)
        for step, batch in enumerate(train_dataloader):
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs["loss"] / args.gradient_accumulation_steps
            total_loss += loss.detach().float()
            loss.backward()
            if (step + 1) % args.gradient_accumulation_steps == 0 or step == len(train_dataloader) - 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                completed_steps += 1
                if completed_steps % args.log_interval == 0:
                    mean = total_loss.item() * args.gradient_accumulation_steps / (step + 1)
                    lr = lr_scheduler.get_last_lr()[0]
                    print(f"epoch {epoch} step {completed_steps}: loss {mean:.4f} lr {lr:.2e}")


if __name__ == "__main__":
    main()
