"""A DDP script whose rank `--rank` goes wrong at its optimizer step `--at-step` (counted from 1), for the faults of
`loopmark trace --nproc-per-node 2`: every rank must end, the rank be named, and what the other ranks measured kept.

`--fault`:
  * `raise`: the rank raises ValueError;
  * `hang`: the rank sleeps (for an hour) before its backward pass, so the other ranks wait in DDP's all-reduce;
  * `skip`: the rank skips the step's `dist.all_reduce` of the loss that the other ranks wait on;
  * `kill`: the rank sends itself SIGKILL.

Per optimizer step, until the fault: 2 all-reduces (DDP's bucket, the loop's loss) and 2 blocking copies on CUDA.
"""

import argparse
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=["raise", "hang", "skip", "kill"], required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--at-step", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    faulty = dist.get_rank() == args.rank
    torch.manual_seed(0)
    ddp = DDP(nn.Linear(8, 2).to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try:
        for step in range(1, args.steps + 1):
            x, y = torch.randn(4, 8).to(device), torch.randint(0, 2, (4,)).to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            if faulty and step == args.at_step:
                if args.fault == "raise":
                    raise ValueError(f"rank {args.rank} gave up")
                if args.fault == "hang":
                    time.sleep(3600)
                if args.fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
            loss.backward()
            if not (faulty and step == args.at_step and args.fault == "skip"):
                dist.all_reduce(loss.detach())
            optimizer.step()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
