"""A PyTorch Lightning script as a user writes it: a LightningModule whose training_step returns the loss and logs it
with prog_bar=True, Trainer(accelerator="cpu"); the first argument sets accumulate_grad_batches (default 1). Lightning
steps with `optimizer.step(closure)`: the last micro-batch's backward pass runs inside the step, the others' before."""
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(4096, 8, generator=g), torch.randint(0, 2, (4096,), generator=g))
trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                    accumulate_grad_batches=int(sys.argv[1]) if len(sys.argv) > 1 else 1, enable_model_summary=False)
trainer.fit(Model(), DataLoader(data, batch_size=16))
