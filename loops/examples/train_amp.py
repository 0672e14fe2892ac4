"""Train a small residual CNN on CIFAR-like images with mixed precision, the way an image-classification training script
does it: autocast + GradScaler, gradient clipping after `unscale_`, OneCycleLR stepped every batch, pinned host batches
copied with `non_blocking=True`, `zero_grad(set_to_none=True)`, a log line every `--log-interval` steps.

The images are synthetic (class-dependent colour blobs with noise): nothing is downloaded. Mixed precision is on only
where CUDA is (`--amp` and `device.type == "cuda"`), as such scripts do: on a CPU it trains in float32 without a scaler.

    python loops/examples/train_amp.py --epochs 1
    loopmark trace --steps 20 loops/examples/train_amp.py --epochs 1 --workers 0

Host-device syncs per training step on CUDA, worked out from the code below (a step ends at `optimizer.step()`, which
`scaler.step()` calls):
  * `images.to(device, non_blocking=True)`, `targets.to(...)`: from pinned memory, asynchronous ........... 0
  * forward and loss under autocast, `scaler.scale(loss).backward()` ........................................ 0
  * `scaler.unscale_(optimizer)`: the inf/NaN check writes a flag on the device ............................ 0
  * `clip_grad_norm_` (error_if_nonfinite=False): the norm and the clip factor stay on the device ............ 0
  * `scaler.step(optimizer)`: reads the inf/NaN flag back to decide whether to step (`found_inf.item()`) .... 1
  * `scaler.update()`, `scheduler.step()` (OneCycleLR: Python floats), SGD's step ........................... 0
  * `loss.item()` in the log line, every `--log-interval` steps ............................................. 1 per
    log_interval steps
  => 1 + 1/log_interval per step: 1.1 with the default --log-interval 10.
On a CPU without loopmark the same script counts 0 + 1/log_interval: `use_amp` is false and the disabled scaler reads
nothing back. `loopmark trace` on a CPU counts what CUDA does: the script sees a GPU.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class SyntheticImages(Dataset):
    """CIFAR-sized 3x32x32 float images: a class-coloured blob at a random place, plus noise."""

    def __init__(self, size, num_classes=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        colours = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
        self.targets = torch.randint(0, num_classes, (size,), generator=g)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        centres = torch.randint(8, 24, (size, 2), generator=g).float()
        blobs = torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / 40)
        self.images = colours[self.targets] * blobs[:, None] + 0.2 * torch.randn(size, 3, 32, 32, generator=g)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width=16, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_one_epoch(args, model, loader, criterion, optimizer, scheduler, scaler, device, use_amp, epoch):
    model.train()
    for step, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            output = model(images)
            loss = criterion(output, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if step % args.log_interval == 0:
            print(f"epoch {epoch} step {step}/{len(loader)} loss {loss.item():.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.5f}")


def main():
    parser = argparse.ArgumentParser(description="Mixed-precision training of a small ResNet on CIFAR-like images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--clip-grad", type=float, default=5.0, help="max norm of the gradients")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="train in float32 on CUDA too")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_amp = args.amp and device.type == "cuda"

    loader = DataLoader(SyntheticImages(args.train_size, seed=args.seed), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)
    model = SmallResNet(args.width).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=True)
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    print(f"training on {device} (mixed precision: {use_amp}), {steps_per_epoch} steps per epoch, "
          f"{math.ceil(args.train_size / args.batch_size)} batches")
    for epoch in range(args.epochs):
        train_one_epoch(args, model, loader, criterion, optimizer, scheduler, scaler, device, use_amp, epoch)


if __name__ == "__main__":
    main()
