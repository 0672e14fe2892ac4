"""Train a small convolutional network on MNIST-like digits, the way pytorch/examples' mnist/main.py trains on MNIST.

The images are synthetic (ten fixed 28x28 stroke patterns, shifted and noisy, stored as uint8 like MNIST's): nothing is
downloaded. argparse, a `Net`, `train()` and `test()`, Adadelta with StepLR, a log line every `--log-interval`
batches, DataLoader workers and pinned memory when there is a GPU.

    python loops/examples/train_mnist_like.py --epochs 1
    loopmark trace --steps 20 loops/examples/train_mnist_like.py --epochs 1

Host-device syncs per training step on CUDA, worked out from the code below (a step ends at `optimizer.step()`):
  * `data.to(device)`, `target.to(device)`: blocking copies of host batches (no `non_blocking`) ........ 2
  * `loss.item()` in the log line, after the step of batches with batch_idx % log_interval == 0 ........ 1 per
    log_interval steps
  * zero_grad, the forward pass, nll_loss, backward, Adadelta's step (its `step` counter lives on the host),
    StepLR: nothing read back ................................................................................ 0
  => 2 + 1/log_interval per step: 2.1 with the default --log-interval 10 (over any 20 consecutive steps of an epoch,
     exactly 2 log lines: 2 + 2/20).
  * test(), once per epoch under `model.eval()` and `torch.no_grad()`: per test batch 2 copies, the summed loss's
    `.item()` and the correct count's `.item()`: 4 syncs per test batch (loopmark trace counts it apart).
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import Dataset


class SyntheticDigits(Dataset):
    """`size` uint8 images of ten fixed digit-like patterns (the same for every seed), shifted, with noise; transformed
    as MNIST's ToTensor + Normalize((0.1307,), (0.3081,)) on access."""

    def __init__(self, size, seed):
        strokes = torch.Generator().manual_seed(0)
        patterns = torch.zeros(10, 28, 28, dtype=torch.uint8)
        for digit in range(10):
            for _ in range(4):  # a few strokes per pattern
                r, c = torch.randint(4, 20, (2,), generator=strokes).tolist()
                h, w = torch.randint(2, 9, (2,), generator=strokes).tolist()
                patterns[digit, r:r + h, c:c + w] = 200
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 10, (size,), generator=g)
        self.data = torch.empty(size, 28, 28, dtype=torch.uint8)
        for start in range(0, size, 500):
            labels = self.targets[start:start + 500]
            shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
            noise = torch.randint(0, 56, (len(labels), 28, 28), generator=g, dtype=torch.uint8)
            self.data[start:start + 500] = torch.roll(patterns[labels], shifts=shifts, dims=(1, 2)) + noise

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.data[index].unsqueeze(0).float().div(255)
        return (image - 0.1307) / 0.3081, int(self.targets[index])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}")
            if args.dry_run:
                break


def test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{len(test_loader.dataset)} "
          f"({100.0 * correct / len(test_loader.dataset):.0f}%)\n")


def main():
    parser = argparse.ArgumentParser(description="PyTorch MNIST-like example (synthetic digits)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="input batch size for training (default: 64)")
    parser.add_argument("--test-batch-size", type=int, default=1000, metavar="N",
                        help="input batch size for testing (default: 1000)")
    parser.add_argument("--epochs", type=int, default=14, metavar="N", help="number of epochs to train (default: 14)")
    parser.add_argument("--lr", type=float, default=1.0, metavar="LR", help="learning rate (default: 1.0)")
    parser.add_argument("--gamma", type=float, default=0.7, metavar="M", help="learning rate step gamma (default: 0.7)")
    parser.add_argument("--no-cuda", action="store_true", default=False, help="disables CUDA training")
    parser.add_argument("--dry-run", action="store_true", default=False, help="quickly check a single pass")
    parser.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default: 1)")
    parser.add_argument("--log-interval", type=int, default=10, metavar="N",
                        help="how many batches to wait before logging training status")
    parser.add_argument("--train-size", type=int, default=60000, help="synthetic training images (default: 60000)")
    parser.add_argument("--test-size", type=int, default=10000, help="synthetic test images (default: 10000)")
    parser.add_argument("--save-model", action="store_true", default=False, help="for saving the current model")
    args = parser.parse_args()
    use_cuda = not args.no_cuda and torch.cuda.is_available()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if use_cuda else "cpu")

    train_kwargs = {"batch_size": args.batch_size, "shuffle": True}
    test_kwargs = {"batch_size": args.test_batch_size}
    if use_cuda:
        cuda_kwargs = {"num_workers": 1, "pin_memory": True}
        train_kwargs.update(cuda_kwargs)
        test_kwargs.update(cuda_kwargs)

    train_loader = torch.utils.data.DataLoader(SyntheticDigits(args.train_size, seed=args.seed), **train_kwargs)
    test_loader = torch.utils.data.DataLoader(SyntheticDigits(args.test_size, seed=args.seed + 1), **test_kwargs)

    model = Net().to(device)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)

    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    for epoch in range(1, args.epochs + 1):
        train(args, model, device, train_loader, optimizer, epoch)
        test(model, device, test_loader)
        scheduler.step()

    if args.save_model:
        torch.save(model.state_dict(), "mnist_cnn.pt")


if __name__ == "__main__":
    main()
