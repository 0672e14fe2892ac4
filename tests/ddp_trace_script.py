"""A DDP training script written as the PyTorch DDP tutorial writes one, for `loopmark trace` under torchrun: the
device from LOCAL_RANK (`device_ids=[local_rank]` when CUDA), nccl on a GPU and gloo without, a DistributedSampler
given `set_epoch`, `--micro-batches` micro-batches per optimizer step, each loss divided by their number.

`--no-sync` says where `DDP.no_sync()` goes, with 2 micro-batches:
  * `none`: never: DDP all-reduces the gradient after every micro-batch's backward pass;
  * `first`: around the forward and backward passes of every micro-batch but the last (the correct accumulation);
  * `backward`: around `backward()` only, the forward pass outside it: DDP decides at the forward pass, so it
    all-reduces after every micro-batch all the same (a no-op no_sync);
  * `last`: the off-by-one: every micro-batch but the first, so the last one's gradient is never shared and the ranks'
    parameters differ after the first step;
  * `flag`: no `no_sync()`, nanoGPT's way: `ddp.require_backward_grad_sync = (i == k - 1)` before each micro-batch's
    forward pass, so DDP syncs the last micro-batch's backward pass only (as `first` does).

Per optimizer step, worked out from the code below (the model's 2 parameter tensors fit one DDP bucket):
  * collectives: one all-reduce per micro-batch whose backward pass syncs: 1 (1 micro-batch), 2 (`none`,
    `backward`), 1 (`first`, `last`, `flag`);
  * host-device syncs on CUDA: 2 blocking copies (`x.to(device)`, `y.to(device)`) per micro-batch.

`--samples N` (default 256) makes the epochs short: with 32, each rank's DistributedSampler gives it 16 samples, 4
batches of 4, so an epoch is 4 steps (1 micro-batch) or 2 (2 micro-batches), and a trace's passes (`--warmup 2 --steps
2`: steps 3 to 10) cross several epochs. `--no-set-epoch` leaves out `sampler.set_epoch(epoch)`: every epoch reads the
same order (`different`).

    torchrun --standalone --nproc-per-node 2 tests/ddp_trace_script.py --micro-batches 2 --no-sync first
"""

import argparse
import contextlib
import itertools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--no-sync", choices=["none", "first", "backward", "last", "flag"], default="none")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--no-set-epoch", action="store_true")
    args = parser.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2)).to(device)
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(args.samples, 8), torch.randint(0, 2, (args.samples,)))
    sampler = DistributedSampler(data)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    k = args.micro_batches
    try:
        for epoch in range(args.epochs):
            if not args.no_set_epoch:
                sampler.set_epoch(epoch)
            batches = iter(loader)
            while micro := list(itertools.islice(batches, k)):
                optimizer.zero_grad()
                for i, (x, y) in enumerate(micro):
                    x, y = x.to(device), y.to(device)
                    last = i == len(micro) - 1
                    if args.no_sync == "flag":
                        ddp.require_backward_grad_sync = last
                    unsynced = {"first": not last, "last": i > 0}.get(args.no_sync, False)
                    with ddp.no_sync() if unsynced else contextlib.nullcontext():
                        loss = nn.functional.cross_entropy(ddp(x), y) / k
                        if args.no_sync == "backward" and not last:
                            with ddp.no_sync():
                                loss.backward()
                        else:
                            loss.backward()
                optimizer.step()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
