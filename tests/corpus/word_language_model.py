# Source: pytorch/examples, word_language_model/main.py, commit 28d16ffaa50702f18cae7eba7c67bf03794770cd: train(),
# batchify(), get_batch(); word_language_model/model.py, commit c0b889d5f43150f288ecdd5dbd16c146d79e5bdf:
# TransformerModel, PositionalEncoding
"""pytorch/examples' word-level language model, `--model Transformer --use-optimizer`: `train()` flattens the
output with `output.view(-1, ntokens)` before `criterion(output, targets)`, clips with
`clip_grad_norm_(model.parameters(), args.clip)` (0.25), steps AdamW and logs the mean loss every `log_interval`
batches; the model (an `nn.Transformer` subclass with dropout) caches its causal mask; batches are `get_batch`
slices of a `batchify`-ed token stream (a seeded synthetic corpus).

Each step clips its own batch's gradient to norm 0.25, and the gradients here are larger: the clipping binds and
the parameters leave the baseline's (which does not clip): `different`.

Syncs on CUDA: `total_loss += loss.item()` every step; and `nn.TransformerEncoder.forward`, given the cached mask
and no `is_causal`, checks whether it is causal with `bool((mask == causal_comparison).all())` (torch/nn/modules/
transformer.py, `_detect_is_causal_mask`): one read per forward. The mask is made and copied to the device on the
first forward only. `clip_grad_norm_` reads nothing back (`error_if_nonfinite=False`); the log line formats
Python floats.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import loops
from tests.corpus import kept, token_stream

EXPECTED_VERDICT = "different"
NTOKENS, EMSIZE, NHEAD, NHID, NLAYERS, DROPOUT = 16, 8, 2, 16, 1, 0.2
BATCH_SIZE, BPTT = 4, 6
CLIP = 0.25  # --clip (its default)
LR = 1e-3  # --lr 0.001 with --use-optimizer
LOG_INTERVAL = 2  # --log-interval 2 (the default is 200)


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` and the encoder's causal-mask check, every step."""
    return 2.0


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


class TransformerModel(nn.Transformer):
    """Container module with an encoder, a recurrent or transformer module, and a decoder."""

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super().__init__(d_model=ninp, nhead=nhead, dim_feedforward=nhid, num_encoder_layers=nlayers)
        self.model_type = 'Transformer'
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        self.init_weights()

    def _generate_square_subsequent_mask(self, sz):
        return torch.log(torch.tril(torch.ones(sz, sz)))

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.input_emb.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, src, has_mask=True):
        if has_mask:
            device = src.device
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                mask = self._generate_square_subsequent_mask(len(src)).to(device)
                self.src_mask = mask
        else:
            self.src_mask = None

        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


def batchify(data, bsz):
    # Work out how cleanly we can divide the dataset into bsz parts.
    nbatch = data.size(0) // bsz
    # Trim off any extra elements that wouldn't cleanly fit (remainders).
    data = data.narrow(0, 0, nbatch * bsz)
    # Evenly divide the data across the bsz batches.
    return data.view(bsz, -1).t().contiguous()


def get_batch(source, i):
    seq_len = min(BPTT, len(source) - 1 - i)
    data = source[i:i+seq_len]
    target = source[i+1:i+1+seq_len].view(-1)
    return data, target


class BpttBatches(Dataset):
    """The batches `train()` walks through, `get_batch(train_data, i)` for i in range(0, size - 1, bptt): whole
    batches, one per item (the corpora below are cut so that every batch is `BPTT` long)."""

    def __init__(self, source: torch.Tensor):
        self.items = [get_batch(source, i) for i in range(0, source.size(0) - 1, BPTT)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class TokenNLLLoss(nn.Module):
    """The script's `nn.NLLLoss()` over every token: (seq, batch, ntokens) log-probabilities are flattened as
    `train()` flattens them, so loopmark's baseline (`criterion(model(data), targets)`) computes the same loss."""

    def forward(self, output, target):
        return F.nll_loss(output.reshape(-1, output.size(-1)), target)


def workload() -> loops.Workload:
    return loops.Workload(
        name="corpus-word-language-model",
        build_model=lambda: TransformerModel(NTOKENS, EMSIZE, NHEAD, NHID, NLAYERS, DROPOUT),
        build_optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        criterion=TokenNLLLoss(),
        train_data=BpttBatches(batchify(token_stream((80 * BPTT + 1) * BATCH_SIZE, NTOKENS, seed=51), BATCH_SIZE)),
        test_data=BpttBatches(batchify(token_stream((16 * BPTT + 1) * BATCH_SIZE, NTOKENS, seed=52), BATCH_SIZE)),
        batch_size=BATCH_SIZE,
        batched=True,
        description="pytorch/examples word_language_model (Transformer, AdamW): flattened NLL, clip 0.25",
    )


def train(run: loops.Run):
    """The example's train() for one epoch (the Transformer and `--use-optimizer` branches)."""
    model, criterion, optimizer = run.model, run.criterion, run.optimizer
    state = kept(optimizer, lambda: {"epoch": 0})
    state["epoch"] += 1
    epoch = state["epoch"]
    # Turn on training mode which enables dropout.
    model.train()
    total_loss = 0.
    epoch_loss = torch.zeros((), device=run.device)  # the epoch loss the contract asks for, kept on the device
    start_time = time.time()
    ntokens = NTOKENS
    for batch, (data, targets) in enumerate(run.batches):
        optimizer.zero_grad()
        output = model(data)
        output = output.view(-1, ntokens)
        loss = criterion(output, targets)
        loss.backward()

        # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()

        total_loss += loss.item()
        epoch_loss += loss.detach()

        if batch % LOG_INTERVAL == 0 and batch > 0:
            cur_loss = total_loss / LOG_INTERVAL
            elapsed = time.time() - start_time
            print('| epoch {:3d} | {:5d}/{:5d} batches | lr {:02.2f} | ms/batch {:5.2f} | '  # noqa: UP032
                  'loss {:5.2f} | ppl {:8.2f}'.format(
                      epoch, batch, len(run.batches), LR,
                      elapsed * 1000 / LOG_INTERVAL, cur_loss, math.exp(cur_loss)))
            total_loss = 0
            start_time = time.time()
    return epoch_loss / (batch + 1)
