# Source: pytorch/tutorials, beginner_source/transformer_tutorial.py, commit e5f60c64367b2ff3c19e5b73a2c7eac4bf1269f1:
# TransformerModel, PositionalEncoding, batchify(), get_batch(), train() and the epoch loop's scheduler.step()
"""The PyTorch transformer tutorial's `train()`: a causal `src_mask` made on the host and copied `.to(device)` once
per epoch and passed to the model, `criterion(output.view(-1, ntokens), targets)`, `clip_grad_norm_(model.
parameters(), 0.5)`, SGD at lr 5.0, a log line every 200 batches (`len(train_data) // bptt` batches, the
scheduler's lr) and, after each epoch, `scheduler.step()` of `StepLR(optimizer, 1.0, gamma=0.95)`; a
TransformerEncoder language model with dropout; batches from `get_batch` over a `batchify`-ed synthetic corpus.

Each step clips its own batch's gradient (the clipping binds at norm 0.5), and the second epoch runs at 0.95 of
the first epoch's learning rate: the parameters leave the baseline's, every step still using its batch gradient:
`different`.

Syncs on CUDA: `total_loss += loss.item()` every step; `nn.TransformerEncoder.forward`, given `src_mask` and no
`is_causal`, checks whether the mask is causal with `bool((mask == causal_comparison).all())`
(`_detect_is_causal_mask` in torch/nn/modules/transformer.py): one read per step; and once per epoch the
blocking host-to-device copy of the new `src_mask` (pageable memory). `clip_grad_norm_` reads nothing back
(`error_if_nonfinite=False`), nor does `StepLR.step()`.
"""

import math
import time

import torch
from torch import nn
from torch.nn import TransformerEncoder, TransformerEncoderLayer
from torch.utils.data import Dataset

import loops
from tests.corpus import kept, token_stream

EXPECTED_VERDICT = "different"
NTOKENS, EMSIZE, NHID, NLAYERS, NHEAD, DROPOUT = 16, 8, 16, 1, 2, 0.2
BATCH_SIZE, BPTT = 4, 6
LR = 5.0


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` and the encoder's causal-mask check every step; the mask's host-to-device copy per epoch."""
    return 2 + 1 / steps


class TransformerModel(nn.Module):

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super().__init__()
        self.model_type = 'Transformer'
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        encoder_layers = TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        self.transformer_encoder = TransformerEncoder(encoder_layers, nlayers)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)

        self.init_weights()

    def generate_square_subsequent_mask(self, sz):
        mask = (torch.triu(torch.ones(sz, sz)) == 1).transpose(0, 1)
        mask = mask.float().masked_fill(mask == 0, float('-inf')).masked_fill(mask == 1, float(0.0))  # noqa: UP018
        return mask

    def init_weights(self):
        initrange = 0.1
        self.encoder.weight.data.uniform_(-initrange, initrange)
        self.decoder.bias.data.zero_()
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, src, src_mask=None):
        if src_mask is None:  # loopmark's baseline calls model(data): the same causal mask, made here
            src_mask = self.generate_square_subsequent_mask(src.size(0)).to(src.device)
        src = self.encoder(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, src_mask)
        output = self.decoder(output)
        return output


class PositionalEncoding(nn.Module):

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)

        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0).transpose(0, 1)
        self.register_buffer('pe', pe)

    def forward(self, x):
        x = x + self.pe[:x.size(0), :]
        return self.dropout(x)


def batchify(data, bsz):
    # Divide the dataset into bsz parts.
    nbatch = data.size(0) // bsz
    # Trim off any extra elements that wouldn't cleanly fit (remainders).
    data = data.narrow(0, 0, nbatch * bsz)
    # Evenly divide the data across the bsz batches.
    return data.view(bsz, -1).t().contiguous()


def get_batch(source, i):
    seq_len = min(BPTT, len(source) - 1 - i)
    data = source[i:i+seq_len]
    target = source[i+1:i+1+seq_len].reshape(-1)
    return data, target


class BpttBatches(Dataset):
    """`get_batch(train_data, i)` for i in range(0, size - 1, bptt), one batch per item (the corpora below are cut
    so that every batch is `BPTT` long)."""

    def __init__(self, source: torch.Tensor):
        self.items = [get_batch(source, i) for i in range(0, source.size(0) - 1, BPTT)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class TokenCrossEntropy(nn.Module):
    """The tutorial's `nn.CrossEntropyLoss()` over every token: (seq, batch, ntokens) logits flattened as `train()`
    flattens them, so loopmark's baseline (`criterion(model(data), targets)`) computes the same loss."""

    def forward(self, output, target):
        return nn.functional.cross_entropy(output.reshape(-1, output.size(-1)), target)


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-transformer-tutorial",
        build_model=lambda: TransformerModel(NTOKENS, EMSIZE, NHEAD, NHID, NLAYERS, DROPOUT),
        build_optimizer=lambda params: torch.optim.SGD(params, lr=LR),
        criterion=TokenCrossEntropy(),
        train_data=BpttBatches(batchify(token_stream((80 * BPTT + 1) * BATCH_SIZE, NTOKENS, seed=61), BATCH_SIZE)),
        test_data=BpttBatches(batchify(token_stream((16 * BPTT + 1) * BATCH_SIZE, NTOKENS, seed=62), BATCH_SIZE)),
        batch_size=BATCH_SIZE,
        batched=True,
        description="pytorch/tutorials transformer train(): src_mask per epoch, clip 0.5, StepLR per epoch",
    )


def train(run: loops.Run):
    """The tutorial's train() for one epoch, then the epoch loop's `scheduler.step()`."""
    model, criterion, optimizer, device = run.model, run.criterion, run.optimizer, run.device
    state = kept(optimizer, lambda: {
        "epoch": 0, "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1.0, gamma=0.95)})
    state["epoch"] += 1
    epoch, scheduler = state["epoch"], state["scheduler"]
    model.train()  # Turn on the train mode
    total_loss = 0.
    epoch_loss = torch.zeros((), device=device)  # the epoch loss the contract asks for, kept on the device
    start_time = time.time()
    ntokens = NTOKENS
    src_mask = model.generate_square_subsequent_mask(BPTT).to(device)
    for batch, (data, targets) in enumerate(run.batches):
        optimizer.zero_grad()
        if data.size(0) != BPTT:
            src_mask = model.generate_square_subsequent_mask(data.size(0)).to(device)
        output = model(data, src_mask)
        loss = criterion(output.view(-1, ntokens), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()

        total_loss += loss.item()
        epoch_loss += loss.detach()
        log_interval = 200
        if batch % log_interval == 0 and batch > 0:
            cur_loss = total_loss / log_interval
            elapsed = time.time() - start_time
            print('| epoch {:3d} | {:5d}/{:5d} batches | '  # noqa: UP032
                  'lr {:02.2f} | ms/batch {:5.2f} | '
                  'loss {:5.2f} | ppl {:8.2f}'.format(
                      epoch, batch, len(run.batches), scheduler.get_lr()[0],
                      elapsed * 1000 / log_interval,
                      cur_loss, math.exp(cur_loss)))
            total_loss = 0
            start_time = time.time()
    scheduler.step()
    return epoch_loss / (batch + 1)
