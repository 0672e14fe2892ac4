"""Train an EmbeddingBag text classifier, the way the PyTorch text-classification tutorial does, logging the loss of
every step: variable-length token lists packed into one flat tensor with offsets by a `collate_batch` function,
`clip_grad_norm_(..., 0.1)`, SGD with StepLR per epoch, accuracy counted with `.sum().item()` every batch and a log
line with `loss.item()` every batch (through `logging`, as a training script that wants every loss in its log does).

The texts are synthetic (each class draws its tokens mostly from its own part of the vocabulary): nothing is
downloaded.

    python loops/examples/train_text_classifier.py --epochs 1
    loopmark trace --steps 20 loops/examples/train_text_classifier.py

Host-device syncs per step on CUDA, worked out from the code below (a step ends at `optimizer.step()`):
  * `label.to(device)`, `text.to(device)`, `offsets.to(device)`: blocking copies of the collated host batch .... 3
  * forward, CrossEntropyLoss, backward, `clip_grad_norm_`, SGD's step ...................................... 0
  * `total_acc += (predicted_label.argmax(1) == label).sum().item()` ...................................... 1
  * `log.info(... loss.item())` every step .................................................................. 1
  => 5 per step.
"""

import argparse
import logging
import random

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("train_text_classifier")


class SyntheticNews(Dataset):
    """(label, token ids) pairs, as a tokenizer hands them out: `num_class` topics, each drawing 80% of its tokens from
    its own band of the vocabulary, lengths from 8 to 40 tokens."""

    def __init__(self, size, vocab_size, num_class, seed=0):
        rng = random.Random(seed)
        band = vocab_size // num_class
        self.items = []
        for _ in range(size):
            label = rng.randrange(num_class)
            tokens = [rng.randrange(label * band, (label + 1) * band) if rng.random() < 0.8
                      else rng.randrange(vocab_size) for _ in range(rng.randint(8, 40))]
            self.items.append((label, tokens))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate_batch(batch):
    label_list, text_list, offsets = [], [], [0]
    for _label, _text in batch:
        label_list.append(_label)
        processed_text = torch.tensor(_text, dtype=torch.int64)
        text_list.append(processed_text)
        offsets.append(processed_text.size(0))
    label_list = torch.tensor(label_list, dtype=torch.int64)
    offsets = torch.tensor(offsets[:-1]).cumsum(dim=0)
    text_list = torch.cat(text_list)
    return label_list, text_list, offsets


class TextClassificationModel(nn.Module):
    def __init__(self, vocab_size, embed_dim, num_class):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, embed_dim, sparse=False)
        self.fc = nn.Linear(embed_dim, num_class)
        self.init_weights()

    def init_weights(self):
        initrange = 0.5
        self.embedding.weight.data.uniform_(-initrange, initrange)
        self.fc.weight.data.uniform_(-initrange, initrange)
        self.fc.bias.data.zero_()

    def forward(self, text, offsets):
        return self.fc(self.embedding(text, offsets))


def train(dataloader, model, criterion, optimizer, device, epoch):
    model.train()
    total_acc, total_count = 0, 0
    for idx, (label, text, offsets) in enumerate(dataloader):
        label, text, offsets = label.to(device), text.to(device), offsets.to(device)
        optimizer.zero_grad()
        predicted_label = model(text, offsets)
        loss = criterion(predicted_label, label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        total_acc += (predicted_label.argmax(1) == label).sum().item()
        total_count += label.size(0)
        log.info("| epoch %3d | %5d/%5d batches | loss %8.4f | accuracy %8.3f", epoch, idx, len(dataloader),
                 loss.item(), total_acc / total_count)


def main():
    parser = argparse.ArgumentParser(description="EmbeddingBag text classification on synthetic news")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--emsize", type=int, default=64)
    parser.add_argument("--num-class", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=6400)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_dataloader = DataLoader(SyntheticNews(args.train_size, args.vocab_size, args.num_class),
                                  batch_size=args.batch_size, shuffle=True, collate_fn=collate_batch)
    model = TextClassificationModel(args.vocab_size, args.emsize, args.num_class).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1.0, gamma=0.1)
    for epoch in range(1, args.epochs + 1):
        train(train_dataloader, model, criterion, optimizer, device, epoch)
        scheduler.step()


if __name__ == "__main__":
    main()
