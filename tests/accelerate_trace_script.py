"""A training script written as Hugging Face Accelerate's examples write one, for `loopmark trace` under `accelerate
launch` (which starts the ranks through torchrun): `Accelerator()`, `accelerator.prepare(model, optimizer, loader)`
(DDP, and a DistributedSampler-like sharding of the loader), `accelerator.backward(loss)`.

Per optimizer step, worked out from the code below: one all-reduce (DDP's, the model's 2 parameter tensors in one
bucket, 72 bytes: 8 x 2 weights and 2 biases in float32); the batches are put on the device by the prepared loader.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_trace_script.py
"""

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main():
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,)))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for _ in range(50):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
    accelerator.end_training()


if __name__ == "__main__":
    main()
