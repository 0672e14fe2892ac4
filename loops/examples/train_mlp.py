"""Train a multilayer perceptron on synthetic tabular data, the way a small regression-to-classes script does: host
batches moved with `.to(device)`, AdamW, gradient clipping by norm, StepLR stepped every batch, a log line every
`--log-interval` steps.

The data is synthetic (features of Gaussian noise, labels from a fixed random linear map): nothing is downloaded.
`--width` and `--batch-size` size the step; on one thread of this repository's 2-core CPU VM, roughly:

    python loops/examples/train_mlp.py                                    # width 64, batch 32: ~1 ms a step
    python loops/examples/train_mlp.py --width 512 --batch-size 64        # ~5 ms a step
    python loops/examples/train_mlp.py --width 1024 --batch-size 256      # ~45 ms a step

The smallest step is mostly the optimizer's and the clipping's operators (AdamW updates each of its 8 parameters
apart on a CPU), a few microseconds each: a narrower model is hardly faster.
    loopmark trace --steps 20 loops/examples/train_mlp.py

Host-device syncs per training step on CUDA, worked out from the code below (a step ends at `optimizer.step()`):
  * `inputs.to(device)`, `labels.to(device)`: blocking copies of host batches (no `non_blocking`) ......... 2
  * zero_grad, the forward pass, cross_entropy, backward ..................................................... 0
  * `clip_grad_norm_` (error_if_nonfinite=False): the norm and the clip factor stay on the device ............ 0
  * AdamW's step (its `step` counters live on the host), `scheduler.step()` (StepLR: Python floats) ......... 0
  * `loss.item()` in the log line, every `--log-interval` steps ............................................. 1 per
    log_interval steps
  => 2 + 1/log_interval per step: 2.01 with the default --log-interval 100.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


def synthetic(size, features, classes, seed):
    """`size` rows of `features` Gaussian features, labelled by the argmax of a fixed random linear map of them."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, features, generator=g)
    labels = (inputs @ torch.randn(features, classes, generator=torch.Generator().manual_seed(1234))).argmax(dim=1)
    return inputs, labels


class MLP(nn.Module):
    def __init__(self, features, width, depth, classes):
        super().__init__()
        layers, inner = [], features
        for _ in range(depth):
            layers += [nn.Linear(inner, width), nn.GELU()]
            inner = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(inner, classes)

    def forward(self, x):
        return self.head(self.body(x))


def main():
    parser = argparse.ArgumentParser(description="PyTorch MLP example (synthetic tabular data)")
    parser.add_argument("--width", type=int, default=64, help="hidden units per layer (default: 64)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default: 3)")
    parser.add_argument("--features", type=int, default=64, help="input features (default: 64)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--train-size", type=int, default=32768, help="synthetic training rows (default: 32768)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (default: 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    parser.add_argument("--lr-step", type=int, default=200, help="StepLR: steps between decays (default: 200)")
    parser.add_argument("--gamma", type=float, default=0.9, help="StepLR decay (default: 0.9)")
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm (default: 1.0)")
    parser.add_argument("--log-interval", type=int, default=100, help="steps between log lines (default: 100)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    args = parser.parse_args()
    if min(args.width, args.depth, args.features, args.classes, args.batch_size, args.train_size, args.epochs,
           args.lr_step, args.log_interval) < 1:
        parser.error("sizes, epochs, --lr-step and --log-interval must be at least 1")

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs, labels = synthetic(args.train_size, args.features, args.classes, args.seed)
    model = MLP(args.features, args.width, args.depth, args.classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.gamma)

    step = 0
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(args.train_size)
        for start in range(0, args.train_size - args.batch_size + 1, args.batch_size):
            batch = order[start:start + args.batch_size]
            x, y = inputs[batch].to(device), labels[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            if step % args.log_interval == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}, lr {scheduler.get_last_lr()[0]:.2e}")
            step += 1


if __name__ == "__main__":
    main()
